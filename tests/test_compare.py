"""compare.py: the preference-weighted search at λ = 1/d is the plain search, a one-hot λ decodes as
that objective's adapter (EMORL hidden / logit, Rewarded Soups) and, for HoE, as that objective's expert
(with its trained router present), hypervolume and Spearman's ρ against hand computation, the grids, the
claims' verdicts follow the numbers, bad preference files give one `error:` line, HoE and IterativeRS rows
(IterativeRS only at the budgeted λ), reproduce / compare resume after kill -9 to the same outputs, and
--jobs 2 trains the same adapter bytes as --jobs 1."""
import copy
import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import compare
import emorl
import evaluate
import hoe
import lora
import report
import search
import t5

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EMORL = os.path.join(ROOT, "emorl.py")
NAMES = ["reflection", "empathy", "fluency"]


# ----------------------------------------------------------------------------- a tiny world
from test_pipeline import assets, model_flags  # noqa: E402,F401  (the reduced build and its flags, one definition)


@pytest.fixture(scope="module")
def world(assets):
    """A compare.World on the reduced default: the policy with three adapters whose B matrices are
    perturbed (seeded), so that each adapter decodes differently from the base model."""
    args = emorl.build_parser().parse_args(["compare", *model_flags(assets), "--sample", "0.25", "--max-new-tokens", "12"])
    args.names, args.known = list(NAMES), emorl.known_scorers(args)
    model, tokenizer = emorl.load_policy(args)
    generator = torch.Generator().manual_seed(0)
    for name in NAMES:
        lora.add_adapter(model, name)
        with torch.no_grad():
            for _, m in lora._layers(model):
                m.lora_B[name].copy_(torch.randn(m.lora_B[name].shape, generator=generator) * 0.5)
    scorers = emorl.load_scorers(args, NAMES, args.known)
    return compare.World(args, 0, model, tokenizer, scorers, emorl.load_splits(args), "unused")


def test_search_at_uniform_preference_is_the_plain_search(world):
    """Algorithm 1 on Σ λ_i s_i with λ = 1/d: the same evaluations, means and best weights as the plain
    mean (search.scalarise divides λ by its largest entry, so 1/3 becomes exactly 1)."""
    prompts = [e.prompt for e in world.splits["aggregation"]][:4]
    common = dict(level="hidden", batch_size=4, max_new_tokens=8)
    plain = search.make_objective(world.model, world.tokenizer, NAMES, world.scorers, prompts, **common)
    weighted = search.make_objective(world.model, world.tokenizer, NAMES, world.scorers, prompts, **common,
                                     preference=(1 / 3, 1 / 3, 1 / 3))
    a = search.hierarchical_grid_search(plain, 3, iterations=2)
    b = search.hierarchical_grid_search(weighted, 3, iterations=2)
    assert a["best_weights"] == b["best_weights"] and a["best_score"] == b["best_score"]
    assert [r["mean"] for r in a["evaluations"]] == [r["mean"] for r in b["evaluations"]]
    assert len({r["mean"] for r in a["evaluations"]}) > 1            # the objective is not flat


def test_scalarise_by_hand():
    assert search.scalarise([0.2, 0.4, 0.9]) == (0.2 + 0.4 + 0.9) / 3
    assert search.scalarise([0.2, 0.4, 0.9], (1 / 3, 1 / 3, 1 / 3)) == (0.2 + 0.4 + 0.9) / 3   # bit for bit
    assert search.scalarise([0.2, 0.4, 0.9], (0.5, 0.5, 0.0)) == pytest.approx(0.3)
    assert search.scalarise([0.2, 0.4, 0.9], (0.0, 0.0, 1.0)) == 0.9
    assert search.scalarise([0.2, 0.4], (0.25, 0.75)) == pytest.approx(0.35)


