"""GPT-2 in plain PyTorch, and the byte-level BPE tokenizer that GPT-2 and RoBERTa share (paper §5.3).

The fluency objective scores a response with GPT-2: ppl = exp(mean token NLL) over the plain
concatenation prompt + response, score = (50 - ppl) / 50 clipped to [0, 1] (rewards.py). This module
gives the model (`GPT2LMHeadModel`, `load_gpt2`), the per-sequence NLL (`sequence_nll`), and the
tokenizer: GPT-2's byte->unicode table, its pre-tokenisation regex, BPE merges by rank. RoBERTa
(the reflection scorer's encoder, bert.py) uses the same tokenizer with `<s> a </s></s> b </s>`.
`train_byte_bpe` / `save_bpe` build small vocabularies for the embedded default scorers. Tokenizer files:
vocab.json + merges.txt, or tokenizer.json alone (what transformers 5's save_pretrained writes).

Deviations from the paper / public code (which use Hugging Face's classes):
- Inference only: no dropout, no KV cache (the scorer runs one teacher-forced pass).
- Only tied LM heads (lm_head = wte), as every GPT-2 checkpoint has; an untied head is an InputError.
- The pre-tokenisation regex `'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+`
  is a hand-written scanner over unicodedata classes (Python's `re` has no \\p{..}); a test checks it
  against the `tokenizers` library on unicode text and on every code point of the BMP. Letters and
  numbers that Unicode assigned after Python's unicodedata version (3.11: 14.0) count as "other" here
  and as letters in `tokenizers`' newer regex tables (README, "Reliability").
- Special-token strings inside raw text (e.g. a literal "</s>") are encoded as plain text, never
  turned into the special id (HF splits them out).
"""
from __future__ import annotations

import heapq
import json
import math
import os
import re
import unicodedata
from collections import Counter, defaultdict
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn

import files
from files import InputError


