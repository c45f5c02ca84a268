"""IterativeRS, Iterative Rewarded Soups ([IRS] = ../shared/papers/iterative-rewarded-soups.txt: §4.1,
Eq. 8-10, Algorithm 1; B.3 selective merging) on this project's T5, LoRA, scorers and SCST:
`python emorl.py train iterative`.

Why a module of its own: the round loop (train one expert per objective for m steps, merge the experts
into a soup, restart every expert from the soup), the soup and its resume are maths and state that no
other method has. The SCST step, the validation and the data order are scst.py's (scst_step, validate,
next_batch), the adapters lora.py's.

One run is one policy, for one preference w (N objectives, T = --max-steps, m = --merge-every, M = --subset):

    soup Δ = 0
    for round r = 1 .. R = T / m:                                    (the authors' code form, see below)
        S_r = M objectives, uniform without replacement, seeded       Eq. (8)-(9); all N when M = N
        for i in S_r: a fresh LoRA adapter (B = 0) on W0 + Δ, so expert i starts at the soup;
                      m SCST steps on objective i alone, a new AdamW; KL reference = W0 (soup off)
                                                                      Eq. (8), Alg. 1 line 9
        Δ ← Δ + Σ_{i∈S_r} λ_i · s · B_i A_i,  λ_i = w_i / Σ_{j∈S_r} w_j  Eq. (9)-(10), Alg. 1 line 6
              (--selective: λ = the best of B.3's candidate sets by mean reward on training prompts)
        validate W0 + Δ                                               (train.jsonl: merge + validation)
    output W0 + Δ: runs/iterative-<seed>/soup.safetensors             Alg. 1 lines 11-12

The soup on LoRA: an expert starts its round at θ = ρ (Eq. 8), so θ_i = ρ + s·B_i A_i and
ρ' = Σ_i λ_i θ_i = ρ + Σ_i λ_i s·B_i A_i exactly (Σ λ_i = 1). That sum is not of rank r, and averaging
the A's and B's separately is another merge (cross terms), so Δ is kept dense and frozen, one
[out, in] tensor per LoRA-targeted layer: in the weights (W = W0 + Δ) while the experts train, and in
one safetensors file (load_soup reads it back strictly, for evaluate's `iterative` row).
The two limits: m = T is Rewarded Soups at λ = w, the parameter-level merge of adapters trained
independently with the same seed and steps (tested); m = 1 approaches MORLHF (single-policy RL on
Σ w_i r_i) only in expectation (each expert draws its own samples, AdamW is not SGD).

Deviations from the paper / public code (docs/fidelity.md, "IterativeRS"):
- Rounds as the authors' code runs them (summarize_from_feedback/iterativers_reddit.sh, MPRA/iterativers.py):
  R = T/m rounds of exactly m steps, a merge after each, the last merge is the output; Algorithm 1 read
  literally runs m − 1 steps before its first merge and merges once more after t = T.
- SCST (k samples, mean baseline, full-distribution KL, scst.py) instead of PPO: critic-free, like their
  RLOO runs (B.4, Table 5); no value heads to carry across rounds.
- LoRA experts on a dense soup (above); the paper and code merge full parameters. A new round's A is
  drawn from the expert's own RNG stream (B = 0, so it does not change the starting policy).
- Every expert keeps its own streams across rounds (data order, sampling generator, dropout RNG), the very
  ones `train <objective> --seed S` uses: with m = T the experts are the independent adapters bit for bit.
- The merge runs over S_r with λ renormalised (Eq. 9-10); their MPRA code merges all N expert files with w,
  the stale weights of experts not drawn included (identical when M = N, every experiment of the paper).
- Selective merging: B.3's candidate sets generalised to any M (uniform; 1/6 on one objective; 2/3 on
  one: B.3's seven sets, in their code's order, when M = 3), each scored by this project's validation
  (k top-k samples per prompt, clipped scores, mean over all N objectives) on the first --select-prompts
  training prompts, one seeded draw for every candidate of a round; the last round is chosen on the
  validation prompts (B.3: the final model on validation).
- No convergence rule: a fixed T, as the paper. A kill -9 loses at most the expert round in progress.
"""
from __future__ import annotations

import copy
import io
import json
import os
import random
import time
from contextlib import contextmanager

import torch
from tqdm import tqdm

import files
import lora
import scst
import search
from files import InputError

