"""SCST + KL (scst.py): the arithmetic on hand-made numbers, the KL's gradient, the convergence rule at
its threshold, the log-clipped reward, top-k sampling, DynaOpt's two bandits on hand-computed cases,
the authors' validation (schedule, whole split, k samples, eval mode, reproducible), resume after an
interruption == uninterrupted run, and resumes that change a setting refused."""
import argparse
import copy
import json
import math
import os
import random

import pytest
import torch

import files
import lora
import rewards
import scst
import t5
from data import Example
from files import InputError


# ----------------------------------------------------------------------------- pure maths
def test_advantages_are_mean_baseline_minus_reward():
    rewards = torch.tensor([[1.0, 2.0, 3.0], [0.5, 0.5, 0.5], [0.0, 0.0, 0.9]])
    expected = torch.tensor([[1.0, 0.0, -1.0], [0.0, 0.0, 0.0], [0.3, 0.3, -0.6]])
    torch.testing.assert_close(scst.scst_advantages(rewards), expected)


def test_response_mask_keeps_tokens_up_to_first_eos():
    tokens = torch.tensor([[5, 6, 1, 0, 0], [5, 1, 0, 0, 0], [5, 6, 7, 8, 9], [1, 0, 0, 0, 0]])
    expected = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]], dtype=torch.float)
    assert torch.equal(scst.response_mask(tokens, eos_id=1), expected)


