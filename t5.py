"""T5 encoder-decoder in plain PyTorch: the policy of EMORL (file helpers: files.py).

Paper: the policy is T5-base (§5.2); training adds LoRA adapters to its linear layers (§4, Eq. 4,
lora.py); hidden-state aggregation (§4.1, Eq. 2, search.py) needs the last decoder hidden state
*after* the final layer norm, apart from the LM head: `decode` returns it, `logits` applies the head.
Generation (§5.2, SPEC §1): prompt + " [SEP] " -> at most 64 new tokens, stop at </s>.

T5 (Raffel et al., 2020) details reproduced weight-for-weight with Hugging Face (tests/test_t5.py):
- pre-norm residual blocks; RMS layer norm (no mean, no bias) computed in fp32;
- attention without the 1/sqrt(d) scaling; relative position bias (32 log-spaced buckets up to
  128 tokens; bidirectional in the encoder, causal in the decoder) computed by the first block
  of each stack and added in every block; none on cross-attention;
- v1.0: ReLU feed-forward, LM head tied to the input embedding, decoder output rescaled by
  d_model^-0.5; v1.1 / flan: gated tanh-GELU feed-forward, untied LM head, no rescaling;
- dropout where HF has it (embeddings, attention weights, sublayer outputs, FFN, final norm);
- incremental decoding: self-attention K/V are written in place into preallocated buffers (gpt-fast
  style, doubled when full), cross-attention K/V and the decoder's causal position bias table are
  computed once per prompt (`KVCache`); `decode_loop` knows nothing of the model, so the
  ensembles of search.py reuse it with their own `next_logits`.
- Module names equal HF's parameter names; `checkpoint_key_map(model)` is the printable key map
  (identity + the tied / unused keys HF may or may not write).

Deviations from Hugging Face / the public code:
- no fp16 overflow clamping (run fp32 or bf16); no beam search, top-k/top-p, repetition penalty;
- special-token strings inside text ("</s>", "<extra_id_0>") are tokenized as plain text;
- HF 5.x writes `tie_word_embeddings: true` for every T5 and keeps the v1.0 / v1.1 difference in
  `scale_decoder_outputs`; the config carries both fields (`scale_decoder_outputs` defaults to
  `tie_word_embeddings`, which is what HF 4.x checkpoints mean), and a "tied" checkpoint whose
  lm_head.weight differs from shared.weight is loaded untied, as HF 5.x does. The rule follows
  config.json's model_type as HF 5.x does: "t5" as above, "mt5" never rescales (HF's MT5 has no rescale),
  any other family (umt5, longt5, ...) is refused;
- untied input embeddings (encoder/decoder.embed_tokens != shared) are refused, not loaded;
- bucket configurations HF cannot look up (max_distance <= num_buckets/2 or /4 gives garbage buckets
  past some distance; HF raises IndexError there, or divides by zero under 4 buckets) are one
  InputError naming the longest usable length; the decoder's precomputed square never fails for
  rows it does not use (tests/test_t5.py checks a grid against HF).
"""
from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from files import InputError, atomic_write, load_safetensors, load_strict, read_json, save_safetensors, write_json


