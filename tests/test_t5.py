"""t5.py against Hugging Face (test oracle only) on tiny random models: encoder output, decoder
hidden states, logits, greedy generation, KV cache, tokenizer, strict loader errors."""
import copy
import json
import os
import random

import pytest
import torch

import files
import t5

transformers = pytest.importorskip("transformers")

VOCAB = 256  # 150 SentencePiece pieces + 100 sentinels, rounded up like T5's 32128
TINY = dict(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=3, num_heads=4,
            relative_attention_num_buckets=8, relative_attention_max_distance=20, dropout_rate=0.1,
            decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)


def sentences(n, seed=0):
    rng = random.Random(seed)
    syllables = "ka lo mi ne ru ta shi po fe gu an er in ou th st".split()
    words = "the a client feel felt really so tired work home family stress I you we it's 42 3.14 café naïve " \
            "über — “quoted” (paren) ok! why? yes, no; well: e-mail".split()
    words += ["".join(rng.choice(syllables) for _ in range(rng.randint(1, 3))) for _ in range(300)]
    return [" ".join(rng.choice(words) for _ in range(rng.randint(3, 12))) for _ in range(n)]


@pytest.fixture(scope="module")
def spiece(tmp_path_factory):
    import sentencepiece

    folder = tmp_path_factory.mktemp("spiece")
    corpus = folder / "corpus.txt"
    corpus.write_text("\n".join(sentences(400)), encoding="utf-8")
    sentencepiece.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(folder / "spiece"), vocab_size=150, model_type="unigram",
        pad_id=0, eos_id=1, unk_id=2, bos_id=-1, character_coverage=1.0, minloglevel=2)
    return str(folder / "spiece.model")


def hf_model(family, seed=0):
    """A tiny random HF T5. 'v1.0': ReLU, tied + rescaled; 'v1.1': gated-GELU, no rescale (HF 5.x
    ties the head to the embedding); 'v1.1-untied': gated-GELU with its own lm_head (flan layout)."""
    torch.manual_seed(seed)
    gated = family != "v1.0"
    config = transformers.T5Config(**TINY, feed_forward_proj="gated-gelu" if gated else "relu", tie_word_embeddings=not gated)
    model = transformers.T5ForConditionalGeneration(config)
    with torch.no_grad():  # HF's init makes a tiny model emit one token forever: spread the weights out
        for name, p in model.named_parameters():
            if name.endswith("layer_norm.weight"):
                p.uniform_(0.5, 1.5)
            else:
                p.normal_(0.0, p.shape[-1] ** -0.5)
    if family == "v1.1-untied":
        model.lm_head.weight = torch.nn.Parameter(torch.randn(VOCAB, 32) * 32 ** -0.5)
    return model.eval()


def save_hf(model, spiece_path, folder, family):
    """save_pretrained; for the untied family write the HF 4.x / flan layout by hand (HF 5.x would
    re-tie on construction): tie_word_embeddings false, lm_head.weight and the tied embed copies."""
    model.save_pretrained(folder)
    with open(spiece_path, "rb") as f:
        (folder / "spiece.model").write_bytes(f.read())
    if family == "v1.1-untied":
        config = json.loads((folder / "config.json").read_text())
        config.pop("scale_decoder_outputs")
        config["tie_word_embeddings"] = False
        (folder / "config.json").write_text(json.dumps(config))
        state = {k: v.contiguous() for k, v in model.state_dict().items()}
        state["encoder.embed_tokens.weight"] = state["shared.weight"].clone()
        state["decoder.embed_tokens.weight"] = state["shared.weight"].clone()
        files.save_safetensors(state, folder / "model.safetensors", metadata={"format": "pt"})
    return str(folder)


FAMILIES = ["v1.0", "v1.1", "v1.1-untied"]


@pytest.fixture(scope="module", params=FAMILIES)
def pair(request, spiece, tmp_path_factory):
    """(HF model, our model loaded from HF's files, folder)."""
    hf = hf_model(request.param)
    folder = save_hf(hf, spiece, tmp_path_factory.mktemp(request.param.replace(".", "")), request.param)
    ours, _ = t5.load_t5(folder)
    return hf, ours, folder


