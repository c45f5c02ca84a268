"""Evaluation on the inference split: the paper's Table 1 (diversity-2, edit rate, data and time
consumption) and Table 2 (reflection / empathy / fluency / average), §5 and SPEC §7.

Methods, all decoded greedily (≤ 64 new tokens) from one base T5 with the trained adapters loaded:
  base                   the policy with every adapter disabled (T5-base in the paper)
  reflection/empathy/fluency, uniform, dynaopt   one trained adapter each (runs/<method>-<seed>/adapter;
                         every such run found, plugged objectives' too)
  param / logit / hidden the search's objective adapters (search.json's "objectives", any d) aggregated
                         with the searched weights, Appendix 11.1 / 11.2 / Eq. (2)
Score columns: one per objective of `objectives` (evaluate --objectives) and their average.
Rows are mean ± std over training seeds (the seeds whose runs exist under runs/).

Consumption: a single-policy method reports its own run's data points and wall time. The aggregated
methods report Eq. (3): T_total = max_i T_train(obj_i) + T_agg (T_agg = the grid search's decoding
time from search.json), and data = max_i data_i (the three trainings run in parallel).

Deviations from the paper:
- Greedy decoding is deterministic, so the paper's "3 generation runs" per seed are one here;
  the ± is over training seeds only (0 with a single seed).
- Parameter-level aggregation uses the searched weights (the paper's Model Soups learns its own).
"""
from __future__ import annotations

import csv
import glob
import io
import os
import statistics

import torch
from tqdm import tqdm

import data
import lora
import rewards
import search
import t5
from t5 import InputError

SINGLE = rewards.OBJECTIVES
TRAINED = SINGLE + ("uniform", "dynaopt")
LEVELS = ("param", "logit", "hidden")
COLUMNS = ("reflection", "empathy", "fluency", "average", "diversity-2", "edit rate", "data points", "seconds")


def columns(objectives=SINGLE) -> tuple:
    """A column per objective, their average, then Table 1's columns."""
    return (*objectives, *COLUMNS[len(SINGLE):])


def find_runs(runs_dir: str) -> dict[int, dict[str, str]]:
    """{seed: {method: run folder}} for every finished run <method>-<seed> (summary.json present) under runs_dir."""
    found: dict[int, dict[str, str]] = {}
    for summary in glob.glob(os.path.join(runs_dir, "*-*", "summary.json")):
        folder = os.path.dirname(summary)
        method, _, seed = os.path.basename(folder).rpartition("-")
        if method and method not in LEVELS + ("base",) and seed.lstrip("-").isdigit():
            found.setdefault(int(seed), {})[method] = folder
    return found


@torch.no_grad()
def generate_texts(model, tokenizer, prompts, batch_size, device, adapter=None, aggregate=None) -> list[str]:
    """Greedy generations for `prompts`: one adapter (None = base model), or aggregate=(names, weights, level)."""
    model.eval()
    texts = []
    for start in range(0, len(prompts), batch_size):
        ids, mask = data.encode_prompts(tokenizer, prompts[start:start + batch_size], device)
        if aggregate is not None:
            tokens = search.ensemble_generate(model, aggregate[0], aggregate[1], ids, mask, level=aggregate[2])
        else:
            lora.set_adapter(model, adapter)
            tokens = t5.generate(model, ids, mask)[0]
        texts += tokenizer.batch_decode(tokens)
    return texts


def metrics(scorers: dict, prompts: list[str], responses: list[str], objectives=SINGLE) -> dict[str, float]:
    """Table 2's mean scores and Table 1's diversity-2 and edit rate for one set of generations."""
    scores = rewards.score_all({name: scorers[name] for name in objectives}, prompts, responses)  # NaN-checked
    row = {name: scores[name].float().mean().item() for name in objectives}
    row["average"] = sum(row[n] for n in objectives) / len(objectives)
    row["diversity-2"] = rewards.diversity_2(responses)
    row["edit rate"] = statistics.fmean(rewards.edit_rate(p, r) for p, r in zip(prompts, responses))
    return row