# ----------------------------------------------------------------------------- config
@dataclass
class T5Config:
    vocab_size: int = 32128
    d_model: int = 512
    d_kv: int = 64
    d_ff: int = 2048
    num_layers: int = 6
    num_decoder_layers: int | None = None
    num_heads: int = 8
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    dropout_rate: float = 0.1
    layer_norm_epsilon: float = 1e-6
    feed_forward_proj: str = "relu"  # "relu" (v1.0) | "gated-gelu" (v1.1, flan)
    tie_word_embeddings: bool = True  # LM head = shared embedding (no lm_head module)
    scale_decoder_outputs: bool | None = None  # d_model^-0.5 before the LM head; None: = tie_word_embeddings
    pad_token_id: int = 0
    eos_token_id: int = 1
    decoder_start_token_id: int = 0

    def __post_init__(self):
        if self.num_decoder_layers is None:
            self.num_decoder_layers = self.num_layers
        if self.scale_decoder_outputs is None:
            self.scale_decoder_outputs = self.tie_word_embeddings
        if self.relative_attention_num_buckets < 4 or self.relative_attention_max_distance < 1:
            raise InputError(f"relative_attention_num_buckets {self.relative_attention_num_buckets} / max_distance "
                             f"{self.relative_attention_max_distance}: need >= 4 buckets (the encoder halves them) "
                             f"and a max_distance >= 1 (transformers fails on any input otherwise)")
        if self.feed_forward_proj not in ("relu", "gated-gelu"):
            raise InputError(f"feed_forward_proj {self.feed_forward_proj!r} is not supported (relu or gated-gelu)")

    @classmethod
    def from_json(cls, path):
        """Read a Hugging Face T5 config.json. Unknown keys (HF writes many) are ignored."""
        raw = read_json(path)
        if not isinstance(raw, dict):
            raise InputError(f"{path}: expected a JSON object")
        family = raw.get("model_type", "t5")
        if family not in ("t5", "mt5"):
            raise InputError(f"{path}: model_type {family!r} is not supported (t5, mt5)")
        if family == "mt5":  # HF's MT5 never rescales the decoder output, whatever tie_word_embeddings says
            raw["scale_decoder_outputs"] = False
        for key in ("vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_heads"):
            if not isinstance(raw.get(key), int) or raw[key] <= 0:
                raise InputError(f"{path}: key {key} must be a positive integer, got {raw.get(key)!r}")
        # HF writes is_gated_act / dense_act_fn derived from feed_forward_proj: derive it back if absent
        act = {"gelu_new": "gelu"}.get(raw.get("dense_act_fn"), raw.get("dense_act_fn"))
        derived = ("gated-" if raw.get("is_gated_act") else "") + act if act else None
        raw.setdefault("feed_forward_proj", derived or "relu")
        if derived and derived != raw["feed_forward_proj"]:
            raise InputError(f"{path}: feed_forward_proj {raw['feed_forward_proj']!r} contradicts "
                             f"is_gated_act/dense_act_fn ({raw.get('is_gated_act')}, {raw['dense_act_fn']!r})")
        fields = {k: raw[k] for k in cls.__dataclass_fields__ if raw.get(k) is not None}
        fields.setdefault("decoder_start_token_id", fields.get("pad_token_id", 0))
        for key in ("pad_token_id", "eos_token_id", "decoder_start_token_id"):
            if not isinstance(fields.get(key, 0), int):
                raise InputError(f"{path}: key {key} must be one integer, got {fields[key]!r}")
        try:
            return cls(**fields)
        except InputError as e:
            raise InputError(f"{path}: {e}") from None

    def to_dict(self):
        """HF-compatible config.json content (readable by transformers 4.x and 5.x)."""
        gated = self.feed_forward_proj == "gated-gelu"
        return {"architectures": ["T5ForConditionalGeneration"], "model_type": "t5", **asdict(self),
                "dense_act_fn": "gelu_new" if gated else "relu", "is_gated_act": gated, "is_encoder_decoder": True}


# ----------------------------------------------------------------------------- model
class T5LayerNorm(nn.Module):
    """RMS norm: scale only, no mean subtraction, no bias; statistics in fp32."""

    def __init__(self, d_model, eps=1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d_model))
        self.eps = eps

    def forward(self, x):  # F.rms_norm: x * rsqrt(mean(x^2) + eps) in one kernel (bit-identical in fp32)
        if x.dtype == self.weight.dtype == torch.float32:
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)
        return self.weight * F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).to(self.weight.dtype)


def relative_position_bucket(relative_position, bidirectional, num_buckets=32, max_distance=128):
    """Map key_position - query_position to a bucket: exact for small distances, log-spaced up to
    max_distance, one bucket beyond. Bidirectional (encoder) halves the buckets by sign; causal
    (decoder) only looks back. HF's maths, quirks included: where max_distance <= max_exact (e.g.
    64 causal buckets up to 32) the log-spaced range is empty or runs backwards, and distances from
    max_exact on get garbage (often negative) buckets; `bucket_reach` finds where they start."""
    buckets = 0
    if bidirectional:
        num_buckets //= 2
        buckets = (relative_position > 0).long() * num_buckets
        distance = relative_position.abs()
    else:
        distance = (-relative_position).clamp(min=0)
    max_exact = num_buckets // 2
    log_bucket = max_exact + (torch.log(distance.float() / max_exact) / math.log(max_distance / max_exact)
                              * (num_buckets - max_exact)).long()
    log_bucket = log_bucket.clamp(max=num_buckets - 1)
    return buckets + torch.where(distance < max_exact, distance, log_bucket)


