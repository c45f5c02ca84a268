"""Rewards and metrics of EMORL: the three text scorers (paper §5.3, SPEC §3) and plugged ones, the
"logsum" reward combination (SPEC §2), Diversity-2 and edit rate (§5.3, Table 1), and the converter
for the DynaOpt reflection-scorer checkpoint.

Scorers (each maps a batch of (client prompt, response) pairs to FloatTensor[N] in [0, 1]):
- reflection: RoBERTa cross-encoder over <s> prompt </s></s> response </s> -> encoder (no pooler)
  -> CLS vector -> Linear(H, 512) -> ELU -> Linear(512, 1) -> sigmoid (DynaOpt's CrossScorerCrossEncoder).
- empathy: BERT or DistilBERT sequence classifier (num_labels = 1) over [CLS] prompt [SEP] response
  [SEP]; score = logit clamped to [0, 1]. The paper's "bert-empathy" is a DistilBERT.
- fluency: GPT-2 on the token concatenation BPE(prompt) + BPE(response) (what the public code's
  GPT2Tokenizer(prompt, response) pair call produces: no space, no special token in between);
  ppl = exp(mean next-token NLL), score = (50 - ppl) / 50 clipped to [0, 1].
- a plugged objective (any other name, issue 13; `--scorer NAME=DIR[:LABEL]`): its kind read from
  DIR/config.json: a BERT / DistilBERT / RoBERTa sequence classifier (num_labels 1: the logit clamped
  to [0, 1], as empathy; num_labels >= 2: the softmax probability of LABEL, a name from id2label or an
  index) or a GPT-2 LM (scored as fluency). This is how the paper's "adding new objectives" (§5.4) gets
  its scorer; nothing else in the pipeline depends on which objectives exist.
As in the public code, a prompt is the client statement: text from "[SEP]" on is dropped and the
rest stripped, so `prompt` and `prompt + " [SEP] "` score the same. Diversity-2 is the public code's
per-text distinct-2 (whitespace words) averaged over the set.

Deviations from the paper / public code:
- Fluency is batched (right padding, per-row mean NLL over its real tokens); the public code runs
  one pair at a time. Same numbers. The score is clipped to [0, 1] (SPEC §3); the public code's
  logsum_score clips every score, fluency included, to [1e-4, 0.9999] before use, as scst.py does.
- A NaN/inf score is an InputError naming the scorer (the public code would train on it).
- Edit rate tokenises with a regex (words and punctuation marks are tokens) instead of
  nltk.word_tokenize (not a dependency); contractions ("don't") stay one token here.
- Loading is strict: the public code loads the reflection .pt with strict=False (a missing key would
  silently stay random); here every key is checked, convert_checkpoint reports each rename and drops
  only the unused pooler and position-id buffer, and a tokenizer whose size differs from the word
  embedding's row count is an InputError.
- Scorers return CPU float32 tensors; score_all returns {objective: FloatTensor[N]} (stack for [N, d]).
"""
from __future__ import annotations

import math
import os
import re

import torch
from torch import nn

import bert
import gpt2
import files
from files import InputError

OBJECTIVES = ("reflection", "empathy", "fluency")
CLIP_MIN, CLIP_MAX = 1e-4, 0.9999          # logsum clipping of the public code
FLUENCY_CAP = 50.0                          # score = (CAP - ppl) / CAP


def client_prompt(prompt: str) -> str:
    """The client statement: what precedes "[SEP]" (policy-input form), stripped, as in the public code."""
    return prompt.split("[SEP]")[0].strip()


# ----------------------------------------------------------------------------- metrics
def levenshtein(a, b) -> int:
    """Edit distance (insert / delete / substitute, cost 1 each) between two token sequences."""
    previous = list(range(len(b) + 1))
    for i, token_a in enumerate(a, start=1):
        current = [i]
        for j, token_b in enumerate(b, start=1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (token_a != token_b)))
        previous = current
    return previous[-1]


