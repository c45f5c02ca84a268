"""LoRA adapters for the EMORL policy: one adapter per objective on one shared base model (§4, §5.2).

A targeted nn.Linear computes W x + (alpha/r)·B A drop(x); A [r,in] ~ kaiming_uniform(a=√5), B [out,r] = 0, so
the adapted model equals the base at init. Named adapters share one base: set_adapter / adapters_disabled (the
KL reference policy, no second model copy); weighted_adapters (unmerged Σ_i w_i·delta_i); mixed_adapters (row b
uses its own adapter: one shared base matmul + x @ [A_1;..;A_K]^T masked to the row's block, @ [B_1..B_K]^T;
ensemble decoding, Eq. (2));
routed_adapters (per-token weights from a function of the module's input: HoE's routers, hoe.py);
merge / unmerge: parameter-level aggregation, Eq. (4): θ = θ0 + Σ_i w_i·(alpha/r)·B_i A_i (unmerge copies θ0 back).
Files use PEFT's layout (adapter_config.json + adapter_model.safetensors, keys
base_model.model.<module>.lora_{A,B}.weight): adapters move both ways between this code and peft.
convert_npz imports the adapters the public code saves (.npz of <module>_loraA/_loraB/_scaling) into that layout.

Deviations from the paper / public code:
- Modes are switched explicitly (set_adapter, context managers); .eval() never merges (loralib's pitfall).
- The safetensors metadata holds a cheap fingerprint of the base model; an adapter saved for another base
  model is refused. Files without one (e.g. from peft) load if every key and shape matches.
- The safetensors metadata also records the adapter's name, which is the objective it was trained for
  (peft ignores it); check_objective refuses an adapter given as another objective.
- PEFT options beyond plain LoRA (DoRA, rsLoRA, rank/alpha patterns, bias, modules_to_save...) are refused.
- model.state_dict() keeps the base keys unchanged and gains <module>.lora_{A,B}.<adapter> keys; while merged,
  .weight holds the merged weights (unmerge before saving the base).
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import re
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from files import InputError, load_safetensors, read_json, save_safetensors, write_json

DEFAULT_TARGETS = ("q", "k", "v", "o", "wi", "wi_0", "wi_1", "wo")  # never lm_head
FINGERPRINT_KEY = "emorl_base_fingerprint"
OBJECTIVE_KEY = "emorl_objective"  # safetensors metadata: the objective an adapter was trained for
UNSUPPORTED = ("use_dora", "use_rslora", "fan_in_fan_out", "bias", "lora_bias", "rank_pattern", "alpha_pattern",
               "modules_to_save", "layers_to_transform", "exclude_modules", "target_parameters", "trainable_token_indices")


class LoRALinear(nn.Linear):
    """nn.Linear with named low-rank adapters; shares (not copies) the wrapped layer's weight and bias."""

    def __init__(self, base: nn.Linear):
        nn.Module.__init__(self)
        self.in_features, self.out_features, self.training = base.in_features, base.out_features, base.training
        self.weight = base.weight
        self.register_parameter("bias", base.bias)
        self.lora_A, self.lora_B = nn.ParameterDict(), nn.ParameterDict()
        self.alpha, self.dropout_p = {}, {}
        self.mode = None      # None (base) | {name: weight} | (names, row_adapter LongTensor[B] or gate)
        self.unmerged = None  # copy of the base weight while merged

    def add(self, name, r, alpha, dropout):
        self.lora_A[name] = nn.Parameter(self.weight.new_empty(r, self.in_features))
        self.lora_B[name] = nn.Parameter(self.weight.new_zeros(self.out_features, r))
        nn.init.kaiming_uniform_(self.lora_A[name], a=math.sqrt(5))
        self.alpha[name], self.dropout_p[name] = alpha, dropout

    def scaling(self, name):
        return self.alpha[name] / self.lora_A[name].shape[0]

    def _concatenated(self, names, rows):
        """x @ [A_1;...;A_K]^T, masked to each row's own block, then @ [s_1 B_1 ... s_K B_K]^T = s_i B_i A_i x
        for every row at once: two matmuls and no per-row gather (ranks may differ; a missing adapter adds nothing).
        -> A [R,in], B [out,R], mask [N,R] (1 where column j belongs to row n's adapter)."""
        present = [(i, n) for i, n in enumerate(names) if n in self.lora_A]
        A = torch.cat([self.lora_A[n] for _, n in present])
        B = torch.cat([self.lora_B[n] * self.scaling(n) for _, n in present], 1)
        owner = torch.cat([torch.full((self.lora_A[n].shape[0],), i, device=rows.device) for i, n in present])
        return A, B, (rows[:, None] == owner).to(A.dtype)

    def forward(self, x):
        out = F.linear(x, self.weight, self.bias)
        if self.unmerged is not None or self.mode is None:  # merged weights already hold the deltas
            return out
        if isinstance(self.mode, dict):  # Eq. (4), unmerged: W x + Σ_i w_i (alpha/r) B_i A_i drop_i(x)
            for name, w in self.mode.items():
                if name in self.lora_A:
                    p = self.dropout_p[name]
                    h = (F.dropout(x, p, True) if self.training and p > 0 else x) @ self.lora_A[name].T
                    out = out + (w * self.scaling(name)) * (h @ self.lora_B[name].T)
            return out
        names, rows = self.mode
        if not any(n in self.lora_A for n in names):
            return out
        if callable(rows):  # HoE, Eq. (12): W x + Σ_i g(x)[..., i]·(alpha/r)·B_i A_i x, per-token weights (hoe.py)
            weights = rows(self, x)
            for i, name in enumerate(names):
                if name in self.lora_A:
                    h = x @ self.lora_A[name].T
                    out = out + (weights[..., i:i + 1] * self.scaling(name)) * (h @ self.lora_B[name].T)
            return out
        if rows.numel() != x.shape[0]:
            raise InputError(f"mixed_adapters: row_adapter has {rows.numel()} rows, the batch has {x.shape[0]}")
        A, B, mask = self._concatenated(names, rows)  # per call: cheap ([R,in]); a cache across calls cost peak RSS
        if self.training:  # each row gets its own adapter's dropout rate
            p = torch.tensor([self.dropout_p.get(n, 0.0) for n in names], device=x.device, dtype=x.dtype)
            keep = (1 - p[rows]).view(-1, *[1] * (x.dim() - 1))
            x = x * torch.bernoulli(keep.expand_as(x)) / keep
        mask = mask.view(x.shape[0], *[1] * (x.dim() - 2), -1)
        return out + F.linear(F.linear(x, A) * mask, B)