def bucket_reach(bidirectional, num_buckets, max_distance, length) -> int:
    """The longest sequence, up to `length`, whose every distance (looking back, and forward if
    bidirectional) has a bucket in range; computed on the CPU from the configuration alone."""
    distance = torch.arange(length, device="cpu")  # explicitly: whatever the default device
    relative = torch.stack([-distance, distance]) if bidirectional else -distance[None]
    buckets = relative_position_bucket(relative, bidirectional, num_buckets, max_distance)
    bad = ((buckets < 0) | (buckets >= num_buckets)).any(0)
    return int(bad.int().argmax()) if bad.any() else length


def padding_bias(mask, dtype):
    """[B,S] 1 = token, 0 = padding -> additive attention bias [B,1,1,S]."""
    return (1.0 - mask[:, None, None, :].to(dtype)) * torch.finfo(dtype).min


class Dropout(nn.Dropout):
    """nn.Dropout that costs nothing in eval mode: decoding calls it thousands of times per reply."""

    def forward(self, x):
        return F.dropout(x, self.p, True) if self.training and self.p > 0 else x


class T5Attention(nn.Module):
    def __init__(self, config: T5Config, has_relative_attention_bias=False, bidirectional=True):
        super().__init__()
        self.n_heads, self.d_kv, self.dropout = config.num_heads, config.d_kv, config.dropout_rate
        inner = config.num_heads * config.d_kv
        self.q = nn.Linear(config.d_model, inner, bias=False)
        self.k = nn.Linear(config.d_model, inner, bias=False)
        self.v = nn.Linear(config.d_model, inner, bias=False)
        self.o = nn.Linear(inner, config.d_model, bias=False)
        self.bidirectional = bidirectional
        self.num_buckets = config.relative_attention_num_buckets
        self.max_distance = config.relative_attention_max_distance
        if has_relative_attention_bias:
            self.relative_attention_bias = nn.Embedding(config.relative_attention_num_buckets, config.num_heads)

    def position_bias(self, query_len, key_len, offset=0):
        """[1,H,query_len,key_len]; queries sit at positions offset .. offset+query_len-1. Buckets out of
        range (see relative_position_bucket) are clamped: callers use only distances below
        `bucket_reach` (the decoder's table is computed for more positions than it serves)."""
        device = self.relative_attention_bias.weight.device
        query = torch.arange(offset, offset + query_len, device=device)[:, None]
        key = torch.arange(key_len, device=device)[None, :]
        buckets = relative_position_bucket(key - query, self.bidirectional, self.num_buckets, self.max_distance)
        return self.relative_attention_bias(buckets.clamp(0, self.num_buckets - 1)).permute(2, 0, 1).unsqueeze(0)

    def reach(self, length) -> int:
        return bucket_reach(self.bidirectional, self.num_buckets, self.max_distance, length)

    def check_length(self, length, reach):
        """HF raises IndexError on a sequence whose distances reach a bucket out of range: one line here."""
        if length > reach:
            raise InputError(f"this T5's relative position buckets (relative_attention_num_buckets {self.num_buckets}, "
                             f"max_distance {self.max_distance}) have no bucket for {'encoder' if self.bidirectional else 'decoder'} "
                             f"sequences over {reach} tokens (transformers fails there too); this input needs {length}")

    def heads(self, x):  # [B,T,H*dk] -> [B,H,T,dk]
        return x.view(x.shape[0], x.shape[1], self.n_heads, self.d_kv).transpose(1, 2)

    def key_values(self, x):
        return self.heads(self.k(x)), self.heads(self.v(x))

    def forward(self, x, key, value, bias):
        """x [B,T,D] attends to key/value [B,H,S,dk]; bias = position bias + masks, broadcast to [B,H,T,S]."""
        scores = self.heads(self.q(x)) @ key.transpose(2, 3) + bias  # T5: no 1/sqrt(d_kv)
        weights = torch.softmax(scores.float(), -1).to(scores.dtype)
        if self.training and self.dropout > 0:
            weights = F.dropout(weights, self.dropout, True)
        out = weights @ value
        return self.o(out.transpose(1, 2).reshape(x.shape[0], x.shape[1], -1))