def word_tokens(text: str) -> list[str]:
    """Words and punctuation marks (approximates nltk.word_tokenize used by the public code)."""
    return re.findall(r"\w+(?:'\w+)*|[^\w\s]", text)


def edit_rate(prompt: str, response: str) -> float:
    """Word-level Levenshtein(prompt, response) / max(word counts); 0.0 when both are empty."""
    p, r = word_tokens(client_prompt(prompt)), word_tokens(response)
    longest = max(len(p), len(r))
    return levenshtein(p, r) / longest if longest else 0.0


def distinct_2(text: str) -> float:
    """Distinct whitespace-split word bigrams / number of words of one text (0.0 for no words)."""
    words = text.split()
    return len(set(zip(words, words[1:]))) / len(words) if words else 0.0


def diversity_2(texts) -> float:
    """Diversity-2 of a set of generations: the mean of distinct_2 over the texts (public code's
    distinct_n_sentence_level averaged over the test set); 0.0 for an empty set."""
    texts = list(texts)
    return sum(distinct_2(t) for t in texts) / len(texts) if texts else 0.0


# ----------------------------------------------------------------------------- combinations
def _weights(weights, scores: torch.Tensor) -> torch.Tensor:
    w = torch.as_tensor(weights, dtype=scores.dtype, device=scores.device)
    if scores.dim() != 2 or w.shape != (scores.shape[1],):
        raise InputError(f"weights of shape {tuple(w.shape)} do not match scores of shape {tuple(scores.shape)} ([N, d])")
    return w


def clip(scores: torch.Tensor) -> torch.Tensor:
    """clip(s, 1e-4, 0.9999): the public code's logsum_score clips every objective score it uses, in
    training, validation, the search and the test (utils_scoring.py:213-214)."""
    return scores.clamp(CLIP_MIN, CLIP_MAX)


def combine_logsum(scores: torch.Tensor, weights) -> torch.Tensor:
    """scores [N, d], weights [d] -> Σ_i w_i · log(clip(s_i, 1e-4, 0.9999))  [N]  (SPEC §2, "logsum")."""
    return (clip(scores).log() * _weights(weights, scores)).sum(dim=1)


def combine_mean(scores: torch.Tensor, weights=None) -> torch.Tensor:
    """scores [N, d] -> weighted sum Σ_i w_i s_i [N]; weights default to 1/d (the plain mean)."""
    if weights is None:
        weights = [1.0 / scores.shape[1]] * scores.shape[1]
    return (scores * _weights(weights, scores)).sum(dim=1)


def check_finite(scores: torch.Tensor, what: str):
    """A NaN or inf reward stops the run with an InputError naming `what` and the first bad row."""
    bad = ~torch.isfinite(scores)
    if bad.any():
        row = int(bad.reshape(-1).nonzero()[0])
        value = scores.reshape(-1)[row].item()
        kind = "NaN" if math.isnan(value) else "inf"
        raise InputError(f"{kind} reward from {what} (row {row}): check the scorer's weights and inputs")


# ----------------------------------------------------------------------------- scorers (§5.3)
class Scorer:
    """Shared batching: __call__(prompts, responses) -> FloatTensor[N] on the CPU, under
    inference_mode, `batch_size` pairs per forward pass; a NaN/inf score is an InputError."""
    name = "scorer"

    def __init__(self, model, tokenizer, device="cpu", batch_size=32):
        self.model, self.tokenizer, self.device, self.batch_size = model, tokenizer, device, batch_size

    def _batched(self, fn, prompts, responses) -> torch.Tensor:
        prompts, responses = [client_prompt(p) for p in prompts], list(responses)
        if len(prompts) != len(responses):
            raise InputError(f"{self.name} scorer: {len(prompts)} prompts but {len(responses)} responses")
        out = [torch.zeros(0)]
        with torch.inference_mode():
            for start in range(0, len(prompts), self.batch_size):
                end = start + self.batch_size
                out.append(fn(prompts[start:end], responses[start:end]).float().cpu())
        return torch.cat(out)

    def __call__(self, prompts, responses) -> torch.Tensor:
        scores = self._batched(self.score_batch, prompts, responses)        # score_batch: per subclass
        check_finite(scores, f"{self.name} scorer")
        return scores