# ----------------------------------------------------------------------------- byte-level BPE
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> character table. Printable Latin-1 bytes map to themselves; the other
    68 (controls, space, ...) map to U+0100 onward in byte order, so no token contains whitespace."""
    printable = {*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)}
    shifted = iter(range(256, 512))
    return {b: chr(b) if b in printable else chr(next(shifted)) for b in range(256)}


BYTE_TO_CHAR = bytes_to_unicode()
CHAR_BYTES = {c: bytes([b]) for b, c in BYTE_TO_CHAR.items()}
CONTRACTIONS = ("'s", "'t", "'re", "'ve", "'m", "'ll", "'d")
# \s as the regex engine behind `tokenizers` (Oniguruma) defines it: \t..\r, NEL, and categories Zs/Zl/Zp.
# (Python's str.isspace() also counts U+001C..U+001F, which \s does not.)
SPACE_CONTROLS = set("\t\n\v\f\r\x85")


def char_class(c: str) -> str:
    """'L' letter (\\p{L}), 'N' number (\\p{N}), 'S' whitespace (\\s), 'O' anything else."""
    if c in SPACE_CONTROLS:
        return "S"
    category = unicodedata.category(c)
    if category[0] in "LN":
        return category[0]
    return "S" if category in ("Zs", "Zl", "Zp") else "O"


def pretokenize(text: str) -> list[str]:
    """Split text exactly as GPT-2's regex does. At each position the first alternative that matches wins:
    a contraction; an optional ' ' plus a run of letters / numbers / other symbols; else a whitespace run
    that leaves its last character to the next word when a word follows (\\s+(?!\\S))."""
    classes = [char_class(c) for c in text]
    n, i, pieces = len(text), 0, []

    def run_end(j, cls):
        while j < n and classes[j] == cls:
            j += 1
        return j

    while i < n:
        contraction = next((s for s in CONTRACTIONS if text.startswith(s, i)), None)
        if contraction:
            end = i + len(contraction)
        elif classes[i] != "S":
            end = run_end(i, classes[i])
        elif text[i] == " " and i + 1 < n and classes[i + 1] != "S":
            end = run_end(i + 1, classes[i + 1])
        else:
            end = run_end(i, "S")
            if end < n and end - i > 1:
                end -= 1
        pieces.append(text[i:end])
        i = end
    return pieces


def to_byte_chars(word: str) -> str:
    return "".join(BYTE_TO_CHAR[b] for b in word.encode("utf-8"))


def merge_pair(symbols: list[str], pair: tuple[str, str]) -> list[str]:
    """Replace every occurrence of `pair`, left to right, by the joined symbol."""
    out, k = [], 0
    while k < len(symbols):
        if k + 1 < len(symbols) and (symbols[k], symbols[k + 1]) == pair:
            out.append(pair[0] + pair[1])
            k += 2
        else:
            out.append(symbols[k])
            k += 1
    return out


def check_merge(pair, vocab, where) -> tuple[str, str]:
    """A merge rule must join two vocabulary tokens into a third."""
    if not (isinstance(pair, (list, tuple)) and len(pair) == 2 and all(isinstance(p, str) for p in pair)
            and all(p in vocab for p in (*pair, "".join(pair)))):
        raise InputError(f"{where} is not a merge of two vocabulary tokens into one")
    return tuple(pair)


class ByteLevelBPETokenizer:
    """GPT-2 / RoBERTa tokenizer: bytes -> characters, pre-tokenise, then merge the lowest-rank pair until
    none of the word's adjacent pairs is in merges.txt."""

    def __init__(self, vocab: dict[str, int], merges: list[tuple[str, str]], source: str = "<memory>"):
        self.source = source
        self.encoder = dict(vocab)
        self.decoder = {i: token for token, i in vocab.items()}
        self.ranks = {pair: rank for rank, pair in enumerate(merges)}
        self.cache: dict[str, list[str]] = {}
        missing = [c for c in BYTE_TO_CHAR.values() if c not in vocab]
        if missing:
            raise InputError(f"{source}: the vocabulary lacks the byte symbol {missing[0]!r} (and {len(missing) - 1} more)")

    @classmethod
    def from_dir(cls, directory):
        """vocab.json + merges.txt, or when they are absent (transformers 5 saves only tokenizer.json) the
        byte-level BPE model inside tokenizer.json."""
        vocab_path, merges_path = os.path.join(directory, "vocab.json"), os.path.join(directory, "merges.txt")
        json_path = os.path.join(directory, "tokenizer.json")
        if not os.path.isfile(vocab_path) and not os.path.isfile(merges_path) and os.path.isfile(json_path):
            return cls.from_tokenizer_json(json_path)
        vocab = files.read_json(vocab_path)
        if not isinstance(vocab, dict) or not all(isinstance(i, int) for i in vocab.values()):
            raise InputError(f"{vocab_path}: expected a JSON object mapping tokens to integer ids")
        if not os.path.isfile(merges_path):
            raise InputError(f"{merges_path}: file not found")
        merges = []
        with open(merges_path, encoding="utf-8") as f:
            for line_no, line in enumerate(f, 1):
                line = line.rstrip("\r\n")
                if not line or (line_no == 1 and line.startswith("#version")):
                    continue
                merges.append(check_merge(line.split(" "), vocab, f"{merges_path}: line {line_no} {line!r}"))
        return cls(vocab, merges, source=directory)

    @classmethod
    def from_tokenizer_json(cls, path):
        """A `tokenizers` BPE tokenizer.json: model.vocab, model.merges ("a b" strings or [a, b] pairs, by rank);
        added tokens missing from the vocabulary keep their ids, as HF adds them."""
        raw = files.read_json(path)
        model = raw.get("model") if isinstance(raw, dict) else None
        if not isinstance(model, dict) or model.get("type") != "BPE" or not isinstance(model.get("vocab"), dict):
            found = model.get("type") if isinstance(model, dict) else None
            raise InputError(f"{path}: not a BPE tokenizer (model.type {found!r})")
        for key in ("continuing_subword_prefix", "end_of_word_suffix"):
            if model.get(key):
                raise InputError(f"{path}: {key} {model[key]!r} is not byte-level BPE as GPT-2 / RoBERTa use it")
        vocab = dict(model["vocab"])
        for added in raw.get("added_tokens") or []:
            if isinstance(added, dict) and isinstance(added.get("content"), str) and isinstance(added.get("id"), int):
                vocab.setdefault(added["content"], added["id"])
        if not all(isinstance(i, int) for i in vocab.values()):
            raise InputError(f"{path}: model.vocab must map tokens to integer ids")
        merges = [check_merge(m.split(" ") if isinstance(m, str) else m, vocab, f"{path}: merge {rank} {m!r}")
                  for rank, m in enumerate(model.get("merges") or [])]
        return cls(vocab, merges, source=path)

    def token_id(self, token: str) -> int:
        if token not in self.encoder:
            raise InputError(f"{self.source}: the vocabulary has no {token!r} token")
        return self.encoder[token]

    def bpe(self, word: str) -> list[str]:
        """Merge pairs of a (byte-character) word by rank; cached, words repeat a lot."""
        if word in self.cache:
            return self.cache[word]
        symbols = list(word)
        while len(symbols) > 1:
            best = min(zip(symbols, symbols[1:]), key=lambda pair: self.ranks.get(pair, math.inf))
            if best not in self.ranks:
                break
            symbols = merge_pair(symbols, best)
        self.cache[word] = symbols
        return symbols

    def encode(self, text: str) -> list[int]:
        return [self.encoder[s] for word in pretokenize(text) for s in self.bpe(to_byte_chars(word))]

    def decode(self, ids) -> str:
        """Ids -> text; byte sequences that are not valid UTF-8 become U+FFFD (as HF's errors="replace").
        Characters outside the byte table (only in special tokens) pass through as UTF-8."""
        chars = "".join(self.decoder[int(i)] for i in ids)
        return b"".join(CHAR_BYTES.get(c) or c.encode("utf-8") for c in chars).decode("utf-8", errors="replace")

    @staticmethod
    def pad(rows: list[list[int]], pad_id: int, device="cpu"):
        """Right-pad to the longest row -> (input_ids, attention_mask), both long [B, T]."""
        width = max((len(r) for r in rows), default=0)
        ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for b, row in enumerate(rows):
            ids[b, : len(row)] = torch.tensor(row, dtype=torch.long)
            mask[b, : len(row)] = 1
        return ids.to(device), mask.to(device)

    def batch_encode_gpt2(self, texts, max_length: int = 1024, device="cpu"):
        """GPT-2 batch: no special tokens, first `max_length` tokens kept, right-padded with <|endoftext|>."""
        eos = self.token_id("<|endoftext|>")
        return self.pad([self.encode(t)[:max_length] for t in texts], eos, device)

    def batch_encode_roberta(self, texts, pairs=None, max_length: int = 512, device="cpu"):
        """RoBERTa batch: `<s> a </s>` or `<s> a </s></s> b </s>`, truncated longest-first to `max_length`
        (as HF's truncation=True), right-padded with <pad>. Returns dict(input_ids, attention_mask)."""
        cls_id, sep_id, pad_id = self.token_id("<s>"), self.token_id("</s>"), self.token_id("<pad>")
        if pairs is not None and len(pairs) != len(texts):
            raise InputError(f"batch_encode_roberta: {len(texts)} texts but {len(pairs)} pairs")
        specials = 2 if pairs is None else 4
        if max_length <= specials:
            raise InputError(f"batch_encode_roberta: max_length {max_length} leaves no room for text")
        rows = []
        for k, text in enumerate(texts):
            if pairs is None:
                rows.append([cls_id, *self.encode(text)[: max_length - 2], sep_id])
            else:
                a, b = truncate_longest_first(self.encode(text), self.encode(pairs[k]), max_length - 4)
                rows.append([cls_id, *a, sep_id, sep_id, *b, sep_id])
        input_ids, attention_mask = self.pad(rows, pad_id, device)
        return {"input_ids": input_ids, "attention_mask": attention_mask}


