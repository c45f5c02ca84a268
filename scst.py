"""Self-critical sequence training (SCST) with a KL penalty, one LoRA adapter per objective.

Paper: §4 (training stage), §5.2 (implementation), Eq. (4) (LoRA); SPEC §2 has every number; where the
paper is silent this follows the authors' el_training.py (README "Fidelity to the authors' code").
For each training prompt: sample k = 3 responses with the adapter on (temperature 1, top-50, ≤ 64
tokens), score them, reward r = Σ_i w_i log clip(s_i, 1e-4, 0.9999) ("logsum", one term for a single
objective), baseline b = mean of the k rewards, advantage A_j = b − r_j, and minimise

    loss = mean_j [ A_j · Σ_t log π(y_t | y_<t, x)  +  β · Σ_t KL(π(·|y_<t, x) ‖ π_ref(·|y_<t, x)) ]

where π_ref is the same T5 with every adapter disabled (no second model in memory), log π is the full
softmax's (recomputed by teacher forcing, not the top-k sampler's) and the sums run over the sample's
real tokens (up to and including the first `</s>`). Validation every 8 steps from step 8: k sampled
responses per aggregation prompt, eval mode; convergence when the CV of the last 20 validation rewards
(mean of the trained objectives' clipped scores) is < 0.015. DynaOpt: class DynaOpt (two Exp3 bandits).
Each run draws from its own random state, seeded by (--seed, objective) (run_seed), as the authors'
objectives each continue one global stream: no two objectives share a LoRA init, batch order or sample.
Speed without changing the maths: sampling runs on the adapter merged into the weights (sample_responses),
the encoder runs once per prompt, not once per sample, wherever no dropout acts (sampling, validation, the
reference pass: the same numbers), and the log-probs + KL carry a hand-written gradient (token_logprobs_and_kl,
checked against autograd).

Deviations from the paper / public code:
- The public code computes its KL term under `no_grad` (and multiplies it by zero-mean advantages),
  so it never reaches the gradient. Here the KL carries gradient, and it is the *full-distribution*
  KL at every generated position (exact, not the one-sample estimate), zero with zero gradient at step 0.
- log π sums the sampled tokens including `</s>`; the public code re-tokenises the text and excludes it.
- T5's own dropout is off during RL (sampling in eval mode, the loss pass with the LoRA dropout only);
  the public code samples and validates with all dropout on. Validation here is in eval mode.
- Convergence is checked after every validation; the public code only leaves its loop at an epoch's end.
- Validation covers the whole aggregation split (the public code drops the last incomplete batch).
- DynaOpt's outer bandit is paid the mean change of the *trained* objectives' validation scores since
  the previous validation (the public code: all 5 of its validation scores, coherence and specificity
  included, against the last 8 per-sample scores of the previous validation); the reward weights are
  the inner bandit's normalised weights from the first step (the public code keeps weight 1.0 per
  objective until its outer bandit first draws an objective arm).
- Batches are a seeded reshuffle of the training split per epoch (the public code: a RandomSampler).
- A run is resumable (checkpoint at every validation); a finished run that stopped at --max-steps
  without converging trains on when given more steps, exactly as if it had never stopped
  (finished_summary); any other changed setting is refused.
- compare.py's single-policy runs at a preference λ: uniform with args.preference as its fixed reward
  weights (Σ λ_i log clip(s_i)); its validation reward stays the plain mean of the trained objectives.
"""
from __future__ import annotations

import hashlib
import io
import json
import math
import os
import random
import time

import torch
import torch.nn.functional as F
from tqdm import tqdm

import lora
import rewards
import files
import t5
from data import encode_prompts
from files import InputError

SINGLE_OBJECTIVES = rewards.OBJECTIVES                    # ("reflection", "empathy", "fluency")
MULTI_OBJECTIVE = ("uniform", "dynaopt")
OBJECTIVES = SINGLE_OBJECTIVES + MULTI_OBJECTIVE


# ----------------------------------------------------------------------------- pure maths
def response_mask(tokens: torch.Tensor, eos_id: int) -> torch.Tensor:
    """1.0 for a sample's real tokens (up to and including its first </s>), 0.0 for the padding after."""
    is_eos = (tokens == eos_id).long()
    eos_seen_before = torch.cumsum(is_eos, dim=1) - is_eos
    return (eos_seen_before == 0).float()


