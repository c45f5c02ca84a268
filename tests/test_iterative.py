"""IterativeRS (iterative.py): Eq. (10) and the subset draw by hand, B.3's candidate sets; m = T equals the
parameter-level merge of adapters trained independently (scst.train, same seed and steps); round 2 starts
from base + soup 1 while its KL reference is the base with the soup off; a kill mid-round and mid-merge
resumes to the identical soup and log; the soup file is loaded strictly, and evaluate decodes it as a
sampled single-policy row; bad flags are one `error:` line, exit 2."""
import argparse
import copy
import json
import os
import subprocess
import sys

import pytest
import torch

import evaluate
import files
import iterative
import lora
import scst
from data import encode_prompts
from files import InputError
from test_scst import SCORERS, Killed, examples, length_scorer, make_args, tiny, word_scorer  # noqa: F401

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN, VALIDATION = examples(10), [e.prompt for e in examples(3)]


def iterative_args(**overrides):
    args = vars(make_args())
    args.update(objective="iterative", objectives=["reflection", "empathy"], weights=None, merge_every=1, max_steps=2,
                subset=None, selective=False, select_prompts=4)
    args.update(overrides)
    return argparse.Namespace(**args)


def run(tiny, run_dir, scorers=SCORERS, **overrides):
    """An IterativeRS run on a copy of the tiny T5 (two objectives, two rounds of one step unless overridden)."""
    model, tokenizer = tiny
    return iterative.train_iterative(copy.deepcopy(model), tokenizer, scorers, TRAIN, VALIDATION,
                                     iterative_args(**overrides), str(run_dir))


def records(run_dir, kind=None):
    rows = [json.loads(line) for line in open(os.path.join(run_dir, "train.jsonl")).read().splitlines()]
    return [{k: v for k, v in row.items() if not k.endswith("seconds")} for row in rows if kind in (None, row["type"])]


# ----------------------------------------------------------------------------- pure pieces
def test_merge_coefficients_are_eq_10_by_hand():
    weights = {"a": 0.5, "b": 0.3, "c": 0.2}
    assert iterative.merge_coefficients(weights, ["a", "c"]) == pytest.approx({"a": 0.5 / 0.7, "c": 0.2 / 0.7})
    assert iterative.merge_coefficients(weights, ["a", "b", "c"]) == pytest.approx(weights)
    assert iterative.merge_coefficients(weights, ["b"]) == {"b": 1.0}


def test_subsets_are_seeded_draws_without_replacement():
    names = ["a", "b", "c", "d"]
    drawn = iterative.draw_subsets(names, 2, 50, seed=3)
    assert drawn == iterative.draw_subsets(names, 2, 50, seed=3) != iterative.draw_subsets(names, 2, 50, seed=4)
    assert all(len(s) == len(set(s)) == 2 and s == sorted(s, key=names.index) for s in drawn)
    assert {n for s in drawn for n in s} == set(names) and len({tuple(s) for s in drawn}) == 6   # all 6 pairs occur
    assert iterative.draw_subsets(names, 4, 3, seed=0) == [names] * 3


def test_candidates_are_b3s_seven_sets_for_three_objectives():
    sets = [list(c.values()) for c in iterative.candidate_coefficients(["a", "b", "c"])]
    expected = [[1 / 3] * 3, [1 / 6, 5 / 12, 5 / 12], [5 / 12, 1 / 6, 5 / 12], [5 / 12, 5 / 12, 1 / 6],
                [1 / 6, 1 / 6, 2 / 3], [1 / 6, 2 / 3, 1 / 6], [2 / 3, 1 / 6, 1 / 6]]       # merge_iterativers.py's list
    assert sets == [pytest.approx(e) for e in expected]
    assert all(sum(c.values()) == pytest.approx(1) for n in (2, 4) for c in iterative.candidate_coefficients(list("abcd")[:n]))
    assert iterative.candidate_coefficients(["a"]) == [{"a": 1.0}]


@pytest.mark.parametrize("plan, message", [
    (dict(merge_every=3, max_steps=10), "does not divide"),
    (dict(weights=[0.5, 0.3, 0.2]), "expected 2 weights"),
    (dict(subset=3), "--subset 3"),
    (dict(objectives=["reflection"]), "at least 2"),
    (dict(weights=[1.0, 0.0], subset=1), "only zero weights"),
])
def test_a_plan_algorithm_1_cannot_run_is_an_input_error(plan, message):
    args = dict(objectives=["reflection", "empathy"], weights=None, merge_every=1, max_steps=2, subset=None)
    args.update(plan)
    with pytest.raises(InputError, match=message):
        iterative.check_plan(**args)


