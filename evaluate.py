"""Evaluation on the inference split: the paper's Table 1 (diversity-2, edit rate, data and time
consumption) and Table 2 (a score per objective and their average), §5 and SPEC §7, with the test
protocol of the public code (el_test.py).

Methods, from one base T5 with the trained adapters loaded (≤ 64 new tokens each):
  base                   the policy with every adapter disabled (T5-base in the paper)
  <method>               every finished run runs/<method>-<seed>/ (summary.json present): one adapter
                         each (the objectives' adapters, uniform, dynaopt, or any other)
  iterative              runs/iterative-<seed>/: IterativeRS's soup W0 + Δ (iterative.load_soup), one policy
  param / logit / hidden the search's objective adapters (search.json's "objectives", any d) aggregated with the searched weights,
                         Appendix 11.1 / 11.2 / Eq. (2), for every seed that has all of them
Protocol (el_test.py:63-69, 111-176): the single-policy methods (base, every run, and the parameter
level, which is one merged model) are decoded by sampling, top-50 at temperature 1 (HF generate's
defaults that the public code uses), `generation_runs` = 3 times with generator seeds seed, seed+1,
seed+2 (the same for every method); EMORL's hidden level is greedy, one run (deterministic). The logit
level is greedy on the shared prefix too (this project's definition, search.py): one run. Rows are
mean ± std (population) over training seeds × generation runs; "±" only where there was more than one
value. `greedy=True` (`evaluate --greedy`) decodes every method greedily, one run each: the
deterministic comparison.

Consumption: a single-policy method reports its own run's data points and wall time. The aggregated
methods report Eq. (3): T_total = max_i T_train(obj_i) + T_agg (T_agg = the grid search's decoding
time from search.json), and data = max_i data_i (the trainings run in parallel). Once per training
seed, not per generation run. A run imported from the authors' .npz (`convert`) has no consumption.

Deviations from the paper / public code:
- el_test.py scores 4 passes over the first 4 batches of 16 of a RandomSampler over the test split
  (256 generations, batches drawn with replacement across passes, el_test.py:111-114), once per
  command (num_runs = 1 by default); here every inference prompt is decoded once per generation run.
- Every trained adapter is sampled as a single policy: this project's choice, the published el_test.py
  samples only a file it can torch.load (el_test.py:85), and the authors' adapters are .npz.
- Table 2's objective scores are clipped to [1e-4, 0.9999] as el_test.py's logsum scorer clips them;
  diversity-2 and edit rate are not (theirs are, by the same scorer: at most 1e-4 per generation).
- Parameter-level aggregation uses the searched weights, raw (the paper's Model Soups learns its own).
- The logit level is greedy on one shared prefix (the public code mixes the distributions of
  separately sampled continuations, el_aggregation.py:101-140; see search.py).
"""
from __future__ import annotations

import csv
import io
import math
import os
import statistics
import sys

import torch
from tqdm import tqdm

import data
import iterative
import lora
import rewards
import search
import files
import t5
from files import InputError

LEVELS = ("param", "logit", "hidden")
SOUPS = ("iterative",)  # runs whose output is a parameter-level soup (iterative.load_soup), not an adapter
GREEDY_METHODS = ("logit", "hidden")  # decoded greedily in the authors' protocol too
TOP_K = 50  # HF generate's default, used by the public code's sampling
INTEGER_COLUMNS = ("data points", "seconds")


def columns(objectives=rewards.OBJECTIVES) -> list[str]:
    return [*objectives, "average", "diversity-2", "edit rate", *INTEGER_COLUMNS]


def seed_order(seed):
    """Integer seeds first, in order, then labels."""
    return (0, seed, "") if isinstance(seed, int) else (1, 0, str(seed))


def check_search(result, objectives=rewards.OBJECTIVES, source="search result") -> list[float]:
    """The searched weights of a search.json, after checking its structure (one-line InputErrors)."""
    if not isinstance(result, dict):
        raise InputError(f"{source}: expected a JSON object (a search result), got {type(result).__name__}")
    if "best_weights" not in result:
        raise InputError(f"{source}: no best_weights (an unfinished search? rerun `python emorl.py search`)")
    weights = result["best_weights"]
    if not isinstance(weights, list) or not all(isinstance(w, (int, float)) and not isinstance(w, bool) for w in weights):
        raise InputError(f"{source}: best_weights must be a list of numbers, got {weights!r}")
    if isinstance(result.get("objectives"), list) and result["objectives"] != list(objectives):
        raise InputError(f"{source}: searched objectives {result['objectives']} differ from the evaluated {list(objectives)}")
    weights = search.check_weights(weights, len(objectives), what=f"{source}: best_weights")
    evaluations = result.get("evaluations", [])
    if not isinstance(evaluations, list) or not all(
            isinstance(r, dict) and isinstance(r.get("seconds", 0), (int, float)) for r in evaluations):
        raise InputError(f"{source}: evaluations must be a list of records with numeric seconds")
    return weights