def consumption(summaries: list[dict], aggregation_seconds: float = 0.0) -> dict[str, float]:
    """Data points and seconds of one method; several summaries = parallel trainings, Eq. (3)."""
    return {"data points": max(s["data_points"] for s in summaries),
            "seconds": max(s["wall_seconds"] for s in summaries) + aggregation_seconds}


def mean_std(values: list[float], digits: int = 4) -> str:
    if not values:
        return "—"
    std = statistics.pstdev(values) if len(values) > 1 else 0.0
    return f"{statistics.fmean(values):.{digits}f} ± {std:.{digits}f}"


def evaluate(load_policy, scorers: dict, prompts: list[str], runs_dir: str, search_result: dict | None,
             batch_size: int = 16, device: str = "cpu", objectives=SINGLE) -> dict[str, list[dict]]:
    """{method: [one metrics row per seed]}, a score column per objective of `objectives`. load_policy() ->
    (model, tokenizer), a fresh base model. Single-adapter rows: every run found; aggregated rows: the
    adapters of the search's objectives."""
    if not prompts:
        raise InputError("the inference split is empty: give more data or a larger --sample")
    runs = find_runs(runs_dir)
    results: dict[str, list[dict]] = {}
    model, tokenizer = load_policy()
    texts = generate_texts(model, tokenizer, prompts, batch_size, device)
    results["base"] = [metrics(scorers, prompts, texts, objectives)]
    order = list(dict.fromkeys([*objectives, *TRAINED, *sorted(m for seed in runs for m in runs[seed])]))
    jobs = [(seed, m) for seed in sorted(runs) for m in order if m in runs[seed]]
    aggregated = list((search_result or {}).get("objectives", SINGLE))
    if search_result is not None:
        jobs += [(seed, level) for seed in sorted(runs) if all(n in runs[seed] for n in aggregated) for level in LEVELS]
    aggregation_seconds = sum(r.get("seconds", 0.0) for r in (search_result or {}).get("evaluations", []))
    for seed, method in tqdm(jobs, desc="evaluate", unit="method"):
        model, tokenizer = load_policy()
        used = aggregated if method in LEVELS else [method]
        summaries = []
        for name in used:
            lora.load_adapter(model, os.path.join(runs[seed][name], "adapter"), name)
            summaries.append(t5.read_json(os.path.join(runs[seed][name], "summary.json")))
        aggregate = None if method not in LEVELS else (aggregated, search_result["best_weights"], method)
        texts = generate_texts(model, tokenizer, prompts, batch_size, device, adapter=method, aggregate=aggregate)
        row = metrics(scorers, prompts, texts, objectives)
        row.update(consumption(summaries, aggregation_seconds if method in LEVELS else 0.0))
        row["seed"] = seed
        results.setdefault(method, []).append(row)
        tqdm.write(f"{method} (seed {seed}) | " + " | ".join(f"{c} {row[c]:.4f}" for c in columns(objectives) if c in row))
    return results


def tables(results: dict[str, list[dict]], objectives=SINGLE) -> tuple[str, str]:
    """(Markdown table, CSV text) of mean ± std per method, a column per objective."""
    table_columns = columns(objectives)
    header = "| method | " + " | ".join(table_columns) + " |"
    lines = [header, "|" + "---|" * (len(table_columns) + 1)]
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(["method", "seeds"] + [f"{c} {stat}" for c in table_columns for stat in ("mean", "std")])
    for method, rows in results.items():
        cells = [mean_std([r[c] for r in rows if c in r], 0 if c in ("data points", "seconds") else 4) for c in table_columns]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
        numbers = []
        for c in table_columns:
            values = [r[c] for r in rows if c in r]
            numbers += [statistics.fmean(values), statistics.pstdev(values)] if values else ["", ""]
        writer.writerow([method, len(rows)] + numbers)
    return "\n".join(lines) + "\n", out.getvalue()
