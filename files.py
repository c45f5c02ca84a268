"""Strict, atomic file helpers shared by every module: one error type for bad input, JSON and
safetensors read/write that never leave half a file, and the strict state-dict copy every loader uses.

Why a module of its own: t5.py, bert.py, gpt2.py, lora.py, rewards.py, scst.py, search.py and emorl.py
all read or write checkpoints and results the same way; kept in t5.py these helpers made the model file
longer than one sitting. Nothing here knows about the paper; the one project convention kept here is
the run folder layout, runs/<method>-<seed>/ (`run_folder`), that `train` writes and `search`, `generate`
and `evaluate` read back (`find_runs`, `newest_adapters`): one place, so the writer and the readers agree.

The command line's flag types live here too (`Parser`, `integer`, `number`, `device`, ...): they hold argparse
to the same one-line error contract, and emorl.py stayed one sitting long without them. No torch import at
load time (`emorl.py --help` stays instant).

Conventions (README "Reliability"): bad input raises `InputError` with a message that names the file,
key or value; `emorl.main` prints it on one line and exits with status 2. Every result file is written by
`atomic_write` (temporary file in the same folder + fsync + rename), so a kill never leaves half a file,
and `remove_stale_temporaries` deletes what a kill between write and rename left behind.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import sys
import tempfile
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # annotations only: torch is imported where tensors are read or written
    import torch
    from torch import nn


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


TEMPORARY_PREFIX = ".tmp-"  # atomic_write's temporary files: .tmp-<name><random>, renamed to <name> when whole


def atomic_write(path, data: bytes | str):
    """Write to a temporary file in the same folder, then rename: a kill never leaves half a file."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=TEMPORARY_PREFIX + os.path.basename(path))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the file the mode open() would have
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


def remove_stale_temporaries(folder, names=None) -> list[str]:
    """Delete the temporary files a kill between write and rename left in `folder`: every .tmp-* file,
    or only those of the files named in `names` when the folder is shared (e.g. the working directory).
    Call it at start-up of the run that owns these files. Returns the removed paths."""
    if not os.path.isdir(folder):
        return []
    prefixes = [TEMPORARY_PREFIX + name for name in names] if names is not None else [TEMPORARY_PREFIX]
    removed = []
    for entry in sorted(os.listdir(folder)):
        path = os.path.join(folder, entry)
        if any(entry.startswith(p) for p in prefixes) and os.path.isfile(path) and not os.path.islink(path):
            os.remove(path)
            removed.append(path)
    return removed


def check_writable(folder, what=None):
    """Fail early (InputError naming `what`, e.g. "--out search.json") unless `folder` can be created and
    written: probe its nearest existing ancestor with a real temporary file, so a read-only mount counts
    even for root."""
    what = what or f"output folder {folder}"
    existing = os.path.abspath(folder)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise InputError(f"{what}: {existing} is a file, not a folder")
    try:
        with tempfile.TemporaryFile(dir=existing, prefix=TEMPORARY_PREFIX + "probe"):
            pass
    except OSError as e:
        raise InputError(f"{what}: cannot write in {existing} ({e.strerror or e})") from None


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
    """Write a .safetensors file atomically; the same tensors and metadata always give the same bytes."""
    from safetensors.torch import save

    data = save({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, metadata=metadata)
    # The library keeps __metadata__ in a hash map whose order changes from process to process: rewrite
    # the JSON header with those keys sorted (the tensor entries and the data offsets stay as they are).
    size = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + size])
    if "__metadata__" in header:
        header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    text += b" " * (-len(text) % 8)  # the format pads the header with spaces to 8 bytes
    atomic_write(path, len(text).to_bytes(8, "little") + text + data[8 + size:])


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


# ----------------------------------------------------------------------------- flags, checked at parse time
class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """--help shows every flag's default beside its help text (a None default is explained in the text
    itself, and an on/off switch's False says nothing), and descriptions as written."""

    def _get_help_string(self, action):
        return action.help if action.default is None or action.default is False else super()._get_help_string(action)


class Parser(argparse.ArgumentParser):
    """argparse held to the project's error contract: one line `error: ...`, exit status 2, and a pointer
    to --help. add_subparsers builds the sub-commands with this class too."""

    def __init__(self, *args, formatter_class=HelpFormatter, **kwargs):
        super().__init__(*args, formatter_class=formatter_class, **kwargs)

    def error(self, message):
        self.exit(2, f"error: {' '.join(message.split())} (see `{self.prog} --help`)\n")

    def parse_args(self, args=None, namespace=None):
        # argparse reports a sub-command's unknown flag from the top parser (`emorl.py --help`); the
        # sub-command's own parser names its --help, which lists the flags it does take.
        args, unknown = self.parse_known_args(args, namespace)
        if unknown:
            commands = getattr(self, "commands", None)  # set by build_parser
            parser = commands.choices.get(getattr(args, "command", None), self) if commands else self
            parser.error(f"unrecognized arguments: {' '.join(unknown)}")
        return args

    def parse_known_args(self, args=None, namespace=None):
        # "--weights -1,0.5,0.5": argparse takes a value that starts with "-" for a flag and never shows the
        # weight check's message; glue such a value to its flag ("--weights=-1,0.5,0.5") so it is parsed.
        args, glued = list(sys.argv[1:] if args is None else args), []
        while args:
            arg = args.pop(0)
            if arg == "--weights" and args and args[0][:1] == "-" and args[0][:2] != "--" and args[0] != "-h":
                arg = f"--weights={args.pop(0)}"
            glued.append(arg)
        return super().parse_known_args(glued, namespace)


