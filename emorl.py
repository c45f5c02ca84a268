"""emorl — the command line of EMORL (Kong et al., 2025): train one adapter per objective, search the
aggregation weights, generate and evaluate.

    python emorl.py train reflection|empathy|fluency|NAME|uniform|dynaopt|all   # §4 training stage (scst.py)
    python emorl.py train iterative --merge-every 30 --max-steps 120  # IterativeRS, one soup (iterative.py)
    python emorl.py search      # §4.2, Algorithm 1: hierarchical grid search of the weights (search.py)
    python emorl.py generate --weights 0.8,0.5,0.05 "client statement"     # §4.1, Eq. (2)
    python emorl.py evaluate    # §5, Tables 1 and 2
    python emorl.py convert SRC DST          # a .pt/.bin scorer checkpoint -> safetensors, or
                                             # the authors' LoRA .npz -> a PEFT-layout adapter folder
    python emorl.py build-default            # rebuild the embedded small models under data/default/
    python emorl.py reproduce --seeds 0,1,2  # Tables 1-3, Figures 3 and 5, the paper's claims (compare.py)
    python emorl.py compare                  # every method over a preference grid (compare.py)
    python emorl.py hoe build|train          # HoE (Li et al. 2025), the compared method: experts, routers (hoe.py)

Every command defaults to the embedded assets under data/ and takes flags pointing at real ones.
A user error (bad file, key, shape, value) prints one line `error: ...` and exits with status 2. Flag
values are checked when parsed (ranges, finite numbers, a device that exists), output folders before any
work; relative output paths (--runs, --out) are taken from the current directory.

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

from files import Parser, device, devices, fraction, integer, number, positive, seed  # noqa: F401 (flag types)

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_ASSETS = os.path.join(HERE, "data", "default")
DEFAULT_DATA = os.path.join(HERE, "data", "pair_sample.csv")
SCORER_NAMES = ("reflection", "empathy", "fluency")     # the built-in objectives, each with its own flag
BASELINES = ("uniform", "dynaopt")
# Names an objective cannot take: methods and columns of evaluate's tables, train's own words.
RESERVED = BASELINES + ("all", "iterative", "base", "param", "logit", "hidden", "average", "seconds", "seed")
# Plugged scorers the embedded default ships: objective -> (folder under DEFAULT_ASSETS, label scored).
DEFAULT_PLUGGED = {"autonomy": ("autonomy", "autonomy")}
OBJECTIVE_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_]*")   # a run folder <name>-<seed> and a LoRA adapter name


def prepare_output(folder, what, names=None):
    """Before any work: the output folder must be writable (one-line error otherwise), and temporary files
    a killed run left there are deleted (only those of `names` in a shared folder)."""
    import files
    files.check_writable(folder, what)
    removed = files.remove_stale_temporaries(folder, names)
    if removed:
        print(f"{folder}: removed {len(removed)} temporary file(s) a killed run left behind")


# ----------------------------------------------------------------------------- shared loading
def add_model_flags(parser, scorers=True, device_type=device):
    parser.add_argument("--policy", default=os.path.join(DEFAULT_ASSETS, "policy"), help="T5 directory (HF layout)")
    if scorers:
        for name in SCORER_NAMES:
            parser.add_argument(f"--{name}", default=os.path.join(DEFAULT_ASSETS, name), help=f"{name} scorer directory")
        parser.add_argument("--scorer", action="append", default=[], metavar="NAME=DIR[:LABEL]",
                            help="plug in objective NAME scored by the classifier / GPT-2 in DIR (LABEL: the "
                                 "classifier's label to score); repeatable")
    parser.add_argument("--objectives", metavar="A,B,...",
                        help="comma-separated objectives (default: reflection,empathy,fluency)")
    parser.add_argument("--device", type=device_type, default="cpu", help="torch device, e.g. cpu, cuda, cuda:1 (must exist here)")
    parser.add_argument("--seed", type=seed, default=0, help="random seed (same seed, same result)")


def add_force_flag(parser):
    parser.add_argument("--force", action="store_true", help="use an adapter given as another objective than the "
                        "one it records (a warning line instead of an error)")


def add_training_flags(parser):
    """The SCST flags of train, reproduce and compare (scst.py reads them from the parsed args)."""
    parser.add_argument("--max-steps", type=positive, default=10_000, help="stop after this many steps if not converged")
    parser.add_argument("--batch-size", type=positive, default=16, help="prompts per step")
    parser.add_argument("--samples-per-prompt", type=integer(2), default=3,
                        help="k samples per prompt (SCST and validation; their mean is the baseline, so k >= 2)")
    parser.add_argument("--max-new-tokens", type=positive, default=64, help="length limit of each sampled response")
    parser.add_argument("--lr", type=number(0.0, low_open=True), default=1e-4, help="AdamW learning rate of the adapter")
    parser.add_argument("--beta", type=number(0.0), default=0.05, help="KL coefficient")
    parser.add_argument("--grad-clip", type=number(0.0, low_open=True), default=2.0, help="gradient norm clipping")
    parser.add_argument("--val-every", type=positive, default=8,
                        help="validate every N steps from step N (a step-0 validation is logged, not counted)")
    parser.add_argument("--val-prompts", type=positive, default=None,
                        help="validate on the first N aggregation prompts (default: all of them, as the authors)")
    parser.add_argument("--cv-window", type=integer(2), default=20, help="convergence: last N validation rewards")
    parser.add_argument("--cv-tolerance", type=number(0.0), default=0.015, help="convergence: coefficient of variation below this")
    parser.add_argument("--combine", choices=["logsum", "mean"], default="logsum",
                        help="reward: logsum = sum of w_i log clip(s_i) (single objectives too), mean = raw scores")
    parser.add_argument("--gamma", type=fraction, default=0.07, help="DynaOpt's Exp3 exploration rate, in (0, 1]")
    parser.add_argument("--top-k", type=integer(0), default=50,
                        help="sample among the K most likely tokens (training and validation; 0 = full softmax)")


def add_data_flags(parser):
    parser.add_argument("--data", default=DEFAULT_DATA, help="PAIR .csv or Psych8k .json file")
    parser.add_argument("--sample", type=fraction, default=1.0, help="use this fraction of the data, in (0, 1] (e.g. 0.1)")
    parser.add_argument("--split-seed", type=seed, default=0, help="seed of the 80/10/10 split")


def load_policy(args):
    import t5
    model, tokenizer = t5.load_t5(args.policy, device=args.device)
    return model, tokenizer


def check_objective_name(name: str, what: str):
    from files import InputError
    if not OBJECTIVE_NAME.fullmatch(name):
        raise InputError(f"{what}: objective name {name!r} must be letters, digits and _, starting with a letter")
    if name in RESERVED:
        raise InputError(f"{what}: {name!r} is reserved (a method or column name), choose another objective name")


def parse_scorer(text: str) -> tuple[str, str, str | None]:
    """--scorer NAME=DIR or NAME=DIR:LABEL -> (name, directory, label or None)."""
    from files import InputError
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
    from files import InputError
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
    from files import InputError
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
    return rewards.load_scorers({name: known[name] for name in names}, device=args.device)


def load_splits(args) -> dict:
    import data
    examples = data.load_dataset(args.data)
    if args.sample < 1.0:
        examples = data.subsample(examples, args.sample, args.split_seed)
    return data.split_dataset(examples, args.split_seed)


# ----------------------------------------------------------------------------- commands
def training_runs(args, known) -> list[str]:
    """The runs `train OBJECTIVE` asks for; sets args.objectives, the objectives uniform / dynaopt combine."""
    from files import InputError
    explicit, args.objectives = args.objectives is not None, parse_objectives(args.objectives, known)
    if args.objective == "all":
        return list(args.objectives)
    if args.objective in BASELINES + ("iterative",):
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
    import files
    import scst
    args, runs, known = job
    splits = load_splits(args)
    validation_prompts = [e.prompt for e in splits["aggregation"][: args.val_prompts]]
    # Validation records the built-ins and every objective trained here.
    names = list(dict.fromkeys([*SCORER_NAMES, *args.objectives, *(o for o, _ in runs if o not in BASELINES)]))
    scorers, summaries = {}, []
    for objective, run_device in runs:
        run_args = copy.copy(args)
        run_args.objective, run_args.device = objective, run_device
        run_dir = files.run_folder(args.runs, objective, args.seed)
        if getattr(args, "objective", None) == "all":  # the log lines below say no objective: a header per run
            print(f"== train {objective} ({args.objectives.index(objective) + 1}/{len(args.objectives)}) "
                  f"on {run_device} -> {run_dir}", flush=True)
        model, tokenizer = load_policy(run_args)
        settings = scst.run_settings(run_args, model, splits["train"], validation_prompts)
        finished = scst.finished_summary(run_dir, run_args, settings)
        if finished is not None:
            state = "converged" if finished["converged"] else f"stopped at --max-steps {finished['steps']}"
            print(f"{run_dir}: already finished ({state}); delete the folder to train again", flush=True)
            continue
        if run_device not in scorers:
            scorers[run_device] = load_scorers(run_args, names, known)
        summary = scst.train(model, tokenizer, scorers[run_device], splits["train"], validation_prompts, run_args, run_dir)
        print(f"{objective}: {summary['steps']} steps, {summary['data_points']} data points, "
              f"{summary['wall_seconds']:.1f}s, converged {summary['converged']}, "
              f"reward {summary['initial_reward']:.4f} -> {summary['final_reward']:.4f}  ({run_dir})", flush=True)
        summaries.append(summary)
    return summaries


def exit_with_parent(parent_pid):
    """Pool initializer of `train all --jobs N`: a job ends when the command that started it is gone, even
    after kill -9 (which runs no clean-up), so no orphan keeps writing a run folder that the resumed command
    writes too. A watcher thread polls the parent's pid; what the job wrote is resumable as after any kill."""
    import threading

    def watch():
        while os.getppid() == parent_pid:
            time.sleep(0.5)
        os._exit(1)
    threading.Thread(target=watch, daemon=True, name="exit-with-parent").start()


