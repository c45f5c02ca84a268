"""BERT and RoBERTa encoders and the BERT WordPiece tokenizer in plain PyTorch: the networks under two
of EMORL's scorers (paper §5.3; SPEC §3).

- Empathy: `BertForSequenceClassification` over (prompt, response) -> one logit (rewards.py clamps it).
- Reflection: the RoBERTa encoder (no pooler) -> CLS vector -> rewards.py's own Linear-ELU-Linear head.
One code path serves both: post-LN transformer, erf-GELU, absolute position embeddings. RoBERTa only
differs in its positions (they start at padding_idx + 1; pad tokens sit at padding_idx) and a
one-row token-type table. RoBERTa's byte-level BPE tokenizer lives in gpt2.py. The WordPiece vocabulary
comes from vocab.txt, or from tokenizer.json when a folder has only that (transformers 5's save_pretrained).

Checkpoint key map (Hugging Face -> this module). Every other key is an InputError that names it:
    bert.* / roberta.* / un-prefixed (bare BertModel.save_pretrained)  -> BertModel: same name, prefix dropped
    bert.*, classifier.{weight,bias}                 -> BertForSequenceClassification: identical names
    <anything>                                       -> head=<your module class>: identical names (e.g. roberta.* + head.*)
    *.LayerNorm.gamma / *.LayerNorm.beta (old ports) -> *.LayerNorm.weight / *.LayerNorm.bias
    embeddings.position_ids, embeddings.token_type_ids (buffers old versions saved) -> dropped, recomputed here

Deviations from the Hugging Face implementation:
- Inference only: no dropout layers (the scorers are frozen).
- Only hidden_act "gelu" (erf) and position_embedding_type "absolute"; anything else is an InputError.
- The tokenizer follows the `tokenizers` BertNormalizer + BertPreTokenizer that transformers 5.x runs
  (per-character lower-casing, accents stripped before lower-casing, no NFC pass, unassigned code points
  kept, its CJK ranges) and its longest-first pair truncation (on a tie the second text keeps the odd token).
  Character classes come from Python's unicodedata, newer than the tables inside `tokenizers`: characters
  Unicode added or re-categorised since differ (README, "Reliability", lists them).
"""
from __future__ import annotations

import dataclasses
import os
import re
import unicodedata
from collections import Counter
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

import files
from files import InputError

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


# ----------------------------------------------------------------------------- config
@dataclass
class BertConfig:
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    pad_token_id: int = 0
    model_type: str = "bert"  # "bert" | "roberta"
    num_labels: int = 2

    @classmethod
    def from_json(cls, path):
        raw = files.read_json(path)
        for key in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size"):
            if not isinstance(raw.get(key), int):
                raise InputError(f"{path}: missing or non-integer field {key}")
        checks = {"model_type": ("bert", "roberta"), "hidden_act": ("gelu",), "position_embedding_type": ("absolute",)}
        for key, allowed in checks.items():
            if raw.get(key, allowed[0]) not in allowed:
                raise InputError(f"{path}: {key} {raw[key]!r} is not supported (expected one of {allowed})")
        if raw["hidden_size"] % raw["num_attention_heads"]:
            raise InputError(f"{path}: hidden_size {raw['hidden_size']} is not a multiple of num_attention_heads")
        kwargs = {f.name: raw[f.name] for f in dataclasses.fields(cls) if raw.get(f.name) is not None}
        if "pad_token_id" not in kwargs and raw.get("model_type") == "roberta":
            kwargs["pad_token_id"] = 1
        if "id2label" in raw:  # HF writes num_labels only through id2label
            kwargs["num_labels"] = len(raw["id2label"])
        return cls(**kwargs)

    def to_dict(self):
        return dataclasses.asdict(self)