class T5DenseActDense(nn.Module):
    """ReLU (v1.0): wo(relu(wi x)); gated-GELU (v1.1): wo(gelu_tanh(wi_0 x) * wi_1 x)."""

    def __init__(self, config: T5Config):
        super().__init__()
        self.gated = config.feed_forward_proj == "gated-gelu"
        if self.gated:
            self.wi_0 = nn.Linear(config.d_model, config.d_ff, bias=False)
            self.wi_1 = nn.Linear(config.d_model, config.d_ff, bias=False)
        else:
            self.wi = nn.Linear(config.d_model, config.d_ff, bias=False)
        self.wo = nn.Linear(config.d_ff, config.d_model, bias=False)
        self.dropout = Dropout(config.dropout_rate)

    def forward(self, x):
        if self.gated:
            h = F.gelu(self.wi_0(x), approximate="tanh") * self.wi_1(x)
        else:
            h = F.relu(self.wi(x))
        return self.wo(self.dropout(h))


class T5LayerSelfAttention(nn.Module):
    """x + SelfAttention(norm(x)); `past` holds the K/V of earlier decoder tokens."""

    def __init__(self, config, has_relative_attention_bias, bidirectional):
        super().__init__()
        self.SelfAttention = T5Attention(config, has_relative_attention_bias, bidirectional)
        self.layer_norm = T5LayerNorm(config.d_model, config.layer_norm_epsilon)
        self.dropout = Dropout(config.dropout_rate)

    def forward(self, x, bias, cache=None, layer=0):
        h = self.layer_norm(x)
        key, value = self.SelfAttention.key_values(h)
        if cache is not None:
            key, value = cache.append(layer, key, value)
        return x + self.dropout(self.SelfAttention(h, key, value, bias))


class T5LayerCrossAttention(nn.Module):
    """x + EncDecAttention(norm(x), encoder K/V); no position bias, only the prompt's padding mask."""

    def __init__(self, config):
        super().__init__()
        self.EncDecAttention = T5Attention(config)
        self.layer_norm = T5LayerNorm(config.d_model, config.layer_norm_epsilon)
        self.dropout = Dropout(config.dropout_rate)

    def forward(self, x, key_value, bias):
        return x + self.dropout(self.EncDecAttention(self.layer_norm(x), *key_value, bias))


