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
from safetensors import safe_open

import files
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


# ----------------------------------------------------------------------------- convert_npz
def test_convert_npz_writes_peft_files_and_a_run_summary(tmp_path):
    """`convert`: the authors' save_lora .npz -> adapter_model.safetensors (float32, PEFT's "format": "pt"
    metadata) and the whole PEFT adapter_config.json (their LoraConfig: r, alpha = scaling·r, dropout 0.05,
    target_modules = last names); under runs/<objective>-<label>/adapter also a summary.json (the label after
    the last dash, consumption unknown); converting again into the same folder is fine."""
    import numpy as np
    from safetensors import safe_open
    m = "base_model.model.encoder.block.0.layer.0.SelfAttention"
    A, B = np.arange(8, dtype=np.float64).reshape(2, 4) / 7, np.arange(6, dtype=np.float64).reshape(3, 2) / 5
    src = tmp_path / "their.npz"
    np.savez(src, **{f"{m}.q_loraA": A, f"{m}.q_loraB": B, f"{m}.q_scaling": np.float64(8.0),
                     f"{m}.wo_loraA": A, f"{m}.wo_loraB": B, f"{m}.wo_scaling": np.array([8.0])})
    directory = tmp_path / "runs" / "four-objectives-authors" / "adapter"
    written = lora.convert_npz(str(src), str(directory), "t5-small")
    summary = tmp_path / "runs" / "four-objectives-authors" / "summary.json"
    assert written == [str(directory / "adapter_model.safetensors"), str(directory / "adapter_config.json"), str(summary)]
    assert files.read_json(str(directory / "adapter_config.json")) == dict(
        peft_type="LORA", task_type="SEQ_2_SEQ_LM", base_model_name_or_path="t5-small", r=2, lora_alpha=16,
        lora_dropout=0.05, target_modules=["q", "wo"], bias="none", fan_in_fan_out=False, inference_mode=True,
        init_lora_weights=True, use_rslora=False, use_dora=False, modules_to_save=None, rank_pattern={}, alpha_pattern={})
    assert files.read_json(str(summary)) == {"objective": "four-objectives", "seed": "authors", "imported_from": "their.npz",
                                             "steps": None, "data_points": None, "wall_seconds": None}
    with safe_open(str(directory / "adapter_model.safetensors"), "pt") as f:
        assert f.metadata() == {"format": "pt"}
        a, b = f.get_tensor(f"{m}.wo.lora_A.weight"), f.get_tensor(f"{m}.wo.lora_B.weight")
    assert a.dtype == b.dtype == torch.float32
    assert torch.equal(a, torch.tensor(A, dtype=torch.float32)) and torch.equal(b, torch.tensor(B, dtype=torch.float32))
    assert type(files.read_json(str(directory / "adapter_config.json"))["lora_alpha"]) is int
    np.savez(src, **{f"{m}.q_loraA": A, f"{m}.q_loraB": B, f"{m}.q_scaling": np.float64(2.25)})
    assert len(lora.convert_npz(str(src), str(directory))) == 2       # same folder again; summary.json kept
    assert files.read_json(str(directory / "adapter_config.json"))["lora_alpha"] == 4.5
    assert files.read_json(str(directory / "adapter_config.json"))["base_model_name_or_path"] == "google-t5/t5-base"
    assert lora.convert_npz(str(src), str(tmp_path / "elsewhere")) == [str(tmp_path / "elsewhere" / "adapter_model.safetensors"),
                                                                       str(tmp_path / "elsewhere" / "adapter_config.json")]
    assert len(lora.convert_npz(str(src), str(tmp_path / "nolabel" / "adapter"))) == 2    # no <objective>-<label>
    np.savez(src, **{f"{m}.q_loraA": A[:1], f"{m}.q_loraB": B[:, :1], f"{m}.q_scaling": np.float64(2.0)})
    lora.convert_npz(str(src), str(tmp_path / "rank1"))                                   # rank 1 is a rank
    assert files.read_json(str(tmp_path / "rank1" / "adapter_config.json"))["r"] == 1