def scst_advantages(rewards_per_prompt: torch.Tensor) -> torch.Tensor:
    """rewards [B, k] -> advantages [B, k] = mean-of-k baseline − reward (public code's sign)."""
    baseline = rewards_per_prompt.mean(dim=1, keepdim=True)
    return baseline - rewards_per_prompt


def token_logprobs_and_kl(policy_logits: torch.Tensor, reference_logits: torch.Tensor, tokens: torch.Tensor):
    """log π(y_t) of the sampled tokens [N, T] and the full KL(π ‖ π_ref) = Σ_v π_v (log π_v − log π_ref,v) at
    every position [N, T]. The gradient flows to the policy logits only (the reference is the frozen model)."""
    return _LogprobsAndKL.apply(policy_logits, reference_logits.detach(), tokens)


def logprobs_and_kl_formula(policy_logits, reference_logits, tokens):
    """The same two quantities written as their definition and differentiated by autograd: the oracle of
    token_logprobs_and_kl in the tests, and what the transformers + peft side of bench/bench_scst.py computes."""
    policy_logprobs = F.log_softmax(policy_logits.float(), dim=-1)
    reference_logprobs = F.log_softmax(reference_logits.float(), dim=-1)
    sampled = policy_logprobs.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    return sampled, (policy_logprobs.exp() * (policy_logprobs - reference_logprobs)).sum(-1)


class _LogprobsAndKL(torch.autograd.Function):
    """token_logprobs_and_kl with its gradient written out (speed: autograd through log_softmax, exp, sub, mul
    and sum keeps about six [N, T, V] tensors and makes ~10 passes over them; this keeps two). With z the
    policy logits, p = softmax(z), d = log p − log q and KL = Σ_v p_v d_v:
        ∂KL/∂z = p ⊙ (d − KL),    ∂ log p_y / ∂z = onehot(y) − p
    (tests/test_scst.py checks values and gradients against the plain autograd formula)."""

    @staticmethod
    def forward(ctx, policy_logits, reference_logits, tokens):
        dtype = torch.promote_types(policy_logits.dtype, torch.float32)            # bf16 / fp16 logits: in fp32
        logprobs = F.log_softmax(policy_logits.to(dtype), dim=-1)
        sampled = logprobs.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
        d = F.log_softmax(reference_logits.to(dtype), dim=-1).neg_().add_(logprobs)  # log p − log q
        p = logprobs.exp_()                                                       # p, in log p's buffer
        kl = torch.linalg.vecdot(p, d)
        ctx.save_for_backward(p, d, kl, tokens)
        ctx.dtype = policy_logits.dtype
        return sampled, kl

    @staticmethod
    def backward(ctx, grad_sampled, grad_kl):
        p, d, kl, tokens = ctx.saved_tensors
        grad = (d - kl.unsqueeze(-1)).mul_(grad_kl.unsqueeze(-1)).sub_(grad_sampled.unsqueeze(-1)).mul_(p)
        grad.scatter_add_(-1, tokens.unsqueeze(-1), grad_sampled.unsqueeze(-1))
        return grad.to(ctx.dtype), None, None


def scst_loss(sampled_logprobs, kl, mask, advantages, beta: float) -> torch.Tensor:
    """Mean over samples of A_j · Σ_t log π + β · Σ_t KL_t, padding masked out (SPEC §2)."""
    sequence_logprob = (sampled_logprobs * mask).sum(dim=1)
    sequence_kl = (kl * mask).sum(dim=1)
    return (advantages * sequence_logprob + beta * sequence_kl).mean()


def coefficient_of_variation(history: list[float], window: int = 20) -> float | None:
    """Population std / |mean| of the last `window` validation rewards; None before `window` of them."""
    if len(history) < window:
        return None
    last = torch.tensor(history[-window:], dtype=torch.float64)
    mean = last.mean().item()
    return math.inf if mean == 0 else last.std(unbiased=False).item() / abs(mean)