METHOD = "iterative"
SOUP_FILE, CONFIG_FILE, CHECKPOINT = "soup.safetensors", "soup_config.json", "checkpoint.pt"
SETTINGS = ("seed", "batch_size", "samples_per_prompt", "max_new_tokens", "lr", "beta", "grad_clip", "combine", "top_k",
            "max_steps", "merge_every", "subset", "selective", "select_prompts")


# ----------------------------------------------------------------------------- pure pieces
def check_plan(objectives, weights, merge_every: int, max_steps: int, subset: int | None) -> tuple[list[float], int]:
    """The flags of one run -> (w, M); a plan Algorithm 1 cannot run is a one-line InputError."""
    n = len(objectives)
    if n < 2:
        raise InputError(f"train {METHOD}: --objectives needs at least 2 objectives to merge")
    if merge_every < 1 or max_steps < 1:
        raise InputError(f"--merge-every {merge_every} / --max-steps {max_steps}: both must be positive")
    if max_steps % merge_every:
        raise InputError(f"--merge-every {merge_every} does not divide --max-steps {max_steps}: IterativeRS runs "
                         f"T/m rounds of exactly m steps")
    subset = n if subset is None else subset
    if not 1 <= subset <= n:
        raise InputError(f"--subset {subset}: must be from 1 to the {n} objectives of --objectives")
    if weights is None:
        weights = [1.0 / n] * n
    elif isinstance(weights, str):
        weights = search.parse_weights(weights, n)
    weights = search.check_weights(weights, n, what="--weights")
    if sum(sorted(weights)[:subset]) == 0:
        raise InputError(f"--weights {','.join(f'{w:g}' for w in weights)}: a draw of {subset} objectives could have "
                         "only zero weights (Eq. 10 divides by their sum)")
    return weights, subset


def merge_coefficients(weights: dict[str, float], drawn: list[str]) -> dict[str, float]:
    """Eq. (10): λ_i = w_i / Σ_{j∈S} w_j for the drawn objectives i ∈ S."""
    total = sum(weights[name] for name in drawn)
    return {name: weights[name] / total for name in drawn}


def draw_subsets(objectives, subset: int, rounds: int, seed: int) -> list[list[str]]:
    """S_1 .. S_R: M objectives per round, uniform without replacement ([IRS] App. A, before Eq. 39), from one
    seeded stream (their MPRA/iterativers.py: random.seed, then random.sample per round), each listed in
    --objectives order. M = N: every objective, every round."""
    if subset == len(objectives):
        return [list(objectives) for _ in range(rounds)]
    rng = random.Random(seed)
    drawn = [set(rng.sample(range(len(objectives)), subset)) for _ in range(rounds)]
    return [[name for i, name in enumerate(objectives) if i in chosen] for chosen in drawn]


def candidate_coefficients(drawn: list[str]) -> list[dict[str, float]]:
    """Selective merging's candidate λ ([IRS] B.3): uniform, then 1/6 on one objective (the rest share 5/6),
    then 2/3 on one (the rest share 1/3). For three objectives these are B.3's seven sets, in the order of
    their summarize_from_feedback/merge_iterativers.py."""
    m = len(drawn)
    if m == 1:
        return [{drawn[0]: 1.0}]
    sets = [[1.0 / m] * m]
    sets += [[1 / 6 if j == i else 5 / (6 * (m - 1)) for j in range(m)] for i in range(m)]
    sets += [[2 / 3 if j == i else 1 / (3 * (m - 1)) for j in range(m)] for i in reversed(range(m))]
    return [dict(zip(drawn, values)) for values in sets]


