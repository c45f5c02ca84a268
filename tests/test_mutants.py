"""Tests written to kill mutants that survived `python bench/mutation.py` (README, "Mutation testing").

Each test checks a property of a public function against hand-computed values or an independent
oracle; the comment says which claim it protects. Fast: tiny tensors and tiny random models only."""
import math

import pytest
import torch

import rewards
from files import InputError


# ----------------------------------------------------------------------------- rewards.py
def test_reward_combinations_keep_the_scores_dtype_and_device():
    """combine_logsum / combine_mean compute in the scores' precision and on their device
    (the code is device-agnostic): weights given as a Python list follow the scores."""
    scores = torch.tensor([[0.3, 0.6, 0.9]], dtype=torch.float64)
    third = [1 / 3] * 3
    assert abs(rewards.combine_mean(scores, third).item() - 0.6) < 1e-15  # float64, not float32 weights
    logsum = sum(math.log(s) / 3 for s in (0.3, 0.6, 0.9))
    assert abs(rewards.combine_logsum(scores, third).item() - logsum) < 1e-15
    meta = torch.empty(4, 3, device="meta")  # any device but the CPU: list weights must be placed beside the scores
    assert rewards.combine_mean(meta, third).device.type == "meta"
    assert rewards.combine_logsum(meta, third).shape == (4,)


def test_scorer_count_mismatch_names_the_scorer_and_counts():
    """A bad input is a one-line error that names the problem."""
    with pytest.raises(InputError, match=r"^fluency scorer: 2 prompts but 1 responses$"):
        rewards.FluencyScorer(None, None)(["a", "b"], ["x"])


# ----------------------------------------------------------------------------- report.py
import report  # noqa: E402


def test_hypervolume_with_a_reference_per_objective():
    """SPEC §8: the volume above a reference point given per objective (d = 3, unequal coordinates)."""
    assert report.hypervolume([(1.0, 1.0, 1.0)], reference=(0.5, 0.75, 0.875)) == 0.5 * 0.25 * 0.125
    # two points: slabs along the last objective use the reference's own last coordinate
    volume = report.hypervolume([(1.0, 1.0, 0.5), (0.5, 0.5, 1.0)], reference=(0.0, 0.25, 0.125))
    assert volume == pytest.approx(1.0 * 0.75 * 0.375 + 0.5 * 0.25 * 0.5)


def test_pareto_report_and_its_printout():
    """search.json's Pareto entry (front, hypervolume, its reference 0) and the lines `search` prints:
    the front sorted by mean, best first."""
    records = [
        {"weights": [1, 0], "direction": [1.0, 0.0], "scores": [0.9, 0.1], "mean": 0.5, "iteration": 1},
        {"weights": [0, 1], "direction": [0.0, 1.0], "scores": [0.2, 0.8], "mean": 0.5, "iteration": 1},
        {"weights": [1, 1], "direction": [0.5, 0.5], "scores": [0.7, 0.7], "mean": 0.7, "iteration": 1},
        {"weights": [1, 0.5], "direction": [2 / 3, 1 / 3], "scores": [0.6, 0.1], "mean": 0.35, "iteration": 2},
    ]
    rep = report.pareto_report(records, ["x", "y"])
    assert rep["reference"] == 0.0 and rep["objectives"] == ["x", "y"]
    assert [r["weights"] for r in rep["front"]] == [[1, 0], [0, 1], [1, 1]]
    assert rep["hypervolume"] == pytest.approx(0.9 * 0.1 + 0.7 * 0.6 + 0.2 * 0.1)
    assert report.format_report(rep) == (
        "Pareto front: 3 non-dominated weight vectors | hypervolume 0.5300 (reference 0)\n"
        "  w=(1.000,1.000) | x 0.700 y 0.700 | mean 0.700\n"
        "  w=(1.000,0.000) | x 0.900 y 0.100 | mean 0.500\n"
        "  w=(0.000,1.000) | x 0.200 y 0.800 | mean 0.500")


# ----------------------------------------------------------------------------- search.py
import json  # noqa: E402

