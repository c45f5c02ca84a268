"""HoE — hierarchical mixture of LoRA experts (Li et al. 2025, arXiv 2505.20925) on this project's T5 policy,
LoRA adapters, scorers and SCST, so that it can be compared with EMORL at the same preferences.

Why a module of its own: HoE has maths EMORL has not (task-SVD experts, linear routers trained on a
Tchebycheff-weighted advantage, routing by preference geometry). It reuses lora.py (adapters, files, and a
routed mode: lora.routed_adapters), scst.py (scst_step: sampling, SCST advantages, KL, loss) and rewards.py.

Paper map (§ = sections of the HoE paper; /work/shared/methods-spec.md §2 reads it line by line):
  §3.1, Eq. (2), App. D.1  objective_vectors: τ_i = s·B_i A_i per adapted module; task_svd: prune the smallest
                           40 % of |τ| model-wide (prune_smallest), SVD per module, top r' directions, rescale
  §3.1, Eq. (4)            merge_vectors: τ_λ = Merge({τ_i}, λ), task arithmetic Σ_i λ_i τ_i, then task_svd
  App. D.1                 choose_rescale: the rescale factor (here on the aggregation split)
  §3.2, Eq. (5)            Router: one linear layer (W ∈ R^{d_in×N}, b ∈ R^N) per LoRA-plugged module, voting
                           over the N LoRA experts nearest to its preference
  App. D.3, Eq. (17)-(18)  stch_weights, stch_update: w = softmax(log w), log w += α λ ⊙ (z* − R)
  Eq. (8) / (19)           train_router: scst.scst_step on the reward Σ_i w_i R_i (its SCST advantage is
                           the mixed advantage Σ_i w_i A_i), routers trained, LoRA experts frozen
  §3.3, Eq. (9)-(10)       nearest (the N experts nearest to λ_user), convex_coefficients (ω_r)
  §3.4, Eq. (11)-(12)      routing_plan, gate: ω_l(x) = Σ_r ω_r softmax(W_rᵀx + b_r); O(x) = W x + Σ_i ω_l,i B_i A_i x,
                           per token and per module (lora.routed_adapters); at_preference, decode_at (greedy, E.5)
Files: `hoe build` (build) writes OUT/hoe.json + OUT/experts/<name>/ (PEFT layout); `hoe train` (train) writes
OUT/routers/<name>/ (router.safetensors, summary.json, train.jsonl, train.log; checkpoint.pt while running);
`compare --methods ...,hoe` runs both per seed into its OUT/seed-<s>/hoe/ (compare_point).

Deviations from the paper (no public code exists; docs/hoe.md has every choice and why):
- Experts come from this project's LoRA adapters (τ_i is rank r), not from full fine-tuned models.
- The rescale factor is chosen on the aggregation split; the paper chose it "based on test results" (D.1).
- SCST (k samples, mean baseline, + β·KL to the base policy) stands in for PPO (Eq. 8 / 19).
- Router scores pass through a softmax over the router's N experts before Eq. (11) (unspecified in the paper);
  a LoRA expert chosen by preference routing votes for itself with weight ω_r (Fig. 2; no router of its own);
  λ_user outside its neighbours' hull is served at the nearest point of that hull (Eq. 10 has no solution there).
- Router initialisation W = 0, b = log ω (ω: Eq. 10 for the router's own λ): the untrained router is the static
  mixture of its experts at λ; z* = 1 (the top of every [0, 1] scorer), α = 0.1, log w starts uniform.
- Merge is task arithmetic only (TIES is not built).
"""
from __future__ import annotations

import io
import itertools
import json
import math
import os
import random
import time
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

import data
import evaluate
import files
import lora
import scst
import search
import t5
from files import InputError

PRUNE = 0.4                     # App. D.1: the 40 % smallest-magnitude entries, model-wide
RESCALES = (0.5, 1.0, 1.5, 2.0)  # candidates of the rescale factor (the paper's math expert: 1.9)
# App. E.5: the 13 three-objective evaluation preferences (its (0.33, 0.33, 0.33) as exactly 1/3 each, to sum to 1).
E5_PREFERENCES = [(0, 0, 1), (0, 1, 0), (0.1, 0.1, 0.8), (0.1, 0.8, 0.1), (0.2, 0.2, 0.6), (0.2, 0.4, 0.4),
                  (0.2, 0.6, 0.2), (1 / 3, 1 / 3, 1 / 3), (0.4, 0.4, 0.2), (0.4, 0.2, 0.4), (0.6, 0.2, 0.2),
                  (0.8, 0.1, 0.1), (1, 0, 0)]


# ----------------------------------------------------------------------------- preferences
def parse_preference(text: str, d: int) -> list[float]:
    """"0.6,0.2,0.2" -> a point of the simplex (λ / Σλ); wrong count, negative, NaN, all zero: InputError."""
    values = search.check_weights(search.parse_floats(text, "preference"), d, what=f"preference '{text}' ({d} objectives)")
    return [v / sum(values) for v in values]