# ----------------------------------------------------------------------------- the soup
class Soup:
    """The accumulated merge Δ (dense, frozen) of every LoRA-targeted layer, and the model's weights W = W0 + Δ."""

    def __init__(self, model, targets=lora.DEFAULT_TARGETS):
        self.targets = list(targets)
        self.fingerprint = lora.base_fingerprint(model)          # of W0, before any soup
        self.weights = {path: m.weight for path, m in lora._targeted(model, targets)}
        self.base = {path: w.detach().clone() for path, w in self.weights.items()}
        self.delta = {path: torch.zeros_like(w) for path, w in self.base.items()}

    @torch.no_grad()
    def apply(self, delta=None):
        """W ← W0 + Δ (or a candidate Δ): the policy every expert of the next round starts from."""
        for path, weight in self.weights.items():
            weight.copy_(self.base[path] + (self.delta if delta is None else delta)[path])

    @torch.no_grad()
    def merged(self, model, coefficients: dict[str, float]) -> dict[str, torch.Tensor]:
        """Eq. (9) on LoRA: Δ + Σ_i λ_i · s_i · B_i A_i over the experts' adapters (summed in the given order)."""
        delta = {path: d.clone() for path, d in self.delta.items()}
        for path, module in lora._layers(model):
            for name, weight in coefficients.items():
                delta[path].add_((weight * module.scaling(name)) * (module.lora_B[name] @ module.lora_A[name]))
        return delta

    @contextmanager
    def off(self, model):
        """π_ref of the KL term: the ORIGINAL base, every adapter off and W = W0 (the soup off too, Eq. 2 of
        [IRS], their ref_model = the pre-trained model); W0 + Δ comes back after, bit for bit."""
        with lora.adapters_disabled(model):
            with torch.no_grad():
                for path, weight in self.weights.items():
                    weight.copy_(self.base[path])
            try:
                yield model
            finally:
                self.apply()

    def save(self, run_dir: str, delta, rounds: int, merge: dict):
        """soup.safetensors: Δ as <module path>.weight, the base's fingerprint, the merges it holds and the last one."""
        metadata = {"format": "pt", lora.FINGERPRINT_KEY: json.dumps(self.fingerprint), "rounds": str(rounds),
                    "merge": json.dumps(merge)}
        files.save_safetensors({f"{path}.weight": d for path, d in delta.items()}, os.path.join(run_dir, SOUP_FILE), metadata)


def read_soup(path: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) of a soup file; a missing or corrupt one is an InputError."""
    from safetensors import safe_open
    tensors = files.load_safetensors(path)
    with safe_open(path, "pt") as f:
        return tensors, f.metadata() or {}


@torch.no_grad()
def load_soup(model, run_dir: str) -> dict:
    """W ← W0 + Δ from RUN/soup.safetensors and RUN/soup_config.json, strictly: the base's fingerprint, every
    targeted layer's key and shape, finite values (a wrong file names its problem). Returns the config."""
    config_path, path = os.path.join(run_dir, CONFIG_FILE), os.path.join(run_dir, SOUP_FILE)
    config = files.read_json(config_path)
    if not isinstance(config, dict) or config.get("method") != METHOD or not config.get("target_modules"):
        raise InputError(f"{config_path}: not an IterativeRS soup config (method '{METHOD}' and target_modules expected)")
    tensors, metadata = read_soup(path)
    saved = metadata.get(lora.FINGERPRINT_KEY)
    if saved is None or not lora._same_base(saved, lora.base_fingerprint(model)):
        raise InputError(f"{path}: soup was made on another base model (base fingerprint differs or is missing)")
    if metadata.get("rounds") != str(config.get("rounds")):
        raise InputError(f"{path}: holds {metadata.get('rounds')} merges, {config_path} says {config.get('rounds')}")
    layers = {f"{p}.weight": m for p, m in lora._targeted(model, config["target_modules"])}
    missing, unexpected = [k for k in layers if k not in tensors], [k for k in tensors if k not in layers]
    if missing or unexpected:
        raise InputError(f"{path}: " + (f"missing key {missing[0]}" if missing else f"unexpected key {unexpected[0]}"))
    for key, module in layers.items():
        if tuple(tensors[key].shape) != tuple(module.weight.shape):
            raise InputError(f"{path}: key {key} has shape {tuple(tensors[key].shape)}, the model expects "
                             f"{tuple(module.weight.shape)}")
        if not torch.isfinite(tensors[key]).all():
            raise InputError(f"{path}: key {key} holds NaN or infinite values")
    for key, module in layers.items():
        module.weight.add_(tensors[key].to(module.weight))
    return config


# ----------------------------------------------------------------------------- one expert, one round
def fresh_stream(seed: int, device: str) -> dict:
    """An expert's RNG streams and data cursor at step 0: what `scst.train` seeds for `train <objective>`."""
    torch.manual_seed(seed)
    return {"torch_rng": torch.get_rng_state(), "generator": torch.Generator(device=device).manual_seed(seed).get_state(),
            "epoch": 0, "cursor": 0}