def converged(history: list[float], window: int = 20, tolerance: float = 0.015) -> bool:
    """Early stop (authors' check_convergence): CV of the last `window` validation rewards < tolerance."""
    cv = coefficient_of_variation(history, window)
    return cv is not None and cv < tolerance


def trained_objectives(args) -> list[str]:
    """The scores a run's reward is made of: its one objective, or --objectives for uniform / dynaopt."""
    if args.objective in MULTI_OBJECTIVE:
        objectives = getattr(args, "objectives", None) or SINGLE_OBJECTIVES
        return objectives.split(",") if isinstance(objectives, str) else list(objectives)
    return [args.objective]


def combine_rewards(scores: torch.Tensor, weights: list[float], combine: str) -> torch.Tensor:
    """scores [N, d] -> rewards [N]: 'logsum' = Σ w_i log clip(s_i, 1e-4, 0.9999), the public code's
    ScorerWrapper, for a single objective too (w = [1]); 'mean' = Σ w_i s_i (raw scores)."""
    if combine == "logsum":
        return rewards.combine_logsum(scores, weights)
    return rewards.combine_mean(scores, weights)


class Exp3:
    """Exp3 adversarial bandit (the authors' dynaopt_lib/bandit_alg.py), γ = 0.07, rewards not rescaled."""

    def __init__(self, num_arms: int, gamma: float = 0.07):
        self.gamma, self.weights = gamma, [1.0] * num_arms

    def probabilities(self) -> list[float]:
        total, k = sum(self.weights), len(self.weights)
        return [(1 - self.gamma) * w / total + self.gamma / k for w in self.weights]

    def choose(self, rng: random.Random) -> int:
        return rng.choices(range(len(self.weights)), weights=self.probabilities())[0]

    def update(self, arm: int, reward: float):
        estimated = reward / self.probabilities()[arm]        # importance-weighted reward
        self.weights[arm] *= math.exp(self.gamma * estimated / len(self.weights))


class DynaOpt:
    """DynaOpt as the authors run it (el_training.py, utils_scoring.py): an outer Exp3 over d + 1 arms
    (each objective, then "no change") drawn before training and after every validation, paid the mean
    change of the objectives' validation scores; an inner Exp3 over d arms paid 1 for the drawn arm at
    every training step (nothing on "no change"); reward weights = inner weights / their sum."""

    def __init__(self, num_objectives: int, gamma: float, seed: int):
        self.outer, self.inner = Exp3(num_objectives + 1, gamma), Exp3(num_objectives, gamma)
        self.rng = random.Random(seed)
        self.arm = self.outer.choose(self.rng)                # drawn before training

    def step_weights(self) -> list[float]:
        """Called once per training step, before its reward: bump the drawn arm, return the weights."""
        if self.arm < len(self.inner.weights):
            self.inner.update(self.arm, 1.0)
        total = sum(self.inner.weights)
        return [w / total for w in self.inner.weights]

    def validation(self, change: float):
        """Pay the arm drawn since the last validation, draw the next one."""
        self.outer.update(self.arm, change)
        self.arm = self.outer.choose(self.rng)

    def state(self) -> dict:
        return {"outer": list(self.outer.weights), "inner": list(self.inner.weights), "arm": self.arm,
                "rng": self.rng.getstate()}

    def load(self, state: dict):
        self.outer.weights, self.inner.weights = list(state["outer"]), list(state["inner"])
        self.arm = state["arm"]
        self.rng.setstate(_as_tuple(state["rng"]))


# ----------------------------------------------------------------------------- model passes
def shift_right(tokens: torch.Tensor, start_id: int) -> torch.Tensor:
    """Teacher-forcing decoder input: [start, y_1, ..., y_{T-1}]."""
    start = torch.full_like(tokens[:, :1], start_id)
    return torch.cat([start, tokens[:, :-1]], dim=1)


def score(scorers: dict, names, prompts, responses) -> torch.Tensor:
    """[N, len(names)] scores, a NaN/inf anywhere is an InputError naming the scorer."""
    columns = []
    for name in names:
        values = scorers[name](prompts, responses).float().cpu()
        rewards.check_finite(values, f"{name} scorer")
        columns.append(values)
    return torch.stack(columns, dim=1)


