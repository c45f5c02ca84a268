"""lora.py: LoRA = base at init, mixed rows = single adapters, merged = unmerged, PEFT file compatibility both
ways (peft is a test oracle only), strict loading errors."""
import json
import math

import pytest
import torch
from torch import nn
from safetensors import safe_open

import lora
import files
import t5
from files import InputError


class Toy(nn.Module):
    """Two residual blocks with HF-like names (q, wo) plus an untouched lm_head."""

    def __init__(self, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.block = nn.ModuleList(nn.ModuleDict(dict(q=nn.Linear(8, 12, bias=False), wo=nn.Linear(12, 8))) for _ in range(2))
        self.norm, self.lm_head = nn.LayerNorm(8), nn.Linear(8, 5, bias=False)

    def forward(self, x):
        for b in self.block:
            x = x + b["wo"](torch.relu(b["q"](x)))
        return self.lm_head(self.norm(x))


def perturb(params, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)


def toy_with_adapters(seed=0):
    model = Toy(seed).eval()
    lora.add_adapter(model, "a")
    lora.add_adapter(model, "b", r=4, alpha=8)       # another rank: mixed mode concatenates ranks 8 + 4 + 8
    lora.add_adapter(model, "c", targets=("q",))     # a subset of layers: absent elsewhere
    for i, name in enumerate("abc"):
        perturb(lora.adapter_parameters(model, name), seed=i + 1)
    return model


X = torch.randn(6, 3, 8, generator=torch.Generator().manual_seed(9))


def test_init_equals_base_and_only_adapters_train():
    model = Toy().eval()
    base_out, base_keys = model(X), set(model.state_dict())
    lora.add_adapter(model, "a")
    assert torch.equal(model(X), base_out)
    assert isinstance(model.block[0]["q"], lora.LoRALinear) and not isinstance(model.lm_head, lora.LoRALinear)
    assert base_keys <= set(model.state_dict())
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {n for n in model.state_dict() if ".lora_" in n}
    assert model.block[0]["q"].lora_A["a"].shape == (8, 8) and model.block[0]["q"].lora_B["a"].shape == (12, 8)


@pytest.mark.parametrize("grad", [True, False])
def test_mixed_rows_equal_single_adapters(grad):
    model = toy_with_adapters()
    names, rows = ["c", "a", "b"], lora.adapter_major_rows(3, 2)
    assert rows.tolist() == [0, 0, 1, 1, 2, 2]
    with torch.set_grad_enabled(grad), lora.mixed_adapters(model, names, rows):
        mixed, again = model(X), model(X)
    assert torch.equal(mixed, again)
    assert lora.adapter_names(model) == ["a", "b", "c"]
    for k, name in enumerate(names):
        lora.set_adapter(model, name)
        torch.testing.assert_close(mixed[2 * k:2 * k + 2], model(X)[2 * k:2 * k + 2], rtol=1e-5, atol=1e-6)
    assert not torch.allclose(mixed[0:2], mixed[2:4])  # the adapters really differ


def test_mixed_rows_in_any_order_and_a_new_block_sees_new_weights():
    model = toy_with_adapters()
    rows = torch.tensor([2, 0, 1, 0, 2, 1])  # not adapter-major: each row picks its block by the mask
    with torch.no_grad():
        with lora.mixed_adapters(model, ["a", "b", "c"], rows):
            mixed = model(X)
        for i, name in enumerate("abc"):
            lora.set_adapter(model, name)
            torch.testing.assert_close(mixed[rows == i], model(X)[rows == i], rtol=1e-5, atol=1e-6)
        model.block[0]["q"].lora_B["a"].mul_(2)  # a changed adapter is seen by the next block
        with lora.mixed_adapters(model, ["a", "b", "c"], rows):
            changed = model(X)
        lora.set_adapter(model, "a")
        torch.testing.assert_close(changed[rows == 0], model(X)[rows == 0], rtol=1e-5, atol=1e-6)
        assert not torch.allclose(changed[rows == 0], mixed[rows == 0])


def test_disabled_equals_base_and_state_comes_back():
    model = toy_with_adapters()
    with lora.adapters_disabled(model):
        off = model(X)
    lora.set_adapter(model, None)
    assert torch.equal(off, model(X))
    lora.set_adapter(model, "a")
    on = model(X)
    with lora.adapters_disabled(model):
        pass
    assert torch.equal(model(X), on) and not torch.allclose(on, off)


def test_merge_equals_weighted_forward_and_unmerge_is_exact():
    model = toy_with_adapters()
    base = {k: v.clone() for k, v in model.state_dict().items()}
    weights = {"a": 0.3, "b": 0.5, "c": 0.2}
    with lora.weighted_adapters(model, weights):
        unmerged = model(X)
    lora.set_adapter(model, "a")
    lora.merge(model, weights)
    assert not torch.equal(model.block[0]["q"].weight, base["block.0.q.weight"])
    torch.testing.assert_close(model(X), unmerged, rtol=1e-5, atol=1e-5)  # adapters bypassed while merged
    lora.unmerge(model)
    assert all(torch.equal(v, base[k]) for k, v in model.state_dict().items())
    with lora.weighted_adapters(model, {"a": 1.0}):
        single = model(X)
    assert torch.equal(model(X), single)


def test_merged_block_merges_and_restores_the_base_even_on_error():
    model = toy_with_adapters()
    base = {k: v.clone() for k, v in model.state_dict().items()}
    with lora.weighted_adapters(model, {"b": 0.5}):
        unmerged = model(X)
    with lora.merged(model, {"b": 0.5}):
        torch.testing.assert_close(model(X), unmerged, rtol=1e-5, atol=1e-5)
    assert all(torch.equal(v, base[k]) for k, v in model.state_dict().items())
    with pytest.raises(RuntimeError, match="inside"):
        with lora.merged(model, {"a": 1.0}):
            raise RuntimeError("inside")
    assert all(torch.equal(v, base[k]) for k, v in model.state_dict().items())


def test_optimizer_step_changes_only_the_active_adapter():
    model = toy_with_adapters().train()
    lora.set_adapter(model, "b")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.AdamW(lora.adapter_parameters(model, "b"), lr=1e-2)
    model(X).square().mean().backward()
    opt.step()
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed and all(".lora_A.b" in k or ".lora_B.b" in k for k in changed)


def test_mixed_training_mode_has_gradients_and_dropout():
    model = toy_with_adapters().train()
    with lora.mixed_adapters(model, ["a", "b"], lora.adapter_major_rows(2, 3)):
        out1, out2 = model(X), model(X)
        out1.sum().backward()
    assert not torch.equal(out1, out2)  # dropout active in training mode
    assert model.block[0]["q"].lora_B["a"].grad is not None and model.block[0]["q"].lora_B["c"].grad is None


def test_save_load_roundtrip_and_errors(tmp_path):
    model = toy_with_adapters()
    lora.save_adapter(model, "b", tmp_path / "b")
    cfg = json.loads((tmp_path / "b" / "adapter_config.json").read_text())
    assert (cfg["peft_type"], cfg["r"], cfg["lora_alpha"], cfg["target_modules"]) == ("LORA", 4, 8, ["q", "wo"])
    fresh = Toy().eval()
    assert lora.load_adapter(fresh, tmp_path / "b", "b2") == "b2"
    lora.set_adapter(model, "b")
    assert torch.equal(fresh(X), model(X))
    lora.save_adapter(model, "c", tmp_path / "c")  # only some layers: loads back to the same layers
    lora.load_adapter(fresh, tmp_path / "c", "c")
    assert [p for p, m in lora._layers(fresh) if "c" in m.lora_A] == ["block.0.q", "block.1.q"]
    lora.add_adapter(model, "d", targets=r"block\.1\.(q|wo)")  # a PEFT-style regex: saved as the exact module set
    lora.save_adapter(model, "d", tmp_path / "d")
    assert isinstance(json.loads((tmp_path / "d" / "adapter_config.json").read_text())["target_modules"], str)
    lora.load_adapter(fresh, tmp_path / "d", "d")
    assert [p for p, m in lora._layers(fresh) if "d" in m.lora_A] == ["block.1.q", "block.1.wo"]

    def broken(edit_config=None, edit_tensors=None, raw=None):
        d = tmp_path / "broken"
        lora.save_adapter(model, "b", d)
        if edit_config:
            c = json.loads((d / "adapter_config.json").read_text())
            edit_config(c)
            (d / "adapter_config.json").write_text(json.dumps(c))
        if edit_tensors:
            ts = files.load_safetensors(str(d / "adapter_model.safetensors"))
            edit_tensors(ts)
            files.save_safetensors(ts, str(d / "adapter_model.safetensors"))  # no fingerprint: like a PEFT file
        if raw is not None:
            (d / "adapter_model.safetensors").write_bytes(raw)
        with pytest.raises(InputError) as e:
            lora.load_adapter(Toy().eval(), d, "x")
        assert "\n" not in str(e.value)
        return str(e.value)

    key = "base_model.model.block.0.q.lora_A.weight"
    assert "corrupt" in broken(raw=b"\x00garbage")
    assert "shape" in broken(edit_config=lambda c: c.update(r=8))
    assert "missing key " + key in broken(edit_tensors=lambda ts: ts.pop(key))
    assert "unexpected key" in broken(edit_tensors=lambda ts: ts.update({"base_model.model.lm_head.lora_A.weight": ts[key].clone()}))
    assert "shape" in broken(edit_tensors=lambda ts: ts.update({key: ts[key][:2]}))
    assert "unsupported" in broken(edit_config=lambda c: c.update(use_dora=True))
    with pytest.raises(InputError, match="another base model"):
        lora.load_adapter(Toy(seed=1).eval(), tmp_path / "b", "b")
    ts = files.load_safetensors(str(tmp_path / "b" / "adapter_model.safetensors"))
    files.save_safetensors(ts, str(tmp_path / "b" / "adapter_model.safetensors"))  # without fingerprint (PEFT's files)
    lora.load_adapter(Toy(seed=1).eval(), tmp_path / "b", "b")
    with pytest.raises(InputError, match="unknown adapter"):
        lora.set_adapter(model, "zzz")


# ----------------------------------------------------------------------------- T5 + PEFT (oracle)
@pytest.fixture(scope="module", params=[("relu", True), ("gated-gelu", False)], ids=["relu-tied", "gated-untied"])
def t5_dir(request, tmp_path_factory):
    """A tiny random HF T5 saved with save_pretrained, plus a tiny spiece.model."""
    import io

    import sentencepiece as spm
    from transformers import T5Config, T5ForConditionalGeneration

    ff, tied = request.param
    d = tmp_path_factory.mktemp("t5")
    torch.manual_seed(0)
    config = T5Config(vocab_size=160, d_model=16, d_kv=4, d_ff=24, num_layers=2, num_decoder_layers=2, num_heads=2,
                      feed_forward_proj=ff, tie_word_embeddings=tied, decoder_start_token_id=0)
    T5ForConditionalGeneration(config).eval().save_pretrained(d)
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(["i feel sad today", "you feel alone", "that sounds hard"] * 5),
                                   model_writer=buf, vocab_size=24, pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
                                   hard_vocab_limit=False, minloglevel=2)
    (d / "spiece.model").write_bytes(buf.getvalue())
    return d