def parse_numbers(text: str, what: str, count: int | None = None, positive: bool = False) -> list[float]:
    """"0.5,1,1.5" -> finite numbers (> 0 if positive; `count` of them if given); else InputError."""
    values = search.parse_floats(text, what)
    if any(not math.isfinite(v) or (positive and v <= 0) for v in values):
        raise InputError(f"{what} '{text}': every value must be a finite number{' > 0' if positive else ''}")
    if count is not None and len(values) != count:
        raise InputError(f"{what} '{text}': expected {count} numbers (one per objective), got {len(values)}")
    return values


def parse_preferences(texts, d: int) -> list[list[float]]:
    """evaluate --preference (repeatable): each a preference, or 'e5' for App. E.5's 13 points (d = 3);
    none given: the uniform preference."""
    preferences = []
    for text in texts or [",".join(["1"] * d)]:
        if text.strip().lower() == "e5":
            if d != 3:
                raise InputError(f"--preference e5: App. E.5's 13 points are for 3 objectives, not {d}")
            preferences += [[x / sum(p) for x in p] for p in E5_PREFERENCES]
        else:
            preferences.append(parse_preference(text, d))
    return preferences


def parse_merged(texts, d: int) -> list[list[float]]:
    """hoe build --merged (repeatable): the multi-objective experts' preferences; default uniform (App. D.2); 'none'."""
    if texts == ["none"]:
        return []
    return [parse_preference(t, d) for t in texts or [",".join(["1"] * d)]]


def default_router_preference(d: int) -> list[float]:
    """App. D.2: [0.25, 0.25, 0.5] for 3 objectives, [0.2] * 5 for 5; otherwise (unspecified) uniform."""
    return [0.25, 0.25, 0.5] if d == 3 else [1.0 / d] * d


# ----------------------------------------------------------------------------- §3.1 LoRA experts
def lora_modules(model) -> dict[str, lora.LoRALinear]:
    return {path: m for path, m in model.named_modules() if isinstance(m, lora.LoRALinear)}


@torch.no_grad()
def objective_vectors(model, name) -> dict[str, torch.Tensor]:
    """Eq. (2) for a LoRA-trained objective: τ_i = θ_i − θ_pre = (alpha/r)·B_i A_i in every module it adapts."""
    return {path: (m.scaling(name) * (m.lora_B[name] @ m.lora_A[name])).double()
            for path, m in lora_modules(model).items() if name in m.lora_A}


def merge_vectors(vectors: list[dict], preference) -> dict[str, torch.Tensor]:
    """Eq. (4) with Merge = task arithmetic: τ_λ = Σ_i λ_i τ_i (a module missing from τ_i counts as 0)."""
    paths = list(dict.fromkeys(p for v in vectors for p in v))
    return {p: sum(w * v[p] for w, v in zip(preference, vectors) if p in v) for p in paths}


def prune_smallest(vectors: dict, fraction: float) -> dict:
    """App. D.1: zero the `fraction` smallest |entries| over all modules at once (one model-wide threshold)."""
    if not 0 <= fraction < 1:
        raise InputError(f"prune fraction {fraction}: must be in [0, 1)")
    magnitudes = torch.cat([t.abs().flatten() for t in vectors.values()])
    k = int(fraction * magnitudes.numel())
    if k == 0:
        return dict(vectors)
    threshold = magnitudes.kthvalue(k).values
    return {p: torch.where(t.abs() > threshold, t, torch.zeros_like(t)) for p, t in vectors.items()}


def task_svd(vectors: dict, rank: int, prune: float = PRUNE, rescale: float = 1.0) -> dict[str, tuple]:
    """§3.1, App. D.1: prune, then per module τ = U S Vᵀ -> A = V_r'ᵀ [r', in], B = rescale·U_r' S_r' [out, r']
    (singular values on B; a module whose rank is below r' gets zero rows/columns, so every module has rank r')."""
    if rank < 1:
        raise InputError(f"expert rank {rank}: must be >= 1")
    factors = {}
    for path, tau in prune_smallest(vectors, prune).items():
        U, S, Vh = torch.linalg.svd(tau.double(), full_matrices=False)
        r = min(rank, S.numel())
        A, B = tau.new_zeros(rank, tau.shape[1]), tau.new_zeros(tau.shape[0], rank)
        A[:r], B[:, :r] = Vh[:r], U[:, :r] * (S[:r] * rescale)
        factors[path] = (A.float(), B.float())
    return factors