# ----------------------------------------------------------------------------- model
class BertEmbeddings(nn.Module):
    def __init__(self, c: BertConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(c.vocab_size, c.hidden_size)
        self.position_embeddings = nn.Embedding(c.max_position_embeddings, c.hidden_size)
        self.token_type_embeddings = nn.Embedding(c.type_vocab_size, c.hidden_size)
        self.LayerNorm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.is_roberta, self.padding_idx = c.model_type == "roberta", c.pad_token_id

    def position_ids(self, input_ids):
        if self.is_roberta:  # count real tokens from padding_idx + 1; pad tokens stay at padding_idx
            real = (input_ids != self.padding_idx).long()
            return torch.cumsum(real, dim=1) * real + self.padding_idx
        return torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)

    def forward(self, input_ids, token_type_ids):
        last_position = input_ids.shape[1] - 1 + (self.padding_idx + 1 if self.is_roberta else 0)  # no device sync
        if last_position >= self.position_embeddings.num_embeddings:
            raise InputError(f"input of {input_ids.shape[1]} tokens is longer than the model's "
                             f"{self.position_embeddings.num_embeddings} positions allow")
        x = self.word_embeddings(input_ids) + self.position_embeddings(self.position_ids(input_ids))
        return self.LayerNorm(x + self.token_type_embeddings(token_type_ids))


class BertSelfAttention(nn.Module):
    def __init__(self, c: BertConfig):
        super().__init__()
        self.num_heads = c.num_attention_heads
        self.query = nn.Linear(c.hidden_size, c.hidden_size)
        self.key = nn.Linear(c.hidden_size, c.hidden_size)
        self.value = nn.Linear(c.hidden_size, c.hidden_size)

    def forward(self, x, keep):  # keep: bool [B,1,1,S], False at padding keys
        B, S, H = x.shape
        q, k, v = (p(x).view(B, S, self.num_heads, -1).transpose(1, 2) for p in (self.query, self.key, self.value))
        return F.scaled_dot_product_attention(q, k, v, attn_mask=keep).transpose(1, 2).reshape(B, S, H)


class DenseLayerNorm(nn.Module):
    """Post-LN sub-layer exit: LayerNorm(dense(x) + residual). HF calls it `*.output`."""

    def __init__(self, d_in, d_out, eps):
        super().__init__()
        self.dense, self.LayerNorm = nn.Linear(d_in, d_out), nn.LayerNorm(d_out, eps=eps)

    def forward(self, x, residual):
        return self.LayerNorm(self.dense(x) + residual)


class BertAttention(nn.Module):
    def __init__(self, c: BertConfig):
        super().__init__()
        self.self = BertSelfAttention(c)
        self.output = DenseLayerNorm(c.hidden_size, c.hidden_size, c.layer_norm_eps)

    def forward(self, x, keep):
        return self.output(self.self(x, keep), x)


class Dense(nn.Module):
    """Holder that gives one Linear HF's `<name>.dense` spelling (intermediate, pooler)."""

    def __init__(self, d_in, d_out):
        super().__init__()
        self.dense = nn.Linear(d_in, d_out)


class BertLayer(nn.Module):
    def __init__(self, c: BertConfig):
        super().__init__()
        self.attention = BertAttention(c)
        self.intermediate = Dense(c.hidden_size, c.intermediate_size)
        self.output = DenseLayerNorm(c.intermediate_size, c.hidden_size, c.layer_norm_eps)

    def forward(self, x, keep):
        x = self.attention(x, keep)
        return self.output(F.gelu(self.intermediate.dense(x)), x)  # erf GELU, HF's "gelu"


class BertModel(nn.Module):
    """BERT or RoBERTa encoder (config.model_type). forward -> last hidden state [B,S,H]."""

    def __init__(self, config: BertConfig, add_pooling_layer=True):
        super().__init__()
        self.config = config
        self.embeddings = BertEmbeddings(config)
        self.encoder = nn.Module()
        self.encoder.layer = nn.ModuleList(BertLayer(config) for _ in range(config.num_hidden_layers))
        self.pooler = Dense(config.hidden_size, config.hidden_size) if add_pooling_layer else None

    def forward(self, input_ids, attention_mask=None, token_type_ids=None):
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        x = self.embeddings(input_ids, token_type_ids)
        keep = attention_mask.bool()[:, None, None, :]
        for layer in self.encoder.layer:
            x = layer(x, keep)
        return x

    def pool(self, hidden):
        """BERT's pooled output: tanh(dense(h_[CLS]))."""
        return torch.tanh(self.pooler.dense(hidden[:, 0]))


class BertForSequenceClassification(nn.Module):
    """bert + pooler + classifier Linear(H, num_labels) -> logits [B, num_labels] (the empathy scorer)."""

    def __init__(self, config: BertConfig):
        super().__init__()
        self.config = config
        self.bert = BertModel(config, add_pooling_layer=True)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)

    def forward(self, input_ids, attention_mask=None, token_type_ids=None):
        return self.classifier(self.bert.pool(self.bert(input_ids, attention_mask, token_type_ids)))