def check_vocab(num_tokens: int, embedding_rows: int, source):
    """A tokenizer from another model would index the wrong (or missing) embedding rows."""
    if num_tokens != embedding_rows:
        raise InputError(f"{source}: the tokenizer has {num_tokens} tokens but the word embedding has {embedding_rows} rows")


class ReflectionModel(nn.Module):
    """DynaOpt's cross-encoder: RoBERTa (no pooler) -> h_CLS -> Linear(H, 512) -> ELU -> Linear(512, 1)."""

    def __init__(self, config: bert.BertConfig, head_width: int = 512):
        super().__init__()
        self.roberta = bert.BertModel(config, add_pooling_layer=False)
        self.head = nn.Sequential(nn.Linear(config.hidden_size, head_width), nn.ELU(), nn.Linear(head_width, 1))

    def forward(self, input_ids, attention_mask):
        cls = self.roberta(input_ids, attention_mask)[:, 0]                  # pair representation
        return torch.sigmoid(self.head(cls)).squeeze(-1)


class ReflectionScorer(Scorer):
    """Reflection score = sigmoid(head(RoBERTa(<s> prompt </s></s> response </s>)_CLS))."""
    name = "reflection"

    @classmethod
    def from_dir(cls, directory, device="cpu", batch_size=32):
        config_path = os.path.join(directory, "config.json")
        if bert.BertConfig.from_json(config_path).model_type != "roberta":
            raise InputError(f"{config_path}: model_type must be 'roberta' for the reflection scorer")
        model = bert.load_bert(directory, head=ReflectionModel, device=device)
        tokenizer = gpt2.ByteLevelBPETokenizer.from_dir(directory)
        check_vocab(len(tokenizer.encoder), model.roberta.config.vocab_size, directory)
        return cls(model, tokenizer, device, batch_size)

    def score_batch(self, prompts, responses):
        config = self.model.roberta.config                  # positions start at pad_token_id + 1
        max_length = min(512, config.max_position_embeddings - config.pad_token_id - 1)
        batch = self.tokenizer.batch_encode_roberta(prompts, responses, max_length=max_length, device=self.device)
        return self.model(batch["input_ids"], batch["attention_mask"])


# The paper's "bert-empathy" (huggingface.co/MoaazZaki/bert-empathy) is a DistilBERT classifier. A
# DistilBERT layer computes what a BERT layer does, under other names and without token types, so it
# runs on bert.BertModel (one all-zero token-type row) with this key map; its head differs from BERT's:
# h_CLS -> pre_classifier -> ReLU -> classifier (BERT: tanh pooler -> classifier).
DISTILBERT_KEY_MAP = (
    (r"^distilbert\.", "bert."), (r"\.transformer\.layer\.", ".encoder.layer."),
    (r"\.attention\.q_lin\.", ".attention.self.query."), (r"\.attention\.k_lin\.", ".attention.self.key."),
    (r"\.attention\.v_lin\.", ".attention.self.value."), (r"\.attention\.out_lin\.", ".attention.output.dense."),
    (r"\.sa_layer_norm\.", ".attention.output.LayerNorm."), (r"\.ffn\.lin1\.", ".intermediate.dense."),
    (r"\.ffn\.lin2\.", ".output.dense."), (r"\.output_layer_norm\.", ".output.LayerNorm."),
)


class DistilBertClassifier(nn.Module):
    def __init__(self, config: bert.BertConfig):
        super().__init__()
        self.config = config
        self.bert = bert.BertModel(config, add_pooling_layer=False)
        self.pre_classifier = nn.Linear(config.hidden_size, config.hidden_size)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)

    def forward(self, input_ids, attention_mask, token_type_ids=None):   # DistilBERT has no token types
        cls = self.bert(input_ids, attention_mask)[:, 0]
        return self.classifier(torch.relu(self.pre_classifier(cls)))


