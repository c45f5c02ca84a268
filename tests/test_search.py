"""search.py / report.py: ensemble decoding (Eq. 2, Appendix 11.1-11.2) against single-adapter greedy
decoding and a no-cache recompute, Algorithm 1 against a plain reference and known optima, resume,
Pareto/hypervolume on hand-computed fronts, the SVG, and the promised InputErrors."""
import contextlib
import copy
import itertools
import json
import math
import xml.etree.ElementTree as ET

import numpy as np
import pytest
import torch
from torch import nn

import lora
import report
import search
import files
import t5
from files import InputError

NAMES = ["reflection", "empathy", "fluency"]


# ----------------------------------------------------------------------------- tiny model with adapters
@pytest.fixture(scope="module", params=["v1.0-tied-relu", "v1.1-untied-gated"])
def tiny(request):
    """float64 (so bmm vs matmul round-off can never flip an argmax) random T5 with 3 adapters whose B
    matrices are perturbed (B = 0 at init would make every adapter equal the base model). Both T5
    flavours: tied head with the d_model^-0.5 rescale (t5-base), untied gated-gelu (v1.1/flan)."""
    torch.manual_seed(0)
    tied = request.param.startswith("v1.0")
    cfg = t5.T5Config(vocab_size=48, d_model=16, d_kv=4, d_ff=32, num_layers=2, num_heads=2, dropout_rate=0.0,
                      tie_word_embeddings=tied, feed_forward_proj="relu" if tied else "gated-gelu")
    model = t5.T5ForConditionalGeneration(cfg).double()
    if tied:  # std 1 embeddings tied to the head make a random model repeat its last token forever
        with torch.no_grad():
            model.shared.weight.normal_(0.0, 0.05)
    for name in ("a", "b", "c", "a_copy"):
        lora.add_adapter(model, name, r=4, alpha=8, dropout=0.0)
    with torch.no_grad():
        for _, m in lora._layers(model):
            for name in ("a", "b", "c"):
                m.lora_B[name].normal_(0.0, 0.3)
            m.lora_A["a_copy"].copy_(m.lora_A["a"])
            m.lora_B["a_copy"].copy_(m.lora_B["a"])
    model.eval()
    ids = torch.randint(3, cfg.vocab_size, (3, 7))
    mask = torch.ones_like(ids)
    ids[2, 5:], mask[2, 5:] = 0, 0  # a padded row
    return model, ids, mask


def single(model, name, ids, mask, steps=10):
    lora.set_adapter(model, name)
    try:
        return t5.generate(model, ids, mask, max_new_tokens=steps)[0]
    finally:
        lora.set_adapter(model, None)


@pytest.mark.parametrize("level", search.LEVELS)
def test_one_hot_ensemble_equals_single_adapter_greedy(tiny, level):
    model, ids, mask = tiny
    singles = [single(model, n, ids, mask) for n in ("a", "b", "c")]
    assert not torch.equal(singles[0], singles[1]) or not torch.equal(singles[1], singles[2])  # adapters differ
    for i, expected in enumerate(singles):
        weights = [0.0, 0.0, 0.0]
        weights[i] = 1.0 if level == "param" else 0.7  # hidden/logit: any positive scale (normalised)
        got = search.ensemble_generate(model, ["a", "b", "c"], weights, ids, mask, level=level, max_new_tokens=10)
        assert torch.equal(got, expected), (level, i)
    assert all(m.unmerged is None for _, m in lora._layers(model))  # param level unmerged again


@pytest.mark.parametrize("level", search.LEVELS)
def test_two_equal_adapters_with_half_weights_equal_one(tiny, level):
    model, ids, mask = tiny
    expected = single(model, "a", ids, mask)
    got = search.ensemble_generate(model, ["a", "a_copy"], [0.5, 0.5], ids, mask, level=level, max_new_tokens=10)
    assert torch.equal(got, expected)


def reference_ensemble(model, names, weights, ids, mask, level, steps):
    """The naive way (the public code's): K separate models (base + one adapter each, merged by hand),
    no KV cache, the whole sequence (encoder included) recomputed at every step, on one shared prefix.
    param: ONE model W + Σ_i w_i·s·B_i A_i with the raw weights."""
    import copy
    total = sum(weights)

    def merged(coefficients):  # a deep copy with W <- W + Σ c_i (alpha/r) B_i A_i written out by hand
        m = copy.deepcopy(model)
        lora.set_adapter(m, None)
        with torch.no_grad():
            for _, layer in lora._layers(m):
                for n, c in coefficients.items():
                    layer.weight += c * layer.scaling(n) * (layer.lora_B[n] @ layer.lora_A[n])
        return m
    if level == "param":
        models, weights = [merged(dict(zip(names, weights)))], [1.0]
    else:
        models, weights = [merged({n: 1.0}) for n in names], [w / total for w in weights]
    prefix = torch.zeros(ids.shape[0], 1, dtype=torch.long)
    done = torch.zeros(ids.shape[0], dtype=torch.bool)
    for _ in range(steps):
        hidden, probs = 0, 0
        for m, w in zip(models, weights):
            f = m.decode(prefix, m.encode(ids, mask), mask)[0][:, -1]
            hidden, probs = hidden + w * f, probs + w * torch.softmax(m.logits(f), -1)
        scores = models[0].logits(hidden) if level in ("hidden", "param") else torch.log(probs)
        token = scores.argmax(-1).masked_fill(done, 0)
        prefix = torch.cat([prefix, token[:, None]], 1)
        done |= token == 1
        if done.all():
            break
    return prefix[:, 1:]


@pytest.mark.parametrize("level", search.LEVELS)
def test_cached_mixed_batch_equals_naive_recompute(tiny, level):
    model, ids, mask = tiny
    names, weights = ["a", "b", "c"], [0.6, 0.3, 0.1]
    with torch.no_grad():
        expected = reference_ensemble(model, names, weights, ids, mask, level, 10)
    got = search.ensemble_generate(model, names, weights, ids, mask, level=level, max_new_tokens=10)
    assert torch.equal(got, expected)
    assert not any(torch.equal(got, single(model, n, ids, mask)) for n in names)  # a real mixture


def test_logit_level_is_a_probability_mixture_not_a_logit_sum():
    """The audit's 3-token case: Σ w z = (3, 2, 4) picks token 2; Σ w softmax(z) = (0.4384, 0.2939, 0.2676)
    picks token 0."""
    z = torch.tensor([[5.0, 0.0, 4.0], [0.0, 5.0, 4.0]])
    w = torch.tensor([0.6, 0.4])
    mixture = search.mixture_log_probs(z, w)
    expected = torch.log(0.6 * torch.softmax(z[0], -1) + 0.4 * torch.softmax(z[1], -1))
    torch.testing.assert_close(mixture, expected)
    torch.testing.assert_close(mixture.exp(), torch.tensor([0.4384, 0.2939, 0.2676]), atol=1e-4, rtol=0)
    assert int(mixture.argmax()) == 0 and int((w[:, None] * z).sum(0).argmax()) == 2