def train_expert(model, tokenizer, scorers, soup: Soup, name: str, stream: dict, examples, args, on_step) -> dict:
    """Eq. (8): m SCST steps on objective `name` alone from θ = ρ (a fresh adapter on W0 + Δ), a new AdamW
    (their code builds one per round), KL to the original base (soup.off). Advances `stream`; returns the
    adapter's tensors."""
    torch.set_rng_state(stream["torch_rng"])
    lora.add_adapter(model, name)                                  # B = 0: the expert starts at the soup
    optimizer = torch.optim.AdamW(lora.adapter_parameters(model, name), lr=args.lr)
    generator = torch.Generator(device=args.device)
    generator.set_state(stream["generator"])
    expert_args = copy.copy(args)
    expert_args.objective = name
    for _ in range(args.merge_every):
        started = time.time()
        seed = scst.run_seed(args.seed, name)                      # the stream `train <name> --seed S` draws
        batch, stream["epoch"], stream["cursor"] = scst.next_batch(examples, args.batch_size, seed,
                                                                   stream["epoch"], stream["cursor"])
        stats = scst.scst_step(model, tokenizer, scorers, optimizer, [e.prompt for e in batch], {name: 1.0},
                               expert_args, generator, reference=soup.off)
        on_step(stats, time.time() - started)
    stream["torch_rng"], stream["generator"] = torch.get_rng_state(), generator.get_state()
    return {n: p.detach().cpu().clone() for n, p in scst.adapter_tensors(model, name)}


@torch.no_grad()
def put_adapter(model, name: str, tensors: dict):
    """Adapter `name` with the given tensors (an expert finished before a resume), for the merge."""
    if name not in lora.adapter_names(model):
        lora.add_adapter(model, name)
    for n, p in scst.adapter_tensors(model, name):
        p.copy_(tensors[n])


def validate_soup(model, tokenizer, scorers, prompts, args, step: int, objectives) -> dict:
    """scst.validate on W0 + Δ with every adapter off; reward = mean of the objectives' clipped scores."""
    eval_args = copy.copy(args)
    eval_args.objective = None
    scores = scst.validate(model, tokenizer, scorers, prompts, eval_args, step)
    return {"scores": scores, "reward": sum(scores[n] for n in objectives) / len(objectives)}


# ----------------------------------------------------------------------------- the run
class Log:
    """train.jsonl + train.log, append-only; their sizes go in the checkpoint so a resume drops what came after."""

    def __init__(self, run_dir: str):
        self.run_dir, self.sizes = run_dir, {"train.jsonl": 0, "train.log": 0}

    def write(self, record: dict, line: str):
        for name, text in (("train.jsonl", json.dumps(record) + "\n"), ("train.log", line + "\n")):
            path = os.path.join(self.run_dir, name)
            with open(path, "a", encoding="utf-8") as f:
                f.write(text)
            self.sizes[name] = os.path.getsize(path)
        tqdm.write(line)

    def truncate(self, sizes: dict | None):
        """Back to the checkpoint's sizes (None: no checkpoint, start the logs afresh)."""
        for name in self.sizes:
            path = os.path.join(self.run_dir, name)
            if sizes is None and os.path.exists(path):
                os.remove(path)
            elif sizes is not None and os.path.exists(path):
                with open(path, "r+b") as f:
                    f.truncate(sizes[name])
        self.sizes = dict(sizes or self.sizes)


def run_settings(args, model, train_examples, validation_prompts) -> dict:
    """What a resume must share with the start: the flags of the result, the data and the base model."""
    settings = {key: getattr(args, key, None) for key in SETTINGS}
    shared = scst.run_settings(args, model, train_examples, validation_prompts)
    settings.update(objectives=list(args.objectives), weights=list(args.weights), data=shared["data"], policy=shared["policy"])
    return settings


def save_checkpoint(run_dir: str, state: dict):
    buffer = io.BytesIO()
    torch.save(state, buffer)
    files.atomic_write(os.path.join(run_dir, CHECKPOINT), buffer.getvalue())


def load_checkpoint(run_dir: str, settings: dict) -> dict | None:
    path = os.path.join(run_dir, CHECKPOINT)
    if not os.path.exists(path):
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        saved = state["settings"]
    except Exception as e:                                # noqa: BLE001 - any unpickling failure
        raise InputError(f"{path}: unreadable checkpoint ({type(e).__name__}); delete it to restart the run") from None
    scst.check_settings(path, saved, settings, run_dir)           # one line naming the flag, as train's resume
    return state