def train_jobs(plan, jobs, desc=None) -> list[dict]:
    """train_job for each job of `plan`, here or in `jobs` spawned processes (train all --jobs, reproduce / compare)."""
    import multiprocessing
    from tqdm import tqdm
    jobs = min(jobs, len(plan))
    if jobs == 1:
        return [summary for job in tqdm(plan, desc, unit="job", disable=desc is None) for summary in train_job(job)]
    # The jobs share the machine's cores: each gets its share of torch threads (the spawned processes read
    # OMP_NUM_THREADS when they import torch), not all of them each, unless the caller set it.
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // jobs)))
    with multiprocessing.get_context("spawn").Pool(jobs, exit_with_parent, (os.getpid(),)) as pool:  # an error stops every job
        done = tqdm(pool.imap_unordered(train_job, plan), desc, len(plan), unit="job", disable=desc is None)
        summaries = [summary for finished in done for summary in finished]
        pool.close()
        pool.join()
    return summaries


def cmd_train(args):
    import files
    from files import InputError
    known = known_scorers(args)
    objectives = training_runs(args, known)
    given = [flag for flag, value in (("--weights", args.weights), ("--merge-every", args.merge_every),
                                      ("--subset", args.subset), ("--selective", args.selective)) if value not in (None, False)]
    if args.objective == "iterative":
        if args.merge_every is None:
            raise InputError("train iterative: give --merge-every M, a divisor of --max-steps (the paper's summarization "
                             "runs merge T/m = 4 times)")
        import iterative
        return iterative.command(args, known)
    if given:
        raise InputError(f"train {args.objective}: {given[0]} is for train iterative")
    devices = [part.strip() for part in args.device.split(",")]
    jobs = min(args.jobs, len(objectives))
    if len(devices) > jobs:
        raise InputError(f"--device {args.device}: {len(devices)} devices for {jobs} job(s); one device per job")
    for objective in objectives:
        prepare_output(files.run_folder(args.runs, objective, args.seed), f"--runs {args.runs}")
        prepare_output(os.path.join(files.run_folder(args.runs, objective, args.seed), "adapter"), f"--runs {args.runs}")
    # Job j trains objectives j, j + N, j + 2N, ... on devices[j mod len(devices)].
    plan = [(args, [(name, devices[j % len(devices)]) for name in objectives[j::jobs]], known) for j in range(jobs)]
    started = time.time()
    if jobs > 1:
        print(f"training {', '.join(objectives)} in {jobs} processes on {', '.join(devices)}", flush=True)
    summaries = train_jobs(plan, jobs)
    if len(objectives) > 1 and summaries:
        print(f"trained {len(summaries)} runs in {jobs} process(es): {time.time() - started:.1f}s wall; "
              f"Eq. (3) counts the longest run, {max(s['wall_seconds'] for s in summaries):.1f}s")