def _layers(model):
    return [(path, m) for path, m in model.named_modules() if isinstance(m, LoRALinear)]


def _targeted(model, targets):
    """The nn.Linear modules `targets` names, by PEFT's rule (check_target_module_exists): a string is a regex
    the whole module path must match ("all-linear": every nn.Linear but lm_head); a list entry names the
    whole path or a dotted suffix of it ("q", "SelfAttention.q", "decoder.block.0.layer.0.SelfAttention.q")."""
    if isinstance(targets, str) and targets.lower() != "all-linear":
        try:
            pattern = re.compile(targets)
        except re.error as e:
            raise InputError(f"target_modules {targets!r} is not a valid regular expression ({e})") from None
    elif not isinstance(targets, str) and not all(isinstance(t, str) and t for t in targets):
        raise InputError(f"target_modules {targets!r}: expected module names (strings)")

    def match(path):
        if isinstance(targets, str):
            return path != "lm_head" if targets.lower() == "all-linear" else pattern.fullmatch(path)
        return path in targets or any(path.endswith("." + target) for target in targets)
    return [(path, m) for path, m in model.named_modules() if isinstance(m, nn.Linear) and path and match(path)]


def add_adapter(model, name, r=8, alpha=32, dropout=0.05, targets=DEFAULT_TARGETS):
    """Add (or replace) adapter `name` on every nn.Linear matching `targets`; freeze the rest; make it active."""
    if not isinstance(name, str) or not name or "." in name:
        raise InputError(f"adapter name {name!r}: must be a non-empty string without '.'")
    if r < 1 or not 0 <= dropout < 1:
        raise InputError(f"adapter {name}: need r >= 1 and 0 <= dropout < 1, got r={r}, dropout={dropout}")
    for _, m in _layers(model):  # replacing: drop the old copy everywhere first
        if name in m.lora_A:
            m.lora_A.pop(name), m.lora_B.pop(name)
    if not (found := _targeted(model, targets)):
        raise InputError(f"adapter {name}: no nn.Linear matches target_modules {targets!r}")
    for path, module in found:
        if not isinstance(module, LoRALinear):
            parent, _, child = path.rpartition(".")
            setattr(model.get_submodule(parent), child, module := LoRALinear(module))
        module.add(name, r, alpha, dropout)
    adapter = {id(p) for _, m in _layers(model) for p in (*m.lora_A.values(), *m.lora_B.values())}
    for p in model.parameters():
        p.requires_grad_(id(p) in adapter)
    set_adapter(model, name)


