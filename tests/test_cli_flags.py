"""The command line's contract for flags, folders and leftovers (issue 15): every bad flag value, every argparse
error and every output folder that cannot be written stops before any work with one line `error: ...` on
stderr and exit status 2, never a traceback, leaving every existing output as it was; a run removes the
temporary files a killed run left behind; --help shows each flag's help and default.
Each CLI test runs the real emorl.py in a subprocess."""
import argparse
import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EMORL = os.path.join(ROOT, "emorl.py")


def run(*args, cwd=None, emorl=EMORL):
    return subprocess.run([sys.executable, emorl, *args], capture_output=True, text=True, cwd=cwd, timeout=300)


def assert_one_line_error(result, *needles):
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


def snapshot(folder):
    """Every file and folder under `folder` with its bytes and mtime: what a failed command must not touch."""
    state = {}
    for base, dirs, files in os.walk(folder):
        for name in dirs + files:
            path = os.path.join(base, name)
            stat = os.stat(path)
            state[os.path.relpath(path, folder)] = (stat.st_mtime_ns, open(path, "rb").read() if name in files else None)
    return state


@pytest.fixture
def outputs(tmp_path):
    """A working directory that already holds outputs of earlier commands (a run, search.json, evaluate.md)."""
    run_dir = tmp_path / "runs" / "reflection-0"
    (run_dir / "adapter").mkdir(parents=True)
    (run_dir / "summary.json").write_text('{"steps": 3}\n')
    (run_dir / "train.jsonl").write_text('{"type": "step", "step": 1}\n')
    (tmp_path / "search.json").write_text('{"best_weights": [1, 0, 0]}\n')
    (tmp_path / "evaluate.md").write_text("| method |\n")
    return tmp_path


# ----------------------------------------------------------------------------- 1. flags checked at parse time
BAD_FLAGS = [
    (["train", "reflection", "--batch-size", "0"], "--batch-size"),
    (["train", "reflection", "--val-every", "0"], "--val-every"),
    (["train", "reflection", "--samples-per-prompt", "0"], "--samples-per-prompt"),
    (["train", "reflection", "--samples-per-prompt", "1"], "integer >= 2"),
    (["train", "reflection", "--lr", "nan"], "--lr"),
    (["train", "reflection", "--lr", "0"], "--lr"),
    (["train", "reflection", "--beta", "inf"], "--beta"),
    (["train", "reflection", "--beta", "-0.1"], "--beta"),
    (["train", "reflection", "--grad-clip", "0"], "--grad-clip"),
    (["train", "reflection", "--max-new-tokens", "-3"], "--max-new-tokens"),
    (["train", "reflection", "--seed", "99999999999999999999"], "--seed"),
    (["train", "reflection", "--seed", "-1"], "--seed"),
    (["train", "reflection", "--seed", "1.5"], "--seed"),
    (["train", "reflection", "--device", "foo"], "--device"),
    (["train", "reflection", "--sample", "1.5"], "--sample"),
    (["train", "reflection", "--sample", "nan"], "--sample"),
    (["train", "reflection", "--sample", "0"], "--sample"),
    (["train", "reflection", "--split-seed", "x"], "--split-seed"),
    (["train", "reflection", "--max-steps", "0"], "--max-steps"),
    (["train", "reflection", "--max-steps", "-5"], "--max-steps"),
    (["train", "reflection", "--cv-window", "1"], "--cv-window"),
    (["train", "reflection", "--cv-tolerance", "-1"], "--cv-tolerance"),
    (["train", "dynaopt", "--gamma", "0"], "--gamma"),
    (["search", "--batch-size", "0"], "--batch-size"),
    (["search", "--iterations", "-2"], "--iterations"),
    (["search", "--iterations", "0"], "--iterations"),
    (["generate", "hello", "--weights", "1,1,1", "--max-new-tokens", "0"], "--max-new-tokens"),
    (["evaluate", "--batch-size", "0"], "--batch-size"),
    (["evaluate", "--sample", "2"], "--sample"),
    (["build-default", "--out", "x", "--scale", "0"], "--scale"),
    (["build-default", "--out", "x", "--seed", "-3"], "--seed"),
]


@pytest.mark.parametrize("argv, flag", BAD_FLAGS, ids=[" ".join(a) for a, _ in BAD_FLAGS])
def test_bad_flag_values_stop_before_any_work(outputs, argv, flag):
    before = snapshot(outputs)
    assert_one_line_error(run(*argv, cwd=outputs), f"argument {flag}" if flag.startswith("--") else flag, "--help")
    assert snapshot(outputs) == before


def test_cuda_without_cuda_is_refused(outputs):
    import torch
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    before = snapshot(outputs)
    assert_one_line_error(run("train", "reflection", "--device", "cuda", cwd=outputs), "--device", "no CUDA device")
    assert snapshot(outputs) == before