def run_seed(seed: int, objective: str) -> int:
    """The run's own random state (LoRA init, batch order, sampling noise, validation, DynaOpt's draws),
    derived from (--seed, objective): two objectives trained with one --seed never share a draw, as the
    authors' objectives, trained one after another from one set_seed, continue one global stream
    (el_training.py:321-330); each run still reproduces alone, in any process and order."""
    return int(hashlib.sha256(f"run {objective} {seed}".encode()).hexdigest()[:15], 16)


def validation_seed(seed: int, step: int) -> int:
    """A validation's own sampling seed (seed: the run's): the same for a given (seed, step), whatever ran before it."""
    return int(hashlib.sha256(f"validation {seed} {step}".encode()).hexdigest()[:15], 16)


@torch.no_grad()
def sample_responses(model, input_ids, attention_mask, args, generator) -> torch.Tensor:
    """args.samples_per_prompt responses per prompt (adjacent rows) drawn from the policy (top-k, temperature 1);
    the encoder runs once per prompt (t5.generate's repeat). Nothing is differentiated here, so the adapter
    is merged into the weights for the draw (Eq. 4 with w = 1: one matmul per layer instead of three) and
    unmerged after (W0 copied back bit for bit); the loss's log-probs are recomputed unmerged.
    args.objective None: the model's weights as they are, every adapter off (IterativeRS's soup)."""
    with lora.merged(model, {args.objective: 1.0} if args.objective is not None else {}):
        return t5.generate(model, input_ids, attention_mask, do_sample=True, temperature=1.0, top_k=args.top_k,
                           max_new_tokens=args.max_new_tokens, generator=generator, repeat=args.samples_per_prompt)[0]


@torch.no_grad()
def validate(model, tokenizer, scorers, prompts, args, step: int) -> dict[str, float]:
    """The authors' validation: k sampled responses per prompt (top-k, temperature 1) on every given
    prompt, mean clipped score per objective. Eval mode (no dropout) and a generator seeded from
    (run seed, step), so the same model gives the same numbers, after a resume too."""
    model.eval()
    generator = torch.Generator(device=args.device).manual_seed(validation_seed(run_seed(args.seed, args.objective), step))
    k, names = args.samples_per_prompt, list(scorers)
    totals = torch.zeros(len(names), dtype=torch.float64)
    for start in range(0, len(prompts), args.batch_size):
        batch = prompts[start:start + args.batch_size]
        tokens = sample_responses(model, *encode_prompts(tokenizer, batch, args.device), args, generator)
        scores = score(scorers, names, [p for p in batch for _ in range(k)], tokenizer.batch_decode(tokens))
        totals += rewards.clip(scores).double().sum(0)
    return {name: (total / (len(prompts) * k)).item() for name, total in zip(names, totals)}


def adapter_dropout_only(model):
    """Training mode for the LoRA layers only: their dropout (0.05) acts, T5's own dropout does not, so
    the KL term compares two policies rather than two dropout masks (it is exactly 0 at step 0)."""
    model.eval()
    for module in model.modules():
        if isinstance(module, lora.LoRALinear):
            module.train()