def adapter_names(model) -> list[str]:
    return list(dict.fromkeys(n for _, m in _layers(model) for n in m.lora_A))


def _check(model, names):
    have = adapter_names(model)
    for n in names:
        if n not in have:
            raise InputError(f"unknown adapter {n!r} (the model has: {', '.join(have) or 'none'})")


def adapter_parameters(model, name) -> list[nn.Parameter]:
    _check(model, [name])
    return [p for _, m in _layers(model) if name in m.lora_A for p in (m.lora_A[name], m.lora_B[name])]


def set_adapter(model, name):
    """Make `name` the only active adapter; None disables all adapters (the base model)."""
    _check(model, [] if name is None else [name])
    for _, m in _layers(model):
        m.mode = None if name is None else {name: 1.0}


@contextmanager
def _mode(model, mode):
    previous = [(m, m.mode) for _, m in _layers(model)]
    for m, _ in previous:
        m.mode = mode
    try:
        yield model
    finally:
        for m, old in previous:
            m.mode = old


def adapters_disabled(model):
    """Base model inside the block (reference policy for the KL term); the previous state comes back after."""
    return _mode(model, None)


def weighted_adapters(model, weights: dict[str, float]):
    """Unmerged weighted forward: W x + Σ_i w_i·(alpha/r)·B_i A_i x."""
    _check(model, weights)
    return _mode(model, dict(weights))


def mixed_adapters(model, names, row_adapter):
    """Row b of every batch uses adapter names[row_adapter[b]] (first dim of each Linear input = batch)."""
    _check(model, names)
    rows = torch.as_tensor(row_adapter, dtype=torch.long)
    if rows.dim() != 1 or (rows.numel() and not 0 <= int(rows.min()) <= int(rows.max()) < len(names)):
        raise InputError(f"mixed_adapters: row_adapter must be a 1-D index into {len(names)} adapters")
    return _mode(model, (list(names), rows.to(next(model.parameters()).device)))


def routed_adapters(model, names, gate):
    """Input-dependent weights (HoE's routers, hoe.py): each adapted module computes
    W x + Σ_i g[..., i]·(alpha/r)·B_i A_i x with g = gate(module, x) -> [..., len(names)]; no dropout (frozen experts)."""
    _check(model, names)
    if not callable(gate):
        raise InputError("routed_adapters: gate must be a function (module, x) -> weights")
    return _mode(model, (list(names), gate))


def adapter_major_rows(num_adapters, rows_per_adapter) -> torch.Tensor:
    return torch.arange(num_adapters).repeat_interleave(rows_per_adapter)


@torch.no_grad()
def merge(model, weights: dict[str, float]):
    """Eq. (4): W ← W0 + Σ_i w_i·(alpha/r)·B_i A_i; adapters are bypassed until unmerge()."""
    _check(model, weights)
    unmerge(model)
    for _, m in _layers(model):
        m.unmerged = m.weight.detach().clone()
        for name, w in weights.items():
            if name in m.lora_A:
                m.weight.add_((w * m.scaling(name)) * (m.lora_B[name] @ m.lora_A[name]))


