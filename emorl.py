"""emorl — the command line of EMORL (Kong et al., 2025): train one adapter per objective, search the
aggregation weights, generate and evaluate.

    python emorl.py train reflection|empathy|fluency|NAME|uniform|dynaopt|all   # §4 training stage (scst.py)
    python emorl.py search      # §4.2, Algorithm 1: hierarchical grid search of the weights (search.py)
    python emorl.py generate --weights 0.8,0.5,0.05 "client statement"     # §4.1, Eq. (2)
    python emorl.py evaluate    # §5, Tables 1 and 2
    python emorl.py convert SRC DST          # a .pt/.bin scorer checkpoint -> safetensors
    python emorl.py build-default            # rebuild the embedded small models under data/default/

Every command defaults to the embedded assets under data/ and takes flags pointing at real ones.
A user error (bad file, key, shape, value) prints one line `error: ...` and exits with status 2.

Objectives are named scorers (§5.4's scalability): the built-ins reflection, empathy, fluency (flags
--reflection/--empathy/--fluency DIR), the embedded default's plugged ones (DEFAULT_PLUGGED, when
shipped), and any `--scorer NAME=DIR[:LABEL]` (rewards.load_scorer reads its kind from DIR/config.json).
`--objectives a,b,c,d` picks any d of them for search / generate / evaluate and for train
uniform|dynaopt|all; a new objective is `train NAME` alone, then a search with d + 1 objectives.
`train all --jobs N` trains the objectives in N processes (Eq. 3 counts the longest run).
"""
from __future__ import annotations

import argparse
import copy
import os
import re
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_ASSETS = os.path.join(HERE, "data", "default")
DEFAULT_DATA = os.path.join(HERE, "data", "pair_sample.csv")
SCORER_NAMES = ("reflection", "empathy", "fluency")     # the built-in objectives, each with its own flag
BASELINES = ("uniform", "dynaopt")
# Names an objective cannot take: methods and columns of evaluate's tables, train's own words.
RESERVED = BASELINES + ("all", "base", "param", "logit", "hidden", "average", "seconds", "seed")
# Plugged scorers the embedded default ships: objective -> (folder under DEFAULT_ASSETS, label scored).
DEFAULT_PLUGGED = {"autonomy": ("autonomy", "autonomy")}
OBJECTIVE_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_]*")   # a run folder <name>-<seed> and a LoRA adapter name


# ----------------------------------------------------------------------------- shared loading
def add_model_flags(parser, scorers=True):
    parser.add_argument("--policy", default=os.path.join(DEFAULT_ASSETS, "policy"), help="T5 directory (HF layout)")
    if scorers:
        for name in SCORER_NAMES:
            parser.add_argument(f"--{name}", default=os.path.join(DEFAULT_ASSETS, name), help=f"{name} scorer directory")
    if scorers:
        parser.add_argument("--scorer", action="append", default=[], metavar="NAME=DIR[:LABEL]",
                            help="plug in objective NAME scored by the classifier / GPT-2 in DIR (LABEL: the "
                                 "classifier's label to score); repeatable")
    parser.add_argument("--objectives", metavar="A,B,...",
                        help="comma-separated objectives (default: reflection,empathy,fluency)")
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    parser.add_argument("--seed", type=int, default=0, help="random seed (same seed, same result)")


def add_data_flags(parser):
    parser.add_argument("--data", default=DEFAULT_DATA, help="PAIR .csv or Psych8k .json file")
    parser.add_argument("--sample", type=float, default=1.0, help="use this fraction of the data (e.g. 0.1)")
    parser.add_argument("--split-seed", type=int, default=0, help="seed of the 80/10/10 split")


def single_device(args) -> str:
    from t5 import InputError
    if "," in args.device:
        raise InputError(f"--device {args.device}: one device here (a comma-separated list is for train --jobs)")
    return args.device


def load_policy(args):
    import t5
    model, tokenizer = t5.load_t5(args.policy, device=single_device(args))
    return model, tokenizer


