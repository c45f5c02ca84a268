"""SCST + KL (scst.py): the arithmetic on hand-made numbers, the KL's gradient, the convergence rule,
Exp3 on a hand-computed case, and resume-after-kill == uninterrupted run."""
import argparse
import copy
import json
import os
import random

import pytest
import torch

import lora
import scst
import t5
from data import Example


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


def test_single_objective_reward_is_the_raw_score_and_logsum_combines():
    scores = torch.tensor([[0.5, 0.2, 0.9]])
    assert scst.combine_rewards(scores[:, :1], [1.0], "logsum").item() == pytest.approx(0.5)
    expected = sum(w * torch.log(torch.tensor(s)).item() for w, s in zip([0.2, 0.3, 0.5], [0.5, 0.2, 0.9]))
    assert scst.combine_rewards(scores, [0.2, 0.3, 0.5], "logsum").item() == pytest.approx(expected, rel=1e-5)
    assert scst.combine_rewards(scores, [0.2, 0.3, 0.5], "mean").item() == pytest.approx(0.1 + 0.06 + 0.45)


# ----------------------------------------------------------------------------- with a tiny T5
WORDS = "you feel tired and worried about work family sleep the of a it is that so much right now".split()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    import sentencepiece as spm
    folder = tmp_path_factory.mktemp("tiny_t5")
    rng = random.Random(0)
    sentences = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12))) for _ in range(300)]
    (folder / "corpus.txt").write_text("\n".join(sentences))
    spm.SentencePieceTrainer.train(input=str(folder / "corpus.txt"), model_prefix=str(folder / "spiece"), vocab_size=40,
                                   pad_id=0, eos_id=1, unk_id=2, bos_id=-1, model_type="unigram", minloglevel=2)
    tokenizer = t5.T5Tokenizer(str(folder / "spiece.model"))
    config = t5.T5Config(vocab_size=tokenizer.vocab_size, d_model=16, d_kv=4, d_ff=32, num_layers=1,
                         num_decoder_layers=1, num_heads=2, dropout_rate=0.0)
    torch.manual_seed(0)
    model = t5.T5ForConditionalGeneration(config)
    return model, tokenizer


def length_scorer(prompts, responses):
    """A deterministic stand-in reward: prefers responses of about six words."""
    return torch.tensor([1.0 / (1.0 + abs(len(r.split()) - 6)) for r in responses])


def word_scorer(prompts, responses):
    return torch.tensor([min(1.0, r.count("you") / 3 + 0.01) for r in responses])


SCORERS = {"reflection": length_scorer, "empathy": word_scorer, "fluency": length_scorer}


def make_args(**overrides):
    args = dict(objective="reflection", seed=0, device="cpu", max_steps=6, batch_size=4, samples_per_prompt=3,
                max_new_tokens=8, lr=1e-2, beta=0.05, grad_clip=2.0, val_every=2, cv_window=20, cv_tolerance=0.015,
                combine="logsum", gamma=0.07, policy="tiny", objectives=["reflection", "empathy", "fluency"])
    args.update(overrides)
    return argparse.Namespace(**args)


def examples(n):
    rng = random.Random(1)
    return [Example(prompt=" ".join(rng.choice(WORDS) for _ in range(6)) + f" {i}", responses={}) for i in range(n)]


def adapted_copy(model, perturb=False):
    model = copy.deepcopy(model)
    lora.add_adapter(model, "reflection")
    if perturb:
        generator = torch.Generator().manual_seed(3)
        with torch.no_grad():
            for parameter in lora.adapter_parameters(model, "reflection"):
                parameter.add_(0.3 * torch.randn(parameter.shape, generator=generator))
    return model


def one_step(model, tokenizer, beta):
    args = make_args(beta=beta)
    optimizer = torch.optim.AdamW(lora.adapter_parameters(model, "reflection"), lr=args.lr)
    generator = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    scst.scst_step(model, tokenizer, SCORERS, optimizer, [e.prompt for e in examples(4)], [1.0], args, generator)
    return {n: p.detach().clone() for n, p in model.named_parameters()}


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


def test_beta_changes_the_update(tiny):
    model, tokenizer = tiny
    without_kl = one_step(adapted_copy(model, perturb=True), tokenizer, beta=0.0)
    with_kl = one_step(adapted_copy(model, perturb=True), tokenizer, beta=0.05)
    differences = [(without_kl[n] - with_kl[n]).abs().max().item() for n in without_kl if ".lora_" in n]
    assert max(differences) > 1e-7                           # the public code's inert KL would give 0 here


def test_one_step_moves_only_adapter_weights(tiny):
    model, tokenizer = tiny
    adapted = adapted_copy(model, perturb=True)
    before = {n: p.detach().clone() for n, p in adapted.named_parameters()}
    after = one_step(adapted, tokenizer, beta=0.05)
    moved = {n for n in before if not torch.equal(before[n], after[n])}
    assert moved and all(".lora_" in n for n in moved)


class Killed(Exception):
    pass


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

    straight = t5.load_safetensors(str(tmp_path / "straight" / "adapter"))
    resumed = t5.load_safetensors(str(tmp_path / "resumed" / "adapter"))
    assert straight.keys() == resumed.keys()
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)

    def curve(folder):
        lines = [json.loads(line) for line in (tmp_path / folder / "train.jsonl").read_text().splitlines()]
        return [{k: v for k, v in line.items() if k != "seconds"} for line in lines]
    assert curve("straight") == curve("resumed")
    summary = json.loads((tmp_path / "resumed" / "summary.json").read_text())
    assert summary["steps"] == 7 and summary["data_points"] == 28 and len(curve("resumed")) == 7 + 4


def test_dynaopt_trains_with_bandit_weights(tiny, tmp_path):
    model, tokenizer = tiny
    args = make_args(objective="dynaopt", max_steps=4, val_every=2)
    summary = scst.train(copy.deepcopy(model), tokenizer, SCORERS, examples(8), [e.prompt for e in examples(2)],
                         args, str(tmp_path / "dyna"))
    assert summary["steps"] == 4 and set(summary["final_validation"]) == {"reflection", "empathy", "fluency"}
    assert os.path.exists(tmp_path / "dyna" / "adapter" / "adapter_model.safetensors")


def test_nan_reward_and_empty_split_are_input_errors(tiny, tmp_path):
    model, tokenizer = tiny
    nan_scorers = dict(SCORERS, reflection=lambda p, r: torch.full((len(r),), float("nan")))
    with pytest.raises(t5.InputError, match="NaN|nan|finite"):
        scst.train(copy.deepcopy(model), tokenizer, nan_scorers, examples(4), ["a"], make_args(), str(tmp_path / "nan"))
    with pytest.raises(t5.InputError, match="training split is empty"):
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
    stats = scst.scst_step(noisy, tokenizer, SCORERS, optimizer, [e.prompt for e in examples(4)], [1.0], args,
                           torch.Generator().manual_seed(0))
    assert abs(stats["kl"]) < 1e-5