@pytest.mark.parametrize("level", ["hidden", "logit", "param"])
def test_one_hot_preference_decodes_as_that_adapter(world, level):
    """compare's w = λ methods (EMORL hidden, logit; Rewarded Soups = param) at λ = e_i: the texts of
    adapter i decoded alone, and not those of another adapter."""
    prompts = [e.prompt for e in world.splits["inference"]]
    for i, name in enumerate(NAMES):
        one_hot = tuple(1.0 if j == i else 0.0 for j in range(3))
        alone = evaluate.generate_texts(world.model, world.tokenizer, prompts, 16, "cpu", adapter=name, max_new_tokens=12)
        ensemble = evaluate.generate_texts(world.model, world.tokenizer, prompts, 16, "cpu",
                                           aggregate=(NAMES, list(one_hot), level), max_new_tokens=12)
        assert ensemble == alone
        row = compare.weights_are_preference(level)(world, i, one_hot)
        assert row["scores"] == compare.measure(world, one_hot, adapter=name)["scores"]
        assert row["weighted"] == row["scores"][i] and row["data points"] == 0
    others = [evaluate.generate_texts(world.model, world.tokenizer, prompts, 16, "cpu", adapter=n, max_new_tokens=12)
              for n in NAMES]
    assert others[0] != others[1] or others[1] != others[2]           # the adapters differ: the check can fail


def test_searched_emorl_reuses_decodes_across_preferences(world, tmp_path):
    """Every λ's search is Algorithm 1 on Σ λ_i s_i; the cache decodes each ray once for all λ."""
    w = world._replace(folder=str(tmp_path), args=_with(world.args, iterations=1))
    point = compare.emorl_searched("hidden")
    first = point(w, 0, (1.0, 0.0, 0.0))
    cache = json.loads((tmp_path / "cache-hidden.json").read_text())
    assert first["evaluations"] == len(cache) == 19                   # 3^3 grid, w = 0 skipped
    second = point(w, 1, (0.0, 0.0, 1.0))
    assert len(json.loads((tmp_path / "cache-hidden.json").read_text())) == 19   # nothing decoded again
    best = max(cache.values(), key=lambda r: r["scores"][2])["scores"][2]
    assert second["evaluations"] == 19 and search.scalarise(  # the best ray for fluency alone was chosen
        next(r["scores"] for r in cache.values() if r["scores"][2] == best), (0.0, 0.0, 1.0)) == best


def test_hoe_at_a_one_hot_preference_decodes_as_that_objectives_expert(world, tmp_path):
    """compare's `hoe` row: built from the seed's adapters (on disk), a router trained at (0.25, 0.25, 0.5); at λ = e_i
    the routing plan is expert i alone, so HoE's texts are those of adapter expert_<i> decoded alone (task-SVD of
    objective i's adapter, 40 % pruned), and the row's scores are that adapter's."""
    for name in NAMES:
        lora.save_adapter(world.model, name, str(tmp_path / "seed-0" / "runs" / f"{name}-0" / "adapter"))
    w = world._replace(model=copy.deepcopy(world.model), folder=str(tmp_path / "seed-0" / "compare"),
                       args=_with(world.args, out=str(tmp_path), hoe_steps=2, batch_size=4))
    prompts = [e.prompt for e in w.splits["inference"]]
    texts = {}
    for i, name in enumerate(NAMES):
        one_hot = tuple(1.0 if j == i else 0.0 for j in range(3))
        row = hoe.compare_point(w, i, one_hot)
        experts = hoe.load_hoe(w.model, str(tmp_path / "seed-0" / "hoe"))
        assert [r.preference for r in experts.routers] == [[0.25, 0.25, 0.5]]              # the router is there
        assert row["plan"] == [[1.0, f"expert_{name}"]] and row["data points"] == 0
        texts[name] = evaluate.generate_texts(w.model, w.tokenizer, prompts, 16, "cpu", adapter=f"expert_{name}",
                                              max_new_tokens=12)
        assert hoe.decode_at(w.model, w.tokenizer, prompts, one_hot, experts, 16, "cpu", 12) == texts[name]
        assert row["scores"] == compare.measure(w, one_hot, adapter=f"expert_{name}")["scores"]
    assert len({tuple(t) for t in texts.values()}) > 1                  # the experts differ: the check can fail
    router = hoe.compare_point(w, 3, (0.25, 0.25, 0.5))                  # the router's own λ: the router alone
    assert router["plan"] == [[1.0, "router_0p25_0p25_0p5"]]