def truncate_longest_first(a: list[int], b: list[int], budget: int):
    """Fit a + b into `budget` tokens: if the shorter fits in half, cut only the longer; otherwise both get
    half, the longer (the second one on a tie) taking the odd token."""
    if len(a) + len(b) <= budget:
        return a, b
    short = min(len(a), len(b))
    keep_short, keep_long = (short, budget - short) if 2 * short <= budget else (budget // 2, budget - budget // 2)
    return (a[:keep_long], b[:keep_short]) if len(a) > len(b) else (a[:keep_short], b[:keep_long])


def train_byte_bpe(texts, vocab_size: int, special_tokens=()):
    """Learn a byte-level BPE vocabulary: ids are the special tokens, then the 256 byte symbols, then one
    per merge. Each step merges the most frequent adjacent pair over the pre-tokenised word counts
    (ties: the lexicographically smallest pair), until `vocab_size` tokens or no pair is left.
    Pair counts are updated incrementally (only words containing the merged pair are revisited)."""
    vocab = {token: i for i, token in enumerate(special_tokens)}
    for b in range(256):
        vocab.setdefault(BYTE_TO_CHAR[b], len(vocab))
    word_counts = Counter(to_byte_chars(w) for text in texts for w in pretokenize(text))
    words = [list(w) for w in word_counts]
    freqs = list(word_counts.values())
    pair_counts, where = Counter(), defaultdict(set)
    for k, symbols in enumerate(words):
        for pair in zip(symbols, symbols[1:]):
            pair_counts[pair] += freqs[k]
            where[pair].add(k)
    heap = [(-count, pair) for pair, count in pair_counts.items()]
    heapq.heapify(heap)
    merges = []
    while len(vocab) < vocab_size and heap:
        count, best = heapq.heappop(heap)
        if -count != pair_counts[best] or count == 0:
            continue  # stale heap entry: this pair's count changed since it was pushed
        merges.append(best)
        vocab.setdefault(best[0] + best[1], len(vocab))
        changed = set()
        for k in where.pop(best):
            for pair in zip(words[k], words[k][1:]):
                pair_counts[pair] -= freqs[k]
                changed.add(pair)
            words[k] = merge_pair(words[k], best)
            for pair in zip(words[k], words[k][1:]):
                pair_counts[pair] += freqs[k]
                where[pair].add(k)
                changed.add(pair)
        pair_counts[best] = 0
        for pair in changed:
            if pair_counts[pair] > 0:
                heapq.heappush(heap, (-pair_counts[pair], pair))
    return vocab, merges


def save_bpe(vocab: dict[str, int], merges, directory):
    """Write vocab.json + merges.txt in Hugging Face's format (merges.txt opens with `#version: 0.2`)."""
    files.atomic_write(os.path.join(directory, "vocab.json"), json.dumps(vocab, ensure_ascii=False))
    files.atomic_write(os.path.join(directory, "merges.txt"), "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))


# ----------------------------------------------------------------------------- model
ACTIVATIONS = {"gelu_new": lambda x: F.gelu(x, approximate="tanh"), "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
               "gelu": F.gelu, "relu": F.relu}


@dataclass
class GPT2Config:
    vocab_size: int = 50257
    n_positions: int = 1024
    n_embd: int = 768
    n_layer: int = 12
    n_head: int = 12
    n_inner: int | None = None  # None: 4 * n_embd
    activation_function: str = "gelu_new"
    layer_norm_epsilon: float = 1e-5
    scale_attn_weights: bool = True
    scale_attn_by_inverse_layer_idx: bool = False
    tie_word_embeddings: bool = True

    @classmethod
    def from_json(cls, path):
        raw = files.read_json(path)
        known = {f.name for f in fields(cls)}
        config = cls(**{k: v for k, v in raw.items() if k in known})
        if config.activation_function not in ACTIVATIONS:
            raise InputError(f"{path}: activation_function {config.activation_function!r} is not supported")
        if not config.tie_word_embeddings:
            raise InputError(f"{path}: tie_word_embeddings=false is not supported (GPT-2 ties lm_head to wte)")
        return config


class Conv1D(nn.Module):
    """GPT-2's linear layer: y = x W + b with W stored [in, out] (HF's layout, so checkpoints load as-is)."""

    def __init__(self, n_in: int, n_out: int):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n_in, n_out) * 0.02)
        self.bias = nn.Parameter(torch.zeros(n_out))

    def forward(self, x):
        return x @ self.weight + self.bias