def test_loss_ignores_padding_and_matches_hand_value():
    logprobs = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, -0.5, -9.0]])
    kl = torch.tensor([[0.1, 0.2, 0.3], [0.4, 0.0, 7.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    advantages = torch.tensor([0.5, -1.0])
    # sample 0: 0.5 * -6 + 0.05 * 0.6 = -2.97 ; sample 1: -1 * -1 + 0.05 * 0.4 = 1.02 ; mean = -0.975
    loss = scst.scst_loss(logprobs, kl, mask, advantages, beta=0.05)
    assert loss.item() == pytest.approx(-0.975)
    changed = logprobs.clone()
    changed[1, 2] = -100.0                                   # a padded position: must not matter
    kl_changed = kl.clone()
    kl_changed[1, 2] = 100.0
    assert scst.scst_loss(changed, kl_changed, mask, advantages, 0.05).item() == pytest.approx(-0.975)


def test_full_kl_matches_definition_and_is_zero_for_equal_logits():
    policy = torch.randn(2, 3, 7)
    reference = torch.randn(2, 3, 7)
    tokens = torch.randint(0, 7, (2, 3))
    sampled, kl = scst.token_logprobs_and_kl(policy, reference, tokens)
    p, q = policy.softmax(-1), reference.softmax(-1)
    torch.testing.assert_close(kl, (p * (p.log() - q.log())).sum(-1))
    torch.testing.assert_close(sampled, policy.log_softmax(-1).gather(-1, tokens[..., None])[..., 0])
    _, kl_same = scst.token_logprobs_and_kl(policy, policy.clone(), tokens)
    assert kl_same.abs().max().item() < 1e-6


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_logprobs_and_kl_gradient_equals_autograd_of_the_formula(dtype):
    generator = torch.Generator().manual_seed(0)
    policy = (3 * torch.randn(3, 4, 11, generator=generator)).to(dtype).requires_grad_()
    reference = (3 * torch.randn(3, 4, 11, generator=generator)).to(dtype)
    tokens = torch.randint(0, 11, (3, 4), generator=generator)
    tokens[0, 1] = tokens[0, 2] = 5                          # repeated tokens: scatter_add, not scatter
    up_sampled, up_kl = torch.randn(3, 4, generator=generator), torch.randn(3, 4, generator=generator)
    sampled, kl = scst.token_logprobs_and_kl(policy, reference, tokens)
    grad, = torch.autograd.grad((sampled * up_sampled).sum() + (kl * up_kl).sum(), policy)
    expected_sampled, expected_kl = scst.logprobs_and_kl_formula(policy.float(), reference.float(), tokens)
    expected_grad, = torch.autograd.grad((expected_sampled * up_sampled).sum() + (expected_kl * up_kl).sum(), policy)
    torch.testing.assert_close(sampled, expected_sampled)
    torch.testing.assert_close(kl, expected_kl)
    torch.testing.assert_close(grad, expected_grad)
    assert grad.dtype == dtype and sampled.dtype == kl.dtype == torch.float32


def test_logprobs_and_kl_gradient_passes_finite_differences():
    generator = torch.Generator().manual_seed(1)
    policy = torch.randn(2, 3, 7, generator=generator, dtype=torch.float64).requires_grad_()
    reference = torch.randn(2, 3, 7, generator=generator, dtype=torch.float64)
    tokens = torch.tensor([[1, 1, 6], [0, 3, 1]])
    assert torch.autograd.gradcheck(lambda z: scst.token_logprobs_and_kl(z, reference, tokens), (policy,))


def test_convergence_rule_on_synthetic_curves():
    flat = [0.60 + 0.001 * (i % 3) for i in range(40)]
    rising = [0.1 + 0.02 * i for i in range(40)]
    noisy = [0.5 + (0.05 if i % 2 else -0.05) for i in range(40)]
    assert not scst.converged(flat[:19])                     # fewer than 20 validations: never
    assert scst.converged(flat[:20])
    assert not scst.converged(rising)                        # last 20: mean 0.69, std 0.115 -> CV 0.17
    assert not scst.converged(noisy)                         # CV 0.1
    plateau = rising[:20] + [0.8] * 20
    assert not scst.converged(plateau[:30]) and scst.converged(plateau)


def test_convergence_threshold_is_strict_at_0_015():
    def history(d):                                          # mean 200, population std d exactly: CV = d / 200
        return [200.0 - d] * 10 + [200.0 + d] * 10
    assert scst.coefficient_of_variation(history(3.0)) == 0.015
    assert scst.converged(history(2.99))                     # CV 0.01495: stop
    assert not scst.converged(history(3.0))                  # CV exactly 0.015: the rule is "< 0.015"
    assert not scst.converged(history(3.01))                 # CV 0.01505: go on
    assert scst.converged([9.0] * 7 + history(2.99))         # only the last 20 count


def test_single_objective_reward_is_the_log_of_the_clipped_score():
    scores = torch.tensor([[0.5], [0.0], [1.0]])
    expected = [math.log(0.5), math.log(1e-4), math.log(0.9999)]
    assert scst.combine_rewards(scores, [1.0], "logsum").tolist() == pytest.approx(expected, rel=1e-3)
    assert scst.combine_rewards(scores, [1.0], "mean").tolist() == pytest.approx([0.5, 0.0, 1.0])


def test_logsum_and_mean_combine_several_objectives():
    scores = torch.tensor([[0.5, 0.2, 0.9]])
    expected = sum(w * math.log(s) for w, s in zip([0.2, 0.3, 0.5], [0.5, 0.2, 0.9]))
    assert scst.combine_rewards(scores, [0.2, 0.3, 0.5], "logsum").item() == pytest.approx(expected, rel=1e-5)
    assert scst.combine_rewards(scores, [0.2, 0.3, 0.5], "mean").item() == pytest.approx(0.1 + 0.06 + 0.45)


# ----------------------------------------------------------------------------- DynaOpt's bandits
def test_exp3_updates_match_hand_computation():
    bandit = scst.Exp3(3, gamma=0.07)
    assert bandit.probabilities() == pytest.approx([1 / 3] * 3)
    bandit.update(0, 0.3)        # estimate 0.3 / (1/3) = 0.9 ; w0 = exp(0.07 * 0.9 / 3) = exp(0.021)
    assert bandit.weights == pytest.approx([1.0212220516375285, 1.0, 1.0])
    assert bandit.probabilities() == pytest.approx([0.33768841607481404, 0.33115579196259287, 0.33115579196259287])
    bandit.update(2, -0.2)       # a loss: w2 = exp(0.07 * (-0.2 / 0.331156) / 3)
    assert bandit.weights == pytest.approx([1.0212220516375285, 1.0, 0.9860067701564359])
    assert bandit.probabilities() == pytest.approx([0.33915117238168857, 0.3325881506788281, 0.32826067693948313])
    bandit.weights = [50.0, 1.0, 1.0]                        # p = (0.918, 0.041, 0.041)
    rng = random.Random(0)
    draws = [bandit.choose(rng) for _ in range(3000)]
    assert 0.89 < draws.count(0) / 3000 < 0.94              # draws follow the probabilities


def test_dynaopt_inner_bandit_moves_every_step_by_hand():
    dynaopt = scst.DynaOpt(3, gamma=0.07, seed=0)
    dynaopt.arm = 0
    # step 1: p0 = 1/3, reward 1 -> w0 = exp(0.07 * 3 / 3) = exp(0.07); weights = w / Σw
    w0 = math.exp(0.07)
    assert dynaopt.step_weights() == pytest.approx([w0 / (w0 + 2), 1 / (w0 + 2), 1 / (w0 + 2)])
    # step 2: p0 = 0.93 * w0 / (w0 + 2) + 0.07 / 3 -> w0 *= exp(0.07 / p0 / 3)
    p0 = 0.93 * w0 / (w0 + 2) + 0.07 / 3
    w0 *= math.exp(0.07 / p0 / 3)
    assert dynaopt.step_weights() == pytest.approx([w0 / (w0 + 2), 1 / (w0 + 2), 1 / (w0 + 2)])
    dynaopt.arm = 3                                          # "no change": the weights stay where they are
    assert dynaopt.step_weights() == pytest.approx([w0 / (w0 + 2), 1 / (w0 + 2), 1 / (w0 + 2)])
    assert dynaopt.inner.weights == pytest.approx([w0, 1.0, 1.0]) and dynaopt.outer.weights == [1.0] * 4


def test_dynaopt_outer_bandit_is_paid_the_mean_change_of_the_objectives(tmp_path):
    args = make_args(objective="dynaopt", objectives=["reflection", "empathy", "fluency"])
    run = scst.TrainingRun(str(tmp_path), args, 10, settings={})
    assert run.dynaopt.outer.weights == [1.0] * 4 and run.dynaopt.arm in range(4)   # drawn before training
    run.record_validation({"reflection": 0.1, "empathy": 0.1, "fluency": 0.1})      # step 0: not paid, no draw
    assert run.dynaopt.outer.weights == [1.0] * 4
    run.dynaopt.arm, run.step = 1, 8
    record = run.record_validation({"reflection": 0.50, "empathy": 0.40, "fluency": 0.60})
    assert record["dynaopt"]["paid"] == 0.0 and run.dynaopt.outer.weights == [1.0] * 4   # first counted: pays 0
    run.dynaopt.arm, run.step = 2, 16
    record = run.record_validation({"reflection": 0.56, "empathy": 0.40, "fluency": 0.57})
    change = (0.06 + 0.0 - 0.03) / 3                         # mean over the objectives, vs step 8 (not step 0)
    assert record["dynaopt"]["paid"] == pytest.approx(change) and record["dynaopt"]["paid_arm"] == "fluency"
    # outer Exp3 over 4 arms: p2 = 1/4 -> w2 = exp(0.07 * (change / 0.25) / 4)
    assert run.dynaopt.outer.weights == pytest.approx([1.0, 1.0, math.exp(0.07 * change / 0.25 / 4), 1.0])
    assert record["dynaopt"]["next_arm"] in ("reflection", "empathy", "fluency", "no change")
    assert run.history == pytest.approx([0.5, 0.51])         # step 0 stays out of the CV window


def test_dynaopt_weights_leave_uniform_while_one_objective_keeps_improving(tmp_path):
    args = make_args(objective="dynaopt", objectives=["reflection", "empathy", "fluency"])
    run = scst.TrainingRun(str(tmp_path), args, 10, settings={})
    largest = []
    for validation in range(1, 21):
        for _ in range(8):
            weights = run.reward_weights()
            assert sum(weights.values()) == pytest.approx(1.0)
            largest.append(max(weights.values()))
        run.step = 8 * validation
        run.record_validation({"reflection": 0.3 + 0.02 * validation, "empathy": 0.5, "fluency": 0.5})
    assert max(largest) > 0.45 and largest[-1] > 0.4         # 1/3 each at the start; the old rule stayed ~0.335


# ----------------------------------------------------------------------------- with a tiny T5
WORDS = "you feel tired and worried about work family sleep the of a it is that so much right now".split()


def make_tiny(folder):
    """A 1+1-layer T5 (d_model 16) and a 40-piece SentencePiece tokenizer trained on WORDS, written in `folder`."""
    import sentencepiece as spm
    rng = random.Random(0)
    sentences = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12))) for _ in range(300)]
    (folder / "corpus.txt").write_text("\n".join(sentences))
    spm.SentencePieceTrainer.train(input=str(folder / "corpus.txt"), model_prefix=str(folder / "spiece"), vocab_size=40,
                                   pad_id=0, eos_id=1, unk_id=2, bos_id=-1, model_type="unigram", minloglevel=2)
    tokenizer = t5.T5Tokenizer(str(folder / "spiece.model"))
    config = t5.T5Config(vocab_size=tokenizer.vocab_size, d_model=16, d_kv=4, d_ff=32, num_layers=1,
                         num_decoder_layers=1, num_heads=2, dropout_rate=0.0)
    torch.manual_seed(0)
    return t5.T5ForConditionalGeneration(config), tokenizer


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny(tmp_path_factory.mktemp("tiny_t5"))


