"""Tests written to kill mutants that survived `python bench/mutation.py` (README, "Mutation testing").

Each test checks a property of a public function against hand-computed values or an independent
oracle; the comment says which claim it protects. Fast: tiny tensors and tiny random models only."""
import contextlib
import copy
import json
import math
import re
import types

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


class RecordingTokenizer:
    """Stands in for the scorers' tokenizers: records each batch call's (kind, max_length, device)."""

    def __init__(self):
        self.calls = []

    def _batch(self, kind, prompts, responses, max_length, device):
        self.calls.append((kind, max_length, device))
        return {"input_ids": torch.zeros(len(prompts), 2, dtype=torch.long),
                "attention_mask": torch.ones(len(prompts), 2, dtype=torch.long)}

    def batch_encode_roberta(self, prompts, responses, max_length=None, device="unset"):
        return self._batch("roberta", prompts, responses, max_length, device)

    def batch_encode(self, prompts, responses, max_length=None, device="unset"):
        return self._batch("bert", prompts, responses, max_length, device)

    def encode(self, text):
        return [5] * len(text.split())

    def pad(self, rows, pad_id, device="unset"):
        self.calls.append(("pad", device))
        return torch.zeros(len(rows), 2, dtype=torch.long), torch.ones(len(rows), 2, dtype=torch.long)


def test_scorers_cap_at_512_tokens_and_put_inputs_on_their_device(monkeypatch):
    """The scorers' encoders read at most 512 tokens (BERT / RoBERTa's usual context; RoBERTa's positions
    start after its pad id) or their own smaller context, and every batch is made on the scorer's device."""
    from types import SimpleNamespace
    logits = lambda n, k: torch.zeros(n, k)  # noqa: E731
    for positions, expected in ((600, 512), (100, 98)):
        config = SimpleNamespace(max_position_embeddings=positions, pad_token_id=1, model_type="roberta")
        model = lambda input_ids, attention_mask, **_: torch.zeros(input_ids.shape[0])  # noqa: E731
        model.roberta = SimpleNamespace(config=config)
        tok = RecordingTokenizer()
        rewards.ReflectionScorer(model, tok, device="cuda:1")(["a"], ["b"])
        assert tok.calls == [("roberta", expected, "cuda:1")]
        model = lambda input_ids, attention_mask, **_: logits(input_ids.shape[0], 2)  # noqa: E731
        model.config = config
        tok = RecordingTokenizer()
        rewards.ClassifierScorer(model, tok, device="cuda:1", label=0)(["a"], ["b"])
        assert tok.calls == [("roberta", expected, "cuda:1")]
    for positions, expected in ((600, 512), (100, 100)):
        model = lambda input_ids, attention_mask, **_: logits(input_ids.shape[0], 1)  # noqa: E731
        model.config = SimpleNamespace(max_position_embeddings=positions, pad_token_id=0, model_type="bert")
        tok = RecordingTokenizer()
        rewards.ClassifierScorer(model, tok, device="cuda:1")(["a"], ["b"])
        assert tok.calls == [("bert", expected, "cuda:1")]
    monkeypatch.setattr(rewards.gpt2, "sequence_nll", lambda model, ids, mask: torch.zeros(ids.shape[0]))
    tok = RecordingTokenizer()
    model = SimpleNamespace(config=SimpleNamespace(n_positions=64))
    assert rewards.FluencyScorer(model, tok, device="cuda:1").perplexity(["a b"], ["c"]).tolist() == [1.0]
    assert tok.calls == [("pad", "cuda:1")]


def test_label_index_names_and_numbers_the_labels():
    """A multi-label classifier's output: a name from id2label or an index; without id2label the labels are
    their indices; errors list the labels and the index range."""
    raw = {"id2label": {"0": "advice", "1": "autonomy", "2": "other"}}
    assert rewards.label_index(raw, 3, "autonomy", "d") == 1 and rewards.label_index(raw, 3, "2", "d") == 2
    assert rewards.label_index({}, 2, "1", "d") == 1 and rewards.label_index({}, 1, None, "d") is None
    with pytest.raises(InputError, match=r"^d: the classifier has 2 labels \(0, 1\): name the one to score as NAME=DIR:LABEL$"):
        rewards.label_index({}, 2, None, "d")
    with pytest.raises(InputError, match=r"^d: unknown label 'x' \(labels: advice, autonomy, other, or an index 0-2\)$"):
        rewards.label_index(raw, 3, "x", "d")
    with pytest.raises(InputError, match=r"^d: unknown label '2' \(labels: 0, 1, or an index 0-1\)$"):
        rewards.label_index({"id2label": {"0": "0"}}, 2, "2", "d")