class Attention(nn.Module):
    def __init__(self, config: GPT2Config, layer_idx: int):
        super().__init__()
        self.n_head = config.n_head
        self.c_attn = Conv1D(config.n_embd, 3 * config.n_embd)
        self.c_proj = Conv1D(config.n_embd, config.n_embd)
        head_dim = config.n_embd // config.n_head
        self.scale = head_dim**-0.5 if config.scale_attn_weights else 1.0
        if config.scale_attn_by_inverse_layer_idx:
            self.scale /= layer_idx + 1

    def forward(self, x, allowed):  # allowed: bool [B or 1, 1, T, T], True = may attend
        B, T, C = x.shape
        q, k, v = (t.view(B, T, self.n_head, -1).transpose(1, 2) for t in self.c_attn(x).split(C, dim=-1))
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, scale=self.scale)
        return self.c_proj(y.transpose(1, 2).reshape(B, T, C))


class MLP(nn.Module):
    def __init__(self, config: GPT2Config, inner: int):
        super().__init__()
        self.c_fc, self.c_proj = Conv1D(config.n_embd, inner), Conv1D(inner, config.n_embd)
        self.act = ACTIVATIONS[config.activation_function]

    def forward(self, x):
        return self.c_proj(self.act(self.c_fc(x)))


class Block(nn.Module):
    """Pre-LN transformer block: x + attn(ln_1(x)), then x + mlp(ln_2(x))."""

    def __init__(self, config: GPT2Config, layer_idx: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.attn = Attention(config, layer_idx)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.mlp = MLP(config, config.n_inner or 4 * config.n_embd)

    def forward(self, x, allowed):
        x = x + self.attn(self.ln_1(x), allowed)
        return x + self.mlp(self.ln_2(x))


class GPT2Model(nn.Module):
    def __init__(self, config: GPT2Config):
        super().__init__()
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.n_positions, config.n_embd)
        self.h = nn.ModuleList(Block(config, i) for i in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)