def load_distilbert_classifier(directory, raw: dict, device="cpu") -> DistilBertClassifier:
    """HF DistilBertForSequenceClassification folder (config.json fields dim, n_layers, n_heads, hidden_dim)."""
    source = os.path.join(directory, "config.json")
    if raw.get("activation", "gelu") != "gelu":
        raise InputError(f"{source}: activation {raw.get('activation')!r} is not supported (expected 'gelu')")
    try:
        config = bert.BertConfig(vocab_size=raw["vocab_size"], hidden_size=raw["dim"], num_hidden_layers=raw["n_layers"],
                                 num_attention_heads=raw["n_heads"], intermediate_size=raw["hidden_dim"],
                                 max_position_embeddings=raw.get("max_position_embeddings", 512), type_vocab_size=1,
                                 pad_token_id=raw.get("pad_token_id", 0),
                                 num_labels=len(raw["id2label"]) if "id2label" in raw else raw.get("num_labels", 2))
    except KeyError as e:
        raise InputError(f"{source}: missing field {e.args[0]}") from None
    tensors = {}
    for key, value in files.load_safetensors(directory).items():
        if not key.endswith("embeddings.position_ids"):
            for pattern, replacement in DISTILBERT_KEY_MAP:
                key = re.sub(pattern, replacement, key)
            tensors[key] = value
    tensors["bert.embeddings.token_type_embeddings.weight"] = torch.zeros(1, config.hidden_size)
    model = DistilBertClassifier(config)
    files.load_strict(model, tensors, directory)
    return model.to(device).eval()


class RobertaClassifier(nn.Module):
    """HF RobertaForSequenceClassification: RoBERTa (no pooler) -> h_<s> -> classifier.dense -> tanh
    -> classifier.out_proj -> logits [B, num_labels] (keys roberta.*, classifier.dense.*, classifier.out_proj.*)."""

    def __init__(self, config: bert.BertConfig):
        super().__init__()
        self.config = config
        self.roberta = bert.BertModel(config, add_pooling_layer=False)
        self.classifier = nn.Module()
        self.classifier.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.classifier.out_proj = nn.Linear(config.hidden_size, config.num_labels)

    def forward(self, input_ids, attention_mask, token_type_ids=None):   # RoBERTa has one token type
        cls = self.roberta(input_ids, attention_mask)[:, 0]
        return self.classifier.out_proj(torch.tanh(self.classifier.dense(cls)))


def label_index(raw: dict, num_labels: int, label, directory) -> int | None:
    """The output a classifier scores: None (its single logit) for num_labels 1, else the index of
    `label`, a name from config.json's id2label or an index."""
    if num_labels == 1:
        if label is not None:
            raise InputError(f"{directory}: the classifier has a single output (a regression logit); drop ':{label}'")
        return None
    names = [str(raw.get("id2label", {}).get(str(i), i)) for i in range(num_labels)]
    if label is None:
        raise InputError(f"{directory}: the classifier has {num_labels} labels ({', '.join(names)}): "
                         f"name the one to score as NAME=DIR:LABEL")
    if str(label) in names:
        return names.index(str(label))
    if str(label).isdigit() and int(label) < num_labels:
        return int(label)
    raise InputError(f"{directory}: unknown label {label!r} (labels: {', '.join(names)}, or an index 0-{num_labels - 1})")


