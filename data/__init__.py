"""Datasets of EMORL (paper §5.1): PAIR and Psych8k loaders, the 80/10/10 split, subsampling.

PAIR (Min et al., 2022): CSV, one row per client prompt, columns PAIR_COLUMNS: two high-quality
complex reflections (level 2), one medium simple reflection (level 1), five low-quality responses
(level 0). Psych8k: a JSON list of {"input": client, "output": counselor[, "instruction"]}.
Every loader reads the whole file eagerly, so a malformed row stops the run before any training,
with an InputError "<file>:<line>: <what is wrong>".

Deviations from the paper / public code:
- The split is a seeded shuffle (random.Random(seed)); the public code splits in file order.
- Prompts are deduplicated (first occurrence kept) in both datasets, so the splits are disjoint
  by prompt; a header row in the PAIR file is optional (detected: first row == PAIR_COLUMNS).
- An empty prompt or response is an error, not a silently skipped row.
"""
from __future__ import annotations

import csv
import io
import json
import os
import random
import re
from dataclasses import dataclass, field

from files import InputError

PAIR_COLUMNS = ("prompt", "hq1", "hq2", "mq1", "lq1", "lq2", "lq3", "lq4", "lq5")
RESPONSE_COLUMNS = PAIR_COLUMNS[1:]
LEVELS = {"hq1": 2, "hq2": 2, "mq1": 1, "lq1": 0, "lq2": 0, "lq3": 0, "lq4": 0, "lq5": 0}
EMPATHY_COLUMNS = ("prompt", "column", "empathy")
AUTONOMY_COLUMNS = ("prompt", "column", "autonomy")      # 1 = respects autonomy, 0 = advice / directive
DEFAULT_DATA = "data/pair_sample.csv"
DEFAULT_EMPATHY = "data/pair_empathy.csv"
DEFAULT_AUTONOMY = "data/pair_autonomy.csv"
PSYCH8K_SAMPLE = "data/psych8k_sample.json"


@dataclass
class Example:
    prompt: str
    responses: dict[str, str] = field(default_factory=dict)   # PAIR: hq1..lq5; Psych8k: {"output": ...}


def policy_input(prompt: str) -> str:
    """The encoder input of the policy (SPEC §1); T5's tokenizer appends </s>."""
    return prompt + " [SEP] "


def encode_prompts(tokenizer, prompts, device="cpu"):
    """(input_ids, attention_mask) of policy_input(prompt), truncated to 128 tokens (SPEC §1)."""
    return tokenizer.batch_encode([policy_input(p) for p in prompts], max_length=128, device=device)


# ----------------------------------------------------------------------------- reading
def _read_text(path) -> str:
    if not os.path.isfile(path):
        raise InputError(f"{path}: file not found")
    with open(path, "rb") as f:
        raw = f.read()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise InputError(f"{path}:{line}: not valid UTF-8 (byte 0x{raw[e.start]:02x})") from None
    if not text.strip():
        raise InputError(f"{path}: empty file")
    return text


def _csv_records(path, columns) -> list[tuple[int, list[str]]]:
    """(line where the record starts, fields) per record, blank lines skipped; an optional header
    == columns is dropped; every record must have len(columns) fields."""
    reader = csv.reader(io.StringIO(_read_text(path), newline=""), strict=True)
    records, previous_end = [], 0
    try:
        for row in reader:
            if len(row) > 1 or (row and row[0].strip()):
                records.append((previous_end + 1, row))
            previous_end = reader.line_num
    except csv.Error as e:
        raise InputError(f"{path}:{previous_end + 1}: malformed CSV ({e})") from None
    if records and tuple(c.strip().lower() for c in records[0][1]) == columns:
        records = records[1:]
    if not records:
        raise InputError(f"{path}: no data rows")
    for line, row in records:
        if len(row) != len(columns):
            raise InputError(f"{path}:{line}: expected {len(columns)} columns, got {len(row)}")
    return records


_WHITESPACE = re.compile(r"\s*")


def _json_items(path) -> list[tuple[int, object]]:
    """(line where the item starts, item) for each element of a top-level JSON list."""
    text, decoder = _read_text(path), json.JSONDecoder()
    skip = lambda pos: _WHITESPACE.match(text, pos).end()   # noqa: E731
    line_of = lambda pos: text.count("\n", 0, pos) + 1      # noqa: E731
    pos = skip(0)
    if text[pos] != "[":
        raise InputError(f"{path}:{line_of(pos)}: expected a JSON list of objects")
    items, pos = [], skip(pos + 1)
    while text[pos:pos + 1] != "]" or items:   # "[ ]" is empty; "[1, ]" fails in raw_decode
        try:
            item, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as e:
            raise InputError(f"{path}:{e.lineno}: malformed JSON ({e.msg})") from None
        items.append((line_of(pos), item))
        pos = skip(end)
        if text[pos:pos + 1] == "]":
            break
        if text[pos:pos + 1] != ",":
            raise InputError(f"{path}:{line_of(pos)}: malformed JSON (expected ',' or ']')")
        pos = skip(pos + 1)
    if skip(pos + 1) != len(text):
        raise InputError(f"{path}:{line_of(pos + 1)}: malformed JSON (data after the list)")
    if not items:
        raise InputError(f"{path}: empty list, no examples")
    return items