def test_device_type_checks_the_machine(monkeypatch):
    import torch

    import emorl
    assert emorl.device("cpu") == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert emorl.device("cuda") == "cuda" and emorl.device("cuda:0") == "cuda:0"
    with pytest.raises(argparse.ArgumentTypeError, match="1 CUDA device"):
        emorl.device("cuda:7")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(argparse.ArgumentTypeError, match="no CUDA device"):
        emorl.device("cuda:0")
    for bad in ("foo", "meta", "cuda:-1"):
        with pytest.raises(argparse.ArgumentTypeError):
            emorl.device(bad)


def test_number_and_integer_types_by_hand():
    import emorl
    assert emorl.fraction("1") == 1.0 and emorl.fraction("1e-3") == 0.001
    assert emorl.seed("0") == 0 and emorl.seed(str(2**63 - 1)) == 2**63 - 1
    for parse, bad in ((emorl.fraction, "0"), (emorl.fraction, "-inf"), (emorl.fraction, "1.0000001"),
                       (emorl.seed, str(2**63)), (emorl.positive, "0"), (emorl.positive, "2.0"),
                       (emorl.number(0.0), "nan"), (emorl.number(0.0, low_open=True), "0.0")):
        with pytest.raises(argparse.ArgumentTypeError):
            parse(bad)
    assert emorl.number(0.0)("0") == 0.0 and emorl.integer(2)("2") == 2


# ----------------------------------------------------------------------------- 2. argparse's own errors
@pytest.mark.parametrize("argv, needles", [
    (["train", "foo"], ["unknown objective 'foo'", "--scorer NAME=DIR"]),
    (["train", "reflection", "--bogus", "1"], ["unrecognized arguments: --bogus 1", "`emorl.py train --help`"]),
    (["generate", "hi", "--weights", "1,1,1", "--data", "x"], ["unrecognized arguments: --data x",
                                                               "`emorl.py generate --help`"]),
    (["generate", "hello"], ["--weights", "required"]),
    (["evaluate", "--runs"], ["--runs", "expected one argument"]),
    ([], ["COMMAND", "emorl.py --help"]),
    (["teach"], ["invalid choice: 'teach'"]),
])
def test_argparse_errors_are_one_line(outputs, argv, needles):
    before = snapshot(outputs)
    assert_one_line_error(run(*argv, cwd=outputs), *needles)
    assert snapshot(outputs) == before


def test_negative_weights_reach_the_weight_check():
    assert_one_line_error(run("generate", "--weights", "-1,0.5,0.5", "hello"), "weight -1", "negative")


def test_weights_glue_leaves_other_arguments_alone():
    import emorl
    args = emorl.build_parser().parse_args(["generate", "--weights", "-1,2,3", "-5 degrees outside", "--seed", "3"])
    assert args.weights == "-1,2,3" and args.text == ["-5 degrees outside"] and args.seed == 3
    args = emorl.build_parser().parse_args(["generate", "hi", "--weights", "0.5,-1,0.2", "--max-new-tokens", "4"])
    assert args.weights == "0.5,-1,0.2" and args.text == ["hi"] and args.max_new_tokens == 4


# ----------------------------------------------------------------------------- 3. output folders that cannot be written
@pytest.fixture
def read_only(tmp_path):
    """A folder nobody can write in: chmod for a normal user, the immutable attribute for root (whom
    permissions do not stop). Skipped where neither works."""
    folder = tmp_path / "read-only"
    folder.mkdir()
    (folder / "search.json").write_text('{"best_weights": [1, 0, 0]}\n')
    if os.geteuid() != 0:
        folder.chmod(0o555)
        undo = ["chmod", "755", str(folder)]
    else:
        if subprocess.run(["chattr", "+i", str(folder)], capture_output=True).returncode != 0:
            pytest.skip("cannot make a read-only folder here (root without chattr)")
        undo = ["chattr", "-i", str(folder)]
    try:
        with open(folder / "probe", "w"):
            pass
        writable = True
    except OSError:
        writable = False
    if writable:
        subprocess.run(undo)
        pytest.skip("the folder stayed writable")
    yield folder
    subprocess.run(undo)


@pytest.mark.parametrize("argv, needle", [
    (["train", "reflection"], "--runs runs"),
    (["search"], "--out search.json"),
    (["evaluate"], "--out evaluate"),
    (["build-default", "--out", "models"], "--out models"),
])
def test_read_only_working_directory(read_only, argv, needle):
    before = snapshot(read_only)
    assert_one_line_error(run(*argv, cwd=read_only), needle, "cannot write")
    assert snapshot(read_only) == before