class ClassifierScorer(Scorer):
    """A sequence classifier over the pair ([CLS] prompt [SEP] response [SEP], or RoBERTa's <s> prompt
    </s></s> response </s>): BERT, DistilBERT or RoBERTa (config.json's model_type). Score = the logit
    clamped to [0, 1] for num_labels 1 (the empathy scorer), else softmax(logits)[label]."""
    name = "classifier"

    def __init__(self, model, tokenizer, device="cpu", batch_size=32, label=None):
        super().__init__(model, tokenizer, device, batch_size)
        self.label = label

    @classmethod
    def from_dir(cls, directory, device="cpu", batch_size=32, label=None):
        raw = files.read_json(os.path.join(directory, "config.json"))
        if raw.get("model_type") == "distilbert":
            model = load_distilbert_classifier(directory, raw, device)
        elif raw.get("model_type") == "roberta":
            model = bert.load_bert(directory, head=RobertaClassifier, device=device)
        else:
            model = bert.load_bert(directory, head="classification", device=device)
        if raw.get("model_type") == "roberta":
            tokenizer = gpt2.ByteLevelBPETokenizer.from_dir(directory)
            check_vocab(len(tokenizer.encoder), model.config.vocab_size, directory)
        else:
            tokenizer = bert.WordPieceTokenizer.from_dir(directory)
            check_vocab(tokenizer.vocab_size, model.config.vocab_size, directory)
        return cls(model, tokenizer, device, batch_size, label_index(raw, model.config.num_labels, label, directory))

    def score_batch(self, prompts, responses):
        config = self.model.config
        if config.model_type == "roberta":                  # positions start at pad_token_id + 1
            max_length = min(512, config.max_position_embeddings - config.pad_token_id - 1)
            batch = self.tokenizer.batch_encode_roberta(prompts, responses, max_length=max_length, device=self.device)
        else:
            max_length = min(512, config.max_position_embeddings)
            batch = self.tokenizer.batch_encode(prompts, responses, max_length=max_length, device=self.device)
        logits = self.model(**batch)
        if self.label is None:
            return logits[:, 0].clamp(0.0, 1.0)
        return logits.float().softmax(dim=-1)[:, self.label]


class EmpathyScorer(ClassifierScorer):
    """Empathy score = clamp(classifier logit over [CLS] prompt [SEP] response [SEP], 0, 1); the classifier
    is a BERT (model_type "bert") or DistilBERT (model_type "distilbert", the paper's bert-empathy)."""
    name = "empathy"

    @classmethod
    def from_dir(cls, directory, device="cpu", batch_size=32, label=None):
        raw = files.read_json(os.path.join(directory, "config.json"))
        num_labels = len(raw["id2label"]) if "id2label" in raw else raw.get("num_labels", 2)
        if num_labels != 1:
            raise InputError(f"{directory}: the empathy classifier has {num_labels} labels, "
                             "expected 1 (a regression logit)")
        return super().from_dir(directory, device, batch_size)


class FluencyScorer(Scorer):
    """Fluency score = clip((50 - ppl) / 50, 0, 1), ppl = exp(mean NLL of GPT-2 over BPE(prompt) + BPE(response))."""
    name = "fluency"
    cap = FLUENCY_CAP

    @classmethod
    def from_dir(cls, directory, device="cpu", batch_size=32):
        model, tokenizer = gpt2.load_gpt2(directory, device=device)
        check_vocab(len(tokenizer.encoder), model.config.vocab_size, directory)
        return cls(model, tokenizer, device, batch_size)

    def _perplexity(self, prompts, responses):
        # The public code's GPT2Tokenizer(prompt, response): two token lists joined, nothing in between,
        # truncated longest-first to the context size.
        rows = [sum(gpt2.truncate_longest_first(self.tokenizer.encode(p), self.tokenizer.encode(r),
                                                self.model.config.n_positions), []) for p, r in zip(prompts, responses)]
        input_ids, attention_mask = self.tokenizer.pad(rows, 0, self.device)
        return gpt2.sequence_nll(self.model, input_ids, attention_mask).exp()

    def perplexity(self, prompts, responses) -> torch.Tensor:
        """GPT-2 perplexity of each (prompt, response) pair: FloatTensor[N] (NaN for < 2 tokens)."""
        return self._batched(self._perplexity, prompts, responses)

    def score_batch(self, prompts, responses):
        return ((self.cap - self._perplexity(prompts, responses)) / self.cap).clamp(0.0, 1.0)