def length_scorer(prompts, responses):
    """A deterministic stand-in reward: prefers responses of about six words."""
    return torch.tensor([1.0 / (1.0 + abs(len(r.split()) - 6)) for r in responses])


def word_scorer(prompts, responses):
    return torch.tensor([min(1.0, r.count("you") / 3 + 0.01) for r in responses])


SCORERS = {"reflection": length_scorer, "empathy": word_scorer, "fluency": length_scorer}


def make_args(**overrides):
    args = dict(objective="reflection", objectives=None, seed=0, device="cpu", max_steps=6, batch_size=4,
                samples_per_prompt=3, max_new_tokens=8, lr=1e-2, beta=0.05, grad_clip=2.0, val_every=2, cv_window=20,
                cv_tolerance=0.015, combine="logsum", gamma=0.07, top_k=50, policy="tiny")
    args.update(overrides)
    return argparse.Namespace(**args)


def examples(n):
    rng = random.Random(1)
    return [Example(prompt=" ".join(rng.choice(WORDS) for _ in range(6)) + f" {i}", responses={}) for i in range(n)]


def adapted_copy(model, perturb=False):
    """The model with adapter 'reflection': B = 0 (the base model), or B and A moved by a seeded 0.3·N(0, 1).
    A comes from the global RNG (lora.add_adapter), so it is seeded here: two calls give the same weights."""
    model = copy.deepcopy(model)
    torch.manual_seed(7)
    lora.add_adapter(model, "reflection")
    if perturb:
        generator = torch.Generator().manual_seed(3)
        with torch.no_grad():
            for parameter in lora.adapter_parameters(model, "reflection"):
                parameter.add_(0.3 * torch.randn(parameter.shape, generator=generator))
    return model


