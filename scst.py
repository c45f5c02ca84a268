"""Self-critical sequence training (SCST) with a KL penalty, one LoRA adapter per objective.

Paper: §4 (training stage), §5.2 (implementation), Eq. (4) (LoRA); SPEC §2 has every number.
For each training prompt: sample k = 3 responses with the adapter on (temperature 1, ≤ 64 tokens),
score them, baseline b = mean of the k rewards, advantage A_j = b − r_j, and minimise

    loss = mean_j [ A_j · Σ_t log π(y_t | y_<t, x)  +  β · Σ_t KL(π(·|y_<t, x) ‖ π_ref(·|y_<t, x)) ]

where π_ref is the same T5 with every adapter disabled (no second model in memory) and the sums run
over the sample's real tokens (up to and including the first `</s>`).

Deviations from the paper / public code:
- The public code computes its KL term under `no_grad`, so it never reaches the gradient. Here the KL
  carries gradient, and it is the *full-distribution* KL at every generated position (exact, not the
  one-sample estimate log π(y_t) − log π_ref(y_t)), which is zero with zero gradient at step 0.
- DynaOpt's Exp3 bandit acts at every validation (every 8 steps): it draws an objective, is paid the
  improvement of that objective's validation score since the previous validation, and the training
  reward weights are the bandit's current probabilities.
- The validation reward used by the convergence rule is the mean of the scores the run trains on
  (one score for a single objective, the 1/3-weighted mean for uniform / dynaopt), because the
  "logsum" combination is negative and has no meaningful coefficient of variation.
- T5's own dropout is off during RL (as in TRL's PPO); the LoRA dropout (0.05) stays on.
- Batches are drawn from a seeded reshuffle of the training split each epoch (public code: file order).
"""
from __future__ import annotations

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
import t5
from data import encode_prompts
from t5 import InputError

SINGLE_OBJECTIVES = rewards.OBJECTIVES                    # ("reflection", "empathy", "fluency")
OBJECTIVES = SINGLE_OBJECTIVES + ("uniform", "dynaopt")


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
    """log π(y_t) of the sampled tokens [N, T] and the full KL(π ‖ π_ref) at every position [N, T]."""
    policy_logprobs = F.log_softmax(policy_logits.float(), dim=-1)
    reference_logprobs = F.log_softmax(reference_logits.float(), dim=-1)
    sampled = policy_logprobs.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    kl = (policy_logprobs.exp() * (policy_logprobs - reference_logprobs)).sum(-1)
    return sampled, kl


def scst_loss(sampled_logprobs, kl, mask, advantages, beta: float) -> torch.Tensor:
    """Mean over samples of A_j · Σ_t log π + β · Σ_t KL_t, padding masked out (SPEC §2)."""
    sequence_logprob = (sampled_logprobs * mask).sum(dim=1)
    sequence_kl = (kl * mask).sum(dim=1)
    return (advantages * sequence_logprob + beta * sequence_kl).mean()


def converged(history: list[float], window: int = 20, tolerance: float = 0.015) -> bool:
    """Early stop: coefficient of variation (population std / mean) of the last `window` validation rewards."""
    if len(history) < window:
        return False
    last = torch.tensor(history[-window:], dtype=torch.float64)
    mean = last.mean().item()
    return mean != 0 and last.std(unbiased=False).item() / abs(mean) < tolerance


class Exp3:
    """Exp3 adversarial bandit over the objectives (DynaOpt, Pérez-Rosas et al. 2024), γ = 0.07."""

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


def trained_objectives(args) -> list[str]:
    """The scores a run's reward is made of: args.objective alone, or args.objectives for uniform / dynaopt."""
    return list(args.objectives) if args.objective in ("uniform", "dynaopt") else [args.objective]


def combine_rewards(scores: torch.Tensor, weights: list[float], combine: str) -> torch.Tensor:
    """scores [N, d] -> rewards [N]; a single objective's reward is its raw score; several are combined
    by 'logsum' = Σ w_i log clip(s_i) (public code) or 'mean' = Σ w_i s_i."""
    if scores.shape[1] == 1:
        return scores[:, 0]
    w = torch.tensor(weights, dtype=scores.dtype, device=scores.device)
    return rewards.combine_logsum(scores, w) if combine == "logsum" else rewards.combine_mean(scores, w)


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


@torch.no_grad()
def validate(model, tokenizer, scorers, prompts, batch_size, device) -> dict[str, float]:
    """Greedy decoding on fixed validation batches; mean score per objective."""
    totals = {name: 0.0 for name in scorers}
    for start in range(0, len(prompts), batch_size):
        batch = prompts[start:start + batch_size]
        tokens, _ = t5.generate(model, *encode_prompts(tokenizer, batch, device))
        scores = score(scorers, list(scorers), batch, tokenizer.batch_decode(tokens))
        for i, name in enumerate(scorers):
            totals[name] += scores[:, i].sum().item()
    return {name: total / len(prompts) for name, total in totals.items()}