SCORERS = {"reflection": ReflectionScorer, "empathy": EmpathyScorer, "fluency": FluencyScorer}
# A plugged objective's scorer kind, from config.json's model_type (with `architectures`, when written,
# naming a sequence classifier or a GPT-2 LM head).
PLUGGED_KINDS = {"bert": (ClassifierScorer, "ForSequenceClassification"),
                 "distilbert": (ClassifierScorer, "ForSequenceClassification"),
                 "roberta": (ClassifierScorer, "ForSequenceClassification"), "gpt2": (FluencyScorer, "LMHeadModel")}


def load_scorer(name: str, directory: str, label=None, device="cpu", batch_size=32) -> Scorer:
    """The scorer of objective `name`: a built-in objective's own scorer, or a plugged one whose kind
    config.json says (a BERT / DistilBERT / RoBERTa sequence classifier, `label` picking the output of a
    multi-label one, or a GPT-2 LM scored like fluency)."""
    if name in SCORERS:
        if label is not None:
            raise InputError(f"{name}: the built-in scorer takes no label (got ':{label}')")
        return SCORERS[name].from_dir(directory, device, batch_size)
    raw = files.read_json(os.path.join(directory, "config.json"))
    model_type, architectures = raw.get("model_type"), raw.get("architectures") or []
    kind, head = PLUGGED_KINDS.get(model_type, (None, None))
    if kind is None or (architectures and not any(str(a).endswith(head) for a in architectures)):
        found = f"model_type {model_type!r}" + (f", architectures {architectures}" if architectures else "")
        raise InputError(f"{directory}: cannot score objective '{name}' with this model ({found}); expected a BERT, "
                         "DistilBERT or RoBERTa sequence classifier or a GPT-2 LM")
    if kind is FluencyScorer:
        if label is not None:
            raise InputError(f"{directory}: a GPT-2 scorer (perplexity) has no labels; drop ':{label}'")
        scorer = FluencyScorer.from_dir(directory, device, batch_size)
    else:
        scorer = ClassifierScorer.from_dir(directory, device, batch_size, label=label)
    scorer.name = name                                    # named in its error messages
    return scorer


def load_scorers(directories: dict, device="cpu", batch_size=32) -> dict:
    """{objective: scorer directory, or (directory, label)} -> {objective: scorer}, in the given order."""
    specs = {name: spec if isinstance(spec, tuple) else (spec, None) for name, spec in directories.items()}
    return {name: load_scorer(name, path, label, device, batch_size) for name, (path, label) in specs.items()}


def score_all(scorers: dict, prompts, responses) -> dict:
    """{objective: FloatTensor[N]} for every scorer (stack them with torch.stack(..., dim=1) for [N, d])."""
    return {name: scorer(prompts, responses) for name, scorer in scorers.items()}


# ----------------------------------------------------------------------------- convert
# DynaOpt's reflection scorer .pt is the state_dict of CrossScorerCrossEncoder: `cross_encoder.*`
# (a HF RobertaModel), `l1.*` = Linear(768, 512), `l2.*` = Linear(512, 1) (the ELU has no weights).
# Our layout names the same tensors `roberta.*` and `head.{0,2}.*` (nn.Sequential(Linear, ELU, Linear)).
CHECKPOINT_KEY_MAP = (                     # (source prefix, our prefix), first match wins
    ("cross_encoder.", "roberta."),
    ("roberta.", "roberta."),
    ("encoder.", "roberta.encoder."),      # a bare RobertaModel state_dict
    ("embeddings.", "roberta.embeddings."),
    ("l1.", "head.0."),
    ("l2.", "head.2."),
    ("head.0.", "head.0."),
    ("head.2.", "head.2."),
)
DROPPED = ("pooler.", "embeddings.position_ids", "embeddings.token_type_ids")   # unused by the scorer
WRAPPERS = ("state_dict", "model_state_dict", "model")