@torch.no_grad()
def install_expert(model, name, factors: dict[str, tuple]):
    """LoRA expert `name` = the factors (alpha = r': scaling 1, B A = the task-SVD product); left inactive."""
    rank = next(iter(factors.values()))[0].shape[0]
    lora.add_adapter(model, name, r=rank, alpha=rank, dropout=0.0, targets=list(factors))
    modules = lora_modules(model)
    for path, (A, B) in factors.items():
        modules[path].lora_A[name].copy_(A)
        modules[path].lora_B[name].copy_(B)
    for p in model.parameters():
        p.requires_grad_(False)                       # experts are frozen (§3.2)
    lora.set_adapter(model, None)


def scaled(factors, rescale):
    return {p: (A, B * rescale) for p, (A, B) in factors.items()}


def weighted_score(row: dict, objectives, preference) -> float:
    return sum(w * row[n] for n, w in zip(objectives, preference))


def choose_rescale(model, tokenizer, scorers, objectives, name, factors, preference, prompts, candidates=RESCALES,
                   batch_size=16, device="cpu") -> tuple[float, dict]:
    """App. D.1's rescale factor, chosen here on the aggregation split: the candidate whose greedy responses
    maximise Σ_i λ_i R_i (the expert's own objective for a single-objective expert). -> (best, {c: score})."""
    scores = {}
    for c in candidates:
        install_expert(model, name, scaled(factors, c))
        texts = evaluate.generate_texts(model, tokenizer, prompts, batch_size, device, adapter=name)
        scores[c] = weighted_score(evaluate.metrics(scorers, prompts, texts, objectives), objectives, preference)
    best = max(candidates, key=lambda c: (scores[c], -abs(c - 1.0)))   # ties: the factor nearest 1
    install_expert(model, name, scaled(factors, best))
    return best, scores


def build_experts(model, tokenizer, scorers, objectives, prompts, out_dir, merged_preferences, rank, prune=PRUNE,
                  candidates=RESCALES, batch_size=16, device="cpu", sources=()) -> dict:
    """§3.1 and Alg. 1 (lines 2-7): one expert per objective (its adapter, loaded as adapter `objective`,
    through task-SVD) and one per preference of `merged_preferences` (Eq. 4). Writes OUT/experts/<name>/
    and OUT/hoe.json (`sources`: the objectives' run folders, for the consumption); returns the manifest."""
    started = time.time()
    vectors = [objective_vectors(model, n) for n in objectives]
    jobs = [(f"expert_{n}", [float(i == j) for j in range(len(objectives))], "single", vectors[i])
            for i, n in enumerate(objectives)]
    jobs += [("expert_merged_" + "_".join(f"{x:g}".replace(".", "p") for x in lam), list(lam), "merged",
              merge_vectors(vectors, lam)) for lam in merged_preferences]
    for n in objectives:                              # the source adapters are not HoE's: drop them
        for m in lora_modules(model).values():
            if n in m.lora_A:
                m.lora_A.pop(n), m.lora_B.pop(n)
    experts = []
    for name, lam, kind, tau in tqdm(jobs, desc="hoe build", unit="expert"):
        factors = task_svd(tau, rank, prune)
        best, tried = choose_rescale(model, tokenizer, scorers, objectives, name, factors, lam, prompts, candidates,
                                     batch_size, device)
        lora.save_adapter(model, name, os.path.join(out_dir, "experts", name))
        experts.append({"name": name, "preference": lam, "kind": kind, "rank": rank, "prune": prune, "rescale": best,
                        "rescale_scores": {f"{c:g}": s for c, s in tried.items()}})
        tqdm.write(f"{name} | λ {lam} | rescale {best:g} | " + " | ".join(f"{c:g}: {s:.4f}" for c, s in tried.items()))
    parameters = sum(p.numel() for n in (e["name"] for e in experts) for p in lora.adapter_parameters(model, n))
    manifest = {"objectives": list(objectives), "experts": experts, "sources": [os.path.abspath(s) for s in sources],
                "build_seconds": round(time.time() - started, 2),
                "build_data_points": len(prompts) * len(candidates) * len(jobs), "expert_parameters": parameters}
    files.write_json(os.path.join(out_dir, "hoe.json"), manifest)
    return manifest


# ----------------------------------------------------------------------------- §3.3 preference routing
def nearest(preference, preferences, n: int) -> list[int]:
    """Eq. (9): indices of the n preferences nearest to `preference` (Euclidean), ties by index."""
    distance = [math.dist(preference, p) for p in preferences]
    return sorted(range(len(preferences)), key=lambda i: (distance[i], i))[:n]