# ----------------------------------------------------------------------------- loading
def read_bert_checkpoint(directory):
    """config.json + *.safetensors -> (BertConfig, tensors) with old spellings renamed and saved
    buffers dropped (see the key map above); key prefixes are left as stored."""
    config = BertConfig.from_json(os.path.join(directory, "config.json"))
    tensors = {}
    for key, value in files.load_safetensors(directory).items():
        if key.endswith(("embeddings.position_ids", "embeddings.token_type_ids")):
            continue
        for old, new in (("LayerNorm.gamma", "LayerNorm.weight"), ("LayerNorm.beta", "LayerNorm.bias")):
            key = key[: -len(old)] + new if key.endswith(old) else key
        tensors[key] = value
    return config, tensors


def load_bert(directory, head=None, device="cpu"):
    """Load a Hugging Face BERT/RoBERTa directory strictly.

    head=None              -> BertModel; keys `bert.*` / `roberta.*` / un-prefixed; pooler iff the file has one.
    head="classification"  -> BertForSequenceClassification (`bert.*` + `classifier.*`).
    head=<callable(config) -> nn.Module> (e.g. a class holding `.roberta = BertModel(config, False)`
                              and its own `.head`) -> that module, checkpoint keys taken as its own names.
    """
    config, tensors = read_bert_checkpoint(directory)
    if head is None:
        prefix = config.model_type + "."
        tensors = {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in tensors.items()}
        model = BertModel(config, add_pooling_layer="pooler.dense.weight" in tensors)
    elif head == "classification":
        if config.model_type != "bert":
            raise InputError(f"{directory}: head 'classification' needs model_type 'bert', not {config.model_type!r}")
        model = BertForSequenceClassification(config)
    elif callable(head):
        model = head(config)
    else:
        raise ValueError(f"head must be None, 'classification' or a callable, not {head!r}")
    files.load_strict(model, tensors, directory)
    return model.to(device).eval()


def check_vocab_size(num_tokens, config: BertConfig, source):
    """The tokenizer's vocabulary and the embedding table must have the same number of rows."""
    if num_tokens != config.vocab_size:
        raise InputError(f"{source}: tokenizer has {num_tokens} tokens but the model's word embeddings "
                         f"have {config.vocab_size} rows")


# ----------------------------------------------------------------------------- tokenizer
def _is_control(ch):  # Cc, Cf, Co as `tokenizers` has it: unassigned code points (Cn) stay in the text
    return ch not in "\t\n\r" and unicodedata.category(ch) in ("Cc", "Cf", "Co", "Cs")


def _is_punctuation(ch):
    cp = ord(ch)  # all ASCII non-alphanumeric printables count, as in BERT, plus Unicode P* categories
    return 33 <= cp <= 47 or 58 <= cp <= 64 or 91 <= cp <= 96 or 123 <= cp <= 126 or unicodedata.category(ch).startswith("P")


def _is_cjk(ch):  # `tokenizers`' ranges: its Extension E starts at U+2B920 (BERT's Python code: U+2B820)
    cp = ord(ch)
    return (0x4E00 <= cp <= 0x9FFF or 0x3400 <= cp <= 0x4DBF or 0x20000 <= cp <= 0x2A6DF or 0x2A700 <= cp <= 0x2B73F
            or 0x2B740 <= cp <= 0x2B81F or 0x2B920 <= cp <= 0x2CEAF or 0xF900 <= cp <= 0xFAFF or 0x2F800 <= cp <= 0x2FA1F)