def _unwrap(checkpoint, src) -> dict:
    """The state_dict inside a training checkpoint ({"state_dict": ..., "epoch": ...}) or the file itself."""
    while isinstance(checkpoint, dict) and not any(isinstance(v, torch.Tensor) for v in checkpoint.values()):
        inner = next((checkpoint[k] for k in WRAPPERS if isinstance(checkpoint.get(k), dict)), None)
        if inner is None:
            break
        checkpoint = inner
    if not isinstance(checkpoint, dict) or not checkpoint:
        raise InputError(f"{src}: not a state_dict (found {type(checkpoint).__name__})")
    for key, value in checkpoint.items():
        if not isinstance(value, torch.Tensor):
            raise InputError(f"{src}: key {key} is a {type(value).__name__}, not a tensor")
    return checkpoint


def checkpoint_key(key: str, src="checkpoint") -> str | None:
    """Our reflection-scorer key for one source key; None for a tensor the scorer does not use."""
    for prefix in ("module.", "model."):   # DataParallel / wrapper prefixes
        if key.startswith(prefix):
            key = key[len(prefix):]
    for source_prefix, our_prefix in CHECKPOINT_KEY_MAP:
        if key.startswith(source_prefix):
            renamed = our_prefix + key[len(source_prefix):]
            return None if any(d in renamed for d in DROPPED) else renamed
    raise InputError(f"{src}: key {key} does not map to the reflection scorer (roberta.*, head.0.*, head.2.*)")


def convert_checkpoint(src, dst, base=None) -> list[tuple[str, str]]:
    """DynaOpt-style PyTorch .pt/.bin -> our reflection-scorer safetensors (torch.load weights_only);
    returns the (source key, our key) table for the caller to print ("-" = dropped). `dst` is a folder
    (gets model.safetensors) or a .safetensors path. `base`: a HF roberta-base folder whose config.json,
    vocab.json and merges.txt are copied next to the weights, making `dst` a complete scorer directory."""
    import shutil

    if not os.path.isfile(src):
        raise InputError(f"{src}: file not found")
    tokenizer_files = ("config.json", "vocab.json", "merges.txt")
    for name in tokenizer_files if base is not None else ():
        if not os.path.isfile(os.path.join(base, name)):
            raise InputError(f"{base}: no {name} (expected a HF roberta-base folder)")
    try:
        checkpoint = torch.load(src, map_location="cpu", weights_only=True)
    except Exception as e:                 # the unpickler fails in many ways on a file that is no checkpoint
        raise InputError(f"{src}: not a PyTorch checkpoint of tensors (torch.load with weights_only=True "
                         f"failed: {type(e).__name__})") from None
    state = _unwrap(checkpoint, src)
    table, tensors = [], {}
    for key, value in state.items():
        ours = checkpoint_key(key, src)
        table.append((key, ours or "-"))
        if ours is not None:
            if ours in tensors:
                raise InputError(f"{src}: key {key} maps to {ours}, which another key already filled")
            tensors[ours] = value.detach().clone()
    for needed in ("roberta.embeddings.word_embeddings.weight", "head.0.weight", "head.0.bias", "head.2.weight",
                   "head.2.bias"):
        if needed not in tensors:
            raise InputError(f"{src}: no tensor for {needed} (is this a reflection-scorer checkpoint?)")
    folder = dst if not str(dst).endswith(".safetensors") else os.path.dirname(os.path.abspath(dst))
    target = dst if str(dst).endswith(".safetensors") else os.path.join(dst, "model.safetensors")
    files.save_safetensors(tensors, target, metadata={"format": "pt", "converted_from": os.path.basename(src)})
    for name in tokenizer_files if base is not None else ():
        shutil.copyfile(os.path.join(base, name), os.path.join(folder, name))
    return table
