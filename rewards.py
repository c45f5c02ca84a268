"""Rewards and metrics of EMORL: the three text scorers (paper §3, §5.3), the "logsum" reward
combination (SPEC §2), Diversity-2 and edit rate (§5.3, Table 1), and the converter for the
DynaOpt reflection-scorer checkpoint.

Scorers (each maps a batch of (client prompt, response) pairs to FloatTensor[N] in [0, 1]):
- reflection: RoBERTa cross-encoder over the pair <s> prompt </s></s> response </s> -> encoder (no
  pooler) -> CLS vector -> Linear(H, 512) -> ELU -> Linear(512, 1) -> sigmoid (DynaOpt's
  CrossScorerCrossEncoder, as used by the public code).
- empathy: BERT sequence classifier (num_labels = 1) over [CLS] prompt [SEP] response [SEP];
  score = logit clamped to [0, 1].
- fluency: GPT-2 on the token concatenation BPE(prompt) + BPE(response) (what the public code's
  GPT2Tokenizer(prompt, response) pair call produces: no space, no special token in between);
  ppl = exp(mean next-token NLL), score = (50 - ppl) / 50 clipped to [0, 1].
As in the public code, a prompt is the client statement: text from "[SEP]" on is dropped and the
rest stripped, so both `prompt` and `prompt + " [SEP] "` give the same score.

Deviations from the paper / public code:
- Fluency is batched (right padding, per-row mean NLL over its real tokens); the public code runs
  one pair at a time. Same numbers. The score is clipped to [0, 1] (SPEC §3); the public code
  leaves (50 - ppl) / 50 unclipped, so it can go negative.
- A NaN/inf score is an InputError naming the scorer (the public code would train on it).
- Edit rate tokenises with a regex (words and punctuation marks are tokens) instead of
  nltk.word_tokenize (not a dependency); contractions ("don't") stay one token here.
- The reflection scorer's vocabulary must match its embedding size exactly (the public code loads
  its .pt with strict=False; here a missing/unexpected key is an error, pooler keys are dropped by
  convert_checkpoint, which reports every rename).
"""
from __future__ import annotations

import math
import os
import re

import torch
from torch import nn

import t5
from t5 import InputError

OBJECTIVES = ("reflection", "empathy", "fluency")
CLIP_MIN, CLIP_MAX = 1e-4, 0.9999          # logsum clipping of the public code
FLUENCY_CAP = 50.0                          # score = (CAP - ppl) / CAP


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


def combine_logsum(scores: torch.Tensor, weights) -> torch.Tensor:
    """scores [N, d], weights [d] -> Σ_i w_i · log(clip(s_i, 1e-4, 0.9999))  [N]  (SPEC §2, "logsum")."""
    return (scores.clamp(CLIP_MIN, CLIP_MAX).log() * _weights(weights, scores)).sum(dim=1)


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