def one_step(model, tokenizer, beta, scorers=SCORERS, **overrides):
    """One scst_step with plain SGD (the update is lr · gradient, so a gradient term cannot hide in Adam's
    normalisation); the sampling generator and the global RNG (LoRA dropout) seeded: same samples."""
    args = make_args(beta=beta, **overrides)
    optimizer = torch.optim.SGD(lora.adapter_parameters(model, "reflection"), lr=0.1)
    torch.manual_seed(0)
    scst.scst_step(model, tokenizer, scorers, optimizer, [e.prompt for e in examples(4)], {"reflection": 1.0}, args,
                   torch.Generator().manual_seed(0))
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def recording(scorer, seen):
    def wrapped(prompts, responses):
        seen.append(list(responses))
        return scorer(prompts, responses)
    return wrapped


def test_kl_is_zero_at_init(tiny):
    model, tokenizer = tiny
    model = adapted_copy(model)
    input_ids, attention_mask = scst.encode_prompts(tokenizer, [e.prompt for e in examples(3)], "cpu")
    tokens, _ = t5.generate(model, input_ids, attention_mask, max_new_tokens=6)
    decoder_input_ids = scst.shift_right(tokens, 0)
    logits = model(input_ids, attention_mask, decoder_input_ids)
    with lora.adapters_disabled(model):
        reference = model(input_ids, attention_mask, decoder_input_ids)
    _, kl = scst.token_logprobs_and_kl(logits, reference, tokens)
    assert kl.abs().max().item() < 1e-6


def test_kl_only_loss_has_a_gradient_on_the_adapter(tiny):
    model, tokenizer = tiny
    model = adapted_copy(model, perturb=True)
    input_ids, attention_mask = scst.encode_prompts(tokenizer, [e.prompt for e in examples(3)], "cpu")
    tokens, _ = t5.generate(model, input_ids, attention_mask, max_new_tokens=6)
    decoder_input_ids = scst.shift_right(tokens, 0)
    logits = model(input_ids, attention_mask, decoder_input_ids)
    with torch.no_grad(), lora.adapters_disabled(model):
        reference = model(input_ids, attention_mask, decoder_input_ids)
    sampled, kl = scst.token_logprobs_and_kl(logits, reference, tokens)
    loss = scst.scst_loss(sampled, kl, scst.response_mask(tokens, 1), torch.zeros(len(tokens)), beta=1.0)
    assert loss.item() > 1e-4                                # the perturbed adapter is away from the base model
    loss.backward()
    gradient = sum(p.grad.norm() ** 2 for p in lora.adapter_parameters(model, "reflection") if p.grad is not None)
    assert gradient > 1e-8                                   # a detached KL (the public code's) gives exactly 0


def test_beta_changes_the_update(tiny):
    model, tokenizer = tiny
    seen_without, seen_with = [], []
    without_kl = one_step(adapted_copy(model, perturb=True), tokenizer, 0.0, dict(reflection=recording(length_scorer, seen_without)))
    with_kl = one_step(adapted_copy(model, perturb=True), tokenizer, 0.05, dict(reflection=recording(length_scorer, seen_with)))
    assert seen_without == seen_with                         # same starting weights, same samples
    same = one_step(adapted_copy(model, perturb=True), tokenizer, 0.0)
    differences = [(without_kl[n] - with_kl[n]).abs().max().item() for n in without_kl if ".lora_" in n]
    assert all(torch.equal(same[n], without_kl[n]) for n in same)   # the comparison itself is deterministic
    assert max(differences) > 1e-4                           # the public code's inert KL would give 0 here


def test_one_step_moves_only_adapter_weights(tiny):
    model, tokenizer = tiny
    adapted = adapted_copy(model, perturb=True)
    before = {n: p.detach().clone() for n, p in adapted.named_parameters()}
    after = one_step(adapted, tokenizer, beta=0.05)
    moved = {n for n in before if not torch.equal(before[n], after[n])}
    assert moved and all(".lora_" in n for n in moved)