def convex_coefficients(preference, neighbours) -> list[float]:
    """Eq. (10): ω ≥ 0, Σω = 1 with Σ_r ω_r λ_r = λ_user. Outside the neighbours' hull (no solution) the
    nearest point of the hull is used: every subset's equality-constrained least squares, the feasible
    one with the least residual (the smallest subset on a tie: an exact neighbour gets a one-hot ω)."""
    target = torch.tensor(preference, dtype=torch.float64)
    points = torch.tensor(neighbours, dtype=torch.float64)
    best, best_residual = None, math.inf
    for size in range(1, len(neighbours) + 1):
        for subset in itertools.combinations(range(len(neighbours)), size):
            P = points[list(subset)]                                   # [s, d]
            kkt = torch.zeros(size + 1, size + 1, dtype=torch.float64)  # min ‖Pᵀω − λ‖² s.t. Σω = 1
            kkt[:size, :size], kkt[:size, size], kkt[size, :size] = 2 * P @ P.T, 1, 1
            rhs = torch.cat([2 * P @ target, torch.ones(1, dtype=torch.float64)])
            omega = torch.linalg.lstsq(kkt, rhs[:, None]).solution[:size, 0]
            residual = float(torch.linalg.norm(P.T @ omega - target))
            if bool((omega >= -1e-12).all()) and residual < best_residual - 1e-12:
                best, best_residual = (subset, omega.clamp(min=0)), residual
    coefficients = [0.0] * len(neighbours)
    for i, w in zip(best[0], (best[1] / best[1].sum()).tolist()):
        coefficients[i] = w
    return coefficients


# ----------------------------------------------------------------------------- §3.2 router experts
class Router(nn.Module):
    """One router expert (§3.2): per LoRA-plugged module a linear layer scoring `experts` (its N LoRA experts)."""

    def __init__(self, preference, experts: list[str], in_features: dict[str, int], bias: list[float]):
        super().__init__()
        self.preference, self.experts, self.paths = list(preference), list(experts), list(in_features)
        self.layers = nn.ModuleList(nn.Linear(d, len(experts)) for d in in_features.values())
        self.index = {p: i for i, p in enumerate(self.paths)}
        with torch.no_grad():
            for layer in self.layers:
                layer.weight.zero_()
                layer.bias.copy_(torch.tensor(bias))

    def probabilities(self, path, x):
        """softmax(Wᵀx + b) over the router's experts, per token ([..., N])."""
        return torch.softmax(self.layers[self.index[path]](x), -1)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {f"{p}.{k}": v for p, layer in zip(self.paths, self.layers) for k, v in layer.state_dict().items()}

    def load_tensors(self, tensors: dict, source: str):
        files.load_strict(self.layers, {f"{self.index[k.rsplit('.', 1)[0]]}.{k.rsplit('.', 1)[1]}": v
                                        for k, v in tensors.items() if k.rsplit(".", 1)[0] in self.index}, source)
        if len(tensors) != 2 * len(self.paths):
            raise InputError(f"{source}: {len(tensors)} tensors, expected {2 * len(self.paths)} (weight, bias per module)")


@dataclass
class Expert:
    name: str
    preference: list
    router: Router | None = None       # a router expert; None: a LoRA expert
    summary: dict = field(default_factory=dict)   # a router's summary.json (its consumption)


@dataclass
class HoE:
    objectives: list
    lora: list                          # LoRA experts (installed in the model as adapters)
    routers: list = field(default_factory=list)
    consumption: dict = field(default_factory=dict)

    def all_experts(self):
        return self.lora + self.routers


def new_router(model, hoe: HoE, preference, n: int) -> Router:
    """A router at `preference` over its n nearest LoRA experts (Eq. 9), initialised to their Eq. (10) mixture."""
    picked = [hoe.lora[i] for i in nearest(preference, [e.preference for e in hoe.lora], n)]
    omega = convex_coefficients(preference, [e.preference for e in picked])
    in_features = {p: m.in_features for p, m in lora_modules(model).items()
                   if any(e.name in m.lora_A for e in picked)}
    return Router(preference, [e.name for e in picked], in_features, [math.log(max(w, 1e-3)) for w in omega])


def stch_weights(log_w: torch.Tensor) -> torch.Tensor:
    """Eq. (17)'s smooth indicator w (Σ w = 1) from its log."""
    return torch.softmax(log_w, 0)


def stch_update(log_w, preference, rewards, alpha: float, ideal=None) -> torch.Tensor:
    """Eq. (18): log w_i ← log w_i + α λ_i (z*_i − R_i), renormalised so that log w stays a log-distribution."""
    preference, rewards = torch.as_tensor(preference, dtype=torch.float64), torch.as_tensor(rewards, dtype=torch.float64)
    ideal = torch.ones_like(rewards) if ideal is None else torch.as_tensor(ideal, dtype=torch.float64)
    updated = torch.as_tensor(log_w, dtype=torch.float64) + alpha * preference * (ideal - rewards)
    return updated - torch.logsumexp(updated, 0)


# ----------------------------------------------------------------------------- §3.4 inference
def routing_plan(hoe: HoE, preference, n: int | None = None) -> list[tuple[float, Expert]]:
    """Eq. (9)-(10): [(ω_r, expert)] for the n (default: one per objective) nearest of all L + R experts, ω_r > 0."""
    candidates = hoe.all_experts()
    picked = [candidates[i] for i in nearest(preference, [e.preference for e in candidates], n or len(hoe.objectives))]
    omega = convex_coefficients(preference, [e.preference for e in picked])
    return [(w, e) for w, e in zip(omega, picked) if w > 0]