def test_logit_and_hidden_levels_choose_different_tokens(tiny):
    model, ids, mask = tiny
    names = ["a", "b", "c"]
    differ = 0
    for weights in ([0.6, 0.3, 0.1], [0.2, 0.5, 0.3], [0.4, 0.1, 0.5], [1, 1, 1]):
        hidden, logit = (search.ensemble_generate(model, names, weights, ids, mask, level=level, max_new_tokens=10)
                         for level in ("hidden", "logit"))
        differ += not torch.equal(hidden, logit)
    assert differ >= 1


def test_param_level_uses_the_raw_weights(tiny):
    """θ0 + Σ w_i ΔW_i is not ray-invariant: (0.6, 0.3, 0.1) and 3x that are different models; the hidden
    and logit levels decode the same tokens for both."""
    model, ids, mask = tiny
    names, small, large = ["a", "b", "c"], [0.2, 0.1, 0.0], [1.0, 0.5, 0.0]
    decode = lambda w, level: search.ensemble_generate(model, names, w, ids, mask, level=level, max_new_tokens=10)  # noqa: E731
    with torch.no_grad():
        assert torch.equal(decode(large, "param"), reference_ensemble(model, names, large, ids, mask, "param", 10))
        assert torch.equal(decode(small, "param"), reference_ensemble(model, names, small, ids, mask, "param", 10))
    assert not torch.equal(decode(small, "param"), decode(large, "param"))
    for level in ("hidden", "logit"):
        assert torch.equal(decode(small, level), decode(large, level))


def test_sampled_ensemble_is_seeded_and_top_k(tiny):
    model, ids, mask = tiny
    for level in search.LEVELS:
        runs = [search.ensemble_generate(model, ["a", "b"], [0.5, 0.5], ids, mask, level=level, max_new_tokens=10,
                                         do_sample=True, top_k=50, generator=torch.Generator().manual_seed(seed))
                for seed in (1, 1, 2)]
        assert torch.equal(runs[0], runs[1])
    greedy = search.ensemble_generate(model, ["a", "b"], [1, 0], ids, mask, level="param", max_new_tokens=10,
                                      do_sample=True, top_k=1, generator=torch.Generator().manual_seed(3))
    assert torch.equal(greedy, single(model, "a", ids, mask))  # top-1 sampling = greedy


def test_ensemble_rejects_bad_weights_and_level(tiny):
    model, ids, mask = tiny
    for weights in ([0, 0, 0], [1, 1], [1, -1, 1]):
        with pytest.raises(InputError):
            search.ensemble_generate(model, ["a", "b", "c"], weights, ids, mask)
    with pytest.raises(InputError, match="level"):
        search.ensemble_generate(model, ["a", "b", "c"], [1, 1, 1], ids, mask, level="token")


class Tok:
    """ids <-> words "t<id>" (a stand-in tokenizer for the tiny model: a word's id is a hash of its letters,
    tensors made on `device`); policy_input appends " [SEP] "."""

    def batch_encode(self, texts, max_length=128, device="cpu"):
        rows = [[3 + (sum(map(ord, w)) % 40) for w in t.split()][: max_length - 1] + [1] for t in texts]
        out = torch.zeros(len(rows), max(map(len, rows)), dtype=torch.long, device=device)
        for i, r in enumerate(rows):
            out[i, : len(r)] = torch.tensor(r)
        return out, (out != 0).long()

    def batch_decode(self, tokens):
        return [" ".join(f"t{i}" for i in row if i > 1) for row in tokens.tolist()]


def test_make_objective_scores_the_decoded_texts(tiny):
    model, ids, mask = tiny

    prompts = ["i feel sad", "work is hard today", "nothing helps", "hello there you"]
    seen = []
    scorers = {"length": lambda p, r: torch.tensor([min(len(x) / 40, 1.0) for x in r]),
               "has_t5": lambda p, r: (seen.extend(zip(p, r)), torch.tensor([float("t5" in x.split()) for x in r]))[1]}
    objective = search.make_objective(model, Tok(), ["a", "b", "c"], scorers, prompts, batch_size=3, max_new_tokens=6)
    mean, per = objective([0.0, 1.0, 0.0])
    ids, mask = Tok().batch_encode([p + " [SEP] " for p in prompts])
    texts = Tok().batch_decode(single(model, "b", ids, mask, steps=6))
    clip = lambda s: min(max(s, 1e-4), 0.9999)  # noqa: E731 - every score clipped, as el_aggregation.py:160
    expected = [np.mean([clip(min(len(x) / 40, 1.0)) for x in texts]), np.mean([clip(float("t5" in x.split())) for x in texts])]
    assert 0 < expected[1] < 1 and per == pytest.approx(expected, rel=1e-6) and mean == pytest.approx(sum(expected) / 2)
    assert seen == list(zip(prompts, texts))  # scorers get the raw prompt and its own response
    weighted = search.make_objective(model, Tok(), ["a", "b", "c"], scorers, prompts, batch_size=3, max_new_tokens=6,
                                     preference=[0.9, 0.1])([0.0, 1.0, 0.0])
    assert weighted[1] == per and weighted[0] == pytest.approx(0.9 * per[0] + 0.1 * per[1])   # Σ λ_i s_i, not the mean


def test_make_objective_encodes_each_chunk_once_for_every_weight_vector(tiny, monkeypatch):
    """The hidden and logit levels' encoder does not depend on the weights: one ensemble_encode per chunk of
    prompts for a whole search, and the decodes equal those of a fresh objective (each encoding anew); the
    parameter level encodes inside its merged model, never through ensemble_encode."""
    model, ids, mask = tiny
    prompts = ["i feel sad", "work is hard today", "nothing helps", "hello there you"]
    scorers = {"length": lambda p, r: torch.tensor([min(len(x) / 40, 1.0) for x in r])}
    calls, encode = [], search.ensemble_encode
    monkeypatch.setattr(search, "ensemble_encode", lambda *a: calls.append(a[2].shape[0]) or encode(*a))
    for level, expected_calls in (("hidden", [3, 1]), ("logit", [3, 1]), ("param", [])):
        calls.clear()
        objective = search.make_objective(model, Tok(), ["a", "b", "c"], scorers, prompts, level=level, batch_size=3,
                                          max_new_tokens=6)
        got = [objective(w) for w in ([0.0, 1.0, 0.0], [0.5, 0.2, 0.3], [1.0, 0.0, 0.0])]
        assert calls == expected_calls, level                    # chunk sizes 3 and 1, once each
        fresh = [search.make_objective(model, Tok(), ["a", "b", "c"], scorers, prompts, level=level, batch_size=3,
                                       max_new_tokens=6)(w) for w in ([0.0, 1.0, 0.0], [0.5, 0.2, 0.3], [1.0, 0.0, 0.0])]
        assert got == fresh, level