# ----------------------------------------------------------------------------- the two limits and the reference
def test_one_round_is_the_parameter_merge_of_independently_trained_adapters(tiny, tmp_path):
    """m = T: Rewarded Soups at λ = w, i.e. θ0 + Σ λ_i s B_i A_i of the adapters `train <objective>` makes."""
    model, tokenizer = tiny
    run(tiny, tmp_path / "iterative-0", weights=[0.7, 0.3], merge_every=3, max_steps=3)
    independent = copy.deepcopy(model)
    for name in ("reflection", "empathy"):
        scst.train(copy.deepcopy(model), tokenizer, SCORERS, TRAIN, VALIDATION,
                   make_args(objective=name, max_steps=3, val_every=2), str(tmp_path / name))
        lora.load_adapter(independent, str(tmp_path / name / "adapter"), name)
    lora.merge(independent, {"reflection": 0.7, "empathy": 0.3})
    souped = copy.deepcopy(model)
    iterative.load_soup(souped, str(tmp_path / "iterative-0"))
    merged = dict(independent.named_parameters())
    moved = 0
    for name, parameter in souped.named_parameters():
        torch.testing.assert_close(parameter, merged[name], rtol=0, atol=1e-6)
        moved += (parameter - dict(model.named_parameters())[name]).abs().max().item() > 1e-3
    assert moved >= 4                                        # the soup is far from the base: the check has teeth


def test_round_two_starts_from_the_soup_and_its_kl_reference_is_the_base_without_it(tiny, tmp_path, monkeypatch):
    model, tokenizer = tiny
    ids, mask = encode_prompts(tokenizer, ["you feel tired and worried"], "cpu")
    decoder = torch.tensor([[0, 5, 6, 7]])
    with torch.no_grad():
        base_logits = model.eval()(ids, mask, decoder)
    run_dir = tmp_path / "iterative-0"
    checked, seen = [], []
    real_step = scst.scst_step

    def probing_step(model_, tokenizer_, scorers, optimizer, prompts, weights, args, generator, reference):
        name = args.objective
        first = not any(o is optimizer for o in seen)          # a round's first step: each round a new optimiser
        seen.append(optimizer)                                 # (kept alive, so no id is reused)
        if first and all(p.abs().max() == 0 for n, p in scst.adapter_tensors(model_, name) if ".lora_B." in n):
            tensors, metadata = iterative.read_soup(str(run_dir / iterative.SOUP_FILE)) if (run_dir / iterative.SOUP_FILE).exists() else ({}, {})
            souped = copy.deepcopy(model)                   # W0 + Δ by hand, from the soup file of round 1
            with torch.no_grad():
                for key, delta in tensors.items():
                    souped.get_submodule(key.rsplit(".", 1)[0]).weight.add_(delta)
            model_.eval()
            with torch.no_grad():
                start = model_(ids, mask, decoder)
                with reference(model_):
                    ref = model_(ids, mask, decoder)
                expected_start = souped.eval()(ids, mask, decoder)
            torch.testing.assert_close(start, expected_start, rtol=0, atol=1e-5)   # starts at base + soup
            assert torch.equal(ref, base_logits)                                  # reference: the base, soup off
            checked.append((metadata.get("rounds"), (start - base_logits).abs().max().item()))
        return real_step(model_, tokenizer_, scorers, optimizer, prompts, weights, args, generator, reference=reference)

    monkeypatch.setattr(scst, "scst_step", probing_step)
    run(tiny, run_dir, merge_every=2, max_steps=4)
    assert [r for r, _ in checked] == [None, None, "1", "1"]           # two experts, two rounds
    assert checked[0][1] == 0 and checked[2][1] > 1e-3                # round 2's start is not the base
    steps = records(run_dir, "step")
    first = {(s["round"], s["objective"]): s["kl"] for s in steps if s["step"] in (1, 3)}
    assert first[(1, "reflection")] == first[(1, "empathy")] == 0      # round 1 starts at the reference
    assert first[(2, "reflection")] > 1e-4 and first[(2, "empathy")] > 1e-4   # round 2 is the soup's distance away


# ----------------------------------------------------------------------------- resume
def soup_tensors(run_dir):
    return files.load_safetensors(os.path.join(run_dir, iterative.SOUP_FILE))