def adapter_dropout_only(model):
    """Training mode for the LoRA layers only: their dropout (0.05) acts, T5's own dropout does not, so
    the KL term compares two policies rather than two dropout masks (it is exactly 0 at step 0)."""
    model.eval()
    for module in model.modules():
        if isinstance(module, lora.LoRALinear):
            module.train()


def scst_step(model, tokenizer, scorers, optimizer, prompts, weights, args, generator) -> dict:
    """One SCST update on a batch of prompts; returns the step's statistics."""
    device, k, names = args.device, args.samples_per_prompt, trained_objectives(args)
    input_ids, attention_mask = encode_prompts(tokenizer, prompts, device, repeat=k)
    model.eval()                                           # sampling: no dropout
    tokens, _ = t5.generate(model, input_ids, attention_mask, do_sample=True, temperature=1.0,
                            max_new_tokens=args.max_new_tokens, generator=generator)
    responses = tokenizer.batch_decode(tokens)
    scores = score(scorers, names, [p for p in prompts for _ in range(k)], responses)
    reward = combine_rewards(scores, weights, args.combine).to(device)
    advantages = scst_advantages(reward.view(len(prompts), k)).view(-1)
    decoder_input_ids = shift_right(tokens, model.config.decoder_start_token_id)
    adapter_dropout_only(model)
    policy_logits = model(input_ids, attention_mask, decoder_input_ids)
    with torch.no_grad(), lora.adapters_disabled(model):
        reference_logits = model(input_ids, attention_mask, decoder_input_ids)
    sampled, kl = token_logprobs_and_kl(policy_logits, reference_logits, tokens)
    mask = response_mask(tokens, model.config.eos_token_id)
    loss = scst_loss(sampled, kl, mask, advantages, args.beta)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(lora.adapter_parameters(model, args.objective), args.grad_clip)
    optimizer.step()
    return {"loss": loss.item(), "reward": reward.mean().item(),
            "kl": ((kl * mask).sum(1)).mean().item(), "tokens": mask.sum(1).mean().item()}


# ----------------------------------------------------------------------------- the training loop
class TrainingRun:
    """Everything a run must carry across a kill -9: step, data cursor, validation history, bandit,
    RNG states, optimiser and adapter. Saved atomically at every validation."""

    CARRIED = ("step", "epoch", "cursor", "elapsed", "history", "validations", "converged", "bandit_arm", "log_sizes")

    def __init__(self, run_dir: str, args, num_train: int):
        self.run_dir, self.args, self.num_train = run_dir, args, num_train
        self.step, self.epoch, self.cursor, self.elapsed = 0, 0, 0, 0.0
        self.history, self.validations, self.converged = [], [], False
        self.bandit, self.bandit_arm, self.bandit_rng = Exp3(len(trained_objectives(args)), args.gamma), None, random.Random(args.seed)
        self.log_sizes = {"train.jsonl": 0, "train.log": 0}

    # --- data order: a seeded reshuffle per epoch, a cursor into it
    def next_batch(self, examples) -> list:
        batch = []
        while len(batch) < self.args.batch_size:
            order = list(range(self.num_train))
            random.Random(self.args.seed * 100_003 + self.epoch).shuffle(order)
            take = order[self.cursor:self.cursor + self.args.batch_size - len(batch)]
            batch += [examples[i] for i in take]
            self.cursor += len(take)
            if self.cursor >= self.num_train:
                self.epoch, self.cursor = self.epoch + 1, 0
        return batch

    def reward_weights(self) -> list[float]:
        if self.args.objective == "dynaopt":
            return self.bandit.probabilities()
        return [1.0 / len(trained_objectives(self.args))] * len(trained_objectives(self.args))

    def record_validation(self, scores: dict[str, float]) -> float:
        names = trained_objectives(self.args)
        reward = sum(scores[n] for n in names) / len(names)
        if self.args.objective == "dynaopt":                 # Exp3: pay the arm drawn last time
            if self.bandit_arm is not None and self.validations:
                arm_name = names[self.bandit_arm]
                self.bandit.update(self.bandit_arm, scores[arm_name] - self.validations[-1]["scores"][arm_name])
            self.bandit_arm = self.bandit.choose(self.bandit_rng)
        self.history.append(reward)
        self.validations.append({"step": self.step, "scores": scores, "reward": reward})
        self.converged = converged(self.history, self.args.cv_window, self.args.cv_tolerance)
        return reward

    # --- checkpoint
    def save(self, model, optimizer, generator):
        state = {key: getattr(self, key) for key in self.CARRIED}
        state["bandit_weights"], state["bandit_rng"] = self.bandit.weights, self.bandit_rng.getstate()
        checkpoint = {"state": state, "adapter": {n: p.detach().cpu() for n, p in adapter_tensors(model, self.args.objective)},
                      "optimizer": optimizer.state_dict(), "torch_rng": torch.get_rng_state(), "generator": generator.get_state()}
        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)
        t5.atomic_write(os.path.join(self.run_dir, "checkpoint.pt"), buffer.getvalue())

    def restore(self, model, optimizer, generator) -> bool:
        path = os.path.join(self.run_dir, "checkpoint.pt")
        if not os.path.exists(path):
            return False
        try:
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:                                # noqa: BLE001 - any unpickling failure
            raise InputError(f"{path}: unreadable checkpoint ({type(e).__name__}); delete it to restart the run") from None
        state = checkpoint["state"]
        for key in self.CARRIED:
            setattr(self, key, state[key])
        self.bandit.weights = list(state["bandit_weights"])
        self.bandit_rng.setstate(_as_tuple(state["bandit_rng"]))
        with torch.no_grad():
            for name, parameter in adapter_tensors(model, self.args.objective):
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


