"""emorl — the command line of EMORL (Kong et al., 2025): train one adapter per objective, search the
aggregation weights, generate and evaluate.

    python emorl.py train reflection|empathy|fluency|uniform|dynaopt|all   # §4 training stage (scst.py)
    python emorl.py search      # §4.2, Algorithm 1: hierarchical grid search of the weights (search.py)
    python emorl.py generate --weights 0.8,0.5,0.05 "client statement"     # §4.1, Eq. (2)
    python emorl.py evaluate    # §5, Tables 1 and 2
    python emorl.py convert SRC DST          # a .pt/.bin scorer checkpoint -> safetensors, or
                                             # the authors' LoRA .npz -> a PEFT-layout adapter folder
    python emorl.py build-default            # rebuild the embedded small models under data/default/

Every command defaults to the embedded assets under data/ and takes flags pointing at real ones.
A user error (bad file, key, shape, value) prints one line `error: ...` and exits with status 2.
"""
from __future__ import annotations

import argparse
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_ASSETS = os.path.join(HERE, "data", "default")
DEFAULT_DATA = os.path.join(HERE, "data", "pair_sample.csv")
SCORER_NAMES = ("reflection", "empathy", "fluency")


# ----------------------------------------------------------------------------- shared loading
def add_model_flags(parser, scorers=True):
    parser.add_argument("--policy", default=os.path.join(DEFAULT_ASSETS, "policy"), help="T5 directory (HF layout)")
    if scorers:
        for name in SCORER_NAMES:
            parser.add_argument(f"--{name}", default=os.path.join(DEFAULT_ASSETS, name), help=f"{name} scorer directory")
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    parser.add_argument("--seed", type=int, default=0, help="random seed (same seed, same result)")


def add_data_flags(parser):
    parser.add_argument("--data", default=DEFAULT_DATA, help="PAIR .csv or Psych8k .json file")
    parser.add_argument("--sample", type=float, default=1.0, help="use this fraction of the data (e.g. 0.1)")
    parser.add_argument("--split-seed", type=int, default=0, help="seed of the 80/10/10 split")


def load_policy(args):
    import t5
    model, tokenizer = t5.load_t5(args.policy, device=args.device)
    return model, tokenizer


def load_scorers(args, names=SCORER_NAMES):
    import rewards
    return rewards.load_scorers({name: getattr(args, name) for name in names}, device=args.device)


def load_splits(args) -> dict:
    import data
    examples = data.load_dataset(args.data)
    if args.sample < 1.0:
        examples = data.subsample(examples, args.sample, args.split_seed)
    return data.split_dataset(examples, args.split_seed)


def newest_adapters(runs_dir: str, names=SCORER_NAMES) -> list[str]:
    """The newest finished run per objective under runs/ (by summary.json time)."""
    from evaluate import find_runs
    from t5 import InputError
    runs = find_runs(runs_dir).values()
    found = []
    for name in names:
        summaries = [os.path.join(folders[name], "summary.json") for folders in runs if name in folders]
        if not summaries:
            raise InputError(f"no finished '{name}' run under {runs_dir}/: run `python emorl.py train {name}` first, or pass --adapters")
        found.append(os.path.join(os.path.dirname(max(summaries, key=os.path.getmtime)), "adapter"))
    return found


# ----------------------------------------------------------------------------- commands
def cmd_train(args):
    import scst

    objectives = list(SCORER_NAMES) if args.objective == "all" else [args.objective]
    splits = load_splits(args)
    scorers = load_scorers(args)
    validation_prompts = [e.prompt for e in splits["aggregation"][: args.val_prompts]]
    for objective in objectives:
        run_dir = os.path.join(args.runs, f"{objective}-{args.seed}")
        if os.path.exists(os.path.join(run_dir, "summary.json")):
            print(f"{run_dir}: already finished (summary.json); delete the folder to train again")
            continue
        model, tokenizer = load_policy(args)
        args.objective = objective
        summary = scst.train(model, tokenizer, scorers, splits["train"], validation_prompts, args, run_dir)
        print(f"{objective}: {summary['steps']} steps, {summary['data_points']} data points, "
              f"{summary['wall_seconds']:.1f}s, converged {summary['converged']}, "
              f"reward {summary['initial_reward']:.4f} -> {summary['final_reward']:.4f}  ({run_dir})")


def adapter_dirs(args, unique=False) -> list[str]:
    """The objective adapters' folders: --adapters, or the newest finished run of each objective;
    unique: one folder twice is refused (search would decode identical adapters for nothing)."""
    from t5 import InputError
    directories = args.adapters or newest_adapters(args.runs)
    if len(directories) != len(SCORER_NAMES):
        raise InputError(f"--adapters: expected {len(SCORER_NAMES)} folders ({', '.join(SCORER_NAMES)}), got {len(directories)}")
    real = [os.path.realpath(d) for d in directories]
    if unique and len(set(real)) != len(real):
        twice = next(d for d, r in zip(directories, real) if real.count(r) > 1)
        raise InputError(f"--adapters: {twice} is given more than once; give one adapter folder per objective")
    return [os.path.abspath(d) for d in directories]