# ----------------------------------------------------------------------------- Algorithm 1
def cosine_objective(peak, calls=None):
    """Scale-invariant smooth peak: cosine between the direction and `peak` (decoding sees only w/Σw)."""
    peak = np.asarray(peak, dtype=float)

    def objective(weights):
        if calls is not None:
            calls.append(tuple(weights))
        if not any(weights):
            return -math.inf, [-math.inf] * len(weights)
        w = np.asarray(search.normalise(weights))  # what ensemble_generate decodes with
        value = float(w @ peak / np.linalg.norm(w) / np.linalg.norm(peak))
        return value, [value - 0.01 * i for i in range(len(w))]
    return objective


def plain_algorithm_1(objective, d, iterations):
    """Algorithm 1 as printed: every grid point of every iteration evaluated, nothing shared."""
    best_point, best_score, bounds, all_bounds, evaluations = None, -math.inf, [(0.0, 1.0)] * d, [], 0
    for _ in range(iterations):
        all_bounds.append([list(b) for b in bounds])
        points = list(itertools.product(*[(lo, (lo + hi) / 2, hi) for lo, hi in bounds]))
        results = {}
        for p in points:
            results[p] = objective(list(p))[0]
            evaluations += 1
        current = max(points, key=results.__getitem__)
        if results[current] > best_score:
            best_point, best_score = list(current), results[current]
        region, region_total = None, -math.inf
        for halves in itertools.product((0, 1), repeat=d):
            cube = [(lo, (lo + hi) / 2) if h == 0 else ((lo + hi) / 2, hi) for (lo, hi), h in zip(bounds, halves)]
            total = sum(results[c] for c in itertools.product(*cube))
            if region is None or total > region_total:
                region, region_total = cube, total
        bounds = region
    return best_point, best_score, all_bounds, evaluations


def distance_to_ray(point, peak):
    """min over c >= 0 of max_i |point_i - c·peak_i| (the optimum of a scale-invariant objective is a ray)."""
    point, peak = np.asarray(point), np.asarray(peak)
    return min(np.abs(point - c * peak).max() for c in np.linspace(0.0, 1.0 / peak.max(), 20001))


@pytest.mark.parametrize("peak", [(0.3, 0.9), (0.8, 0.5, 0.05), (1.0, 0.2, 0.6), (0.2, 0.7, 0.4, 0.9)])
def test_search_finds_known_optimum_and_matches_plain_algorithm(peak):
    d, calls = len(peak), []
    result = search.hierarchical_grid_search(cosine_objective(peak, calls), d, iterations=5)
    assert distance_to_ray(result["best_weights"], peak) <= 1 / 32  # within one final grid cell
    plain_best, plain_score, plain_bounds, plain_count = plain_algorithm_1(cosine_objective(peak), d, 5)
    assert result["best_weights"] == plain_best and result["best_score"] == plain_score
    assert [it["bounds"] for it in result["iterations"]] == plain_bounds
    assert len(calls) == len(result["evaluations"]) == len({search.ray_key(c) for c in calls})  # each ray once
    assert len(calls) <= search.max_evaluations(d, 5) < plain_count
    print(f"d={d} peak={peak}: {len(calls)} distinct evaluations (memo only <= {search.max_evaluations(d, 5) + 1}, "
          f"plain {plain_count}) best {result['best_weights']}")
    if d == 3:
        assert len(calls) <= 95  # 19 rays in iteration 1, <= 19 new per refinement


def test_memo_equals_plain_with_ties():
    """A coarse objective full of ties: the fixed lexicographic tie rule must give the plain result."""
    cosine = cosine_objective((0.6, 0.3, 0.5))

    def objective(w):
        value = cosine(w)[0]
        value = round(value, 1) if math.isfinite(value) else value
        return value, [value]
    result = search.hierarchical_grid_search(objective, 3, iterations=4)
    best, score, bounds, _ = plain_algorithm_1(objective, 3, 4)
    assert (result["best_weights"], result["best_score"]) == (best, score)
    assert [it["bounds"] for it in result["iterations"]] == bounds
    first = result["iterations"][0]
    assert first["means"].count(1.0) > 2 and result["best_score"] == 1.0  # real ties, e.g. (0.5,0.5,0.5) ~ (1,1,1)
    # The first maximum in lexicographic order of iteration 1; later equal scores never replace it.
    assert result["best_weights"] == first["points"][first["means"].index(1.0)] == [0.5, 0.5, 0.5]


def distance_objective(target, calls=None):
    """Not ray-invariant (like the raw-weight parameter level): -||w - target||^2, finite at w = 0 too."""
    def objective(weights):
        if calls is not None:
            calls.append(tuple(weights))
        value = -float(sum((w - t) ** 2 for w, t in zip(weights, target)))
        return value, [value]
    objective.ray_invariant = False
    return objective


@pytest.mark.parametrize("target", [(0.3, 0.3, 0.3), (0.25, 0.25), (0.9, 0.1, 0.4)])
def test_point_memo_equals_plain_algorithm_for_a_non_ray_invariant_objective(target):
    d, calls = len(target), []
    result = search.hierarchical_grid_search(distance_objective(target, calls), d, iterations=5)
    best, score, bounds, _ = plain_algorithm_1(distance_objective(target), d, 5)
    assert (result["best_weights"], result["best_score"]) == (best, score)
    assert [it["bounds"] for it in result["iterations"]] == bounds
    assert len(calls) == len(set(calls)) == len(result["evaluations"]) <= search.max_evaluations(d, 5, False)
    assert max(abs(b - t) for b, t in zip(best, target)) <= 1 / 32
    assert (0.0,) * d in calls  # w = 0 (the base model at the param level) is a point like any other


def test_a_ray_keyed_memo_is_wrong_for_a_non_ray_invariant_objective():
    """The audit's minimal case: keyed by the ray, (0.25, 0.25) would reuse the score of (0.5, 0.5)."""
    plain = plain_algorithm_1(distance_objective((0.25, 0.25)), 2, 2)
    assert search.hierarchical_grid_search(distance_objective((0.25, 0.25)), 2, 2)["best_weights"] == plain[0] == [0.25, 0.25]
    by_ray = search.hierarchical_grid_search(distance_objective((0.25, 0.25)), 2, 2, ray_invariant=True)
    assert by_ray["best_weights"] != [0.25, 0.25]


