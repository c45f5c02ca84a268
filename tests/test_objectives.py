"""Objectives as named scorers (issue 13): scorers plugged in from folders written by transformers score
as Hugging Face does (the oracle), with the promised errors for a wrong kind or label."""
import json
import os

import pytest
import torch

import rewards
from files import InputError
from test_rewards import CLIENT_PROMPTS, H, PROMPTS, RESPONSES, hf_perplexity, train_bpe, train_wordpiece

LABELS = {0: "advice", 1: "autonomy"}


def bert_classifier(directory, targets, seed, **labels):
    """A tiny random BertForSequenceClassification whose classifier is solved so that the test pairs'
    logits are `targets` [3, num_labels] (a random tiny encoder alone gives nearly equal logits)."""
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizer
    vocab = train_wordpiece(directory)
    torch.manual_seed(seed)
    targets = torch.tensor(targets)
    config = BertConfig(vocab_size=vocab, hidden_size=H, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
                        max_position_embeddings=64, num_labels=targets.shape[1], initializer_range=0.2, **labels)
    oracle = BertForSequenceClassification(config).eval()
    tokenizer = BertTokenizer(str(directory / "vocab.txt"), do_lower_case=True)
    batch = tokenizer(CLIENT_PROMPTS, RESPONSES, padding=True, return_tensors="pt")
    with torch.no_grad():
        pooled = oracle.bert(**batch).pooler_output
        solution = torch.linalg.pinv(torch.cat([pooled, torch.ones(3, 1)], dim=1)) @ targets
        oracle.classifier.weight.copy_(solution[:-1].T)
        oracle.classifier.bias.copy_(solution[-1])
        logits = oracle(**batch).logits
    torch.testing.assert_close(logits, targets, atol=1e-4, rtol=0)
    oracle.save_pretrained(str(directory))
    return logits


def test_bert_classifier_with_two_labels_scores_the_named_label(tmp_path):
    logits = bert_classifier(tmp_path, [[0.0, 1.0], [1.0, -1.0], [0.3, 0.2]], seed=4, id2label=LABELS,
                             label2id={v: k for k, v in LABELS.items()})
    probabilities = logits.softmax(dim=-1)
    scorer = rewards.load_scorer("autonomy", str(tmp_path), "autonomy", batch_size=2)
    assert isinstance(scorer, rewards.ClassifierScorer) and scorer.name == "autonomy"
    torch.testing.assert_close(scorer(PROMPTS, RESPONSES), probabilities[:, 1], atol=1e-5, rtol=0)
    by_index = rewards.load_scorer("advice", str(tmp_path), "0")          # an index works as well as a name
    torch.testing.assert_close(by_index(PROMPTS, RESPONSES), probabilities[:, 0], atol=1e-5, rtol=0)
    with pytest.raises(InputError, match=r"2 labels \(advice, autonomy\)"):
        rewards.load_scorer("autonomy", str(tmp_path))
    with pytest.raises(InputError, match="unknown label 'kindness'"):
        rewards.load_scorer("autonomy", str(tmp_path), "kindness")
    with pytest.raises(InputError, match="unknown label '2'"):
        rewards.load_scorer("autonomy", str(tmp_path), "2")


def test_bert_classifier_with_one_label_is_clamped_like_empathy(tmp_path):
    logits = bert_classifier(tmp_path, [[-0.5], [0.3], [0.8]], seed=5)[:, 0]
    scorer = rewards.load_scorer("warmth", str(tmp_path))
    torch.testing.assert_close(scorer(PROMPTS, RESPONSES), logits.clamp(0, 1), atol=1e-5, rtol=0)
    with pytest.raises(InputError, match="single output"):
        rewards.load_scorer("warmth", str(tmp_path), "1")


