"""rewards.py: metrics against hand-computed values, the three scorers against Hugging Face on tiny
random models (the oracle), the DynaOpt converter, and the promised errors."""
import json
import math
import os
import types

import pytest
import torch
from torch import nn

import rewards
import files
from files import InputError

PROMPTS = ["I feel so alone since my sister moved away.", "Work is fine I guess", "I can't sleep. [SEP] "]
CLIENT_PROMPTS = ["I feel so alone since my sister moved away.", "Work is fine I guess", "I can't sleep."]  # what HF sees
RESPONSES = ["It sounds like you miss her a lot.", "", "You are worried and tired, and you want rest."]
CORPUS = PROMPTS + RESPONSES + ["you feel sad and alone", "it sounds like work is hard for you", "sleep is hard"]


# ----------------------------------------------------------------------------- metrics
def test_levenshtein_known_cases():
    assert rewards.levenshtein(list("kitten"), list("sitting")) == 3
    assert rewards.levenshtein(list("flaw"), list("lawn")) == 2
    assert rewards.levenshtein([], ["a", "b"]) == 2
    assert rewards.levenshtein(["a", "b"], []) == 2
    assert rewards.levenshtein("the cat sat".split(), "the cat sat".split()) == 0
    assert rewards.levenshtein("the cat sat on the mat".split(), "a cat sat on mat".split()) == 2


def test_edit_rate():
    assert rewards.edit_rate("", "") == 0.0
    assert rewards.edit_rate("I am sad", "I am sad") == 0.0
    # word tokens [I, am, sad, .] vs [you, are, sad, .]: 2 substitutions / 4 tokens
    assert rewards.edit_rate("I am sad.", "you are sad.") == pytest.approx(2 / 4)
    # one word vs three: 1 substitution + 2 insertions / 3
    assert rewards.edit_rate("hello", "a b c") == pytest.approx(1.0)
    assert rewards.edit_rate("the cat sat on the mat", "a cat sat on mat") == pytest.approx(2 / 6)
    # the text after [SEP] (policy input form) is not part of the prompt
    assert rewards.edit_rate("I am sad [SEP] ", "I am sad") == 0.0


def test_diversity_2():
    assert rewards.distinct_2("a a a a") == pytest.approx(1 / 4)          # one distinct bigram (a, a)
    assert rewards.distinct_2("a b a b a") == pytest.approx(2 / 5)        # (a,b), (b,a)
    assert rewards.distinct_2("one") == 0.0 and rewards.distinct_2("   ") == 0.0
    assert rewards.diversity_2(["a a a a", "a b c"]) == pytest.approx((1 / 4 + 2 / 3) / 2)
    assert rewards.diversity_2([]) == 0.0


def test_combine_logsum_and_mean():
    scores = torch.tensor([[0.5, 0.25, 1.0], [0.0, 0.9, 0.2]])
    w = torch.tensor([0.5, 0.3, 0.2])
    expected = torch.tensor([
        0.5 * math.log(0.5) + 0.3 * math.log(0.25) + 0.2 * math.log(0.9999),   # 1.0 clipped
        0.5 * math.log(1e-4) + 0.3 * math.log(0.9) + 0.2 * math.log(0.2),       # 0.0 clipped
    ])
    torch.testing.assert_close(rewards.combine_logsum(scores, w), expected)
    torch.testing.assert_close(rewards.combine_logsum(scores, [0.5, 0.3, 0.2]), expected)
    torch.testing.assert_close(rewards.combine_mean(scores, w), torch.tensor([0.525, 0.31]))
    torch.testing.assert_close(rewards.combine_mean(scores), scores.mean(dim=1))
    with pytest.raises(InputError, match="weights"):
        rewards.combine_logsum(scores, [0.5, 0.5])


def test_check_finite():
    rewards.check_finite(torch.tensor([0.0, 1.0]), "x")
    with pytest.raises(InputError, match=r"NaN reward from empathy scorer \(row 1\)"):
        rewards.check_finite(torch.tensor([0.5, float("nan")]), "empathy scorer")
    with pytest.raises(InputError, match="inf reward"):
        rewards.check_finite(torch.tensor([float("inf")]), "fluency scorer")


# ----------------------------------------------------------------------------- tiny models (HF oracle)
H = 16          # tiny models use initializer_range 0.2: with 0.02 every input gets nearly the same score


def train_bpe(directory, special_tokens):
    from tokenizers import ByteLevelBPETokenizer
    tokenizer = ByteLevelBPETokenizer()
    tokenizer.train_from_iterator(CORPUS * 3, vocab_size=320, min_frequency=1, special_tokens=special_tokens,
                                  show_progress=False)
    os.makedirs(directory, exist_ok=True)
    tokenizer.save_model(str(directory))
    return tokenizer.get_vocab_size()