def train_iterative(model, tokenizer, scorers: dict, train_examples: list, validation_prompts: list, args,
                    run_dir: str) -> dict:
    """IterativeRS (module docstring) into run_dir, resumable after a kill; returns summary.json's content.

    args: objectives (list), weights (list or None: uniform), merge_every, max_steps, subset (None: all),
    selective (bool), select_prompts, seed, device, policy, and scst's batch_size, samples_per_prompt,
    max_new_tokens, lr, beta, grad_clip, combine, top_k. `scorers` holds every objective's scorer (more are
    recorded in the validations)."""
    args = copy.copy(args)
    args.objectives = list(args.objectives)
    args.weights, args.subset = check_plan(args.objectives, args.weights, args.merge_every, args.max_steps, args.subset)
    if not train_examples or not validation_prompts:
        raise InputError("the training or validation (aggregation) split is empty: give more data or a larger --sample")
    if missing := [n for n in args.objectives if n not in scorers]:
        raise InputError(f"no scorer for objective {missing[0]!r}")
    objectives, m = args.objectives, args.merge_every
    rounds = args.max_steps // m
    weights = dict(zip(objectives, args.weights))
    subsets = draw_subsets(objectives, args.subset, rounds, args.seed)
    os.makedirs(run_dir, exist_ok=True)
    model.eval()
    soup = Soup(model)
    settings = run_settings(args, model, train_examples, validation_prompts)
    log = Log(run_dir)
    state = load_checkpoint(run_dir, settings)
    log.truncate(None if state is None else state["log_sizes"])
    if state is None:
        if os.path.exists(os.path.join(run_dir, SOUP_FILE)):          # leftover of a run killed before its first checkpoint
            os.remove(os.path.join(run_dir, SOUP_FILE))
        state = {"settings": settings, "round": 0, "experts": {}, "expert_seconds": {},
                 "streams": {n: fresh_stream(scst.run_seed(args.seed, n), args.device) for n in objectives},
                 "elapsed": 0.0, "rounds": [], "validations": [], "log_sizes": log.sizes}
    else:
        tensors, metadata = read_soup(os.path.join(run_dir, SOUP_FILE))
        soup.delta = {path: tensors[f"{path}.weight"].to(soup.base[path]) for path in soup.base}
        soup.apply()
        tqdm.write(f"resuming {run_dir} in round {state['round'] + 1} of {rounds} "
                   f"({len(state['experts'])} expert(s) of it done)")
    files.write_json(os.path.join(run_dir, CONFIG_FILE), {
        "method": METHOD, "target_modules": soup.targets, "objectives": objectives, "weights": args.weights,
        "merge_every": m, "max_steps": args.max_steps, "rounds": rounds, "subset": args.subset,
        "selective": bool(args.selective), "base_model_name_or_path": getattr(args, "policy", "")})
    started = time.time() - state["elapsed"]

    def checkpoint():
        state["elapsed"], state["log_sizes"] = time.time() - started, dict(log.sizes)
        save_checkpoint(run_dir, state)

    if not state["validations"]:                                        # step 0: the base model, for the curve
        clock = time.time()
        result = validate_soup(model, tokenizer, scorers, validation_prompts, args, 0, objectives)
        state["validations"].append({"round": 0, "step": 0, **result, "seconds": round(time.time() - clock, 3)})
        log.write({"type": "validation", "round": 0, "step": 0, **result},
                  f"val  round 0 | step 0 | reward {result['reward']:.4f} | " +
                  " ".join(f"{n} {v:.4f}" for n, v in result["scores"].items()))
        checkpoint()
    bar = tqdm(total=sum(len(s) for s in subsets) * m, initial=sum(len(s) for s in subsets[:state["round"]]) * m
               + len(state["experts"]) * m, unit="step", desc=f"train {METHOD}", dynamic_ncols=True)
    while state["round"] < rounds:
        r, drawn = state["round"], subsets[state["round"]]
        for name in drawn:                                              # Eq. (8): each expert alone, from the soup
            if name in state["experts"]:
                continue
            clock, done = time.time(), {"n": 0}

            def on_step(stats, seconds, name=name, done=done):
                done["n"] += 1
                step = r * m + done["n"]
                bar.update(1)
                log.write({"type": "step", "round": r + 1, "objective": name, "step": step, **stats,
                           "seconds": round(seconds, 3)},
                          f"step {step} | round {r + 1} | {name} | loss {stats['loss']:.4f} | reward {stats['reward']:.4f} "
                          f"| kl {stats['kl']:.4f} | {seconds:.2f}s")
            state["experts"][name] = train_expert(model, tokenizer, scorers, soup, name, state["streams"][name],
                                                  train_examples, args, on_step)
            state["expert_seconds"][name] = time.time() - clock
            checkpoint()
        clock = time.time()
        merge = merge_round(model, tokenizer, scorers, soup, state, drawn, weights, r, rounds, train_examples,
                            validation_prompts, args, run_dir)
        merge_seconds = time.time() - clock
        clock = time.time()
        step = (r + 1) * m
        result = validate_soup(model, tokenizer, scorers, validation_prompts, args, step, objectives)
        record = {"round": r + 1, "step": step, "subset": drawn, "coefficients": merge["coefficients"],
                  "candidates": merge.get("candidates"), "expert_seconds": dict(state["expert_seconds"]),
                  "merge_seconds": round(merge_seconds, 3), "validation_seconds": round(time.time() - clock, 3)}
        state["rounds"].append(record)
        state["validations"].append({"round": r + 1, "step": step, **result})
        log.write({"type": "merge", **record},
                  f"merge round {r + 1} | {' '.join(f'{n} {c:.4f}' for n, c in merge['coefficients'].items())}")
        log.write({"type": "validation", "round": r + 1, "step": step, **result},
                  f"val  round {r + 1} | step {step} | reward {result['reward']:.4f} | " +
                  " ".join(f"{n} {v:.4f}" for n, v in result["scores"].items()))
        state.update(round=r + 1, experts={}, expert_seconds={})
        checkpoint()
    bar.close()
    return write_summary(run_dir, state, args, rounds, len(train_examples), validation_prompts, time.time() - started)