def _as_tuple(value):
    """random.Random.setstate needs tuples back where the checkpoint format gave lists."""
    return tuple(_as_tuple(v) for v in value) if isinstance(value, (list, tuple)) else value


def adapter_tensors(model, name: str):
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad and n.endswith("." + name)]


def train(model, tokenizer, scorers: dict, train_examples: list, validation_prompts: list, args, run_dir: str) -> dict:
    """Train adapter `args.objective` until the convergence rule or args.max_steps; resumable.

    `scorers` must hold every single objective's scorer (validation records all of them)."""
    if not train_examples:
        raise InputError("the training split is empty: give more data or a larger --sample")
    if not validation_prompts:
        raise InputError("the validation (aggregation) split is empty: give more data or a larger --sample")
    os.makedirs(run_dir, exist_ok=True)
    torch.manual_seed(args.seed)
    if args.objective not in lora.adapter_names(model):
        lora.add_adapter(model, args.objective)
    lora.set_adapter(model, args.objective)
    optimizer = torch.optim.AdamW(lora.adapter_parameters(model, args.objective), lr=args.lr)
    generator = torch.Generator(device=args.device).manual_seed(args.seed)
    run = TrainingRun(run_dir, args, len(train_examples))
    resumed = run.restore(model, optimizer, generator)
    if resumed:
        tqdm.write(f"resuming {run_dir} at step {run.step} ({len(run.history)} validations so far)")
    started = time.time() - run.elapsed

    def validate_and_log():
        scores = validate(model, tokenizer, scorers, validation_prompts, args.batch_size, args.device)
        reward = run.record_validation(scores)
        run.elapsed = time.time() - started
        text = " ".join(f"{n} {v:.4f}" for n, v in scores.items())
        run.log({"type": "validation", "step": run.step, "reward": reward, "scores": scores,
                 "data_points": run.step * args.batch_size, "seconds": round(run.elapsed, 3)},
                f"val  {run.step}/{args.max_steps} | reward {reward:.4f} | {text} | {run.elapsed:.1f}s")
        run.save(model, optimizer, generator)

    if not run.history:
        validate_and_log()                                    # step 0: the base model's validation reward
    bar = tqdm(total=args.max_steps, initial=run.step, desc=f"train {args.objective}", dynamic_ncols=True)
    while run.step < args.max_steps and not run.converged:
        step_start = time.time()
        batch = run.next_batch(train_examples)
        stats = scst_step(model, tokenizer, scorers, optimizer, [e.prompt for e in batch], run.reward_weights(), args, generator)
        run.step += 1
        bar.update(1)
        run.log({"type": "step", "step": run.step, **stats, "data_points": run.step * args.batch_size,
                 "seconds": round(time.time() - step_start, 3)},
                f"step {run.step}/{args.max_steps} | loss {stats['loss']:.4f} | reward {stats['reward']:.4f} | "
                f"kl {stats['kl']:.4f} | {time.time() - step_start:.2f}s")
        if run.step % args.val_every == 0:
            validate_and_log()
    bar.close()
    run.elapsed = time.time() - started
    lora.save_adapter(model, args.objective, os.path.join(run_dir, "adapter"), base_model_name_or_path=args.policy)
    summary = {"objective": args.objective, "objectives": trained_objectives(args), "seed": args.seed, "steps": run.step,
               "data_points": run.step * args.batch_size, "wall_seconds": round(run.elapsed, 2),
               "converged": run.converged, "initial_validation": run.validations[0]["scores"],
               "final_validation": run.validations[-1]["scores"], "final_reward": run.history[-1],
               "initial_reward": run.history[0], "validations": len(run.history), "policy": args.policy,
               "hyperparameters": {k: getattr(args, k) for k in ("batch_size", "samples_per_prompt", "lr", "beta",
                                                                 "grad_clip", "max_steps", "val_every", "combine")}}
    t5.write_json(os.path.join(run_dir, "summary.json"), summary)
    return summary
