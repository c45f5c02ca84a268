"""gpt2.py against Hugging Face (test oracle only): tiny random GPT-2, GPT-2 / RoBERTa tokenizers built
from vocabularies trained both by our trainer and by the `tokenizers` library."""
import os

import pytest
import torch

import gpt2
import files

SPECIALS = ["<s>", "<pad>", "</s>", "<unk>", "<mask>", "<|endoftext|>"]

SENTENCES = [
    "Hello world",
    "I'm sure you'll see it's what they've said they'd do, we're told; don't.",
    "It'S LOUD'S 'tis O'Neil's rock'n'roll",
    "  leading spaces",
    "trailing spaces   ",
    "multiple   spaces\n\nand\tnewlines\r\n end",
    "Café naïve résumé — Über straße, ÇA VA?",
    "Emoji 😀🎉 family 👨‍👩‍👧 flags 🇫🇷!",
    "数字 123 4567.89 and ½ ² Ⅻ ٣ 12,000",
    "Ελληνικά русский עברית العربية हिन्दी 한국어",
    "supercalifragilisticexpialidocious" * 3,
    'punctuation!!! ?? ... (brackets) [x] {y} "quoted" --- ***',
    "nbsp\u00a0here\u3000ideographic\u2028line \x1c\x1d sep\u200bzero",
    "tab\tand\vvertical\fform \u0085nel",
    "combining e\u0301 marks and x  \n  y",
    "123abc456 $100 @home #tag",
    "", " ", "a", "'s", "'ll've",
]


def corpus(n=300):
    """A few hundred varied sentences to train the test vocabularies on."""
    words = "I you we they feel think can't won't it's really very so sad happy tired café naïve 2024 42 " \
            "emoji 😀 family — résumé привет 数字 don't they're we've I'm you'd he'll".split()
    return [" ".join(words[(i * 7 + j * 3) % len(words)] for j in range(3 + i % 9)) + ("." if i % 2 else "!?")
            for i in range(n)] + SENTENCES


@pytest.fixture(scope="module")
def vocab_dirs(tmp_path_factory):
    """{'ours': dir, 'tokenizers': dir}, each with vocab.json + merges.txt."""
    from tokenizers.implementations import ByteLevelBPETokenizer as HFTrainer

    texts = corpus()
    ours = tmp_path_factory.mktemp("ours")
    gpt2.save_bpe(*gpt2.train_byte_bpe(texts, 600, SPECIALS), str(ours))
    theirs = tmp_path_factory.mktemp("tokenizers")
    trainer = HFTrainer()
    trainer.train_from_iterator(texts, vocab_size=600, special_tokens=SPECIALS, show_progress=False)
    trainer.save_model(str(theirs))
    return {"ours": str(ours), "tokenizers": str(theirs)}


@pytest.fixture(scope="module", params=["ours", "tokenizers"])
def tokenizers_pair(request, vocab_dirs):
    """(our tokenizer, HF GPT2Tokenizer, HF RobertaTokenizer) on one vocabulary."""
    from transformers import GPT2Tokenizer, RobertaTokenizer

    directory = vocab_dirs[request.param]
    hf_gpt2 = GPT2Tokenizer.from_pretrained(directory)
    hf_gpt2.pad_token = hf_gpt2.eos_token
    return gpt2.ByteLevelBPETokenizer.from_dir(directory), hf_gpt2, RobertaTokenizer.from_pretrained(directory)


# ----------------------------------------------------------------------------- tokenizer
def test_pretokenize_matches_tokenizers_regex():
    from tokenizers import pre_tokenizers

    reference = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    for text in SENTENCES + ["a\x1c\x1db", " \n x", "x \u00a0y", "'S's'sup", "?'s", "  \t\n"]:
        ours = [gpt2.to_byte_chars(piece) for piece in gpt2.pretokenize(text)]
        assert ours == [piece for piece, _ in reference.pre_tokenize_str(text)], repr(text)