def merge_round(model, tokenizer, scorers, soup: Soup, state, drawn, weights, r, rounds, train_examples,
                validation_prompts, args, run_dir) -> dict:
    """Eq. (9)-(10) (or B.3's selection): Δ ← Δ + Σ λ_i s B_i A_i into soup.safetensors, then W = W0 + Δ.
    A kill after the file is written and before the checkpoint finds the merge done in the file's metadata."""
    path = os.path.join(run_dir, SOUP_FILE)
    if os.path.exists(path):
        tensors, metadata = read_soup(path)
        if metadata.get("rounds") == str(r + 1):                        # merged before the kill: take it as it is
            soup.delta = {p: tensors[f"{p}.weight"].to(soup.base[p]) for p in soup.base}
            soup.apply()
            return json.loads(metadata["merge"])
        if metadata.get("rounds") != str(r):
            raise InputError(f"{path}: holds {metadata.get('rounds')} merges, the checkpoint {r}; delete {run_dir} to restart")
    for name in drawn:
        put_adapter(model, name, state["experts"][name])
    merge = {"coefficients": merge_coefficients(weights, drawn)}
    if args.selective:
        final = r + 1 == rounds                          # B.3: the last merge is chosen on the validation prompts
        prompts = validation_prompts if final else [e.prompt for e in train_examples[:args.select_prompts]]
        judges = {n: scorers[n] for n in args.objectives}
        scored = []
        for coefficients in candidate_coefficients(drawn):
            soup.apply(soup.merged(model, coefficients))
            result = validate_soup(model, tokenizer, judges, prompts, args, -(r + 1), args.objectives)
            scored.append({"coefficients": coefficients, "reward": result["reward"]})
        best = max(range(len(scored)), key=lambda i: (scored[i]["reward"], -i))  # the first of the best
        merge = {"coefficients": scored[best]["coefficients"], "candidates": scored,
                 "selection_prompts": len(prompts), "selected_on": "validation" if final else "training"}
    delta = soup.merged(model, merge["coefficients"])
    soup.save(run_dir, delta, r + 1, merge)
    soup.delta = delta
    soup.apply()
    return merge