class T5LayerFF(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.DenseReluDense = T5DenseActDense(config)
        self.layer_norm = T5LayerNorm(config.d_model, config.layer_norm_epsilon)
        self.dropout = Dropout(config.dropout_rate)

    def forward(self, x):
        return x + self.dropout(self.DenseReluDense(self.layer_norm(x)))


class T5Block(nn.Module):
    def __init__(self, config, is_decoder, first):
        super().__init__()
        layers = [T5LayerSelfAttention(config, first, bidirectional=not is_decoder)]
        layers += [T5LayerCrossAttention(config)] if is_decoder else []
        self.layer = nn.ModuleList(layers + [T5LayerFF(config)])


class T5Stack(nn.Module):
    """Blocks + final norm (+ dropout on the embeddings and the output, as HF). The token embedding
    lives in the parent (`shared`), so no tied copy appears in the state dict."""

    def __init__(self, config, is_decoder):
        super().__init__()
        n = config.num_decoder_layers if is_decoder else config.num_layers
        self.block = nn.ModuleList(T5Block(config, is_decoder, first=(i == 0)) for i in range(n))
        self.final_layer_norm = T5LayerNorm(config.d_model, config.layer_norm_epsilon)
        self.dropout = Dropout(config.dropout_rate)


class KVCache:
    """Decoder state between `decode` calls: per layer the self-attention K/V of every token so far
    and the cross-attention K/V of the encoder output (computed once). gpt-fast style, the self K/V
    live in buffers [B,H,capacity,dk] written in place (a full buffer doubles), not re-concatenated
    every step; `position_bias` is the decoder's causal bias for every (query, key) position pair,
    computed once per capacity, so a step only slices it."""

    def __init__(self, num_layers, capacity=64):
        self.capacity = capacity  # default: SPEC's 64 new tokens; a longer decode doubles it
        self.self_k, self.self_v = [None] * num_layers, [None] * num_layers
        self.cross_kv = [None] * num_layers
        self.cross_bias = None
        self.position_bias = None  # [1,H,capacity,capacity], set by T5ForConditionalGeneration.decode
        self.reach = capacity  # rows of position_bias whose buckets are all in range (t5.bucket_reach)
        self.length = 0  # decoder tokens seen

    def append(self, layer, key, value):
        """Write the new tokens' K/V [B,H,new,dk] after the cached ones; -> all K/V so far (views)."""
        start, end = self.length, self.length + key.shape[2]
        if self.self_k[layer] is None or end > self.self_k[layer].shape[2]:
            grown = [key.new_zeros(*key.shape[:2], self.capacity, key.shape[3]) for _ in range(2)]
            for buffer, old in zip(grown, (self.self_k[layer], self.self_v[layer])):
                if old is not None:
                    buffer[:, :, :start] = old[:, :, :start]
            self.self_k[layer], self.self_v[layer] = grown
        self.self_k[layer][:, :, start:end] = key
        self.self_v[layer][:, :, start:end] = value
        return self.self_k[layer][:, :, :end], self.self_v[layer][:, :, :end]


class T5ForConditionalGeneration(nn.Module):
    def __init__(self, config: T5Config):
        super().__init__()
        self.config = config
        self.shared = nn.Embedding(config.vocab_size, config.d_model)
        self.encoder = T5Stack(config, is_decoder=False)
        self.decoder = T5Stack(config, is_decoder=True)
        if not config.tie_word_embeddings:
            self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        self.apply(self._init_weights)

    def _init_weights(self, module):
        """Mesh-TensorFlow's T5 init (so fresh tiny models behave like real ones in tests)."""
        c = self.config
        if isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=1.0 if module is self.shared else c.d_model ** -0.5)
        elif isinstance(module, T5Attention):
            nn.init.normal_(module.q.weight, std=(c.d_model * c.d_kv) ** -0.5)
            for linear in (module.k, module.v):
                nn.init.normal_(linear.weight, std=c.d_model ** -0.5)
            nn.init.normal_(module.o.weight, std=(c.num_heads * c.d_kv) ** -0.5)
        elif isinstance(module, T5DenseActDense):
            for name in ("wi", "wi_0", "wi_1"):
                if hasattr(module, name):
                    nn.init.normal_(getattr(module, name).weight, std=c.d_model ** -0.5)
            nn.init.normal_(module.wo.weight, std=c.d_ff ** -0.5)
        elif module is getattr(self, "lm_head", None):
            nn.init.normal_(module.weight, std=c.d_model ** -0.5)

    def encode(self, input_ids, attention_mask):
        """[B,S] token ids + [B,S] 1/0 mask -> encoder output [B,S,D] (after the final norm)."""
        enc = self.encoder
        x = enc.dropout(self.shared(input_ids))
        attention = enc.block[0].layer[0].SelfAttention
        attention.check_length(x.shape[1], attention.reach(x.shape[1]))
        bias = attention.position_bias(x.shape[1], x.shape[1]).to(x.dtype)
        bias = bias + padding_bias(attention_mask, x.dtype)  # computed once, used by every block
        for block in enc.block:
            self_attention, feed_forward = block.layer
            x = self_attention(x, bias)
            x = feed_forward(x)
        return enc.dropout(enc.final_layer_norm(x))

    def decode(self, decoder_input_ids, encoder_hidden, encoder_mask, cache=None):
        """Run the decoder on `decoder_input_ids` [B,T]: the whole sequence when cache is None,
        else only the new token(s) after those the cache holds. Returns (hidden [B,T,D] after the
        final layer norm -- the f_i of Eq. (2) --, cache)."""
        dec = self.decoder
        if cache is None:
            cache = KVCache(len(dec.block), capacity=max(64, decoder_input_ids.shape[1]))
        if cache.cross_bias is None:
            cache.cross_bias = padding_bias(encoder_mask, encoder_hidden.dtype)
        x = dec.dropout(self.shared(decoder_input_ids))
        past, new = cache.length, x.shape[1]
        if past + new > cache.capacity:  # grow to twice what is needed: amortised O(1) per token
            cache.capacity, cache.position_bias = 2 * (past + new), None
        attention = dec.block[0].layer[0].SelfAttention
        if cache.position_bias is None:
            size = cache.capacity
            bias = attention.position_bias(size, size).to(x.dtype)
            causal = torch.ones(size, size, dtype=torch.bool, device=x.device).triu(1)  # key after query
            cache.position_bias = bias.masked_fill(causal, torch.finfo(x.dtype).min)
            cache.reach = attention.reach(size)  # rows past it hold clamped buckets: never sliced
        attention.check_length(past + new, cache.reach)
        bias = cache.position_bias[:, :, past:past + new, :past + new]
        for i, block in enumerate(dec.block):
            self_attention, cross_attention, feed_forward = block.layer
            x = self_attention(x, bias, cache, i)
            if cache.cross_kv[i] is None:  # once per prompt; contiguous, so no step copies it again
                cache.cross_kv[i] = [t.contiguous() for t in cross_attention.EncDecAttention.key_values(encoder_hidden)]
            x = cross_attention(x, cache.cross_kv[i], cache.cross_bias)
            x = feed_forward(x)
        cache.length = past + new
        return dec.dropout(dec.final_layer_norm(x)), cache

    def logits(self, hidden):
        """LM head on decoder hidden states [..., D] -> [..., V]."""
        if self.config.scale_decoder_outputs:  # v1.0: tied head, output rescaled by d_model^-0.5
            hidden = hidden * self.config.d_model ** -0.5
        if self.config.tie_word_embeddings:
            return F.linear(hidden, self.shared.weight)
        return self.lm_head(hidden)

    def forward(self, input_ids, attention_mask, decoder_input_ids, repeat=1):
        """Teacher forcing: logits [B·repeat,T,V] for every decoder position. repeat k (as generate's): each prompt
        row stands for k adjacent decoder rows, so the encoder runs once per prompt (where no dropout acts, the
        numbers of encoding every copy)."""
        encoder_hidden = self.encode(input_ids, attention_mask).repeat_interleave(repeat, 0)
        hidden, _ = self.decode(decoder_input_ids, encoder_hidden, attention_mask.repeat_interleave(repeat, 0))
        return self.logits(hidden)