def train_wordpiece(directory):
    from tokenizers import BertWordPieceTokenizer
    tokenizer = BertWordPieceTokenizer(lowercase=True)
    tokenizer.train_from_iterator(CORPUS * 3, vocab_size=200, min_frequency=1, show_progress=False)
    os.makedirs(directory, exist_ok=True)
    tokenizer.save_model(str(directory))
    return tokenizer.get_vocab_size()


class DynaOptCrossEncoder(nn.Module):
    """The public layout of DynaOpt's CrossScorerCrossEncoder (its state_dict is what the .pt holds)."""

    def __init__(self, encoder, hidden):
        super().__init__()
        self.cross_encoder = encoder
        self.l1 = nn.Linear(hidden, 512)
        self.relu = nn.ELU()
        self.l2 = nn.Linear(512, 1)

    def forward(self, **batch):
        cls = self.cross_encoder(**batch).last_hidden_state[:, 0, :]
        return self.l2(self.relu(self.l1(cls))).sigmoid().squeeze(-1)


@pytest.fixture(scope="module")
def reflection(tmp_path_factory):
    """(scorer directory, HF oracle module, HF tokenizer): roberta.* + head.* in our layout."""
    from transformers import RobertaConfig, RobertaModel, RobertaTokenizer
    directory = tmp_path_factory.mktemp("reflection")
    vocab = train_bpe(directory, ["<s>", "<pad>", "</s>", "<unk>", "<mask>"])
    torch.manual_seed(0)
    config = RobertaConfig(vocab_size=vocab, hidden_size=H, num_hidden_layers=2, num_attention_heads=2,
                           intermediate_size=32, max_position_embeddings=66, type_vocab_size=1,
                           pad_token_id=1, bos_token_id=0, eos_token_id=2, initializer_range=0.2)
    oracle = DynaOptCrossEncoder(RobertaModel(config, add_pooling_layer=False), H).eval()
    with torch.no_grad():
        oracle.l2.bias.fill_(0.3)
    config.to_json_file(str(directory / "config.json"))
    tensors = {k.replace("cross_encoder.", "roberta.").replace("l1.", "head.0.").replace("l2.", "head.2."): v
               for k, v in oracle.state_dict().items()}
    files.save_safetensors(tensors, str(directory / "model.safetensors"))
    tokenizer = RobertaTokenizer(str(directory / "vocab.json"), str(directory / "merges.txt"))
    return directory, oracle, tokenizer


@pytest.fixture(scope="module")
def empathy(tmp_path_factory):
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizer
    directory = tmp_path_factory.mktemp("empathy")
    vocab = train_wordpiece(directory)
    tokenizer = BertTokenizer(str(directory / "vocab.txt"), do_lower_case=True)
    torch.manual_seed(1)
    config = BertConfig(vocab_size=vocab, hidden_size=H, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=64, num_labels=1, initializer_range=0.2)
    oracle = BertForSequenceClassification(config).eval()
    with torch.no_grad():          # classifier chosen so the test pairs' logits are -0.5, 0.5, 1.5 (clamp both ways)
        pooled = oracle.bert(**tokenizer(CLIENT_PROMPTS, RESPONSES, padding=True, return_tensors="pt")).pooler_output
        solution = torch.linalg.pinv(torch.cat([pooled, torch.ones(3, 1)], dim=1)) @ torch.tensor([-0.5, 0.5, 1.5])
        oracle.classifier.weight.copy_(solution[:-1][None])
        oracle.classifier.bias.copy_(solution[-1:])
    oracle.save_pretrained(str(directory))
    return directory, oracle, tokenizer


@pytest.fixture(scope="module")
def fluency(tmp_path_factory):
    from transformers import GPT2Config, GPT2LMHeadModel, GPT2Tokenizer
    directory = tmp_path_factory.mktemp("fluency")
    vocab = train_bpe(directory, ["<|endoftext|>"])
    torch.manual_seed(2)
    config = GPT2Config(vocab_size=vocab, n_embd=H, n_layer=2, n_head=2, n_positions=64,
                        bos_token_id=0, eos_token_id=0, initializer_range=0.2)
    oracle = GPT2LMHeadModel(config).eval()
    oracle.save_pretrained(str(directory))
    tokenizer = GPT2Tokenizer(str(directory / "vocab.json"), str(directory / "merges.txt"))
    return directory, oracle, tokenizer