@pytest.mark.parametrize("arrays, message", [
    ({"x_loraA": "A"}, "unexpected key 'x_loraA' (expected base_model.model.<module>_loraA / _loraB / _scaling)"),
    ({"base_model.model._loraA": "A"}, "unexpected key 'base_model.model._loraA'"),
    ({"base_model.model.q_lorab": "A"}, "unexpected key 'base_model.model.q_lorab'"),
    ({"base_model.model.q_loraA": "A", "base_model.model.q_scaling": "s"}, "base_model.model.q_loraB is missing"),
    ({"base_model.model.q_loraA": "A", "base_model.model.q_loraB": "A", "base_model.model.q_scaling": "s"},
     "base_model.model.q: expected loraA [r, in], loraB [out, r] and a 0-d scaling, got shapes (2, 4), (2, 4), ()"),
    ({"base_model.model.q_loraA": "A1", "base_model.model.q_loraB": "B1", "base_model.model.q_scaling": "s"},
     "expected loraA [r, in], loraB [out, r] and a 0-d scaling, got shapes (2,), (4, 2), ()"),
    ({"base_model.model.q_loraA": "An", "base_model.model.q_loraB": "B", "base_model.model.q_scaling": "s"},
     "base_model.model.q_loraA must hold finite numbers (dtype float64)"),
    ({"base_model.model.q_loraA": "A", "base_model.model.q_loraB": "B", "base_model.model.q_scaling": "sn"},
     "base_model.model.q_scaling must hold finite numbers (dtype float64)"),
    ({"base_model.model.q_loraA": "Ao"}, "array 'base_model.model.q_loraA' cannot be read "
     "(Object arrays cannot be loaded when allow_pickle=False)"),
    ({"base_model.model.q_loraA": "A0", "base_model.model.q_loraB": "B0", "base_model.model.q_scaling": "s"},
     "got shapes (0, 4), (4, 0), ()"),
    ({"base_model.model.q_loraA": "A", "base_model.model.q_loraB": "B", "base_model.model.q_scaling": "s2"},
     "got shapes (2, 4), (4, 2), (2,)"),
    ({"base_model.model.q_loraA": "A", "base_model.model.q_loraB": "B", "base_model.model.q_scaling": "s11"},
     "got shapes (2, 4), (4, 2), (1, 1)"),
    ({"base_model.model.q_loraA": "A", "base_model.model.q_loraB": "Bs", "base_model.model.q_scaling": "s"},
     "base_model.model.q_loraB must hold finite numbers (dtype <U1)"),
    ({"base_model.model.q_loraA": "A", "base_model.model.q_loraB": "B", "base_model.model.q_scaling": "s",
      "base_model.model.k_loraA": "A", "base_model.model.k_loraB": "B", "base_model.model.k_scaling": "s3"},
     "ranks [2] / scalings [3.0, 4.0] differ between modules (one rank and one scaling are supported)"),
])
def test_convert_npz_errors_name_the_array(tmp_path, arrays, message):
    import numpy as np
    values = {"A": np.ones((2, 4)), "B": np.ones((4, 2)), "A1": np.ones(2), "An": np.full((2, 4), np.nan), "sn": np.float64(np.inf), "Ao": np.array([{}], dtype=object), "B1": np.ones((4, 2)), "A0": np.ones((0, 4)),
              "B0": np.ones((4, 0)), "s": np.float64(4.0), "s2": np.ones(2), "s11": np.ones((1, 1)), "s3": np.float64(3.0),
              "Bs": np.full((4, 2), "x")}
    np.savez(tmp_path / "x.npz", **{key: values[v] for key, v in arrays.items()})
    with pytest.raises(InputError) as error:
        lora.convert_npz(str(tmp_path / "x.npz"), str(tmp_path / "out"))
    assert str(error.value) == f"{tmp_path / 'x.npz'}: {message}" or (
        str(error.value).startswith(f"{tmp_path / 'x.npz'}: ") and message in str(error.value))


def test_convert_npz_unreadable_archive_messages(tmp_path, monkeypatch):
    """A load error is one line: its first line, or its type when it has no text."""
    import numpy as np
    src = tmp_path / "x.npz"
    src.write_bytes(b"PK\x03\x04 this is not a zip archive")
    with pytest.raises(InputError, match=r"^.*x\.npz: not a readable \.npz archive \(File is not a zip file\)$"):
        lora.convert_npz(str(src), str(tmp_path / "out"))
    with pytest.raises(InputError, match=r"^.*missing\.npz: file not found$"):
        lora.convert_npz(str(tmp_path / "missing.npz"), str(tmp_path / "out"))
    monkeypatch.setattr(np, "load", lambda *args, **kwargs: (_ for _ in ()).throw(ValueError()))
    with pytest.raises(InputError, match=r"^.*x\.npz: not a readable \.npz archive \(ValueError\)$"):
        lora.convert_npz(str(src), str(tmp_path / "out"))