def adapter_dirs(args, names, unique=False) -> list[str]:
    """The objective adapters' folders: --adapters, or the newest finished run of each objective;
    unique: one folder twice is refused (search would decode identical adapters for nothing)."""
    import files
    from files import InputError
    directories = args.adapters or files.newest_adapters(args.runs, names)
    if len(directories) != len(names):
        raise InputError(f"--adapters: expected {len(names)} folders ({', '.join(names)}), got {len(directories)}")
    real = [os.path.realpath(d) for d in directories]
    if unique and len(set(real)) != len(real):
        twice = next(d for d, r in zip(directories, real) if real.count(r) > 1)
        raise InputError(f"--adapters: {twice} is given more than once; give one adapter folder per objective")
    return [os.path.abspath(d) for d in directories]


def load_adapters(model, directories, names, force=False):
    """Load the adapters into `model`, named by objective; one trained for another objective is refused
    (lora.check_objective; --force: a warning line)."""
    import lora
    for name, directory in zip(names, directories):
        lora.load_adapter(model, directory, name)
        if warning := lora.check_objective(directory, name, force):
            print(warning, file=sys.stderr, flush=True)


def cmd_search(args):
    import search
    import torch
    from files import InputError
    torch.manual_seed(args.seed)
    known = known_scorers(args)
    names = parse_objectives(args.objectives, known)
    svg = os.path.splitext(args.out)[0] + ".svg"
    if os.path.isdir(args.out):
        raise InputError(f"--out {args.out}: is a folder; give the path of the .json file to write")
    prepare_output(os.path.dirname(os.path.abspath(args.out)), f"--out {args.out}",
                   [os.path.basename(args.out), os.path.basename(svg)])
    if len(names) < 2:
        raise InputError(f"search --objectives {','.join(names)}: the weights of a single adapter need no search; "
                         "give at least 2 objectives")
    adapters = adapter_dirs(args, names, unique=True)
    prompts = [e.prompt for e in load_splits(args)["aggregation"]]
    scorers = load_scorers(args, names, known)
    model, tokenizer = load_policy(args)
    load_adapters(model, adapters, names, args.force)
    objective = search.make_objective(model, tokenizer, names, scorers, prompts, level=args.level,
                                      batch_size=args.batch_size, device=args.device)
    meta = {"adapters": [search.fingerprint(d) for d in adapters], "level": args.level, "data": search.fingerprint(args.data),
            "sample": args.sample, "split_seed": args.split_seed, "prompts": len(prompts)}  # compared on resume
    info = {"adapters": [os.path.relpath(d) for d in adapters], "data": os.path.relpath(args.data)}  # stored only
    search.run_search(objective, names, out_path=args.out, iterations=args.iterations, svg_path=svg, meta=meta,
                      info=info)