def assert_same_run(straight, resumed):
    a, b = soup_tensors(straight), soup_tensors(resumed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert records(straight) == records(resumed)
    sa, sb = (json.loads(open(os.path.join(d, "summary.json")).read()) for d in (straight, resumed))
    assert sa["data_points"] == sb["data_points"] == 2 * 2 * 2 * 4 and sa["final_validation"] == sb["final_validation"]


def test_a_kill_mid_round_resumes_to_the_identical_soup(tiny, tmp_path):
    model, _ = tiny
    run(tiny, tmp_path / "straight", merge_every=2, max_steps=4)
    calls = {"n": 0}

    def dying(prompts, responses):     # empathy calls: validation 0, round 1's 2 steps, validation 1, round 2 step 1
        calls["n"] += 1
        if calls["n"] == 5:
            raise Killed()
        return word_scorer(prompts, responses)

    with pytest.raises(Killed):
        run(tiny, tmp_path / "resumed", scorers=dict(SCORERS, empathy=dying), merge_every=2, max_steps=4)
    assert not (tmp_path / "resumed" / "summary.json").exists()
    run(tiny, tmp_path / "resumed", merge_every=2, max_steps=4)
    assert_same_run(tmp_path / "straight", tmp_path / "resumed")


@pytest.mark.parametrize("where", ["before the soup is written", "after the soup is written"])
def test_a_kill_mid_merge_resumes_to_the_identical_soup(tiny, tmp_path, monkeypatch, where):
    model, _ = tiny
    run(tiny, tmp_path / "straight", merge_every=2, max_steps=4)
    calls = {"n": 0}
    target, real = (iterative.Soup, "save") if where.startswith("before") else (iterative, "validate_soup")
    original = getattr(target, real)

    def dying(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:            # the second merge's write / the first merge's validation
            raise Killed()
        return original(*args, **kwargs)

    monkeypatch.setattr(target, real, dying)
    with pytest.raises(Killed):
        run(tiny, tmp_path / "resumed", merge_every=2, max_steps=4)
    monkeypatch.setattr(target, real, original)
    rounds = iterative.read_soup(str(tmp_path / "resumed" / iterative.SOUP_FILE))[1]["rounds"]
    assert rounds == "1"                                     # killed in merge 2 before its write / merge 1 after it
    run(tiny, tmp_path / "resumed", merge_every=2, max_steps=4)
    assert_same_run(tmp_path / "straight", tmp_path / "resumed")


def test_resume_refuses_other_settings(tiny, tmp_path):
    model, _ = tiny
    calls = {"n": 0}

    def dying(prompts, responses):                           # in round 1, after the step-0 checkpoint
        calls["n"] += 1
        if calls["n"] == 2:
            raise Killed()
        return word_scorer(prompts, responses)

    with pytest.raises(Killed):
        run(tiny, tmp_path / "r", scorers=dict(SCORERS, empathy=dying))
    with pytest.raises(InputError, match="started with --merge-every 1, not 2"):
        run(tiny, tmp_path / "r", merge_every=2, max_steps=2)


# ----------------------------------------------------------------------------- options
def test_selective_merging_picks_the_best_candidate_and_counts_its_prompts(tiny, tmp_path):
    model, _ = tiny
    summary = run(tiny, tmp_path / "s", selective=True, merge_every=1, max_steps=2)
    merges = records(tmp_path / "s", "merge")
    for merge in merges:
        rewards = [c["reward"] for c in merge["candidates"]]
        assert len(rewards) == 5 and merge["coefficients"] == merge["candidates"][rewards.index(max(rewards))]["coefficients"]
    # 2 rounds x 2 experts x 1 step x 4 prompts, + round 1: 5 candidates x 4 training prompts, round 2: x 3 validation
    assert summary["data_points"] == 16 + 5 * 4 + 5 * 3


def test_a_subset_trains_only_the_drawn_experts(tiny, tmp_path):
    model, _ = tiny
    run(tiny, tmp_path / "m", objectives=["reflection", "empathy", "fluency"], subset=1, merge_every=1, max_steps=3, seed=5)
    drawn = iterative.draw_subsets(["reflection", "empathy", "fluency"], 1, 3, seed=5)
    assert [[s["objective"] for s in records(tmp_path / "m", "step") if s["round"] == r + 1] for r in range(3)] == drawn
    assert [m["coefficients"] for m in records(tmp_path / "m", "merge")] == [{d[0]: 1.0} for d in drawn]


# ----------------------------------------------------------------------------- the output, evaluate
def test_the_soup_is_loaded_strictly(tiny, tmp_path):
    model, _ = tiny
    run(tiny, tmp_path / "iterative-0")
    folder = tmp_path / "iterative-0"
    tensors, metadata = iterative.read_soup(str(folder / iterative.SOUP_FILE))
    key = sorted(tensors)[0]

    def broken(change):
        bad = tmp_path / f"bad{len(os.listdir(tmp_path))}"
        bad.mkdir()
        (bad / iterative.CONFIG_FILE).write_text((folder / iterative.CONFIG_FILE).read_text())
        t, meta = dict(tensors), dict(metadata)
        change(t, meta)
        files.save_safetensors(t, str(bad / iterative.SOUP_FILE), meta)
        return str(bad)

    cases = [(lambda t, m: t.pop(key), "missing key"), (lambda t, m: t.update(extra=torch.zeros(1)), "unexpected key"),
             (lambda t, m: t.update({key: torch.zeros(3, 3)}), "shape"),
             (lambda t, m: t.update({key: torch.full_like(t[key], float("nan"))}), "NaN"),
             (lambda t, m: m.update(rounds="7"), "merges"), (lambda t, m: m.pop(lora.FINGERPRINT_KEY), "another base")]
    for change, message in cases:
        with pytest.raises(InputError, match=message):
            iterative.load_soup(copy.deepcopy(model), broken(change))
    other = copy.deepcopy(model)
    with torch.no_grad():
        next(other.parameters()).add_(1.0)
    with pytest.raises(InputError, match="another base"):
        iterative.load_soup(other, str(folder))
    with pytest.raises(InputError, match="not found"):
        iterative.load_soup(copy.deepcopy(model), str(tmp_path / "nowhere"))


def test_evaluate_decodes_the_soup_as_a_sampled_single_policy(tiny, tmp_path):
    model, tokenizer = tiny
    summary = run(tiny, tmp_path / "runs" / "iterative-0")
    scorers = {"reflection": length_scorer, "empathy": word_scorer}
    results = evaluate.evaluate(lambda: (copy.deepcopy(model), tokenizer), scorers, VALIDATION, str(tmp_path / "runs"), None,
                                batch_size=4, objectives=["reflection", "empathy"], generation_runs=2, seed=0)
    rows = results["iterative"]
    assert [r["decoding"] for r in rows] == ["top-50 sample"] * 2 and rows[0]["data points"] == summary["data_points"]
    souped = copy.deepcopy(model)
    iterative.load_soup(souped, str(tmp_path / "runs" / "iterative-0"))
    texts = evaluate.generate_texts(souped, tokenizer, VALIDATION, 4, "cpu", generator=torch.Generator().manual_seed(1))
    expected = evaluate.metrics(scorers, VALIDATION, texts, ["reflection", "empathy"])
    assert {k: rows[1][k] for k in expected} == expected


# ----------------------------------------------------------------------------- the command line
@pytest.mark.parametrize("flags, message", [
    (["--merge-every", "3", "--max-steps", "10"], "does not divide"),
    (["--merge-every", "0"], "--merge-every"),
    (["--merge-every", "-2"], "--merge-every"),
    (["--merge-every", "1", "--weights", "0.5,0.5"], "expected 3 weights"),
    (["--merge-every", "1", "--subset", "4"], "--subset 4"),
    (["--max-steps", "4"], "--merge-every"),
    (["--merge-every", "1", "--weights", "nan,1,1"], "weight"),
])
def test_bad_flags_are_one_error_line(flags, message, tmp_path):
    result = subprocess.run([sys.executable, os.path.join(ROOT, "emorl.py"), "train", "iterative", *flags,
                             "--runs", str(tmp_path)], capture_output=True, text=True, timeout=600)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert message in lines[0] and "Traceback" not in result.stderr and not os.listdir(tmp_path)


def test_iterative_flags_are_refused_elsewhere(tmp_path):
    result = subprocess.run([sys.executable, os.path.join(ROOT, "emorl.py"), "train", "reflection", "--merge-every", "2",
                             "--runs", str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert result.returncode == 2 and result.stderr.startswith("error: ") and "train iterative" in result.stderr


def test_generate_decodes_a_soup_greedily(tmp_path):
    """`generate --soup RUN` = greedy decoding of W0 + Δ (Δ made by hand here on the embedded policy)."""
    import t5
    policy = os.path.join(ROOT, "data", "default", "policy")
    model, tokenizer = t5.load_t5(policy)
    soup = iterative.Soup(model)
    generator = torch.Generator().manual_seed(0)
    delta = {path: 0.02 * torch.randn(d.shape, generator=generator) for path, d in soup.delta.items()}
    soup.save(str(tmp_path), delta, 1, {"coefficients": {}})
    files.write_json(str(tmp_path / iterative.CONFIG_FILE), {"method": "iterative", "target_modules": soup.targets, "rounds": 1})
    soup.delta = delta
    soup.apply()
    ids, mask = encode_prompts(tokenizer, ["I keep putting off my exams."], "cpu")
    expected = tokenizer.batch_decode(t5.generate(model.eval(), ids, mask, max_new_tokens=64)[0])
    result = subprocess.run([sys.executable, os.path.join(ROOT, "emorl.py"), "generate", "--soup", str(tmp_path),
                             "I keep putting off my exams."], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == expected
    base, _ = t5.load_t5(policy)
    assert expected != tokenizer.batch_decode(t5.generate(base.eval(), ids, mask, max_new_tokens=64)[0])  # the soup counts