# ----------------------------------------------------------------------------- generation
def top_k_filter(scores: torch.Tensor, top_k: int) -> torch.Tensor:
    """Keep each row's top_k scores (ties with the k-th kept, as HF's TopKLogitsWarper), the rest -inf.
    top_k = 0 (or >= vocabulary) keeps the full distribution."""
    if not top_k or top_k >= scores.shape[-1]:
        return scores
    kth = scores.topk(top_k, dim=-1).values[..., -1:]
    return scores.masked_fill(scores < kth, float("-inf"))


def decode_loop(next_logits, batch_size, *, max_new_tokens=64, start_id=0, eos_id=1, pad_id=0,
                do_sample=False, temperature=1.0, top_k=0, generator=None, device="cpu"):
    """Autoregressive loop, model-agnostic: `next_logits(last_tokens [B]) -> logits [B,V]` keeps its
    own state (KV caches) in a closure. Greedy (argmax) or sampling from softmax(logits/temperature)
    restricted to the top_k tokens (0 = all; HF generate's default, used by the public code, is 50).
    Returns (tokens [B,T], logprobs [B,T]): tokens exclude the start token and include eos; after a
    row's eos its tokens are pad_id with logprob 0; T < max_new_tokens when every row finished.
    The logprobs are those of the full softmax(logits/temperature), not of the truncated sampler."""
    tokens = torch.full((batch_size, max_new_tokens), pad_id, dtype=torch.long, device=device)
    logprobs = torch.zeros(batch_size, max_new_tokens, device=device)
    finished = torch.zeros(batch_size, dtype=torch.bool, device=device)
    last = torch.full((batch_size,), start_id, dtype=torch.long, device=device)
    steps = 0
    for t in range(max_new_tokens):
        logits = next_logits(last).float()
        log_p = torch.log_softmax(logits / temperature if do_sample else logits, -1)
        if do_sample:  # Gumbel-max: argmax(log p + Gumbel noise) is a draw from p, cheaper than multinomial
            uniform = torch.rand(log_p.shape, generator=generator, device=log_p.device)
            token = (top_k_filter(log_p, top_k) - torch.log(-torch.log(uniform))).argmax(-1)
        else:
            token = logits.argmax(-1)
        token = token.masked_fill(finished, pad_id)
        tokens[:, t] = token
        logprobs[:, t] = log_p.gather(1, token[:, None]).squeeze(1).masked_fill(finished, 0.0)
        finished |= token == eos_id
        last, steps = token, t + 1
        if finished.all():
            break
    return tokens[:, :steps], logprobs[:, :steps]