def cmd_generate(args):
    import data
    import search
    import torch
    from files import InputError
    torch.manual_seed(args.seed)
    if args.soup is not None:                 # IterativeRS: one merged policy, greedy
        import iterative
        import t5
        if args.weights is not None:
            raise InputError("--soup decodes one merged policy; --weights is for the objective adapters")
        model, tokenizer = load_policy(args)
        iterative.load_soup(model, args.soup)
        ids, mask = data.encode_prompts(tokenizer, args.text, args.device)
        tokens = t5.generate(model.eval(), ids, mask, max_new_tokens=args.max_new_tokens)[0]
    else:
        if args.weights is None:
            raise InputError("the following arguments are required: --weights (or --soup RUN)")
        names = parse_objectives(args.objectives, None)
        weights = search.parse_weights(args.weights, len(names))
        adapters = adapter_dirs(args, names)
        model, tokenizer = load_policy(args)
        load_adapters(model, adapters, names, args.force)
        ids, mask = data.encode_prompts(tokenizer, args.text, args.device)
        model.eval()
        tokens = search.ensemble_generate(model, names, weights, ids, mask, level=args.level,
                                          max_new_tokens=args.max_new_tokens)
    for text in tokenizer.batch_decode(tokens):
        print(text)


def cmd_evaluate(args):
    import evaluate
    import files
    import hoe
    import torch
    from files import InputError
    torch.manual_seed(args.seed)
    known = known_scorers(args)
    names = parse_objectives(args.objectives, known)
    outputs = [args.out + ".md", args.out + ".csv", args.out + "-hoe.json"]
    prepare_output(os.path.dirname(os.path.abspath(outputs[0])), f"--out {args.out}",
                   [os.path.basename(p) for p in outputs])
    search_result = files.read_json(args.search) if os.path.exists(args.search) else None
    if search_result is None:
        print(f"{args.search} not found: aggregated methods skipped (run `python emorl.py search` first)")
    else:
        evaluate.check_search(search_result, evaluate.searched_objectives(search_result, names), args.search)  # before any work
    with_hoe = os.path.exists(os.path.join(args.hoe, "hoe.json"))
    if args.preference and not with_hoe:
        raise InputError(f"--preference: no HoE under {args.hoe}/ (run `python emorl.py hoe build` first)")
    preferences = hoe.parse_preferences(args.preference, len(names)) if with_hoe else []
    prompts = [e.prompt for e in load_splits(args)["inference"]]
    results = evaluate.evaluate(lambda: load_policy(args), load_scorers(args, names, known), prompts, args.runs,
                                search_result, batch_size=args.batch_size, device=args.device, objectives=names,
                                greedy=args.greedy, generation_runs=args.generation_runs, seed=args.seed,
                                force=args.force)
    if with_hoe:
        rows, report = hoe.evaluate_hoe(lambda: load_policy(args), load_scorers(args, names, known), prompts, args.hoe,
                                        preferences, names, args.batch_size, args.device)
        results.update(rows)
        files.write_json(args.out + "-hoe.json", report)
    markdown, table_csv = evaluate.tables(results, objectives=names)
    files.atomic_write(args.out + ".md", markdown)
    files.atomic_write(args.out + ".csv", table_csv)
    print(markdown + f"({len(prompts)} inference prompts; {args.out}.md, {args.out}.csv)")