def test_sampling_is_top_k_in_training_and_validation(tiny):
    model, tokenizer = tiny
    adapted = adapted_copy(model, perturb=True)
    prompts = [e.prompt for e in examples(4)]
    adapted.eval()
    greedy, _ = t5.generate(adapted, *scst.encode_prompts(tokenizer, prompts, "cpu"), max_new_tokens=8)
    greedy = [text for text in tokenizer.batch_decode(greedy) for _ in range(3)]
    for top_k, equal in ((1, True), (0, False)):            # top-1 sampling is greedy; the full softmax is not
        seen = []
        one_step(copy.deepcopy(adapted), tokenizer, 0.05, dict(reflection=recording(length_scorer, seen)), top_k=top_k)
        assert (seen[0] == greedy) is equal
        seen = []
        scst.validate(adapted, tokenizer, dict(reflection=recording(length_scorer, seen)), prompts,
                      make_args(top_k=top_k), step=8)
        assert (seen[0] == greedy) is equal


def test_sampling_on_merged_weights_draws_what_the_unmerged_policy_draws(tiny):
    """scst.sample_responses merges the trained adapter for the draw and encodes each prompt once for its k
    samples: the same tokens as generate on the unmerged policy with every copy of every prompt encoded, with
    the same generator; another draw than the base model's; W0 back bit for bit."""
    model, tokenizer = tiny
    adapted = adapted_copy(model, perturb=True).eval()
    once = scst.encode_prompts(tokenizer, [e.prompt for e in examples(6)], "cpu")
    ids, mask = (t.repeat_interleave(3, 0) for t in once)       # every copy of every prompt
    before = {n: p.detach().clone() for n, p in adapted.named_parameters()}
    args = make_args(max_new_tokens=12)
    drawn = scst.sample_responses(adapted, *once, args, torch.Generator().manual_seed(5))
    assert drawn.shape[0] == 18
    unmerged, _ = t5.generate(adapted, ids, mask, do_sample=True, top_k=50, max_new_tokens=12,
                              generator=torch.Generator().manual_seed(5))
    assert torch.equal(drawn, unmerged)
    with lora.adapters_disabled(adapted):
        base, _ = t5.generate(adapted, ids, mask, do_sample=True, top_k=50, max_new_tokens=12,
                              generator=torch.Generator().manual_seed(5))
    assert not torch.equal(drawn, base)                      # the adapter was merged, not left out
    assert all(torch.equal(p, before[n]) for n, p in adapted.named_parameters())
    assert all(m.unmerged is None and m.mode == {"reflection": 1.0} for _, m in lora._layers(adapted))


def test_validation_samples_k_per_prompt_in_eval_mode_and_is_reproducible(tiny):
    model, tokenizer = tiny
    adapted = adapted_copy(model, perturb=True)
    for module in adapted.modules():
        if isinstance(module, lora.LoRALinear):
            module.dropout_p = {n: 0.5 for n in module.dropout_p}   # strong LoRA dropout: must not act in validation
    prompts = [e.prompt for e in examples(5)]
    args = make_args(batch_size=2)
    seen = []
    scorers = dict(SCORERS, reflection=recording(length_scorer, seen), empathy=lambda p, r: torch.ones(len(r)))
    adapted.eval()
    first = scst.validate(adapted, tokenizer, scorers, prompts, args, step=8)
    assert [len(batch) for batch in seen] == [6, 6, 3]       # every prompt, k = 3 samples each, in batches of 2
    scst.adapter_dropout_only(adapted)                       # the state a training step leaves behind
    assert scst.validate(adapted, tokenizer, scorers, prompts, args, step=8) == first
    expected = sum(min(max(s, 1e-4), 0.9999) for batch in seen[:3] for s in length_scorer(None, batch).tolist()) / 15
    assert first["reflection"] == pytest.approx(expected)    # mean over prompts × k of the clipped score
    assert first["empathy"] == pytest.approx(0.9999)         # clipped as the authors' logsum_score clips
    assert scst.validate(adapted, tokenizer, scorers, prompts, args, step=16) != first   # own generator per step


class Killed(Exception):
    pass


def curve(path):
    rows = [json.loads(line) for line in open(path / "train.jsonl").read().splitlines()]
    return [{k: v for k, v in row.items() if not k.endswith("seconds")} for row in rows]