@torch.no_grad()
def generate(model, input_ids, attention_mask, *, max_new_tokens=64, do_sample=False, temperature=1.0,
             top_k=0, generator=None, repeat=1):
    """Encode once, then decode one token per step with the KV cache. -> (tokens, logprobs).
    repeat k: decode each prompt k times in adjacent rows (SCST's k samples): the encoder runs on the distinct
    prompts only, a k-th of its work, and its output rows are copied k times (the numbers of encoding every copy)."""
    encoder_hidden = model.encode(input_ids, attention_mask).repeat_interleave(repeat, 0)
    attention_mask = attention_mask.repeat_interleave(repeat, 0)
    cache = KVCache(len(model.decoder.block), capacity=max_new_tokens)

    def next_logits(last):
        nonlocal cache
        hidden, cache = model.decode(last[:, None], encoder_hidden, attention_mask, cache)
        return model.logits(hidden[:, -1])

    c = model.config
    return decode_loop(next_logits, attention_mask.shape[0], max_new_tokens=max_new_tokens,
                       start_id=c.decoder_start_token_id, eos_id=c.eos_token_id, pad_id=c.pad_token_id,
                       do_sample=do_sample, temperature=temperature, top_k=top_k, generator=generator,
                       device=input_ids.device)


# ----------------------------------------------------------------------------- tokenizer
class T5Tokenizer:
    """SentencePiece with T5's conventions: pad 0, eos 1, unk 2, `</s>` appended to every text, and
    100 sentinels <extra_id_0..99> above the SentencePiece vocabulary, <extra_id_0> the highest."""

    pad_id, eos_id, unk_id = 0, 1, 2

    def __init__(self, spiece_model_path, extra_ids=100):
        import sentencepiece

        if not os.path.isfile(spiece_model_path):
            hint = os.path.isfile(os.path.join(os.path.dirname(spiece_model_path), "tokenizer.json"))
            raise InputError(f"{spiece_model_path}: file not found" + (" (transformers 5 saves only tokenizer.json: copy "
                             "spiece.model from the original checkpoint)" if hint else ""))
        self.sp = sentencepiece.SentencePieceProcessor()
        try:
            self.sp.Load(spiece_model_path)
        except (OSError, RuntimeError) as e:
            raise InputError(f"{spiece_model_path}: not a SentencePiece model ({e})") from None
        found = (self.sp.pad_id(), self.sp.eos_id(), self.sp.unk_id())
        if found != (self.pad_id, self.eos_id, self.unk_id):
            raise InputError(f"{spiece_model_path}: pad/eos/unk ids are {found}, T5 expects (0, 1, 2)")
        self.vocab_size = self.sp.get_piece_size() + extra_ids

    def encode(self, text) -> list[int]:
        return self.sp.encode(text) + [self.eos_id]

    def batch_encode(self, texts, max_length=128, device="cpu"):
        """-> (input_ids, attention_mask) [B,L], right-padded with pad_id; a truncated text keeps its eos."""
        rows = [self.encode(text) for text in texts]
        rows = [ids if len(ids) <= max_length else ids[:max_length - 1] + [self.eos_id] for ids in rows]
        width = max(map(len, rows), default=0)
        input_ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros(len(rows), width, dtype=torch.long)
        for i, ids in enumerate(rows):
            input_ids[i, :len(ids)] = torch.tensor(ids)
            attention_mask[i, :len(ids)] = 1
        return input_ids.to(device), attention_mask.to(device)

    def decode(self, ids) -> str:
        """Text of the ids, skipping pad/eos/unk and the sentinels."""
        ids = ids.tolist() if torch.is_tensor(ids) else ids
        return self.sp.decode([i for i in ids if 2 < i < self.sp.get_piece_size()])

    def batch_decode(self, tokens) -> list[str]:
        return [self.decode(row) for row in (tokens.tolist() if torch.is_tensor(tokens) else tokens)]