def searched_objectives(result, objectives) -> list[str]:
    """The objectives a search.json combined (its "objectives"), else the evaluated ones."""
    named = result.get("objectives") if isinstance(result, dict) else None
    if isinstance(named, list) and named and all(isinstance(n, str) for n in named):
        return list(named)
    return list(objectives)


def sampling(generator) -> dict:
    """generate's decoding flags: greedy (generator None), or top-50 sampling at temperature 1 with `generator`."""
    return dict(do_sample=generator is not None, top_k=TOP_K if generator is not None else 0, generator=generator)


@torch.no_grad()
def generate_texts(model, tokenizer, prompts, batch_size, device, adapter=None, aggregate=None, generator=None,
                   max_new_tokens=64) -> list[str]:
    """Generations for `prompts`: one adapter (None = base model), or aggregate=(names, weights, level).
    Greedy, or top-50 sampling at temperature 1 when a torch.Generator is given."""
    model.eval()
    texts = []
    for start in range(0, len(prompts), batch_size):
        ids, mask = data.encode_prompts(tokenizer, prompts[start:start + batch_size], device)
        if aggregate is not None:
            tokens = search.ensemble_generate(model, aggregate[0], aggregate[1], ids, mask, level=aggregate[2],
                                              max_new_tokens=max_new_tokens, **sampling(generator))
        else:
            lora.set_adapter(model, adapter)
            tokens = t5.generate(model, ids, mask, max_new_tokens=max_new_tokens, **sampling(generator))[0]
        texts += tokenizer.batch_decode(tokens)
    return texts


def metrics(scorers: dict, prompts: list[str], responses: list[str], objectives=rewards.OBJECTIVES) -> dict[str, float]:
    """Table 2's mean clipped score per objective (clip(s, 1e-4, 0.9999), as el_test.py's logsum scorer
    clips them) and their average, Table 1's diversity-2 and edit rate."""
    scores = rewards.score_all({name: scorers[name] for name in objectives}, prompts, responses)  # NaN-checked
    row = {name: rewards.clip(scores[name].float()).mean().item() for name in objectives}
    row["average"] = sum(row[n] for n in objectives) / len(objectives)
    row["diversity-2"] = rewards.diversity_2(responses)
    row["edit rate"] = statistics.fmean(rewards.edit_rate(p, r) for p, r in zip(prompts, responses))
    return row


def consumption(summaries: list[dict], aggregation_seconds: float = 0.0) -> dict[str, float]:
    """Data points and seconds of one method; several summaries = parallel trainings, Eq. (3):
    data = max_i data_i, time = max_i T_i + T_agg. {} when a run does not know its consumption."""
    if not all(isinstance(s.get(k), (int, float)) for s in summaries for k in ("data_points", "wall_seconds")):
        return {}
    return {"data points": max(s["data_points"] for s in summaries),
            "seconds": max(s["wall_seconds"] for s in summaries) + aggregation_seconds}


