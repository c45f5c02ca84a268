"""The command line: every user error is one line `error: ...` and exit status 2, never a traceback."""
import json
import os
import subprocess
import sys

import pytest

import files

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EMORL = os.path.join(ROOT, "emorl.py")


def run(*args, cwd=None):
    return subprocess.run([sys.executable, EMORL, *args], capture_output=True, text=True, cwd=cwd, timeout=300)


def assert_one_line_error(result, *needles):
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert "Traceback" not in result.stderr
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


@pytest.mark.parametrize("command", ["train", "search", "generate", "evaluate", "convert", "build-default"])
def test_every_command_has_help(command):
    result = run(command, "--help")
    assert result.returncode == 0 and "usage:" in result.stdout


def test_unknown_objective_exits_2():
    assert_one_line_error(run("train", "kindness"), "unknown objective 'kindness'", "--scorer NAME=DIR")


def test_missing_policy_directory(tmp_path):
    missing = str(tmp_path / "no-such-model")
    result = run("generate", "hello", "--weights", "1,1,1", "--policy", missing, "--adapters", "a", "b", "c")
    assert_one_line_error(result, "no-such-model")


@pytest.mark.parametrize("weights, needle", [("1,2", "3"), ("0.5,-1,0.2", "negative"), ("a,b,c", "a"),
                                             ("0,0,0", "zero"), ("nan,1,1", "nan")])
def test_bad_weights(weights, needle):
    assert_one_line_error(run("generate", "--weights", weights, "hello"), needle)