def scst_step(model, tokenizer, scorers, optimizer, prompts, weights: dict[str, float], args, generator,
              reference=lora.adapters_disabled, sample=sample_responses, parameters=None) -> dict:
    """One SCST update on a batch of prompts with reward weights {objective: w}; returns its statistics.
    reference(model): the context in which the model is π_ref (default: every adapter off; IterativeRS
    also takes its soup off, iterative.py). `sample` draws the responses, `parameters` are the clipped ones
    (default: adapter args.objective); hoe.py passes its routed sampler and its routers' parameters."""
    device, k, names = args.device, args.samples_per_prompt, list(weights)
    prompt_ids, prompt_mask = encode_prompts(tokenizer, prompts, device)     # each prompt once
    input_ids, attention_mask = prompt_ids.repeat_interleave(k, 0), prompt_mask.repeat_interleave(k, 0)
    model.eval()                                           # sampling: no dropout
    tokens = sample(model, prompt_ids, prompt_mask, args, generator)
    responses = tokenizer.batch_decode(tokens)
    scores = score(scorers, names, [p for p in prompts for _ in range(k)], responses)
    reward = combine_rewards(scores, [weights[n] for n in names], args.combine).to(device)
    advantages = scst_advantages(reward.view(len(prompts), k)).view(-1)
    decoder_input_ids = shift_right(tokens, model.config.decoder_start_token_id)
    with torch.no_grad(), reference(model):                # first: a reference may swap weights in place
        reference_logits = model(prompt_ids, prompt_mask, decoder_input_ids, repeat=k)  # no dropout: once per prompt
    adapter_dropout_only(model)
    policy_logits = model(input_ids, attention_mask, decoder_input_ids)
    sampled, kl = token_logprobs_and_kl(policy_logits, reference_logits, tokens)
    mask = response_mask(tokens, model.config.eos_token_id)
    loss = scst_loss(sampled, kl, mask, advantages, args.beta)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if parameters is None:
        parameters = lora.adapter_parameters(model, args.objective)
    torch.nn.utils.clip_grad_norm_(parameters, args.grad_clip)
    optimizer.step()
    model.eval()                                           # nothing downstream sees the LoRA dropout
    return {"loss": loss.item(), "reward": reward.mean().item(),
            "kl": ((kl * mask).sum(1)).mean().item(), "tokens": mask.sum(1).mean().item(),
            "scores": dict(zip(names, scores.mean(0).tolist()))}


# ----------------------------------------------------------------------------- the training loop
RESULT_SETTINGS = ("objective", "objectives", "seed", "batch_size", "samples_per_prompt", "max_new_tokens", "lr",
                   "beta", "grad_clip", "val_every", "cv_window", "cv_tolerance", "combine", "gamma", "top_k",
                   "preference")


def run_settings(args, model, train_examples, validation_prompts) -> dict:
    """Everything a resumed run must share with its start for the result to be the uninterrupted one."""
    settings = {key: getattr(args, key, None) for key in RESULT_SETTINGS}
    settings["objectives"] = trained_objectives(args)
    text = "\n".join([e.prompt for e in train_examples] + ["--- validation ---"] + list(validation_prompts))
    settings["data"] = hashlib.sha256(text.encode()).hexdigest()[:16]
    fingerprint = lora.base_fingerprint(model)
    settings["policy"] = [fingerprint["shapes"], [[round(x, 3) for x in probe] for probe in fingerprint["probes"]]]
    return settings


def _flag(key: str) -> str:
    return {"objective": "the objective", "objectives": "--objectives", "policy": "--policy (the base model)",
            "data": "the training/validation prompts (--data, --sample, --split-seed, --val-prompts)"}.get(
        key, "--" + key.replace("_", "-"))


def check_settings(path: str, saved: dict | None, settings: dict, run_dir: str):
    """Refuse (one line naming the flag) a run continued with a setting that changes its result."""
    if saved is None:
        raise InputError(f"{path}: written by an older emorl without its settings; delete {run_dir} to restart")
    for key, value in settings.items():
        if saved.get(key) != value:
            what = (f"{_flag(key)} changed since this run started" if key in ("data", "policy") else
                    f"this run was started with {_flag(key)} {saved.get(key)}, not {value}")
            raise InputError(f"{path}: {what}; rerun with the same settings or delete {run_dir}")


def finished_summary(run_dir: str, args, settings: dict) -> dict | None:
    """The summary of a finished run that stays finished under `args`, or None: no summary.json yet, or
    a run that stopped at --max-steps without converging and is given more steps (it trains on from its
    last checkpoint, as if it had never stopped). A changed setting, or --max-steps below the steps done,
    is refused as in a resume: the summary would not be this command's result."""
    summary_path, path = os.path.join(run_dir, "summary.json"), os.path.join(run_dir, "checkpoint.pt")
    if not os.path.exists(summary_path):
        return None
    summary = files.read_json(summary_path)
    if not isinstance(summary, dict) or not isinstance(summary.get("steps"), int) or "converged" not in summary:
        raise InputError(f"{summary_path}: not written by `train` (an imported adapter?): choose another --runs or "
                         f"--seed, or delete {run_dir}")
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True).get("settings")
    except Exception as e:                                    # noqa: BLE001 - missing file or any unpickling failure
        raise InputError(f"{path}: unreadable ({type(e).__name__}), so the settings of this finished run cannot "
                         f"be checked; delete {run_dir} to train again") from None
    check_settings(path, saved, settings, run_dir)
    if args.max_steps < summary["steps"]:
        raise InputError(f"{run_dir} finished at step {summary['steps']}: --max-steps {args.max_steps} is below it")
    if summary["converged"] or args.max_steps == summary["steps"]:
        return summary
    return None