# ----------------------------------------------------------------------------- scorers vs HF
def test_reflection_scorer_matches_hf(reflection):
    directory, oracle, tokenizer = reflection
    scorer = rewards.ReflectionScorer.from_dir(str(directory), batch_size=2)   # batches of 2 and 1
    batch = tokenizer(CLIENT_PROMPTS, RESPONSES, padding=True, truncation=True, return_tensors="pt")
    assert batch["attention_mask"].min() == 0                                   # padding is exercised
    with torch.no_grad():
        expected = oracle(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    scores = scorer(PROMPTS, RESPONSES)
    assert scores.shape == (3,) and scores.dtype == torch.float32
    torch.testing.assert_close(scores, expected, atol=1e-5, rtol=0)
    assert ((scores > 0) & (scores < 1)).all()
    # one pair alone scores the same as inside a padded batch
    torch.testing.assert_close(scorer(PROMPTS[:1], RESPONSES[:1]), expected[:1], atol=1e-5, rtol=0)


def test_empathy_scorer_matches_hf(empathy):
    directory, oracle, tokenizer = empathy
    scorer = rewards.EmpathyScorer.from_dir(str(directory), batch_size=2)
    batch = tokenizer(CLIENT_PROMPTS, RESPONSES, padding=True, truncation=True, return_tensors="pt")
    with torch.no_grad():
        logits = oracle(**batch).logits[:, 0]
    scores = scorer(PROMPTS, RESPONSES)
    torch.testing.assert_close(logits, torch.tensor([-0.5, 0.5, 1.5]), atol=1e-4, rtol=0)
    torch.testing.assert_close(scores, logits.clamp(0, 1), atol=1e-5, rtol=0)
    assert ((scores >= 0) & (scores <= 1)).all()


def hf_perplexity(oracle, tokenizer, prompt, response):
    ids = torch.tensor([tokenizer(prompt, response)["input_ids"]])          # the public code's pair call
    with torch.no_grad():
        return torch.exp(oracle(input_ids=ids, labels=ids).loss).item()


def test_fluency_scorer_matches_hf(fluency):
    directory, oracle, tokenizer = fluency
    scorer = rewards.FluencyScorer.from_dir(str(directory), batch_size=2)
    expected = torch.tensor([hf_perplexity(oracle, tokenizer, p, r) for p, r in zip(CLIENT_PROMPTS, RESPONSES)])
    torch.testing.assert_close(scorer.perplexity(PROMPTS, RESPONSES), expected, rtol=1e-5, atol=0)
    # a random tiny model has ppl ~ vocab size > 50, so the real cap gives 0; a larger cap shows the formula
    assert torch.equal(scorer(PROMPTS, RESPONSES), torch.zeros(3))
    scorer.cap = 1000.0
    torch.testing.assert_close(scorer(PROMPTS, RESPONSES), ((1000.0 - expected) / 1000.0).clamp(0, 1), rtol=1e-5, atol=1e-6)


def test_load_scorers_and_score_all(reflection, empathy, fluency):
    directories = {"reflection": str(reflection[0]), "empathy": str(empathy[0]), "fluency": str(fluency[0])}
    scorers = rewards.load_scorers(directories)
    assert list(scorers) == list(rewards.OBJECTIVES)
    scores = rewards.score_all(scorers, PROMPTS, RESPONSES)
    assert list(scores) == list(rewards.OBJECTIVES)
    for name, values in scores.items():
        torch.testing.assert_close(values, scorers[name](PROMPTS, RESPONSES))
        assert values.shape == (3,) and ((values >= 0) & (values <= 1)).all()
    plugged = rewards.load_scorers({"coherence": str(empathy[0])})["coherence"]   # any other name: a plugged scorer
    torch.testing.assert_close(plugged(PROMPTS, RESPONSES), scores["empathy"])


# ----------------------------------------------------------------------------- convert (DynaOpt .pt)
def dynaopt_checkpoint(reflection, path, wrap=lambda sd: sd):
    """The oracle saved as DynaOpt does (torch.save of CrossScorerCrossEncoder.state_dict()), with the
    pooler and the position_ids buffer older transformers versions kept in it."""
    from transformers import RobertaModel
    _, oracle, _ = reflection
    state = {k: v.clone() for k, v in oracle.state_dict().items()}
    pooled = RobertaModel(oracle.cross_encoder.config, add_pooling_layer=True)
    state.update({"cross_encoder." + k: v for k, v in pooled.state_dict().items() if k.startswith("pooler.")})
    state["cross_encoder.embeddings.position_ids"] = torch.arange(66)[None]
    torch.save(wrap(state), str(path))
    return state


def test_convert_dynaopt_checkpoint(reflection, tmp_path):
    directory, oracle, tokenizer = reflection
    state = dynaopt_checkpoint(reflection, tmp_path / "reflection_scorer_weight.pt")
    table = rewards.convert_checkpoint(str(tmp_path / "reflection_scorer_weight.pt"), str(tmp_path / "out"), base=str(directory))
    mapping = dict(table)
    assert [k for k, _ in table] == list(state)                                # every key reported, in order
    assert mapping["cross_encoder.embeddings.word_embeddings.weight"] == "roberta.embeddings.word_embeddings.weight"
    assert mapping["l1.weight"] == "head.0.weight" and mapping["l2.bias"] == "head.2.bias"
    assert mapping["cross_encoder.pooler.dense.weight"] == "-" and mapping["cross_encoder.embeddings.position_ids"] == "-"
    scorer = rewards.ReflectionScorer.from_dir(str(tmp_path / "out"))
    batch = tokenizer(CLIENT_PROMPTS, RESPONSES, padding=True, return_tensors="pt")
    with torch.no_grad():
        expected = oracle(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    torch.testing.assert_close(scorer(PROMPTS, RESPONSES), expected, atol=1e-5, rtol=0)
    # a training-script checkpoint: {"state_dict": ...} around a DataParallel ("module.") state_dict
    dynaopt_checkpoint(reflection, tmp_path / "wrapped.pt",
                       wrap=lambda sd: {"epoch": 3, "state_dict": {"module." + k: v for k, v in sd.items()}})
    wrapped = rewards.convert_checkpoint(str(tmp_path / "wrapped.pt"), str(tmp_path / "wrapped.safetensors"))
    assert [v for _, v in wrapped] == [v for _, v in table]
    assert files.load_safetensors(str(tmp_path / "wrapped.safetensors")).keys() == files.load_safetensors(str(tmp_path / "out")).keys()


def test_convert_errors(reflection, tmp_path):
    state = dynaopt_checkpoint(reflection, tmp_path / "ok.pt")
    (tmp_path / "junk.pt").write_bytes(b"this is not a checkpoint")
    with pytest.raises(InputError, match="junk.pt: not a PyTorch checkpoint"):
        rewards.convert_checkpoint(str(tmp_path / "junk.pt"), str(tmp_path / "out"))
    with pytest.raises(InputError, match="file not found"):
        rewards.convert_checkpoint(str(tmp_path / "missing.pt"), str(tmp_path / "out"))
    torch.save({**state, "classifier.dense.weight": torch.zeros(2)}, str(tmp_path / "extra.pt"))
    with pytest.raises(InputError, match="key classifier.dense.weight does not map"):
        rewards.convert_checkpoint(str(tmp_path / "extra.pt"), str(tmp_path / "out"))
    torch.save({k: v for k, v in state.items() if not k.startswith("l2.")}, str(tmp_path / "headless.pt"))
    with pytest.raises(InputError, match="no tensor for head.2.weight"):
        rewards.convert_checkpoint(str(tmp_path / "headless.pt"), str(tmp_path / "out"))
    torch.save([1, 2, 3], str(tmp_path / "list.pt"))
    with pytest.raises(InputError, match="not a state_dict"):
        rewards.convert_checkpoint(str(tmp_path / "list.pt"), str(tmp_path / "out"))
    with pytest.raises(InputError, match="no config.json .expected a HF roberta-base folder"):
        rewards.convert_checkpoint(str(tmp_path / "ok.pt"), str(tmp_path / "out"), base=str(tmp_path))
    assert not (tmp_path / "out").exists()                                     # nothing written on error


# ----------------------------------------------------------------------------- errors
def copy_dir(src, dst):
    import shutil
    shutil.copytree(str(src), str(dst))
    return dst


def edit_weights(directory, edit):
    path = str(directory / "model.safetensors")
    tensors = files.load_safetensors(path)
    edit(tensors)
    files.save_safetensors(tensors, path)


def test_nan_score_is_an_input_error(reflection, tmp_path):
    directory = copy_dir(reflection[0], tmp_path / "nan")
    edit_weights(directory, lambda t: t["head.2.bias"].fill_(float("nan")))
    scorer = rewards.ReflectionScorer.from_dir(str(directory))
    with pytest.raises(InputError, match=r"NaN reward from reflection scorer \(row 0\)"):
        scorer(PROMPTS, RESPONSES)


def test_corrupt_or_missing_weights(reflection, empathy, fluency, tmp_path):
    for (source, *_), cls in ((reflection, rewards.ReflectionScorer), (empathy, rewards.EmpathyScorer),
                              (fluency, rewards.FluencyScorer)):
        directory = copy_dir(source, tmp_path / cls.name)
        weights = directory / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[:200])                       # truncated download
        with pytest.raises(InputError, match="corrupt or truncated"):
            cls.from_dir(str(directory))
        weights.unlink()
        with pytest.raises(InputError, match="no \\*.safetensors file"):
            cls.from_dir(str(directory))
    with pytest.raises(InputError, match="model_type must be 'roberta'"):
        rewards.ReflectionScorer.from_dir(str(empathy[0]))               # a BERT folder given as reflection
    directory = copy_dir(reflection[0], tmp_path / "no_head")
    edit_weights(directory, lambda t: t.pop("head.2.bias"))
    with pytest.raises(InputError, match="missing key head.2.bias"):
        rewards.ReflectionScorer.from_dir(str(directory))


@pytest.mark.parametrize("name,key", [("reflection", "roberta.embeddings.word_embeddings.weight"),
                                      ("empathy", "bert.embeddings.word_embeddings.weight"),
                                      ("fluency", "transformer.wte.weight")])
def test_vocab_embedding_mismatch(name, key, reflection, empathy, fluency, tmp_path):
    """A model whose embedding has 8 more rows than its tokenizer has tokens (wrong vocab file)."""
    source = {"reflection": reflection, "empathy": empathy, "fluency": fluency}[name][0]
    directory = copy_dir(source, tmp_path / name)
    config = files.read_json(str(directory / "config.json"))
    config["vocab_size"] += 8
    files.write_json(str(directory / "config.json"), config)
    edit_weights(directory, lambda t: t.update({key: torch.cat([t[key], torch.zeros(8, H)])}))
    with pytest.raises(InputError, match=r"the tokenizer has \d+ tokens but the word embedding has \d+ rows"):
        rewards.SCORERS[name].from_dir(str(directory))


def test_empathy_scorer_loads_distilbert(tmp_path):
    """The paper's bert-empathy (MoaazZaki/bert-empathy) is a DistilBertForSequenceClassification."""
    from transformers import BertTokenizer, DistilBertConfig, DistilBertForSequenceClassification
    vocab = train_wordpiece(tmp_path)
    tokenizer = BertTokenizer(str(tmp_path / "vocab.txt"), do_lower_case=True)
    torch.manual_seed(3)
    config = DistilBertConfig(vocab_size=vocab, dim=H, n_layers=2, n_heads=2, hidden_dim=32, max_position_embeddings=64,
                              num_labels=1, initializer_range=0.2)
    oracle = DistilBertForSequenceClassification(config).eval()
    with torch.no_grad():
        oracle.classifier.bias.zero_()                     # logits inside (0, 1): the network, not the clamp, decides
    oracle.save_pretrained(str(tmp_path))
    batch = tokenizer(CLIENT_PROMPTS, RESPONSES, padding=True, return_tensors="pt")
    with torch.no_grad():
        logits = oracle(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, 0]
    scorer = rewards.EmpathyScorer.from_dir(str(tmp_path), batch_size=2)
    torch.testing.assert_close(scorer(PROMPTS, RESPONSES), logits.clamp(0, 1), atol=1e-5, rtol=0)
    assert ((logits > 0) & (logits < 1)).all() and len(set(logits.tolist())) == 3


def test_long_pairs_are_truncated_like_hf(reflection, fluency):
    """Pairs longer than the context are cut longest-first (HF truncation=True), not an error."""
    prompt, response = " ".join(CORPUS * 2), "it sounds like work is hard for you " * 3
    directory, oracle, tokenizer = reflection                                   # 66 positions -> 64 tokens
    batch = tokenizer([prompt], [response], truncation=True, max_length=64, return_tensors="pt")
    assert batch["input_ids"].shape[1] == 64
    with torch.no_grad():
        expected = oracle(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    scorer = rewards.ReflectionScorer.from_dir(str(directory))
    torch.testing.assert_close(scorer([prompt], [response]), expected, atol=1e-5, rtol=0)
    directory, oracle, tokenizer = fluency                                      # 64 positions
    ids = torch.tensor([tokenizer(prompt, response, truncation=True, max_length=64)["input_ids"]])
    assert ids.shape[1] == 64
    with torch.no_grad():
        expected = torch.exp(oracle(input_ids=ids, labels=ids).loss)
    perplexity = rewards.FluencyScorer.from_dir(str(directory)).perplexity([prompt], [response])
    torch.testing.assert_close(perplexity[0], expected, rtol=1e-5, atol=0)


# ----------------------------------------------------------------------------- scorer inputs, labels, errors
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