import lora  # noqa: E402
import search  # noqa: E402
import files
import t5  # noqa: E402
from test_search import Tok as WordTokenizer  # noqa: E402  (words <-> hashed ids, tensors on `device`)


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
    model, tok = three_adapters, WordTokenizer()
    prompts, weights = ["i feel sad", "work is hard today", "nothing helps"], [0.5, 0.3, 0.2]
    ids, mask = tok.batch_encode([p + " [SEP] " for p in prompts])
    texts = {level: tok.batch_decode(search.ensemble_generate(model, ["a", "b", "c"], weights, ids, mask, level=level))
             for level in ("hidden", "param")}
    assert texts["hidden"] != texts["param"]  # the two levels differ on this model, so the test can fail
    assert max(len(t.split()) for t in texts["param"]) == 64  # a row runs to the cap: 65 would show
    for level in ("hidden", "param"):
        seen = []
        scorers = {"words": lambda p, r: (seen.extend(r), torch.tensor([len(x.split()) / 64 for x in r]))[1]}
        objective = search.make_objective(model, tok, ["a", "b", "c"], scorers, prompts, level=level)
        mean, per = objective(weights)
        assert seen == texts[level]
        assert per == pytest.approx([sum(len(x.split()) / 64 for x in texts[level]) / 3]) and mean == per[0]


def test_make_objective_without_prompts_says_so(three_adapters):
    with pytest.raises(InputError, match="^grid search: the aggregation split has no prompts$"):
        search.make_objective(three_adapters, WordTokenizer(), ["a", "b", "c"], {}, [])


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
    model, tok = three_adapters, WordTokenizer()
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
    model, tok = three_adapters, WordTokenizer()
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


def test_hidden_level_mixes_in_the_models_dtype(three_adapters):
    """A bfloat16 policy (a common way to load T5): Σ w_i f_i stays bfloat16 for the bfloat16 LM head, and
    a one-hot mixture still equals the adapter's own greedy decoding."""
    import copy

    model, tok = copy.deepcopy(three_adapters).to(torch.bfloat16), WordTokenizer()
    ids, mask = tok.batch_encode(["i feel sad [SEP] ", "work is hard today [SEP] "])
    lora.set_adapter(model, "c")
    expected = t5.generate(model, ids, mask, max_new_tokens=6)[0]
    lora.set_adapter(model, None)
    for level in ("hidden", "logit"):
        got = search.ensemble_generate(model, list("abc"), [0, 0, 2], ids, mask, level=level, max_new_tokens=6)
        assert torch.equal(got, expected)


# ----------------------------------------------------------------------------- lora.py
from safetensors import safe_open  # noqa: E402
from torch import nn  # noqa: E402