@pytest.mark.parametrize("level", search.LEVELS)
def test_search_on_the_real_objective_equals_plain_algorithm(tiny, level):
    model, _, _ = tiny
    scorers = {"length": lambda p, r: torch.tensor([min(len(x) / 30, 1.0) for x in r]),
               "t7": lambda p, r: torch.tensor([x.split().count("t7") / 4 for x in r])}
    prompts = ["i feel sad", "work is hard today", "nothing helps"]
    objective = search.make_objective(model, Tok(), ["a", "b"], scorers, prompts, level=level, max_new_tokens=6)
    assert objective.ray_invariant == (level != "param")
    calls = []

    def counted(w):
        calls.append(tuple(w))
        return objective(w) if any(w) or level == "param" else (-math.inf, [])
    counted.ray_invariant = objective.ray_invariant
    result = search.hierarchical_grid_search(counted, 2, iterations=3)
    best, score, bounds, plain_count = plain_algorithm_1(counted, 2, 3)
    assert (result["best_weights"], result["best_score"]) == (best, score)
    assert [it["bounds"] for it in result["iterations"]] == bounds


def test_zero_weights_are_never_decoded():
    calls = []
    result = search.hierarchical_grid_search(cosine_objective((0.1, 0.1), calls), 2, iterations=3)
    assert all(sum(c) > 0 for c in calls)
    assert result["iterations"][0]["means"][0] is None  # (0, 0): -inf, stored as null
    assert (0.0, 0.0) not in [tuple(r["weights"]) for r in result["evaluations"]]


def test_resume_after_interruption_reproduces_uninterrupted_run():
    peak = (0.8, 0.5, 0.05)
    full = search.hierarchical_grid_search(cosine_objective(peak), 3, iterations=5)
    logged, calls = [], []

    def dying(w, budget=[40]):
        budget[0] -= 1
        if budget[0] < 0:
            raise KeyboardInterrupt  # like kill: the log holds what finished
        return cosine_objective(peak)(w)
    with pytest.raises(KeyboardInterrupt):
        search.hierarchical_grid_search(dying, 3, iterations=5, on_eval=logged.append)
    assert len(logged) == 40
    log = json.loads(json.dumps(logged))  # as read back from search.json
    resumed = search.hierarchical_grid_search(cosine_objective(peak, calls), 3, iterations=5, log=log)
    logged_rays = {search.ray_key(r["weights"]) for r in logged}
    assert calls and not logged_rays & {search.ray_key(c) for c in calls}  # nothing re-evaluated
    assert len(calls) == len(full["evaluations"]) - 40
    strip = lambda r: [{k: v for k, v in e.items() if k != "seconds"} for e in r["evaluations"]]  # noqa: E731
    assert strip(resumed) == strip(full)
    assert {k: resumed[k] for k in ("best_weights", "best_score", "iterations")} == \
           {k: full[k] for k in ("best_weights", "best_score", "iterations")}


def test_run_search_writes_log_resumes_and_reports(tmp_path, capsys):
    out, svg = tmp_path / "search.json", tmp_path / "search.svg"
    peak, meta = (0.8, 0.5, 0.05), {"adapters": ["runs/a", "runs/b", "runs/c"], "level": "hidden"}
    count = [0]

    def dying(w):
        count[0] += 1
        if count[0] > 25:
            raise KeyboardInterrupt
        return cosine_objective(peak)(w)
    with pytest.raises(KeyboardInterrupt):
        search.run_search(dying, NAMES, str(out), iterations=3, meta=meta)
    assert len(files.read_json(str(out))["evaluations"]) == 25  # written after every evaluation
    calls = []
    final = search.run_search(cosine_objective(peak, calls), NAMES, str(out), iterations=3, svg_path=str(svg), meta=meta)
    reference = search.hierarchical_grid_search(cosine_objective(peak), 3, iterations=3)
    assert final["best_weights"] == reference["best_weights"] and len(calls) == len(reference["evaluations"]) - 25
    stored = files.read_json(str(out))
    assert stored["best_weights"] == reference["best_weights"] and stored["pareto"]["front"]
    assert ET.fromstring(svg.read_text()).tag.endswith("svg")
    captured = capsys.readouterr()
    printed = captured.out
    assert "100%|" in captured.err.splitlines()[-1] or "100%|" in captured.err.split("\r")[-1]  # bar closed at its end
    assert "resuming: 25 evaluations" in printed and "Pareto front" in printed and "hypervolume" in printed
    line = report.format_evaluation(12, 102, {"weights": [0.75, 0.5, 0.0], "scores": [0.8123, 0.655, 0.7011],
                                              "mean": 0.7228, "seconds": 1.23}, NAMES)
    assert line == "eval 12/102 | w=(0.750,0.500,0.000) | reflection 0.812 empathy 0.655 fluency 0.701 | mean 0.723 | 1.2s"
    again = search.run_search(cosine_objective(peak, calls), NAMES, str(out), iterations=3, meta=meta)
    assert again["best_weights"] == final["best_weights"] and len(calls) == len(reference["evaluations"]) - 25
    assert len(again["iterations"]) == 3 and again["evaluations"] == stored["evaluations"]  # finished: nothing re-run
    with pytest.raises(InputError, match="different search: meta.level .the file has .hidden., this search .logit."):
        search.run_search(cosine_objective(peak), NAMES, str(out), iterations=3, meta={**meta, "level": "logit"})
    with pytest.raises(InputError, match="different search: num_iterations"):
        search.run_search(cosine_objective(peak), NAMES, str(out), iterations=4, meta=meta)


# ----------------------------------------------------------------------------- Pareto, hypervolume, SVG
def test_pareto_front_hand_case():
    points = [(1, 2), (2, 1), (1, 1), (2, 2), (0, 3), (2, 2)]
    assert report.pareto_front(points) == [3, 4, 5]  # (2,2) twice: equal points do not dominate
    assert report.pareto_front([(0.5, 0.2, 0.9), (0.4, 0.2, 0.9), (0.1, 0.9, 0.1)]) == [0, 2]


def test_hypervolume_hand_cases():
    assert report.hypervolume([(1, 3), (2, 2), (3, 1)]) == 6.0  # 3·1 + 2·1 + 1·1
    assert report.hypervolume([(1, 3), (2, 2), (3, 1), (1, 1)]) == 6.0  # a dominated point adds nothing
    assert report.hypervolume([(3, 3)], reference=(1, 2)) == 2.0
    assert report.hypervolume([(0.5, -1.0)]) == 0.0  # below the reference in one objective
    assert report.hypervolume([(1, 1, 1)]) == 1.0
    assert report.hypervolume([(2, 1, 1), (1, 2, 1)]) == 3.0  # 2 + 2 - 1
    assert report.hypervolume([(2, 1, 1), (1, 2, 1), (1, 1, 2)]) == 4.0  # 6 - 3·1 + 1
    assert report.hypervolume([(0.5, 0.5, 0.5), (1.0, 0.25, 0.5)]) == pytest.approx(0.125 + 0.0625)
    assert report.hypervolume([]) == 0.0