def test_load_scorer_passes_device_and_batch_size_and_names_a_wrong_model(tmp_path, monkeypatch):
    """Every scorer is built on the given device with the given batch size (default 32); a folder that is no
    known kind of scorer is one line naming its model_type (and architectures when the config has them)."""
    seen = []
    record = lambda kind: classmethod(lambda cls, directory, device="unset", batch_size="unset", **kw: (  # noqa: E731
        seen.append((kind, device, batch_size, kw.get("label"))), types.SimpleNamespace())[1])
    monkeypatch.setattr(rewards.FluencyScorer, "from_dir", record("fluency"))
    monkeypatch.setattr(rewards.ClassifierScorer, "from_dir", record("classifier"))
    monkeypatch.setattr(rewards.ReflectionScorer, "from_dir", record("reflection"))
    for model_type in ("gpt2", "bert", "xlnet"):
        (tmp_path / model_type).mkdir()
        (tmp_path / model_type / "config.json").write_text(json.dumps({"model_type": model_type}))
    rewards.load_scorer("reflection", "r", device="cuda:1", batch_size=4)
    rewards.load_scorer("reflection", "r")
    assert rewards.load_scorer("lm", str(tmp_path / "gpt2"), device="cuda:1", batch_size=4).name == "lm"
    rewards.load_scorer("lm", str(tmp_path / "gpt2"))
    rewards.load_scorer("cls", str(tmp_path / "bert"), "x", device="cuda:1", batch_size=4)
    rewards.load_scorer("cls", str(tmp_path / "bert"), "x")
    assert seen == [("reflection", "cuda:1", 4, None), ("reflection", "cpu", 32, None), ("fluency", "cuda:1", 4, None),
                    ("fluency", "cpu", 32, None), ("classifier", "cuda:1", 4, "x"), ("classifier", "cpu", 32, "x")]
    with pytest.raises(InputError, match=r"^.*xlnet: cannot score objective 'x' with this model \(model_type 'xlnet'\); "
                                         r"expected a BERT, DistilBERT or RoBERTa sequence classifier or a GPT-2 LM$"):
        rewards.load_scorer("x", str(tmp_path / "xlnet"))


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


