"""evaluate.py: Eq. (3) by hand, the authors' test protocol (single-policy methods sampled top-50 in 3
seeded runs, EMORL's hidden level greedy; --greedy decodes all greedily) on a tiny T5 with saved adapters
against direct decodes, the table's formatting, search.json validation, and run discovery."""
import copy
import json
import math
import os
import re
import subprocess
import sys
import zlib

import pytest
import torch

import evaluate
import lora
import search
import t5
from files import InputError
from test_search import Tok

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OBJECTIVES = ("alpha", "beta")  # any d: the evaluation is generic in the objectives
PROMPTS = ["i feel sad", "work is hard today", "nothing helps"]


def test_consumption_is_eq_3_by_hand():
    """Parallel trainings: data = max_i data_i; time = max_i T_i + the search's decoding time."""
    runs = [{"data_points": 3328, "wall_seconds": 188.0}, {"data_points": 3840, "wall_seconds": 213.5},
            {"data_points": 2432, "wall_seconds": 113.0}]
    assert evaluate.consumption(runs, 59.25) == {"data points": 3840, "seconds": 272.75}
    assert evaluate.consumption(runs[:1]) == {"data points": 3328, "seconds": 188.0}
    assert evaluate.consumption([{"data_points": None, "wall_seconds": None}]) == {}  # an imported run


def text_score(prompts, responses):  # a deterministic function of each text: different texts, different scores
    return torch.tensor([zlib.crc32(r.encode()) % 1000 / 1000 for r in responses])


SCORERS = {"alpha": text_score, "beta": lambda p, r: torch.tensor([min(len(x) / 60, 1.0) for x in r])}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    torch.manual_seed(0)
    cfg = t5.T5Config(vocab_size=48, d_model=16, d_kv=4, d_ff=32, num_layers=2, num_heads=2, dropout_rate=0.0)
    base = t5.T5ForConditionalGeneration(cfg).eval()
    with torch.no_grad():
        base.shared.weight.normal_(0.0, 0.05)
    runs = tmp_path_factory.mktemp("runs")
    summaries = {"alpha": (3328, 188.0), "beta": (3840, 213.0), "uniform": (1600, 90.0)}
    for i, (method, (points, seconds)) in enumerate(summaries.items()):
        model = copy.deepcopy(base)
        lora.add_adapter(model, method, r=4, alpha=8, dropout=0.0)
        torch.manual_seed(10 + i)
        with torch.no_grad():
            for p in lora.adapter_parameters(model, method):
                p.normal_(0.0, 0.3)
        lora.save_adapter(model, method, str(runs / f"{method}-0" / "adapter"))
        (runs / f"{method}-0" / "summary.json").write_text(json.dumps({"data_points": points, "wall_seconds": seconds}))
    os.makedirs(runs / "beta-7")  # no summary.json: an unfinished run, ignored
    search_result = {"objectives": list(OBJECTIVES), "best_weights": [0.6, 0.4],
                     "evaluations": [{"weights": [1, 0], "seconds": 2.5}, {"weights": [0, 1], "seconds": 1.5}]}
    return base, str(runs), search_result


def run(setup, **kwargs):
    base, runs, search_result = setup
    return evaluate.evaluate(lambda: (copy.deepcopy(base), Tok()), SCORERS, PROMPTS, runs, search_result,
                             batch_size=3, objectives=OBJECTIVES, **kwargs)


def loaded(setup, *names):
    base, runs, _ = setup
    model = copy.deepcopy(base)
    for name in names:
        lora.load_adapter(model, os.path.join(runs, f"{name}-0", "adapter"), name)
    return model


def test_authors_protocol_samples_single_policies_and_decodes_emorl_greedily(setup):
    results = run(setup, generation_runs=2, seed=5)  # the command's default is 3
    assert list(results) == ["base", "alpha", "beta", "uniform", "param", "logit", "hidden"]
    for method, rows in results.items():
        sampled = method not in ("logit", "hidden")
        assert len(rows) == (2 if sampled else 1) and {r["decoding"] for r in rows} == {"top-50 sample" if sampled else "greedy"}
        assert [r["run"] for r in rows] == list(range(len(rows)))
    assert len({r["alpha"] for r in results["alpha"]}) > 1  # different generator seeds, different texts

    model = loaded(setup, "alpha")  # run 1 of "alpha" = top-50 sampling with generator seed 5 + 1
    texts = evaluate.generate_texts(model, Tok(), PROMPTS, 3, "cpu", adapter="alpha",
                                    generator=torch.Generator().manual_seed(6))
    expected = evaluate.metrics(SCORERS, PROMPTS, texts, OBJECTIVES)
    assert {k: results["alpha"][1][k] for k in expected} == expected
    model = loaded(setup, *OBJECTIVES)  # hidden level: greedy Eq. (2) with the searched weights
    texts = evaluate.generate_texts(model, Tok(), PROMPTS, 3, "cpu", aggregate=(list(OBJECTIVES), [0.6, 0.4], "hidden"))
    assert {k: results["hidden"][0][k] for k in expected} == evaluate.metrics(SCORERS, PROMPTS, texts, OBJECTIVES)

    for level in ("param", "logit", "hidden"):  # Eq. (3) through evaluate: T_agg = 2.5 + 1.5 s of search decoding
        assert (results[level][0]["data points"], results[level][0]["seconds"]) == (3840, 213.0 + 4.0)
    assert (results["uniform"][0]["data points"], results["uniform"][0]["seconds"]) == (1600, 90.0)
    assert all("seconds" not in r for r in results["alpha"][1:])  # consumption once per training seed

    markdown, table = evaluate.tables(results, OBJECTIVES)
    lines = {line.split(" | ")[0][2:]: line for line in markdown.splitlines()[2:]}
    assert "±" not in lines["hidden"].split(" | ", 3)[3].rsplit(" | ", 2)[0]  # one greedy run: no ±
    assert lines["alpha"].count("±") == 5  # 2 runs: alpha, beta, average, diversity-2, edit rate
    assert lines["hidden"].endswith("| 3,840 | 217 |") and "top-50 sample, 2 runs" in lines["alpha"]
    assert "| — | — |" in lines["base"]
    rows = {r.split(",")[0]: r.split(",") for r in table.splitlines()[1:]}
    assert rows["hidden"][-4:] == ["3840", "", "217", ""] and rows["alpha"][2:4] == ["1", "2"]