def gate(plan, names: list[str], paths: dict):
    """Eq. (11): the module's weights over `names`, ω_l(x) = Σ_r ω_r v_r(x), v_r = softmax(W_rᵀx + b_r) over a router's
    experts, or a one-hot on itself for a LoRA expert (our rule). `paths`: {module: its path}."""
    voters = [(omega, expert.router, torch.tensor([names.index(n) for n in
                                                   ([expert.name] if expert.router is None else expert.router.experts)]))
              for omega, expert in plan]

    def weights_of(module, x):
        weights = x.new_zeros(*x.shape[:-1], len(names))
        for omega, router, index in voters:
            vote = x.new_ones(*x.shape[:-1], 1) if router is None else router.probabilities(paths[module], x)
            weights = weights.index_add(-1, index.to(x.device), omega * vote)
        return weights
    return weights_of


@contextmanager
def routed(model, plan):
    """The model as HoE with the plan [(ω_r, expert)] (Eq. 12: W x + Σ_i ω_l,i(x) B_i A_i x per token, per module)."""
    names = list(dict.fromkeys(name for _, e in plan for name in ([e.name] if e.router is None else e.router.experts)))
    paths = {m: p for p, m in lora_modules(model).items()}
    with lora.routed_adapters(model, names, gate(plan, names, paths)):
        yield plan


def at_preference(model, hoe: HoE, preference, n: int | None = None):
    """The model as HoE at `preference` inside the block (Eq. 9-12)."""
    return routed(model, routing_plan(hoe, preference, n))


@torch.no_grad()
def decode_at(model, tokenizer, prompts, preference, hoe: HoE, batch_size=16, device="cpu", max_new_tokens=64,
              generator=None) -> list[str]:
    """Greedy responses (App. E.5) of HoE at `preference` (a list of d numbers on the simplex); with a
    torch.Generator, top-50 sampled as evaluate samples (compare --decoding sample)."""
    model.eval()
    texts = []
    with at_preference(model, hoe, preference):
        for start in range(0, len(prompts), batch_size):
            ids, mask = data.encode_prompts(tokenizer, prompts[start:start + batch_size], device)
            texts += tokenizer.batch_decode(t5.generate(model, ids, mask, max_new_tokens=max_new_tokens,
                                                        **evaluate.sampling(generator))[0])
    return texts


# ----------------------------------------------------------------------------- loading
def load_hoe(model, folder) -> HoE:
    """HoE from `folder` (hoe build / hoe train): its LoRA experts loaded into `model` as adapters, its finished
    routers (routers/<name>/summary.json present) read."""
    manifest = files.read_json(os.path.join(folder, "hoe.json"))
    if not isinstance(manifest, dict) or not isinstance(manifest.get("experts"), list) or not manifest["experts"]:
        raise InputError(f"{folder}/hoe.json: expected {{'objectives': [...], 'experts': [...]}} (run `hoe build`)")
    d = len(manifest.get("objectives") or [])
    experts = []
    for e in manifest["experts"]:
        if not isinstance(e, dict) or not isinstance(e.get("name"), str) or not isinstance(e.get("preference"), list):
            raise InputError(f"{folder}/hoe.json: expert {e!r} needs a name and a preference")
        preference = search.check_weights(e["preference"], d, what=f"{folder}/hoe.json: expert {e['name']}")
        lora.load_adapter(model, os.path.join(folder, "experts", e["name"]), e["name"])
        experts.append(Expert(e["name"], preference))
    for p in model.parameters():
        p.requires_grad_(False)
    lora.set_adapter(model, None)
    hoe = HoE(manifest["objectives"], experts, consumption={k: manifest.get(k) for k in
                                                          ("build_seconds", "build_data_points", "expert_parameters")})
    routers_dir = os.path.join(folder, "routers")
    for name in sorted(os.listdir(routers_dir)) if os.path.isdir(routers_dir) else []:
        summary_path = os.path.join(routers_dir, name, "summary.json")
        if os.path.exists(summary_path):
            summary = files.read_json(summary_path)
            router = load_router(model, hoe, os.path.join(routers_dir, name), summary)
            hoe.routers.append(Expert(name, router.preference, router, summary))
    return hoe


def load_router(model, hoe: HoE, directory, summary) -> Router:
    router = new_router(model, hoe, summary["preference"], len(summary["experts"]))
    if router.experts != summary["experts"]:
        raise InputError(f"{directory}: trained over experts {summary['experts']}, the HoE's nearest are {router.experts}")
    router.load_tensors(files.load_safetensors(os.path.join(directory, "router.safetensors")), directory)
    return router