def test_pareto_report_keeps_non_dominated_records():
    records = [{"weights": [1, 0], "direction": [1, 0], "scores": [0.9, 0.1], "mean": 0.5},
               {"weights": [0, 1], "direction": [0, 1], "scores": [0.2, 0.8], "mean": 0.5},
               {"weights": [1, 1], "direction": [.5, .5], "scores": [0.1, 0.1], "mean": 0.1}]
    rep = report.pareto_report(records, ["x", "y"])
    assert [r["weights"] for r in rep["front"]] == [[1, 0], [0, 1]]
    assert rep["hypervolume"] == pytest.approx(0.9 * 0.1 + 0.2 * 0.7)
    assert "hypervolume 0.2300" in report.format_report(rep)


SVG = "{http://www.w3.org/2000/svg}"


def svg_weights(element):
    """The weights in a marker's tooltip "...w=(a,b,c) ..." as floats."""
    text = element.find(SVG + "title").text
    return [float(w) for w in text[text.index("w=(") + 3:text.index(")")].split(",")]


@pytest.mark.parametrize("d", [2, 3, 4])
def test_svg_panels_slices_markers_best_and_chosen_boxes(d):
    """Figure 5 for d = 2, 3, 4: a panel per iteration, 3^(d-2) slices per panel, in each slice one marker per
    grid point whose w3..wd are the slice's values, placed by w1 (x) and w2 (y); the red box of the next
    bounds in 2^(d-2) slices of every iteration but the last; one ring, on Algorithm 1's best weights."""
    names = ["reflection", "empathy", "fluency", "autonomy"][:d]
    result = search.hierarchical_grid_search(cosine_objective((0.8, 0.5, 0.05, 0.3)[:d]), d, iterations=3)
    root = ET.fromstring(report.search_svg(result["iterations"], names))
    panels = [g for g in root.iter(SVG + "g") if g.get("class") == "panel"]
    assert len(panels) == 3
    rings = []
    for number, (panel, it) in enumerate(zip(panels, result["iterations"])):
        slices = [g for g in panel.iter(SVG + "g") if g.get("class") == "slice"]
        assert len(slices) == 3 ** (d - 2)
        shown, frames = [], []
        for one in slices:
            titles = [t.text for t in one.iter(SVG + "text") if t.get("class") == "title"]
            rest = [float(t.split(" = ")[1]) for t in reversed(titles)]
            assert [t.split(" = ")[0] for t in reversed(titles)] == names[2:]
            markers = [c for c in one.iter(SVG + "circle") if c.get("class") == "point"]
            assert len(markers) == 9 and all(svg_weights(c)[2:] == rest for c in markers)
            for a, b in itertools.combinations(markers, 2):   # x grows with w1, y (downwards) shrinks with w2
                (wa, wb), (xa, xb) = (svg_weights(a), svg_weights(b)), (float(a.get("cx")), float(b.get("cx")))
                assert (wa[0] < wb[0]) == (xa < xb) and (wa[1] < wb[1]) == (float(a.get("cy")) > float(b.get("cy")))
            shown += [svg_weights(c) for c in markers]
            frame = one.find(SVG + "rect")
            frames.append((rest, float(frame.get("x")), float(frame.get("y"))))
            rings += [(number, svg_weights(c), c.get("cx"), c.get("cy"), [(m.get("cx"), m.get("cy")) for m in markers
                       if svg_weights(m) == svg_weights(c)]) for c in one.iter(SVG + "circle") if c.get("class") == "best"]
        assert sorted(shown) == sorted(it["points"])               # every grid point shown once
        for (rest_a, xa, ya), (rest_b, xb, yb) in itertools.combinations(frames, 2):   # columns: w3; rows: w4
            assert (rest_a[:1] < rest_b[:1]) == (xa < xb) and (rest_a[1:] < rest_b[1:]) == (ya < yb)
        chosen = sum(r.get("class") == "chosen" for r in panel.iter(SVG + "rect"))
        assert chosen == (0 if number == 2 else 2 ** (d - 2))      # no box after the last iteration
    assert len(rings) == 1
    number, weights, cx, cy, under = rings[0]
    assert weights == result["best_weights"] and under == [(cx, cy)]
    found = result["iterations"][number]
    assert found["means"][found["points"].index(weights)] == result["best_score"] == max(m for m in found["means"] if m is not None)
    assert all(m is None or m < result["best_score"] for it in result["iterations"][:number] for m in it["means"])
    assert any(c.get("fill") == "#bbbbbb" for c in root.iter(SVG + "circle"))  # w = 0, never decoded
    with pytest.raises(InputError, match="d >= 2"):
        report.search_svg(search.hierarchical_grid_search(cosine_objective((1.0,)), 1, iterations=1)["iterations"], ["x"])


def test_svg_best_point_follows_algorithm_1_ties():
    """The ring follows Alg. 1, lines 10-14: the first maximum of an iteration, replaced only by a strictly
    better one later (a tie in a later iteration keeps the earlier point)."""
    history = [{"means": [None, 0.5, 0.9, 0.9]}, {"means": [0.9, 0.8, 0.2, 0.1]}, {"means": [0.1, 0.95, 0.95, 0.0]}]
    assert report.best_point(history) == (2, 1)
    assert report.best_point(history[:2]) == (0, 2)
    assert report.best_point([{"means": [None, None]}]) is None


# ----------------------------------------------------------------------------- weights on the command line
def test_parse_weights():
    assert search.parse_weights("0.8,0.5,0.05", 3) == [0.8, 0.5, 0.05]
    assert search.parse_weights(" 1 , 0 ", 2) == [1.0, 0.0]
    for text, message in [("0.8,x,0.05", "^weights '0.8,x,0.05': 'x' is not a number$"), ("0.8,0.5", "expected 3 weights"),
                          ("0.8,-0.5,0.05", "negative"), ("0,0,0", "all weights are zero"),
                          ("0.8,nan,0.1", "not a finite number"), ("0.8,inf,0.1", "not a finite number"), ("", "not a number")]:
        with pytest.raises(InputError, match=message) as e:
            search.parse_weights(text, 3)
        assert "\n" not in str(e.value)


# ----------------------------------------------------------------------------- defaults, levels, memo, devices
@pytest.fixture(scope="module")
def three_adapters():
    """float64 random T5 (v1.1 flavour, untied head) with three adapters whose B matrices are
    perturbed, so that the adapters, their mixture and their merge all decode differently."""
    torch.manual_seed(0)
    cfg = t5.T5Config(vocab_size=48, d_model=16, d_kv=4, d_ff=32, num_layers=2, num_heads=2, dropout_rate=0.0,
                      tie_word_embeddings=False, feed_forward_proj="gated-gelu")
    model = t5.T5ForConditionalGeneration(cfg).double()
    for name in ("a", "b", "c"):
        lora.add_adapter(model, name, r=4, alpha=8, dropout=0.0)
    with torch.no_grad():
        for _, m in lora._layers(model):
            for name in ("a", "b", "c"):
                m.lora_B[name].normal_(0.0, 0.3)
    return model.eval()