def test_outputs_pointing_into_a_read_only_folder_or_a_file(read_only, outputs):
    before = snapshot(outputs)
    assert_one_line_error(run("train", "reflection", "--runs", str(read_only / "runs"), cwd=outputs), "cannot write")
    assert_one_line_error(run("train", "reflection", "--runs", "search.json/runs", cwd=outputs), "is a file, not a folder")
    assert_one_line_error(run("search", "--out", "runs", cwd=outputs), "is a folder")
    assert snapshot(outputs) == before


# ----------------------------------------------------------------------------- 6. leftovers of a kill
def test_stale_temporaries_are_removed_at_start_up(outputs):
    """A kill between write and rename leaves .tmp-<name><random>; the next run owning the folder removes
    them: train every .tmp-* in its run folder, search and evaluate only their own files in a shared folder."""
    run_dir = outputs / "runs" / "reflection-0"
    stale = [run_dir / ".tmp-checkpoint.ptab12cd", run_dir / "adapter" / ".tmp-adapter_model.safetensorsx1",
             outputs / ".tmp-search.jsonq9", outputs / ".tmp-search.svgz0", outputs / ".tmp-evaluate.mdk3",
             outputs / ".tmp-evaluate.csvp2"]
    others = [outputs / ".tmp-notes.txtzz", outputs / "runs" / ".tmp-elsewhere"]
    for path in stale + others:
        path.write_bytes(b"x" * 100)
    bad = outputs / "bad.csv"
    bad.write_text("prompt,hq1\nonly,two\n")
    assert_one_line_error(run("train", "reflection", "--data", str(bad), cwd=outputs), "bad.csv")
    assert not stale[0].exists() and not stale[1].exists() and stale[2].exists()
    assert_one_line_error(run("search", "--runs", "nowhere", cwd=outputs), "no finished")
    assert not stale[2].exists() and not stale[3].exists() and stale[4].exists()
    assert_one_line_error(run("evaluate", "--data", str(bad), cwd=outputs), "bad.csv")
    assert not any(p.exists() for p in stale) and all(p.exists() for p in others)


def test_remove_stale_temporaries_by_hand(tmp_path):
    import files
    for name in (".tmp-a.json123", ".tmp-b.json456", "a.json", ".tmpx"):
        (tmp_path / name).write_text("x")
    (tmp_path / ".tmp-dir").mkdir()
    assert files.remove_stale_temporaries(str(tmp_path), ["a.json"]) == [str(tmp_path / ".tmp-a.json123")]
    assert files.remove_stale_temporaries(str(tmp_path)) == [str(tmp_path / ".tmp-b.json456")]
    assert sorted(os.listdir(tmp_path)) == [".tmp-dir", ".tmpx", "a.json"]
    assert files.remove_stale_temporaries(str(tmp_path / "missing")) == []


# ----------------------------------------------------------------------------- 8. help and the committed models
def test_every_flag_has_help_and_help_shows_defaults():
    import emorl
    parser = emorl.build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name, sub in commands.choices.items():
        for action in sub._actions:
            assert action.help, (name, action.dest)
        assert "(default: None)" not in sub.format_help() and "(default: False)" not in sub.format_help(), name
    result = run("train", "--help")
    assert result.returncode == 0
    text = " ".join(result.stdout.split())
    for shown in ("stop after this many steps if not converged (default: 10000)", "(default: 0.0001)",
                  "relative to the current directory"):
        assert shown in text, shown
    assert "refinement iterations of Algorithm 1 (default: 5)" in " ".join(run("search", "--help").stdout.split())
    greedy = " ".join(run("evaluate", "--help").stdout.split()).split("--greedy ")[1].split(" --")[0]
    assert greedy.count("(default:") == 1, greedy                  # its own text, not also argparse's False


@pytest.fixture
def project_copy(tmp_path):
    """The project's code and data/ in a temporary folder: a build-default that wrongly went ahead would
    overwrite this copy's data/default/, not the committed one."""
    copy = tmp_path / "project"
    shutil.copytree(ROOT, copy, ignore=shutil.ignore_patterns(".git", ".venv", "runs", "tests", "bench", "__pycache__", "*.pyc"))
    return copy


def test_build_default_refuses_to_replace_the_committed_models(project_copy):
    before = snapshot(project_copy / "data")
    for extra in ([], ["--out", "data/default/"]):
        result = run("build-default", "--scale", "0.001", *extra, cwd=project_copy, emorl=str(project_copy / "emorl.py"))
        assert_one_line_error(result, "--force", "--out")
    assert snapshot(project_copy / "data") == before


def test_unreadable_input_file_is_one_line(outputs):
    if os.geteuid() == 0:
        pytest.skip("root reads any file")
    locked = outputs / "locked.csv"
    locked.write_text("prompt,hq1,hq2,mq1,lq1,lq2,lq3,lq4,lq5\n")
    locked.chmod(0)
    assert_one_line_error(run("train", "reflection", "--data", str(locked), cwd=outputs), "locked.csv")