class GPT2LMHeadModel(nn.Module):
    def __init__(self, config: GPT2Config):
        super().__init__()
        self.config = config
        self.transformer = GPT2Model(config)

    def forward(self, input_ids, attention_mask=None):
        """Logits [B, T, V]. Positions are 0..T-1 (right padding keeps real tokens at their true positions);
        a query sees earlier non-pad keys, and always itself, so an all-padding row never gives NaN."""
        T = input_ids.shape[1]
        if T > self.config.n_positions:
            raise InputError(f"GPT-2 input of {T} tokens exceeds n_positions {self.config.n_positions}")
        tr = self.transformer
        positions = torch.arange(T, device=input_ids.device)
        allowed = torch.ones(T, T, dtype=torch.bool, device=input_ids.device).tril()[None, None]
        if attention_mask is not None:
            diagonal = torch.eye(T, dtype=torch.bool, device=input_ids.device)
            allowed = (allowed & attention_mask.bool()[:, None, None, :]) | diagonal
        x = tr.wte(input_ids) + tr.wpe(positions)
        for block in tr.h:
            x = block(x, allowed)
        return tr.ln_f(x) @ tr.wte.weight.T  # tied LM head


def sequence_nll(model: GPT2LMHeadModel, input_ids, attention_mask):
    """Mean next-token NLL of each sequence over its real tokens (token t >= 1 with mask 1, predicted
    from tokens < t) -> FloatTensor [B]. The fluency scorer takes ppl = exp(this). A sequence with
    fewer than 2 real tokens has nothing to predict and gives NaN."""
    logits = model(input_ids, attention_mask)[:, :-1].float()
    nll = F.cross_entropy(logits.transpose(1, 2), input_ids[:, 1:], reduction="none")
    mask = attention_mask[:, 1:].to(nll.dtype)
    return (nll * mask).sum(1) / mask.sum(1)


# ----------------------------------------------------------------------------- loading
# Hugging Face key                            -> ours
#   transformer.<name>                        -> transformer.<name>          (identity)
#   wte.* / wpe.* / h.* / ln_f.* (old files)  -> transformer.<same>
#   [transformer.]h.{i}.attn.bias/.masked_bias -> dropped (causal-mask buffers, rebuilt in forward)
#   lm_head.weight                            -> dropped after checking it equals transformer.wte.weight
BUFFER_KEY = re.compile(r"(transformer\.)?h\.\d+\.attn\.(bias|masked_bias)")


def map_gpt2_keys(tensors: dict[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
    out, lm_head = {}, None
    for key, value in tensors.items():
        if key == "lm_head.weight":
            lm_head = value
        elif not BUFFER_KEY.fullmatch(key):
            out["transformer." + key if key.split(".")[0] in ("wte", "wpe", "h", "ln_f") else key] = value
    wte = out.get("transformer.wte.weight")
    if lm_head is not None and wte is not None and not torch.equal(lm_head, wte):
        raise InputError(f"{source}: lm_head.weight differs from transformer.wte.weight (only tied GPT-2 heads are supported)")
    return out


def load_gpt2(directory, device="cpu"):
    """Hugging Face GPT-2 folder (config.json, *.safetensors, vocab.json + merges.txt or tokenizer.json) -> (model in eval
    mode on `device`, tokenizer). Every key is checked (files.load_strict)."""
    config = GPT2Config.from_json(os.path.join(directory, "config.json"))
    tokenizer = ByteLevelBPETokenizer.from_dir(directory)
    if max(tokenizer.decoder) >= config.vocab_size:
        raise InputError(f"{directory}: the tokenizer has id {max(tokenizer.decoder)}, beyond config vocab_size {config.vocab_size}")
    model = GPT2LMHeadModel(config)
    files.load_strict(model, map_gpt2_keys(files.load_safetensors(directory), directory), directory)
    return model.to(device).eval(), tokenizer