def test_malformed_data_file_stops_before_training(tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("prompt,hq1,hq2,mq1,lq1,lq2,lq3,lq4,lq5\nonly,three,columns\n")
    result = run("train", "reflection", "--data", str(bad), "--runs", str(tmp_path / "runs"))
    assert_one_line_error(result, "bad.csv:2")
    assert not (tmp_path / "runs").exists()


def test_search_without_trained_adapters(tmp_path):
    assert_one_line_error(run("search", "--runs", str(tmp_path / "runs"), "--out", str(tmp_path / "s.json")), "reflection")


def test_convert_of_a_missing_checkpoint(tmp_path):
    assert_one_line_error(run("convert", str(tmp_path / "missing.pt"), str(tmp_path / "out.safetensors")), "missing.pt")


def test_corrupt_policy_weights(tmp_path):
    import shutil
    source = os.path.join(ROOT, "data", "default", "policy")
    if not os.path.isdir(source):
        pytest.skip("embedded policy not built")
    policy = tmp_path / "policy"
    shutil.copytree(source, policy)
    weights = policy / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    result = run("generate", "hello", "--weights", "1,1,1", "--policy", str(policy), "--adapters", "a", "b", "c")
    assert_one_line_error(result, "model.safetensors")


DEFAULT_POLICY = os.path.join(ROOT, "data", "default", "policy")


@pytest.fixture(scope="module")
def saved_adapter(tmp_path_factory):
    """Folder of a reflection adapter; its siblings `empathy` and `fluency` hold those objectives'."""
    import lora
    import t5
    folder = tmp_path_factory.mktemp("adapter")
    model, _ = t5.load_t5(DEFAULT_POLICY)
    for name in ("reflection", "empathy", "fluency"):
        lora.add_adapter(model, name)
        lora.save_adapter(model, name, str(folder / name))
    return folder / "reflection"


def three(saved_adapter):
    return [str(saved_adapter.parent / name) for name in ("reflection", "empathy", "fluency")]


def copy_adapter(source, target):
    import shutil
    shutil.copytree(source, target)
    return target


def test_generate_with_valid_adapters_prints_a_reflection(saved_adapter):
    result = run("generate", "I can't sleep before exams.", "--weights", "0.8,0.5,0.05", "--adapters", *three(saved_adapter))
    assert result.returncode == 0 and result.stdout.strip() and not result.stderr.strip(), result.stderr


def test_corrupt_adapter_file(saved_adapter, tmp_path):
    bad = copy_adapter(saved_adapter.parent / "empathy", tmp_path / "bad")
    (bad / "adapter_model.safetensors").write_bytes(b"\x00not a safetensors file")
    reflection, _, fluency = three(saved_adapter)
    result = run("generate", "hi", "--weights", "1,1,1", "--adapters", reflection, str(bad), fluency)
    assert_one_line_error(result, "adapter_model.safetensors")


def test_adapter_with_another_rank(saved_adapter, tmp_path):
    bad = copy_adapter(saved_adapter, tmp_path / "rank")
    config = json.loads((bad / "adapter_config.json").read_text())
    config["r"] = 4
    (bad / "adapter_config.json").write_text(json.dumps(config))
    _, empathy, fluency = three(saved_adapter)
    assert_one_line_error(run("generate", "hi", "--weights", "1,1,1", "--adapters", str(bad), empathy, fluency), "shape")


def test_an_adapter_given_as_another_objective_is_refused(saved_adapter, tmp_path, capsys, monkeypatch):
    """Three copies of one adapter do not pass as reflection, empathy and fluency: search, generate and
    evaluate refuse it with one line; --force uses it with a warning line; an adapter that records no
    objective (peft's, a converted .npz) is used with a warning line."""
    import lora
    reflection, empathy, fluency = three(saved_adapter)
    assert [lora.saved_objective(d) for d in three(saved_adapter)] == ["reflection", "empathy", "fluency"]
    needles = [f"{reflection}: adapter trained for 'reflection', given as 'empathy'", "--force"]
    assert_one_line_error(run("generate", "hi", "--weights", "1,1,1", "--adapters", reflection, reflection, fluency),
                          *needles)
    monkeypatch.chdir(tmp_path)
    copy = str(copy_adapter(reflection, tmp_path / "copy"))   # search refuses one folder twice
    assert_main_error(capsys, ["search", "--adapters", reflection, copy, fluency, "--iterations", "1"],
                      f"{copy}: adapter trained for 'reflection', given as 'empathy'")
    runs = tmp_path / "runs"                           # evaluate finds runs/<objective>-<seed>/adapter
    for name, source in (("reflection", reflection), ("empathy", reflection)):
        copy_adapter(source, runs / f"{name}-0" / "adapter")
        (runs / f"{name}-0" / "summary.json").write_text("{}")
    assert_main_error(capsys, ["evaluate", "--runs", str(runs), "--search", "none.json"],
                      f"{runs / 'empathy-0' / 'adapter'}: adapter trained for 'reflection', given as 'empathy'")
    assert not (tmp_path / "evaluate.md").exists()

    import emorl
    assert emorl.main(["generate", "hi", "--weights", "1,1,1", "--adapters", reflection, reflection, fluency,
                       "--max-new-tokens", "4", "--force"]) == 0
    assert capsys.readouterr().err.splitlines() == [
        f"warning: {reflection}: adapter trained for 'reflection', used as 'empathy' (--force)"]
    imported = copy_adapter(saved_adapter.parent / "empathy", tmp_path / "imported")
    tensors = files.load_safetensors(str(imported / "adapter_model.safetensors"))
    files.save_safetensors(tensors, str(imported / "adapter_model.safetensors"), {"format": "pt"})   # as peft writes it
    assert emorl.main(["generate", "hi", "--weights", "1,1,1", "--adapters", reflection, str(imported), fluency,
                       "--max-new-tokens", "4"]) == 0
    assert capsys.readouterr().err.splitlines() == [
        f"warning: {imported} records no objective (an imported adapter?): used as 'empathy'"]


def test_adapter_of_another_base_model(tmp_path):
    import lora
    import t5
    other = t5.T5ForConditionalGeneration(t5.T5Config.from_json(os.path.join(DEFAULT_POLICY, "config.json")))
    for name in ("reflection", "empathy", "fluency"):
        lora.add_adapter(other, name)
        lora.save_adapter(other, name, str(tmp_path / name))
    folders = [str(tmp_path / name) for name in ("reflection", "empathy", "fluency")]
    assert_one_line_error(run("generate", "hi", "--weights", "1,1,1", "--adapters", *folders), "another base")


def test_missing_scorer_weights(tmp_path):
    result = run("train", "reflection", "--empathy", str(tmp_path / "no-empathy"), "--runs", str(tmp_path / "runs"))
    assert_one_line_error(result, "no-empathy")
    assert not (tmp_path / "runs").exists()


def test_a_split_too_small_to_train_on(tmp_path):
    result = run("train", "reflection", "--sample", "0.001", "--runs", str(tmp_path / "runs"))
    assert_one_line_error(result, "split is empty")


# ----------------------------------------------------------------------------- objectives (issue 13)
@pytest.fixture(scope="module")
def two_label_classifier(tmp_path_factory):
    """A tiny HF BertForSequenceClassification with labels advice / autonomy."""
    from test_objectives import LABELS, bert_classifier
    folder = tmp_path_factory.mktemp("autonomy")
    bert_classifier(folder, [[0.0, 1.0], [1.0, 0.0], [0.5, 0.5]], seed=4, id2label=LABELS)
    return str(folder)


def assert_main_error(capsys, argv, *needles):
    """In-process emorl.main (no interpreter start): exit 2 and one line `error: ...` naming `needles`."""
    import emorl
    capsys.readouterr()
    try:
        status = emorl.main(argv)
    except SystemExit as e:                              # argparse's errors (emorl.Parser.error)
        status = e.code
    assert status == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


SUBPROCESS_CHECKED = ("kindness", "reflection,kindness", "1,1,1", ":kindness")   # the rest run in-process


@pytest.mark.parametrize("argv, needles", [
    (["search", "--scorer", "kindness"], ["--scorer 'kindness'", "NAME=DIR"]),
    (["search", "--scorer", "empathy=somewhere"], ["built-in", "--empathy DIR"]),
    (["evaluate", "--scorer", "2nd=somewhere"], ["letters, digits and _"]),
    (["train", "all", "--scorer", "uniform=somewhere"], ["'uniform' is reserved"]),
    (["search", "--scorer", "kind=a", "--scorer", "kind=b"], ["'kind' given twice"]),
    (["search", "--objectives", "reflection"], ["at least 2 objectives"]),
    (["search", "--objectives", "reflection,kindness"], ["unknown objective 'kindness'", "--scorer"]),
    (["evaluate", "--objectives", "reflection,empathy,reflection"], ["'reflection' is listed twice"]),
    (["evaluate", "--objectives", "reflection,,fluency"], ["unknown objective ''"]),
    (["generate", "hi", "--objectives", "reflection,empathy", "--weights", "1,1,1"], ["expected 2 weights"]),
    (["generate", "hi", "--objectives", "reflection,empathy,fluency,kind", "--weights", "1,1,1"], ["expected 4 weights"]),
    (["generate", "hi", "--objectives", "reflection,empathy", "--weights", "1,1", "--adapters", "a"], ["expected 2 folders"]),
    (["generate", "hi", "--objectives", "reflection,no-dash", "--weights", "1,1"], ["'no-dash'"]),
    (["train", "reflection", "--objectives", "reflection,empathy"], ["trains that objective alone"]),
    (["train", "uniform", "--objectives", "empathy"], ["at least 2 objectives"]),
    (["train", "all", "--jobs", "0"], ["--jobs", "must be a positive integer"]),
    (["train", "all", "--device", "cpu,cpu"], ["2 devices for 1 job"]),
    (["search", "--device", "cpu,cpu", "--adapters", "a", "b", "c"], ["'cpu,cpu' is not a torch device"]),
    (["train", "all", "--device", "cpu,kettle"], ["'kettle' is not a torch device"]),
])
def test_bad_objectives_scorers_and_weights(argv, needles, tmp_path, capsys, monkeypatch):
    argv = [*argv, "--runs", str(tmp_path / "runs")]
    if any(text in argv for text in SUBPROCESS_CHECKED):
        assert_one_line_error(run(*argv, cwd=tmp_path), *needles)
    else:
        monkeypatch.chdir(tmp_path)
        assert_main_error(capsys, argv, *needles)
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("spec, needles", [
    (lambda classifier: classifier + ":kindness", ["unknown label 'kindness'", "advice, autonomy"]),
    (lambda classifier: classifier, ["2 labels (advice, autonomy)", "NAME=DIR:LABEL"]),
    (lambda classifier: os.path.join(classifier, "nowhere") + ":autonomy", ["nowhere", "file not found"]),
    (lambda classifier: DEFAULT_POLICY, ["cannot score objective 'kind'", "model_type 't5'"]),
    (lambda classifier: os.path.join(ROOT, "data", "default", "empathy") + ":1", ["single output"]),
])
def test_bad_plugged_scorer(spec, needles, two_label_classifier, tmp_path, capsys, monkeypatch):
    argv = ["search", "--objectives", "reflection,kind", "--scorer", f"kind={spec(two_label_classifier)}",
            "--adapters", "a", "b", "--runs", str(tmp_path / "runs")]
    if needles[0].startswith("unknown label"):
        assert_one_line_error(run(*argv, cwd=tmp_path), *needles)
    else:
        monkeypatch.chdir(tmp_path)
        assert_main_error(capsys, argv, *needles)


# ----------------------------------------------------------------------------- a finished run, rerun
@pytest.fixture(scope="module")
def tiny_training(tmp_path_factory):
    """Flags of a tiny `train reflection` (a d_model 16 policy, one validation prompt): a run costs < 1 s."""
    from test_objectives import tiny_policy
    policy = tiny_policy(tmp_path_factory.mktemp("policy"))
    return ["--policy", policy, "--sample", "0.1", "--batch-size", "2", "--samples-per-prompt", "2",
            "--val-every", "3", "--val-prompts", "1", "--max-new-tokens", "8"]


def train_in_process(capsys, *argv):
    import emorl
    assert emorl.main(["train", "reflection", *argv]) == 0, capsys.readouterr().err
    return capsys.readouterr().out


def run_files(folder):
    import hashlib
    return {name: hashlib.sha256((folder / name).read_bytes()).hexdigest()
            for name in ("adapter/adapter_model.safetensors", "train.jsonl", "checkpoint.pt", "summary.json")}


@pytest.mark.parametrize("change", [["--lr", "0.001"], ["--batch-size", "3"], ["--beta", "0.1"], ["--top-k", "0"],
                                    ["--val-every", "2"], ["--cv-tolerance", "0.02"],
                                    ["--max-steps", "3"], ["--val-prompts", "2"]])
def test_a_finished_run_rerun_with_another_setting_is_refused(tiny_training, change, tmp_path, capsys, monkeypatch):
    """Not "already finished" with the old result: one line naming the flag, the run's files untouched."""
    monkeypatch.chdir(tmp_path)
    train_in_process(capsys, *tiny_training, "--max-steps", "4")
    before = run_files(tmp_path / "runs" / "reflection-0")
    flag = {"--val-prompts": "training/validation prompts"}.get(change[0], change[0])
    assert_main_error(capsys, ["train", "reflection", *tiny_training, "--max-steps", "4", *change], flag)
    assert run_files(tmp_path / "runs" / "reflection-0") == before


def test_a_larger_max_steps_continues_a_finished_run_as_if_it_never_stopped(tiny_training, tmp_path, capsys,
                                                                             monkeypatch):
    """8 steps, then --max-steps 16 (checkpoints every 3 steps: the continuation replays step 7-8 from
    the step-6 checkpoint) == a straight 16-step run: the same adapter bytes, the same log."""
    monkeypatch.chdir(tmp_path)
    train_in_process(capsys, *tiny_training, "--max-steps", "16", "--runs", "straight")
    train_in_process(capsys, *tiny_training, "--max-steps", "8", "--runs", "continued")
    out = train_in_process(capsys, *tiny_training, "--max-steps", "8", "--runs", "continued")
    assert "already finished (stopped at --max-steps 8)" in out      # the same --max-steps: nothing to do
    train_in_process(capsys, *tiny_training, "--max-steps", "16", "--runs", "continued")
    straight, continued = run_files(tmp_path / "straight" / "reflection-0"), run_files(tmp_path / "continued" / "reflection-0")
    assert straight["adapter/adapter_model.safetensors"] == continued["adapter/adapter_model.safetensors"]

    def log(folder):
        rows = [json.loads(line) for line in (tmp_path / folder / "reflection-0" / "train.jsonl").read_text().splitlines()]
        return [{k: v for k, v in row.items() if not k.endswith("seconds")} for row in rows]
    assert log("straight") == log("continued") and len(log("straight")) == 16 + 6
    summary = json.loads((tmp_path / "continued" / "reflection-0" / "summary.json").read_text())
    assert summary["steps"] == 16 and summary["hyperparameters"]["max_steps"] == 16


def test_a_converged_run_stays_finished(tiny_training, tmp_path, capsys, monkeypatch):
    """Converged at the second counted validation (window 2, any CV below 10): more steps change nothing."""
    monkeypatch.chdir(tmp_path)
    converge = [*tiny_training, "--cv-window", "2", "--cv-tolerance", "10"]
    train_in_process(capsys, *converge, "--max-steps", "20")
    before = run_files(tmp_path / "runs" / "reflection-0")
    assert json.loads((tmp_path / "runs" / "reflection-0" / "summary.json").read_text())["steps"] == 6
    out = train_in_process(capsys, *converge)                        # default --max-steps 10000
    assert "already finished (converged)" in out and run_files(tmp_path / "runs" / "reflection-0") == before


def test_train_all_prints_a_header_per_objective_and_counts_every_validation(tiny_training, tmp_path, capsys,
                                                                              monkeypatch):
    """Each run's log lines follow a header naming its objective; the progress bar counts the
    validations as the log shows them (step 0, 2, 4: three, two of them counted by the CV rule)."""
    import emorl
    monkeypatch.chdir(tmp_path)
    assert emorl.main(["train", "all", *tiny_training, "--max-steps", "4", "--val-every", "2"]) == 0
    captured = capsys.readouterr()
    headers = [line for line in captured.out.splitlines() if line.startswith("== train")]
    assert headers == [f"== train {name} ({i}/3) on cpu -> runs/{name}-0"
                       for i, name in enumerate(("reflection", "empathy", "fluency"), 1)]
    assert captured.out.index(headers[1]) < captured.out.index("val  0", captured.out.index(headers[1]))
    assert captured.out.count("val  ") == 9 and "3 validations (2 counted)" in captured.err
    summary = json.loads((tmp_path / "runs" / "fluency-0" / "summary.json").read_text())
    assert summary["validations"] == 3