def check_objective_name(name: str, what: str):
    from t5 import InputError
    if not OBJECTIVE_NAME.fullmatch(name):
        raise InputError(f"{what}: objective name {name!r} must be letters, digits and _, starting with a letter")
    if name in RESERVED:
        raise InputError(f"{what}: {name!r} is reserved (a method or column name), choose another objective name")


def parse_scorer(text: str) -> tuple[str, str, str | None]:
    """--scorer NAME=DIR or NAME=DIR:LABEL -> (name, directory, label or None)."""
    from t5 import InputError
    name, equals, directory = text.partition("=")
    name, label = name.strip(), None
    if not equals or not name or not directory:
        raise InputError(f"--scorer {text!r}: expected NAME=DIR or NAME=DIR:LABEL")
    check_objective_name(name, f"--scorer {text!r}")
    if name in SCORER_NAMES:
        raise InputError(f"--scorer {text!r}: {name!r} is a built-in objective; give its scorer with --{name} DIR")
    if ":" in directory and not os.path.isdir(directory):
        directory, label = directory.rsplit(":", 1)
        if not directory or not label:
            raise InputError(f"--scorer {text!r}: expected NAME=DIR:LABEL with a folder and a label")
    return name, directory, label


def known_scorers(args) -> dict[str, tuple[str, str | None]]:
    """{objective: (scorer directory, label or None)}: the built-ins (--reflection/--empathy/--fluency),
    the embedded default's plugged scorers (when shipped), then every --scorer (replacing a default)."""
    from t5 import InputError
    known = {name: (getattr(args, name), None) for name in SCORER_NAMES}
    for name, (folder, label) in DEFAULT_PLUGGED.items():
        if os.path.isdir(os.path.join(DEFAULT_ASSETS, folder)):
            known[name] = (os.path.join(DEFAULT_ASSETS, folder), label)
    given = set()
    for text in args.scorer:
        name, directory, label = parse_scorer(text)
        if name in given:
            raise InputError(f"--scorer: objective {name!r} given twice")
        given.add(name)
        known[name] = (directory, label)
    return known


def parse_objectives(text: str | None, known: dict | None) -> list[str]:
    """--objectives a,b,c (None: the three built-ins): distinct names, each in `known` (None: any valid
    name, for generate, which reads adapters only)."""
    from t5 import InputError
    names = [name.strip() for name in (text or ",".join(SCORER_NAMES)).split(",")]
    for name in names:
        if known is not None and name not in known:
            raise InputError(f"--objectives {text}: unknown objective {name!r} (known: {', '.join(known)}; "
                             "plug one in with --scorer NAME=DIR)")
        check_objective_name(name, f"--objectives {text}")
    repeated = next((name for i, name in enumerate(names) if name in names[:i]), None)
    if repeated:
        raise InputError(f"--objectives {text}: {repeated!r} is listed twice")
    return names


def load_scorers(args, names, known):
    """The scorers of objectives `names` on args.device, in that order."""
    import rewards
    return rewards.load_scorers({name: known[name] for name in names}, device=single_device(args))


def load_splits(args) -> dict:
    import data
    examples = data.load_dataset(args.data)
    if args.sample < 1.0:
        examples = data.subsample(examples, args.sample, args.split_seed)
    return data.split_dataset(examples, args.split_seed)


def newest_adapters(runs_dir: str, names) -> list[str]:
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
def training_runs(args, known) -> list[str]:
    """The runs `train OBJECTIVE` asks for; sets args.objectives, the objectives uniform / dynaopt combine."""
    from t5 import InputError
    explicit, args.objectives = args.objectives is not None, parse_objectives(args.objectives, known)
    if args.objective == "all":
        return list(args.objectives)
    if args.objective in BASELINES:
        if len(args.objectives) < 2:
            raise InputError(f"train {args.objective}: --objectives needs at least 2 objectives to combine")
        return [args.objective]
    if args.objective not in known:
        raise InputError(f"unknown objective {args.objective!r} (known: {', '.join(known)}, uniform, dynaopt, all; "
                         "plug one in with --scorer NAME=DIR)")
    if explicit:
        raise InputError(f"train {args.objective} trains that objective alone; --objectives is for uniform, dynaopt and all")
    return [args.objective]