def cmd_reproduce_or_compare(args):
    import compare
    getattr(compare, args.command)(args)         # compare.reproduce, compare.compare


def cmd_hoe(args):
    """hoe build: LoRA experts from the objective adapters; hoe train: one router expert (hoe.py)."""
    import hoe
    import torch
    torch.manual_seed(args.seed)
    known = known_scorers(args)
    names = parse_objectives(args.objectives, known)
    prepare_output(args.out, f"--out {args.out}", ["hoe.json"])
    if args.action == "build":
        merged = hoe.parse_merged(args.merged, len(names))
        rescales = hoe.parse_numbers(args.rescales, "--rescales", positive=True)
        hoe.build(args, names, adapter_dirs(args, names), load_scorers(args, names, known),
                  [e.prompt for e in load_splits(args)["aggregation"]], merged, rescales)
        return
    preference = hoe.parse_preference(args.preference, len(names)) if args.preference else hoe.default_router_preference(len(names))
    if args.ideal is not None:
        args.ideal = hoe.parse_numbers(args.ideal, "--ideal", count=len(names))
    summary = hoe.train(args, names, load_scorers(args, names, known), [e.prompt for e in load_splits(args)["train"]], preference)
    print(f"router {hoe.router_name(preference)}: {summary['steps']} steps, {summary['data_points']} data points, {summary['wall_seconds']}s, "
          f"{summary['trainable_parameters']} trainable parameters")


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
    from files import InputError
    out = DEFAULT_ASSETS if args.out is None else args.out
    committed = os.path.realpath(out) == os.path.realpath(DEFAULT_ASSETS) and os.path.isdir(out) and os.listdir(out)
    if committed and not args.force:
        raise InputError(f"{DEFAULT_ASSETS} holds the committed default models: pass --force to rebuild them "
                         "there, or --out DIR to write elsewhere")
    prepare_output(out, f"--out {out}")
    build_default.build(out, seed=args.seed, scale=args.scale)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="emorl.py", description=__doc__.split("\n\n")[0])
    commands = parser.commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    train = commands.add_parser("train", help="SCST + KL training of one LoRA adapter (scst.py)")
    train.add_argument("objective", help="reflection, empathy, fluency, a plugged objective (--scorer), uniform, "
                                         "dynaopt, all (every objective of --objectives, one adapter each), or "
                                         "iterative (IterativeRS: one soup of --objectives for --weights)")
    add_model_flags(train, device_type=devices)
    add_data_flags(train)
    train.add_argument("--runs", default="runs", help="output folder, relative to the current directory (not to "
                       "emorl.py, unlike the model defaults); each run goes to RUNS/<objective>-<seed>/")
    add_training_flags(train)
    train.add_argument("--jobs", type=positive, default=1,
                       help="train all: N processes at once (--device a,b,...: one device per process)")
    train.add_argument("--merge-every", type=positive, help="train iterative: m, steps between merges (divides --max-steps)")
    train.add_argument("--weights", help="train iterative: preference w, one per objective (default: uniform)")
    train.add_argument("--subset", type=positive, help="train iterative: M objectives drawn per round (default: all)")
    train.add_argument("--selective", action="store_true",
                       help="train iterative: pick each merge's weights among B.3's candidate sets by mean reward")
    train.add_argument("--select-prompts", type=positive, default=32,
                       help="train iterative --selective: training prompts each candidate is scored on")
    train.set_defaults(func=cmd_train)

    def add_aggregation_flags(sub):
        sub.add_argument("--runs", default="runs", help="folder of training runs, relative to the current directory")
        sub.add_argument("--adapters", nargs="+", metavar="DIR",
                         help="adapter folders, one per objective in --objectives order (default: newest runs)")
        sub.add_argument("--level", choices=["hidden", "logit", "param"], default="hidden", help="aggregation level")
        add_force_flag(sub)

    search_cmd = commands.add_parser("search", help="hierarchical grid search of the aggregation weights (Algorithm 1)")
    add_model_flags(search_cmd)
    add_data_flags(search_cmd)
    add_aggregation_flags(search_cmd)
    search_cmd.add_argument("--iterations", type=positive, default=5, help="refinement iterations of Algorithm 1")
    search_cmd.add_argument("--batch-size", type=positive, default=16, help="prompts decoded at once")
    search_cmd.add_argument("--out", default="search.json", help="results (resumable), relative to the current directory; "
                            "the figure goes beside it as .svg")
    search_cmd.set_defaults(func=cmd_search)

    generate = commands.add_parser("generate", help="aggregated reflection for client statements (Eq. 2)")
    generate.add_argument("text", nargs="+", help="client statement(s)")
    generate.add_argument("--weights", help="comma-separated weights, e.g. 0.8,0.5,0.05 (required without --soup)")
    generate.add_argument("--soup", metavar="RUN", help="decode IterativeRS's soup of this run folder instead "
                          "(e.g. runs/iterative-0; greedy, no --weights)")
    generate.add_argument("--max-new-tokens", type=positive, default=64, help="length limit of each reflection")
    add_model_flags(generate, scorers=False)
    add_aggregation_flags(generate)
    generate.set_defaults(func=cmd_generate)

    evaluate_cmd = commands.add_parser("evaluate", help="Tables 1 and 2 on the inference split")
    add_model_flags(evaluate_cmd)
    add_data_flags(evaluate_cmd)
    evaluate_cmd.add_argument("--runs", default="runs", help="folder of training runs, relative to the current directory")
    evaluate_cmd.add_argument("--search", default="search.json",
                              help="grid search result with the weights, relative to the current directory")
    evaluate_cmd.add_argument("--batch-size", type=positive, default=16, help="prompts decoded at once")
    evaluate_cmd.add_argument("--greedy", action="store_true",
                              help="decode every method greedily, one run (default: the authors' protocol, "
                                   "single-policy methods sampled top-50, EMORL greedy)")
    evaluate_cmd.add_argument("--generation-runs", type=positive, default=3,
                              help="sampled generation runs per trained model (seeds SEED, SEED+1, ...)")
    add_force_flag(evaluate_cmd)
    evaluate_cmd.add_argument("--out", default="evaluate", help="writes OUT.md and OUT.csv, relative to the current directory")
    evaluate_cmd.add_argument("--hoe", default="hoe", help="HoE folder (`hoe build`): evaluated greedily when it exists")
    evaluate_cmd.add_argument("--preference", action="append", help="HoE's preference, e.g. 0.6,0.2,0.2 (repeatable; "
                              "'e5': App. E.5's 13 points; default: uniform); writes OUT-hoe.json")
    evaluate_cmd.set_defaults(func=cmd_evaluate)

    def add_orchestration_flags(sub, out):
        add_model_flags(sub)
        add_data_flags(sub)
        add_training_flags(sub)
        sub.add_argument("--seeds", metavar="S,S,...", help="training seeds (default: --seed alone)")
        sub.add_argument("--out", default=out, help="output folder (resumable), relative to the current directory")
        sub.add_argument("--decode-batch-size", type=positive, default=16, help="prompts decoded at once")
        sub.add_argument("--jobs", type=positive, default=1, help="stage 1: train the (seed, method) runs in N processes, "
                         "as train all --jobs (the same adapters as --jobs 1)")

    reproduce = commands.add_parser("reproduce", help="the paper's Tables 1-3, Figures 3 and 5 and claims, per seed "
                                                      "(compare.py)")
    add_orchestration_flags(reproduce, "reproduce")
    reproduce.add_argument("--iterations", type=positive, default=5, help="refinement iterations of Algorithm 1")
    reproduce.add_argument("--generation-runs", type=positive, default=3, help="sampled runs per single-policy method "
                           "(the authors' protocol)")
    reproduce.set_defaults(func=cmd_reproduce_or_compare)

    compare_cmd = commands.add_parser("compare", help="every method over a preference grid: fronts, hypervolume, "
                                                      "costs (compare.py)")
    add_orchestration_flags(compare_cmd, "compare")
    compare_cmd.add_argument("--preferences", metavar="FILE", help="one preference per line, d comma-separated weights "
                             "summing to 1 (default: HoE's grid: 11 points for d = 2, 13 for 3, step 1/4 beyond)")
    compare_cmd.add_argument("--methods", default="hidden-search,logit-search,hidden,logit,soups,single,hoe",
                             help="methods of compare.METHODS; iterative (IterativeRS) only when asked: it trains")
    compare_cmd.add_argument("--iterations", type=positive, default=3, help="Algorithm 1's iterations per preference")
    compare_cmd.add_argument("--decoding", choices=["greedy", "sample"], default="greedy",
                             help="one protocol for every method: greedy (HoE's), or top-50 sampling (seeded)")
    compare_cmd.add_argument("--single-policy-budget", type=integer(0), default=1,
                             help="single-policy (and iterative) runs per seed, at the preferences nearest the centre")
    compare_cmd.add_argument("--hoe-rescales", default="1", help="hoe: the experts' rescale candidates (hoe build "
                             "--rescales; 1: no choice to decode for, keeps compare cheap)")
    compare_cmd.add_argument("--hoe-steps", type=positive, default=64, help="hoe: SCST steps of its router (hoe train --steps)")
    compare_cmd.add_argument("--merge-every", type=positive, default=40, help="iterative: m, steps between merges")
    compare_cmd.add_argument("--iterative-steps", type=positive, default=160, help="iterative: T, steps of each run")
    compare_cmd.set_defaults(func=cmd_reproduce_or_compare)

    convert = commands.add_parser("convert", help="turn a .pt/.bin scorer checkpoint into safetensors, or the authors' "
                                                  "LoRA .npz into a PEFT-layout adapter")
    convert.add_argument("src", help="the .pt / .bin checkpoint (e.g. DynaOpt's reflection scorer), or an adapter .npz "
                                     "saved by the authors' save_lora (e.g. lora_reflection_18219.npz)")
    convert.add_argument("dst", help="output folder (or a .safetensors path); for an .npz the adapter folder, "
                                     "e.g. runs/reflection-authors/adapter")
    convert.add_argument("--base", help=".pt: a roberta-base folder whose config.json, vocab.json, merges.txt are copied "
                                        "beside it; .npz: base_model_name_or_path written in adapter_config.json")
    convert.set_defaults(func=cmd_convert)

    hoe_cmd = commands.add_parser("hoe", help="HoE (Li et al. 2025): build its LoRA experts, train a router expert (hoe.py)")
    hoe_cmd.add_argument("action", choices=["build", "train"], help="build: task-SVD experts from the newest objective runs "
                         "(or --adapters); train: the router expert at --preference")
    add_model_flags(hoe_cmd)
    add_data_flags(hoe_cmd)
    add_aggregation_flags(hoe_cmd)
    hoe_cmd.add_argument("--out", default="hoe", help="HoE folder (hoe.json, experts/, routers/), relative to the current directory")
    hoe_cmd.add_argument("--batch-size", type=positive, default=16, help="prompts per step / decoded at once")
    hoe_cmd.add_argument("--rank", type=positive, default=8, help="build: rank r' of every expert (task-SVD's top r')")
    hoe_cmd.add_argument("--prune", type=number(0.0, 1.0), default=0.4, help="build: fraction of smallest |τ| zeroed, model-wide")
    hoe_cmd.add_argument("--rescales", default="0.5,1,1.5,2", help="build: rescale candidates, chosen on the aggregation split")
    hoe_cmd.add_argument("--merged", action="append", metavar="λ", help="build: a multi-objective expert at this preference "
                         "(repeatable; default: uniform; 'none': no merged expert)")
    hoe_cmd.add_argument("--preference", help="train: the router's preference (default: App. D.2's 0.25,0.25,0.5 for 3 "
                         "objectives, else uniform)")
    hoe_cmd.add_argument("--steps", type=positive, default=64, help="train: SCST steps of the router")
    hoe_cmd.add_argument("--samples-per-prompt", type=integer(2), default=3, help="train: k samples per prompt")
    hoe_cmd.add_argument("--max-new-tokens", type=positive, default=64, help="train: length limit of each sample")
    hoe_cmd.add_argument("--lr", type=number(0.0, low_open=True), default=1e-2, help="train: AdamW learning rate of the router")
    hoe_cmd.add_argument("--beta", type=number(0.0), default=0.05, help="train: KL coefficient (to the base policy)")
    hoe_cmd.add_argument("--grad-clip", type=number(0.0, low_open=True), default=2.0, help="train: gradient norm clipping")
    hoe_cmd.add_argument("--alpha", type=number(0.0), default=0.1, help="train: step of the STCH weight update (Eq. 18)")
    hoe_cmd.add_argument("--ideal", help="train: reference point z*, one number per objective (default: 1 each)")
    hoe_cmd.add_argument("--top-k", type=integer(0), default=50, help="train: sample among the K most likely tokens")
    hoe_cmd.add_argument("--save-every", type=positive, default=8, help="train: checkpoint every N steps")
    hoe_cmd.add_argument("--neighbours", type=positive, default=None, help="train: LoRA experts the router votes over "
                         "(default: one per objective)")
    hoe_cmd.set_defaults(func=cmd_hoe)

    build = commands.add_parser("build-default", help="rebuild the embedded small models (data/build_default.py)")
    build.add_argument("--out", help=f"output folder (default: {DEFAULT_ASSETS}, the committed models, which needs --force)")
    build.add_argument("--force", action="store_true", help="replace the committed models in data/default/")
    build.add_argument("--seed", type=seed, default=0, help="random seed (same seed, same files)")
    build.add_argument("--scale", type=number(0.0, low_open=True), default=1.0,
                       help="fraction of the training budget (tests use less)")
    build.set_defaults(func=cmd_build_default)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from files import InputError
    try:
        args.func(args)
    except (InputError, FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError) as e:
        print(f"error: {str(e).splitlines()[0] if str(e) else type(e).__name__}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: rerun the same command to resume", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