def test_distilbert_classifier_with_three_labels(tmp_path):
    from transformers import BertTokenizer, DistilBertConfig, DistilBertForSequenceClassification
    vocab = train_wordpiece(tmp_path)
    torch.manual_seed(6)
    config = DistilBertConfig(vocab_size=vocab, dim=H, n_layers=2, n_heads=2, hidden_dim=32, max_position_embeddings=64,
                              num_labels=3, initializer_range=0.2)
    oracle = DistilBertForSequenceClassification(config).eval()
    oracle.save_pretrained(str(tmp_path))
    batch = BertTokenizer(str(tmp_path / "vocab.txt"))(CLIENT_PROMPTS, RESPONSES, padding=True, return_tensors="pt")
    with torch.no_grad():
        expected = oracle(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.softmax(-1)[:, 2]
    scorer = rewards.load_scorer("closed", str(tmp_path), "LABEL_2", batch_size=2)
    torch.testing.assert_close(scorer(PROMPTS, RESPONSES), expected, atol=1e-5, rtol=0)


def test_roberta_classifier(tmp_path):
    from transformers import RobertaConfig, RobertaForSequenceClassification, RobertaTokenizer
    vocab = train_bpe(tmp_path, ["<s>", "<pad>", "</s>", "<unk>", "<mask>"])
    torch.manual_seed(7)
    config = RobertaConfig(vocab_size=vocab, hidden_size=H, num_hidden_layers=2, num_attention_heads=2,
                           intermediate_size=32, max_position_embeddings=66, type_vocab_size=1, pad_token_id=1,
                           bos_token_id=0, eos_token_id=2, initializer_range=0.2, num_labels=2,
                           id2label={0: "closed", 1: "open"}, label2id={"closed": 0, "open": 1})
    oracle = RobertaForSequenceClassification(config).eval()
    oracle.save_pretrained(str(tmp_path))
    tokenizer = RobertaTokenizer(str(tmp_path / "vocab.json"), str(tmp_path / "merges.txt"))
    batch = tokenizer(CLIENT_PROMPTS, RESPONSES, padding=True, return_tensors="pt")
    assert batch["attention_mask"].min() == 0                             # padding is exercised
    with torch.no_grad():
        expected = oracle(**batch).logits.softmax(-1)[:, 1]
    scorer = rewards.load_scorer("open", str(tmp_path), "open", batch_size=2)
    torch.testing.assert_close(scorer(PROMPTS, RESPONSES), expected, atol=1e-5, rtol=0)


def test_gpt2_lm_is_scored_like_fluency(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel, GPT2Tokenizer
    vocab = train_bpe(tmp_path, ["<|endoftext|>"])
    torch.manual_seed(8)
    config = GPT2Config(vocab_size=vocab, n_embd=H, n_layer=2, n_head=2, n_positions=64, bos_token_id=0,
                        eos_token_id=0, initializer_range=0.2)
    oracle = GPT2LMHeadModel(config).eval()
    oracle.save_pretrained(str(tmp_path))
    tokenizer = GPT2Tokenizer(str(tmp_path / "vocab.json"), str(tmp_path / "merges.txt"))
    expected = torch.tensor([hf_perplexity(oracle, tokenizer, p, r) for p, r in zip(CLIENT_PROMPTS, RESPONSES)])
    scorer = rewards.load_scorer("coherence", str(tmp_path), batch_size=2)
    assert isinstance(scorer, rewards.FluencyScorer) and scorer.name == "coherence"
    torch.testing.assert_close(scorer.perplexity(PROMPTS, RESPONSES), expected, rtol=1e-5, atol=0)
    scorer.cap = 1000.0                                  # a random tiny model's ppl is > 50: show the formula
    torch.testing.assert_close(scorer(PROMPTS, RESPONSES), ((1000.0 - expected) / 1000.0).clamp(0, 1), rtol=1e-5, atol=1e-6)
    with pytest.raises(InputError, match="no labels"):
        rewards.load_scorer("coherence", str(tmp_path), "fluent")


def test_wrong_kind_of_model(tmp_path):
    from transformers import BertConfig, BertModel
    train_wordpiece(tmp_path)
    BertModel(BertConfig(vocab_size=200, hidden_size=H, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=32)).save_pretrained(str(tmp_path))
    with pytest.raises(InputError, match=r"cannot score objective 'autonomy'.*architectures \['BertModel'\]"):
        rewards.load_scorer("autonomy", str(tmp_path), "1")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "t5", "d_model": 16}))
    with pytest.raises(InputError, match="model_type 't5'"):
        rewards.load_scorer("autonomy", str(tmp_path))
    os.remove(tmp_path / "config.json")
    with pytest.raises(InputError, match="config.json: file not found"):
        rewards.load_scorer("autonomy", str(tmp_path))


def test_load_scorers_mixes_built_in_and_plugged(tmp_path):
    bert_classifier(tmp_path / "empathy", [[0.5], [0.2], [0.9]], seed=5)
    bert_classifier(tmp_path / "autonomy", [[0.0, 1.0], [1.0, 0.0], [0.5, 0.5]], seed=4, id2label=LABELS)
    scorers = rewards.load_scorers({"empathy": str(tmp_path / "empathy"), "autonomy": (str(tmp_path / "autonomy"), "autonomy")})
    assert list(scorers) == ["empathy", "autonomy"]
    assert isinstance(scorers["empathy"], rewards.EmpathyScorer) and scorers["autonomy"].label == 1
    with pytest.raises(InputError, match="takes no label"):
        rewards.load_scorers({"empathy": (str(tmp_path / "empathy"), "0")})
    with pytest.raises(InputError, match="empathy classifier has 2 labels"):
        rewards.load_scorers({"empathy": str(tmp_path / "autonomy")})