def test_slice_grid_places_each_slice_of_figure_5():
    """Figure 5 for any d: slice (w3..wd) goes to (sub-row, column), column = w3's value, sub-row = the
    values of w4..wd read as a base-3 number, most significant first."""
    assert report.slice_grid(2) == {(): (0, 0)}
    assert report.slice_grid(3) == {(0,): (0, 0), (1,): (0, 1), (2,): (0, 2)}
    d5 = report.slice_grid(5)
    assert len(d5) == 27 and d5[(0, 0, 0)] == (0, 0) and d5[(2, 0, 1)] == (1, 2) and d5[(1, 1, 0)] == (3, 1)
    assert d5[(0, 2, 2)] == (8, 0) and sorted(set(d5.values())) == [(r, c) for r in range(9) for c in range(3)]


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
        scorers = {"words": lambda p, r: (seen.extend(r), torch.tensor([len(x.split()) / 128 for x in r]))[1]}
        objective = search.make_objective(model, tok, ["a", "b", "c"], scorers, prompts, level=level)
        mean, per = objective(weights)
        assert seen == texts[level]
        assert per == pytest.approx([sum(len(x.split()) / 128 for x in texts[level]) / 3]) and mean == per[0]


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
    assert rows == ["meta", "meta"]     # hidden and logit levels
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
    """Table 2: mean clipped score per objective (clip(s, 1e-4, 0.9999), as el_test.py) and their average;
    Table 1: diversity-2 and mean edit rate."""
    prompts, responses = ["I am sad", "work is hard [SEP] "], ["I am sad", "you feel work is hard"]
    seen = []
    scorers = {"reflection": lambda p, r: (seen.append((list(p), list(r))), torch.tensor([0.2, 0.4]))[1],
               "empathy": lambda p, r: torch.tensor([1.0, 0.5]),
               "fluency": lambda p, r: torch.tensor([0.3, 0.0]), "unused": None}
    row = evaluate.metrics(scorers, prompts, responses)
    assert row == pytest.approx({"reflection": 0.3, "empathy": 0.74995, "fluency": 0.15005, "average": 0.4,
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


def test_find_runs_reads_the_seed_after_the_last_dash(tmp_path):
    """<method>-<seed>: the seed is the text after the last dash, whatever the method's name holds."""
    for folder in ("four-objectives-3", "reflection-authors"):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "summary.json").write_text("{}")
    assert evaluate.find_runs(str(tmp_path)) == {3: {"four-objectives": str(tmp_path / "four-objectives-3")},
                                                 "authors": {"reflection": str(tmp_path / "reflection-authors")}}


def test_seed_order_puts_integers_first_in_numeric_order_then_labels():
    assert sorted(["b", 10, "a", 2, 0], key=evaluate.seed_order) == [0, 2, 10, "a", "b"]


def test_search_json_checks_name_the_source_and_accept_a_plain_result():
    """One-line errors name the file (default "search result") and what was found; a search.json without
    evaluations (no search time recorded) is accepted; every evaluation needs numeric seconds."""
    with pytest.raises(InputError, match=r"^search result: expected a JSON object \(a search result\), got list$"):
        evaluate.check_search([], ("a", "b"))
    assert evaluate.check_search({"best_weights": [1, 3]}, ("a", "b")) == [1.0, 3.0]
    with pytest.raises(InputError, match="numeric seconds"):
        evaluate.check_search({"best_weights": [1, 3], "evaluations": [{"seconds": "2"}]}, ("a", "b"))
    assert evaluate.searched_objectives({"objectives": ["b", "a"]}, ["a", "b", "c"]) == ["b", "a"]
    for result in (None, [], {}, {"objectives": []}, {"objectives": [1, 2]}, {"objectives": "ab"}):
        assert evaluate.searched_objectives(result, ("a", "b")) == ["a", "b"]


@pytest.fixture
def recorded_evaluate(tmp_path, monkeypatch):
    """evaluate() with generate_texts, load_adapter and torch.Generator recording their arguments (the
    decoding itself is checked against t5.generate / ensemble_generate in test_evaluate.py): returns
    (call evaluate with a runs folder of finished runs {folder: (data points, seconds)}, the calls)."""
    calls = []

    class Generator:
        def __init__(self, device=None):
            self.device = device

        def manual_seed(self, seed):
            self.seed = seed
            return self

    def generate_texts(model, tokenizer, prompts, batch_size, device, adapter=None, aggregate=None, generator=None):
        calls.append(dict(model=model, prompts=list(prompts), batch_size=batch_size, device=device, adapter=adapter,
                          aggregate=aggregate, generator=None if generator is None else (generator.device, generator.seed)))
        return [f"reply number {len(calls)} to {p}" for p in prompts]

    monkeypatch.setattr(evaluate, "generate_texts", generate_texts)
    monkeypatch.setattr(evaluate.lora, "load_adapter", lambda model, path, name: model.append(name))
    monkeypatch.setattr(torch, "Generator", Generator)

    def call(runs, search_result=None, **kwargs):
        for folder, (points, seconds) in runs.items():
            (tmp_path / folder).mkdir()
            (tmp_path / folder / "summary.json").write_text(json.dumps({"data_points": points, "wall_seconds": seconds}))
        scorers = {"alpha": lambda p, r: torch.full((len(r),), 0.25), "beta": lambda p, r: torch.full((len(r),), 0.5)}
        return evaluate.evaluate(lambda: ([], "tokenizer"), scorers, ["i feel sad", "work is hard"], str(tmp_path),
                                 search_result, objectives=("alpha", "beta"), **kwargs)
    return call, calls


def test_evaluate_protocol_defaults(recorded_evaluate, capsys):
    """The command's protocol with evaluate()'s defaults: batches of 16 on the given device; every seed's
    runs, integer seeds in numeric order then labels; single policies sampled 3 times with generator seeds
    0, 1, 2 (on the device), the logit and hidden levels greedy once, with the search's own objective order;
    Eq. (3) consumption (T_agg counts evaluations that recorded seconds), once per training seed; a
    printed line per run."""
    call, calls = recorded_evaluate
    runs = {"alpha-10": (1000, 20.0), "beta-10": (1200, 30.0), "alpha-2": (500, 5.0), "beta-2": (700, 9.0),
            "alpha-authors": (None, None)}
    search_result = {"objectives": ["beta", "alpha"], "best_weights": [0.25, 0.75],
                     "evaluations": [{"weights": [1, 0], "seconds": 3.0}, {"weights": [0, 1]}]}
    results = call(runs, search_result)
    seeds = [2, 10]
    jobs = ([(None, "base")] + [(s, m) for s in seeds for m in ("alpha", "beta")] + [("authors", "alpha")]
            + [(s, level) for s in seeds for level in ("param", "logit", "hidden")])
    expected = []
    for s, method in jobs:
        adapters = [] if method == "base" else ["beta", "alpha"] if method in evaluate.LEVELS else [method]
        greedy = method in ("logit", "hidden")
        for run in range(1 if greedy else 3):
            expected.append(dict(model=adapters, prompts=["i feel sad", "work is hard"], batch_size=16, device="cpu",
                                 adapter=None if method == "base" else method,
                                 aggregate=(["beta", "alpha"], [0.25, 0.75], method) if method in evaluate.LEVELS else None,
                                 generator=None if greedy else ("cpu", run)))
    assert calls == expected
    assert [(r["seed"], r["run"], r["decoding"]) for r in results["alpha"]] == [
        (s, run, "top-50 sample") for s in (2, 10, "authors") for run in range(3)]
    assert [(r["seed"], r["decoding"]) for r in results["hidden"]] == [(2, "greedy"), (10, "greedy")]
    assert [(r.get("data points"), r.get("seconds")) for r in results["alpha"]] == [
        (500, 5.0), (None, None), (None, None), (1000, 20.0), (None, None), (None, None), (None, None), (None, None),
        (None, None)]
    assert [(r["data points"], r["seconds"]) for r in results["param"] if r["run"] == 0] == [(700, 12.0), (1200, 33.0)]
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == len(expected)
    assert re.fullmatch(r"hidden \(seed 10, run 0\) \| alpha 0\.2500 \| beta 0\.5000 \| average 0\.3750 \| "
                        r"diversity-2 \d\.\d{4} \| edit rate \d\.\d{4} \| data points 1,200 \| seconds 33", lines[-1])


def test_evaluate_inputs(recorded_evaluate):
    """One-line errors for an empty split, a missing scorer and no generation run; one run and no search
    (no aggregated methods) are fine."""
    call, calls = recorded_evaluate
    with pytest.raises(InputError, match="^the inference split is empty: give more data or a larger --sample$"):
        evaluate.evaluate(None, {}, [], "runs", None)
    with pytest.raises(InputError, match="^no scorer for objective 'empathy'$"):
        evaluate.evaluate(None, {"reflection": None, "fluency": None}, ["p"], "runs", None)
    with pytest.raises(InputError, match="^generation runs must be >= 1, got 0$"):
        call({}, generation_runs=0)
    results = call({"alpha-0": (1, 1.0)}, generation_runs=1, seed=7, device="cuda:1")
    assert list(results) == ["base", "alpha"] and [c["generator"] for c in calls] == [("cuda:1", 7), ("cuda:1", 7)]
    assert [c["device"] for c in calls] == ["cuda:1", "cuda:1"]


def test_generate_texts_samples_top_50_and_aggregates_at_the_given_level(monkeypatch):
    """The evaluation's decoding (el_test.py's protocol): with a generator, top-50 sampling at temperature 1
    (the vocabulary here is larger than 50, so top-50 is not the full distribution); one generator across
    the batches; an aggregate (names, weights, level) decodes at that level; the prompts go to `device`."""
    import data
    torch.manual_seed(1)
    cfg = t5.T5Config(vocab_size=96, d_model=16, d_kv=4, d_ff=32, num_layers=2, num_heads=2, dropout_rate=0.0)
    model = t5.T5ForConditionalGeneration(cfg)
    for name in ("a", "b"):
        lora.add_adapter(model, name, r=4, alpha=8, dropout=0.0)
    with torch.no_grad():
        model.shared.weight.normal_(0.0, 0.05)
        for _, m in lora._layers(model):
            for name in ("a", "b"):
                m.lora_B[name].normal_(0.0, 0.3)
    prompts = ["i feel sad", "work is hard today", "nothing helps"]
    tok = WordTokenizer()

    def expected(decode):  # the oracle: batches of 2, each decoded by `decode(ids, mask)`
        texts = []
        for start in (0, 2):
            ids, mask = data.encode_prompts(tok, prompts[start:start + 2], "cpu")
            texts += tok.batch_decode(decode(ids, mask))
        return texts

    def sampled(top_k):
        g = torch.Generator().manual_seed(3)
        lora.set_adapter(model, "a")
        return expected(lambda ids, mask: t5.generate(model, ids, mask, do_sample=True, top_k=top_k, generator=g)[0])

    devices = []
    real_encode = data.encode_prompts
    monkeypatch.setattr(evaluate.data, "encode_prompts",
                        lambda tokenizer, texts, device="unset": (devices.append(device), real_encode(tokenizer, texts))[1])
    texts = evaluate.generate_texts(model, tok, prompts, 2, "cuda:1", adapter="a", generator=torch.Generator().manual_seed(3))
    assert devices == ["cuda:1", "cuda:1"]
    assert texts == sampled(50) and texts != sampled(0)
    texts = {}
    for level, generator in (("logit", None), ("hidden", None), ("param", torch.Generator().manual_seed(4))):
        texts[level] = evaluate.generate_texts(model, tok, prompts, 2, "cpu", aggregate=(["a", "b"], [0.3, 0.7], level),
                                               generator=generator)
        g = torch.Generator().manual_seed(4)
        assert texts[level] == expected(lambda ids, mask: search.ensemble_generate(
            model, ["a", "b"], [0.3, 0.7], ids, mask, level=level, do_sample=generator is not None, top_k=50, generator=g))
    assert texts["logit"] != texts["hidden"]      # the levels decode differently here: the level is not ignored
    assert texts["param"] != evaluate.generate_texts(model, tok, prompts, 2, "cpu", aggregate=(["a", "b"], [0.3, 0.7], "param"))


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


def test_generation_makes_its_tensors_on_the_models_device_and_dtype(monkeypatch):
    """Device-agnostic code (README: every command takes --device): with the default device set to meta,
    generation on CPU tensors gives the same tokens, so every tensor it makes is put on the inputs' device
    explicitly (a forgotten device= would land on meta and fail). A bfloat16 model decodes in bfloat16
    (the position bias in the model's dtype). More than 64 new tokens: the KV cache grows once."""
    torch.manual_seed(0)
    cfg = t5.T5Config(vocab_size=32, d_model=16, d_kv=4, d_ff=32, num_layers=2, num_heads=2, dropout_rate=0.0,
                      eos_token_id=40)   # no eos: every row runs the whole length
    model = t5.T5ForConditionalGeneration(cfg).eval()
    ids = torch.randint(3, 32, (2, 5))
    mask = torch.ones_like(ids)
    for options in (dict(), dict(do_sample=True, top_k=5)):
        sampling = lambda: {"generator": torch.Generator().manual_seed(1)} if options else {}  # noqa: E731
        expected = t5.generate(model, ids, mask, max_new_tokens=70, **options, **sampling())
        with torch.device("meta"):
            got = t5.generate(model, ids, mask, max_new_tokens=70, **options, **sampling())
        assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1]) and got[0].shape == (2, 70)
    half = copy.deepcopy(model).to(torch.bfloat16)
    hidden, _ = half.decode(torch.zeros(2, 3, dtype=torch.long), half.encode(ids, mask), mask)
    assert hidden.dtype == torch.bfloat16
    assert t5.generate(half, ids, mask, max_new_tokens=4)[0].shape == (2, 4)
    seen = {}   # the loop is told the inputs' device (its own default is the CPU): a model on meta
    monkeypatch.setattr(t5, "decode_loop", lambda next_logits, batch_size, **kwargs: seen.update(kwargs))
    t5.generate(copy.deepcopy(model).to("meta"), ids.to("meta"), mask.to("meta"))
    assert seen["device"] == torch.device("meta")


