"""T5 encoder-decoder in plain PyTorch: the policy of EMORL (paper §4, §5.2), plus the strict,
atomic file helpers every loader in this project shares.

(Model, tokenizer and Hugging Face loader follow below the file helpers.)
"""
from __future__ import annotations

import json
import os
import tempfile

import torch
from torch import nn


# ----------------------------------------------------------------------------- files
class InputError(ValueError):
    """Something the user handed us is wrong (file, key, shape, value). The command line prints
    the message on one line and exits with status 2."""


def read_json(path):
    """Parse a JSON file; a missing or malformed file is an InputError naming it."""
    if not os.path.isfile(path):
        raise InputError(f"{path}: file not found")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InputError(f"{path}: malformed JSON ({e})") from None


def atomic_write(path, data: bytes | str):
    """Write to a temporary file in the same folder, then rename: a kill never leaves half a file."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-" + os.path.basename(path))
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode("utf-8") if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def write_json(path, obj):
    atomic_write(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def load_safetensors(path) -> dict[str, torch.Tensor]:
    """Read every tensor of a .safetensors file (or of all *.safetensors files in a folder)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if os.path.isdir(path):
        files = sorted(os.path.join(path, n) for n in os.listdir(path) if n.endswith(".safetensors"))
        if not files:
            raise InputError(f"{path}: no *.safetensors file in this folder")
    elif os.path.isfile(path):
        files = [path]
    else:
        raise InputError(f"{path}: file not found")
    tensors = {}
    for file in files:
        try:
            tensors.update(load_file(file))
        except (SafetensorError, OSError, ValueError) as e:
            raise InputError(f"{file}: corrupt or truncated safetensors file ({e})") from None
    return tensors


def save_safetensors(tensors: dict[str, torch.Tensor], path, metadata: dict[str, str] | None = None):
    from safetensors.torch import save

    data = save({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, metadata=metadata)
    atomic_write(path, data)


def load_strict(module: nn.Module, tensors: dict[str, torch.Tensor], source: str):
    """Copy `tensors` (already renamed to the module's own keys) into `module`.

    Every key is accounted for: a missing, unexpected or mis-shaped tensor is an InputError that names
    the key and the file, never a silent partial load."""
    expected = module.state_dict()
    missing = [k for k in expected if k not in tensors]
    unexpected = [k for k in tensors if k not in expected]
    if missing:
        raise InputError(f"{source}: missing key {missing[0]}" + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    if unexpected:
        raise InputError(f"{source}: unexpected key {unexpected[0]}" + (f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else ""))
    for key, value in tensors.items():
        if tuple(value.shape) != tuple(expected[key].shape):
            raise InputError(f"{source}: key {key} has shape {tuple(value.shape)}, the model expects {tuple(expected[key].shape)}")
    module.load_state_dict({k: v.to(expected[k].dtype) for k, v in tensors.items()}, strict=True)