def test_make_objective_decodes_at_the_requested_level_with_64_new_tokens(three_adapters):
    """`search --level param` scores the merged model's texts (not the hidden level's), decoded with the
    default ≤ 64 new tokens (SPEC: all levels decode greedily, ≤ 64 tokens)."""
    model, tok = three_adapters, Tok()
    prompts, weights = ["i feel sad", "work is hard today", "nothing helps"], [0.5, 0.3, 0.2]
    ids, mask = tok.batch_encode([p + " [SEP] " for p in prompts])
    texts = {level: tok.batch_decode(search.ensemble_generate(model, ["a", "b", "c"], weights, ids, mask, level=level))
             for level in ("hidden", "param")}
    assert texts["hidden"] != texts["param"]  # the two levels differ on this model, so the test can fail
    assert max(len(t.split()) for t in texts["param"]) == 64  # a row runs to the cap: 65 would show
    for level in ("hidden", "param"):
        seen = []
        scorers = {"words": lambda p, r: (seen.extend(r), torch.tensor([len(x.split()) / 128 for x in r]))[1]}
        objective = search.make_objective(model, tok, ["a", "b", "c"], scorers, prompts, level=level)
        mean, per = objective(weights)
        assert seen == texts[level]
        assert per == pytest.approx([sum(len(x.split()) / 128 for x in texts[level]) / 3]) and mean == per[0]


def test_make_objective_without_prompts_says_so(three_adapters):
    with pytest.raises(InputError, match="^grid search: the aggregation split has no prompts$"):
        search.make_objective(three_adapters, Tok(), ["a", "b", "c"], {}, [])


def peak_objective(weights):
    """A smooth, scale-invariant objective with its maximum on the ray (0.8, 0.5, 0.05)."""
    if not any(weights):
        return -math.inf, [-math.inf] * 3
    w = torch.tensor(search.normalise(weights), dtype=torch.float64)
    peak = torch.tensor([0.8, 0.5, 0.05], dtype=torch.float64)
    value = float(w @ peak / w.norm() / peak.norm())
    return value, [value, value - 0.01, value - 0.02]


def test_run_search_defaults_write_search_json_with_5_iterations(tmp_path, monkeypatch, capsys):
    """README: `search` writes search.json; Algorithm 1 runs 5 iterations (§4.2). The file's header
    (objectives, num_iterations, meta) is what a resumed run is compared with."""
    monkeypatch.chdir(tmp_path)
    names = ["reflection", "empathy", "fluency"]
    result = search.run_search(peak_objective, names)
    stored = files.read_json("search.json")
    assert stored["objectives"] == names and stored["num_iterations"] == 5 and stored["meta"] is None
    assert len(stored["iterations"]) == 5 and len(result["iterations"]) == 5
    assert stored["best_weights"] == search.hierarchical_grid_search(peak_objective, 3)["best_weights"]
    # a file holding only the header (no evaluation yet) is a fresh start, not an error
    (tmp_path / "fresh.json").write_text(json.dumps({"objectives": names, "num_iterations": 2, "meta": None}))
    fresh = search.run_search(peak_objective, names, "fresh.json", iterations=2)
    assert len(fresh["evaluations"]) == len(search.hierarchical_grid_search(peak_objective, 3, 2)["evaluations"])
    with pytest.raises(InputError, match=r"^fresh.json: written by a different search: num_iterations \(the file has 2, "
                                         r"this search 3\); delete it or choose another output path$"):
        search.run_search(peak_objective, names, "fresh.json", iterations=3)


def test_param_level_is_the_weighted_sum_of_the_adapters_deltas(three_adapters):
    """Appendix 11.1 / Eq. (4): the parameter level decodes θ0 + Σ w_i ΔW_i with the RAW weights (as the public
    code merges, el_aggregation.py:273; README Fidelity). Oracle: the unmerged weighted forward
    W x + Σ w_i ΔW_i x (lora.weighted_adapters), greedy through t5.generate."""
    model, tok = three_adapters, Tok()
    ids, mask = tok.batch_encode(["i feel sad [SEP] ", "work is hard today [SEP] "])
    weights, raw = [0.5, 0.3, 0.2], [1.0, 0.6, 0.4]  # one ray, twice the deltas
    decoded = {}
    for w in (weights, raw):
        with lora.weighted_adapters(model, dict(zip("abc", w))):
            expected = t5.generate(model, ids, mask, max_new_tokens=12)[0]
        got = search.ensemble_generate(model, list("abc"), w, ids, mask, level="param", max_new_tokens=12)
        assert torch.equal(got, expected)
        decoded[tuple(w)] = got
    assert not torch.equal(decoded[tuple(weights)], decoded[tuple(raw)])  # raw, not w/Σw: the scale matters
    expected = decoded[tuple(weights)]
    hidden = search.ensemble_generate(model, list("abc"), weights, ids, mask, level="hidden", max_new_tokens=12)
    assert not torch.equal(hidden, expected)  # a different level: the test can tell them apart
    # defaults: the hidden level (Eq. 2) and 64 new tokens
    assert torch.equal(search.ensemble_generate(model, list("abc"), weights, ids, mask),
                       search.ensemble_generate(model, list("abc"), weights, ids, mask, level="hidden", max_new_tokens=64))
    with pytest.raises(InputError, match=r"^aggregation level 'token': expected one of hidden, logit, param$"):
        search.ensemble_generate(model, list("abc"), weights, ids, mask, level="token")


def test_ensemble_uses_the_models_start_eos_and_pad_ids(three_adapters):
    """Decoding follows the model's config (a checkpoint may use other ids than T5's 0/1/0): a one-hot
    ensemble equals the adapter's own t5.generate with a start id 5, an eos it actually emits and pad 2."""
    model, tok = three_adapters, Tok()
    ids, mask = tok.batch_encode(["i feel sad [SEP] ", "work is hard today [SEP] ", "nothing helps [SEP] "])
    cfg = model.config
    saved = (cfg.decoder_start_token_id, cfg.eos_token_id, cfg.pad_token_id)
    try:
        cfg.decoder_start_token_id = 5
        lora.set_adapter(model, "b")
        free = t5.generate(model, ids, mask, max_new_tokens=8)[0]
        cfg.eos_token_id, cfg.pad_token_id = int(free[0, 2]), 2  # row 0 stops at its 3rd token
        lora.set_adapter(model, "b")
        expected = t5.generate(model, ids, mask, max_new_tokens=8)[0]
        lora.set_adapter(model, None)
        assert expected.shape[1] > 3 and (expected[0, 3:] == 2).all()  # padded with pad id 2 after eos
        for level in search.LEVELS:
            got = search.ensemble_generate(model, list("abc"), [0, 1, 0], ids, mask, level=level, max_new_tokens=8)
            assert torch.equal(got, expected), level
    finally:
        cfg.decoder_start_token_id, cfg.eos_token_id, cfg.pad_token_id = saved
        lora.set_adapter(model, None)