def test_greedy_flag_decodes_every_method_greedily_once(setup):
    results = run(setup, greedy=True, generation_runs=2)
    assert all(len(rows) == 1 and rows[0]["decoding"] == "greedy" for rows in results.values())
    model = loaded(setup, "beta")
    lora.set_adapter(model, "beta")
    ids, mask = Tok().batch_encode([p + " [SEP] " for p in PROMPTS])
    texts = Tok().batch_decode(t5.generate(model, ids, mask)[0])
    assert {k: results["beta"][0][k] for k in OBJECTIVES} == {k: v for k, v in evaluate.metrics(
        SCORERS, PROMPTS, texts, OBJECTIVES).items() if k in OBJECTIVES}


@pytest.mark.parametrize("content, needle", [
    ({}, "no best_weights"), ([], "expected a JSON object"), ({"best_weights": None}, "list of numbers"),
    ({"best_weights": [0.5, "x", 0.1]}, "list of numbers"), ({"best_weights": [0.5, 0.1]}, "expected 3 weights"),
    ({"best_weights": [0, 0, 0]}, "all weights are zero"), ({"best_weights": [1, 1, 1], "evaluations": {}}, "evaluations"),
    ({"best_weights": [1, 1, 1], "objectives": ["a", "b", "c"]}, "differ")])
def test_search_json_structure_is_checked(content, needle):
    with pytest.raises(InputError, match=needle) as e:
        evaluate.check_search(content, ("reflection", "empathy", "fluency"), "search.json")
    assert "\n" not in str(e.value) and str(e.value).startswith("search.json: ")


def test_evaluate_command_refuses_a_bad_search_json_before_any_work(tmp_path):
    (tmp_path / "s.json").write_text('{"best_weights": null}')
    result = subprocess.run([sys.executable, os.path.join(ROOT, "emorl.py"), "evaluate", "--search", str(tmp_path / "s.json"),
                             "--runs", str(tmp_path / "runs"), "--out", str(tmp_path / "e")],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and result.stderr.startswith("error: ") and result.stderr.count("\n") == 1
    assert "best_weights" in result.stderr and not (tmp_path / "e.md").exists()




def test_search_refuses_the_same_adapter_folder_twice(tmp_path):
    os.makedirs(tmp_path / "a")
    result = subprocess.run([sys.executable, os.path.join(ROOT, "emorl.py"), "search", "--adapters", str(tmp_path / "a"),
                             str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(tmp_path / "s.json")],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and "more than once" in result.stderr and result.stderr.count("\n") == 1


def test_search_header_compares_content_not_paths(tmp_path):
    """A moved project keeps its search.json: adapters and data are compared by content fingerprint."""
    (tmp_path / "one").mkdir()
    (tmp_path / "one" / "adapter_model.safetensors").write_bytes(b"weights")
    (tmp_path / "one" / "adapter_config.json").write_text("{}")
    import shutil
    shutil.copytree(tmp_path / "one", tmp_path / "moved")
    assert search.fingerprint(str(tmp_path / "one")) == search.fingerprint(str(tmp_path / "moved"))
    (tmp_path / "moved" / "adapter_model.safetensors").write_bytes(b"other weights")
    assert search.fingerprint(str(tmp_path / "one")) != search.fingerprint(str(tmp_path / "moved"))


# ----------------------------------------------------------------------------- runs, metrics, tables, protocol


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

    def generate_texts(model, tokenizer, prompts, batch_size, device, adapter=None, aggregate=None, generator=None, max_new_tokens=64):
        calls.append(dict(model=model, prompts=list(prompts), batch_size=batch_size, device=device, adapter=adapter,
                          aggregate=aggregate, generator=None if generator is None else (generator.device, generator.seed)))
        return [f"reply number {len(calls)} to {p}" for p in prompts]

    monkeypatch.setattr(evaluate, "generate_texts", generate_texts)
    monkeypatch.setattr(evaluate.lora, "load_adapter", lambda model, path, name: model.append(name))
    monkeypatch.setattr(evaluate.lora, "check_objective", lambda directory, objective, force=False: None)  # no files
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
    tok = Tok()

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