def test_position_bias_with_an_offset_is_those_rows_of_the_full_square():
    """T5Attention.position_bias(query_len, key_len, offset): queries at positions offset .. offset+query_len-1."""
    torch.manual_seed(0)
    cfg = t5.T5Config(vocab_size=32, d_model=16, d_kv=4, d_ff=32, num_layers=2, num_heads=2, dropout_rate=0.0)
    attention = t5.T5ForConditionalGeneration(cfg).decoder.block[0].layer[0].SelfAttention
    full = attention.position_bias(7, 7)
    assert torch.equal(attention.position_bias(2, 7, offset=4), full[:, :, 4:6])


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


def test_adapter_arguments_and_names_are_checked():
    """One-line errors that name the problem: a bad adapter name, r < 1, dropout outside [0, 1), targets
    that match nothing, an unknown adapter (listing the model's adapters, or none)."""
    model = TwoLayers()
    with pytest.raises(InputError, match="^unknown adapter 'z' \\(the model has: none\\)$"):
        lora.adapter_parameters(model, "z")
    for name in ("", "a.b", 3):
        with pytest.raises(InputError, match=f"^adapter name {name!r}: must be a non-empty string without '.'$"):
            lora.add_adapter(model, name)
    for r, dropout in ((0, 0.1), (2, 1.0), (2, 1.5), (2, -0.1)):
        with pytest.raises(InputError, match=f"^adapter x: need r >= 1 and 0 <= dropout < 1, got r={r}, dropout={dropout}$"):
            lora.add_adapter(model, "x", r=r, dropout=dropout)
    with pytest.raises(InputError, match="^adapter x: no nn.Linear matches target_modules \\['k'\\]$"):
        lora.add_adapter(model, "x", targets=["k"])
    lora.add_adapter(model, "a", r=2, dropout=0.0)
    lora.add_adapter(model, "b", r=2, dropout=0.0)
    with pytest.raises(InputError, match="^unknown adapter 'z' \\(the model has: a, b\\)$"):
        lora.set_adapter(model, "z")