def test_resume_after_interruption_equals_uninterrupted_run(tiny, tmp_path):
    model, tokenizer = tiny
    train, validation = examples(10), [e.prompt for e in examples(3)]
    args = make_args(max_steps=7, val_every=2)
    scst.train(copy.deepcopy(model), tokenizer, SCORERS, train, validation, args, str(tmp_path / "straight"))

    calls = {"n": 0}

    def dying_scorer(prompts, responses):
        calls["n"] += 1
        if calls["n"] == 9:                                  # inside step 6, after the step-4 checkpoint
            raise Killed()
        return length_scorer(prompts, responses)

    interrupted = dict(SCORERS, reflection=dying_scorer)
    with pytest.raises(Killed):
        scst.train(copy.deepcopy(model), tokenizer, interrupted, train, validation, make_args(max_steps=7, val_every=2),
                   str(tmp_path / "resumed"))
    assert not (tmp_path / "resumed" / "summary.json").exists()
    scst.train(copy.deepcopy(model), tokenizer, SCORERS, train, validation, make_args(max_steps=7, val_every=2),
               str(tmp_path / "resumed"))

    straight = files.load_safetensors(str(tmp_path / "straight" / "adapter"))
    resumed = files.load_safetensors(str(tmp_path / "resumed" / "adapter"))
    assert straight.keys() == resumed.keys()
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)
    assert curve(tmp_path / "straight") == curve(tmp_path / "resumed")
    summary = json.loads((tmp_path / "resumed" / "summary.json").read_text())
    assert summary["steps"] == 7 and summary["data_points"] == 28 and len(curve(tmp_path / "resumed")) == 7 + 4
    steps = [row for row in curve(tmp_path / "straight") if row["type"] == "step"]
    assert all(row["reward"] < 0 and row["weights"] == {"reflection": 1.0} for row in steps)   # log of a probability


def test_validation_schedule_and_convergence_window_exclude_step_0(tiny, tmp_path):
    model, tokenizer = tiny
    args = make_args(max_steps=20, val_every=2, cv_window=3, cv_tolerance=10.0)   # any 3 counted validations stop
    summary = scst.train(copy.deepcopy(model), tokenizer, SCORERS, examples(8), [e.prompt for e in examples(3)],
                         args, str(tmp_path / "run"))
    validations = [row for row in curve(tmp_path / "run") if row["type"] == "validation"]
    assert [row["step"] for row in validations] == [0, 2, 4, 6] and summary["converged"] and summary["steps"] == 6
    assert all(row["prompts"] == 3 and row["samples"] == 9 for row in validations)


def test_dynaopt_run_logs_the_weights_of_every_step(tiny, tmp_path):
    model, tokenizer = tiny
    args = make_args(objective="dynaopt", max_steps=12, val_every=2)
    summary = scst.train(copy.deepcopy(model), tokenizer, SCORERS, examples(8), [e.prompt for e in examples(2)],
                         args, str(tmp_path / "dyna"))
    assert summary["steps"] == 12 and set(summary["final_validation"]) == {"reflection", "empathy", "fluency"}
    assert os.path.exists(tmp_path / "dyna" / "adapter" / "adapter_model.safetensors")
    rows = curve(tmp_path / "dyna")
    steps = [row for row in rows if row["type"] == "step"]
    assert all(list(row["weights"]) == ["reflection", "empathy", "fluency"] for row in steps)
    assert all(sum(row["weights"].values()) == pytest.approx(1.0) for row in steps)
    assert len({tuple(row["weights"].values()) for row in steps}) > 3          # they move during the run
    for before, row in zip(steps, steps[1:]):                # "no change" keeps them; an objective arm raises its own
        if row["arm"] == "no change":
            assert row["weights"] == before["weights"]
        else:
            assert row["weights"][row["arm"]] > before["weights"][row["arm"]]
    assert all("dynaopt" in row for row in rows if row["type"] == "validation" and row["step"] > 0)


@pytest.mark.parametrize("change", [dict(lr=1e-3), dict(batch_size=2), dict(beta=0.1), dict(samples_per_prompt=2),
                                    dict(top_k=0), dict(combine="mean"), dict(seed=1), dict(val_every=4),
                                    dict(cv_tolerance=0.02), dict(max_new_tokens=6), dict(data=True)])
def test_resume_refuses_a_changed_setting(tiny, tmp_path, change):
    model, tokenizer = tiny
    change = dict(change)   # a copy: pytest hands every run of this process the same parameter dict
    train, validation = examples(8), [e.prompt for e in examples(2)]
    scst.train(copy.deepcopy(model), tokenizer, SCORERS, train, validation, make_args(max_steps=2), str(tmp_path))
    os.remove(tmp_path / "summary.json")
    if change.pop("data", False):
        train = examples(9)
    with pytest.raises(files.InputError) as error:
        scst.train(copy.deepcopy(model), tokenizer, SCORERS, train, validation, make_args(max_steps=4, **change),
                   str(tmp_path))
    flag = "--" + next(iter(change)).replace("_", "-") if change else "training/validation prompts"
    assert flag in str(error.value) and "\n" not in str(error.value)