# ----------------------------------------------------------------------------- datasets
def load_pair(path) -> list[Example]:
    """PAIR CSV -> Examples in file order, prompts deduplicated (first occurrence kept)."""
    examples, seen = [], set()
    for line, row in _csv_records(path, PAIR_COLUMNS):
        fields = dict(zip(PAIR_COLUMNS, (cell.strip() for cell in row)))
        for column in PAIR_COLUMNS:
            if not fields[column]:
                raise InputError(f"{path}:{line}: column {column} is empty")
        if fields["prompt"] not in seen:
            seen.add(fields["prompt"])
            examples.append(Example(fields["prompt"], {c: fields[c] for c in RESPONSE_COLUMNS}))
    return examples


def load_psych8k(path) -> list[Example]:
    """Psych8k JSON list -> Examples (responses = {"output": counselor}), inputs deduplicated."""
    examples, seen = [], set()
    for line, item in _json_items(path):
        if not isinstance(item, dict):
            raise InputError(f"{path}:{line}: expected an object with 'input' and 'output', got {type(item).__name__}")
        for key in ("input", "output"):
            if key not in item:
                raise InputError(f"{path}:{line}: missing field '{key}'")
            if not isinstance(item[key], str):
                raise InputError(f"{path}:{line}: field '{key}' must be a string, got {type(item[key]).__name__}")
            if not item[key].strip():
                raise InputError(f"{path}:{line}: field '{key}' is empty")
        prompt = item["input"].strip()
        if prompt not in seen:
            seen.add(prompt)
            examples.append(Example(prompt, {"output": item["output"].strip()}))
    return examples


def load_dataset(path) -> list[Example]:
    extension = os.path.splitext(str(path))[1].lower()
    if extension == ".csv":
        return load_pair(path)
    if extension == ".json":
        return load_psych8k(path)
    raise InputError(f"{path}: unknown dataset format '{extension}' (expected .csv PAIR or .json Psych8k)")


def load_empathy_labels(path, pair_path=DEFAULT_DATA) -> list[tuple[str, str, int]]:
    """Empathy label CSV (prompt,column,empathy) joined with the PAIR file:
    (prompt, response text, label in 0/1/2) per row, in file order."""
    return _load_labels(path, pair_path, EMPATHY_COLUMNS, ("0", "1", "2"))


def load_autonomy_labels(path, pair_path=DEFAULT_DATA) -> list[tuple[str, str, int]]:
    """Autonomy label CSV (prompt,column,autonomy) joined with the PAIR file: (prompt, response text,
    1 if the response leaves the decision to the client, 0 if it gives advice or a directive)."""
    return _load_labels(path, pair_path, AUTONOMY_COLUMNS, ("0", "1"))


def _load_labels(path, pair_path, columns, allowed) -> list[tuple[str, str, int]]:
    by_prompt = {example.prompt: example for example in load_pair(pair_path)}
    name, labelled = columns[-1], []
    for line, row in _csv_records(path, columns):
        prompt, column, label = (cell.strip() for cell in row)
        if prompt not in by_prompt:
            raise InputError(f"{path}:{line}: prompt not found in {pair_path}: {prompt[:60]!r}")
        if column not in RESPONSE_COLUMNS:
            raise InputError(f"{path}:{line}: unknown column {column!r} (expected one of {','.join(RESPONSE_COLUMNS)})")
        if label not in allowed:
            raise InputError(f"{path}:{line}: {name} must be {', '.join(allowed[:-1])} or {allowed[-1]}, got {label!r}")
        labelled.append((prompt, by_prompt[prompt].responses[column], int(label)))
    return labelled


# ----------------------------------------------------------------------------- splits
def split_dataset(examples, seed, fractions=(0.8, 0.1, 0.1)) -> dict[str, list[Example]]:
    """Seeded shuffle, then cut into train / aggregation (validation + grid search) / inference."""
    if len(fractions) != 3 or min(fractions) < 0 or abs(sum(fractions) - 1.0) > 1e-6:
        raise InputError(f"split fractions must be three non-negative numbers summing to 1, got {tuple(fractions)}")
    order = list(examples)
    random.Random(seed).shuffle(order)
    n = len(order)
    cut1 = round(n * fractions[0])
    cut2 = min(n, round(n * (fractions[0] + fractions[1])))
    return {"train": order[:cut1], "aggregation": order[cut1:cut2], "inference": order[cut2:]}


def subsample(examples, fraction, seed) -> list[Example]:
    """A seeded random fraction of the examples (at least one), kept in their original order."""
    if not 0 < fraction <= 1:
        raise InputError(f"subsample fraction must be in (0, 1], got {fraction}")
    examples = list(examples)
    if not examples:
        return []
    k = max(1, round(len(examples) * fraction))
    return [examples[i] for i in sorted(random.Random(seed).sample(range(len(examples)), k))]