def test_all_linear_targets_every_linear_but_lm_head():
    """PEFT's "all-linear" shorthand, in any case: every nn.Linear but lm_head."""
    for targets in ("all-linear", "ALL-Linear"):
        model = nn.Sequential()
        model.add_module("q", nn.Linear(4, 4))
        model.add_module("lm_head", nn.Linear(4, 4))
        lora.add_adapter(model, "a", r=2, targets=targets)
        assert [path for path, _ in lora._layers(model)] == ["q"]


def test_base_fingerprint_probes_first_64_entries_of_8_spread_parameters():
    """The fingerprint saved with an adapter: (sum, sum |x|) of the first 64 entries of ≤ 8 base
    parameters taken every len // 8 (at least every one), hand-computed on 9 and 17 parameters."""
    for count, picked in ((9, range(8)), (17, range(0, 16, 2)), (5, range(5))):
        model = nn.Sequential(*[nn.Linear(10, 10, bias=False) for _ in range(count)])
        with torch.no_grad():
            for i, layer in enumerate(model):
                layer.weight.copy_(torch.linspace(-1.0, 2.0, 100).view(10, 10) * (i + 1))
        lora.add_adapter(model, "a", r=2, targets=["0"])      # adapter parameters are not probed
        first64 = [(torch.linspace(-1.0, 2.0, 100) * (i + 1))[:64].double() for i in picked]
        expected = [[float(w.sum()), float(w.abs().sum())] for w in first64]
        assert lora.base_fingerprint(model)["probes"] == expected


