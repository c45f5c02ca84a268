"""Aggregating the objective adapters (paper §4.1, Eq. 2; Appendix 11.1-11.2) and searching their
weights (§4.2, Algorithm 1, Appendix 11.3) — the `python emorl.py search` command layer included.

- `ensemble_generate`: decoding from K LoRA adapters on one base T5 at three levels:
  "hidden" (Eq. 2: f = Σ w_i f_i of the last decoder hidden states, one LM head, argmax),
  "logit" (Appendix 11.2: log Σ_i w_i softmax(H_LM(f_i)), the mixture of the K next-token
  distributions, as the public code aggregates), "param" (Appendix 11.1, Eq. 4: θ0 + Σ_i w_i ΔW_i
  merged with the raw weights, as the public code merges).
- `hierarchical_grid_search`: Algorithm 1 as a pure function, resumable from its own records.
- `make_objective`, `run_search`: f(w) = mean over objectives of the mean score over the aggregation
  prompts (SPEC §5), or their λ-weighted mean for a preference λ (`scalarise`, compare.py);
  search.json rewritten atomically after every evaluation; Pareto report (report.py).

Deviations from the paper / public code:
- The public code deep-copies K models and re-runs the whole sequence (encoder included) every step.
  Here the K adapters share one base model as ONE mixed-adapter batch of K·B rows (adapter-major):
  one encoder forward, a KV cache per row, every adapter extending the same shared prefix.
- Logit level: every adapter's distribution is taken on the ONE shared prefix (the tokens already
  chosen by the mixture), decoded greedily by default with the KV cache. The public code
  (el_aggregation.py:101-140) takes each model's distribution from its own independently sampled
  continuation and never feeds the chosen tokens back: the merged text is not what any of the mixed
  distributions was conditioned on (a defect, not copied). The mixture is not the hidden level:
  z1 = (5,0,4), z2 = (0,5,4), w = (0.6,0.4): Σ w z picks the third token, Σ w softmax(z) the first (tested).
  Each model's full distribution is mixed; the public code mixes each one's top 50, renormalised
  (generate's processed scores, el_aggregation.py:114-116, 124-125), over model 0's number of steps.
- The search objective averages scores clipped to [1e-4, 0.9999] (rewards.clip), as the public code's
  logsum scorer does in its search (utils_scoring.py:213-214 via el_aggregation.py:160).
- Each row stops at its own </s> (the paper's intent); the public code's hidden level runs every row
  until all rows emit </s> at the same step and keeps the text after a row's </s>
  (el_aggregation.py:228, el_test.py:175).
- Hidden and logit level divide the weights by their sum (exactly: fractions) before decoding; argmax
  is unchanged by a positive factor, so they depend on the ray w/Σw only. The param level uses the
  raw weights (θ0 + Σ w_i ΔW_i, not a convex combination): the search also explores the deltas' size.
- Algorithm 1 memoises: at the hidden and logit levels the memo key is the exact direction w/Σw
  (fractions.Fraction, no rounding), so refined grids re-use their 2^d corners and (0.5,0.5,0.5)
  shares the decode of (1,1,1); w = 0 scores -inf there and is never decoded (an all-zero hidden
  state; the public code decodes it into empty texts). At the param level the key is the exact point
  and w = 0 is decoded (the base model, as the public code does): with -inf the sub-cube [0, 1/2]^d,
  where the small raw weights live, could never be chosen. The walk is the plain algorithm's: same
  scores, same tie rule, same result (tested at every level).
- Ties: grids are enumerated lexicographically (axis 1 slowest; lo, mid, hi). The iteration's best is
  the first maximum; it replaces the running best only if strictly better (Alg. 1, line 11). Sub-cubes
  are enumerated as (lower, upper) half per axis, same order; the first maximal corner sum wins.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import math
import os
import time
from fractions import Fraction

import torch
from tqdm import tqdm

import data
import lora
import report
import rewards
import files
import t5
from files import InputError

LEVELS = ("hidden", "logit", "param")


# ----------------------------------------------------------------------------- weights
def check_weights(weights, d, what="weights", allow_zero=False) -> list[float]:
    """d finite, non-negative numbers, not all zero (unless allow_zero); else a one-line InputError."""
    weights = [float(w) for w in weights]
    if len(weights) != d:
        raise InputError(f"{what}: expected {d} weights (one per adapter), got {len(weights)}")
    bad = next((w for w in weights if not w >= 0 or math.isinf(w)), None)  # NaN fails w >= 0
    if bad is not None:
        raise InputError(f"{what}: weight {bad} is {'negative' if bad < 0 else 'not a finite number'}; weights must be >= 0")
    if sum(weights) == 0 and not allow_zero:
        raise InputError(f"{what}: all weights are zero; at least one must be > 0")
    return weights


def parse_floats(text: str, what: str) -> list[float]:
    """"0.8,0.5,0.05" -> [0.8, 0.5, 0.05]; a part that is not a number: InputError naming `what` and the part."""
    values = []
    for part in str(text).split(","):
        try:
            values.append(float(part))
        except ValueError:
            raise InputError(f"{what} '{text}': '{part.strip()}' is not a number") from None
    return values


def parse_weights(text: str, d: int) -> list[float]:
    """"0.8,0.5,0.05" -> [0.8, 0.5, 0.05]."""
    return check_weights(parse_floats(text, "weights"), d, what=f"weights '{text}'")


def ray_key(weights):
    """The exact direction w/Σw (None for w = 0): the memo key of Algorithm 1."""
    total = sum(Fraction(w) for w in weights)
    return None if total == 0 else tuple(Fraction(w) / total for w in weights)


def normalise(weights) -> list[float]:
    """w/Σw, each entry the correctly rounded exact quotient: every point of one ray (e.g. (0.5,0.5,0.5)
    and (1,1,1)) gets bit-identical weights, so they decode identically whichever one is evaluated."""
    return [float(x) for x in ray_key(weights)]


# ----------------------------------------------------------------------------- Eq. (2) ensemble decoding
def mixture_log_probs(logits, weights):
    """Appendix 11.2, the public code's logit level: log Σ_i w_i softmax(z_i) for logits [K, ..., V] and
    weights [K] (Σ w = 1 gives a normalised log-distribution). Not Σ_i w_i z_i: with T5's linear LM head
    that would be the hidden level again. Computed as a logsumexp, in at least fp32."""
    dtype = torch.promote_types(logits.dtype, torch.float32)
    log_w = torch.log(torch.as_tensor(weights, dtype=dtype, device=logits.device))
    log_p = torch.log_softmax(logits.to(dtype), -1)
    return torch.logsumexp(log_p + log_w.view(-1, *[1] * (logits.dim() - 1)), 0)


@torch.no_grad()
def ensemble_encode(model, adapter_names, input_ids, attention_mask):
    """Every adapter's encoder output for the prompts, adapter-major [k·B, S, D], one forward: what the hidden and
    logit levels decode from. It depends on the adapters, not on the weights, so make_objective encodes each
    chunk of prompts once for every weight vector of a search."""
    k, batch = len(adapter_names), input_ids.shape[0]
    with lora.mixed_adapters(model, list(adapter_names), lora.adapter_major_rows(k, batch).to(input_ids.device)):
        return model.encode(input_ids.repeat(k, 1), attention_mask.repeat(k, 1))


@torch.no_grad()
def ensemble_generate(model, adapter_names, weights, input_ids, attention_mask, level="hidden", max_new_tokens=64,
                      do_sample=False, top_k=50, generator=None, encoded=None):
    """Tokens [B, T] from the adapters `adapter_names` combined with `weights` at `level` (see module
    docstring): greedy, or with do_sample=True drawn from the aggregated scores (top_k, temperature 1;
    the public code samples its parameter level so). Call model.eval() first: dropout is whatever
    mode the model is in. `encoded`: ensemble_encode's output for these prompts (hidden, logit), if already known."""
    if level not in LEVELS:
        raise InputError(f"aggregation level '{level}': expected one of {', '.join(LEVELS)}")
    names = list(adapter_names)
    weights = check_weights(weights, len(names), allow_zero=level == "param")  # param, w = 0: the base model
    cfg, batch = model.config, input_ids.shape[0]
    sampling = dict(do_sample=do_sample, top_k=top_k if do_sample else 0, generator=generator)
    if level == "param":  # Appendix 11.1, Eq. (4): one model, θ0 + Σ_i w_i ΔW_i with the raw weights
        with lora.merged(model, dict(zip(names, weights))):  # merged layers bypass their adapters until unmerge
            return t5.generate(model, input_ids, attention_mask, max_new_tokens=max_new_tokens, **sampling)[0]
    weights = normalise(weights)  # hidden, logit: argmax is invariant to a positive factor
    k = len(names)
    rows = lora.adapter_major_rows(k, batch).to(input_ids.device)  # row r runs adapter r // B
    w = torch.tensor(weights, dtype=model.shared.weight.dtype, device=input_ids.device).view(k, 1, -1)
    if encoded is None:
        encoded = ensemble_encode(model, names, input_ids, attention_mask)
    with lora.mixed_adapters(model, names, rows):
        mask = attention_mask.repeat(k, 1)
        cache = None

        def next_logits(last_tokens):  # last_tokens [B]: the shared prefix's newest token
            nonlocal cache
            hidden, cache = model.decode(last_tokens.repeat(k)[:, None], encoded, mask, cache)
            f = hidden[:, -1].view(k, batch, -1)  # f_i, adapter-major
            if level == "hidden":
                return model.logits((w * f).sum(0))  # Eq. (2): H_LM(Σ w_i f_i)
            return mixture_log_probs(model.logits(f), w.view(k))  # Appendix 11.2: log Σ_i w_i softmax(H_LM(f_i))

        return t5.decode_loop(next_logits, batch, max_new_tokens=max_new_tokens, start_id=cfg.decoder_start_token_id,
                              eos_id=cfg.eos_token_id, pad_id=cfg.pad_token_id, device=input_ids.device, **sampling)[0]