def next_batch(examples, batch_size: int, seed: int, epoch: int, cursor: int) -> tuple[list, int, int]:
    """The next batch_size examples of a seeded reshuffle of `examples` per epoch, read from (epoch, cursor);
    -> (batch, epoch, cursor) to continue from."""
    batch = []
    while len(batch) < batch_size:
        order = list(range(len(examples)))
        random.Random(seed * 100_003 + epoch).shuffle(order)
        take = order[cursor:cursor + batch_size - len(batch)]
        batch += [examples[i] for i in take]
        cursor += len(take)
        if cursor >= len(examples):
            epoch, cursor = epoch + 1, 0
    return batch, epoch, cursor


class TrainingRun:
    """Everything a run must carry across a kill -9: step, data cursor, validation history, DynaOpt's
    bandits, RNG states, optimiser and adapter. Saved atomically at every validation."""

    CARRIED = ("step", "epoch", "cursor", "elapsed", "history", "validations", "converged", "log_sizes")

    def __init__(self, run_dir: str, args, num_train: int, settings: dict):
        self.run_dir, self.args, self.num_train, self.settings = run_dir, args, num_train, settings
        self.objectives = trained_objectives(args)
        self.seed = run_seed(args.seed, args.objective)
        self.step, self.epoch, self.cursor, self.elapsed = 0, 0, 0, 0.0
        self.history, self.validations, self.converged = [], [], False   # history: the CV rule's window
        self.dynaopt = DynaOpt(len(self.objectives), args.gamma, self.seed) if args.objective == "dynaopt" else None
        self.log_sizes = {"train.jsonl": 0, "train.log": 0}

    # --- data order: a seeded reshuffle per epoch, a cursor into it
    def next_batch(self, examples) -> list:
        batch, self.epoch, self.cursor = next_batch(examples, self.args.batch_size, self.seed, self.epoch, self.cursor)
        return batch

    def reward_weights(self) -> dict[str, float]:
        """This step's reward weights (DynaOpt: its inner bandit moves at every call, once per step)."""
        d = len(self.objectives)
        preference = getattr(self.args, "preference", None)  # compare.py's single-policy run at λ
        weights = self.dynaopt.step_weights() if self.dynaopt else list(preference) if preference else [1.0 / d] * d
        return dict(zip(self.objectives, weights))

    def record_validation(self, scores: dict[str, float]) -> dict:
        """Validation reward = mean of the trained objectives' clipped scores (authors' el_training.py);
        the step-0 validation is logged for the curve but stays out of the CV window and the bandit."""
        reward = sum(scores[n] for n in self.objectives) / len(self.objectives)
        record = {"type": "validation", "step": self.step, "reward": reward, "scores": scores}
        if self.step > 0:
            counted = [v for v in self.validations if v["step"] > 0]
            if self.dynaopt:                                  # pay the arm drawn since the last validation
                previous = counted[-1]["scores"] if counted else None
                change = sum(scores[n] - previous[n] for n in self.objectives) / len(self.objectives) if previous else 0.0
                paid_arm = self.dynaopt.arm
                self.dynaopt.validation(change)
                record["dynaopt"] = {"paid_arm": self._arm_name(paid_arm), "paid": change,
                                     "next_arm": self._arm_name(self.dynaopt.arm),
                                     "outer_probabilities": self.dynaopt.outer.probabilities()}
            self.history.append(reward)
            self.converged = converged(self.history, self.args.cv_window, self.args.cv_tolerance)
        self.validations.append({"step": self.step, "scores": scores, "reward": reward})
        return record

    def _arm_name(self, arm: int) -> str:
        return self.objectives[arm] if arm < len(self.objectives) else "no change"

    # --- checkpoint
    def save(self, model, optimizer, generator):
        state = {key: getattr(self, key) for key in self.CARRIED}
        state["dynaopt"] = self.dynaopt.state() if self.dynaopt else None
        checkpoint = {"settings": self.settings, "state": state,
                      "adapter": {n: p.detach().cpu() for n, p in adapter_tensors(model, self.args.objective)},
                      "optimizer": optimizer.state_dict(), "torch_rng": torch.get_rng_state(), "generator": generator.get_state()}
        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)
        files.atomic_write(os.path.join(self.run_dir, "checkpoint.pt"), buffer.getvalue())

    def restore(self, model, optimizer, generator) -> bool:
        """Load checkpoint.pt if there is one; refuse it (InputError naming the setting) if it was made
        with settings that change the result. Without one, a fresh run starts fresh logs."""
        path = os.path.join(self.run_dir, "checkpoint.pt")
        if not os.path.exists(path):
            for log_name in self.log_sizes:                   # leftovers of a run killed before its first checkpoint
                if os.path.exists(os.path.join(self.run_dir, log_name)):
                    os.remove(os.path.join(self.run_dir, log_name))
            return False
        try:
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
            saved, state = checkpoint.get("settings"), checkpoint["state"]
        except Exception as e:                                # noqa: BLE001 - any unpickling failure
            raise InputError(f"{path}: unreadable checkpoint ({type(e).__name__}); delete it to restart the run") from None
        check_settings(path, saved, self.settings, self.run_dir)
        if self.args.max_steps < state["step"]:
            raise InputError(f"{path}: --max-steps {self.args.max_steps} is below the {state['step']} steps already done")
        for key in self.CARRIED:
            setattr(self, key, state[key])
        if self.dynaopt:
            self.dynaopt.load(state["dynaopt"])
        expected = dict(adapter_tensors(model, self.args.objective))
        if set(checkpoint["adapter"]) != set(expected):
            raise InputError(f"{path}: its adapter tensors do not match adapter '{self.args.objective}' of this model")
        with torch.no_grad():
            for name, parameter in expected.items():
                parameter.copy_(checkpoint["adapter"][name])
        optimizer.load_state_dict(checkpoint["optimizer"])
        torch.set_rng_state(checkpoint["torch_rng"])
        generator.set_state(checkpoint["generator"])
        for log_name, size in self.log_sizes.items():     # drop log lines written after the checkpoint
            log_path = os.path.join(self.run_dir, log_name)
            if os.path.exists(log_path):
                with open(log_path, "r+b") as f:
                    f.truncate(size)
        return True

    def log(self, record: dict, line: str):
        for log_name, text in (("train.jsonl", json.dumps(record) + "\n"), ("train.log", line + "\n")):
            with open(os.path.join(self.run_dir, log_name), "a", encoding="utf-8") as f:
                f.write(text)
            self.log_sizes[log_name] = os.path.getsize(os.path.join(self.run_dir, log_name))
        tqdm.write(line)

    def progress(self) -> str:
        """What the progress bar can honestly say: validations so far (as many as the log's `val` lines;
        the step-0 one is not counted by the CV rule) and the CV against the tolerance."""
        cv = coefficient_of_variation(self.history, self.args.cv_window)
        rule = (f"CV {cv:.4f} (stops < {self.args.cv_tolerance})" if cv is not None else
                f"CV once {self.args.cv_window} are counted")
        return f"{len(self.validations)} validations ({len(self.history)} counted), {rule}, max {self.args.max_steps} steps"