def train_job(job) -> list[dict]:
    """Train the runs [(objective, device), ...] of one job one after another, in this process."""
    import scst
    args, runs, known = job
    splits = load_splits(args)
    validation_prompts = [e.prompt for e in splits["aggregation"][: args.val_prompts]]
    # Validation records the built-ins and every objective trained here.
    names = list(dict.fromkeys([*SCORER_NAMES, *args.objectives, *(o for o, _ in runs if o not in BASELINES)]))
    scorers, summaries = {}, []
    for objective, device in runs:
        run_args = copy.copy(args)
        run_args.objective, run_args.device = objective, device
        run_dir = os.path.join(args.runs, f"{objective}-{args.seed}")
        if os.path.exists(os.path.join(run_dir, "summary.json")):
            check_finished_run(run_dir, run_args)
            print(f"{run_dir}: already finished (summary.json); delete the folder to train again")
            continue
        if device not in scorers:
            scorers[device] = load_scorers(run_args, names, known)
        model, tokenizer = load_policy(run_args)
        summary = scst.train(model, tokenizer, scorers[device], splits["train"], validation_prompts, run_args, run_dir)
        print(f"{objective}: {summary['steps']} steps, {summary['data_points']} data points, "
              f"{summary['wall_seconds']:.1f}s, converged {summary['converged']}, "
              f"reward {summary['initial_reward']:.4f} -> {summary['final_reward']:.4f}  ({run_dir})", flush=True)
        summaries.append(summary)
    return summaries


def check_finished_run(run_dir, args):
    """A finished uniform / dynaopt run must have combined the objectives asked for now."""
    import t5
    if args.objective in BASELINES:
        trained = t5.read_json(os.path.join(run_dir, "summary.json")).get("objectives", list(SCORER_NAMES))
        if trained != list(args.objectives):
            raise t5.InputError(f"{run_dir} combined {','.join(trained)}, not {','.join(args.objectives)}: "
                                "choose another --runs folder or delete it")


def cmd_train(args):
    from t5 import InputError
    known = known_scorers(args)
    objectives = training_runs(args, known)
    devices = [device.strip() for device in args.device.split(",")]
    if args.jobs < 1:
        raise InputError(f"--jobs {args.jobs}: need at least 1")
    jobs = min(args.jobs, len(objectives))
    if len(devices) > jobs:
        raise InputError(f"--device {args.device}: {len(devices)} devices for {jobs} job(s); one device per job")
    # Job j trains objectives j, j + N, j + 2N, ... on devices[j mod len(devices)].
    plan = [(args, [(name, devices[j % len(devices)]) for name in objectives[j::jobs]], known) for j in range(jobs)]
    started = time.time()
    if jobs == 1:
        summaries = train_job(plan[0])
    else:
        import multiprocessing
        print(f"training {', '.join(objectives)} in {jobs} processes on {', '.join(devices)}", flush=True)
        with multiprocessing.get_context("spawn").Pool(jobs) as pool:   # an error stops every job
            summaries = [summary for done in pool.imap_unordered(train_job, plan) for summary in done]
            pool.close()
            pool.join()
    if len(objectives) > 1 and summaries:
        print(f"trained {len(summaries)} runs in {jobs} process(es): {time.time() - started:.1f}s wall; "
              f"Eq. (3) counts the longest run, {max(s['wall_seconds'] for s in summaries):.1f}s")


def adapter_dirs(args, names) -> list[str]:
    """The objective adapters' folders: --adapters, or the newest finished run of each objective."""
    from t5 import InputError
    directories = args.adapters or newest_adapters(args.runs, names)
    if len(directories) != len(names):
        raise InputError(f"--adapters: expected {len(names)} folders ({', '.join(names)}), got {len(directories)}")
    return [os.path.abspath(d) for d in directories]


def load_adapters(model, directories, names):
    """Load the adapters into `model`, named by objective."""
    import lora
    for name, directory in zip(names, directories):
        lora.load_adapter(model, directory, name)