def consumption(hoe: HoE, source_summaries: list[dict]) -> dict:
    """Data points and seconds as Eq. (3) of EMORL counts them (the objective trainings in parallel: the longest),
    plus HoE's build and router training; trainable parameters = the routers' (experts are not trained)."""
    data_points = max((s.get("data_points") or 0) for s in source_summaries) if source_summaries else 0
    seconds = max((s.get("wall_seconds") or 0) for s in source_summaries) if source_summaries else 0
    # the rescale decodes are not counted as data, as EMORL's search decodes are not (its T_agg is time only)
    data_points += sum(e.summary.get("data_points", 0) for e in hoe.routers)
    seconds += (hoe.consumption.get("build_seconds") or 0) + sum(e.summary.get("wall_seconds", 0) for e in hoe.routers)
    return {"data points": data_points, "seconds": round(seconds, 2),
            "trainable parameters": sum(p.numel() for e in hoe.routers for p in e.router.parameters()),
            "expert parameters": hoe.consumption.get("expert_parameters")}


# ----------------------------------------------------------------------------- the commands, and compare's `hoe` row
def router_name(preference) -> str:
    return "router_" + "_".join(f"{x:.4g}".replace(".", "p") for x in preference)


def build(args, names, adapters, scorers, prompts, merged, rescales) -> dict:
    """`hoe build` into args.out: the experts of the adapters' objectives and at `merged` (rescales chosen on `prompts`)."""
    import emorl
    model, tokenizer = emorl.load_policy(args)
    emorl.load_adapters(model, adapters, names)
    return build_experts(model, tokenizer, scorers, names, prompts, args.out, merged, args.rank, args.prune, rescales,
                         args.batch_size, args.device, sources=[os.path.dirname(a) for a in adapters])


def train(args, names, scorers, prompts, preference) -> dict:
    """`hoe train`: the router expert at `preference` over the HoE of args.out, into args.out/routers/<router_name>/."""
    import emorl
    model, tokenizer = emorl.load_policy(args)
    experts = load_hoe(model, args.out)
    if experts.objectives != names:
        raise InputError(f"{args.out}/hoe.json was built for {','.join(experts.objectives)}, not --objectives {','.join(names)}")
    return train_router(model, tokenizer, scorers, experts, preference, prompts, args,
                        os.path.join(args.out, "routers", router_name(preference)))


def compare_point(world, index, preference) -> dict:
    """compare's `hoe` row at λ: HoE's routing decoded by compare.measure, 0 data points (one more λ is a decode).
    Once per seed, skipped when done: `hoe build` (its defaults, --hoe-rescales) from the seed's objective adapters into
    OUT/seed-<s>/hoe/, `hoe train` at the default preference (its defaults, --hoe-steps, compare's shared SCST flags)."""
    import compare
    import emorl
    args, d = world.args, len(world.args.names)
    h = emorl.build_parser().parse_args(["hoe", "train"])                 # hoe's flag defaults
    vars(h).update({k: getattr(args, k) for k in ("policy", "device", "batch_size", "samples_per_prompt", "max_new_tokens",
                                                  "beta", "grad_clip", "top_k")},
                   seed=world.seed, steps=args.hoe_steps, out=os.path.join(args.out, f"seed-{world.seed}", "hoe"))
    emorl.prepare_output(h.out, f"--out {args.out}")                     # a killed run's temporary files
    if not os.path.exists(os.path.join(h.out, "hoe.json")):
        runs = compare.seed_args(args, world.seed).runs
        build(h, args.names, [os.path.join(runs, f"{n}-{world.seed}", "adapter") for n in args.names], world.scorers,
              [e.prompt for e in world.splits["aggregation"]], parse_merged(h.merged, d),
              parse_numbers(args.hoe_rescales, "--hoe-rescales", positive=True))
    if not os.path.exists(os.path.join(h.out, "routers", router_name(default_router_preference(d)), "summary.json")):
        train(h, args.names, world.scorers, [e.prompt for e in world.splits["train"]], default_router_preference(d))
    experts = load_hoe(world.model, h.out)                                # beside the objective adapters
    row = compare.measure(world, preference, decode=lambda prompts, generator: decode_at(
        world.model, world.tokenizer, prompts, preference, experts, args.decode_batch_size, args.device, args.max_new_tokens, generator))
    return {**row, "plan": [[w, e.name] for w, e in routing_plan(experts, preference)], "data points": 0,
            "seconds": row["decode seconds"]}


# ----------------------------------------------------------------------------- router training (§3.2, D.3)
TRAIN_SETTINGS = ("preference", "experts", "seed", "batch_size", "samples_per_prompt", "max_new_tokens", "lr", "beta",
                  "grad_clip", "alpha", "top_k", "ideal")


@torch.no_grad()
def routed_sample(model, input_ids, attention_mask, args, generator):
    """scst_step's sampler for HoE: top-k at temperature 1 through the routed modules (nothing to merge)."""
    return t5.generate(model, input_ids, attention_mask, do_sample=True, temperature=1.0, top_k=args.top_k,
                       max_new_tokens=args.max_new_tokens, generator=generator, repeat=args.samples_per_prompt)[0]