@torch.no_grad()
def unmerge(model):
    for _, m in _layers(model):
        if m.unmerged is not None:
            m.weight.copy_(m.unmerged)
            m.unmerged = None


@contextmanager
def merged(model, weights: dict[str, float]):
    """merge(model, weights) inside the block (no gradient is taken there), unmerge after, even on error."""
    merge(model, weights)
    try:
        yield model
    finally:
        unmerge(model)


def base_fingerprint(model) -> dict:
    """Names + shapes of the base parameters and (sum, sum|x|) of the first 64 entries of ≤ 8 of them."""
    original = {f"{path}.weight": m.unmerged for path, m in _layers(model) if m.unmerged is not None}
    base = [(n, original.get(n, p)) for n, p in model.named_parameters() if ".lora_A." not in n and ".lora_B." not in n]
    shapes = hashlib.sha256(repr([(n, tuple(p.shape)) for n, p in base]).encode()).hexdigest()[:16]
    probes = [p.detach().flatten()[:64].double() for _, p in base[:: max(1, len(base) // 8)][:8]]
    return {"shapes": shapes, "probes": [[float(x.sum()), float(x.abs().sum())] for x in probes]}


def _same_base(saved: str, ours: dict):  # tolerant to dtype round-off (bf16 <-> fp32), not to another model
    try:
        saved = json.loads(saved)
        return saved["shapes"] == ours["shapes"] and len(saved["probes"]) == len(ours["probes"]) and all(
            abs(a - c) <= 0.02 * max(b, d) + 1e-12 for (a, b), (c, d) in zip(saved["probes"], ours["probes"]))
    except (ValueError, KeyError, TypeError):
        return False  # unreadable fingerprint: refuse rather than guess


def save_adapter(model, name, directory, base_model_name_or_path=""):
    """Write adapter `name` in PEFT's layout (atomic files); `name`, the objective it was trained for,
    goes into the safetensors metadata (check_objective)."""
    _check(model, [name])
    layers = [(path, m) for path, m in _layers(model) if name in m.lora_A]
    tensors = {f"base_model.model.{path}.lora_{ab}.weight": getattr(m, f"lora_{ab}")[name]
               for path, m in layers for ab in "AB"}
    targets = sorted({path.rsplit(".", 1)[-1] for path, _ in layers})
    if [p for p, _ in _targeted(model, targets)] != [p for p, _ in layers]:
        targets = "|".join(re.escape(path) for path, _ in layers)  # exact module set as a full-match regex
    m = layers[0][1]
    config = dict(peft_type="LORA", task_type="SEQ_2_SEQ_LM", base_model_name_or_path=base_model_name_or_path,
                  r=m.lora_A[name].shape[0], lora_alpha=m.alpha[name], lora_dropout=m.dropout_p[name],
                  target_modules=targets, bias="none", fan_in_fan_out=False, inference_mode=True, init_lora_weights=True,
                  use_rslora=False, use_dora=False, modules_to_save=None, rank_pattern={}, alpha_pattern={})
    os.makedirs(directory, exist_ok=True)
    metadata = {"format": "pt", FINGERPRINT_KEY: json.dumps(base_fingerprint(model)), OBJECTIVE_KEY: name}
    save_safetensors(tensors, os.path.join(directory, "adapter_model.safetensors"), metadata)
    write_json(os.path.join(directory, "adapter_config.json"), config)


def load_adapter(model, directory, name) -> str:
    """Strictly load a PEFT-layout LoRA adapter from `directory` as adapter `name` (made active)."""
    from safetensors import safe_open

    config_path = os.path.join(directory, "adapter_config.json")
    file = os.path.join(directory, "adapter_model.safetensors")
    cfg = read_json(config_path)
    if not isinstance(cfg, dict) or cfg.get("peft_type") != "LORA":
        raise InputError(f"{config_path}: not a LoRA adapter config (peft_type must be LORA)")
    for key in UNSUPPORTED:
        if cfg.get(key) not in (None, False, {}, [], "none"):
            raise InputError(f"{config_path}: unsupported LoRA option {key}={cfg[key]!r}")
    r, alpha, dropout, targets = (cfg.get(k) for k in ("r", "lora_alpha", "lora_dropout", "target_modules"))
    if not (isinstance(r, int) and r >= 1 and isinstance(alpha, (int, float)) and targets and isinstance(targets, (str, list))):
        raise InputError(f"{config_path}: need integer r >= 1, numeric lora_alpha and target_modules; "
                         f"got r={r!r} lora_alpha={alpha!r} target_modules={targets!r}")
    tensors = load_safetensors(file)
    with safe_open(file, "pt") as f:
        saved = (f.metadata() or {}).get(FINGERPRINT_KEY)
    if saved is not None and not _same_base(saved, base_fingerprint(model)):
        raise InputError(f"{file}: adapter was saved for another base model (base fingerprint differs)")
    expected = {}
    for path, m in _targeted(model, targets):
        expected[f"base_model.model.{path}.lora_A.weight"] = (r, m.in_features)
        expected[f"base_model.model.{path}.lora_B.weight"] = (m.out_features, r)
    missing, unexpected = [k for k in expected if k not in tensors], [k for k in tensors if k not in expected]
    if missing or unexpected:
        problem = f"missing key {missing[0]}" if missing else f"unexpected key {unexpected[0]} (not a target module here)"
        raise InputError(f"{file}: {problem}")
    for key, value in tensors.items():
        if tuple(value.shape) != expected[key]:
            raise InputError(f"{file}: key {key} has shape {tuple(value.shape)}, expected {expected[key]} "
                             f"(r={r} in {config_path})")
    add_adapter(model, name, r, alpha, dropout or 0.0, targets)
    with torch.no_grad():
        for key, param in zip(expected, adapter_parameters(model, name)):  # both in module order, A then B
            param.copy_(tensors[key])
    return name


def saved_objective(directory) -> str | None:
    """The objective recorded in an adapter's metadata by save_adapter; None for an adapter saved
    without one (by peft, by convert_npz, by emorl before it recorded objectives)."""
    from safetensors import SafetensorError, safe_open

    file = os.path.join(directory, "adapter_model.safetensors")
    if not os.path.isfile(file):
        raise InputError(f"{file}: file not found")
    try:
        with safe_open(file, "pt") as f:
            return (f.metadata() or {}).get(OBJECTIVE_KEY)
    except (SafetensorError, OSError, ValueError) as e:
        raise InputError(f"{file}: corrupt or truncated safetensors file ({e})") from None


def check_objective(directory, objective: str, force: bool = False) -> str | None:
    """Refuse the adapter in `directory` given as `objective` when it records another objective
    (force: use it anyway). -> a warning line for the user (forced, or no objective recorded), or None."""
    recorded = saved_objective(directory)
    if recorded == objective:
        return None
    if recorded is None:
        return f"warning: {directory} records no objective (an imported adapter?): used as '{objective}'"
    if not force:
        raise InputError(f"{directory}: adapter trained for '{recorded}', given as '{objective}' "
                         "(--force uses it anyway)")
    return f"warning: {directory}: adapter trained for '{recorded}', used as '{objective}' (--force)"


# ----------------------------------------------------------------------------- the authors' .npz adapters
NPZ_PREFIX, NPZ_PARTS = "base_model.model.", ("loraA", "loraB", "scaling")


def convert_npz(src, directory, base_model_name_or_path="google-t5/t5-base") -> list[str]:
    """An adapter saved by the public code's save_lora (el_training.py:277, 332-334; utils_lora.py:38-61)
    -> PEFT's layout in `directory`. The .npz holds per LoRA-wrapped Linear <M>: base_model.model.<M>_loraA
    [r, in], _loraB [out, r], _scaling (0-d, = alpha/r); written as base_model.model.<M>.lora_{A,B}.weight
    with r, lora_alpha = scaling·r, lora_dropout 0.05 (their LoraConfig) and target_modules = the last
    names of the modules. When `directory` is runs/<objective>-<label>/adapter, a summary.json beside it
    (consumption unknown, `imported_from`) lets search and evaluate find it as a finished run.
    Returns the paths written."""
    import zipfile

    import numpy as np

    try:
        archive = np.load(src, allow_pickle=False)
    except FileNotFoundError:
        raise InputError(f"{src}: file not found") from None
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise InputError(f"{src}: not a readable .npz archive ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise InputError(f"{src}: a single .npy array, not an .npz archive of LoRA arrays")
    modules: dict[str, dict] = {}
    with archive:
        for key in archive.files:
            stem, _, part = key.rpartition("_")
            if not stem.startswith(NPZ_PREFIX) or len(stem) == len(NPZ_PREFIX) or part not in NPZ_PARTS:
                raise InputError(f"{src}: unexpected key {key!r} (expected {NPZ_PREFIX}<module>_loraA / _loraB / _scaling)")
            try:
                modules.setdefault(stem, {})[part] = archive[key]
            except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:
                raise InputError(f"{src}: array {key!r} cannot be read ({str(e).splitlines()[0]})") from None
    if not modules:
        raise InputError(f"{src}: no LoRA arrays in this .npz")
    tensors, ranks, scalings = {}, set(), set()
    for stem, parts in modules.items():
        if missing := [p for p in NPZ_PARTS if p not in parts]:
            raise InputError(f"{src}: {stem}_{missing[0]} is missing")
        A, B, scaling = parts["loraA"], parts["loraB"], parts["scaling"]
        if A.ndim != 2 or B.ndim != 2 or A.shape[0] != B.shape[1] or A.shape[0] < 1 or scaling.size != 1 or scaling.ndim > 1:
            raise InputError(f"{src}: {stem}: expected loraA [r, in], loraB [out, r] and a 0-d scaling, got shapes "
                             f"{A.shape}, {B.shape}, {scaling.shape}")
        for part, value in (("loraA", A), ("loraB", B), ("scaling", scaling)):
            if value.dtype.kind not in "fiu" or not np.isfinite(value).all():
                raise InputError(f"{src}: {stem}_{part} must hold finite numbers (dtype {value.dtype})")
        ranks.add(A.shape[0])
        scalings.add(float(scaling.reshape(())))
        tensors[f"{stem}.lora_A.weight"] = torch.tensor(A, dtype=torch.float32)
        tensors[f"{stem}.lora_B.weight"] = torch.tensor(B, dtype=torch.float32)
    if len(ranks) > 1 or len(scalings) > 1:
        raise InputError(f"{src}: ranks {sorted(ranks)} / scalings {sorted(scalings)} differ between modules "
                         "(one rank and one scaling are supported)")
    r, scaling = ranks.pop(), scalings.pop()
    alpha = scaling * r
    config = dict(peft_type="LORA", task_type="SEQ_2_SEQ_LM", base_model_name_or_path=base_model_name_or_path,
                  r=r, lora_alpha=int(alpha) if float(alpha).is_integer() else alpha, lora_dropout=0.05,
                  target_modules=sorted({stem.rsplit(".", 1)[-1] for stem in modules}), bias="none",
                  fan_in_fan_out=False, inference_mode=True, init_lora_weights=True, use_rslora=False, use_dora=False,
                  modules_to_save=None, rank_pattern={}, alpha_pattern={})
    os.makedirs(directory, exist_ok=True)
    written = [os.path.join(directory, "adapter_model.safetensors"), os.path.join(directory, "adapter_config.json")]
    save_safetensors(tensors, written[0], {"format": "pt"})
    write_json(written[1], config)
    run_dir = os.path.dirname(os.path.abspath(directory))
    method, _, label = os.path.basename(run_dir).rpartition("-")
    summary = os.path.join(run_dir, "summary.json")
    if os.path.basename(os.path.normpath(directory)) == "adapter" and method and label and not os.path.exists(summary):
        write_json(summary, {"objective": method, "seed": label, "imported_from": os.path.basename(src),
                             "steps": None, "data_points": None, "wall_seconds": None})
        written.append(summary)
    return written