# ----------------------------------------------------------------------------- Algorithm 1
def grid_points(bounds) -> list[tuple]:
    """GenerateGrid: (lo, mid, hi) per axis -> 3^d points, lexicographic (axis 1 slowest)."""
    return list(itertools.product(*[(lo, (lo + hi) / 2, hi) for lo, hi in bounds]))


def best_region(bounds, results: dict) -> list[tuple]:
    """FindBestRegion + ComputeBounds: the 2^d sub-cube whose corner scores sum highest."""
    best, best_total = None, -math.inf
    for halves in itertools.product((0, 1), repeat=len(bounds)):  # 0 = lower half, first max wins
        cube = [(lo, (lo + hi) / 2) if h == 0 else ((lo + hi) / 2, hi) for (lo, hi), h in zip(bounds, halves)]
        total = sum(results[corner] for corner in itertools.product(*cube))
        if best is None or total > best_total:
            best, best_total = cube, total
    return best


def max_evaluations(d, iterations, ray_invariant=True) -> int:
    """Upper bound of the distinct evaluations. By exact point (w = 0 decoded too): the distinct grid points
    of I iterations, 3^d + (I-1)(3^d - 2^d) (103 for d=3, I=5). By ray: iteration 1 has 3^d - 2^d
    rays, each refinement at most 3^d - 2^d new points, so I (3^d - 2^d) (95)."""
    if ray_invariant:
        return iterations * (3 ** d - 2 ** d)
    return 3 ** d + (iterations - 1) * (3 ** d - 2 ** d)