def prompt_batch(prompts, state, batch_size, seed) -> list[str]:
    """The next batch of a seeded reshuffle per epoch (as scst.TrainingRun.next_batch); moves state's cursor."""
    batch = []
    while len(batch) < batch_size:
        order = list(range(len(prompts)))
        random.Random(seed * 100_003 + state["epoch"]).shuffle(order)
        take = order[state["cursor"]:state["cursor"] + batch_size - len(batch)]
        batch += [prompts[i] for i in take]
        state["cursor"] += len(take)
        if state["cursor"] >= len(prompts):
            state["epoch"], state["cursor"] = state["epoch"] + 1, 0
    return batch


def train_router(model, tokenizer, scorers, hoe: HoE, preference, prompts, args, out_dir) -> dict:
    """Train the router expert at `preference` (Eq. 5 with STCH, Eq. 17-19) for args.steps SCST steps; the
    checkpoint (router, optimiser, log w, data cursor, RNGs) is written atomically every args.save_every steps,
    and a rerun resumes from it. Writes router.safetensors and summary.json at the end."""
    if not prompts:
        raise InputError("the training split is empty: give more data or a larger --sample")
    os.makedirs(out_dir, exist_ok=True)
    torch.manual_seed(args.seed)
    router = new_router(model, hoe, preference, args.neighbours or len(hoe.objectives))
    optimizer = torch.optim.AdamW(router.parameters(), lr=args.lr)
    generator = torch.Generator(device=args.device).manual_seed(args.seed)
    settings = {k: getattr(args, k, None) for k in TRAIN_SETTINGS} | {"preference": list(preference), "experts": router.experts}
    d = len(hoe.objectives)
    state = {"step": 0, "epoch": 0, "cursor": 0, "elapsed": 0.0, "log_w": [-math.log(d)] * d, "log_sizes": {}}
    checkpoint_path = os.path.join(out_dir, "checkpoint.pt")
    if os.path.exists(checkpoint_path):
        state = restore(checkpoint_path, settings, router, optimizer, generator, out_dir, args)
        tqdm.write(f"resuming {out_dir} at step {state['step']}")
    else:
        for log_name in ("train.jsonl", "train.log"):
            if os.path.exists(os.path.join(out_dir, log_name)):
                os.remove(os.path.join(out_dir, log_name))
    step_args = _step_args(args)
    me = Expert(os.path.basename(out_dir), list(preference), router)
    started = time.time() - state["elapsed"]
    bar = tqdm(initial=state["step"], total=args.steps, unit="step", desc=f"hoe train {me.name}", dynamic_ncols=True)
    while state["step"] < args.steps:
        step_start = time.time()
        w = stch_weights(torch.tensor(state["log_w"]))
        weights = dict(zip(hoe.objectives, w.tolist()))
        batch = prompt_batch(prompts, state, args.batch_size, args.seed)
        with routed(model, [(1.0, me)]):                           # the router alone (ω_r = 1 on itself)
            stats = scst.scst_step(model, tokenizer, scorers, optimizer, batch, weights, step_args, generator,
                                   sample=routed_sample, parameters=list(router.parameters()))
        rewards = [stats["scores"][n] for n in hoe.objectives]
        state["log_w"] = stch_update(state["log_w"], preference, rewards, args.alpha, args.ideal).tolist()  # Eq. (18)
        state["step"] += 1
        bar.update(1)
        record = {"type": "step", "step": state["step"], "loss": stats["loss"], "reward": stats["reward"], "kl": stats["kl"],
                  "scores": stats["scores"], "weights": weights,
                  "weighted_score": sum(p * r for p, r in zip(preference, rewards)), "seconds": round(time.time() - step_start, 3)}
        log(out_dir, state, record, f"step {state['step']} | reward {stats['reward']:.4f} | λ·R {record['weighted_score']:.4f} | "
                                    f"w {' '.join(f'{x:.3f}' for x in w.tolist())} | kl {stats['kl']:.4f} | {record['seconds']:.2f}s")
        if state["step"] % args.save_every == 0 or state["step"] == args.steps:
            state["elapsed"] = time.time() - started
            save(checkpoint_path, settings, state, router, optimizer, generator)
    bar.close()
    files.save_safetensors(router.tensors(), os.path.join(out_dir, "router.safetensors"))
    summary = {"preference": list(preference), "experts": router.experts, "steps": state["step"],
               "data_points": state["step"] * args.batch_size, "wall_seconds": round(state["elapsed"], 2),
               "trainable_parameters": sum(p.numel() for p in router.parameters()), "final_log_w": state["log_w"],
               "settings": settings}
    files.write_json(os.path.join(out_dir, "summary.json"), summary)
    return summary


