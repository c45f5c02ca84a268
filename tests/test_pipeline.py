"""End to end through the command line, on a reduced embedded default built in the test:
train (three objectives) -> search -> generate -> evaluate, and kill -9 + rerun of a training run."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EMORL = os.path.join(ROOT, "emorl.py")
SMALL = ["--sample", "0.0834",  # 50 of the 600 sample prompts: 40 train, 5 aggregation, 5 inference
          "--batch-size", "4", "--seed", "0"]


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    from data import build_default
    out = tmp_path_factory.mktemp("default")
    build_default.build(str(out), seed=0, scale=0.02)
    return out


def model_flags(assets):
    return ["--policy", str(assets / "policy"), "--reflection", str(assets / "reflection"),
            "--empathy", str(assets / "empathy"), "--fluency", str(assets / "fluency")]


def emorl(*args, cwd):
    result = subprocess.run([sys.executable, EMORL, *args], capture_output=True, text=True, cwd=cwd, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return result.stdout


def train_flags(assets, runs, steps):
    return [*model_flags(assets), *SMALL, "--runs", str(runs), "--max-steps", str(steps), "--val-every", "2",
            "--max-new-tokens", "16"]


def test_train_search_generate_evaluate(assets, tmp_path):
    emorl("train", "all", *train_flags(assets, tmp_path / "runs", 2), cwd=tmp_path)
    for name in ("reflection", "empathy", "fluency"):
        summary = json.loads((tmp_path / "runs" / f"{name}-0" / "summary.json").read_text())
        assert summary["steps"] == 2 and summary["data_points"] == 8
        assert set(summary["final_validation"]) == {"reflection", "empathy", "fluency"}
        assert (tmp_path / "runs" / f"{name}-0" / "adapter" / "adapter_model.safetensors").exists()
        lines = (tmp_path / "runs" / f"{name}-0" / "train.jsonl").read_text().splitlines()
        assert [json.loads(line)["type"] for line in lines] == ["validation", "step", "step", "validation"]
        assert [json.loads(line)["prompts"] for line in lines[::3]] == [5, 5]   # the whole aggregation split
        assert all(json.loads(line)["reward"] < 0 for line in lines[1:3])     # log of a clipped score

    out = emorl("search", *model_flags(assets), "--sample", "0.0834", "--runs", "runs", "--iterations", "1",
                "--batch-size", "8", cwd=tmp_path)
    result = json.loads((tmp_path / "search.json").read_text())
    assert len(result["evaluations"]) == 19                  # 3^3 grid, w = 0 skipped, one decode per ray
    assert len(result["best_weights"]) == 3 and "hypervolume" in json.dumps(result["pareto"])
    assert (tmp_path / "search.svg").read_text().startswith("<svg") and "best weights" in out

    text = emorl("generate", "I keep putting off my exams and I feel awful.", "--weights", "0.8,0.5,0.05",
                 "--policy", str(assets / "policy"), "--runs", "runs", cwd=tmp_path)
    assert len(text.splitlines()) == 1                      # one reply (a reduced build's policy may say nothing)

    table = emorl("evaluate", *model_flags(assets), "--sample", "0.0834", "--runs", "runs", cwd=tmp_path)
    for method in ("base", "reflection", "empathy", "fluency", "param", "logit", "hidden"):
        assert f"| {method} |" in table
    assert (tmp_path / "evaluate.csv").read_text().count("\n") == 8


def test_kill_9_then_rerun_equals_uninterrupted(assets, tmp_path):
    flags = train_flags(assets, tmp_path / "straight", 8)
    emorl("train", "reflection", *flags, cwd=tmp_path)

    flags = train_flags(assets, tmp_path / "killed", 8)
    process = subprocess.Popen([sys.executable, EMORL, "train", "reflection", *flags], cwd=tmp_path,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    log = tmp_path / "killed" / "reflection-0" / "train.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and process.poll() is None:   # wait for the step-2 validation checkpoint
        if log.exists() and log.read_text().count('"validation"') >= 2:
            break
        time.sleep(0.05)
    if process.poll() is not None:
        pytest.skip("the run finished before it could be killed")
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert not (tmp_path / "killed" / "reflection-0" / "summary.json").exists()
    emorl("train", "reflection", *flags, cwd=tmp_path)

    import files
    straight = files.load_safetensors(str(tmp_path / "straight" / "reflection-0" / "adapter"))
    resumed = files.load_safetensors(str(tmp_path / "killed" / "reflection-0" / "adapter"))
    assert straight.keys() == resumed.keys() and all(torch.equal(straight[k], resumed[k]) for k in straight)

    def curve(folder):
        rows = [json.loads(line) for line in (tmp_path / folder / "reflection-0" / "train.jsonl").read_text().splitlines()]
        return [{k: v for k, v in row.items() if not k.endswith("seconds")} for row in rows]
    assert curve("straight") == curve("killed")
