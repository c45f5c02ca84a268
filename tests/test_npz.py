"""`convert` of the authors' LoRA .npz (save_lora: base_model.model.<module>_loraA [r,in], _loraB [out,r],
_scaling 0-d) into a PEFT-layout adapter: merged weights equal W + scaling·B A computed by hand, through
lora.py and through peft (the oracle); a malformed .npz is one line and exit 2."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import lora
import t5
from files import InputError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TARGETS = ("q", "k", "v", "o", "wi", "wo")  # what the authors' utils_lora wraps on T5 v1.0
CONFIG = dict(vocab_size=64, d_model=16, d_kv=4, d_ff=24, num_layers=2, num_heads=2, dropout_rate=0.0)


def authors_npz(path, model, r=8, scaling=4.0, seed=0):
    """An .npz exactly as save_lora writes it, for every targeted Linear of `model`."""
    rng = np.random.default_rng(seed)
    arrays = {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and name.rsplit(".", 1)[-1] in TARGETS:
            arrays[f"base_model.model.{name}_loraA"] = rng.normal(0, 0.3, (r, module.in_features)).astype(np.float32)
            arrays[f"base_model.model.{name}_loraB"] = rng.normal(0, 0.3, (module.out_features, r)).astype(np.float32)
            arrays[f"base_model.model.{name}_scaling"] = np.float64(scaling)  # 0-d, as scaling["default"]
    np.savez(path, **arrays)
    return arrays


def test_converted_adapter_merges_to_w_plus_scaling_b_a(tmp_path):
    torch.manual_seed(0)
    model = t5.T5ForConditionalGeneration(t5.T5Config(**CONFIG)).eval()
    arrays = authors_npz(tmp_path / "lora_reflection_18219.npz", model, r=8, scaling=4.0)
    written = lora.convert_npz(str(tmp_path / "lora_reflection_18219.npz"), str(tmp_path / "reflection-authors" / "adapter"))
    config = json.loads((tmp_path / "reflection-authors" / "adapter" / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], sorted(config["target_modules"])) == (8, 32, sorted(TARGETS))
    summary = json.loads((tmp_path / "reflection-authors" / "summary.json").read_text())
    assert summary["objective"] == "reflection" and summary["data_points"] is None and len(written) == 3
    original = {name: m.weight.detach().clone() for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    lora.load_adapter(model, str(tmp_path / "reflection-authors" / "adapter"), "reflection")
    lora.merge(model, {"reflection": 1.0})
    checked = 0
    for name, m in lora._layers(model):
        A = torch.from_numpy(arrays[f"base_model.model.{name}_loraA"])
        B = torch.from_numpy(arrays[f"base_model.model.{name}_loraB"])
        torch.testing.assert_close(m.weight, original[name] + 4.0 * B @ A)  # by hand, as el_aggregation.py:52-56
        checked += 1
    assert checked == len(arrays) // 3 == 2 * 6 + 2 * 10  # encoder 4+2, decoder 4+4+2 per block


def test_converted_adapter_loads_in_peft(tmp_path):
    from peft import PeftModel
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(0)
    hf = T5ForConditionalGeneration(T5Config(**CONFIG, num_decoder_layers=2, decoder_start_token_id=0)).eval()
    arrays = authors_npz(tmp_path / "a.npz", hf, r=4, scaling=2.5)
    lora.convert_npz(str(tmp_path / "a.npz"), str(tmp_path / "adapter"))
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["lora_alpha"] == 10
    original = {k: v.clone() for k, v in hf.state_dict().items()}
    merged = PeftModel.from_pretrained(hf, str(tmp_path / "adapter")).merge_and_unload().state_dict()
    for key, A in arrays.items():
        if key.endswith("_loraA"):
            module = key[len("base_model.model."):-len("_loraA")]
            B = torch.from_numpy(arrays[key[:-len("_loraA")] + "_loraB"])
            torch.testing.assert_close(merged[module + ".weight"], original[module + ".weight"] + 2.5 * B @ torch.from_numpy(A))


def write(path, **arrays):
    np.savez(path, **arrays)
    return str(path)


@pytest.mark.parametrize("case, needle", [
    ("not-zip", "not a readable .npz"), ("pickled", "cannot be read"), ("bad-key", "unexpected key"),
    ("missing-part", "_loraB is missing"), ("bad-shape", "expected loraA"), ("empty", "no LoRA arrays"),
    ("nan", "finite"), ("two-ranks", "ranks"), ("npy", "single .npy")])
def test_malformed_npz_is_one_line_error(tmp_path, case, needle):
    A, B, s = np.ones((2, 4), np.float32), np.ones((4, 2), np.float32), np.float64(4.0)
    m = "base_model.model.encoder.block.0.layer.0.SelfAttention.q"
    src = tmp_path / "x.npz"
    if case == "not-zip":
        src.write_bytes(b"PK\x03\x04 this is not a zip archive")
    elif case == "pickled":
        np.savez(src, **{f"{m}_loraA": np.array([{"a": 1}], dtype=object)})
    elif case == "bad-key":
        write(src, weights=A)
    elif case == "missing-part":
        write(src, **{f"{m}_loraA": A, f"{m}_scaling": s})
    elif case == "bad-shape":
        write(src, **{f"{m}_loraA": A, f"{m}_loraB": np.ones((4, 3), np.float32), f"{m}_scaling": s})
    elif case == "empty":
        write(src)
    elif case == "nan":
        write(src, **{f"{m}_loraA": A * np.nan, f"{m}_loraB": B, f"{m}_scaling": s})
    elif case == "two-ranks":
        k = m[:-1] + "k"
        write(src, **{f"{m}_loraA": A, f"{m}_loraB": B, f"{m}_scaling": s,
                      f"{k}_loraA": np.ones((3, 4), np.float32), f"{k}_loraB": np.ones((4, 3), np.float32), f"{k}_scaling": s})
    elif case == "npy":
        src = tmp_path / "x.npy"
        np.save(src, A)
        src = tmp_path / "x.npz"
        (tmp_path / "x.npy").rename(src)
    with pytest.raises(InputError, match=needle) as e:
        lora.convert_npz(str(src), str(tmp_path / "out"))
    assert "\n" not in str(e.value)
    if case == "pickled":  # the command line: one line, exit 2
        result = subprocess.run([sys.executable, os.path.join(ROOT, "emorl.py"), "convert", str(src), str(tmp_path / "o")],
                                capture_output=True, text=True, timeout=120)
        assert result.returncode == 2 and result.stderr.count("\n") == 1 and result.stderr.startswith("error: ")
        assert "Traceback" not in result.stderr