def memo_key(weights, ray_invariant=True):
    """Algorithm 1's memo key: the exact ray w/Σw (hidden, logit; None for w = 0) or the exact point (param)."""
    if ray_invariant:
        return ray_key(weights)
    return tuple(Fraction(w) for w in weights)


def hierarchical_grid_search(objective, d, iterations=5, log=None, on_eval=None, ray_invariant=None) -> dict:
    """Algorithm 1 over [0, 1]^d. objective(weights) -> (mean, per-objective scores). ray_invariant
    (default: objective.ray_invariant, else True): the objective depends on w/Σw only (hidden, logit
    level) and is called once per ray, with the ray's first grid point; False (param level): once per point.
    `log`: records of an earlier (interrupted) run, re-used instead of re-evaluated. on_eval(record)
    runs after every new evaluation. Returns best_weights, best_score, evaluations (one record per
    ray or point, in order of first use), iterations (bounds, grid points, means, chosen next bounds)."""
    if d < 1 or iterations < 1:
        raise InputError(f"grid search: need d >= 1 objectives and >= 1 iterations, got d={d}, iterations={iterations}")
    if ray_invariant is None:
        ray_invariant = getattr(objective, "ray_invariant", True)
    memo = {}
    for i, record in enumerate(log or []):
        weights = record.get("weights") if isinstance(record, dict) else None
        if not isinstance(weights, list) or len(weights) != d or not isinstance(record.get("mean"), (int, float)) \
                or not all(isinstance(w, (int, float)) and math.isfinite(w) and w >= 0 for w in weights):
            raise InputError(f"search log record {i}: expected {d} weights >= 0 and a numeric mean, got {record}")
        memo[memo_key(weights, ray_invariant)] = record
    used = {}

    def f(point, iteration):  # Alg. 1, line 8: results[p] <- f(p)
        key = memo_key(point, ray_invariant)
        if key is None:
            return -math.inf  # w = 0 at the hidden/logit level: all-zero hidden state, nothing to decode
        if key not in memo:
            direction = normalise(point) if any(point) else [0.0] * d  # param level: w = 0 is the base model
            start = time.perf_counter()
            mean, scores = objective(list(point))
            if not math.isfinite(mean):
                raise InputError(f"objective returned {mean} at weights {list(point)}")
            memo[key] = {"weights": list(point), "direction": direction, "scores": [float(s) for s in scores],
                         "mean": float(mean), "iteration": iteration, "seconds": round(time.perf_counter() - start, 3)}
            if on_eval is not None:
                on_eval(memo[key])
        used.setdefault(key, memo[key])
        return memo[key]["mean"]

    best_weights, best_score = None, -math.inf  # Alg. 1, lines 1-2
    bounds = [(0.0, 1.0)] * d  # Alg. 1, line 3
    history = []
    for iteration in range(1, iterations + 1):  # Alg. 1, line 4
        points = grid_points(bounds)  # Alg. 1, line 5
        results = {p: f(p, iteration) for p in points}  # Alg. 1, lines 6-9
        current = max(points, key=results.__getitem__)  # Alg. 1, line 10 (first maximum)
        if results[current] > best_score:  # Alg. 1, lines 11-14
            best_weights, best_score = current, results[current]
        region = best_region(bounds, results)  # Alg. 1, line 15
        history.append({"iteration": iteration, "bounds": [list(b) for b in bounds], "points": [list(p) for p in points],
                        "means": [results[p] if math.isfinite(results[p]) else None for p in points],
                        "next_bounds": [list(b) for b in region]})
        bounds = region  # Alg. 1, line 16
    return {"best_weights": None if best_weights is None else list(best_weights),  # Alg. 1, line 18
            "best_score": best_score if math.isfinite(best_score) else None,
            "evaluations": list(used.values()), "iterations": history}