def load_adapters(model, directories):
    """Load the adapters into `model`, named by objective."""
    import lora
    for name, directory in zip(SCORER_NAMES, directories):
        lora.load_adapter(model, directory, name)


def cmd_search(args):
    import search
    import torch
    torch.manual_seed(args.seed)
    adapters = adapter_dirs(args, unique=True)
    prompts = [e.prompt for e in load_splits(args)["aggregation"]]
    scorers = load_scorers(args)
    model, tokenizer = load_policy(args)
    load_adapters(model, adapters)
    objective = search.make_objective(model, tokenizer, list(SCORER_NAMES), scorers, prompts, level=args.level,
                                      batch_size=args.batch_size, device=args.device)
    meta = {"adapters": [search.fingerprint(d) for d in adapters], "level": args.level, "data": search.fingerprint(args.data),
            "sample": args.sample, "split_seed": args.split_seed, "prompts": len(prompts)}  # compared on resume
    info = {"adapters": [os.path.relpath(d) for d in adapters], "data": os.path.relpath(args.data)}  # stored only
    svg = os.path.splitext(args.out)[0] + ".svg"
    search.run_search(objective, SCORER_NAMES, out_path=args.out, iterations=args.iterations, svg_path=svg, meta=meta,
                      info=info)


def cmd_generate(args):
    import data
    import search
    import torch
    torch.manual_seed(args.seed)
    weights = search.parse_weights(args.weights, len(SCORER_NAMES))
    adapters = adapter_dirs(args)
    model, tokenizer = load_policy(args)
    load_adapters(model, adapters)
    ids, mask = data.encode_prompts(tokenizer, args.text, args.device)
    model.eval()
    tokens = search.ensemble_generate(model, list(SCORER_NAMES), weights, ids, mask, level=args.level,
                                      max_new_tokens=args.max_new_tokens)
    for text in tokenizer.batch_decode(tokens):
        print(text)


def cmd_evaluate(args):
    import evaluate
    import t5
    import torch
    torch.manual_seed(args.seed)
    search_result = t5.read_json(args.search) if os.path.exists(args.search) else None
    if search_result is None:
        print(f"{args.search} not found: aggregated methods skipped (run `python emorl.py search` first)")
    else:
        evaluate.check_search(search_result, SCORER_NAMES, args.search)  # before any work
    prompts = [e.prompt for e in load_splits(args)["inference"]]
    results = evaluate.evaluate(lambda: load_policy(args), load_scorers(args), prompts, args.runs, search_result,
                                batch_size=args.batch_size, device=args.device, objectives=SCORER_NAMES,
                                greedy=args.greedy, generation_runs=args.generation_runs, seed=args.seed)
    markdown, table_csv = evaluate.tables(results, SCORER_NAMES)
    t5.atomic_write(args.out + ".md", markdown)
    t5.atomic_write(args.out + ".csv", table_csv)
    print(markdown + f"({len(prompts)} inference prompts; {args.out}.md, {args.out}.csv)")


def cmd_convert(args):
    import rewards
    if args.src.endswith(".npz"):  # the authors' save_lora format -> a PEFT-layout adapter
        import lora
        written = lora.convert_npz(args.src, args.dst, base_model_name_or_path=args.base or "google-t5/t5-base")
        print("\n".join(f"wrote {path}" for path in written))
        return
    mapping = rewards.convert_checkpoint(args.src, args.dst, base=args.base)
    for source, target in mapping:
        print(f"{source} -> {target}")
    print(f"wrote {args.dst} ({sum(target != '-' for _, target in mapping)} tensors, "
          f"{sum(target == '-' for _, target in mapping)} dropped)")