def hf_t5(directory):
    from transformers import T5ForConditionalGeneration

    return T5ForConditionalGeneration.from_pretrained(directory).double().eval()  # fp64: compare maths, not rounding


IDS = torch.tensor([[5, 9, 17, 1, 0], [44, 3, 8, 150, 1]])
MASK = (IDS != 0).long()
DEC = torch.tensor([[0, 7, 12, 1], [0, 99, 4, 6]])


def hf_logits(model):
    with torch.no_grad():
        return model(input_ids=IDS, attention_mask=MASK, decoder_input_ids=DEC).logits


def test_t5_adapter_matches_peft_both_ways(t5_dir, tmp_path):
    from peft import LoraConfig, PeftModel, get_peft_model

    ours, _ = t5.load_t5(str(t5_dir))
    ours.double()
    with torch.no_grad():
        base = ours(IDS, MASK, DEC)
    torch.testing.assert_close(base, hf_logits(hf_t5(t5_dir)), rtol=1e-5, atol=1e-5)
    lora.add_adapter(ours, "ours")
    assert not any(isinstance(m, lora.LoRALinear) for n, m in ours.named_modules() if n.endswith("lm_head"))
    with torch.no_grad():
        assert torch.equal(ours(IDS, MASK, DEC), base)
    perturb(lora.adapter_parameters(ours, "ours"), seed=3)
    with torch.no_grad():
        adapted = ours(IDS, MASK, DEC)
    assert not torch.allclose(adapted, base, atol=1e-3)
    lora.save_adapter(ours, "ours", tmp_path / "ours", base_model_name_or_path=str(t5_dir))
    peft_model = PeftModel.from_pretrained(hf_t5(t5_dir), str(tmp_path / "ours")).eval()
    torch.testing.assert_close(hf_logits(peft_model), adapted, rtol=1e-5, atol=1e-5)

    # the other way: a PEFT adapter (no fingerprint in its file) loads here
    peft_model = get_peft_model(hf_t5(t5_dir), LoraConfig(r=4, lora_alpha=16, lora_dropout=0.05, task_type="SEQ_2_SEQ_LM",
                                                          target_modules=list(lora.DEFAULT_TARGETS))).eval()
    perturb([p for n, p in peft_model.named_parameters() if "lora_" in n], seed=4)
    peft_model.save_pretrained(tmp_path / "peft")
    assert lora.load_adapter(ours, tmp_path / "peft", "peft") == "peft"
    with torch.no_grad():
        torch.testing.assert_close(ours(IDS, MASK, DEC), hf_logits(peft_model), rtol=1e-5, atol=1e-5)
        with lora.adapters_disabled(ours):
            assert torch.equal(ours(IDS, MASK, DEC), base)
        with lora.mixed_adapters(ours, ["peft", "ours"], torch.tensor([1, 0])):  # row 0: ours, row 1: peft
            mixed = ours(IDS, MASK, DEC)
    torch.testing.assert_close(mixed[0], adapted[0], rtol=1e-4, atol=1e-4)  # masked matmuls sum in another order
    torch.testing.assert_close(mixed[1], hf_logits(peft_model)[1], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("targets", [["SelfAttention.q", "EncDecAttention.o", "decoder.block.1.layer.2.DenseReluDense.wo"],
                                     ["layer.0.SelfAttention.v", "wo"], r"encoder\.block\.\d\.layer\.0\.SelfAttention\.[kv]"])
def test_peft_target_modules_by_suffix_full_path_or_regex(t5_dir, tmp_path, targets):
    """PEFT matches a list entry against the whole module path or a dotted suffix of it ("SelfAttention.q"),
    a string as a full-match regex: the same modules get adapters here, and the logits agree."""
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(hf_t5(t5_dir), LoraConfig(r=2, lora_alpha=4, task_type="SEQ_2_SEQ_LM",
                                                          target_modules=targets)).eval()
    perturb([p for n, p in peft_model.named_parameters() if "lora_" in n], seed=5)
    peft_model.save_pretrained(tmp_path / "peft")
    prefix = "base_model.model."
    peft_targets = sorted(n[len(prefix):] for n, m in peft_model.named_modules() if n.startswith(prefix) and hasattr(m, "lora_A")
                          and "default" in m.lora_A)
    ours, _ = t5.load_t5(str(t5_dir))
    ours.double()
    lora.load_adapter(ours, tmp_path / "peft", "x")
    assert sorted(path for path, m in lora._layers(ours) if "x" in m.lora_A) == peft_targets
    assert len(peft_targets) > 2
    with torch.no_grad():
        torch.testing.assert_close(ours(IDS, MASK, DEC), hf_logits(peft_model), rtol=1e-5, atol=1e-5)


def test_bad_target_modules_are_one_line_errors(tmp_path):
    with pytest.raises(InputError, match="not a valid regular expression"):
        lora.add_adapter(Toy(), "a", targets="block.(")
    with pytest.raises(InputError, match="expected module names"):
        lora.add_adapter(Toy(), "a", targets=["q", 3])
    model = Toy()
    lora.add_adapter(model, "a", targets="all-linear")
    assert sorted(p for p, _ in lora._layers(model)) == ["block.0.q", "block.0.wo", "block.1.q", "block.1.wo"]


# ----------------------------------------------------------------------------- init, merge, files, dropout, errors
class TwoLayers(nn.Module):
    """Two Linear layers named like T5's (q, wo), 16 -> 24 -> 16."""

    def __init__(self, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.q, self.wo = nn.Linear(16, 24, bias=False), nn.Linear(24, 16, bias=False)

    def forward(self, x):
        return self.wo(torch.relu(self.q(x)))


def two_layers_with_adapters(seed=0):
    model = TwoLayers(seed).eval()
    lora.add_adapter(model, "a", r=4, alpha=8, dropout=0.1)
    lora.add_adapter(model, "b", r=4, alpha=8, dropout=0.0)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name in "ab":
            for p in lora.adapter_parameters(model, name):
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return model


def test_lora_A_starts_as_peft_kaiming_uniform():
    """A ~ kaiming_uniform(a=√5) (PEFT's default): uniform on ±1/√fan_in; B = 0, so the adapter starts as the base."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 8, bias=False))
    lora.add_adapter(model, "x", r=16, targets=("0",))
    A = model[0].lora_A["x"]
    bound = 1 / math.sqrt(256)
    assert A.abs().max() <= bound and A.abs().max() > 0.99 * bound  # 4,096 draws reach the edge
    assert not model[0].lora_B["x"].any()


def test_merge_unmerge_merge_again_restores_the_adapters():
    """Eq. (4) merge, then unmerge: the base weights and the adapters' own (unmerged) forward come back,
    and a second merge / unmerge cycle works the same."""
    model, x = two_layers_with_adapters(), torch.randn(5, 16, generator=torch.Generator().manual_seed(3))
    base = {k: v.clone() for k, v in model.state_dict().items()}
    lora.set_adapter(model, "a")
    adapted = model(x)
    for _ in range(2):
        lora.merge(model, {"a": 0.5, "b": 0.5})
        merged = model(x)
        lora.unmerge(model)
        assert all(torch.equal(v, base[k]) for k, v in model.state_dict().items())
        assert torch.equal(model(x), adapted)  # adapter "a" active again, not bypassed
    with lora.weighted_adapters(model, {"a": 0.5, "b": 0.5}):
        torch.testing.assert_close(model(x), merged, rtol=1e-5, atol=1e-6)


def test_mixed_adapters_checks_its_row_index():
    model = two_layers_with_adapters()
    x = torch.randn(3, 16)
    with lora.mixed_adapters(model, ["a", "b"], [1, 1, 1]):  # every row the last adapter: valid
        got = model(x)
    lora.set_adapter(model, "b")
    torch.testing.assert_close(got, model(x), rtol=1e-5, atol=1e-6)  # bmm vs matmul round-off only
    for rows in ([0, 2, 1], [[0, 1, 1]], [-1, 0, 0]):
        with pytest.raises(InputError, match=r"^mixed_adapters: row_adapter must be a 1-D index into 2 adapters$"):
            lora.mixed_adapters(model, ["a", "b"], rows)


def test_saved_adapter_is_a_peft_lora_config(tmp_path):
    """README: adapters are written in PEFT's layout; the config is PEFT's LoraConfig for plain LoRA and the
    safetensors metadata says format "pt" (what HF's loaders check)."""
    model = two_layers_with_adapters()
    lora.save_adapter(model, "a", tmp_path / "a")
    assert json.loads((tmp_path / "a" / "adapter_config.json").read_text()) == dict(
        peft_type="LORA", task_type="SEQ_2_SEQ_LM", base_model_name_or_path="", r=4, lora_alpha=8,
        lora_dropout=0.1, target_modules=["q", "wo"], bias="none", fan_in_fan_out=False, inference_mode=True,
        init_lora_weights=True, use_rslora=False, use_dora=False, modules_to_save=None, rank_pattern={},
        alpha_pattern={})
    with safe_open(str(tmp_path / "a" / "adapter_model.safetensors"), "pt") as f:
        metadata = f.metadata()
    assert metadata["format"] == "pt"
    fingerprint = json.loads(metadata[lora.FINGERPRINT_KEY])
    assert len(fingerprint["shapes"]) == 16 and int(fingerprint["shapes"], 16) >= 0
    # the dropout comes back from the file; a config without one means no dropout
    fresh = TwoLayers().eval()
    lora.load_adapter(fresh, tmp_path / "a", "a")
    assert {m.dropout_p["a"] for _, m in lora._layers(fresh)} == {0.1}
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    config["lora_dropout"] = None
    (tmp_path / "a" / "adapter_config.json").write_text(json.dumps(config))
    lora.load_adapter(fresh, tmp_path / "a", "a")
    assert {m.dropout_p["a"] for _, m in lora._layers(fresh)} == {0.0}


def test_load_adapter_config_checks(tmp_path):
    """A rank of 1 is valid; a bad rank, alpha or target list is a one-line error naming the file."""
    model = two_layers_with_adapters()
    directory = tmp_path / "a"

    def load(**changes):
        lora.save_adapter(model, "a", directory)
        config = json.loads((directory / "adapter_config.json").read_text())
        config.update(changes)
        (directory / "adapter_config.json").write_text(json.dumps(config))
        return lora.load_adapter(TwoLayers().eval(), directory, "x")

    lora.add_adapter(model, "one", r=1)
    lora.save_adapter(model, "one", directory)
    assert lora.load_adapter(TwoLayers().eval(), directory, "x") == "x"
    config_path = str(directory / "adapter_config.json")
    for changes in (dict(r=0), dict(r=2.5), dict(r="4"), dict(lora_alpha="8"), dict(target_modules=[]),
                    dict(target_modules=None)):
        with pytest.raises(InputError, match=rf"^{config_path}: need integer r >= 1, numeric lora_alpha and target_modules"):
            load(**changes)
    with pytest.raises(InputError, match=rf"^{config_path}: not a LoRA adapter config \(peft_type must be LORA\)$"):
        load(peft_type="PREFIX_TUNING")
    (directory / "adapter_config.json").write_text("[1, 2]")
    with pytest.raises(InputError, match="not a LoRA adapter config"):
        lora.load_adapter(TwoLayers().eval(), directory, "x")


def test_adapter_fingerprint_is_of_the_base_model(tmp_path):
    """The fingerprint describes the base weights (also while adapters are merged into them), refuses an
    adapter saved for another base even when its weights are small, and an unreadable one is refused."""
    model = two_layers_with_adapters()
    before = lora.base_fingerprint(model)
    lora.merge(model, {"a": 1.0})
    assert lora.base_fingerprint(model) == before
    lora.unmerge(model)
    other = lora.base_fingerprint(nn.Sequential(nn.Linear(16, 24, bias=False), nn.Linear(24, 8, bias=False)))
    assert other["shapes"] != before["shapes"]
    small = TwoLayers()
    with torch.no_grad():
        small.q.weight.fill_(0.01)
    lora.add_adapter(small, "a")
    lora.save_adapter(small, "a", tmp_path / "a")
    with torch.no_grad():
        small.q.weight.fill_(0.02)  # another base: twice the weights, still tiny sums
    with pytest.raises(InputError, match="another base model"):
        lora.load_adapter(small, tmp_path / "a", "a")
    tensors = files.load_safetensors(str(tmp_path / "a" / "adapter_model.safetensors"))
    files.save_safetensors(tensors, str(tmp_path / "a" / "adapter_model.safetensors"), {lora.FINGERPRINT_KEY: "{not json"})
    with pytest.raises(InputError, match="another base model"):
        lora.load_adapter(TwoLayers(), tmp_path / "a", "a")


def test_lora_dropout_is_on_in_training_and_unbiased():
    """README: the LoRA dropout stays on during RL. In training mode each pass draws a new mask on the
    adapter's input (inverted dropout: the mean over many rows is the eval-mode output), in eval mode none;
    the same holds for the mixed-adapter batch."""
    model = TwoLayers().eval()
    lora.add_adapter(model, "d", r=4, alpha=8, dropout=0.5)
    with torch.no_grad():
        for p in lora.adapter_parameters(model, "d"):
            p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(5)) * 0.3)
    layer = model.q
    x = torch.randn(1, 16, generator=torch.Generator().manual_seed(6)).expand(20000, 16)
    expected = layer(x[:1])
    torch.manual_seed(0)
    layer.train()
    for mode in ({"d": 1.0}, (["d"], torch.zeros(20000, dtype=torch.long))):
        layer.mode = mode
        first, second = layer(x), layer(x)
        assert not torch.equal(first, second)  # a fresh mask each pass
        assert not torch.allclose(first[0], expected[0])
        delta = expected[0] - x[0] @ layer.weight.T  # the adapter's own term
        assert (first.mean(0) - expected[0]).abs().max() < 0.1 * delta.abs().max()  # unbiased
    layer.eval()
    layer.mode = {"d": 1.0}
    assert torch.equal(layer(x[:1]), expected)


def test_adapter_arguments_and_names_are_checked():
    """One-line errors that name the problem: a bad adapter name, r < 1, dropout outside [0, 1), targets
    that match nothing, an unknown adapter (listing the model's adapters, or none)."""
    model = TwoLayers()
    with pytest.raises(InputError, match="^unknown adapter 'z' \\(the model has: none\\)$"):
        lora.adapter_parameters(model, "z")
    for name in ("", "a.b", 3):
        with pytest.raises(InputError, match=f"^adapter name {name!r}: must be a non-empty string without '.'$"):
            lora.add_adapter(model, name)
    for r, dropout in ((0, 0.1), (2, 1.0), (2, 1.5), (2, -0.1)):
        with pytest.raises(InputError, match=f"^adapter x: need r >= 1 and 0 <= dropout < 1, got r={r}, dropout={dropout}$"):
            lora.add_adapter(model, "x", r=r, dropout=dropout)
    with pytest.raises(InputError, match="^adapter x: no nn.Linear matches target_modules \\['k'\\]$"):
        lora.add_adapter(model, "x", targets=["k"])
    lora.add_adapter(model, "a", r=2, dropout=0.0)
    lora.add_adapter(model, "b", r=2, dropout=0.0)
    with pytest.raises(InputError, match="^unknown adapter 'z' \\(the model has: a, b\\)$"):
        lora.set_adapter(model, "z")


def test_all_linear_targets_every_linear_but_lm_head():
    """PEFT's "all-linear" shorthand, in any case: every nn.Linear but lm_head."""
    for targets in ("all-linear", "ALL-Linear"):
        model = nn.Sequential()
        model.add_module("q", nn.Linear(4, 4))
        model.add_module("lm_head", nn.Linear(4, 4))
        lora.add_adapter(model, "a", r=2, targets=targets)
        assert [path for path, _ in lora._layers(model)] == ["q"]


def test_base_fingerprint_probes_first_64_entries_of_8_spread_parameters():
    """The fingerprint saved with an adapter: (sum, sum |x|) of the first 64 entries of ≤ 8 base
    parameters taken every len // 8 (at least every one), hand-computed on 9 and 17 parameters."""
    for count, picked in ((9, range(8)), (17, range(0, 16, 2)), (5, range(5))):
        model = nn.Sequential(*[nn.Linear(10, 10, bias=False) for _ in range(count)])
        with torch.no_grad():
            for i, layer in enumerate(model):
                layer.weight.copy_(torch.linspace(-1.0, 2.0, 100).view(10, 10) * (i + 1))
        lora.add_adapter(model, "a", r=2, targets=["0"])      # adapter parameters are not probed
        first64 = [(torch.linspace(-1.0, 2.0, 100) * (i + 1))[:64].double() for i in picked]
        expected = [[float(w.sum()), float(w.abs().sum())] for w in first64]
        assert lora.base_fingerprint(model)["probes"] == expected


def test_mixed_adapters_in_training_keep_device_dtype_and_layers_without_the_adapter():
    """Mixed-adapter batches (one adapter per row) in training mode: each row gets its own adapter's
    dropout rate; a layer the row's adapter does not wrap adds nothing and leaves that row untouched;
    everything stays on the model's device (meta here) and in its dtype (bfloat16); the row count is checked."""
    model = TwoLayers()
    lora.add_adapter(model, "a", r=2, alpha=4, dropout=0.5, targets=["q", "wo"])
    lora.add_adapter(model, "b", r=3, alpha=6, dropout=0.25, targets=["q"])
    with torch.no_grad():
        for name in ("a", "b"):
            for p in lora.adapter_parameters(model, name):
                p.normal_(0.0, 0.3)
    model.train()
    x = torch.randn(3, 24)
    with lora.mixed_adapters(model, ["a", "b"], [0, 1, 1]):
        out = model.wo(x)
        with pytest.raises(InputError, match="^mixed_adapters: row_adapter has 3 rows, the batch has 2$"):
            model.wo(x[:2].unsqueeze(1).expand(2, 5, 24))
    assert torch.equal(out[1:], x[1:] @ model.wo.weight.T)        # "b" is not on wo: rows 1, 2 are the base output
    half = model.to(torch.bfloat16)
    with lora.mixed_adapters(half, ["a", "b"], [0, 1, 1]):
        assert half(torch.randn(3, 16, dtype=torch.bfloat16)).dtype == torch.bfloat16
    meta = model.to("meta")
    with lora.mixed_adapters(meta, ["a", "b"], [0, 1, 1]):
        assert meta.q.mode[1].device.type == "meta"
        assert meta(torch.empty(3, 16, dtype=torch.bfloat16, device="meta")).device.type == "meta"