# ----------------------------------------------------------------------------- checkpoints
def checkpoint_key_map(model) -> dict[str, str | None]:
    """Hugging Face checkpoint key -> our parameter name (None: not a parameter here, see why below).
    Module names equal HF's, so the map is the identity plus the tied/unused keys."""
    key_map = {key: key for key in model.state_dict()}
    key_map["encoder.embed_tokens.weight"] = None  # HF's tied copies of shared.weight
    key_map["decoder.embed_tokens.weight"] = None
    key_map["decoder.block.0.layer.1.EncDecAttention.relative_attention_bias.weight"] = None  # old, never used
    if model.config.tie_word_embeddings:
        key_map["lm_head.weight"] = None  # = shared.weight
    return key_map


def load_t5(directory, device="cpu"):
    """Load a HF T5 directory: config.json + *.safetensors + spiece.model -> (model in eval mode, tokenizer).
    Every key of the file is mapped (`checkpoint_key_map`); anything missing, unexpected, mis-shaped
    or a tied copy that differs from shared.weight is an InputError naming it."""
    if not os.path.isdir(directory):
        raise InputError(f"{directory}: not a directory")
    config = T5Config.from_json(os.path.join(directory, "config.json"))
    tokenizer = T5Tokenizer(os.path.join(directory, "spiece.model"))
    tensors = load_safetensors(directory)
    if "shared.weight" not in tensors:  # some exports name the embedding only by a tied copy
        for alias in ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight"):
            if alias in tensors:
                tensors["shared.weight"] = tensors[alias]
                break
    shared = tensors.get("shared.weight")
    head = tensors.get("lm_head.weight")
    if config.tie_word_embeddings and head is not None and shared is not None and not torch.equal(head, shared):
        config.tie_word_embeddings = False  # HF 5.x: "tied" in config.json, but its own lm_head in the file
    model = T5ForConditionalGeneration(config)
    key_map, state = checkpoint_key_map(model), {}
    for key, value in tensors.items():
        target = key_map.get(key, key)  # an unknown key goes through under its name: load_strict reports it
        if target is not None:
            state[target] = value
        elif key.endswith("embed_tokens.weight") and not torch.equal(value, shared):
            raise InputError(f"{directory}: key {key} differs from shared.weight (untied embeddings are not supported)")
    load_strict(model, state, directory)
    if tokenizer.vocab_size > config.vocab_size:
        raise InputError(f"{directory}: spiece.model has {tokenizer.vocab_size} ids (with sentinels), "
                         f"more than config.json's vocab_size {config.vocab_size}")
    return model.to(device).eval(), tokenizer


def save_t5(model, tokenizer_or_spiece_path, directory):
    """Write config.json, model.safetensors and spiece.model in the HF layout (each file atomically)."""
    os.makedirs(directory, exist_ok=True)
    if isinstance(tokenizer_or_spiece_path, T5Tokenizer):
        spiece = tokenizer_or_spiece_path.sp.serialized_model_proto()
    else:
        with open(tokenizer_or_spiece_path, "rb") as f:
            spiece = f.read()
    base = {k: v for k, v in model.state_dict().items() if ".lora_" not in k}  # adapters: lora.save_adapter
    save_safetensors(base, os.path.join(directory, "model.safetensors"), metadata={"format": "pt"})
    atomic_write(os.path.join(directory, "spiece.model"), spiece)
    write_json(os.path.join(directory, "config.json"), model.config.to_dict())