def cmd_search(args):
    import search
    import torch
    from t5 import InputError
    torch.manual_seed(args.seed)
    known = known_scorers(args)
    names = parse_objectives(args.objectives, known)
    if len(names) < 2:
        raise InputError(f"search --objectives {','.join(names)}: the weights of a single adapter need no search; "
                         "give at least 2 objectives")
    adapters = adapter_dirs(args, names)
    prompts = [e.prompt for e in load_splits(args)["aggregation"]]
    scorers = load_scorers(args, names, known)
    model, tokenizer = load_policy(args)
    load_adapters(model, adapters, names)
    objective = search.make_objective(model, tokenizer, names, scorers, prompts, level=args.level,
                                      batch_size=args.batch_size, device=args.device)
    meta = {"adapters": adapters, "level": args.level, "data": os.path.abspath(args.data), "sample": args.sample,
            "split_seed": args.split_seed, "prompts": len(prompts)}
    svg = os.path.splitext(args.out)[0] + ".svg"
    search.run_search(objective, names, out_path=args.out, iterations=args.iterations, svg_path=svg, meta=meta)


def cmd_generate(args):
    import data
    import search
    import torch
    torch.manual_seed(args.seed)
    names = parse_objectives(args.objectives, None)
    weights = search.parse_weights(args.weights, len(names))
    adapters = adapter_dirs(args, names)
    model, tokenizer = load_policy(args)
    load_adapters(model, adapters, names)
    ids, mask = data.encode_prompts(tokenizer, args.text, args.device)
    model.eval()
    tokens = search.ensemble_generate(model, names, weights, ids, mask, level=args.level,
                                      max_new_tokens=args.max_new_tokens)
    for text in tokenizer.batch_decode(tokens):
        print(text)


def cmd_evaluate(args):
    import evaluate
    import t5
    import torch
    torch.manual_seed(args.seed)
    known = known_scorers(args)
    names = parse_objectives(args.objectives, known)
    search_result = t5.read_json(args.search) if os.path.exists(args.search) else None
    if search_result is None:
        print(f"{args.search} not found: aggregated methods skipped (run `python emorl.py search` first)")
    prompts = [e.prompt for e in load_splits(args)["inference"]]
    results = evaluate.evaluate(lambda: load_policy(args), load_scorers(args, names, known), prompts, args.runs,
                                search_result, batch_size=args.batch_size, device=args.device, objectives=names)
    markdown, table_csv = evaluate.tables(results, objectives=names)
    t5.atomic_write(args.out + ".md", markdown)
    t5.atomic_write(args.out + ".csv", table_csv)
    print(markdown + f"({len(prompts)} inference prompts; {args.out}.md, {args.out}.csv)")


def cmd_convert(args):
    import rewards
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
    train.add_argument("objective", help="reflection, empathy, fluency, a plugged objective (--scorer), uniform, "
                                         "dynaopt, or all (every objective of --objectives, one adapter each)")
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
    train.add_argument("--jobs", type=int, default=1,
                       help="train all: N processes at once (--device a,b,...: one device per process)")
    train.set_defaults(func=cmd_train)

    def add_aggregation_flags(sub):
        sub.add_argument("--runs", default="runs", help="folder of training runs")
        sub.add_argument("--adapters", nargs="+", metavar="DIR",
                         help="adapter folders, one per objective in --objectives order (default: newest runs)")
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
    evaluate_cmd.add_argument("--out", default="evaluate", help="writes OUT.md and OUT.csv")
    evaluate_cmd.set_defaults(func=cmd_evaluate)

    convert = commands.add_parser("convert", help="turn a PyTorch .pt/.bin scorer checkpoint into safetensors")
    convert.add_argument("src", help="the .pt / .bin checkpoint (e.g. DynaOpt's reflection scorer)")
    convert.add_argument("dst", help="output folder (or a .safetensors path)")
    convert.add_argument("--base", help="a roberta-base folder whose config.json, vocab.json, merges.txt are copied beside it")
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