def test_best_region_takes_the_sub_cube_with_the_highest_corner_sum():
    """Alg. 1, line 15 on a hand case: only the upper-right sub-cube's corners score high."""
    bounds = [(0.0, 1.0), (0.0, 1.0)]
    results = {p: (1.0 if p[0] >= 0.5 and p[1] >= 0.5 else 0.0) for p in search.grid_points(bounds)}
    assert search.best_region(bounds, results) == [(0.5, 1.0), (0.5, 1.0)]
    results[(0.0, 0.0)] = 10.0  # the lower-left corner outweighs: its cube wins
    assert search.best_region(bounds, results) == [(0.0, 0.5), (0.0, 0.5)]
    # first maximum wins on ties (enumeration: axis 1 slowest, lower half first)
    flat = {p: 0.0 for p in search.grid_points(bounds)}
    assert search.best_region(bounds, flat) == [(0.0, 0.5), (0.0, 0.5)]


def test_algorithm_1_defaults_inputs_and_records(monkeypatch):
    """5 iterations by default (§4.2); d = 1 and one iteration are valid, 0 is not; a log record of the
    wrong size is refused; each record holds its direction w/Σw, its iteration and its decode time
    rounded to ms (Eq. 3 adds these times to the aggregated methods' consumption)."""
    clock = iter(range(1000))
    monkeypatch.setattr(search.time, "perf_counter", lambda: next(clock) * 1.23456)  # every call: +1.23456 s
    result = search.hierarchical_grid_search(peak_objective, 3)
    assert len(result["iterations"]) == 5 and len(result["evaluations"]) <= search.max_evaluations(3, 5)
    # by ray (hidden, logit): I (3^d - 2^d); by exact point (param, w = 0 decoded): 3^d + (I - 1)(3^d - 2^d)
    assert search.max_evaluations(3, 5) == 5 * 19 and search.max_evaluations(3, 5, ray_invariant=False) == 27 + 4 * 19
    assert search.max_evaluations(3, 2) == 2 * 19 and search.max_evaluations(3, 2, False) == 27 + 19
    assert search.max_evaluations(2, 3) == 3 * 5 and search.max_evaluations(2, 3, False) == 9 + 2 * 5
    for record in result["evaluations"]:
        assert record["direction"] == search.normalise(record["weights"])
        assert record["seconds"] == 1.235
    iterations = [r["iteration"] for r in result["evaluations"]]
    assert iterations[0] == 1 and iterations == sorted(iterations) and iterations[-1] > 1
    assert search.hierarchical_grid_search(lambda w: (w[0], [w[0]]), 1, iterations=1)["best_weights"] == [0.5]
    for d, iterations in ((0, 5), (3, 0)):
        with pytest.raises(InputError, match=rf"^grid search: need d >= 1 objectives and >= 1 iterations, "
                                             rf"got d={d}, iterations={iterations}$"):
            search.hierarchical_grid_search(peak_objective, d, iterations)
    for record in ({"weights": [1, 0], "mean": 0.5}, {"weights": [1, -1, 0], "mean": 0.5}):
        with pytest.raises(InputError, match=r"^search log record 0: expected 3 weights >= 0 and a numeric mean, got "):
            search.hierarchical_grid_search(peak_objective, 3, log=[record])
    with pytest.raises(InputError, match=r"^objective returned nan at weights \[0.0, 0.0, 0.5\]$"):
        search.hierarchical_grid_search(lambda w: (math.nan, [math.nan]), 3)


def test_run_search_prints_each_evaluation_and_the_summary(tmp_path, monkeypatch, capsys):
    """What `search` prints: one line per evaluation ("eval n/total"), the Pareto report, then the best
    weights, the mean, the count of distinct evaluations against the plain algorithm's I·3^d, the files."""
    monkeypatch.chdir(tmp_path)
    result = search.run_search(peak_objective, ["x", "y", "z"], "s.json", iterations=2, svg_path="s.svg")
    lines = capsys.readouterr().out.splitlines()
    n = len(result["evaluations"])
    total = search.max_evaluations(3, 2)
    assert [line.split(" | ")[0] for line in lines[:n]] == [f"eval {i}/{total}" for i in range(1, n + 1)]
    best = ",".join(f"{w:.5g}" for w in result["best_weights"])
    assert lines[-1] == (f"best weights ({best}) | mean {result['best_score']:.4f} | {n} distinct evaluations "
                         f"(plain Algorithm 1: 54; memo per ray) | s.json | s.svg")
    assert files.read_json("s.json")["best_score"] == result["best_score"]
    assert lines[-2 - len(result["pareto"]["front"])].startswith("Pareto front: ")


def test_weight_errors_name_the_weights():
    with pytest.raises(InputError, match=r"^weights: expected 3 weights \(one per adapter\), got 1$"):
        search.check_weights([1.0], 3)
    with pytest.raises(InputError, match=r"^weights '0.8,0.5': expected 3 weights"):
        search.parse_weights("0.8,0.5", 3)


def test_weight_errors_say_what_is_wrong():
    with pytest.raises(InputError, match=r"^w: weight -0.5 is negative; weights must be >= 0$"):
        search.check_weights([1, -0.5], 2, what="w")
    for bad in ("nan", "inf"):
        with pytest.raises(InputError, match=rf"^weights: weight {bad} is not a finite number; weights must be >= 0$"):
            search.check_weights([1, float(bad)], 2)


def test_memo_keys_and_header_differences():
    """memo_key's default is the ray (hidden / logit level); a search.json header compared field by field,
    naming the first differing field (a dotted path inside meta)."""
    assert search.memo_key([1, 1]) == search.memo_key([0.5, 0.5]) != search.memo_key([1, 1], False)
    header = {"objectives": ["a"], "meta": {"level": "hidden", "data": "x"}}
    assert search.header_difference(header, header) is None
    assert search.header_difference({"objectives": ["a"], "meta": {"level": "param", "data": "x"}}, header) == \
        'meta.level (the file has "param", this search "hidden")'
    assert search.header_difference({"objectives": ["a"], "meta": None}, header) == \
        'meta (the file has null, this search {"level": "hidden", "data": "x"})'
    assert search.header_difference(header, {"objectives": ["a"], "meta": None}) == \
        'meta (the file has {"level": "hidden", "data": "x"}, this search null)'


