"""The paper's comparisons in one command (`reproduce`) and the multi-objective benchmark over a
preference grid (`compare`).

Why a module of its own: neither command has maths of its own. They run the other modules over seeds
and preferences (scst.py trains, search.py runs Algorithm 1, evaluate.py decodes and scores), keep
every stage's output on disk so that a killed run resumes, and own what spans many runs: mean ± std
over seeds, the claims report, Figure 3, the fronts, hypervolume, coverage, the objective correlations.
That belongs neither to one method's module nor to the thin command line.

`reproduce` (issue 21 §2), per seed: the objectives' adapters, Uniform and DynaOpt (scst.py, §4/§5.2),
Algorithm 1 at the plain mean (§4.2), then
  Table 2    base, every adapter, Uniform, DynaOpt, Model Soups (= the parameter level, App. 11.1), EMORL
             logit (App. 11.2) and hidden (Eq. 2): mean ± std over seeds × generation runs, under two
             protocols: the authors' (single-policy rows sampled top-50 three times, EMORL greedy;
             el_test.py) and like-for-like (every row greedy);
  Tables 1/3 data points and seconds to convergence per run, EMORL by Eq. (3) (max_i run + the
             search's decodes); a run that stopped at --max-steps is NOT converged and not averaged;
  Figure 3   validation reward vs data points, one curve per method, seeds shaded (figure3.svg);
  Figure 5   the search, as report.search_svg draws it (seed-<s>/search.svg);
  §6 claims  each verdict computed from the numbers measured here (`claims`), never written by hand.
`compare` (issue 24; MORL-P §2.2, methods-spec §4-§6): for each preference λ of a grid (HoE App. E.5:
11 points for d = 2, 13 for d = 3; a simplex of step 1/4 for d >= 4) or --preferences FILE, the
policy each method of METHODS gives for λ (EMORL, Rewarded Soups, single-policy runs; HoE and IterativeRS
through hoe.compare_point, iterative.compare_point), decoded one way for all (greedy, or --decoding sample) and
scored on the inference split: per-objective scores, the weighted score Σ λ_i s_i (MORL-P metric 1),
diversity-2, edit rate, data points, seconds; per method the hypervolume (reference 0 and the base
model's scores), front coverage (the share of its points non-dominated in the union of all methods'
points), mean ± std over seeds, and the measured cost of one more preference and one more objective.
Both commands write the objective relationships (MORL-P §2.2): Spearman's ρ of the per-sample scores of
every pair of objectives on the base model's and each objective adapter's greedy generations.

Outputs (the folder layout, every table) are described in docs/reproduce.md and docs/compare.md; every
file is written atomically, a stage whose file exists is skipped, and the runs resume. Stage 1 (every
scst run) runs in --jobs processes (emorl.train_jobs, as `train all --jobs`).

Deviations from the papers / public code:
- EMORL's data points in Table 1 count the search as evaluations × aggregation prompts beside the
  longest objective run (Eq. 3; the paper's 17,529 = 13,209 + 135 × 32 fits this, methods-spec §5.2).
- Model Soups is the parameter level at the searched weights (the paper's learned soup is not given).
- compare's searched EMORL rows decode each weight vector once for all λ (cache-<level>.json): a λ's
  search is Algorithm 1 exactly (search.hierarchical_grid_search), its cost is reported as what a search
  of its own would have cost (its evaluations' recorded seconds), not the cache's marginal cost.
- The single-policy runs at λ validate (and stop by the CV rule) on the plain mean of the scores, as
  Uniform does; their reward is Σ λ_i log clip(s_i) (scst.py, args.preference).
- HoE's one-time cost (build + router, hoe.consumption) counts the build's rescale decodes in seconds
  only, where the searched EMORL rows count their decodes as data points too.
"""
from __future__ import annotations

import copy
import itertools
import json
import math
import os
import statistics
import time
from typing import Callable, NamedTuple

import torch
from tqdm import tqdm

import evaluate
import files
import hoe
import iterative
import lora
import report
import rewards
import scst
import search
from evaluate import mean_std
from files import InputError
from report import LABELS, claims

PROTOCOLS = {"authors": False, "greedy": True}  # evaluate.evaluate's greedy flag


# ----------------------------------------------------------------------------- small pure helpers
def stage(path, compute):
    """A finished stage's output read back, or compute() written atomically to `path` (the resume unit)."""
    if os.path.exists(path):
        return files.read_json(path)
    result = compute()
    files.write_json(path, result)
    return result


def check_settings(path, settings):
    """The settings that decide an output folder's numbers; a rerun with others is refused (one line)."""
    settings = json.loads(json.dumps(settings))  # as read back: tuples become lists
    difference = search.header_difference(stage(path, lambda: settings), settings)
    if difference:
        raise InputError(f"{path}: this folder was made with other settings: {difference}; "
                         "use the same flags or another --out")