# ----------------------------------------------------------------------------- the command line, end to end
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_TRAINING = ["--sample", "0.1", "--batch-size", "2", "--samples-per-prompt", "2", "--max-steps", "1",
                 "--val-every", "1", "--val-prompts", "1", "--max-new-tokens", "8"]


def emorl(*args, cwd):
    import subprocess
    import sys
    env = dict(os.environ, OMP_NUM_THREADS="1")           # tiny models: one thread each, as in conftest.py
    result = subprocess.run([sys.executable, os.path.join(ROOT, "emorl.py"), *args], capture_output=True, text=True,
                            cwd=cwd, timeout=900, env=env)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return result.stdout


def file_hashes(folder) -> dict:
    import hashlib
    return {os.path.relpath(os.path.join(d, n), folder): hashlib.sha256(open(os.path.join(d, n), "rb").read()).hexdigest()
            for d, _, names in os.walk(folder) for n in names}


def tiny_policy(folder):
    """A random T5 with d_model 16 and the embedded default's tokenizer: decoding 64 tokens costs little."""
    import t5
    torch.manual_seed(9)
    config = t5.T5Config(vocab_size=2100, d_model=16, d_kv=4, d_ff=32, num_layers=1, num_heads=2)
    model = t5.T5ForConditionalGeneration(config)
    with torch.no_grad():
        model.shared.weight.normal_(0.0, 0.05)
    t5.save_t5(model, os.path.join(ROOT, "data", "default", "policy", "spiece.model"), str(folder))
    return str(folder)


def test_add_an_objective_train_it_alone_search_d_2_and_4_evaluate(tmp_path):
    """The paper's scalability (§5.4) through the command line: three adapters trained in 2 processes (the
    same bytes as in one process), a fourth objective plugged in and trained alone, searches with d = 4
    and d = 2, evaluate with a column per objective; the three first adapters' files never change."""
    autonomy = tmp_path / "autonomy"
    bert_classifier(autonomy, [[0.0, 1.0], [1.0, 0.0], [0.5, 0.5]], seed=4, id2label=LABELS)
    policy = ["--policy", tiny_policy(tmp_path / "policy")]
    plug = ["--scorer", f"autonomy={autonomy}:autonomy"]
    train = [*policy, *TINY_TRAINING]
    emorl("train", "all", "--jobs", "2", *train, "--runs", "runs", cwd=tmp_path)
    emorl("train", "all", "--objectives", "reflection,empathy", *train, "--runs", "sequential", cwd=tmp_path)
    for name in ("reflection", "empathy"):           # empathy: first in its own process vs second in one process
        assert file_hashes(tmp_path / "runs" / f"{name}-0" / "adapter") == \
            file_hashes(tmp_path / "sequential" / f"{name}-0" / "adapter")
    before = {name: file_hashes(tmp_path / "runs" / f"{name}-0") for name in ("reflection", "empathy", "fluency")}

    emorl("train", "autonomy", *plug, *train, "--runs", "runs", cwd=tmp_path)
    summary = json.loads((tmp_path / "runs" / "autonomy-0" / "summary.json").read_text())
    assert summary["objectives"] == ["autonomy"] and "autonomy" in summary["final_validation"]

    four = "reflection,empathy,fluency,autonomy"
    search = [*policy, "--sample", "0.1", "--iterations", "1", "--batch-size", "8", "--runs", "runs", *plug]
    out = emorl("search", "--objectives", four, *search, "--out", "search4.json", cwd=tmp_path)
    result = json.loads((tmp_path / "search4.json").read_text())
    assert result["objectives"] == four.split(",") and len(result["best_weights"]) == 4
    assert len(result["evaluations"]) == 3 ** 4 - 1 - 15     # w = 0 skipped, one decode per ray ({0,1}^4 \ 0 doubled)
    assert result["info"]["adapters"] == [os.path.join("runs", f"{n}-0", "adapter") for n in four.split(",")]
    assert "(plain Algorithm 1: 81; memo per ray)" in out
    emorl("search", "--objectives", "empathy,autonomy", *search, "--out", "search2.json", cwd=tmp_path)
    result = json.loads((tmp_path / "search2.json").read_text())
    assert result["objectives"] == ["empathy", "autonomy"] and len(result["evaluations"]) == 3 ** 2 - 1 - 3

    emorl("evaluate", "--objectives", four, *policy, "--sample", "0.1", "--runs", "runs", "--search", "search4.json",
          *plug, cwd=tmp_path)
    table = (tmp_path / "evaluate.md").read_text().splitlines()
    assert table[0].startswith("| method | decoding | reflection | empathy | fluency | autonomy | average | diversity-2 |")
    assert [line.split(" | ")[0] for line in table[2:]] == \
        ["| base", "| reflection", "| empathy", "| fluency", "| autonomy", "| param", "| logit", "| hidden"]
    assert all(float(line.split(" | ")[4].split(" ± ")[0]) >= 0 for line in table[2:])   # every row scored on autonomy
    assert {name: file_hashes(tmp_path / "runs" / f"{name}-0") for name in before} == before