class TwoLayers(nn.Module):
    """Two Linear layers named like T5's (q, wo), 16 -> 24 -> 16."""

    def __init__(self, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.q, self.wo = nn.Linear(16, 24, bias=False), nn.Linear(24, 16, bias=False)

    def forward(self, x):
        return self.wo(torch.relu(self.q(x)))


def two_layers_with_adapters(seed=0):
    model = TwoLayers(seed).eval()
    lora.add_adapter(model, "a", r=4, alpha=8, dropout=0.1)
    lora.add_adapter(model, "b", r=4, alpha=8, dropout=0.0)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name in "ab":
            for p in lora.adapter_parameters(model, name):
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return model


def test_lora_A_starts_as_peft_kaiming_uniform():
    """A ~ kaiming_uniform(a=√5) (PEFT's default): uniform on ±1/√fan_in; B = 0, so the adapter starts as the base."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 8, bias=False))
    lora.add_adapter(model, "x", r=16, targets=("0",))
    A = model[0].lora_A["x"]
    bound = 1 / math.sqrt(256)
    assert A.abs().max() <= bound and A.abs().max() > 0.99 * bound  # 4,096 draws reach the edge
    assert not model[0].lora_B["x"].any()


def test_merge_unmerge_merge_again_restores_the_adapters():
    """Eq. (4) merge, then unmerge: the base weights and the adapters' own (unmerged) forward come back,
    and a second merge / unmerge cycle works the same."""
    model, x = two_layers_with_adapters(), torch.randn(5, 16, generator=torch.Generator().manual_seed(3))
    base = {k: v.clone() for k, v in model.state_dict().items()}
    lora.set_adapter(model, "a")
    adapted = model(x)
    for _ in range(2):
        lora.merge(model, {"a": 0.5, "b": 0.5})
        merged = model(x)
        lora.unmerge(model)
        assert all(torch.equal(v, base[k]) for k, v in model.state_dict().items())
        assert torch.equal(model(x), adapted)  # adapter "a" active again, not bypassed
    with lora.weighted_adapters(model, {"a": 0.5, "b": 0.5}):
        torch.testing.assert_close(model(x), merged, rtol=1e-5, atol=1e-6)


def test_mixed_adapters_checks_its_row_index():
    model = two_layers_with_adapters()
    x = torch.randn(3, 16)
    with lora.mixed_adapters(model, ["a", "b"], [1, 1, 1]):  # every row the last adapter: valid
        got = model(x)
    lora.set_adapter(model, "b")
    torch.testing.assert_close(got, model(x), rtol=1e-5, atol=1e-6)  # bmm vs matmul round-off only
    for rows in ([0, 2, 1], [[0, 1, 1]], [-1, 0, 0]):
        with pytest.raises(InputError, match=r"^mixed_adapters: row_adapter must be a 1-D index into 2 adapters$"):
            lora.mixed_adapters(model, ["a", "b"], rows)


def test_saved_adapter_is_a_peft_lora_config(tmp_path):
    """README: adapters are written in PEFT's layout; the config is PEFT's LoraConfig for plain LoRA and the
    safetensors metadata says format "pt" (what HF's loaders check)."""
    model = two_layers_with_adapters()
    lora.save_adapter(model, "a", tmp_path / "a")
    assert json.loads((tmp_path / "a" / "adapter_config.json").read_text()) == dict(
        peft_type="LORA", task_type="SEQ_2_SEQ_LM", base_model_name_or_path="", r=4, lora_alpha=8,
        lora_dropout=0.1, target_modules=["q", "wo"], bias="none", fan_in_fan_out=False, inference_mode=True,
        init_lora_weights=True, use_rslora=False, use_dora=False, modules_to_save=None, rank_pattern={},
        alpha_pattern={})
    with safe_open(str(tmp_path / "a" / "adapter_model.safetensors"), "pt") as f:
        metadata = f.metadata()
    assert metadata["format"] == "pt"
    fingerprint = json.loads(metadata[lora.FINGERPRINT_KEY])
    assert len(fingerprint["shapes"]) == 16 and int(fingerprint["shapes"], 16) >= 0
    # the dropout comes back from the file; a config without one means no dropout
    fresh = TwoLayers().eval()
    lora.load_adapter(fresh, tmp_path / "a", "a")
    assert {m.dropout_p["a"] for _, m in lora._layers(fresh)} == {0.1}
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    config["lora_dropout"] = None
    (tmp_path / "a" / "adapter_config.json").write_text(json.dumps(config))
    lora.load_adapter(fresh, tmp_path / "a", "a")
    assert {m.dropout_p["a"] for _, m in lora._layers(fresh)} == {0.0}


def test_load_adapter_config_checks(tmp_path):
    """A rank of 1 is valid; a bad rank, alpha or target list is a one-line error naming the file."""
    model = two_layers_with_adapters()
    directory = tmp_path / "a"

    def load(**changes):
        lora.save_adapter(model, "a", directory)
        config = json.loads((directory / "adapter_config.json").read_text())
        config.update(changes)
        (directory / "adapter_config.json").write_text(json.dumps(config))
        return lora.load_adapter(TwoLayers().eval(), directory, "x")

    lora.add_adapter(model, "one", r=1)
    lora.save_adapter(model, "one", directory)
    assert lora.load_adapter(TwoLayers().eval(), directory, "x") == "x"
    config_path = str(directory / "adapter_config.json")
    for changes in (dict(r=0), dict(r=2.5), dict(r="4"), dict(lora_alpha="8"), dict(target_modules=[]),
                    dict(target_modules=None)):
        with pytest.raises(InputError, match=rf"^{config_path}: need integer r >= 1, numeric lora_alpha and target_modules"):
            load(**changes)
    with pytest.raises(InputError, match=rf"^{config_path}: not a LoRA adapter config \(peft_type must be LORA\)$"):
        load(peft_type="PREFIX_TUNING")
    (directory / "adapter_config.json").write_text("[1, 2]")
    with pytest.raises(InputError, match="not a LoRA adapter config"):
        lora.load_adapter(TwoLayers().eval(), directory, "x")


def test_adapter_fingerprint_is_of_the_base_model(tmp_path):
    """The fingerprint describes the base weights (also while adapters are merged into them), refuses an
    adapter saved for another base even when its weights are small, and an unreadable one is refused."""
    model = two_layers_with_adapters()
    before = lora.base_fingerprint(model)
    lora.merge(model, {"a": 1.0})
    assert lora.base_fingerprint(model) == before
    lora.unmerge(model)
    other = lora.base_fingerprint(nn.Sequential(nn.Linear(16, 24, bias=False), nn.Linear(24, 8, bias=False)))
    assert other["shapes"] != before["shapes"]
    small = TwoLayers()
    with torch.no_grad():
        small.q.weight.fill_(0.01)
    lora.add_adapter(small, "a")
    lora.save_adapter(small, "a", tmp_path / "a")
    with torch.no_grad():
        small.q.weight.fill_(0.02)  # another base: twice the weights, still tiny sums
    with pytest.raises(InputError, match="another base model"):
        lora.load_adapter(small, tmp_path / "a", "a")
    tensors = files.load_safetensors(str(tmp_path / "a" / "adapter_model.safetensors"))
    files.save_safetensors(tensors, str(tmp_path / "a" / "adapter_model.safetensors"), {lora.FINGERPRINT_KEY: "{not json"})
    with pytest.raises(InputError, match="another base model"):
        lora.load_adapter(TwoLayers(), tmp_path / "a", "a")


# ----------------------------------------------------------------------------- evaluate.py
import evaluate  # noqa: E402


def test_find_runs_keeps_finished_runs_of_known_methods(tmp_path):
    """Every finished (summary.json) <method>-<seed> folder, any method but base and the aggregation levels;
    an integer seed, else the text after the last dash is a label; a negative number stays a label."""
    for folder, finished in (("reflection-0", True), ("uniform-1", True), ("fluency-2", False),
                             ("other-0", True), ("empathy-x", True), ("dynaopt-1", True), ("base-0", True),
                             ("hidden-1", True), ("param-x", True), ("noseed", True), ("reflection--1", True)):
        (tmp_path / folder).mkdir()
        if finished:
            (tmp_path / folder / "summary.json").write_text("{}")
    assert evaluate.find_runs(str(tmp_path)) == {0: {"reflection": str(tmp_path / "reflection-0"),
                                                     "other": str(tmp_path / "other-0")},
                                                 1: {"uniform": str(tmp_path / "uniform-1"),
                                                     "dynaopt": str(tmp_path / "dynaopt-1")},
                                                 "x": {"empathy": str(tmp_path / "empathy-x")},
                                                 "-1": {"reflection": str(tmp_path / "reflection--1")}}


def test_metrics_are_table_1_and_2_on_hand_values():
    """Table 2: mean score per objective and their average; Table 1: diversity-2 and mean edit rate."""
    prompts, responses = ["I am sad", "work is hard [SEP] "], ["I am sad", "you feel work is hard"]
    seen = []
    scorers = {"reflection": lambda p, r: (seen.append((list(p), list(r))), torch.tensor([0.2, 0.4]))[1],
               "empathy": lambda p, r: torch.tensor([1.0, 0.5]),
               "fluency": lambda p, r: torch.tensor([0.3, 0.3]), "unused": None}
    row = evaluate.metrics(scorers, prompts, responses)
    assert row == pytest.approx({"reflection": 0.3, "empathy": 0.75, "fluency": 0.3, "average": 0.45,
                                 "diversity-2": (2 / 3 + 4 / 5) / 2, "edit rate": (0 + 2 / 5) / 2})
    assert seen == [(prompts, responses)]  # each scorer sees the prompts and their own responses


def test_mean_std_and_tables():
    """Rows are mean ± population std over training seeds × generation runs, "±" only for more than one
    value; data points and seconds as integers; the decoding and the run counts per method; CSV beside it."""
    assert evaluate.mean_std([]) == "—"
    assert evaluate.mean_std([0.5]) == "0.5000"
    assert evaluate.mean_std([1.0, 2.0, 4.0]) == "2.3333 ± 1.2472"  # pstdev: sqrt(42/27)
    assert evaluate.mean_std([1.0, 2.0, 4.0], True) == "2 ± 1" and evaluate.mean_std([3200.0], True) == "3,200"
    base = dict(reflection=0.5, empathy=0.25, fluency=0.75, average=0.5)
    base.update({"diversity-2": 0.8, "edit rate": 0.9})
    sampled = [{**base, "reflection": r, "seed": None, "run": i, "decoding": "top-50 sample"}
               for i, r in enumerate((0.5, 0.25, 0.75))]
    run = lambda r, seed, s: {**base, "reflection": r, "data points": 3200, "seconds": s,  # noqa: E731
                              "seed": seed, "run": 0, "decoding": "greedy"}
    markdown, csv_text = evaluate.tables({"base": sampled, "hidden": [run(0.75, 0, 100.0), run(0.25, 1, 200.0)],
                                          "reflection": [run(0.5, 0, 99.6)]})
    assert markdown.splitlines() == [
        "| method | decoding | reflection | empathy | fluency | average | diversity-2 | edit rate | data points | seconds |",
        "|---|---|---|---|---|---|---|---|---|---|",
        "| base | top-50 sample, 3 runs | 0.5000 ± 0.2041 | 0.2500 ± 0.0000 | 0.7500 ± 0.0000 | 0.5000 ± 0.0000 "
        "| 0.8000 ± 0.0000 | 0.9000 ± 0.0000 | — | — |",
        "| hidden | greedy | 0.5000 ± 0.2500 | 0.2500 ± 0.0000 | 0.7500 ± 0.0000 | 0.5000 ± 0.0000 | 0.8000 ± 0.0000 "
        "| 0.9000 ± 0.0000 | 3,200 ± 0 | 150 ± 50 |",
        "| reflection | greedy | 0.5000 | 0.2500 | 0.7500 | 0.5000 | 0.8000 | 0.9000 | 3,200 | 100 |"]
    lines = csv_text.splitlines()
    assert lines[0].startswith("method,decoding,training seeds,generation runs,reflection mean,reflection std,"
                               "empathy mean") and lines[0].endswith("seconds mean,seconds std")
    base_line = lines[1].split(",")
    assert base_line[:5] == ["base", "top-50 sample", "1", "3", "0.5"] and base_line[-4:] == ["", "", "", ""]
    assert float(base_line[5]) == pytest.approx(math.sqrt(0.125 / 3))  # pstdev(0.5, 0.25, 0.75)
    assert lines[2] == "hidden,greedy,2,1,0.5,0.25,0.25,0.0,0.75,0.0,0.5,0.0,0.8,0.0,0.9,0.0,3200,0,150,50"
    assert lines[3] == "reflection,greedy,1,1,0.5,,0.25,,0.75,,0.5,,0.8,,0.9,,3200,,99.6,"


# ----------------------------------------------------------------------------- t5.py generation
def test_decode_loop_defaults_and_greedy_logprobs():
    """Defaults: ≤ 64 new tokens, start token 0, pad 0 after a row's eos (1), full distribution when
    sampling (top_k 0). Greedy log-probs are those of the logits themselves, whatever the temperature."""
    seen = []
    logits = torch.tensor([[0.0, -9.0, 2.0, 1.0], [0.0, -9.0, 1.0, 2.0]])

    def next_logits(last):
        seen.append(last.tolist())
        out = logits.clone()
        if len(seen) == 3:
            out[0, 1] = 9.0  # row 0 ends at its 3rd token
        return out

    tokens, logprobs = t5.decode_loop(next_logits, 2, temperature=2.0)
    assert tokens.shape == (2, 64) and seen[0] == [0, 0]
    assert tokens[0, :3].tolist() == [2, 2, 1] and (tokens[0, 3:] == 0).all() and (tokens[1] == 3).all()
    assert torch.allclose(logprobs[1], torch.log_softmax(logits[1], -1)[3].expand(64))
    flat = torch.linspace(0.0, 0.1, 6)[None].expand(1, 6)  # a nearly flat distribution: top_k 0 keeps all six
    drawn, _ = t5.decode_loop(lambda last: flat, 1, max_new_tokens=60, eos_id=-1, do_sample=True,
                              generator=torch.Generator().manual_seed(0))
    assert len(set(drawn[0].tolist())) >= 4


def test_generate_passes_its_sampling_options_and_ids_to_the_loop():
    """t5.generate = decode_loop over the cached decoder with the config's start / eos / pad ids and the
    caller's do_sample, temperature and top_k. Oracle: decode_loop over a full recompute (no cache)."""
    torch.manual_seed(0)
    cfg = t5.T5Config(vocab_size=32, d_model=16, d_kv=4, d_ff=32, num_layers=2, num_heads=2, dropout_rate=0.0,
                      decoder_start_token_id=4, eos_token_id=7, pad_token_id=2)
    model = t5.T5ForConditionalGeneration(cfg).eval()
    ids = torch.randint(3, 32, (3, 6))
    mask = torch.ones_like(ids)

    def oracle(**options):
        prefix = []

        def next_logits(last):
            prefix.append(last)
            with torch.no_grad():
                return model(ids, mask, torch.stack(prefix, 1))[:, -1]
        return t5.decode_loop(next_logits, 3, start_id=4, eos_id=7, pad_id=2, **options)

    for options in (dict(), dict(max_new_tokens=12, do_sample=True, temperature=0.5, top_k=3),
                    dict(max_new_tokens=12, do_sample=True), dict(max_new_tokens=12, do_sample=True, top_k=1)):
        sampling = {"generator": torch.Generator().manual_seed(1)} if options.get("do_sample") else {}
        got = t5.generate(model, ids, mask, **options, **sampling)
        sampling = {"generator": torch.Generator().manual_seed(1)} if options.get("do_sample") else {}
        expected = oracle(**options, **sampling)
        assert torch.equal(got[0], expected[0]), options
        torch.testing.assert_close(got[1], expected[1], rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- scst.py
import scst  # noqa: E402


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


def test_lora_dropout_is_on_in_training_and_unbiased():
    """README: the LoRA dropout stays on during RL. In training mode each pass draws a new mask on the
    adapter's input (inverted dropout: the mean over many rows is the eval-mode output), in eval mode none;
    the same holds for the mixed-adapter batch."""
    model = TwoLayers().eval()
    lora.add_adapter(model, "d", r=4, alpha=8, dropout=0.5)
    with torch.no_grad():
        for p in lora.adapter_parameters(model, "d"):
            p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(5)) * 0.3)
    layer = model.q
    x = torch.randn(1, 16, generator=torch.Generator().manual_seed(6)).expand(20000, 16)
    expected = layer(x[:1])
    torch.manual_seed(0)
    layer.train()
    for mode in ({"d": 1.0}, (["d"], torch.zeros(20000, dtype=torch.long))):
        layer.mode = mode
        first, second = layer(x), layer(x)
        assert not torch.equal(first, second)  # a fresh mask each pass
        assert not torch.allclose(first[0], expected[0])
        delta = expected[0] - x[0] @ layer.weight.T  # the adapter's own term
        assert (first.mean(0) - expected[0]).abs().max() < 0.1 * delta.abs().max()  # unbiased
    layer.eval()
    layer.mode = {"d": 1.0}
    assert torch.equal(layer(x[:1]), expected)