# ----------------------------------------------------------------------------- command layer
def scalarise(scores, preference=None) -> float:
    """The search's objective: the λ-weighted mean Σ_i λ_i s_i / Σ_i λ_i of the per-objective scores
    (compare.py's preferences; MORL-P §2.2 metric 1); preference None is the plain mean (SPEC §5).
    λ is first divided by its largest entry, so λ = 1/d becomes (1, ..., 1) exactly and gives the plain
    mean bit for bit: the same search, ties included."""
    if preference is None:
        return sum(scores) / len(scores)
    top = max(preference)
    scaled = [lam / top for lam in preference]
    return sum(lam * s for lam, s in zip(scaled, scores)) / sum(scaled)


def make_objective(model, tokenizer, adapter_names, scorers, prompts, level="hidden", batch_size=16,
                   max_new_tokens=64, device="cpu", preference=None):
    """objective(weights) -> (scalarise(clipped scores, preference): the plain mean by default, [mean clipped
    score over `prompts` per scorer]), decoding policy_input(prompt) (≤ 128 tokens) with ensemble_generate
    (hidden, logit: each chunk of prompts encoded once, ensemble_encode, for every weight vector);
    scorers in dict order."""
    if not prompts:
        raise InputError("grid search: the aggregation split has no prompts")
    model.eval()
    chunks = [list(prompts[i:i + batch_size]) for i in range(0, len(prompts), batch_size)]
    inputs = [data.encode_prompts(tokenizer, c, device) for c in chunks]
    encoded = {}  # chunk -> ensemble_encode's output, at the first decode (hidden, logit: the weights do not change it)

    def objective(weights):
        totals = [0.0] * len(scorers)
        for i, (chunk, (ids, mask)) in enumerate(zip(chunks, inputs)):
            if level != "param" and i not in encoded:
                encoded[i] = ensemble_encode(model, adapter_names, ids, mask)
            tokens = ensemble_generate(model, adapter_names, weights, ids, mask, level=level, max_new_tokens=max_new_tokens,
                                       encoded=encoded.get(i))
            responses = tokenizer.batch_decode(tokens)
            for j, scorer in enumerate(scorers.values()):
                totals[j] += float(rewards.clip(scorer(chunk, responses).float()).sum())  # as el_aggregation.py:160
        per_objective = [t / len(prompts) for t in totals]
        return scalarise(per_objective, preference), per_objective

    objective.ray_invariant = level != "param"  # the memo key hierarchical_grid_search uses
    return objective