def test_param_level_search_memoises_points_and_resumes_from_its_log(tmp_path, monkeypatch, capsys):
    """Parameter level (objective.ray_invariant False): one evaluation per grid point, w = 0 included (the
    base model, direction 0); run_search's totals and summary say so; a resumed search re-uses every logged
    point and evaluates nothing again; `info` is stored in search.json (not compared); bad files are refused."""
    monkeypatch.chdir(tmp_path)

    def objective(weights):
        value = 0.1 + 0.3 * weights[0] + 0.2 * weights[1] - 0.25 * weights[0] * weights[1]
        return value, [value, value]
    objective.ray_invariant = False
    result = search.run_search(objective, ["x", "y"], "p.json", iterations=2, info={"adapters": ["a", "b"]})
    lines = capsys.readouterr().out.splitlines()
    total = search.max_evaluations(2, 2, ray_invariant=False)
    assert len(result["evaluations"]) == total == 9 + 5
    assert [line.split(" | ")[0] for line in lines[:total]] == [f"eval {i}/{total}" for i in range(1, total + 1)]
    assert lines[-1].endswith("(plain Algorithm 1: 18; memo per point) | p.json")
    zero = [r for r in result["evaluations"] if r["weights"] == [0.0, 0.0]]
    assert len(zero) == 1 and zero[0]["direction"] == [0.0, 0.0]
    stored = files.read_json("p.json")
    assert stored["info"] == {"adapters": ["a", "b"]} and len(stored["evaluations"]) == total

    def refuse(weights):
        raise AssertionError(f"re-evaluated {weights}")
    refuse.ray_invariant = False
    again = search.run_search(refuse, ["x", "y"], "p.json", iterations=2)
    assert again["best_weights"] == result["best_weights"] and "info" not in files.read_json("p.json")
    assert search.hierarchical_grid_search(refuse, 2, 2, log=stored["evaluations"])["best_weights"] == result["best_weights"]
    with pytest.raises(InputError, match=r"^search log record 0: expected 2 weights >= 0 and a numeric mean, got 5$"):
        search.hierarchical_grid_search(objective, 2, log=[5])
    (tmp_path / "list.json").write_text("[]")
    with pytest.raises(InputError, match=r"^list.json: not a search result \(expected a JSON object\); delete it or choose another --out$"):
        search.run_search(objective, ["x", "y"], "list.json")
    (tmp_path / "bad.json").write_text(json.dumps({"objectives": ["x", "y"], "num_iterations": 5, "meta": None,
                                                   "evaluations": {}}))
    with pytest.raises(InputError, match=r"^bad.json: 'evaluations' must be a list$"):
        search.run_search(objective, ["x", "y"], "bad.json")


def test_fingerprint_hashes_names_and_contents(tmp_path):
    """search.json stores sha256 (16 hex digits) of each adapter folder's files (name, NUL, bytes, sorted by
    name; hidden files and sub-folders left out) or of a data file, not their paths."""
    import hashlib
    folder = tmp_path / "adapter"
    folder.mkdir()
    (folder / "b.json").write_bytes(b"{}")
    (folder / "a.safetensors").write_bytes(b"weights")
    (folder / ".tmp-1").write_bytes(b"leftover")
    (folder / "sub").mkdir()
    (tmp_path / "data.csv").write_bytes(b"x,y")
    expected = hashlib.sha256(b"a.safetensors\0weights" + b"b.json\0{}" + b"data.csv\0x,y").hexdigest()[:16]
    assert search.fingerprint(str(folder), str(tmp_path / "data.csv")) == expected


def test_ensemble_generate_hands_the_loop_its_sampling_and_device(three_adapters, monkeypatch):
    """ensemble_generate samples top-50 by default (the public code's parameter level), greedy without top-k,
    and everything it makes is on the inputs' device (a model on meta: the loop is stubbed after one step)."""
    import copy
    model = copy.deepcopy(three_adapters).to("meta")
    ids = torch.zeros(2, 4, dtype=torch.long, device="meta")
    seen = []

    def loop(next_logits, batch_size, **kwargs):
        logits = next_logits(torch.zeros(batch_size, dtype=torch.long, device=kwargs["device"]))
        seen.append((kwargs, logits.device.type))
        return torch.zeros(batch_size, 1, dtype=torch.long), torch.zeros(batch_size, 1)
    monkeypatch.setattr(search.t5, "decode_loop", loop)
    rows = []   # mixed_adapters checks its row index by value, which a meta tensor has not: record it instead
    monkeypatch.setattr(search.lora, "mixed_adapters",
                        lambda model, names, row_adapter: rows.append(row_adapter.device.type) or contextlib.nullcontext())
    for level in search.LEVELS:
        search.ensemble_generate(model, ["a", "b"], [0.5, 0.5], ids, torch.ones_like(ids), level=level, do_sample=True)
        kwargs, device = seen[-1]
        assert (kwargs["do_sample"], kwargs["top_k"], kwargs["device"], device) == (True, 50, torch.device("meta"), "meta")
    assert rows == ["meta"] * 4         # hidden and logit levels: the encoder (ensemble_encode), then the decoder
    search.ensemble_generate(model, ["a", "b"], [0.5, 0.5], ids, torch.ones_like(ids))
    assert seen[-1][0]["do_sample"] is False and seen[-1][0]["max_new_tokens"] == 64


def test_logit_level_mixture_is_computed_in_at_least_fp32():
    """Appendix 11.2: log Σ_i w_i softmax(z_i), in float32 for bfloat16 logits, in float64 for float64 ones,
    on the logits' device."""
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 7, dtype=torch.float64)
    weights = [0.3, 0.7]
    expected = torch.log(sum(w * torch.softmax(z, -1) for w, z in zip(weights, logits)))
    got = search.mixture_log_probs(logits, weights)
    assert got.dtype == torch.float64 and torch.allclose(got, expected, rtol=0, atol=1e-15)
    half = logits.to(torch.bfloat16)
    expected = torch.log(sum(w * torch.softmax(z.float(), -1) for w, z in zip(weights, half)))
    got = search.mixture_log_probs(half, weights)
    assert got.dtype == torch.float32 and torch.allclose(got, expected, rtol=0, atol=1e-6)
    assert search.mixture_log_probs(logits.to("meta"), weights).device.type == "meta"


def test_make_objective_puts_the_prompts_on_its_device(monkeypatch):
    seen = []
    monkeypatch.setattr(search.data, "encode_prompts",
                        lambda tokenizer, texts, device="unset": seen.append(device) or (None, None))
    search.make_objective(nn.Identity(), None, ["a"], {}, ["p"] * 3, batch_size=2, device="cuda:1")
    assert seen == ["cuda:1", "cuda:1"]


def test_hidden_level_mixes_in_the_models_dtype(three_adapters):
    """A bfloat16 policy (a common way to load T5): Σ w_i f_i stays bfloat16 for the bfloat16 LM head, and
    a one-hot mixture still equals the adapter's own greedy decoding."""
    import copy

    model, tok = copy.deepcopy(three_adapters).to(torch.bfloat16), Tok()
    ids, mask = tok.batch_encode(["i feel sad [SEP] ", "work is hard today [SEP] "])
    lora.set_adapter(model, "c")
    expected = t5.generate(model, ids, mask, max_new_tokens=6)[0]
    lora.set_adapter(model, None)
    for level in ("hidden", "logit"):
        got = search.ensemble_generate(model, list("abc"), [0, 0, 2], ids, mask, level=level, max_new_tokens=6)
        assert torch.equal(got, expected)