def evaluate(load_policy, scorers: dict, prompts: list[str], runs_dir: str, search_result: dict | None,
             batch_size: int = 16, device: str = "cpu", objectives=rewards.OBJECTIVES, greedy: bool = False,
             generation_runs: int = 3, seed: int = 0, force: bool = False, max_new_tokens: int = 64) -> dict[str, list[dict]]:
    """{method: [one metrics row per (training seed, generation run)]}. load_policy() -> (model,
    tokenizer), a fresh base model. See the module docstring for the protocol."""
    objectives = list(objectives)
    if not prompts:
        raise InputError("the inference split is empty: give more data or a larger --sample")
    if missing := [n for n in objectives if n not in scorers]:
        raise InputError(f"no scorer for objective {missing[0]!r}")
    if generation_runs < 1:
        raise InputError(f"generation runs must be >= 1, got {generation_runs}")
    aggregated = searched_objectives(search_result, objectives)   # the search's adapters, any d
    weights = None if search_result is None else check_search(search_result, aggregated)
    runs = files.find_runs(runs_dir)
    seeds = sorted(runs, key=seed_order)
    for s in seeds:  # before any work: runs/<method>-<seed>/adapter must be an adapter of <method>
        for method, folder in runs[s].items():
            if method in SOUPS:                                    # a soup has no adapter (iterative.load_soup checks it)
                continue
            if warning := lora.check_objective(os.path.join(folder, "adapter"), method, force):
                tqdm.write(warning, file=sys.stderr)
    jobs = [(None, "base")]
    for s in seeds:
        order = [m for m in objectives if m in runs[s]] + sorted(m for m in runs[s] if m not in objectives)
        jobs += [(s, m) for m in order]
    if weights is not None:
        jobs += [(s, level) for s in seeds if all(n in runs[s] for n in aggregated) for level in LEVELS]
    aggregation_seconds = sum(r.get("seconds", 0.0) for r in (search_result or {}).get("evaluations", []))
    results: dict[str, list[dict]] = {}
    for training_seed, method in tqdm(jobs, desc="evaluate", unit="method"):
        model, tokenizer = load_policy()
        used = [] if method == "base" else aggregated if method in LEVELS else [method]
        summaries = []
        for name in used:
            if name in SOUPS:
                iterative.load_soup(model, runs[training_seed][name])
            else:
                lora.load_adapter(model, os.path.join(runs[training_seed][name], "adapter"), name)
            summaries.append(files.read_json(os.path.join(runs[training_seed][name], "summary.json")))
        aggregate = (aggregated, weights, method) if method in LEVELS else None
        sampled = not greedy and method not in GREEDY_METHODS
        for run in range(generation_runs if sampled else 1):
            generator = torch.Generator(device=device).manual_seed(seed + run) if sampled else None
            texts = generate_texts(model, tokenizer, prompts, batch_size, device, adapter=None if method in ("base", *SOUPS) else method,
                                   aggregate=aggregate, generator=generator, max_new_tokens=max_new_tokens)
            row = metrics(scorers, prompts, texts, objectives)
            if run == 0 and summaries:  # consumption: once per training seed
                row.update(consumption(summaries, aggregation_seconds if method in LEVELS else 0.0))
            row.update(seed=training_seed, run=run, decoding=f"top-{TOP_K} sample" if sampled else "greedy")
            results.setdefault(method, []).append(row)
            tqdm.write(f"{method} (seed {training_seed}, run {run}) | " +
                       " | ".join(f"{c} {number(row[c], c in INTEGER_COLUMNS)}" for c in columns(objectives) if c in row))
    return results


def number(value: float, integer: bool) -> str:
    return f"{value:,.0f}" if integer else f"{value:.4f}"


def mean_std(values: list[float], integer: bool = False) -> str:
    """"mean ± std" (population std) over several values, the value alone for one, "—" for none."""
    if not values:
        return "—"
    if len(values) == 1:
        return number(values[0], integer)
    return f"{number(statistics.fmean(values), integer)} ± {number(statistics.pstdev(values), integer)}"


def plain(value: float, integer: bool):
    """A CSV number: integer columns as integers when they are whole."""
    return int(round(value)) if integer and math.isclose(value, round(value)) else value


def tables(results: dict[str, list[dict]], objectives=rewards.OBJECTIVES) -> tuple[str, str]:
    """(Markdown table, CSV text) of mean ± std per method, with how it was decoded and how many runs."""
    cols = columns(objectives)
    lines = ["| method | decoding | " + " | ".join(cols) + " |", "|" + "---|" * (len(cols) + 2)]
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(["method", "decoding", "training seeds", "generation runs"] + [f"{c} {s}" for c in cols for s in ("mean", "std")])
    for method, rows in results.items():
        seeds = len({r["seed"] for r in rows})
        runs = len(rows) // max(seeds, 1)
        decoding = rows[0]["decoding"] + (f", {runs} runs" if runs > 1 else "")
        cells = [mean_std([r[c] for r in rows if c in r], c in INTEGER_COLUMNS) for c in cols]
        lines.append(f"| {method} | {decoding} | " + " | ".join(cells) + " |")
        numbers = []
        for c in cols:
            values = [r[c] for r in rows if c in r]
            mean = plain(statistics.fmean(values), c in INTEGER_COLUMNS) if values else ""
            std = plain(statistics.pstdev(values), c in INTEGER_COLUMNS) if len(values) > 1 else ""
            numbers += [mean, std]
        writer.writerow([method, rows[0]["decoding"], seeds, runs] + numbers)
    return "\n".join(lines) + "\n", out.getvalue()