def simplex(d, steps) -> list[tuple]:
    """Every λ with entries in {0, 1/steps, ..., 1} summing to 1, lexicographic."""
    return [tuple(k / steps for k in c) for c in itertools.product(range(steps + 1), repeat=d) if sum(c) == steps]


def preference_grid(d) -> list[tuple]:
    """HoE App. E.5: 11 points for two objectives, its 13 for three; a simplex of step 1/4 beyond (35 for 4)."""
    if d == 2:
        return [(k / 10, 1 - k / 10) for k in range(11)]
    return [tuple(map(float, p)) for p in hoe.E5_PREFERENCES] if d == 3 else simplex(d, 4)


def check_preferences(rows, d, source) -> list[tuple]:
    """One-line errors for an empty list, a wrong count, a negative / non-finite entry, a sum off 1 by > 1e-6."""
    if not rows:
        raise InputError(f"{source}: no preference (expected one line of {d} weights per preference)")
    out = []
    for i, row in enumerate(rows, 1):
        values = [float(v) for v in row]
        if len(values) != d:
            raise InputError(f"{source}: preference {i} has {len(values)} weights, expected {d} (one per objective)")
        if not all(math.isfinite(v) for v in values):
            raise InputError(f"{source}: preference {i} has a weight that is not a finite number: {row}")
        if min(values) < 0:
            raise InputError(f"{source}: preference {i} has a negative weight: {row}")
        if abs(sum(values) - 1.0) > 1e-6:
            raise InputError(f"{source}: preference {i} sums to {sum(values):.9g}, not 1 (within 1e-6): {row}")
        out.append(tuple(values))
    return out


