"""evaluate.py: Eq. (3) by hand, the authors' test protocol (single-policy methods sampled top-50 in 3
seeded runs, EMORL's hidden level greedy; --greedy decodes all greedily) on a tiny T5 with saved adapters
against direct decodes, the table's formatting, search.json validation, and run discovery."""
import copy
import json
import os
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


def test_find_runs_takes_any_method_and_seed_labels(tmp_path):
    for folder in ("reflection-0", "dynaopt-3", "four_objectives-1", "reflection-authors", "empathy-2"):
        os.makedirs(tmp_path / folder)
        if folder != "empathy-2":  # unfinished
            (tmp_path / folder / "summary.json").write_text("{}")
    found = evaluate.find_runs(str(tmp_path))
    assert found == {0: {"reflection": str(tmp_path / "reflection-0")}, 3: {"dynaopt": str(tmp_path / "dynaopt-3")},
                     1: {"four_objectives": str(tmp_path / "four_objectives-1")},
                     "authors": {"reflection": str(tmp_path / "reflection-authors")}}
    assert sorted(found, key=evaluate.seed_order) == [0, 1, 3, "authors"]


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