def test_encode_matches_hf(tokenizers_pair):
    ours, hf_gpt2, hf_roberta = tokenizers_pair
    for text in SENTENCES + corpus(40):
        assert ours.encode(text) == hf_gpt2(text)["input_ids"], repr(text)
        assert ours.encode(text) == hf_roberta(text, add_special_tokens=False)["input_ids"], repr(text)


def test_batch_encode_gpt2_matches_hf(tokenizers_pair):
    ours, hf_gpt2, _ = tokenizers_pair
    for max_length in (5, 64):
        input_ids, attention_mask = ours.batch_encode_gpt2(SENTENCES, max_length=max_length)
        ref = hf_gpt2(SENTENCES, max_length=max_length, truncation=True, padding=True, return_tensors="pt")
        assert torch.equal(input_ids, ref["input_ids"]) and torch.equal(attention_mask, ref["attention_mask"])


@pytest.mark.parametrize("max_length", [7, 13, 40, 512])
def test_batch_encode_roberta_matches_hf(tokenizers_pair, max_length):
    ours, _, hf_roberta = tokenizers_pair
    pairs = SENTENCES[::-1]
    for second in (None, pairs):
        got = ours.batch_encode_roberta(SENTENCES, second, max_length=max_length)
        ref = hf_roberta(SENTENCES, second, max_length=max_length, truncation=True, padding=True, return_tensors="pt")
        assert set(got) == {"input_ids", "attention_mask"}
        assert torch.equal(got["input_ids"], ref["input_ids"]), (max_length, second is None)
        assert torch.equal(got["attention_mask"], ref["attention_mask"])


def test_truncate_longest_first_by_hand():
    a, b = list(range(10)), list(range(100, 103))
    assert gpt2.truncate_longest_first(a, b, 8) == (a[:5], b)        # only the longer is cut
    assert gpt2.truncate_longest_first(b, a, 8) == (b, a[:5])
    assert gpt2.truncate_longest_first(a, a, 7) == (a[:3], a[:4])    # tie: the second takes the odd token
    assert gpt2.truncate_longest_first(a, b[:2] * 3, 9) == (a[:5], (b[:2] * 3)[:4])


def test_decode_round_trip(tokenizers_pair):
    ours, hf_gpt2, _ = tokenizers_pair
    for text in SENTENCES:
        ids = ours.encode(text)
        assert ours.decode(ids) == text
        assert ours.decode(ids) == hf_gpt2.decode(ids)


def test_train_byte_bpe_by_hand():
    vocab, merges = gpt2.train_byte_bpe(["ab ab ab", "abc"], 2 + 256 + 3, ["<s>", "</s>"])
    # word counts: "ab" 1, "Ġab" 2, "abc" 1 -> (a,b) 4; then (Ġ,ab) 2; then (ab,c) 1
    assert merges == [("a", "b"), ("Ġ", "ab"), ("ab", "c")]
    assert vocab["<s>"] == 0 and vocab["</s>"] == 1 and vocab["!"] == 2 + ord("!")
    assert [vocab[t] for t in ("ab", "Ġab", "abc")] == [258, 259, 260] and len(vocab) == 261
    # equal counts: the lexicographically smallest pair first ("Ġ" sorts after ASCII)
    assert gpt2.train_byte_bpe(["ab cd"], 300)[1] == [("a", "b"), ("c", "d"), ("Ġ", "cd")]
    assert gpt2.train_byte_bpe(corpus(50), 400, SPECIALS) == gpt2.train_byte_bpe(corpus(50), 400, SPECIALS)


def test_saved_files_format(vocab_dirs):
    with open(os.path.join(vocab_dirs["ours"], "merges.txt"), encoding="utf-8") as f:
        lines = f.read().splitlines()
    assert lines[0] == "#version: 0.2" and all(len(line.split(" ")) == 2 for line in lines[1:])
    vocab = files.read_json(os.path.join(vocab_dirs["ours"], "vocab.json"))
    assert len(vocab) == 600 and sorted(vocab.values()) == list(range(600))