def cmd_build_default(args):
    from data import build_default
    build_default.build(args.out, seed=args.seed, scale=args.scale)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="emorl.py", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    train = commands.add_parser("train", help="SCST + KL training of one LoRA adapter (scst.py)")
    train.add_argument("objective", choices=["reflection", "empathy", "fluency", "uniform", "dynaopt", "all"])
    add_model_flags(train)
    add_data_flags(train)
    train.add_argument("--runs", default="runs", help="output folder; each run goes to RUNS/<objective>-<seed>/")
    train.add_argument("--max-steps", type=int, default=10_000)
    train.add_argument("--batch-size", type=int, default=16, help="prompts per step")
    train.add_argument("--samples-per-prompt", type=int, default=3, help="k samples per prompt (SCST)")
    train.add_argument("--max-new-tokens", type=int, default=64)
    train.add_argument("--lr", type=float, default=1e-4)
    train.add_argument("--beta", type=float, default=0.05, help="KL coefficient")
    train.add_argument("--grad-clip", type=float, default=2.0)
    train.add_argument("--val-every", type=int, default=8, help="validate every N steps")
    train.add_argument("--val-prompts", type=int, default=32, help="fixed validation prompts (aggregation split)")
    train.add_argument("--cv-window", type=int, default=20, help="convergence: last N validation rewards")
    train.add_argument("--cv-tolerance", type=float, default=0.015, help="convergence: coefficient of variation below this")
    train.add_argument("--combine", choices=["logsum", "mean"], default="logsum", help="multi-objective reward")
    train.add_argument("--gamma", type=float, default=0.07, help="DynaOpt's Exp3 exploration rate")
    train.set_defaults(func=cmd_train)

    def add_aggregation_flags(sub):
        sub.add_argument("--runs", default="runs", help="folder of training runs")
        sub.add_argument("--adapters", nargs="+", metavar="DIR",
                         help=f"adapter folders in the order {', '.join(SCORER_NAMES)} (default: newest runs)")
        sub.add_argument("--level", choices=["hidden", "logit", "param"], default="hidden", help="aggregation level")

    search_cmd = commands.add_parser("search", help="hierarchical grid search of the aggregation weights (Algorithm 1)")
    add_model_flags(search_cmd)
    add_data_flags(search_cmd)
    add_aggregation_flags(search_cmd)
    search_cmd.add_argument("--iterations", type=int, default=5)
    search_cmd.add_argument("--batch-size", type=int, default=16)
    search_cmd.add_argument("--out", default="search.json", help="results (resumable); the figure goes beside it as .svg")
    search_cmd.set_defaults(func=cmd_search)

    generate = commands.add_parser("generate", help="aggregated reflection for client statements (Eq. 2)")
    generate.add_argument("text", nargs="+", help="client statement(s)")
    generate.add_argument("--weights", required=True, help="comma-separated weights, e.g. 0.8,0.5,0.05")
    generate.add_argument("--max-new-tokens", type=int, default=64)
    add_model_flags(generate, scorers=False)
    add_aggregation_flags(generate)
    generate.set_defaults(func=cmd_generate)

    evaluate_cmd = commands.add_parser("evaluate", help="Tables 1 and 2 on the inference split")
    add_model_flags(evaluate_cmd)
    add_data_flags(evaluate_cmd)
    evaluate_cmd.add_argument("--runs", default="runs", help="folder of training runs")
    evaluate_cmd.add_argument("--search", default="search.json", help="grid search result with the weights")
    evaluate_cmd.add_argument("--batch-size", type=int, default=16)
    evaluate_cmd.add_argument("--greedy", action="store_true",
                              help="decode every method greedily, one run (default: the authors' protocol, "
                                   "single-policy methods sampled top-50, EMORL greedy)")
    evaluate_cmd.add_argument("--generation-runs", type=int, default=3,
                              help="sampled generation runs per trained model (seeds SEED, SEED+1, ...)")
    evaluate_cmd.add_argument("--out", default="evaluate", help="writes OUT.md and OUT.csv")
    evaluate_cmd.set_defaults(func=cmd_evaluate)

    convert = commands.add_parser("convert", help="turn a .pt/.bin scorer checkpoint into safetensors, or the authors' "
                                                  "LoRA .npz into a PEFT-layout adapter")
    convert.add_argument("src", help="the .pt / .bin checkpoint (e.g. DynaOpt's reflection scorer), or an adapter .npz "
                                     "saved by the authors' save_lora (e.g. lora_reflection_18219.npz)")
    convert.add_argument("dst", help="output folder (or a .safetensors path); for an .npz the adapter folder, "
                                     "e.g. runs/reflection-authors/adapter")
    convert.add_argument("--base", help=".pt: a roberta-base folder whose config.json, vocab.json, merges.txt are copied "
                                        "beside it; .npz: base_model_name_or_path written in adapter_config.json")
    convert.set_defaults(func=cmd_convert)

    build = commands.add_parser("build-default", help="rebuild the embedded small models (data/build_default.py)")
    build.add_argument("--out", default=DEFAULT_ASSETS)
    build.add_argument("--seed", type=int, default=0)
    build.add_argument("--scale", type=float, default=1.0, help="fraction of the training budget (tests use less)")
    build.set_defaults(func=cmd_build_default)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from t5 import InputError
    try:
        args.func(args)
    except (InputError, FileNotFoundError, IsADirectoryError, NotADirectoryError) as e:
        print(f"error: {str(e).splitlines()[0] if str(e) else type(e).__name__}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: rerun the same command to resume", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