def batch(lengths=(7, 40, 3), seed=1):
    """Right-padded random prompts; 40 > relative_attention_max_distance (20)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.zeros(len(lengths), max(lengths), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, n in enumerate(lengths):
        ids[i, :n - 1] = torch.randint(3, 150, (n - 1,), generator=g)
        ids[i, n - 1] = 1
        mask[i, :n] = 1
    return ids, mask


def close(a, b, tol=1e-5):
    torch.testing.assert_close(a, b, rtol=tol, atol=tol)


def test_config_and_parameter_names_match_hf(pair):
    hf, ours, folder = pair
    untied = not ours.config.tie_word_embeddings
    assert untied == (not torch.equal(hf.lm_head.weight, hf.shared.weight))
    tied_copies = {"encoder.embed_tokens.weight", "decoder.embed_tokens.weight"} | (set() if untied else {"lm_head.weight"})
    hf_keys = set(hf.state_dict()) - tied_copies
    assert set(ours.state_dict()) == hf_keys
    assert ours.config.scale_decoder_outputs == hf.config.scale_decoder_outputs


def test_encoder_decoder_logits_match_hf(pair):
    hf, ours, _ = pair
    ids, mask = batch()
    decoder_ids = torch.randint(1, VOCAB, (3, 31), generator=torch.Generator().manual_seed(2))  # 31 > 20 too
    decoder_ids[:, 0] = 0
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask, decoder_input_ids=decoder_ids)
        encoder_hidden = ours.encode(ids, mask)
        hidden, _ = ours.decode(decoder_ids, encoder_hidden, mask)
        close(encoder_hidden, ref.encoder_last_hidden_state)
        close(hidden, hf.get_decoder()(input_ids=decoder_ids, encoder_hidden_states=encoder_hidden,
                                      encoder_attention_mask=mask).last_hidden_state)
        close(ours.logits(hidden), ref.logits)
        close(ours(ids, mask, decoder_ids), ref.logits)


def test_train_mode_uses_dropout(pair):
    _, ours, _ = pair
    ids, mask = batch()
    ours.train()
    try:
        a, b = (ours(ids, mask, ids[:, :5]) for _ in range(2))
    finally:
        ours.eval()
    assert not torch.allclose(a, b)


def scripted_eos(ours, ids, mask):
    """(eos id, row, step): a token some row first emits at a step >= 2, so rows finish at different steps."""
    eos = ours.config.eos_token_id
    ours.config.eos_token_id = -1
    rows = t5.generate(ours, ids, mask, max_new_tokens=12)[0].tolist()
    ours.config.eos_token_id = eos
    row, step = next((r, t) for r in range(len(rows)) for t in range(2, 12) if rows[r][t] not in rows[r][:t])
    return rows[row][step], row, step


def test_greedy_generation_matches_hf(pair):
    hf, ours, _ = pair
    ids, mask = batch()
    eos, row, step = scripted_eos(ours, ids, mask)
    ours.config.eos_token_id = eos
    try:
        tokens, logprobs = t5.generate(ours, ids, mask, max_new_tokens=12)
    finally:
        ours.config.eos_token_id = 1
    with torch.no_grad():
        ref = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=12, min_length=0, num_beams=1,
                          do_sample=False, eos_token_id=eos, pad_token_id=0, decoder_start_token_id=0,
                          output_scores=True, return_dict_in_generate=True, use_cache=False)  # HF cache: 3 != 2 layers
    assert tokens[row, step] == eos and tokens[row, step + 1:].eq(0).all() and eos != 0  # finished, then padding
    assert torch.equal(tokens, ref.sequences[:, 1:])
    ref_logprobs = torch.stack(ref.scores, 1).log_softmax(-1).gather(2, tokens[:, :, None]).squeeze(2)
    after_eos = tokens.eq(eos).long().cumsum(1) - tokens.eq(eos).long() > 0
    close(logprobs, ref_logprobs.masked_fill(after_eos, 0.0))


def test_kv_cache_equals_full_recompute(pair):
    _, ours, _ = pair
    ids, mask = batch()
    decoder_ids = torch.randint(3, VOCAB, (3, 25), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        encoder_hidden = ours.encode(ids, mask)
        cache = None
        for t in range(decoder_ids.shape[1]):
            step, cache = ours.decode(decoder_ids[:, t:t + 1], encoder_hidden, mask, cache)
            full, _ = ours.decode(decoder_ids[:, :t + 1], encoder_hidden, mask)
            close(step[:, 0], full[:, -1], tol=1e-4)  # same maths, other matmul shapes
        assert cache.length == 25 and cache.self_k[0].shape[2] == cache.capacity == 64  # written in place
        # a buffer that starts tiny doubles as it fills: the same K/V, the same hidden states
        small = t5.KVCache(len(ours.decoder.block), capacity=1)
        for t in range(decoder_ids.shape[1]):
            grown, small = ours.decode(decoder_ids[:, t:t + 1], encoder_hidden, mask, small)
        assert small.capacity > 25 and torch.equal(grown, step)
        assert torch.equal(small.self_k[2][:, :, :25], cache.self_k[2][:, :, :25])
        # a multi-token chunk after a cached prefix (causal mask with an offset)
        _, cache = ours.decode(decoder_ids[:, :10], encoder_hidden, mask)
        chunk, _ = ours.decode(decoder_ids[:, 10:], encoder_hidden, mask, cache)
        close(chunk, full[:, 10:], tol=1e-4)


def test_save_t5_roundtrip_loads_in_hf(pair, tmp_path, spiece):
    hf, ours, _ = pair
    t5.save_t5(ours, spiece, tmp_path)
    again, tokenizer = t5.load_t5(str(tmp_path))
    assert again.config == ours.config and tokenizer.vocab_size == 250
    for key, value in ours.state_dict().items():
        assert torch.equal(value, again.state_dict()[key]), key
    t5.save_t5(again, tokenizer, tmp_path / "copy")  # from a tokenizer object: same spiece.model bytes
    assert (tmp_path / "copy" / "spiece.model").read_bytes() == open(spiece, "rb").read()
    reloaded = transformers.T5ForConditionalGeneration.from_pretrained(str(tmp_path)).eval()
    ids, mask = batch()
    with torch.no_grad():
        close(reloaded(input_ids=ids, attention_mask=mask, decoder_input_ids=ids[:, :6]).logits, ours(ids, mask, ids[:, :6]))


def test_save_t5_leaves_adapters_out(spiece, tmp_path):
    model = t5.T5ForConditionalGeneration(t5.T5Config(**{**TINY, "num_decoder_layers": 2}))
    model.encoder.block[0].layer[0].SelfAttention.q.lora_A = torch.nn.ParameterDict({"x": torch.zeros(2, 32)})
    t5.save_t5(model, spiece, tmp_path)
    assert not [k for k in files.load_safetensors(str(tmp_path)) if "lora" in k]
    t5.load_t5(str(tmp_path))


def test_decode_loop_finished_mask_and_sampling():
    # scripted logits: row 0 says eos at step 1, row 1 never; vocabulary of 5
    steps = []

    def next_logits(last):
        steps.append(last.clone())
        logits = torch.full((2, 5), -5.0)
        logits[:, 3] = 0.0
        if len(steps) == 2:
            logits[0, 1] = 5.0
        return logits

    tokens, logprobs = t5.decode_loop(next_logits, 2, max_new_tokens=4, start_id=0, eos_id=1, pad_id=0)
    assert tokens.tolist() == [[3, 1, 0, 0], [3, 3, 3, 3]]
    assert [s.tolist() for s in steps] == [[0, 0], [3, 3], [1, 3], [0, 3]]  # start token, ..., eos, then pad
    assert logprobs[0, 2:].eq(0).all() and logprobs[1].lt(0).all()
    close(logprobs[0, 1], torch.log_softmax(torch.tensor([-5.0, 5.0, -5.0, 0.0, -5.0]), 0)[1])
    # stops early once every row has finished
    tokens, _ = t5.decode_loop(lambda last: torch.tensor([[0.0, 9.0]]).expand(3, 2), 3, max_new_tokens=10)
    assert tokens.tolist() == [[1]] * 3
    # sampling: reproducible with a generator, logprob = log_softmax(logits / temperature)[token]
    logits = torch.randn(4, 7, generator=torch.Generator().manual_seed(0))
    runs = [t5.decode_loop(lambda last: logits, 4, max_new_tokens=6, eos_id=-1, do_sample=True, temperature=0.7,
                           generator=torch.Generator().manual_seed(3)) for _ in range(2)]
    assert torch.equal(runs[0][0], runs[1][0])
    tokens, logprobs = runs[0]
    close(logprobs, torch.log_softmax(logits / 0.7, -1).gather(1, tokens))
    greedy, _ = t5.decode_loop(lambda last: logits, 4, max_new_tokens=2, eos_id=-1)
    assert torch.equal(greedy[:, 0], logits.argmax(-1))


def test_sampling_from_the_model_is_seeded(pair):
    _, ours, _ = pair
    ids, mask = batch()
    a, b = (t5.generate(ours, ids, mask, max_new_tokens=6, do_sample=True, generator=torch.Generator().manual_seed(5))
            for _ in range(2))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


# ----------------------------------------------------------------------------- tokenizer
TEXTS = ["Hello, world!", "I feel so tired   at work.", "", "  leading and trailing  ", "café naïve 3.14 — “x”",
         "日本語 text", "a\tb\nc", "über-ok?!", "(paren) e-mail: yes; no", "12345 67.8%"] + sentences(20, seed=7)


def test_tokenizer_matches_hf(spiece):
    hf = transformers.T5Tokenizer.from_pretrained(os.path.dirname(spiece))
    ours = t5.T5Tokenizer(spiece)
    assert ours.vocab_size == len(hf) == 250
    assert hf.convert_tokens_to_ids("<extra_id_0>") == ours.vocab_size - 1
    for text in TEXTS:
        assert ours.encode(text) == hf(text)["input_ids"], text
    ids, mask = ours.batch_encode(TEXTS, max_length=12)
    ref = hf(TEXTS, max_length=12, truncation=True, padding="longest", return_tensors="pt")
    assert torch.equal(ids, ref["input_ids"]) and torch.equal(mask, ref["attention_mask"])
    assert ids.shape[1] == 12 and ids[ids.ne(0).sum(1) == 12][:, -1].eq(1).all()  # truncation keeps eos
    for text in TEXTS[-20:] + ["I feel so tired at work."]:
        assert ours.decode(ours.encode(text)) == text == hf.decode(hf(text)["input_ids"], skip_special_tokens=True)
    with_specials = torch.tensor([ours.encode("yes, no")[:-1] + [249, 2, 1, 0, 0]])  # sentinel, unk, eos, pad
    assert ours.batch_decode(with_specials) == ["yes, no"] == hf.batch_decode(with_specials, skip_special_tokens=True)


# ----------------------------------------------------------------------------- bad input
@pytest.fixture
def good_dir(spiece, tmp_path):
    folder = tmp_path / "policy"
    return save_hf(hf_model("v1.0"), spiece, folder, "v1.0")


def rewrite_tensors(folder, edit):
    path = os.path.join(folder, "model.safetensors")
    tensors = files.load_safetensors(path)
    edit(tensors)
    files.save_safetensors(tensors, path)


def expect_error(folder, *words):
    with pytest.raises(files.InputError) as info:
        t5.load_t5(folder)
    message = str(info.value)
    assert "\n" not in message and all(w in message for w in words), message


def test_load_errors_name_the_problem(good_dir):
    t5.load_t5(good_dir)  # the fixture itself loads
    key = "decoder.block.1.layer.2.DenseReluDense.wo.weight"
    rewrite_tensors(good_dir, lambda t: t.pop(key))
    expect_error(good_dir, "missing key", key)


def test_unexpected_key(good_dir):
    rewrite_tensors(good_dir, lambda t: t.update({"encoder.block.0.layer.0.SelfAttention.extra.weight": torch.zeros(2)}))
    expect_error(good_dir, "unexpected key", "encoder.block.0.layer.0.SelfAttention.extra.weight")


def test_wrong_shape(good_dir):
    key = "encoder.block.1.layer.0.SelfAttention.q.weight"
    rewrite_tensors(good_dir, lambda t: t.update({key: torch.zeros(32, 31)}))
    expect_error(good_dir, key, "(32, 31)")


def test_untied_embedding_copy_is_refused(good_dir):
    rewrite_tensors(good_dir, lambda t: t.update({"decoder.embed_tokens.weight": torch.zeros(VOCAB, 32)}))
    expect_error(good_dir, "decoder.embed_tokens.weight", "shared.weight")


def test_truncated_safetensors(good_dir):
    path = os.path.join(good_dir, "model.safetensors")
    data = open(path, "rb").read()
    open(path, "wb").write(data[: len(data) // 2])
    expect_error(good_dir, "model.safetensors", "truncated")


def test_missing_files_and_bad_config(good_dir):
    os.remove(os.path.join(good_dir, "spiece.model"))
    expect_error(good_dir, "spiece.model", "not found")
    open(os.path.join(good_dir, "spiece.model"), "wb").write(b"not a model")
    expect_error(good_dir, "spiece.model")
    config_path = os.path.join(good_dir, "config.json")
    config = json.load(open(config_path))
    json.dump({**config, "feed_forward_proj": "gated-swish"}, open(config_path, "w"))
    expect_error(good_dir, "config.json", "gated-swish")
    json.dump({k: v for k, v in config.items() if k != "d_model"}, open(config_path, "w"))
    expect_error(good_dir, "config.json", "d_model")
    open(config_path, "w").write("{not json")
    expect_error(good_dir, "config.json", "malformed")
    os.remove(config_path)
    expect_error(good_dir, "config.json", "not found")
    os.remove(os.path.join(good_dir, "model.safetensors"))
    expect_error(good_dir + "-nowhere", "not a directory")


def test_config_reads_act_keys_without_feed_forward_proj(tmp_path):
    path = tmp_path / "config.json"
    base = {k: TINY[k] for k in ("vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_heads")}
    path.write_text(json.dumps({**base, "is_gated_act": True, "dense_act_fn": "gelu_new", "tie_word_embeddings": False}))
    config = t5.T5Config.from_json(str(path))
    assert config.feed_forward_proj == "gated-gelu" and not config.scale_decoder_outputs and config.num_decoder_layers == 2
    path.write_text(json.dumps({**base, "is_gated_act": False, "dense_act_fn": "relu"}))
    config = t5.T5Config.from_json(str(path))
    assert config.feed_forward_proj == "relu" and config.scale_decoder_outputs and config.tie_word_embeddings
    path.write_text(json.dumps({**base, "feed_forward_proj": "relu", "is_gated_act": True, "dense_act_fn": "gelu_new"}))
    with pytest.raises(files.InputError, match="contradicts"):
        t5.T5Config.from_json(str(path))


def test_atomic_write_gives_a_whole_file_with_the_usual_mode(tmp_path):
    import os
    path = tmp_path / "out.json"
    files.write_json(str(path), {"a": 1})
    files.write_json(str(path), {"b": 2})                       # replaces, never appends or leaves a temp file
    assert path.read_text() == '{\n  "b": 2\n}\n'
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask


def test_top_k_sampler_matches_direct_reference():
    """Top-k sampling (HF generate's default k = 50 in the public code): never a token outside the
    top k, and frequencies equal the renormalised top-k distribution."""
    torch.manual_seed(0)
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0, 3.0]])
    k, n = 3, 40_000
    calls = {"n": 0}

    def next_logits(last):
        calls["n"] += 1
        return logits.expand(len(last), -1)

    generator = torch.Generator().manual_seed(1)
    tokens, logprobs = t5.decode_loop(next_logits, n, max_new_tokens=1, do_sample=True, top_k=k,
                                      generator=generator, eos_id=-1)
    counts = torch.bincount(tokens[:, 0], minlength=6).double() / n
    allowed = logits[0].topk(k).indices
    expected = torch.zeros(6, dtype=torch.float64)
    expected[allowed] = torch.softmax(logits[0, allowed].double(), -1)
    assert set(tokens[:, 0].unique().tolist()) <= set(allowed.tolist())
    assert torch.allclose(counts, expected, atol=0.01)
    # the returned log-probs are the full softmax's, not the truncated sampler's
    full = torch.log_softmax(logits[0], -1)
    assert torch.allclose(logprobs[:, 0], full[tokens[:, 0]])
    # top_k = 0 keeps the whole distribution
    tokens, _ = t5.decode_loop(next_logits, n, max_new_tokens=1, do_sample=True, top_k=0,
                               generator=torch.Generator().manual_seed(1), eos_id=-1)
    counts = torch.bincount(tokens[:, 0], minlength=6).double() / n
    assert torch.allclose(counts, torch.softmax(logits[0].double(), -1), atol=0.01)


def test_top_k_filter_keeps_ties():
    scores = torch.tensor([[1.0, 2.0, 2.0, 0.0]])
    assert t5.top_k_filter(scores, 2).isfinite().tolist() == [[False, True, True, False]]
    assert t5.top_k_filter(scores, 1).isfinite().tolist() == [[False, True, True, False]]
    assert t5.top_k_filter(scores, 0).isfinite().all()


@pytest.mark.parametrize("layout", ["transformers-5", "official"])
def test_mt5_follows_hf_family_rule(spiece, tmp_path, layout):
    """mT5 saved by transformers 5 says tie_word_embeddings true and has no scale_decoder_outputs key, yet HF's
    MT5 never rescales the decoder output: reading it as a T5 v1.0 would scale the logits by d_model^-0.5.
    "official": the layout of google/mt5-* (tie_word_embeddings false, its own lm_head.weight)."""
    torch.manual_seed(3)
    hf = transformers.MT5ForConditionalGeneration(transformers.MT5Config(**TINY, feed_forward_proj="gated-gelu"))
    with torch.no_grad():
        for name, p in hf.named_parameters():
            p.uniform_(0.5, 1.5) if name.endswith("layer_norm.weight") else p.normal_(0.0, p.shape[-1] ** -0.5)
    hf.save_pretrained(tmp_path)
    (tmp_path / "spiece.model").write_bytes(open(spiece, "rb").read())
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == "mt5" and config["tie_word_embeddings"] is True and "scale_decoder_outputs" not in config
    if layout == "official":
        config["tie_word_embeddings"] = False
        (tmp_path / "config.json").write_text(json.dumps(config))
        state = {k: v.clone() for k, v in hf.state_dict().items()}  # no shared storage in a safetensors file
        state["lm_head.weight"] = torch.randn(VOCAB, 32) * 32 ** -0.5
        files.save_safetensors(state, tmp_path / "model.safetensors", metadata={"format": "pt"})
    hf = transformers.MT5ForConditionalGeneration.from_pretrained(str(tmp_path)).eval()
    ours, _ = t5.load_t5(str(tmp_path))
    assert not ours.config.scale_decoder_outputs
    assert ours.config.tie_word_embeddings == (layout != "official")
    ids, mask = batch()
    decoder_ids = torch.randint(1, VOCAB, (3, 9), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        close(ours(ids, mask, decoder_ids), hf(input_ids=ids, attention_mask=mask, decoder_input_ids=decoder_ids).logits)


def test_unsupported_t5_family_is_refused(good_dir):
    config = json.loads(open(os.path.join(good_dir, "config.json")).read())
    config["model_type"] = "umt5"  # per-layer position biases: another architecture
    open(os.path.join(good_dir, "config.json"), "w").write(json.dumps(config))
    expect_error(good_dir, "model_type 'umt5'")


def test_safetensors_files_are_byte_identical_across_processes(tmp_path):
    """The safetensors writer keeps the metadata in a hash map whose order changes per process; save_safetensors
    writes the same bytes for the same tensors in any process (eight metadata keys: 8! orders to fall into)."""
    import subprocess
    import sys

    script = ("import sys, torch, files\n"
              "g = torch.Generator().manual_seed(0)\n"
              "tensors = {'b.weight': torch.randn(3, 4, generator=g), 'a.bias': torch.arange(5), 'c': torch.ones(2, dtype=torch.bfloat16)}\n"
              "files.save_safetensors(tensors, sys.argv[1], metadata={f'key{i}': f'value {i}' for i in range(7)} | {'format': 'pt'})\n")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    paths = [tmp_path / f"{i}.safetensors" for i in range(2)]
    for file in paths:
        subprocess.run([sys.executable, "-c", script, str(file)], check=True, cwd=root, timeout=120)
    assert paths[0].read_bytes() == paths[1].read_bytes()
    from safetensors import safe_open
    with safe_open(str(paths[0]), "pt") as f:
        assert f.metadata() == {**{f"key{i}": f"value {i}" for i in range(7)}, "format": "pt"}
        assert torch.equal(f.get_tensor("a.bias"), torch.arange(5))
    assert (len(paths[0].read_bytes()) - 8 - int.from_bytes(paths[0].read_bytes()[:8], "little")) == 3 * 4 * 4 + 5 * 8 + 2 * 2


def test_t5_folder_saved_by_transformers_5_without_spiece_model(good_dir):
    """transformers 5 writes a T5 tokenizer as tokenizer.json only: the error says what to copy."""
    tokenizer = transformers.AutoTokenizer.from_pretrained(good_dir)
    os.remove(os.path.join(good_dir, "spiece.model"))
    tokenizer.save_pretrained(good_dir)
    assert not os.path.exists(os.path.join(good_dir, "spiece.model"))
    expect_error(good_dir, "spiece.model: file not found", "copy spiece.model from the original checkpoint")


# ----------------------------------------------------------------------------- relative position buckets
BUCKET_GRID = [(nb, md) for nb in (4, 8, 16, 32, 64) for md in (1, 4, 8, 20, 32, 128)]


def first_bad_distance(bidirectional, num_buckets, max_distance, up_to=512):
    """HF's own bucket function (the oracle): the smallest distance whose bucket HF cannot look up."""
    bucket = transformers.models.t5.modeling_t5.T5Attention._relative_position_bucket
    distance = torch.arange(up_to)
    bad = torch.zeros(up_to, dtype=torch.bool)
    for sign in (-1, 1) if bidirectional else (-1,):  # key before / after the query
        buckets = bucket(sign * distance, bidirectional=bidirectional, num_buckets=num_buckets, max_distance=max_distance)
        bad |= (buckets < 0) | (buckets >= num_buckets)
    return int(distance[bad][0]) if bad.any() else up_to


@pytest.mark.parametrize("num_buckets,max_distance", BUCKET_GRID)
def test_position_buckets_match_hf_or_refuse_where_hf_fails(num_buckets, max_distance):
    """Every (num_buckets, max_distance) on encoder inputs and decoder outputs of 1..200 tokens,
    decoded whole and token by token (the cached table is a [capacity, capacity] square, larger than
    what is decoded): ours equals HF wherever HF runs, and is one InputError wherever HF fails
    (e.g. 64 causal buckets up to 32: no bucket from distance 32 on)."""
    shape = dict(vocab_size=64, d_model=16, d_kv=4, d_ff=32, num_layers=1, num_heads=2, dropout_rate=0.0,
                 relative_attention_num_buckets=num_buckets, relative_attention_max_distance=max_distance,
                 feed_forward_proj="gated-gelu", decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    torch.manual_seed(0)
    hf = transformers.T5ForConditionalGeneration(transformers.T5Config(**shape)).eval()
    ours = t5.T5ForConditionalGeneration(t5.T5Config(**shape, scale_decoder_outputs=False)).eval()
    state = hf.state_dict()
    ours.load_state_dict({k: state[k] for k in ours.state_dict()})
    encoder_reach = first_bad_distance(True, num_buckets, max_distance)  # longest input HF encodes
    decoder_reach = first_bad_distance(False, num_buckets, max_distance)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for length in (1, 5, 33, 200):  # encoder
            ids = torch.randint(2, 64, (2, length), generator=g)
            mask = torch.ones_like(ids)
            mask[1, length // 2 + 1:] = 0
            if length > encoder_reach:
                with pytest.raises(IndexError):
                    hf.get_encoder()(input_ids=ids, attention_mask=mask)
                with pytest.raises(files.InputError, match="no bucket for encoder sequences over"):
                    ours.encode(ids, mask)
            else:
                close(ours.encode(ids, mask), hf.get_encoder()(input_ids=ids, attention_mask=mask).last_hidden_state)
        encoder_hidden, mask = ours.encode(ids[:, :1], mask[:, :1]), mask[:, :1]
        decoder_ids = torch.randint(2, 64, (2, 70), generator=g)  # 70: the default cache (64) grows once
        run_hf = lambda n: hf.get_decoder()(input_ids=decoder_ids[:, :n], encoder_hidden_states=encoder_hidden,
                                            encoder_attention_mask=mask).last_hidden_state
        usable = min(decoder_reach, 70)
        reference = run_hf(usable)
        if usable < 70:
            with pytest.raises(IndexError):
                run_hf(usable + 1)
        for length in (1, 5, 33, 70):  # uncached: one call on the whole sequence
            if length > usable:
                with pytest.raises(files.InputError, match="no bucket for decoder sequences over"):
                    ours.decode(decoder_ids[:, :length], encoder_hidden, mask)
            else:
                close(ours.decode(decoder_ids[:, :length], encoder_hidden, mask)[0], reference[:, :length])
        cache = None  # cached: token by token through the [64, 64] table, then the grown one
        for t in range(usable):
            step, cache = ours.decode(decoder_ids[:, t:t + 1], encoder_hidden, mask, cache)
            close(step[:, 0], reference[:, t], tol=1e-4)
        if usable < 70:
            with pytest.raises(files.InputError, match="no bucket for decoder sequences over"):
                ours.decode(decoder_ids[:, usable:usable + 1], encoder_hidden, mask, cache)


def test_bucket_counts_that_fail_on_every_input_are_refused():
    """Under 4 buckets the encoder's half has no exact bucket (HF divides by zero on any input);
    a max_distance under 1 has no logarithm."""
    for bad in (dict(relative_attention_num_buckets=3), dict(relative_attention_max_distance=0)):
        with pytest.raises(files.InputError, match="need >= 4 buckets"):
            t5.T5Config(**bad)


# ----------------------------------------------------------------------------- generation details
def test_decode_loop_defaults_and_greedy_logprobs():
    """Defaults: ≤ 64 new tokens, start token 0, pad 0 after a row's eos (1), full distribution when
    sampling (top_k 0). Greedy log-probs are those of the logits themselves, whatever the temperature."""
    seen = []
    logits = torch.tensor([[0.0, -9.0, 2.0, 1.0], [0.0, -9.0, 1.0, 2.0]])

    def next_logits(last):
        seen.append(last.tolist())
        out = logits.clone()
        if len(seen) == 3:
            out[0, 1] = 9.0  # row 0 ends at its 3rd token
        return out

    tokens, logprobs = t5.decode_loop(next_logits, 2, temperature=2.0)
    assert tokens.shape == (2, 64) and seen[0] == [0, 0]
    assert tokens[0, :3].tolist() == [2, 2, 1] and (tokens[0, 3:] == 0).all() and (tokens[1] == 3).all()
    assert torch.allclose(logprobs[1], torch.log_softmax(logits[1], -1)[3].expand(64))
    flat = torch.linspace(0.0, 0.1, 6)[None].expand(1, 6)  # a nearly flat distribution: top_k 0 keeps all six
    drawn, _ = t5.decode_loop(lambda last: flat, 1, max_new_tokens=60, eos_id=-1, do_sample=True,
                              generator=torch.Generator().manual_seed(0))
    assert len(set(drawn[0].tolist())) >= 4


def test_generate_passes_its_sampling_options_and_ids_to_the_loop():
    """t5.generate = decode_loop over the cached decoder with the config's start / eos / pad ids and the
    caller's do_sample, temperature and top_k. Oracle: decode_loop over a full recompute (no cache)."""
    torch.manual_seed(0)
    cfg = t5.T5Config(vocab_size=32, d_model=16, d_kv=4, d_ff=32, num_layers=2, num_heads=2, dropout_rate=0.0,
                      decoder_start_token_id=4, eos_token_id=7, pad_token_id=2)
    model = t5.T5ForConditionalGeneration(cfg).eval()
    ids = torch.randint(3, 32, (3, 6))
    mask = torch.ones_like(ids)

    def oracle(**options):
        prefix = []

        def next_logits(last):
            prefix.append(last)
            with torch.no_grad():
                return model(ids, mask, torch.stack(prefix, 1))[:, -1]
        return t5.decode_loop(next_logits, 3, start_id=4, eos_id=7, pad_id=2, **options)

    for options in (dict(), dict(max_new_tokens=12, do_sample=True, temperature=0.5, top_k=3),
                    dict(max_new_tokens=12, do_sample=True), dict(max_new_tokens=12, do_sample=True, top_k=1)):
        sampling = {"generator": torch.Generator().manual_seed(1)} if options.get("do_sample") else {}
        got = t5.generate(model, ids, mask, **options, **sampling)
        sampling = {"generator": torch.Generator().manual_seed(1)} if options.get("do_sample") else {}
        expected = oracle(**options, **sampling)
        assert torch.equal(got[0], expected[0]), options
        torch.testing.assert_close(got[1], expected[1], rtol=1e-5, atol=1e-5)


def test_generation_makes_its_tensors_on_the_models_device_and_dtype(monkeypatch):
    """Device-agnostic code (README: every command takes --device): with the default device set to meta,
    generation on CPU tensors gives the same tokens, so every tensor it makes is put on the inputs' device
    explicitly (a forgotten device= would land on meta and fail). A bfloat16 model decodes in bfloat16
    (the position bias in the model's dtype). More than 64 new tokens: the KV cache grows once."""
    torch.manual_seed(0)
    cfg = t5.T5Config(vocab_size=32, d_model=16, d_kv=4, d_ff=32, num_layers=2, num_heads=2, dropout_rate=0.0,
                      eos_token_id=40)   # no eos: every row runs the whole length
    model = t5.T5ForConditionalGeneration(cfg).eval()
    ids = torch.randint(3, 32, (2, 5))
    mask = torch.ones_like(ids)
    for options in (dict(), dict(do_sample=True, top_k=5)):
        sampling = lambda: {"generator": torch.Generator().manual_seed(1)} if options else {}  # noqa: E731
        expected = t5.generate(model, ids, mask, max_new_tokens=70, **options, **sampling())
        with torch.device("meta"):
            got = t5.generate(model, ids, mask, max_new_tokens=70, **options, **sampling())
        assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1]) and got[0].shape == (2, 70)
    half = copy.deepcopy(model).to(torch.bfloat16)
    hidden, _ = half.decode(torch.zeros(2, 3, dtype=torch.long), half.encode(ids, mask), mask)
    assert hidden.dtype == torch.bfloat16
    assert t5.generate(half, ids, mask, max_new_tokens=4)[0].shape == (2, 4)
    seen = {}   # the loop is told the inputs' device (its own default is the CPU): a model on meta
    monkeypatch.setattr(t5, "decode_loop", lambda next_logits, batch_size, **kwargs: seen.update(kwargs))
    t5.generate(copy.deepcopy(model).to("meta"), ids.to("meta"), mask.to("meta"))
    assert seen["device"] == torch.device("meta")


def test_position_bias_with_an_offset_is_those_rows_of_the_full_square():
    """T5Attention.position_bias(query_len, key_len, offset): queries at positions offset .. offset+query_len-1."""
    torch.manual_seed(0)
    cfg = t5.T5Config(vocab_size=32, d_model=16, d_kv=4, d_ff=32, num_layers=2, num_heads=2, dropout_rate=0.0)
    attention = t5.T5ForConditionalGeneration(cfg).decoder.block[0].layer[0].SelfAttention
    full = attention.position_bias(7, 7)
    assert torch.equal(attention.position_bias(2, 7, offset=4), full[:, :, 4:6])