def read_preferences(path, d) -> list[tuple]:
    """A preferences file: one preference per line, d comma-separated weights (# starts a comment)."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = [line.split("#")[0].strip() for line in f]
    except UnicodeDecodeError:
        raise InputError(f"{path}: not a text file of comma-separated weights") from None
    rows = []
    for number, line in enumerate(lines, 1):
        if line:
            try:
                rows.append([float(v) for v in line.split(",")])
            except ValueError:
                raise InputError(f"{path}: line {number} is not comma-separated numbers: {line!r}") from None
    return check_preferences(rows, d, path)


def single_policy_indices(preferences, budget) -> list[int]:
    """The λ the single-policy baseline trains under --single-policy-budget: nearest the centre first."""
    d = len(preferences[0])
    distance = [sum((x - 1 / d) ** 2 for x in p) for p in preferences]
    return sorted(sorted(range(len(preferences)), key=lambda i: (round(distance[i], 12), i))[:budget])


# ----------------------------------------------------------------------------- shared stages
def setup(args):
    """Before any work: args.names (the objectives, d >= 2), args.seeds (--seeds, or --seed alone), a writable
    --out. Returns the known scorers."""
    import emorl
    known = emorl.known_scorers(args)
    args.names = emorl.parse_objectives(args.objectives, known)
    if len(args.names) < 2:
        raise InputError(f"{args.command} --objectives {args.objectives}: give at least 2 objectives")
    try:
        args.seeds = [emorl.seed(s.strip()) for s in args.seeds.split(",")] if args.seeds else [args.seed]
    except Exception as e:  # argparse.ArgumentTypeError
        raise InputError(f"--seeds {args.seeds}: {e}") from None
    if len(set(args.seeds)) != len(args.seeds):
        raise InputError(f"--seeds {args.seeds}: a seed is listed twice")
    emorl.prepare_output(args.out, f"--out {args.out}", ["reproduce.md", "reproduce.json", "figure3.svg", "compare.md",
                                                         "compare.json", "fronts.svg", *(f"table2-{p}.csv" for p in PROTOCOLS)])
    torch.manual_seed(args.seeds[0])
    return known


def seed_args(args, seed):
    """The namespace emorl's train / search read, for one seed's folder."""
    a = copy.copy(args)
    a.seed, a.objectives = seed, list(args.names)
    a.runs = os.path.join(args.out, f"seed-{seed}", "runs")
    return a


def train_stage(args, known, methods):
    """Every (seed, method) scst run, in --jobs processes (emorl.train_jobs); finished runs are skipped, others resume."""
    import emorl
    plan = [(seed_args(args, seed), [(method, args.device)], known) for seed in args.seeds for method in methods]
    for a, [(method, _)], _ in plan:
        emorl.prepare_output(os.path.join(a.runs, f"{method}-{a.seed}", "adapter"), f"--out {args.out}")
    emorl.train_jobs(plan, args.jobs, desc="stage 1: train")


def summaries(args, seed, methods) -> dict:
    runs = seed_args(args, seed).runs
    return {m: files.read_json(os.path.join(runs, f"{m}-{seed}", "summary.json")) for m in methods}


def correlation_stage(args, seed, model, tokenizer, scorers, prompts) -> dict:
    """Spearman's ρ of per-sample scores for every pair of objectives, on the greedy generations of the
    base model and of each objective adapter (loaded in `model`) over the inference split."""
    def compute():
        out = {}
        for source in ["base", *args.names]:
            texts = evaluate.generate_texts(model, tokenizer, prompts, args.decode_batch_size, args.device,
                                            adapter=None if source == "base" else source, max_new_tokens=args.max_new_tokens)
            scores = {n: s.float().tolist() for n, s in rewards.score_all(scorers, prompts, texts).items()}
            out[source] = {f"{a}/{b}": report.spearman(scores[a], scores[b]) for a, b in itertools.combinations(args.names, 2)}
        return {"prompts": len(prompts), "decoding": "greedy", "spearman": out}
    return stage(os.path.join(args.out, f"seed-{seed}", "correlations.json"), compute)


def correlation_table(per_seed: list[dict], names) -> str:
    """Mean ± std over seeds of each ρ; a seed whose scores were constant (ρ undefined) is left out, and said."""
    pairs = [f"{a}/{b}" for a, b in itertools.combinations(names, 2)]
    lines = ["| generations of | " + " | ".join(f"ρ {p}" for p in pairs) + " |", "|---|" + "---|" * len(pairs)]
    for source in ["base", *names]:
        cells = []
        for pair in pairs:
            values = [c["spearman"][source][pair] for c in per_seed if c["spearman"][source][pair] is not None]
            partial = f" ({len(values)} of {len(per_seed)} seeds; constant scores in the others)" \
                if 0 < len(values) < len(per_seed) else ""
            cells.append(mean_std(values) + partial if values else "— (constant scores)")
        lines.append(f"| {source} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def load_world(args, known, seed):
    """(model with the seed's objective adapters loaded, tokenizer, scorers, splits)."""
    import emorl
    a = seed_args(args, seed)
    splits = emorl.load_splits(a)
    scorers = emorl.load_scorers(a, args.names, known)
    model, tokenizer = emorl.load_policy(a)
    emorl.load_adapters(model, [os.path.join(a.runs, f"{n}-{seed}", "adapter") for n in args.names], args.names)
    return model, tokenizer, scorers, splits


# ----------------------------------------------------------------------------- reproduce
def reproduce(args):
    """`python emorl.py reproduce`: every stage for every seed, then the report (module docstring)."""
    import emorl
    known = setup(args)
    names, methods = args.names, [*args.names, "uniform", "dynaopt"]
    check_settings(os.path.join(args.out, "reproduce-settings.json"), reproduce_settings(args))
    train_stage(args, known, methods)
    for seed in tqdm(args.seeds, desc="stage 2: search", unit="seed"):
        out = os.path.join(args.out, f"seed-{seed}", "search.json")
        if "best_weights" not in (files.read_json(out) if os.path.exists(out) else {}):  # run_search resumes its log
            model, tokenizer, scorers, splits = load_world(args, known, seed)
            objective = search.make_objective(model, tokenizer, names, scorers, [e.prompt for e in splits["aggregation"]],
                                              batch_size=args.decode_batch_size, max_new_tokens=args.max_new_tokens,
                                              device=args.device)
            meta = {"prompts": len(splits["aggregation"]), "max_new_tokens": args.max_new_tokens}
            search.run_search(objective, names, out, args.iterations, os.path.splitext(out)[0] + ".svg", meta=meta)
    for seed in tqdm(args.seeds, desc="stage 3: evaluate", unit="seed"):
        a = seed_args(args, seed)
        model, tokenizer, scorers, splits = load_world(args, known, seed)
        prompts = [e.prompt for e in splits["inference"]]
        search_result = files.read_json(os.path.join(args.out, f"seed-{seed}", "search.json"))
        for protocol, greedy in PROTOCOLS.items():
            stage(os.path.join(args.out, f"seed-{seed}", f"evaluate-{protocol}.json"), lambda: evaluate.evaluate(
                lambda: emorl.load_policy(a), scorers, prompts, a.runs, search_result, batch_size=args.decode_batch_size,
                device=args.device, objectives=names, greedy=greedy, generation_runs=args.generation_runs,
                seed=seed * args.generation_runs, max_new_tokens=args.max_new_tokens))  # disjoint generator seeds
        correlation_stage(args, seed, model, tokenizer, scorers, prompts)
    write_reproduce_report(args, methods)


def reproduce_settings(args) -> dict:
    keys = ("names", "max_steps", "batch_size", "samples_per_prompt", "max_new_tokens", "lr", "beta", "val_every",
            "cv_window", "cv_tolerance", "combine", "gamma", "top_k", "iterations", "generation_runs", "sample",
            "split_seed")
    return {"command": "reproduce", **{k: getattr(args, k) for k in keys}, "data": search.fingerprint(args.data),
            "policy": search.fingerprint(args.policy)}


def consumption(args, methods) -> dict:
    """{method: [per seed: {data points, seconds, converged}]}; EMORL by Eq. (3) from its runs and search."""
    out = {}
    for seed in args.seeds:
        runs = summaries(args, seed, methods)
        for m in methods:
            s = runs[m]
            out.setdefault(m, []).append({"data points": s["data_points"], "seconds": s["wall_seconds"],
                                          "converged": s["converged"], "steps": s["steps"]})
        result = files.read_json(os.path.join(args.out, f"seed-{seed}", "search.json"))
        evaluations = result["evaluations"]
        prompts = result.get("meta", {}).get("prompts", 0)
        longest = max((runs[n] for n in args.names), key=lambda s: s["wall_seconds"])
        out.setdefault("EMORL (Eq. 3)", []).append({
            "data points": max(runs[n]["data_points"] for n in args.names) + len(evaluations) * prompts,
            "seconds": longest["wall_seconds"] + sum(r["seconds"] for r in evaluations),
            "converged": all(runs[n]["converged"] for n in args.names),
            "weights": result["best_weights"]})
    return out


def table2(args, protocol) -> dict[str, list[dict]]:
    """{label: rows} over every seed's evaluate-<protocol>.json (seeds × generation runs per method)."""
    merged = {}
    for seed in args.seeds:
        for method, rows in files.read_json(os.path.join(args.out, f"seed-{seed}", f"evaluate-{protocol}.json")).items():
            if method != "base" or seed == args.seeds[0] or not PROTOCOLS[protocol]:  # greedy base: one run, not seeds
                merged.setdefault(LABELS.get(method, f"{method} adapter"), []).extend(rows)
    return merged


def consumption_table(cost: dict, max_steps: int) -> str:
    lines = ["| method | converged (CV rule) | data points | seconds | steps |", "|---|---|---|---|---|"]
    for method, runs in cost.items():
        done = [r for r in runs if r["converged"]]
        note = "" if len(done) == len(runs) else f" — {len(runs) - len(done)} NOT converged (stopped at --max-steps {max_steps})"
        if done:
            cells = [mean_std([r["data points"] for r in done], True), mean_std([r["seconds"] for r in done])]
        else:
            cells = ["— (no converged run)", "—"]
        steps = mean_std([r["steps"] for r in runs], True) if "steps" in runs[0] else "—"
        lines.append(f"| {LABELS.get(method, method)} | {len(done)}/{len(runs)}{note} | " + " | ".join(cells) + f" | {steps} |")
    return "\n".join(lines) + "\n"


def validation_curves(args, methods) -> dict:
    """{label: {seed: [(data points, validation reward)]}} from every run's train.jsonl (Figure 3)."""
    curves = {}
    for seed in args.seeds:
        for m in methods:
            path = os.path.join(seed_args(args, seed).runs, f"{m}-{seed}", "train.jsonl")
            with open(path, encoding="utf-8") as f:
                records = [json.loads(line) for line in f if line.strip()]
            curves.setdefault(LABELS.get(m, m), {})[seed] = [(r["data_points"], r["reward"]) for r in records
                                                             if r.get("type") == "validation"]
    return curves


def write_reproduce_report(args, methods):
    t2 = {protocol: table2(args, protocol) for protocol in PROTOCOLS}
    cost = consumption(args, methods)
    correlations = [files.read_json(os.path.join(args.out, f"seed-{s}", "correlations.json")) for s in args.seeds]
    verdicts = claims(t2, cost, args.names)
    files.atomic_write(os.path.join(args.out, "figure3.svg"), report.curves_svg(validation_curves(args, methods)))
    md = [f"# reproduce: {len(args.seeds)} seed(s) {', '.join(map(str, args.seeds))}, objectives {', '.join(args.names)}\n",
          "## Claims of the paper beside this run (verdicts computed from the numbers below)\n",
          "| claim | paper | measured | verdict |", "|---|---|---|---|",
          *[f"| {c} | {p} | {m} | **{v}** |" for c, p, m, v in verdicts]]
    for protocol, rows in t2.items():
        markdown, table_csv = evaluate.tables(rows, args.names)
        files.atomic_write(os.path.join(args.out, f"table2-{protocol}.csv"), table_csv)
        what = ("the authors' protocol: single-policy rows sampled top-50, " f"{args.generation_runs} runs; EMORL "
                "hidden and logit greedy" if protocol == "authors" else "like-for-like: every row greedy, one run")
        md += [f"\n## Table 2 (and Table 1's diversity-2, edit rate), {what}\n",
               "mean ± std over seeds × generation runs on the inference split; data points and seconds as in Table 1.\n",
               markdown]
    md += ["\n## Tables 1 and 3: data points and seconds to convergence (mean ± std over converged seeds)\n",
           consumption_table(cost, args.max_steps),
           "\n## Objective relationships: Spearman ρ of per-sample scores (greedy generations, mean ± std over seeds)\n",
           correlation_table(correlations, args.names),
           "\nFigures: [figure3.svg](figure3.svg) (Figure 3); Figure 5 per seed: " +
           ", ".join(f"[seed-{s}/search.svg](seed-{s}/search.svg)" for s in args.seeds) + "\n"]
    files.atomic_write(os.path.join(args.out, "reproduce.md"), "\n".join(md))
    files.write_json(os.path.join(args.out, "reproduce.json"), {
        "seeds": args.seeds, "objectives": args.names, "claims": [dict(zip(("claim", "paper", "measured", "verdict"), c))
                                                                   for c in verdicts],
        "table2": t2, "consumption": cost, "correlations": correlations})
    print("\n".join(md[:4 + len(verdicts)]) + f"\n({args.out}/reproduce.md)")


# ----------------------------------------------------------------------------- compare: the methods
class World(NamedTuple):
    """What every method's point function gets for one seed."""
    args: object
    seed: int
    model: object          # the base T5 with the seed's objective adapters loaded, named by objective
    tokenizer: object
    scorers: dict
    splits: dict
    folder: str            # OUT/seed-<s>/compare


def measure(world, preference, adapter=None, aggregate=None, decode=None) -> dict:
    """Decode the inference split once (greedy, or top-50 sampled with generator seed = the seed) and
    score it: per-objective scores, the weighted score Σ λ_i s_i, diversity-2, edit rate, seconds.
    decode(prompts, generator) -> texts, when given, decodes instead of the adapter / aggregate (HoE's routing)."""
    args, prompts = world.args, [e.prompt for e in world.splits["inference"]]
    generator = torch.Generator(device=args.device).manual_seed(world.seed) if args.decoding == "sample" else None
    start = time.perf_counter()
    texts = (decode or (lambda prompts, generator: evaluate.generate_texts(
        world.model, world.tokenizer, prompts, args.decode_batch_size, args.device, adapter=adapter, aggregate=aggregate,
        generator=generator, max_new_tokens=args.max_new_tokens)))(prompts, generator)
    seconds = time.perf_counter() - start
    row = evaluate.metrics(world.scorers, prompts, texts, args.names)
    scores = [row[n] for n in args.names]
    return {"scores": scores, "weighted": None if preference is None else search.scalarise(scores, preference),
            "diversity-2": row["diversity-2"], "edit rate": row["edit rate"], "decode seconds": round(seconds, 3)}


def cached_scores(world, level) -> Callable:
    """weights -> {"scores", "seconds"} on the aggregation split, each weight ray decoded once for every λ
    (cache-<level>.json, rewritten atomically after each decode: a killed run loses nothing)."""
    path = os.path.join(world.folder, f"cache-{level}.json")
    cache = files.read_json(path) if os.path.exists(path) else {}
    prompts = [e.prompt for e in world.splits["aggregation"]]
    objective = search.make_objective(world.model, world.tokenizer, world.args.names, world.scorers, prompts, level=level,
                                      batch_size=world.args.decode_batch_size, max_new_tokens=world.args.max_new_tokens,
                                      device=world.args.device)

    def scores(weights):
        key = ",".join(str(x) for x in search.memo_key(weights, objective.ray_invariant))
        if key not in cache:
            start = time.perf_counter()
            cache[key] = {"scores": objective(weights)[1], "seconds": round(time.perf_counter() - start, 3)}
            files.write_json(path, cache)
        return cache[key]
    return scores


def emorl_searched(level):
    """EMORL at `level` with the weights Algorithm 1 finds for Σ λ_i s_i (search.scalarise)."""
    def point(world, index, preference):
        scores_of, used = cached_scores(world, level), []

        def objective(weights):  # called once per distinct ray: Algorithm 1 memoises
            record = scores_of(weights)
            used.append(record)
            return search.scalarise(record["scores"], preference), record["scores"]
        objective.ray_invariant = True
        found = search.hierarchical_grid_search(objective, len(preference), world.args.iterations)
        row = measure(world, preference, aggregate=(world.args.names, found["best_weights"], level))
        prompts = len(world.splits["aggregation"])
        return {**row, "weights": found["best_weights"], "evaluations": len(used), "data points": len(used) * prompts,
                "seconds": round(sum(r["seconds"] for r in used) + row["decode seconds"], 3)}
    return point


def weights_are_preference(level):
    """EMORL (hidden, logit) or Rewarded Soups (param) with the weights w = λ: no search, no training."""
    def point(world, index, preference):
        row = measure(world, preference, aggregate=(world.args.names, list(preference), level))
        return {**row, "weights": list(preference), "data points": 0, "seconds": row["decode seconds"]}
    return point


def budgeted_run(world, index, name, train, **settings):
    """(folder, summary) of a run at λ where --single-policy-budget picks λ (else None): train(model, tokenizer, scorers,
    train split, validation prompts, the seed's args + `settings`, OUT/seed-<s>/compare/runs/<name>-<s>/), resumable."""
    import emorl
    args = world.args
    if index not in single_policy_indices(args.preferences, args.single_policy_budget):
        return None
    run_args = seed_args(args, world.seed)
    vars(run_args).update(settings)
    run_dir = os.path.join(world.folder, "runs", f"{name}-{world.seed}")
    if not os.path.exists(os.path.join(run_dir, "summary.json")):
        model, tokenizer = emorl.load_policy(run_args)
        scorers = emorl.load_scorers(run_args, list(dict.fromkeys([*emorl.SCORER_NAMES, *args.names])), args.known)
        validation = [e.prompt for e in world.splits["aggregation"][: args.val_prompts]]
        train(model, tokenizer, scorers, world.splits["train"], validation, run_args, run_dir)
    return run_dir, files.read_json(os.path.join(run_dir, "summary.json"))


def single_policy(world, index, preference):
    """A Uniform-style run with the reward Σ λ_i log clip(s_i) (scst.py), only at the λ the budget picks."""
    name = f"pref{index}"
    if (run := budgeted_run(world, index, name, scst.train, objective="uniform", preference=list(preference))) is None:
        return None
    run_dir, summary = run
    if name not in lora.adapter_names(world.model):
        lora.load_adapter(world.model, os.path.join(run_dir, "adapter"), name)
    row = measure(world, preference, adapter=name)
    return {**row, "data points": summary["data_points"], "seconds": round(summary["wall_seconds"] + row["decode seconds"], 3),
            "converged": summary["converged"]}


class Method(NamedTuple):
    label: str
    taxonomy: str          # MORL-P §2.1 / methods-spec §4.3
    new_preference: str    # what one more λ costs
    point: Callable        # (world, λ index, λ) -> row, or None where the method is not run at that λ


METHODS = {
    "hidden-search": Method("EMORL hidden, searched", "meta-policy (hidden-state aggregation)",
                            "a search on the aggregation split + a decode", emorl_searched("hidden")),
    "logit-search": Method("EMORL logit, searched", "meta-policy (logit aggregation)",
                           "a search on the aggregation split + a decode", emorl_searched("logit")),
    "hidden": Method("EMORL hidden, w = λ", "meta-policy (hidden-state aggregation)", "a decode",
                     weights_are_preference("hidden")),
    "logit": Method("EMORL logit, w = λ", "meta-policy (logit aggregation, MOD-like)", "a decode",
                    weights_are_preference("logit")),
    "soups": Method("Rewarded Soups (param, w = λ)", "meta-policy (parameter aggregation)", "a merge + a decode",
                    weights_are_preference("param")),
    "single": Method("single-policy, reward Σ λ_i log s_i", "single-policy (fixed weights)", "a training run",
                     single_policy),
    "hoe": Method("HoE (routed LoRA experts)", "meta-policy (learned routing over LoRA experts)",
                  "a decode (preference routing)", hoe.compare_point),
    "iterative": Method("IterativeRS, w = λ", "single-policy by preference (one soup per w), bi-level in training",
                        "a training run (T/m rounds)", iterative.compare_point),
}


# ----------------------------------------------------------------------------- compare: the command
def compare(args):
    """`python emorl.py compare`: the objective adapters, then every method × λ × seed, then the report."""
    args.known = known = setup(args)
    args.preferences = read_preferences(args.preferences, len(args.names)) if args.preferences else preference_grid(len(args.names))
    args.methods = [m.strip() for m in args.methods.split(",")]
    if unknown := [m for m in args.methods if m not in METHODS]:
        raise InputError(f"--methods: unknown method {unknown[0]!r} (known: {', '.join(METHODS)})")
    if "hoe" in args.methods:                                   # the flags of hoe and iterative, before any work
        hoe.parse_numbers(args.hoe_rescales, "--hoe-rescales", positive=True)
    if "iterative" in args.methods:
        iterative.check_plan(args.names, None, args.merge_every, args.iterative_steps, None)
    check_settings(os.path.join(args.out, "compare-settings.json"), {
        "command": "compare", **{k: getattr(args, k) for k in ("names", "preferences", "methods", "iterations", "decoding",
                                                               "single_policy_budget", "max_steps", "sample", "split_seed",
                                                               "hoe_rescales", "hoe_steps", "merge_every", "iterative_steps")},
        "data": search.fingerprint(args.data), "policy": search.fingerprint(args.policy)})
    train_stage(args, known, args.names)
    rows, base, correlations, once = [], {}, [], {}
    for seed in args.seeds:
        model, tokenizer, scorers, splits = load_world(args, known, seed)
        world = World(args, seed, model, tokenizer, scorers, splits, os.path.join(args.out, f"seed-{seed}", "compare"))
        os.makedirs(world.folder, exist_ok=True)
        base[seed] = stage(os.path.join(world.folder, "base.json"), lambda: measure(world, None))
        correlations.append(correlation_stage(args, seed, model, tokenizer, scorers, [e.prompt for e in splits["inference"]]))
        for key in args.methods:
            path = os.path.join(world.folder, f"{key}.json")
            done = files.read_json(path) if os.path.exists(path) else {}
            for index, preference in enumerate(tqdm(args.preferences, desc=f"seed {seed}: {METHODS[key].label}", unit="λ")):
                if str(index) not in done:
                    done[str(index)] = METHODS[key].point(world, index, preference)
                    files.write_json(path, done)
                if done[str(index)] is not None:
                    rows.append({"method": key, "seed": seed, "index": index, "preference": list(preference), **done[str(index)]})
        if "hoe" in args.methods:       # the build and the router, once per seed (hoe.consumption, no objective run)
            once[seed] = hoe.consumption(hoe.load_hoe(model, os.path.join(args.out, f"seed-{seed}", "hoe")), [])
    summary = summarise(args, rows, base)
    out = {"objectives": args.names, "seeds": args.seeds, "decoding": args.decoding, "preferences": args.preferences,
           "methods": {k: {"label": METHODS[k].label, "taxonomy": METHODS[k].taxonomy,
                           "one more preference": METHODS[k].new_preference} for k in args.methods}, "base": base,
           "reference points": {"zero": [0.0] * len(args.names), "base": mean_vector([base[s]["scores"] for s in args.seeds])},
           "summary": summary, "costs": costs(args, rows, once), "hoe build and router": once, "correlations": correlations, "rows": rows}
    files.write_json(os.path.join(args.out, "compare.json"), out)
    fronts = {METHODS[k].label: [mean_vector([r["scores"] for r in rows if r["method"] == k and r["index"] == i])
                                 for i in range(len(args.preferences)) if any(r["method"] == k and r["index"] == i for r in rows)]
              for k in args.methods}
    files.atomic_write(os.path.join(args.out, "fronts.svg"), report.fronts_svg(fronts, args.names, out["reference points"]["base"]))
    markdown = compare_markdown(args, out)
    files.atomic_write(os.path.join(args.out, "compare.md"), markdown)
    print(markdown.split("\n## ")[1] if "\n## " in markdown else markdown)
    print(f"({args.out}/compare.md, compare.json, fronts.svg)")


def mean_vector(vectors) -> list[float]:
    return [statistics.fmean(v) for v in zip(*vectors)]


def summarise(args, rows, base) -> dict:
    """Per method, mean ± std over seeds of: hypervolume (reference 0 and the base model's scores), coverage
    (share of its points non-dominated among all methods' points of that seed), weighted score over λ."""
    per = {}
    for seed in args.seeds:
        mine = [r for r in rows if r["seed"] == seed]
        union = [r["scores"] for r in mine]
        front = {tuple(union[i]) for i in report.pareto_front(union)}
        for key in args.methods:
            points = [r["scores"] for r in mine if r["method"] == key]
            if not points:
                continue
            values = {"hypervolume (ref 0)": report.hypervolume(points, 0.0),
                      "hypervolume (ref base)": report.hypervolume(points, base[seed]["scores"]),
                      "coverage": sum(tuple(p) in front for p in points) / len(points),
                      "weighted score": statistics.fmean(r["weighted"] for r in mine if r["method"] == key),
                      "diversity-2": statistics.fmean(r["diversity-2"] for r in mine if r["method"] == key),
                      "edit rate": statistics.fmean(r["edit rate"] for r in mine if r["method"] == key)}
            for name, value in values.items():
                per.setdefault(key, {}).setdefault(name, []).append(value)
            per[key].setdefault("points", []).append(len(points))
    return {key: {name: {"mean": statistics.fmean(v), "std": statistics.pstdev(v), "values": v} for name, v in m.items()}
            for key, m in per.items()}


def costs(args, rows, once) -> dict:
    """Measured: one more λ (the mean data points and seconds of one of the method's points, over λ × seeds);
    one more objective (EMORL: one objective run, measured, + for searched rows a (d+1)-objective search
    estimated as its evaluation bound × the measured seconds per evaluation; HoE: one objective run + its build and
    router (`once`, per seed, measured at d); single-policy and IterativeRS: every trained λ again)."""
    d, out = len(args.names), {}
    runs = [s for seed in args.seeds for s in summaries(args, seed, args.names).values()]
    one_run = {"data points": statistics.fmean(s["data_points"] for s in runs), "seconds": statistics.fmean(s["wall_seconds"] for s in runs)}
    for key in args.methods:
        mine = [r for r in rows if r["method"] == key]
        if not mine:
            continue
        preference = {c: statistics.fmean(r[c] for r in mine) for c in ("data points", "seconds")}
        if key in ("single", "iterative"):
            per_seed = len(mine) / len(args.seeds)
            objective = {c: preference[c] * per_seed for c in preference} | {"how": f"{per_seed:g} run(s) at d + 1 retrained (measured per run at d)"}
        elif key.endswith("-search"):
            per_eval = sum(r["seconds"] - r["decode seconds"] for r in mine) / sum(r["evaluations"] for r in mine)
            bound = search.max_evaluations(d + 1, args.iterations)
            prompts = mine[0]["data points"] / mine[0]["evaluations"]   # the aggregation split
            objective = {"data points": one_run["data points"] + bound * prompts, "seconds": one_run["seconds"] + bound * per_eval,
                         "how": f"one objective run (measured) + a d + 1 search: <= {bound} evaluations x {per_eval:.2f} s (estimated)"}
        elif key == "hoe":
            objective = {c: one_run[c] + statistics.fmean(o[c] for o in once.values()) for c in one_run} | {"how": "one objective run + the experts' build + the router's training (measured at d)"}
        else:
            objective = dict(one_run) | {"how": "one objective run (measured); the weights are λ"}
        out[key] = {"one more preference": preference, "one more objective": objective}
    return out


def compare_markdown(args, out) -> str:
    names, summary = args.names, out["summary"]
    trained = single_policy_indices(args.preferences, args.single_policy_budget)
    lam = lambda p: "(" + ", ".join(f"{x:.3g}" for x in p) + ")"  # noqa: E731
    md = [f"# compare: objectives {', '.join(names)}; {len(args.preferences)} preferences; seeds "
          f"{', '.join(map(str, args.seeds))}; decoding {args.decoding} for every method\n",
          "## Per method (mean ± std over seeds)\n",
          "Hypervolume of the method's points (one per λ), reference 0 and reference = the base model's scores "
          f"{lam(out['reference points']['base'])}; coverage = share of its points non-dominated among all methods' points; "
          "weighted score = Σ λ_i s_i averaged over λ.\n",
          "| method | taxonomy | points | hypervolume (ref 0) | hypervolume (ref base) | coverage | weighted score | diversity-2 | edit rate |",
          "|---|---|---|---|---|---|---|---|---|"]
    for key, m in summary.items():
        cells = [mean_std(m[c]["values"]) for c in ("hypervolume (ref 0)", "hypervolume (ref base)", "coverage", "weighted score",
                                                    "diversity-2", "edit rate")]
        md.append(f"| {METHODS[key].label} | {METHODS[key].taxonomy} | {mean_std(m['points']['values'], True)} | " + " | ".join(cells) + " |")
    for key in [k for k in ("single", "iterative") if k in args.methods]:
        md.append(f"\n{METHODS[key].label} trained at λ = {', '.join(lam(args.preferences[i]) for i in trained) or 'none'} "
                  f"(--single-policy-budget {args.single_policy_budget}).")
    if "hoe" in args.methods:
        md.append(f"\nHoE: hoe build's experts (rescales {args.hoe_rescales}), one router at λ = "
                  f"{lam(hoe.default_router_preference(len(names)))}, {args.hoe_steps} steps.")
    md += ["\n## Weighted score Σ λ_i s_i per preference (mean ± std over seeds)\n",
           "| λ | " + " | ".join(METHODS[k].label for k in summary) + " |", "|---|" + "---|" * len(summary)]
    for i, p in enumerate(args.preferences):
        cells = [mean_std([r["weighted"] for r in out["rows"] if r["method"] == k and r["index"] == i]) for k in summary]
        md.append(f"| {lam(p)} | " + " | ".join(cells) + " |")
    md += ["\n## Cost of one more preference and of one more objective (measured unless marked)\n",
           "| method | one more preference: what | data points | seconds | one more objective | data points | seconds |",
           "|---|---|---|---|---|---|---|"]
    for key, c in out["costs"].items():
        p, o = c["one more preference"], c["one more objective"]
        md.append(f"| {METHODS[key].label} | {METHODS[key].new_preference} | {p['data points']:,.0f} | {p['seconds']:.1f} | "
                  f"{o['how']} | {o['data points']:,.0f} | {o['seconds']:.1f} |")
    md += ["\n## Objective relationships: Spearman ρ of per-sample scores (greedy, mean ± std over seeds)\n",
           correlation_table(out["correlations"], names), "\nFigure: [fronts.svg](fronts.svg) (every pair of objectives).\n"]
    return "\n".join(md)