def write_summary(run_dir, state, args, rounds, num_train, validation_prompts, elapsed) -> dict:
    """Consumption as the other methods count it: data points = Σ_rounds Σ_{i∈S_r} m × batch (+ the prompts
    selective merging scores, as EMORL counts its search); seconds serial, and Eq. (3)-style parallel: the
    experts of a round side by side, rounds in sequence (Σ_r max_i T(r, i) + merge + validation)."""
    m = args.merge_every
    steps = sum(len(record["subset"]) * m for record in state["rounds"])
    selection = sum(len(rec["candidates"]) * (len(validation_prompts) if i + 1 == rounds else min(args.select_prompts, num_train))
                    for i, rec in enumerate(state["rounds"]) if rec["candidates"])
    parallel = state["validations"][0].get("seconds", 0.0) + sum(
        max(rec["expert_seconds"].values()) + rec["merge_seconds"] + rec["validation_seconds"] for rec in state["rounds"])
    summary = {"objective": METHOD, "objectives": list(args.objectives), "weights": list(args.weights), "seed": args.seed,
               "merge_every": m, "max_steps": args.max_steps, "rounds": rounds, "subset": args.subset,
               "selective": bool(args.selective), "steps": steps, "data_points": steps * args.batch_size + selection,
               "selection_prompts": selection, "wall_seconds": round(elapsed, 2), "parallel_seconds": round(parallel, 2),
               "initial_validation": state["validations"][0]["scores"], "final_validation": state["validations"][-1]["scores"],
               "initial_reward": state["validations"][0]["reward"], "final_reward": state["validations"][-1]["reward"],
               "validation_prompts": len(validation_prompts), "policy": getattr(args, "policy", ""),
               "hyperparameters": {k: getattr(args, k, None) for k in SETTINGS}}
    files.write_json(os.path.join(run_dir, "summary.json"), summary)
    return summary


def command(args, known):
    """`train iterative`: IterativeRS (Algorithm 1) into RUNS/iterative-<seed>/, skipped when finished."""
    import emorl
    if "," in args.device:
        raise InputError(f"--device {args.device}: train iterative runs on one device")
    args.weights, args.subset = check_plan(args.objectives, args.weights, args.merge_every, args.max_steps, args.subset)
    run_dir = os.path.join(args.runs, f"iterative-{args.seed}")
    emorl.prepare_output(run_dir, f"--runs {args.runs}")
    if os.path.exists(os.path.join(run_dir, "summary.json")):
        print(f"{run_dir}: already finished (summary.json); delete the folder to train again")
        return
    splits = emorl.load_splits(args)
    validation_prompts = [e.prompt for e in splits["aggregation"][: args.val_prompts]]
    scorers = emorl.load_scorers(args, list(dict.fromkeys([*emorl.SCORER_NAMES, *args.objectives])), known)
    model, tokenizer = emorl.load_policy(args)
    summary = train_iterative(model, tokenizer, scorers, splits["train"], validation_prompts, args, run_dir)
    print(f"iterative: {summary['rounds']} rounds of {summary['merge_every']} steps, {summary['data_points']} data points, "
          f"{summary['wall_seconds']:.1f}s serial, {summary['parallel_seconds']:.1f}s parallel (Eq. 3), reward "
          f"{summary['initial_reward']:.4f} -> {summary['final_reward']:.4f}  ({run_dir})", flush=True)


def compare_point(world, index, preference) -> dict | None:
    """compare's `iterative` row (compare.py): one run at w = λ with --merge-every m and --iterative-steps T, only at
    the λ --single-policy-budget picks (compare.budgeted_run: OUT/seed-<s>/compare/runs/iterative-pref<i>-<s>/,
    resumed if killed); its soup decoded at λ as evaluate's `iterative` row (a fresh base, load_soup, no adapter)."""
    import compare
    import emorl
    run = compare.budgeted_run(world, index, f"{METHOD}-pref{index}", train_iterative, objective=METHOD, weights=list(preference),
                               max_steps=world.args.iterative_steps, subset=None, selective=False, select_prompts=None)
    if run is None:
        return None
    run_dir, summary = run
    model, _ = emorl.load_policy(world.args)
    load_soup(model, run_dir)
    row = compare.measure(world._replace(model=model), preference)
    return {**row, "data points": summary["data_points"], "seconds": round(summary["wall_seconds"] + row["decode seconds"], 3),
            "parallel seconds": round(summary["parallel_seconds"] + row["decode seconds"], 3)}