# ----------------------------------------------------------------------------- model
@pytest.fixture(scope="module")
def tiny_gpt2(tmp_path_factory, vocab_dirs):
    """A tiny random HF GPT2LMHeadModel saved with save_pretrained beside our vocab files."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=600, n_positions=32, n_embd=32, n_layer=2, n_head=4, layer_norm_epsilon=1e-3,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=5, eos_token_id=5)
    hf = GPT2LMHeadModel(config).eval()
    with torch.no_grad():  # HF's init (std 0.02, LayerNorm 1/0) is too gentle to expose e.g. a wrong GELU
        for p in hf.parameters():
            p.normal_(0.0, 0.3)
    directory = str(tmp_path_factory.mktemp("gpt2"))
    hf.save_pretrained(directory)
    for name in ("vocab.json", "merges.txt"):
        with open(os.path.join(vocab_dirs["ours"], name), "rb") as src, open(os.path.join(directory, name), "wb") as dst:
            dst.write(src.read())
    return hf, directory


def padded_batch(tokenizer):
    texts = ["I feel so tired today, really.", "It's okay 😀", "Hi"]
    return tokenizer.batch_encode_gpt2(texts, max_length=32)


def test_logits_and_nll_match_hf(tiny_gpt2):
    hf, directory = tiny_gpt2
    model, tokenizer = gpt2.load_gpt2(directory)
    assert model.config.layer_norm_epsilon == 1e-3
    input_ids, attention_mask = padded_batch(tokenizer)
    assert attention_mask.sum(1).tolist()[-1] < input_ids.shape[1]  # the batch really is padded
    with torch.no_grad():
        logits = model(input_ids, attention_mask)
        ref = hf(input_ids=input_ids, attention_mask=attention_mask).logits
        real = attention_mask.bool()
        torch.testing.assert_close(logits[real], ref[real], atol=1e-5, rtol=1e-5)
        nll = gpt2.sequence_nll(model, input_ids, attention_mask)
        for b in range(len(input_ids)):  # HF's loss on the row alone, unpadded
            row = input_ids[b : b + 1, : int(attention_mask[b].sum())]
            torch.testing.assert_close(nll[b], hf(input_ids=row, labels=row).loss, atol=1e-5, rtol=1e-5)


def test_left_padding_and_empty_rows(tiny_gpt2):
    """Left padding exercises the key mask (positions stay 0..T-1, as HF without position_ids);
    an all-padding row must give finite logits, not NaN."""
    hf, directory = tiny_gpt2
    model, tokenizer = gpt2.load_gpt2(directory)
    right_ids, right_mask = padded_batch(tokenizer)
    lengths = right_mask.sum(1)
    input_ids, attention_mask = right_ids.clone(), right_mask.clone()
    for b, n in enumerate(lengths.tolist()):
        input_ids[b] = torch.cat([right_ids[b, n:], right_ids[b, :n]])
        attention_mask[b] = torch.cat([right_mask[b, n:], right_mask[b, :n]])
    with torch.no_grad():
        real = attention_mask.bool()
        ref = hf(input_ids=input_ids, attention_mask=attention_mask).logits
        torch.testing.assert_close(model(input_ids, attention_mask)[real], ref[real], atol=1e-5, rtol=1e-5)
        empty_ids, empty_mask = tokenizer.batch_encode_gpt2(["", "Hi there"], max_length=8)
        assert empty_mask[0].sum() == 0 and torch.isfinite(model(empty_ids, empty_mask)).all()


def test_old_checkpoint_layout_loads(tiny_gpt2, tmp_path):
    """No `transformer.` prefix, attn.bias / masked_bias buffers, an explicit tied lm_head.weight."""
    hf, directory = tiny_gpt2
    tensors = {k.removeprefix("transformer."): v.clone() for k, v in hf.state_dict().items()}
    tensors["lm_head.weight"] = hf.transformer.wte.weight.detach().clone()
    tensors["h.0.attn.bias"] = torch.ones(1, 1, 32, 32).tril()
    tensors["h.1.attn.masked_bias"] = torch.tensor(-1e4)
    reference, _ = gpt2.load_gpt2(directory)
    write_variant(directory, tmp_path, tensors)
    model, _ = gpt2.load_gpt2(str(tmp_path))
    for key, value in reference.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key


def write_variant(directory, target, tensors=None, skip=()):
    for name in os.listdir(directory):
        if name not in skip and not name.endswith(".safetensors"):
            with open(os.path.join(directory, name), "rb") as src, open(os.path.join(target, name), "wb") as dst:
                dst.write(src.read())
    if tensors is not None:
        files.save_safetensors(tensors, os.path.join(target, "model.safetensors"))


def state(hf):
    return {k: v.detach().clone() for k, v in hf.state_dict().items() if k != "lm_head.weight"}


def test_missing_key(tiny_gpt2, tmp_path):
    hf, directory = tiny_gpt2
    tensors = state(hf)
    del tensors["transformer.h.1.ln_2.weight"]
    write_variant(directory, tmp_path, tensors)
    with pytest.raises(files.InputError, match=r"missing key transformer\.h\.1\.ln_2\.weight"):
        gpt2.load_gpt2(str(tmp_path))


def test_wrong_shape(tiny_gpt2, tmp_path):
    hf, directory = tiny_gpt2
    tensors = state(hf)
    tensors["transformer.wpe.weight"] = torch.zeros(16, 32)
    write_variant(directory, tmp_path, tensors)
    with pytest.raises(files.InputError, match=r"transformer\.wpe\.weight has shape \(16, 32\)"):
        gpt2.load_gpt2(str(tmp_path))


def test_untied_head_rejected(tiny_gpt2, tmp_path):
    hf, directory = tiny_gpt2
    tensors = state(hf)
    tensors["lm_head.weight"] = torch.zeros_like(tensors["transformer.wte.weight"])
    write_variant(directory, tmp_path, tensors)
    with pytest.raises(files.InputError, match=r"lm_head\.weight"):
        gpt2.load_gpt2(str(tmp_path))


def test_truncated_safetensors(tiny_gpt2, tmp_path):
    _, directory = tiny_gpt2
    write_variant(directory, tmp_path)
    with open(os.path.join(directory, "model.safetensors"), "rb") as f:
        data = f.read()
    with open(tmp_path / "model.safetensors", "wb") as f:
        f.write(data[: len(data) // 2])
    with pytest.raises(files.InputError, match=r"model\.safetensors: corrupt or truncated"):
        gpt2.load_gpt2(str(tmp_path))


def test_missing_or_bad_merges(tiny_gpt2, tmp_path):
    _, directory = tiny_gpt2
    write_variant(directory, tmp_path, skip=("merges.txt",))
    with pytest.raises(files.InputError, match=r"merges\.txt: file not found"):
        gpt2.ByteLevelBPETokenizer.from_dir(str(tmp_path))
    (tmp_path / "merges.txt").write_text("#version: 0.2\nq zz9\n", encoding="utf-8")
    with pytest.raises(files.InputError, match=r"merges\.txt: line 2"):
        gpt2.ByteLevelBPETokenizer.from_dir(str(tmp_path))
    with pytest.raises(files.InputError, match=r"vocab\.json"):
        gpt2.ByteLevelBPETokenizer.from_dir(str(tmp_path / "nowhere"))


@pytest.mark.parametrize("hf_class", ["GPT2Tokenizer", "RobertaTokenizer"])
def test_tokenizer_json_saved_by_transformers_5(vocab_dirs, tmp_path, hf_class):
    """transformers 5's save_pretrained writes tokenizer.json (+ tokenizer_config.json) and no vocab.json /
    merges.txt: the BPE model is read from tokenizer.json and encodes exactly as HF does from that folder."""
    import transformers

    assert int(transformers.__version__.split(".")[0]) >= 5
    hf_cls = getattr(transformers, hf_class)
    hf_cls.from_pretrained(vocab_dirs["tokenizers"]).save_pretrained(tmp_path)
    assert not (tmp_path / "vocab.json").exists() and not (tmp_path / "merges.txt").exists()
    assert (tmp_path / "tokenizer.json").exists()
    ours, hf = gpt2.ByteLevelBPETokenizer.from_dir(str(tmp_path)), hf_cls.from_pretrained(str(tmp_path))
    reference = gpt2.ByteLevelBPETokenizer.from_dir(vocab_dirs["tokenizers"])
    assert ours.encoder == reference.encoder and ours.ranks == reference.ranks and len(ours.ranks) > 100
    for text in SENTENCES + corpus(40):
        assert ours.encode(text) == hf.encode(text, add_special_tokens=False), text
    if hf_class == "RobertaTokenizer":
        got = ours.batch_encode_roberta(SENTENCES[:6], SENTENCES[6:12], max_length=24)
        want = hf(SENTENCES[:6], SENTENCES[6:12], truncation=True, max_length=24, padding=True, return_tensors="pt")
        assert torch.equal(got["input_ids"], want["input_ids"])


def test_tokenizer_json_in_the_old_merges_format_and_errors(vocab_dirs, tmp_path):
    import json

    transformers = pytest.importorskip("transformers")
    transformers.GPT2Tokenizer.from_pretrained(vocab_dirs["ours"]).save_pretrained(tmp_path)
    raw = json.loads((tmp_path / "tokenizer.json").read_text(encoding="utf-8"))
    raw["model"]["merges"] = [" ".join(pair) for pair in raw["model"]["merges"]]  # tokenizers < 0.20 wrote "a b"
    (tmp_path / "tokenizer.json").write_text(json.dumps(raw), encoding="utf-8")
    reference = gpt2.ByteLevelBPETokenizer.from_dir(vocab_dirs["ours"])
    assert gpt2.ByteLevelBPETokenizer.from_dir(str(tmp_path)).ranks == reference.ranks
    raw["model"]["merges"].append("q zz9")
    (tmp_path / "tokenizer.json").write_text(json.dumps(raw), encoding="utf-8")
    with pytest.raises(files.InputError, match=r"tokenizer\.json: merge \d+ 'q zz9' is not a merge"):
        gpt2.ByteLevelBPETokenizer.from_dir(str(tmp_path))
    raw["model"]["type"] = "WordPiece"
    (tmp_path / "tokenizer.json").write_text(json.dumps(raw), encoding="utf-8")
    with pytest.raises(files.InputError, match="not a BPE tokenizer"):
        gpt2.ByteLevelBPETokenizer.from_dir(str(tmp_path))


def test_pretokenize_over_the_bmp_matches_tokenizers_but_for_newer_unicode():
    """Every code point of the Basic Multilingual Plane next to a letter, a digit, a symbol and spaces, through our
    scanner and through the `tokenizers` regex: they agree except where Python's unicodedata (3.11: Unicode 14.0)
    does not know a letter that the regex engine's newer tables do (README, Reliability)."""
    import unicodedata

    from tokenizers import pre_tokenizers

    reference = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)

    def same(text):
        return [gpt2.to_byte_chars(p) for p in gpt2.pretokenize(text)] == [p for p, _ in reference.pre_tokenize_str(text)]

    def probes(c):
        return f"a{c}a 1{c}1 !{c}!  {c} \n{c}"

    code_points = [c for c in range(0x10000) if not 0xD800 <= c <= 0xDFFF]
    differ = []
    for start in range(0, len(code_points), 2048):
        chunk = code_points[start:start + 2048]
        if not same(" ".join(probes(chr(c)) for c in chunk)):
            differ += [c for c in chunk if not same(probes(chr(c)))]
    assert all(unicodedata.category(chr(c)) == "Cn" for c in differ), [hex(c) for c in differ]
    assert len(differ) < 40, len(differ)  # (Python 3.11, tokenizers 0.23.3: 8, e.g. U+A7CB, assigned in Unicode 16)