class WordPieceTokenizer:
    """BERT tokenizer: clean + (CJK spacing, accent stripping, lower-casing) -> whitespace/punctuation
    split -> greedy longest-match-first WordPiece. Special tokens written in the text are kept whole."""

    def __init__(self, vocab: list[str], do_lower_case=True, strip_accents=None, tokenize_chinese_chars=True,
                 max_input_chars_per_word=100, source="vocab"):
        self.vocab = {token: i for i, token in enumerate(vocab)}
        self.tokens = list(vocab)
        self.do_lower_case, self.strip_accents = do_lower_case, strip_accents
        self.tokenize_chinese_chars, self.max_input_chars_per_word = tokenize_chinese_chars, max_input_chars_per_word
        for token in ("[PAD]", "[UNK]", "[CLS]", "[SEP]"):
            if token not in self.vocab:
                raise InputError(f"{source}: special token {token} is missing")
        self.pad_id, self.unk_id, self.cls_id, self.sep_id = (self.vocab[t] for t in ("[PAD]", "[UNK]", "[CLS]", "[SEP]"))
        self._specials = re.compile("(" + "|".join(re.escape(t) for t in SPECIAL_TOKENS if t in self.vocab) + ")")

    @classmethod
    def from_dir(cls, directory):
        """vocab.txt, or when it is absent (transformers 5 saves only tokenizer.json) the WordPiece vocabulary
        in tokenizer.json. The options come from tokenizer_config.json either way, with BERT's defaults:
        transformers 5 also rebuilds the normaliser from them rather than from tokenizer.json."""
        path, json_path = os.path.join(directory, "vocab.txt"), os.path.join(directory, "tokenizer.json")
        max_chars = 100
        if os.path.isfile(path):
            with open(path, encoding="utf-8") as f:
                vocab = [line.rstrip("\n") for line in f]
        elif os.path.isfile(json_path):
            (vocab, max_chars), path = wordpiece_from_tokenizer_json(json_path), json_path
        else:
            raise InputError(f"{path}: file not found (nor a tokenizer.json beside it)")
        config_path = os.path.join(directory, "tokenizer_config.json")
        options = files.read_json(config_path) if os.path.isfile(config_path) else {}
        if not isinstance(options, dict):
            raise InputError(f"{config_path}: expected a JSON object")
        return cls(vocab, do_lower_case=options.get("do_lower_case", True), strip_accents=options.get("strip_accents"),
                   tokenize_chinese_chars=options.get("tokenize_chinese_chars", True), max_input_chars_per_word=max_chars,
                   source=path)

    @property
    def vocab_size(self):
        return len(self.tokens)

    def normalize(self, text):
        text = "".join(" " if ch.isspace() else ch for ch in text if not (ch in "\x00\ufffd" or _is_control(ch)))
        if self.tokenize_chinese_chars:
            text = "".join(f" {ch} " if _is_cjk(ch) else ch for ch in text)
        if self.strip_accents or (self.strip_accents is None and self.do_lower_case):
            text = "".join(ch for ch in unicodedata.normalize("NFD", text) if unicodedata.category(ch) != "Mn")
        if self.do_lower_case:
            text = "".join(ch.lower() for ch in text)  # per character: no final-sigma rule, like `tokenizers`
        return text

    def split_words(self, text):
        """Normalise, split on whitespace, and make every punctuation character a word of its own."""
        return [w for chunk in self.normalize(text).split() for w in _split_punctuation(chunk)]

    def wordpiece(self, word):
        if len(word) > self.max_input_chars_per_word:
            return ["[UNK]"]
        pieces, start = [], 0
        while start < len(word):
            for end in range(len(word), start, -1):  # longest match first
                piece = word[start:end] if start == 0 else "##" + word[start:end]
                if piece in self.vocab:
                    break
            else:
                return ["[UNK]"]  # one unmatched remainder makes the whole word unknown
            pieces.append(piece)
            start = end
        return pieces

    def tokenize(self, text) -> list[str]:
        tokens = []
        for i, part in enumerate(self._specials.split(text)):  # odd parts are the special tokens themselves
            tokens += [part] if i % 2 else [p for w in self.split_words(part) for p in self.wordpiece(w)]
        return tokens

    def encode(self, text, pair=None, max_length=512):
        """-> (ids, token_type_ids): [CLS] a [SEP] (b [SEP]), truncated longest-first to max_length."""
        a = [self.vocab[t] for t in self.tokenize(text)]
        b = None if pair is None else [self.vocab[t] for t in self.tokenize(pair)]
        budget = max_length - (2 if b is None else 3)
        if budget < 0:
            raise InputError(f"max_length {max_length} leaves no room for the special tokens")
        if b is None:
            a = a[:budget]
        elif len(a) + len(b) > budget:
            short, long = sorted((len(a), len(b)))
            long = max(short, budget - short) if short <= budget else short
            if short + long > budget:  # both are cut; the longer (on a tie: the second) keeps the odd token
                short, long = budget // 2, budget // 2 + budget % 2
            n_a, n_b = (long, short) if len(a) > len(b) else (short, long)
            a, b = a[:n_a], b[:n_b]
        ids = [self.cls_id] + a + [self.sep_id]
        types = [0] * len(ids)
        if b is not None:
            ids += b + [self.sep_id]
            types += [1] * (len(b) + 1)
        return ids, types

    def batch_encode(self, texts, pairs=None, max_length=512, device="cpu"):
        """-> dict(input_ids, attention_mask, token_type_ids), LongTensors [N, longest], right-padded."""
        if pairs is not None and len(pairs) != len(texts):
            raise InputError(f"{len(texts)} texts but {len(pairs)} pair texts")
        rows = [self.encode(t, None if pairs is None else pairs[i], max_length) for i, t in enumerate(texts)]
        width = max((len(ids) for ids, _ in rows), default=0)
        pad = lambda seq, value: seq + [value] * (width - len(seq))  # noqa: E731
        out = {"input_ids": [pad(ids, self.pad_id) for ids, _ in rows],
               "attention_mask": [pad([1] * len(ids), 0) for ids, _ in rows],
               "token_type_ids": [pad(types, 0) for _, types in rows]}
        return {k: torch.tensor(v, dtype=torch.long, device=device).view(len(rows), width) for k, v in out.items()}