def _with(args, **changes):
    import copy
    out = copy.copy(args)
    vars(out).update(changes)
    return out


# ----------------------------------------------------------------------------- pure pieces by hand
def test_hypervolume_hand_cases_with_dominated_and_duplicate_points():
    assert report.hypervolume([(1, 3), (3, 1), (2, 2)]) == 6.0
    assert report.hypervolume([(1, 3), (3, 1), (2, 2), (2, 2), (1, 1), (0.5, 2.5)]) == 6.0   # duplicate, dominated
    assert report.hypervolume([(3, 3), (3, 3)], reference=(1, 2)) == 2.0                    # duplicates count once
    assert report.hypervolume([(0.5, 0.5), (0.8, 0.4)], reference=(0.4, 0.3)) == pytest.approx(0.1 * 0.2 + 0.3 * 0.1)
    assert report.hypervolume([(2, 1, 1), (1, 2, 1), (1, 1, 2), (1, 1, 1), (2, 1, 1)]) == 4.0   # 3·2 − 3 + 1
    assert report.hypervolume([(2, 2, 2), (1, 1, 1), (2, 2, 1)]) == 8.0                   # one box dominates the rest
    assert report.hypervolume([(0.6, 0.5, 0.7)], reference=(0.5, 0.6, 0.2)) == 0.0         # below the base in one


def test_spearman_by_hand():
    assert report.spearman([1, 2, 3, 4], [1, 3, 2, 4]) == pytest.approx(1 - 6 * 2 / (4 * 15))   # 0.8
    assert report.spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert report.ranks([0.5, 0.1, 0.5, 0.9]) == [2.5, 1.0, 2.5, 4.0]                       # ties: average rank
    # with ties: the Pearson correlation of ranks (1.5, 1.5, 3) and (1, 2, 3)
    assert report.spearman([0.1, 0.1, 0.7], [0.2, 0.3, 0.9]) == pytest.approx(1.5 / math.sqrt(1.5 * 2))
    assert report.spearman([1, 1, 1], [1, 2, 3]) is None


def test_preference_grids():
    assert compare.preference_grid(2) == [(k / 10, 1 - k / 10) for k in range(11)]
    grid3 = compare.preference_grid(3)
    assert len(grid3) == 13 and (0.8, 0.1, 0.1) in grid3 and (1 / 3, 1 / 3, 1 / 3) in grid3
    assert len(compare.preference_grid(4)) == 35
    assert all(abs(sum(p) - 1) <= 1e-12 for d in (2, 3, 4) for p in compare.preference_grid(d))
    assert compare.single_policy_indices(grid3, 1) == [7]                                   # the centre first
    assert compare.single_policy_indices(compare.preference_grid(2), 3) == [4, 5, 6]


def test_claims_follow_the_numbers():
    """A verdict flips when the numbers do, and unconverged runs make a convergence claim 'not measured'."""
    def rows(avg, div=0.5):
        return [{"average": avg, "diversity-2": div}]
    t2 = {"greedy": {"base": rows(0.3), "Uniform": rows(0.6), "DynaOpt": rows(0.62), "Model Soups (param)": rows(0.5),
                     "EMORL hidden": rows(0.61, 0.9)}}
    run = lambda data, conv=True: {"data points": data, "seconds": 1.0, "converged": conv, "steps": 1}  # noqa: E731
    cost = {"a": [run(100), run(120)], "b": [run(80), run(90)], "uniform": [run(400), run(600)],
            "dynaopt": [run(500), run(900)], "EMORL (Eq. 3)": [{**run(150), "weights": [0.5, 0.4]}, {**run(160), "weights": [1, 0]}]}
    verdicts = [c[3] for c in report.claims(t2, cost, ["a", "b"])]
    assert verdicts == ["reproduced"] * 7 + ["not reproduced"]              # one seed's weights are one adapter
    cost["EMORL (Eq. 3)"][1]["weights"] = [0.3, 0.7]
    assert report.claims(t2, cost, ["a", "b"])[-1][3] == "reproduced"
    t2["greedy"]["EMORL hidden"] = rows(0.25, 0.1)
    cost["b"][1] = run(90, conv=False)
    verdicts = [c[3] for c in report.claims(t2, cost, ["a", "b"])]
    assert verdicts[:4] == ["not reproduced"] * 4 and verdicts[4:7] == ["not measured"] * 3