def test_mixed_adapters_in_training_keep_device_dtype_and_layers_without_the_adapter():
    """Mixed-adapter batches (one adapter per row) in training mode: each row gets its own adapter's
    dropout rate; a layer the row's adapter does not wrap adds nothing and leaves that row untouched;
    everything stays on the model's device (meta here) and in its dtype (bfloat16); the row count is checked."""
    model = TwoLayers()
    lora.add_adapter(model, "a", r=2, alpha=4, dropout=0.5, targets=["q", "wo"])
    lora.add_adapter(model, "b", r=3, alpha=6, dropout=0.25, targets=["q"])
    with torch.no_grad():
        for name in ("a", "b"):
            for p in lora.adapter_parameters(model, name):
                p.normal_(0.0, 0.3)
    model.train()
    x = torch.randn(3, 24)
    with lora.mixed_adapters(model, ["a", "b"], [0, 1, 1]):
        out = model.wo(x)
        with pytest.raises(InputError, match="^mixed_adapters: row_adapter has 3 rows, the batch has 2$"):
            model.wo(x[:2].unsqueeze(1).expand(2, 5, 24))
    assert torch.equal(out[1:], x[1:] @ model.wo.weight.T)        # "b" is not on wo: rows 1, 2 are the base output
    half = model.to(torch.bfloat16)
    with lora.mixed_adapters(half, ["a", "b"], [0, 1, 1]):
        assert half(torch.randn(3, 16, dtype=torch.bfloat16)).dtype == torch.bfloat16
    meta = model.to("meta")
    with lora.mixed_adapters(meta, ["a", "b"], [0, 1, 1]):
        assert meta.q.mode[1].device.type == "meta"
        assert meta(torch.empty(3, 16, dtype=torch.bfloat16, device="meta")).device.type == "meta"


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