def test_the_embedded_default_registers_its_plugged_scorer(tmp_path, monkeypatch):
    import emorl
    args = emorl.build_parser().parse_args(["search"])
    monkeypatch.setattr(emorl, "DEFAULT_ASSETS", str(tmp_path))
    assert list(emorl.known_scorers(args)) == ["reflection", "empathy", "fluency"]
    (tmp_path / "autonomy").mkdir()
    assert emorl.known_scorers(args)["autonomy"] == (str(tmp_path / "autonomy"), "autonomy")
    args = emorl.build_parser().parse_args(["search", "--scorer", "autonomy=elsewhere:1"])
    assert emorl.known_scorers(args)["autonomy"] == ("elsewhere", "1")     # a user's --scorer replaces it


def test_same_tensors_same_bytes(tmp_path):
    """safetensors writes metadata in hash order; files.save_safetensors sorts it, so --jobs 2 and --jobs 1
    can give byte-identical adapter files."""
    import files
    from safetensors import safe_open
    tensors, metadata = {"b": torch.arange(3.0), "a": torch.ones(2, 2)}, {"format": "pt", "zeta": "1", "b": "é\"2"}
    written = set()
    for i in range(8):
        files.save_safetensors(tensors, str(tmp_path / f"{i}.safetensors"), metadata)
        written.add((tmp_path / f"{i}.safetensors").read_bytes())
    assert len(written) == 1
    with safe_open(str(tmp_path / "0.safetensors"), "pt") as f:
        assert f.metadata() == metadata and torch.equal(f.get_tensor("a"), tensors["a"])


def test_train_all_jobs_end_when_the_command_is_killed(tmp_path):
    """kill -9 of `train all --jobs 2` runs no clean-up: its worker processes must still stop (they watch their
    parent), so that no orphan keeps writing a run folder the resumed command writes too."""
    import signal
    import subprocess
    import sys
    import time

    def children(pid):
        found = []
        for entry in os.listdir("/proc"):
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    command = f.read()
            except (OSError, IndexError):
                continue
            if entry.isdigit() and int(fields[1]) == pid and b"resource_tracker" not in command:
                found.append(int(entry))
        return found

    def alive(pid):
        try:
            with open(f"/proc/{pid}/stat") as f:
                return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
        except OSError:
            return False

    long_training = ["--sample", "0.1", "--batch-size", "2", "--samples-per-prompt", "2", "--max-steps", "100000",
                     "--val-every", "1000", "--val-prompts", "1", "--max-new-tokens", "8"]
    command = subprocess.Popen([sys.executable, os.path.join(ROOT, "emorl.py"), "train", "all", "--jobs", "2",
                                "--policy", tiny_policy(tmp_path / "policy"), *long_training, "--runs", "runs"],
                               cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               env=dict(os.environ, OMP_NUM_THREADS="1"))
    workers = []
    try:
        deadline = time.time() + 120
        while len(workers := children(command.pid)) < 2 or not list(tmp_path.glob("runs/*/train.jsonl")):
            assert time.time() < deadline and command.poll() is None, "the jobs never started training"
            time.sleep(0.2)
        os.kill(command.pid, signal.SIGKILL)
        command.wait()
        deadline = time.time() + 20
        while any(alive(pid) for pid in workers) and time.time() < deadline:
            time.sleep(0.2)
        assert not any(alive(pid) for pid in workers), "a job outlived the killed command"
    finally:
        for pid in [*workers, command.pid]:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