def _step_args(args):
    """scst_step's settings: raw scores combined linearly ('mean'), so its SCST advantage is Σ_i w_i A_i (Eq. 19)."""
    import argparse
    return argparse.Namespace(device=args.device, samples_per_prompt=args.samples_per_prompt, combine="mean",
                              beta=args.beta, grad_clip=args.grad_clip, top_k=args.top_k,
                              max_new_tokens=args.max_new_tokens, objective=None)


def log(out_dir, state, record, line):
    for log_name, text in (("train.jsonl", json.dumps(record) + "\n"), ("train.log", line + "\n")):
        path = os.path.join(out_dir, log_name)
        with open(path, "a", encoding="utf-8") as f:
            f.write(text)
        state["log_sizes"][log_name] = os.path.getsize(path)
    tqdm.write(line)


def save(path, settings, state, router, optimizer, generator):
    buffer = io.BytesIO()
    torch.save({"settings": settings, "state": state, "router": router.tensors(), "optimizer": optimizer.state_dict(),
                "torch_rng": torch.get_rng_state(), "generator": generator.get_state()}, buffer)
    files.atomic_write(path, buffer.getvalue())


def restore(path, settings, router, optimizer, generator, out_dir, args) -> dict:
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        saved, state = checkpoint["settings"], checkpoint["state"]
    except Exception as e:                                  # noqa: BLE001 - any unpickling failure
        raise InputError(f"{path}: unreadable checkpoint ({type(e).__name__}); delete it to restart") from None
    scst.check_settings(path, saved, settings, out_dir)           # one line naming the flag, as train's resume
    if args.steps < state["step"]:
        raise InputError(f"{path}: --steps {args.steps} is below the {state['step']} steps already done")
    router.load_tensors(checkpoint["router"], path)
    optimizer.load_state_dict(checkpoint["optimizer"])
    torch.set_rng_state(checkpoint["torch_rng"])
    generator.set_state(checkpoint["generator"])
    for log_name, size in state["log_sizes"].items():       # drop log lines written after the checkpoint
        if os.path.exists(os.path.join(out_dir, log_name)):
            with open(os.path.join(out_dir, log_name), "r+b") as f:
                f.truncate(size)
    return state


# ----------------------------------------------------------------------------- evaluation (App. E.5, Table 3)
def preference_label(preference) -> str:
    return ",".join(f"{x:.2f}".rstrip("0").rstrip(".") for x in preference)


def evaluate_hoe(load_policy, scorers, prompts, folder, preferences, objectives, batch_size=16, device="cpu"):
    """HoE at each preference on `prompts`, greedy (App. E.5): ({"hoe λ": [metrics row]}, report). The report
    (evaluate's OUT-hoe.json) holds each preference's plan, scores and relative inference cost (Table 3: HoE's decode
    seconds / the seconds of one model, the base policy decoding the same prompts greedily, timed in the same run),
    and the consumption (data points, seconds, trainable parameters)."""
    model, tokenizer = load_policy()
    hoe = load_hoe(model, folder)
    if list(hoe.objectives) != list(objectives):
        raise InputError(f"{folder}/hoe.json was built for {','.join(hoe.objectives)}, not {','.join(objectives)}")
    manifest = files.read_json(os.path.join(folder, "hoe.json"))
    sources = [files.read_json(os.path.join(s, "summary.json")) for s in manifest.get("sources", [])
               if os.path.exists(os.path.join(s, "summary.json"))]
    cost = consumption(hoe, sources)
    started = time.perf_counter()
    evaluate.generate_texts(model, tokenizer, prompts, batch_size, device, adapter=None)   # one model: the base policy
    one_model_seconds = time.perf_counter() - started
    rows, report = {}, {"objectives": list(objectives), "prompts": len(prompts), "one_model_seconds": round(one_model_seconds, 3),
                        "consumption": cost, "routers": [e.name for e in hoe.routers], "preferences": []}
    for preference in tqdm(preferences, desc="hoe", unit="preference"):
        started = time.perf_counter()
        texts = decode_at(model, tokenizer, prompts, preference, hoe, batch_size, device)
        seconds = time.perf_counter() - started
        row = evaluate.metrics(scorers, prompts, texts, objectives)
        plan = routing_plan(hoe, preference)
        report["preferences"].append({"preference": preference, "plan": [[w, e.name] for w, e in plan],
                                      "scores": {n: row[n] for n in objectives},
                                      "weighted": weighted_score(row, objectives, preference), "seconds": round(seconds, 3),
                                      "relative_inference_cost": round(seconds / one_model_seconds, 3)})
        row.update({k: cost[k] for k in ("data points", "seconds")}, seed=None, run=0, decoding="greedy")
        rows[f"hoe {preference_label(preference)}"] = [row]
        tqdm.write(f"hoe {preference_label(preference)} | " + " | ".join(f"{n} {row[n]:.4f}" for n in objectives) +
                   f" | {seconds:.2f}s ({seconds / one_model_seconds:.2f}x one model)")
    return rows, report