def _as_tuple(value):
    """random.Random.setstate needs tuples back where the checkpoint format gave lists."""
    return tuple(_as_tuple(v) for v in value) if isinstance(value, (list, tuple)) else value


def adapter_tensors(model, name: str):
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad and n.endswith("." + name)]


def train(model, tokenizer, scorers: dict, train_examples: list, validation_prompts: list, args, run_dir: str) -> dict:
    """Train adapter `args.objective` until the convergence rule or args.max_steps; resumable.

    `scorers` must hold every trained objective's scorer (validation records all of them)."""
    if not train_examples:
        raise InputError("the training split is empty: give more data or a larger --sample")
    if not validation_prompts:
        raise InputError("the validation (aggregation) split is empty: give more data or a larger --sample")
    if args.top_k < 0:
        raise InputError(f"--top-k {args.top_k}: must be 0 (the full softmax) or a positive number of tokens")
    os.makedirs(run_dir, exist_ok=True)
    torch.manual_seed(run_seed(args.seed, args.objective))   # the LoRA init: this objective's own
    if args.objective not in lora.adapter_names(model):
        lora.add_adapter(model, args.objective)
    lora.set_adapter(model, args.objective)
    optimizer = torch.optim.AdamW(lora.adapter_parameters(model, args.objective), lr=args.lr)
    generator = torch.Generator(device=args.device).manual_seed(run_seed(args.seed, args.objective))
    run = TrainingRun(run_dir, args, len(train_examples), run_settings(args, model, train_examples, validation_prompts))
    finished = finished_summary(run_dir, args, run.settings)
    if finished is not None:
        return finished
    if run.restore(model, optimizer, generator):
        tqdm.write(f"resuming {run_dir} at step {run.step} ({len(run.validations)} validations so far)")
    started = time.time() - run.elapsed

    def validate_and_log():
        validation_start = time.time()
        scores = validate(model, tokenizer, scorers, validation_prompts, args, run.step)
        record = run.record_validation(scores)
        run.elapsed = time.time() - started
        text = " ".join(f"{n} {v:.4f}" for n, v in scores.items())
        run.log({**record, "data_points": run.step * args.batch_size, "prompts": len(validation_prompts),
                 "samples": len(validation_prompts) * args.samples_per_prompt, "seconds": round(run.elapsed, 3),
                 "validation_seconds": round(time.time() - validation_start, 3)},
                f"val  {run.step} | reward {record['reward']:.4f} | {text} | "
                f"{len(validation_prompts)} prompts x {args.samples_per_prompt} | {run.elapsed:.1f}s")
        run.save(model, optimizer, generator)

    if not run.validations:
        validate_and_log()                                    # step 0: the base model, for the curve only
    bar = tqdm(initial=run.step, unit="step", desc=f"train {args.objective}", dynamic_ncols=True)
    bar.set_postfix_str(run.progress())
    while run.step < args.max_steps and not run.converged:
        step_start = time.time()
        batch = run.next_batch(train_examples)
        weights = run.reward_weights()
        stats = scst_step(model, tokenizer, scorers, optimizer, [e.prompt for e in batch], weights, args, generator)
        run.step += 1
        bar.update(1)
        arm = {"arm": run._arm_name(run.dynaopt.arm)} if run.dynaopt else {}
        run.log({"type": "step", "step": run.step, **stats, "weights": weights, **arm,
                 "data_points": run.step * args.batch_size, "seconds": round(time.time() - step_start, 3)},
                f"step {run.step} | loss {stats['loss']:.4f} | reward {stats['reward']:.4f} | "
                f"kl {stats['kl']:.4f} | {time.time() - step_start:.2f}s")
        if run.step % args.val_every == 0:
            validate_and_log()
            bar.set_postfix_str(run.progress())
    bar.close()
    run.elapsed = time.time() - started
    lora.save_adapter(model, args.objective, os.path.join(run_dir, "adapter"), base_model_name_or_path=args.policy)
    summary = {"objective": args.objective, "objectives": run.objectives, "seed": args.seed, "steps": run.step,
               "data_points": run.step * args.batch_size, "wall_seconds": round(run.elapsed, 2),
               "converged": run.converged, "initial_validation": run.validations[0]["scores"],
               "final_validation": run.validations[-1]["scores"], "final_reward": run.validations[-1]["reward"],
               "initial_reward": run.validations[0]["reward"], "validations": len(run.validations),
               "validation_prompts": len(validation_prompts), "policy": args.policy,
               "hyperparameters": {k: getattr(args, k) for k in ("batch_size", "samples_per_prompt", "lr", "beta",
                                                                 "grad_clip", "max_steps", "val_every", "combine",
                                                                 "top_k", "gamma", "cv_window", "cv_tolerance")}}
    files.write_json(os.path.join(run_dir, "summary.json"), summary)
    return summary