def test_resume_may_grow_max_steps_and_refuses_another_objective(tiny, tmp_path):
    model, tokenizer = tiny
    train, validation = examples(8), [e.prompt for e in examples(2)]
    scst.train(copy.deepcopy(model), tokenizer, SCORERS, train, validation, make_args(max_steps=2), str(tmp_path / "a"))
    os.remove(tmp_path / "a" / "summary.json")
    summary = scst.train(copy.deepcopy(model), tokenizer, SCORERS, train, validation, make_args(max_steps=4),
                         str(tmp_path / "a"))
    assert summary["steps"] == 4 and len(curve(tmp_path / "a")) == 4 + 3
    os.makedirs(tmp_path / "b")
    os.replace(tmp_path / "a" / "checkpoint.pt", tmp_path / "b" / "checkpoint.pt")
    with pytest.raises(files.InputError, match="objective reflection, not empathy"):
        scst.train(copy.deepcopy(model), tokenizer, SCORERS, train, validation, make_args(objective="empathy"),
                   str(tmp_path / "b"))


def test_a_run_killed_before_its_first_checkpoint_logs_each_record_once(tiny, tmp_path):
    model, tokenizer = tiny
    run_dir = tmp_path / "run"
    os.makedirs(run_dir)
    (run_dir / "train.jsonl").write_text(json.dumps({"type": "validation", "step": 0}) + "\n")
    (run_dir / "train.log").write_text("val  0 | reward 0.5\n")             # what the killed start had written
    scst.train(copy.deepcopy(model), tokenizer, SCORERS, examples(8), [e.prompt for e in examples(2)],
               make_args(max_steps=2), str(run_dir))
    assert [(row["type"], row["step"]) for row in curve(run_dir)] == [("validation", 0), ("step", 1), ("step", 2),
                                                                      ("validation", 2)]
    assert len((run_dir / "train.log").read_text().splitlines()) == 4


def test_progress_bar_closes_at_the_true_end(tiny, tmp_path, capsys):
    model, tokenizer = tiny
    args = make_args(max_steps=1000, val_every=2, cv_window=2, cv_tolerance=10.0)
    scst.train(copy.deepcopy(model), tokenizer, SCORERS, examples(8), [e.prompt for e in examples(2)],
               args, str(tmp_path / "run"))
    bar = capsys.readouterr().err.replace("\r", "\n").splitlines()
    last = [line for line in bar if line.startswith("train reflection")][-1]
    assert last.startswith("train reflection: 4step") and "/1000" not in last   # converged at step 4 of 1000
    assert "3 validations (2 counted), CV 0." in last and "(stops < 10.0)" in last


def test_nan_reward_and_empty_split_are_input_errors(tiny, tmp_path):
    model, tokenizer = tiny
    nan_scorers = dict(SCORERS, reflection=lambda p, r: torch.full((len(r),), float("nan")))
    with pytest.raises(files.InputError, match="NaN|nan|finite"):
        scst.train(copy.deepcopy(model), tokenizer, nan_scorers, examples(4), ["a"], make_args(), str(tmp_path / "nan"))
    with pytest.raises(files.InputError, match="training split is empty"):
        scst.train(copy.deepcopy(model), tokenizer, SCORERS, [], ["a"], make_args(), str(tmp_path / "empty"))


def test_kl_of_the_first_step_is_zero_even_with_t5_dropout(tiny):
    model, tokenizer = tiny
    noisy = copy.deepcopy(model)
    for module in noisy.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.3                                   # T5's dropout must not leak into the KL term
    noisy = adapted_copy(noisy)
    args = make_args()
    optimizer = torch.optim.AdamW(lora.adapter_parameters(noisy, "reflection"), lr=args.lr)
    stats = scst.scst_step(noisy, tokenizer, SCORERS, optimizer, [e.prompt for e in examples(4)], {"reflection": 1.0},
                           args, torch.Generator().manual_seed(0))
    assert abs(stats["kl"]) < 1e-5


def test_each_objective_has_its_own_random_state_and_reproduces(tiny, tmp_path, monkeypatch):
    """The authors train the objectives one after another from one set_seed (el_training.py:321-330): each
    continues the global stream, so no two share a LoRA init, batch order or sampling noise. Here each
    run's state comes from (seed, objective): two objectives' step-1 samples (from the same base policy,
    B = 0) differ, and the same objective and seed draws the same again."""
    model, tokenizer = tiny
    drawn = []
    sample = scst.sample_responses
    monkeypatch.setattr(scst, "sample_responses", lambda *a, **k: drawn.append(sample(*a, **k)) or drawn[-1])

    def step_one(objective, folder):
        args = make_args(objective=objective, max_steps=1, val_every=100)
        scst.train(copy.deepcopy(model), tokenizer, SCORERS, examples(8), [e.prompt for e in examples(2)], args,
                   str(tmp_path / folder))
        lora_a = files.load_safetensors(str(tmp_path / folder / "adapter"))
        return drawn[-1], [v for k, v in sorted(lora_a.items()) if "lora_A" in k]

    reflection, reflection_a = step_one("reflection", "r")
    empathy, empathy_a = step_one("empathy", "e")
    again, again_a = step_one("reflection", "r2")
    assert not torch.equal(reflection, empathy)
    assert not torch.equal(reflection_a[0], empathy_a[0])
    assert torch.equal(reflection, again) and all(torch.equal(a, b) for a, b in zip(reflection_a, again_a))
    assert scst.run_seed(0, "reflection") != scst.run_seed(0, "empathy") != scst.run_seed(1, "empathy")