@pytest.mark.parametrize("text, message", [
    ("", "no preference"), ("0.5,0.5\n", "has 2 weights, expected 3"), ("1.2,-0.2,0\n", "negative"),
    ("0.5,0.3,0.1\n", "not 1"), ("nan,0.5,0.5\n", "not a finite number"), ("0.5,a,0.5\n", "not comma-separated")])
def test_bad_preference_file_is_one_error_line(assets, tmp_path, capsys, text, message):
    path = tmp_path / "prefs.txt"
    path.write_text("# lambda\n" + text)
    code = emorl.main(["compare", *model_flags(assets), "--preferences", str(path), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and message in err and err.count("\n") == 1
    assert not (tmp_path / "out" / "seed-0").exists()                                      # before any work


# ----------------------------------------------------------------------------- kill -9 and resume, end to end
SMALL = ["--sample", "0.25", "--batch-size", "4", "--seeds", "0", "--max-steps", "2", "--val-every", "2",
         "--max-new-tokens", "8", "--iterations", "1", "--objectives", "reflection,empathy"]


def run(args, cwd, kill_when=None):
    """Run emorl.py; with kill_when (a path), kill -9 it as soon as that file exists and return False."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen([sys.executable, EMORL, *args], cwd=cwd, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    if kill_when is not None:
        deadline = time.time() + 600
        while time.time() < deadline and process.poll() is None and not os.path.exists(kill_when):
            time.sleep(0.02)
        if process.poll() is None:
            os.kill(process.pid, signal.SIGKILL)
            process.wait()
            return False
    output = process.communicate(timeout=900)[0]
    assert process.returncode == 0, output[-3000:]
    return True


def untimed(value):
    """A JSON value without its wall-clock fields (seconds differ between any two runs)."""
    if isinstance(value, dict):
        return {k: untimed(v) for k, v in value.items() if "seconds" not in k and k != "how"}
    if isinstance(value, list):
        return [untimed(v) for v in value]
    return value


def test_reproduce_and_compare_resume_after_kill_9(assets, tmp_path):
    prefs = tmp_path / "prefs.txt"
    prefs.write_text("1,0\n0.5,0.5\n0,1\n")
    reproduce = ["reproduce", *model_flags(assets), *SMALL, "--generation-runs", "1"]
    comparison = ["compare", *model_flags(assets), *SMALL, "--preferences", str(prefs), "--hoe-steps", "2"]
    for folder in ("straight", "killed"):
        (tmp_path / folder).mkdir()
    run([*reproduce, "--out", "out", "--jobs", "2"], tmp_path / "straight")          # its 4 runs in 2 processes
    run([*comparison, "--out", "out"], tmp_path / "straight")
    killed = tmp_path / "killed" / "out"
    stopped = [not run([*reproduce, "--out", "out"], tmp_path / "killed", kill_when=killed / "seed-0" / "search.json"),
               not run([*comparison, "--out", "out"], tmp_path / "killed",
                       kill_when=killed / "seed-0" / "compare" / "cache-hidden.json")]
    run([*reproduce, "--out", "out"], tmp_path / "killed")
    run([*comparison, "--out", "out"], tmp_path / "killed")
    for method in ("reflection", "empathy", "uniform", "dynaopt"):                  # --jobs 2 = --jobs 1
        assert same_run(tmp_path / "straight" / "out", killed, f"seed-0/runs/{method}-0")
    if not any(stopped):
        pytest.skip("every run finished before it could be killed")
    for name in ("reproduce.json", "compare.json"):
        straight = json.loads((tmp_path / "straight" / "out" / name).read_text())
        resumed = json.loads((killed / name).read_text())
        assert untimed(straight) == untimed(resumed)
    md = (killed / "reproduce.md").read_text()
    assert "| claim | paper | measured | verdict |" in md and "EMORL hidden" in md and "Model Soups (param)" in md
    assert (killed / "figure3.svg").read_text().startswith("<svg") and (killed / "seed-0" / "search.svg").exists()
    assert (killed / "fronts.svg").read_text().count('class="point"') > 0
    result = json.loads((killed / "compare.json").read_text())
    methods = emorl.build_parser().parse_args(["compare"]).methods.split(",")
    assert {r["method"] for r in result["rows"]} == set(methods) == set(compare.METHODS) - {"iterative"}
    assert [r["index"] for r in result["rows"] if r["method"] == "single"] == [1]           # budget 1: the centre


def same_run(a, b, run_dir) -> bool:
    """The same adapter bytes and the same summary.json (wall-clock fields aside) in two output folders."""
    adapter = "adapter/adapter_model.safetensors"
    return ((a / run_dir / adapter).read_bytes() == (b / run_dir / adapter).read_bytes()
            and untimed(json.loads((a / run_dir / "summary.json").read_text()))
            == untimed(json.loads((b / run_dir / "summary.json").read_text())))


def test_compare_hoe_and_iterative_rows_and_jobs(assets, tmp_path):
    """compare --methods hoe,iterative: HoE at every λ (a decode: 0 data points; its build and router as the cost of
    one more objective), IterativeRS only at the λ the single-policy budget picks, its data points from its run;
    --jobs 2 gives the objective runs of --jobs 1, bit for bit, and the same compare.json."""
    prefs = tmp_path / "prefs.txt"
    prefs.write_text("1,0\n0.5,0.5\n0,1\n")
    comparison = ["compare", *model_flags(assets), *SMALL, "--preferences", str(prefs), "--methods", "hoe,iterative",
                  "--hoe-steps", "2", "--merge-every", "1", "--iterative-steps", "2"]
    run([*comparison, "--out", "two", "--jobs", "2"], tmp_path)
    run([*comparison, "--out", "one"], tmp_path)
    for name in ("reflection", "empathy"):
        assert same_run(tmp_path / "two", tmp_path / "one", f"seed-0/runs/{name}-0")
    result = json.loads((tmp_path / "two" / "compare.json").read_text())
    assert untimed(result) == untimed(json.loads((tmp_path / "one" / "compare.json").read_text()))
    rows = {m: [r for r in result["rows"] if r["method"] == m] for m in ("hoe", "iterative")}
    assert [r["index"] for r in rows["hoe"]] == [0, 1, 2] and all(r["data points"] == 0 for r in rows["hoe"])
    assert rows["hoe"][0]["plan"] == [[1.0, "expert_reflection"]]
    assert [r["index"] for r in rows["iterative"]] == [1] and "parallel seconds" in rows["iterative"][0]
    assert rows["iterative"][0]["data points"] == 2 * 2 * 1 * 4              # rounds x experts x m x batch
    assert (tmp_path / "two" / "seed-0" / "compare" / "runs" / "iterative-pref1-0" / "soup.safetensors").exists()
    once = result["hoe build and router"]["0"]
    assert once["data points"] == 2 * 4 and once["trainable parameters"] > 0      # the router: steps x batch
    cost = result["costs"]
    assert cost["hoe"]["one more objective"]["data points"] == 8 + 8             # one objective run (2 x 4) + router
    assert cost["iterative"]["one more objective"]["data points"] == 16
    md = (tmp_path / "two" / "compare.md").read_text()
    assert "| HoE (routed LoRA experts) | meta-policy" in md and "| IterativeRS, w = λ | single-policy" in md
    assert "IterativeRS, w = λ trained at λ = (0.5, 0.5)" in md


def test_correlation_table_says_when_a_seed_had_constant_scores():
    """ρ is undefined on constant scores (None): that seed is left out of the mean, and the cell says so."""
    def seed(rho):
        return {"spearman": {source: {"a/b": rho} for source in ("base", "a", "b")}}
    table = compare.correlation_table([seed(0.5), seed(None), seed(-0.5)], ["a", "b"])
    assert "| base | 0.0000 ± 0.5000 (2 of 3 seeds; constant scores in the others) |" in table
    assert "— (constant scores)" in compare.correlation_table([seed(None)], ["a", "b"])
    assert "of 1 seeds" not in compare.correlation_table([seed(0.25)], ["a", "b"])