def wordpiece_from_tokenizer_json(path) -> tuple[list[str], int]:
    """The tokens (in id order) and max_input_chars_per_word of a `tokenizers` WordPiece tokenizer.json;
    added tokens missing from model.vocab take their own ids, which must continue the vocabulary."""
    raw = files.read_json(path)
    model = raw.get("model") if isinstance(raw, dict) else None
    if not isinstance(model, dict) or model.get("type") != "WordPiece" or not isinstance(model.get("vocab"), dict):
        found = model.get("type") if isinstance(model, dict) else None
        raise InputError(f"{path}: not a WordPiece tokenizer (model.type {found!r})")
    if model.get("continuing_subword_prefix", "##") != "##":
        raise InputError(f"{path}: continuing_subword_prefix {model['continuing_subword_prefix']!r} (only '##' is supported)")
    ids = dict(model["vocab"])
    for added in raw.get("added_tokens") or []:
        if isinstance(added, dict) and isinstance(added.get("content"), str):
            ids.setdefault(added["content"], added.get("id"))
    tokens = sorted(ids, key=lambda t: ids[t] if isinstance(ids[t], int) else -1)
    if [ids[t] for t in tokens] != list(range(len(tokens))):
        raise InputError(f"{path}: token ids are not the integers 0..{len(tokens) - 1}")
    max_chars = model.get("max_input_chars_per_word", 100)
    if not isinstance(max_chars, int) or max_chars < 1:
        raise InputError(f"{path}: max_input_chars_per_word must be a positive integer, got {max_chars!r}")
    return tokens, max_chars


def _split_punctuation(chunk):
    words, current = [], ""
    for ch in chunk:
        if _is_punctuation(ch):
            words += [current, ch] if current else [ch]
            current = ""
        else:
            current += ch
    return words + [current] if current else words


def train_wordpiece_vocab(texts, vocab_size, do_lower_case=True) -> list[str]:
    """A small deterministic WordPiece vocabulary: the special tokens, every character seen (bare and
    as ##char, most frequent first), then the most frequent whole words and ## word endings.
    Ties break alphabetically. Cut at vocab_size."""
    splitter = WordPieceTokenizer(list(SPECIAL_TOKENS), do_lower_case=do_lower_case)
    words = Counter(w for text in texts for w in splitter.split_words(text))
    chars, pieces = Counter(), Counter()
    for word, n in words.items():
        for ch in word:
            chars[ch] += n
        if len(word) > 1:
            pieces[word] += n
        for i in range(1, len(word) - 1):
            pieces["##" + word[i:]] += n
    ranked = lambda counter: [t for t, _ in sorted(counter.items(), key=lambda kv: (-kv[1], kv[0]))]  # noqa: E731
    chars_ranked = ranked(chars)
    vocab = list(SPECIAL_TOKENS) + chars_ranked + ["##" + ch for ch in chars_ranked] + ranked(pieces)
    return vocab[:vocab_size]