# ----------------------------------------------------------------------------- objectives, bandits, CV by hand
def test_training_rewards_combination_and_scoring():
    """The baselines train on all three objectives unless --objectives names others; a single-objective run
    on its own objective; their reward combination keeps the scores' dtype and device; `score` hands each
    scorer the prompts and names it when a reward is NaN."""
    from argparse import Namespace
    assert scst.trained_objectives(Namespace(objective="uniform")) == \
        scst.trained_objectives(Namespace(objective="dynaopt", objectives=None)) == list(rewards.OBJECTIVES)
    assert scst.trained_objectives(Namespace(objective="uniform", objectives="empathy,autonomy")) == ["empathy", "autonomy"]
    assert scst.trained_objectives(Namespace(objective="dynaopt", objectives=["fluency"])) == ["fluency"]
    assert scst.trained_objectives(Namespace(objective="empathy", objectives="reflection,fluency")) == ["empathy"]
    scores = torch.tensor([[0.3, 0.6, 0.9]], dtype=torch.float64)
    assert abs(scst.combine_rewards(scores, [1 / 3] * 3, "mean").item() - 0.6) < 1e-15
    assert scst.combine_rewards(torch.empty(2, 3, device="meta"), [1 / 3] * 3, "logsum").device.type == "meta"
    seen = []
    scorers = {"reflection": lambda p, r: (seen.append(p), torch.tensor([0.5]))[1],
               "empathy": lambda p, r: torch.tensor([float("nan")])}
    assert scst.score(scorers, ["reflection"], ["i feel sad"], ["you are sad"]).tolist() == [[0.5]]
    assert seen == [["i feel sad"]]
    with pytest.raises(InputError, match=r"^NaN reward from empathy scorer \(row 0\)"):
        scst.score(scorers, ["empathy"], ["i feel sad"], ["you are sad"])


def test_exp3_default_gamma_and_repeated_updates():
    """DynaOpt's Exp3 with γ = 0.07 by default; a second reward for the same arm multiplies its weight again."""
    bandit = scst.Exp3(3)
    bandit.update(0, 0.3)  # p0 = 1/3: w0 = exp(0.07 · 0.9 / 3)
    p0 = bandit.probabilities()[0]
    assert p0 == pytest.approx(0.93 * math.exp(0.021) / (math.exp(0.021) + 2) + 0.07 / 3)
    bandit.update(0, 0.3)
    assert bandit.weights[0] == pytest.approx(math.exp(0.021) * math.exp(0.07 * 0.3 / p0 / 3))


def test_coefficient_of_variation_by_hand():
    """The convergence rule's CV (population std / |mean|) in float64: a spread of 1e-9 around 1 is seen
    (float32 would round it away); a zero mean is an infinite CV, a constant curve a CV of 0."""
    history = [1.0 + 1e-9 * i for i in range(20)]
    expected = 1e-9 * math.sqrt((20 ** 2 - 1) / 12) / (1.0 + 9.5e-9)
    assert scst.coefficient_of_variation(history) == pytest.approx(expected, rel=1e-5)
    assert scst.coefficient_of_variation([0.0] * 20) == math.inf
    assert scst.coefficient_of_variation([1.0] * 20) == 0.0


def test_dynaopt_uses_its_gamma_and_seed_and_resumes_from_its_state():
    """DynaOpt's bandits both use the given γ (hand values with γ = 0.5); the same seed draws the same arms;
    state() through JSON (as the checkpoint stores it) and load() continue the run exactly."""
    import json as _json
    bandit = scst.DynaOpt(2, gamma=0.5, seed=3)
    bandit.arm = 0
    assert bandit.step_weights() == pytest.approx([math.e ** 0.5 / (math.e ** 0.5 + 1), 1 / (math.e ** 0.5 + 1)])
    bandit.arm = 1
    bandit.validation(0.4)                  # outer K = 3, p = 1/3: w = exp(γ · 0.4 / (p K))
    assert bandit.outer.weights == pytest.approx([1.0, math.exp(0.5 * 0.4), 1.0])

    def run(bandit, steps):
        out = []
        for i in range(steps):
            out.append((bandit.arm, bandit.step_weights()))
            bandit.validation(0.1 * (i % 3) - 0.05)
        return out
    assert run(scst.DynaOpt(3, 0.07, seed=5), 40) == run(scst.DynaOpt(3, 0.07, seed=5), 40)
    first = scst.DynaOpt(3, 0.07, seed=1)
    run(first, 7)
    second = scst.DynaOpt(3, 0.07, seed=2)
    second.load(_json.loads(_json.dumps(first.state())))
    assert run(second, 30) == run(first, 30)