# ----------------------------------------------------------------------------- lora.convert_npz
def test_convert_npz_writes_peft_files_and_a_run_summary(tmp_path):
    """`convert`: the authors' save_lora .npz -> adapter_model.safetensors (float32, PEFT's "format": "pt"
    metadata) and the whole PEFT adapter_config.json (their LoraConfig: r, alpha = scaling·r, dropout 0.05,
    target_modules = last names); under runs/<objective>-<label>/adapter also a summary.json (the label after
    the last dash, consumption unknown); converting again into the same folder is fine."""
    import numpy as np
    from safetensors import safe_open
    m = "base_model.model.encoder.block.0.layer.0.SelfAttention"
    A, B = np.arange(8, dtype=np.float64).reshape(2, 4) / 7, np.arange(6, dtype=np.float64).reshape(3, 2) / 5
    src = tmp_path / "their.npz"
    np.savez(src, **{f"{m}.q_loraA": A, f"{m}.q_loraB": B, f"{m}.q_scaling": np.float64(8.0),
                     f"{m}.wo_loraA": A, f"{m}.wo_loraB": B, f"{m}.wo_scaling": np.array([8.0])})
    directory = tmp_path / "runs" / "four-objectives-authors" / "adapter"
    written = lora.convert_npz(str(src), str(directory), "t5-small")
    summary = tmp_path / "runs" / "four-objectives-authors" / "summary.json"
    assert written == [str(directory / "adapter_model.safetensors"), str(directory / "adapter_config.json"), str(summary)]
    assert files.read_json(str(directory / "adapter_config.json")) == dict(
        peft_type="LORA", task_type="SEQ_2_SEQ_LM", base_model_name_or_path="t5-small", r=2, lora_alpha=16,
        lora_dropout=0.05, target_modules=["q", "wo"], bias="none", fan_in_fan_out=False, inference_mode=True,
        init_lora_weights=True, use_rslora=False, use_dora=False, modules_to_save=None, rank_pattern={}, alpha_pattern={})
    assert files.read_json(str(summary)) == {"objective": "four-objectives", "seed": "authors", "imported_from": "their.npz",
                                             "steps": None, "data_points": None, "wall_seconds": None}
    with safe_open(str(directory / "adapter_model.safetensors"), "pt") as f:
        assert f.metadata() == {"format": "pt"}
        a, b = f.get_tensor(f"{m}.wo.lora_A.weight"), f.get_tensor(f"{m}.wo.lora_B.weight")
    assert a.dtype == b.dtype == torch.float32
    assert torch.equal(a, torch.tensor(A, dtype=torch.float32)) and torch.equal(b, torch.tensor(B, dtype=torch.float32))
    assert type(files.read_json(str(directory / "adapter_config.json"))["lora_alpha"]) is int
    np.savez(src, **{f"{m}.q_loraA": A, f"{m}.q_loraB": B, f"{m}.q_scaling": np.float64(2.25)})
    assert len(lora.convert_npz(str(src), str(directory))) == 2       # same folder again; summary.json kept
    assert files.read_json(str(directory / "adapter_config.json"))["lora_alpha"] == 4.5
    assert files.read_json(str(directory / "adapter_config.json"))["base_model_name_or_path"] == "google-t5/t5-base"
    assert lora.convert_npz(str(src), str(tmp_path / "elsewhere")) == [str(tmp_path / "elsewhere" / "adapter_model.safetensors"),
                                                                       str(tmp_path / "elsewhere" / "adapter_config.json")]
    assert len(lora.convert_npz(str(src), str(tmp_path / "nolabel" / "adapter"))) == 2    # no <objective>-<label>
    np.savez(src, **{f"{m}.q_loraA": A[:1], f"{m}.q_loraB": B[:, :1], f"{m}.q_scaling": np.float64(2.0)})
    lora.convert_npz(str(src), str(tmp_path / "rank1"))                                   # rank 1 is a rank
    assert files.read_json(str(tmp_path / "rank1" / "adapter_config.json"))["r"] == 1