def fingerprint(*paths) -> str:
    """sha256 (16 hex digits) of the files' contents, or of every file in a folder (an adapter): what a
    search.json compares instead of absolute paths, so a moved or copied project keeps its search."""
    digest = hashlib.sha256()
    for path in paths:
        members = sorted(os.path.join(path, n) for n in os.listdir(path) if not n.startswith(".")) \
            if os.path.isdir(path) else [path]  # hidden files (.tmp-* leftovers) are not content
        for file in members:
            if os.path.isfile(file):
                with open(file, "rb") as f:
                    digest.update(os.path.basename(file).encode() + b"\0" + f.read())
    return digest.hexdigest()[:16]


def header_difference(stored: dict, header: dict) -> str | None:
    """The first field (dotted path) in which a search.json differs from this search's header, or None."""
    for key, value in header.items():
        old = stored.get(key) if isinstance(stored, dict) else None
        if isinstance(value, dict) and isinstance(old, dict):
            inner = header_difference(old, value)
            if inner:
                return f"{key}.{inner}"
        elif old != value:
            return f"{key} (the file has {json.dumps(old)}, this search {json.dumps(value)})"
    return None


def run_search(objective, names, out_path="search.json", iterations=5, svg_path=None, meta=None, info=None) -> dict:
    """Algorithm 1 with a log line per evaluation, search.json after every evaluation (re-read on
    restart: a killed search resumes where it stopped), the Pareto report, and Figure 5 as SVG.
    `meta` (what decides the scores: adapter fingerprints, level, data, split) must match the file's to
    resume from it; a mismatch names the field. `info` (e.g. the adapters' paths) is stored, not compared."""
    names, d = list(names), len(names)
    ray_invariant = getattr(objective, "ray_invariant", True)
    header = json.loads(json.dumps({"objectives": names, "num_iterations": iterations, "meta": meta}))  # as read back
    log = []
    if os.path.exists(out_path):
        previous = files.read_json(out_path)
        if not isinstance(previous, dict):
            raise InputError(f"{out_path}: not a search result (expected a JSON object); delete it or choose another --out")
        difference = header_difference(previous, header)
        if difference:
            raise InputError(f"{out_path}: written by a different search: {difference}; "
                             "delete it or choose another output path")
        log = previous.get("evaluations", [])
        if not isinstance(log, list):
            raise InputError(f"{out_path}: 'evaluations' must be a list")
        print(f"resuming: {len(log)} evaluations read from {out_path}")
    records, total = list(log), max_evaluations(d, iterations, ray_invariant)
    header = {**header, **({"info": info} if info is not None else {})}
    bar = tqdm(total=total, initial=len(log), desc="grid search", unit="eval")

    def on_eval(record):
        records.append(record)
        files.write_json(out_path, {**header, "evaluations": records})
        bar.update(1)
        bar.write(report.format_evaluation(len(records), total, record, names))

    try:
        result = hierarchical_grid_search(objective, d, iterations, log=log, on_eval=on_eval, ray_invariant=ray_invariant)
        bar.total = bar.n  # the total was an upper bound: close the bar at the true end
        bar.refresh()
    finally:
        bar.close()
    pareto = report.pareto_report(result["evaluations"], names)
    out = {**header, "evaluations": records, "best_weights": result["best_weights"], "best_score": result["best_score"],
           "iterations": result["iterations"], "pareto": pareto}
    files.write_json(out_path, out)
    if svg_path:
        files.atomic_write(svg_path, report.search_svg(result["iterations"], names))
    print(report.format_report(pareto))
    best = ",".join(f"{w:.5g}" for w in result["best_weights"] or [])
    score = "n/a" if result["best_score"] is None else f"{result['best_score']:.4f}"
    print(f"best weights ({best}) | mean {score} | {len(result['evaluations'])} distinct evaluations "
          f"(plain Algorithm 1: {iterations * 3 ** d}; memo {'per ray' if ray_invariant else 'per point'}) | {out_path}" + (f" | {svg_path}" if svg_path else ""))
    return out