def integer(low, high=None):
    """argparse type: an integer in [low, high] (high None: no upper bound)."""
    def parse(text):
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low or (high is not None and value > high):
            if high is not None:
                kind = f"an integer from {low} to {high}"
            else:
                kind = "a positive integer" if low == 1 else f"an integer >= {low}"
            raise argparse.ArgumentTypeError(f"must be {kind}, got {text}")
        return value
    return parse


def number(low, high=None, low_open=False):
    """argparse type: a finite float, > low (low_open) or >= low, and <= high when high is given."""
    def parse(text):
        import math
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not math.isfinite(value) or value < low or (low_open and value == low) or (high is not None and value > high):
            bound = ("> " if low_open else ">= ") + f"{low:g}" + (f" and <= {high:g}" if high is not None else "")
            raise argparse.ArgumentTypeError(f"must be a finite number {bound}, got {text}")
        return value
    return parse


def device(text):
    """argparse type: a torch device that exists on this machine (cpu, cuda, cuda:N, mps, ...)."""
    if text == "cpu":
        return text  # no torch import for the default
    import torch
    try:
        dev = torch.device(text)
    except (RuntimeError, ValueError):
        raise argparse.ArgumentTypeError(f"{text!r} is not a torch device (e.g. cpu, cuda, cuda:1, mps)") from None
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise argparse.ArgumentTypeError(f"{text}: no CUDA device on this machine (torch {torch.__version__})")
        if dev.index is not None and dev.index >= count:
            raise argparse.ArgumentTypeError(f"{text}: this machine has {count} CUDA device(s), cuda:0 to cuda:{count - 1}")
    elif dev.type == "meta":
        raise argparse.ArgumentTypeError("meta: holds no data, cannot run a model")
    elif dev.type != "cpu":
        try:
            torch.empty(1, device=dev)
        except (RuntimeError, AssertionError, NotImplementedError) as e:
            raise argparse.ArgumentTypeError(f"{text}: not available on this machine ({' '.join(str(e).split())[:120]})") from None
    return text


def devices(text):
    """argparse type for train: one device or a comma-separated list (one per --jobs process)."""
    return ",".join(device(part.strip()) for part in text.split(","))


positive = integer(1)
seed = integer(0, 2**63 - 1)
fraction = number(0.0, 1.0, low_open=True)


# ----------------------------------------------------------------------------- run folders
NOT_RUNS = ("base", "param", "logit", "hidden")  # evaluate's rows that no training run is named after


def run_folder(runs_dir: str, method: str, seed) -> str:
    """runs/<method>-<seed>/: one training run; scst.train writes adapter/, summary.json (when finished),
    checkpoint.pt and the logs there."""
    return os.path.join(runs_dir, f"{method}-{seed}")


def find_runs(runs_dir: str) -> dict[int | str, dict[str, str]]:
    """{seed: {method: run folder}} for every finished run (summary.json present) under runs_dir, any
    folder named <method>-<seed> but those of NOT_RUNS; the seed is the text after the last dash, an int
    or a label (runs/reflection-authors). --seed is >= 0, so reflection--1 is the label "-1" of
    "reflection", not seed 1 of "reflection-"."""
    found: dict[int | str, dict[str, str]] = {}
    for summary in sorted(glob.glob(os.path.join(glob.escape(runs_dir), "*-*", "summary.json"))):
        folder = os.path.dirname(summary)
        method, _, seed = os.path.basename(folder).rpartition("-")
        if method.endswith("-"):  # <method>--1
            method, seed = method[:-1], "-" + seed
        if method and seed and method not in NOT_RUNS:
            found.setdefault(int(seed) if seed.isdigit() else seed, {})[method] = folder
    return found


def newest_adapters(runs_dir: str, names) -> list[str]:
    """The adapter folder of the newest finished run (by summary.json's time) of each objective in `names`."""
    runs = find_runs(runs_dir).values()
    found = []
    for name in names:
        summaries = [os.path.join(folders[name], "summary.json") for folders in runs if name in folders]
        if not summaries:
            raise InputError(f"no finished '{name}' run under {runs_dir}/: run `python emorl.py train {name}` first, "
                             "or pass --adapters")
        found.append(os.path.join(os.path.dirname(max(summaries, key=os.path.getmtime)), "adapter"))
    return found