@pytest.mark.parametrize("arrays, message", [
    ({"x_loraA": "A"}, "unexpected key 'x_loraA' (expected base_model.model.<module>_loraA / _loraB / _scaling)"),
    ({"base_model.model._loraA": "A"}, "unexpected key 'base_model.model._loraA'"),
    ({"base_model.model.q_lorab": "A"}, "unexpected key 'base_model.model.q_lorab'"),
    ({"base_model.model.q_loraA": "A", "base_model.model.q_scaling": "s"}, "base_model.model.q_loraB is missing"),
    ({"base_model.model.q_loraA": "A", "base_model.model.q_loraB": "A", "base_model.model.q_scaling": "s"},
     "base_model.model.q: expected loraA [r, in], loraB [out, r] and a 0-d scaling, got shapes (2, 4), (2, 4), ()"),
    ({"base_model.model.q_loraA": "A1", "base_model.model.q_loraB": "B1", "base_model.model.q_scaling": "s"},
     "expected loraA [r, in], loraB [out, r] and a 0-d scaling, got shapes (2,), (4, 2), ()"),
    ({"base_model.model.q_loraA": "An", "base_model.model.q_loraB": "B", "base_model.model.q_scaling": "s"},
     "base_model.model.q_loraA must hold finite numbers (dtype float64)"),
    ({"base_model.model.q_loraA": "A", "base_model.model.q_loraB": "B", "base_model.model.q_scaling": "sn"},
     "base_model.model.q_scaling must hold finite numbers (dtype float64)"),
    ({"base_model.model.q_loraA": "Ao"}, "array 'base_model.model.q_loraA' cannot be read "
     "(Object arrays cannot be loaded when allow_pickle=False)"),
    ({"base_model.model.q_loraA": "A0", "base_model.model.q_loraB": "B0", "base_model.model.q_scaling": "s"},
     "got shapes (0, 4), (4, 0), ()"),
    ({"base_model.model.q_loraA": "A", "base_model.model.q_loraB": "B", "base_model.model.q_scaling": "s2"},
     "got shapes (2, 4), (4, 2), (2,)"),
    ({"base_model.model.q_loraA": "A", "base_model.model.q_loraB": "B", "base_model.model.q_scaling": "s11"},
     "got shapes (2, 4), (4, 2), (1, 1)"),
    ({"base_model.model.q_loraA": "A", "base_model.model.q_loraB": "Bs", "base_model.model.q_scaling": "s"},
     "base_model.model.q_loraB must hold finite numbers (dtype <U1)"),
    ({"base_model.model.q_loraA": "A", "base_model.model.q_loraB": "B", "base_model.model.q_scaling": "s",
      "base_model.model.k_loraA": "A", "base_model.model.k_loraB": "B", "base_model.model.k_scaling": "s3"},
     "ranks [2] / scalings [3.0, 4.0] differ between modules (one rank and one scaling are supported)"),
])
def test_convert_npz_errors_name_the_array(tmp_path, arrays, message):
    import numpy as np
    values = {"A": np.ones((2, 4)), "B": np.ones((4, 2)), "A1": np.ones(2), "An": np.full((2, 4), np.nan), "sn": np.float64(np.inf), "Ao": np.array([{}], dtype=object), "B1": np.ones((4, 2)), "A0": np.ones((0, 4)),
              "B0": np.ones((4, 0)), "s": np.float64(4.0), "s2": np.ones(2), "s11": np.ones((1, 1)), "s3": np.float64(3.0),
              "Bs": np.full((4, 2), "x")}
    np.savez(tmp_path / "x.npz", **{key: values[v] for key, v in arrays.items()})
    with pytest.raises(InputError) as error:
        lora.convert_npz(str(tmp_path / "x.npz"), str(tmp_path / "out"))
    assert str(error.value) == f"{tmp_path / 'x.npz'}: {message}" or (
        str(error.value).startswith(f"{tmp_path / 'x.npz'}: ") and message in str(error.value))


def test_convert_npz_unreadable_archive_messages(tmp_path, monkeypatch):
    """A load error is one line: its first line, or its type when it has no text."""
    import numpy as np
    src = tmp_path / "x.npz"
    src.write_bytes(b"PK\x03\x04 this is not a zip archive")
    with pytest.raises(InputError, match=r"^.*x\.npz: not a readable \.npz archive \(File is not a zip file\)$"):
        lora.convert_npz(str(src), str(tmp_path / "out"))
    with pytest.raises(InputError, match=r"^.*missing\.npz: file not found$"):
        lora.convert_npz(str(tmp_path / "missing.npz"), str(tmp_path / "out"))
    monkeypatch.setattr(np, "load", lambda *args, **kwargs: (_ for _ in ()).throw(ValueError()))
    with pytest.raises(InputError, match=r"^.*x\.npz: not a readable \.npz archive \(ValueError\)$"):
        lora.convert_npz(str(src), str(tmp_path / "out"))
