"""Build the embedded default models under data/default/: the small stand-ins this project ships for
the paper's T5-base policy and its three scorers (paper §5.2, §5.3; SPEC §3), trained here from the
sample data so every command runs offline, plus a fourth stand-in objective for the scalability
scenario (§5.4: a new objective, a new adapter). Run:  python emorl.py build-default --force | --out DIR [--seed S]

What it trains (every model only on the *train* split of split_dataset(PAIR, 0) -- the commands'
default split -- so the held-out numbers in metrics.json are honest):
1. a SentencePiece unigram vocabulary (pad 0, eos 1, unk 2, no bos, "[SEP]" a user-defined piece);
2. policy: a T5 v1.0 (ReLU, tied embeddings) warm-started by supervised learning with teacher
   forcing on policy_input(prompt) -> hq1 / hq2 / mq1 (and Psych8k input -> output), mixed with a
   denoising task ("restore: " + text with words dropped -> text) for more target-side English
   (the paper starts RL from a pre-trained T5-base that already writes sentences; RL needs a
   policy whose greedy output is a short sentence ending with </s>);
3. reflection: a RoBERTa cross-encoder + Linear-ELU-Linear head, BCE of sigmoid(head(CLS)) against
   level / 2 (hq 1, mq 0.5, lq 0);
4. empathy: a BERT sequence classifier (num_labels = 1), MSE of the logit against label / 2;
5. fluency: a GPT-2 language model of everyday talk (prompts + the poor replies lq1-lq5, Psych8k
   input + output; no reflection), in exactly the scorer's format BPE(prompt) + BPE(response);
6. autonomy ("no unsolicited advice", not in the paper): a smaller BERT sequence classifier with two
   labels (advice 0, autonomy 1) on the empathy scorer's WordPiece vocabulary, softmax cross-entropy
   against data/pair_autonomy.csv; score = P(autonomy). Trained last, with its own seed (seed + 4), so
   models 1-5 are byte-identical to a build without it.
Each folder has Hugging Face's layout (config.json, model.safetensors, tokenizer files) and is read
back through the project's own loaders (t5.load_t5, rewards.*Scorer.from_dir, bert.load_bert) to compute
OUT/metrics.json: per scorer the held-out mean score of hq / mq / lq responses and the AUC
P(random hq > random lq) (autonomy: also P(random autonomy-labelled > random advice-labelled response));
for the policy held-out SL loss, </s> rate, length, examples, scores.

Deviations from the paper / public code (which download pre-trained weights):
- Tiny models trained on ~160 prompts: they rank responses sensibly but are no substitute for
  RoBERTa-base / bert-empathy / GPT-2 / T5-base; pass real folders with --policy/--reflection/...
- bert.py / gpt2.py are inference-only (no dropout layers); training adds residual dropout with
  forward hooks (`dropout_hooks`), removed before saving, so the saved modules are untouched.
- Same seed, same machine -> same files and metrics (seeded init, dropout and data order;
  SentencePiece and torch run single-threaded during the build, the caller's torch thread count is
  restored after). The "seconds" entry of metrics.json is wall time, the one thing a rebuild changes.
- The policy's encoder also sees "restore: ..." inputs during the warm start (denoising task);
  RL and every command only ever feed it policy_input(prompt).
"""
from __future__ import annotations

import contextlib
import dataclasses
import io
import math
import os
import random
import time

import torch
import torch.nn.functional as F
from tqdm import tqdm

import bert
import data
import gpt2
import rewards
import files
import t5

HERE = os.path.dirname(os.path.abspath(__file__))
SPLIT_SEED = 0                       # the split every command uses by default (--split-seed 0)
HQ, MQ, LQ = ("hq1", "hq2"), ("mq1",), ("lq1", "lq2", "lq3", "lq4", "lq5")

# The recipe. Epochs are multiplied by `scale`; sizes are fixed.
SPIECE_VOCAB = 2000   # most words whole pieces: greedy output of a tiny model is real words, not sub-word babble
POLICY = dict(d_model=128, d_kv=32, d_ff=512, num_layers=2, num_decoder_layers=2, num_heads=4,
              dropout_rate=0.0, feed_forward_proj="relu", tie_word_embeddings=True)
POLICY_TRAIN = dict(epochs=12, batch_size=64, lr=3e-3)
RESTORE_DROP = 0.25
REFLECTION = dict(vocab=1200, hidden=96, layers=2, heads=4, intermediate=384, positions=256)
REFLECTION_TRAIN = dict(epochs=6, batch_size=32, lr=5e-4)
EMPATHY = dict(vocab=1200, hidden=96, layers=2, heads=4, intermediate=384, positions=256)
EMPATHY_TRAIN = dict(epochs=6, batch_size=32, lr=5e-4)
# Fluency: a small byte-level vocabulary (143 merges) keeps the per-token perplexity of held-out text
# in 10-40, where (50 - ppl) / 50 separates responses (300 pieces: 0.70 vs 0.86 for reflections vs stock
# sympathy, too close to pull; 500: 0.14 vs 0.58; 1,000: > 50, score 0). 12 epochs: the stock phrases of
# everyday talk become predictable to it, so they score well above a reply built of the client's own words.
FLUENCY = dict(vocab=400, n_embd=96, n_layer=2, n_head=4, n_positions=384, dropout=0.1)
FLUENCY_TRAIN = dict(epochs=12, batch_size=32, lr=1e-3)
# Autonomy: smaller than empathy (< 1 MB), on the empathy scorer's WordPiece vocabulary (copied).
AUTONOMY = dict(hidden=64, layers=2, heads=4, intermediate=256, positions=256)
AUTONOMY_TRAIN = dict(epochs=8, batch_size=32, lr=5e-4)
AUTONOMY_LABELS = ("advice", "autonomy")       # index 0, 1: the score is P(label "autonomy")
TRAIN_DROPOUT = 0.1
MAX_SOURCE, MAX_TARGET = 128, 64     # SPEC §1: encoder input <= 128 tokens, <= 64 new tokens


# ----------------------------------------------------------------------------- training helpers
@contextlib.contextmanager
def dropout_hooks(model, p, module_names):
    """Dropout on the output of each named module while the model trains (residual-branch dropout
    for the inference-only encoders of bert.py / gpt2.py). The hooks are removed on exit."""
    modules = dict(model.named_modules())
    hook = lambda module, inputs, output: F.dropout(output, p, module.training)  # noqa: E731
    handles = [modules[name].register_forward_hook(hook) for name in module_names]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def batches(tensors: dict, indices, batch_size):
    """Rows `indices` of the padded tensors in batches, token columns trimmed to the batch's longest
    row: `labels` / `target_mask` by target_mask (seq2seq targets), every other 2-D tensor by attention_mask."""
    for start in range(0, len(indices), batch_size):
        rows = indices[start:start + batch_size]
        batch = {k: v[rows] for k, v in tensors.items()}
        width = int(batch["attention_mask"].sum(1).max())
        target_width = int(batch["target_mask"].sum(1).max()) if "target_mask" in batch else width
        yield {k: v if v.dim() == 1 else v[:, :target_width if k in ("labels", "target_mask") else width]
               for k, v in batch.items()}


def fit(name, model, tensors, loss_of, *, epochs, batch_size, lr, seed, heldout=None):
    """AdamW (weight decay 0.01), linear warm-up over 5% of the steps then linear decay to 0, gradient
    clip 1.0; batches in a seeded random order per epoch; one log line per epoch."""
    generator = torch.Generator().manual_seed(seed)
    n = len(next(iter(tensors.values())))
    steps = epochs * math.ceil(n / batch_size)
    warmup = max(1, steps // 20)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min((s + 1) / warmup, max(0.0, (steps - s) / max(1, steps - warmup))))
    for epoch in range(epochs):
        model.train()
        begin, total, count = time.time(), 0.0, 0
        order = torch.randperm(n, generator=generator)
        for batch in tqdm(list(batches(tensors, order, batch_size)), desc=f"{name} {epoch + 1}/{epochs}", leave=False):
            loss = loss_of(model, batch)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            total, count = total + loss.item() * len(batch["input_ids"]), count + len(batch["input_ids"])
        line = f"{name} epoch {epoch + 1}/{epochs} | loss {total / count:.4f}"
        if heldout is not None:
            line += f" | held-out {evaluate_loss(model, heldout, loss_of):.4f}"
        tqdm.write(line + f" | {time.time() - begin:.1f}s")
    model.eval()
    return model


@torch.no_grad()
def evaluate_loss(model, tensors, loss_of, batch_size=64):
    """Mean of loss_of over the rows (batch losses weighted by rows), model in eval mode."""
    model.eval()
    n = len(next(iter(tensors.values())))
    total = sum(float(loss_of(model, b)) * len(b["input_ids"]) for b in batches(tensors, torch.arange(n), batch_size))
    return total / n


def param_count(model):
    return sum(p.numel() for p in model.parameters())


# ----------------------------------------------------------------------------- 1-2. policy
def train_spiece(texts) -> bytes:
    import sentencepiece

    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(texts), model_writer=model, model_type="unigram", vocab_size=SPIECE_VOCAB,
        hard_vocab_limit=False, pad_id=0, eos_id=1, unk_id=2, bos_id=-1, user_defined_symbols=["[SEP]"],
        character_coverage=1.0, num_threads=1, shuffle_input_sentence=False, minloglevel=2)
    return model.getvalue()


def seq2seq_tensors(tokenizer, pairs):
    """(encoder text, target text) pairs -> padded ids and masks (SPEC §1 lengths)."""
    source, source_mask = tokenizer.batch_encode([s for s, _ in pairs], MAX_SOURCE)
    target, target_mask = tokenizer.batch_encode([t for _, t in pairs], MAX_TARGET)
    return {"input_ids": source, "attention_mask": source_mask, "labels": target, "target_mask": target_mask}


def reflection_pairs(examples):
    """The held-out SL loss's task: policy_input(prompt) -> hq1, hq2, mq1 (how well the base model already
    writes a reflection; reported in metrics.json, not trained on alone)."""
    return [(data.policy_input(e.prompt), e.responses[c]) for e in examples for c in HQ + MQ if c in e.responses]


def response_pairs(examples):
    """The warm-start task: policy_input(prompt) -> each of the eight responses of every kind (PAIR). The
    base model learns to answer a client in all eight ways at once, five of them poor, as a pre-trained
    model that has seen counselling talk but was never taught what a good reflection is (the paper's
    T5-base starts at reflection 0.04): every kind is in its samples, no kind is its goal."""
    return [(data.policy_input(e.prompt), e.responses[c]) for e in examples for c in data.RESPONSE_COLUMNS if c in e.responses]


def restore_pairs(texts, seed):
    """The auxiliary denoising task (T5 itself is pre-trained by denoising): "restore: " + the text with
    each word dropped with probability RESTORE_DROP -> the text. More target-side English to learn from."""
    rng = random.Random(seed)
    return [("restore: " + " ".join(w for w in text.split() if rng.random() >= RESTORE_DROP), text) for text in texts]


def seq2seq_loss(model, batch):
    """Teacher forcing: decoder input = start token (pad 0) + target[:-1]; mean CE over real target tokens."""
    labels = batch["labels"]
    decoder_input = F.pad(labels[:, :-1], (1, 0), value=model.config.decoder_start_token_id)
    logits = model(batch["input_ids"], batch["attention_mask"], decoder_input)
    return F.cross_entropy(logits.transpose(1, 2), labels.masked_fill(batch["target_mask"] == 0, -100))


def build_policy(directory, train, heldout, vocab_texts, seed, epochs):
    os.makedirs(directory, exist_ok=True)
    files.atomic_write(os.path.join(directory, "spiece.model"), train_spiece(vocab_texts))
    tokenizer = t5.T5Tokenizer(os.path.join(directory, "spiece.model"))
    torch.manual_seed(seed)
    model = t5.T5ForConditionalGeneration(t5.T5Config(vocab_size=tokenizer.vocab_size, **POLICY))
    restore_texts = [e.prompt for e in train] + [e.responses["output"] for e in train if "output" in e.responses]
    pairs = response_pairs(train) + restore_pairs(restore_texts, seed)
    heldout_tensors = seq2seq_tensors(tokenizer, reflection_pairs(heldout))
    fit("policy", model, seq2seq_tensors(tokenizer, pairs), seq2seq_loss, epochs=epochs, seed=seed,
        heldout=heldout_tensors, **{k: v for k, v in POLICY_TRAIN.items() if k != "epochs"})
    t5.save_t5(model, tokenizer, directory)
    files.write_json(os.path.join(directory, "tokenizer_config.json"),
                     {"tokenizer_class": "T5Tokenizer", "extra_ids": 100, "model_max_length": MAX_SOURCE,
                      "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>"})
    return heldout_tensors


# ----------------------------------------------------------------------------- 3. reflection scorer
# The reflection stand-in's target by PAIR level: "is this a reflection?", a simple one (mq) nearly as much
# as a complex one (hq). A scorer that saturates on any real reflection, as the paper's does (its adapters reach
# 0.9+), so that a converged reflection adapter's validations are steady enough for the CV rule.
REFLECTION_TARGET = {2: 1.0, 1: 0.8, 0: 0.0}


def scored_pairs(examples):
    """(prompt, response, REFLECTION_TARGET[level]) for every PAIR response column."""
    return [(e.prompt, e.responses[c], REFLECTION_TARGET[data.LEVELS[c]]) for e in examples for c in data.RESPONSE_COLUMNS]


def encoder_config(spec, vocab_size, model_type, labels=None):
    """bert.BertConfig + the Hugging Face config.json fields for it; `labels` (names, index order): a
    classifier with one logit per label (softmax), else a single regression logit."""
    roberta = model_type == "roberta"
    config = bert.BertConfig(vocab_size=vocab_size, hidden_size=spec["hidden"], num_hidden_layers=spec["layers"],
                             num_attention_heads=spec["heads"], intermediate_size=spec["intermediate"],
                             max_position_embeddings=spec["positions"] + (2 if roberta else 0),
                             type_vocab_size=1 if roberta else 2, layer_norm_eps=1e-5 if roberta else 1e-12,
                             pad_token_id=1 if roberta else 0, model_type=model_type, num_labels=len(labels) if labels else 1)
    hf = {**config.to_dict(), "hidden_act": "gelu", "position_embedding_type": "absolute",
          "hidden_dropout_prob": TRAIN_DROPOUT, "attention_probs_dropout_prob": 0.0}
    if roberta:
        hf.update(architectures=["RobertaModel"], bos_token_id=0, eos_token_id=2,
                  emorl_head="head.0 Linear(hidden, 512) -> ELU -> head.2 Linear(512, 1) -> sigmoid (rewards.ReflectionModel)")
        del hf["num_labels"]
    elif labels:
        hf.update(architectures=["BertForSequenceClassification"], id2label={str(i): n for i, n in enumerate(labels)},
                  label2id={n: i for i, n in enumerate(labels)}, problem_type="single_label_classification")
    else:
        hf.update(architectures=["BertForSequenceClassification"], id2label={"0": "LABEL_0"}, label2id={"LABEL_0": 0},
                  problem_type="regression")
    return config, hf


def encoder_dropout_names(encoder, prefix):
    """HF's hidden dropout sites of a post-LN encoder: after the embeddings' LayerNorm and after each
    sub-layer's output dense (before its residual LayerNorm)."""
    names = [f"{prefix}embeddings.LayerNorm"]
    for i in range(len(encoder.encoder.layer)):
        names += [f"{prefix}encoder.layer.{i}.attention.output.dense", f"{prefix}encoder.layer.{i}.output.dense"]
    return names


def with_targets(encoded, targets):
    return {**encoded, "labels": torch.tensor(targets, dtype=torch.float)}


def reflection_loss(model, batch):
    logit = model.head(model.roberta(batch["input_ids"], batch["attention_mask"])[:, 0]).squeeze(-1)
    return F.binary_cross_entropy_with_logits(logit, batch["labels"])  # = BCE(sigmoid(head(CLS)), level / 2)


def build_reflection(directory, train, seed, epochs):
    spec = REFLECTION
    triples = scored_pairs(train)
    texts = [e.prompt for e in train] + [r for _, r, _ in triples]
    vocab, merges = gpt2.train_byte_bpe(texts, spec["vocab"], special_tokens=("<s>", "<pad>", "</s>", "<unk>"))
    os.makedirs(directory, exist_ok=True)
    gpt2.save_bpe(vocab, merges, directory)
    tokenizer = gpt2.ByteLevelBPETokenizer(vocab, merges)
    config, hf = encoder_config(spec, len(vocab), "roberta")
    torch.manual_seed(seed)
    model = rewards.ReflectionModel(config)
    encoded = tokenizer.batch_encode_roberta([p for p, _, _ in triples], [r for _, r, _ in triples], spec["positions"])
    with dropout_hooks(model, TRAIN_DROPOUT, encoder_dropout_names(model.roberta, "roberta.")):
        fit("reflection", model, with_targets(encoded, [t for _, _, t in triples]), reflection_loss, epochs=epochs,
            seed=seed, **{k: v for k, v in REFLECTION_TRAIN.items() if k != "epochs"})
    files.save_safetensors(model.state_dict(), os.path.join(directory, "model.safetensors"), metadata={"format": "pt"})
    files.write_json(os.path.join(directory, "config.json"), hf)
    files.write_json(os.path.join(directory, "tokenizer_config.json"),
                     {"tokenizer_class": "RobertaTokenizer", "model_max_length": spec["positions"],
                      "bos_token": "<s>", "eos_token": "</s>", "sep_token": "</s>", "cls_token": "<s>",
                      "pad_token": "<pad>", "unk_token": "<unk>"})


# ----------------------------------------------------------------------------- 4. empathy scorer
def empathy_loss(model, batch):
    return F.mse_loss(model(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])[:, 0], batch["labels"])


def build_empathy(directory, train, labels, seed, epochs):
    spec = EMPATHY
    train_prompts = {e.prompt for e in train}
    rows = [(p, r, label / 2) for p, r, label in labels if p in train_prompts]
    vocab = bert.train_wordpiece_vocab([e.prompt for e in train] + [r for _, r, _ in rows], spec["vocab"])
    os.makedirs(directory, exist_ok=True)
    files.atomic_write(os.path.join(directory, "vocab.txt"), "".join(token + "\n" for token in vocab))
    files.write_json(os.path.join(directory, "tokenizer_config.json"),
                     {"tokenizer_class": "BertTokenizer", "do_lower_case": True, "model_max_length": spec["positions"]})
    tokenizer = bert.WordPieceTokenizer(vocab)
    config, hf = encoder_config(spec, len(vocab), "bert")
    torch.manual_seed(seed)
    model = bert.BertForSequenceClassification(config)
    encoded = tokenizer.batch_encode([p for p, _, _ in rows], [r for _, r, _ in rows], max_length=spec["positions"])
    with dropout_hooks(model, TRAIN_DROPOUT, encoder_dropout_names(model.bert, "bert.")):
        fit("empathy", model, with_targets(encoded, [t for _, _, t in rows]), empathy_loss, epochs=epochs, seed=seed,
            **{k: v for k, v in EMPATHY_TRAIN.items() if k != "epochs"})
    files.save_safetensors(model.state_dict(), os.path.join(directory, "model.safetensors"), metadata={"format": "pt"})
    files.write_json(os.path.join(directory, "config.json"), hf)


# ----------------------------------------------------------------------------- 5. fluency scorer
def lm_tensors(tokenizer, pairs, n_positions):
    """The fluency scorer's input: BPE(prompt) + BPE(response), truncated longest-first, right-padded."""
    rows = [sum(gpt2.truncate_longest_first(tokenizer.encode(p), tokenizer.encode(r), n_positions), []) for p, r in pairs]
    ids, mask = tokenizer.pad(rows, 0)
    return {"input_ids": ids, "attention_mask": mask}


def lm_loss(model, batch):
    """Mean next-token NLL over all real tokens of the batch."""
    logits = model(batch["input_ids"], batch["attention_mask"])[:, :-1]
    targets = batch["input_ids"][:, 1:].masked_fill(batch["attention_mask"][:, 1:] == 0, -100)
    return F.cross_entropy(logits.transpose(1, 2), targets)


def fluency_pairs(examples):
    """Everyday talk: PAIR prompt + each poor (lq) response, the way people answer one another without
    training; Psych8k client input + counselor output. No reflection (hq, mq) is in it, so a reply that
    mirrors a client's own specific words back is less predictable to it than a stock phrase: the
    fluency stand-in pulls against reflection, as GPT-2's perplexity does in the paper (Table 2)."""
    return [(e.prompt, e.responses[c]) for e in examples for c in LQ if c in e.responses] + \
           [(e.prompt, e.responses["output"]) for e in examples if "output" in e.responses]


def build_fluency(directory, train, heldout, seed, epochs):
    spec = FLUENCY
    pairs = fluency_pairs(train)
    vocab, merges = gpt2.train_byte_bpe([t for pair in pairs for t in pair], spec["vocab"], special_tokens=("<|endoftext|>",))
    os.makedirs(directory, exist_ok=True)
    gpt2.save_bpe(vocab, merges, directory)
    tokenizer = gpt2.ByteLevelBPETokenizer(vocab, merges)
    eos = vocab["<|endoftext|>"]
    config = gpt2.GPT2Config(vocab_size=len(vocab), n_positions=spec["n_positions"], n_embd=spec["n_embd"],
                             n_layer=spec["n_layer"], n_head=spec["n_head"])
    torch.manual_seed(seed)
    model = gpt2.GPT2LMHeadModel(config)
    for name, parameter in model.named_parameters():   # GPT-2's init: N(0, 0.02), residual projections / sqrt(2 n_layer)
        if name.endswith("weight") and parameter.dim() == 2:
            std = 0.02 / math.sqrt(2 * config.n_layer) if name.endswith("c_proj.weight") else 0.02
            torch.nn.init.normal_(parameter, std=std)
    sites = [f"transformer.h.{i}.{m}.c_proj" for i in range(config.n_layer) for m in ("attn", "mlp")]
    with dropout_hooks(model, spec["dropout"], sites):
        fit("fluency", model, lm_tensors(tokenizer, pairs, spec["n_positions"]), lm_loss, epochs=epochs, seed=seed,
            heldout=lm_tensors(tokenizer, fluency_pairs(heldout), spec["n_positions"]),
            **{k: v for k, v in FLUENCY_TRAIN.items() if k != "epochs"})
    files.save_safetensors(model.state_dict(), os.path.join(directory, "model.safetensors"), metadata={"format": "pt"})
    files.write_json(os.path.join(directory, "config.json"),
                     {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", **dataclasses.asdict(config),
                      "n_ctx": config.n_positions, "bos_token_id": eos, "eos_token_id": eos, "resid_pdrop": spec["dropout"], "embd_pdrop": 0.0, "attn_pdrop": 0.0})
    files.write_json(os.path.join(directory, "tokenizer_config.json"),
                     {"tokenizer_class": "GPT2Tokenizer", "model_max_length": spec["n_positions"], "bos_token": "<|endoftext|>",
                      "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>", "add_prefix_space": False})


# ----------------------------------------------------------------------------- 6. autonomy scorer
def autonomy_loss(model, batch):
    """Softmax cross-entropy over (advice, autonomy)."""
    logits = model(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
    return F.cross_entropy(logits, batch["labels"])


def build_autonomy(directory, train, labels, vocab_directory, seed, epochs):
    """A BERT sequence classifier, 2 labels, over [CLS] prompt [SEP] response [SEP] (the empathy scorer's
    input and WordPiece vocabulary, read from `vocab_directory`), trained on the autonomy labels of the
    train prompts. Trained last with its own seed: the models before it are unchanged by its presence."""
    spec = AUTONOMY
    train_prompts = {e.prompt for e in train}
    rows = [(p, r, label) for p, r, label in labels if p in train_prompts]
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(vocab_directory, "vocab.txt"), "rb") as f:
        files.atomic_write(os.path.join(directory, "vocab.txt"), f.read())
    files.write_json(os.path.join(directory, "tokenizer_config.json"),
                     {"tokenizer_class": "BertTokenizer", "do_lower_case": True, "model_max_length": spec["positions"]})
    tokenizer = bert.WordPieceTokenizer.from_dir(directory)
    config, hf = encoder_config(spec, tokenizer.vocab_size, "bert", labels=AUTONOMY_LABELS)
    torch.manual_seed(seed)
    model = bert.BertForSequenceClassification(config)
    encoded = tokenizer.batch_encode([p for p, _, _ in rows], [r for _, r, _ in rows], max_length=spec["positions"])
    tensors = {**encoded, "labels": torch.tensor([label for _, _, label in rows], dtype=torch.long)}
    with dropout_hooks(model, TRAIN_DROPOUT, encoder_dropout_names(model.bert, "bert.")):
        fit("autonomy", model, tensors, autonomy_loss, epochs=epochs, seed=seed,
            **{k: v for k, v in AUTONOMY_TRAIN.items() if k != "epochs"})
    files.save_safetensors(model.state_dict(), os.path.join(directory, "model.safetensors"), metadata={"format": "pt"})
    files.write_json(os.path.join(directory, "config.json"), hf)


class LabelProbability:
    """score(prompts, responses) = softmax probability of one label of a BERT sequence classifier folder,
    read back through bert.load_bert (the metrics of build_autonomy; the commands plug it in as a scorer)."""

    def __init__(self, directory, label, batch_size=64):
        self.model = bert.load_bert(directory, head="classification").eval()
        self.tokenizer = bert.WordPieceTokenizer.from_dir(directory)
        self.index = files.read_json(os.path.join(directory, "config.json"))["label2id"][label]
        self.batch_size = batch_size

    @torch.no_grad()
    def __call__(self, prompts, responses):
        max_length = min(512, self.model.config.max_position_embeddings)
        scores = []
        for start in range(0, len(prompts), self.batch_size):
            batch = self.tokenizer.batch_encode(prompts[start:start + self.batch_size],
                                                responses[start:start + self.batch_size], max_length=max_length)
            scores.append(self.model(**batch).softmax(-1)[:, self.index])
        return torch.cat(scores)


def autonomy_metrics(scorer, heldout, labels) -> dict:
    """scorer_metrics + the AUC that matters here: P(an autonomy-labelled held-out response scores above
    an advice-labelled one), and the mean score of each class."""
    heldout_prompts = {e.prompt for e in heldout}
    rows = [(p, r, label) for p, r, label in labels if p in heldout_prompts]
    scores = scorer([p for p, _, _ in rows], [r for _, r, _ in rows])
    autonomy = scores[[label == 1 for _, _, label in rows]]
    advice = scores[[label == 0 for _, _, label in rows]]
    return {"params": param_count(scorer.model), "heldout_autonomy": len(autonomy), "heldout_advice": len(advice),
            "autonomy_mean": autonomy.mean().item(), "advice_mean": advice.mean().item(),
            "auc_autonomy_vs_advice": auc(autonomy, advice), **scorer_metrics(scorer, heldout)}


# ----------------------------------------------------------------------------- metrics
def auc(high, low) -> float:
    """P(a random `high` score > a random `low` score), ties counting 1/2."""
    high, low = torch.as_tensor(high, dtype=torch.float64)[:, None], torch.as_tensor(low, dtype=torch.float64)[None, :]
    return float((high > low).double().mean() + 0.5 * (high == low).double().mean())


def scorer_metrics(scorer, heldout) -> dict:
    """Held-out mean score per level, AUC(hq vs lq) over all pairs and within the same prompt."""
    columns = data.RESPONSE_COLUMNS
    prompts = [e.prompt for e in heldout for _ in columns]
    scores = scorer(prompts, [e.responses[c] for e in heldout for c in columns]).view(len(heldout), len(columns))
    by = lambda names: scores[:, [columns.index(c) for c in names]]  # noqa: E731
    same_prompt = sum(auc(h, lo) for h, lo in zip(by(HQ), by(LQ))) / len(heldout)
    return {"hq_mean": by(HQ).mean().item(), "mq_mean": by(MQ).mean().item(), "lq_mean": by(LQ).mean().item(),
            "auc_hq_vs_lq": auc(by(HQ).flatten(), by(LQ).flatten()), "auc_hq_vs_lq_same_prompt": same_prompt,
            "column_means": {c: scores[:, i].mean().item() for i, c in enumerate(columns)}}


def policy_metrics(directory, heldout, heldout_tensors, scorers) -> dict:
    model, tokenizer = t5.load_t5(directory)
    loss = evaluate_loss(model, heldout_tensors, seq2seq_loss)
    prompts = [e.prompt for e in heldout]
    ids, mask = tokenizer.batch_encode([data.policy_input(p) for p in prompts], MAX_SOURCE)
    tokens, _ = t5.generate(model, ids, mask, max_new_tokens=MAX_TARGET)
    ended = (tokens == tokenizer.eos_id).any(1)
    lengths = torch.where(ended, (tokens == tokenizer.eos_id).float().argmax(1) + 1, torch.full_like(ended, tokens.shape[1], dtype=torch.long))
    outputs = tokenizer.batch_decode(tokens)
    return {"params": param_count(model), "heldout_sl_loss": loss, "ends_with_eos": ended.float().mean().item(),
            "mean_length_tokens": lengths.float().mean().item(), "distinct_outputs": len(set(outputs)) / len(outputs),
            "greedy_scores": {name: s(prompts, outputs).mean().item() for name, s in scorers.items()},
            "examples": [{"prompt": p, "output": o} for p, o in zip(prompts[:4], outputs[:4])]}


def folder_bytes(directory):
    return sum(os.path.getsize(os.path.join(directory, n)) for n in sorted(os.listdir(directory)) if not n.startswith(".tmp-"))


def rounded(value, digits=6):
    if isinstance(value, float):
        return round(value, digits)
    if isinstance(value, dict):
        return {k: rounded(v, digits) for k, v in value.items()}
    if isinstance(value, list):
        return [rounded(v, digits) for v in value]
    return value


# ----------------------------------------------------------------------------- the build
@contextlib.contextmanager
def single_thread():
    """One intra-op thread while building (restored after): float sums then do not depend on the
    machine's core count, and tiny models gain nothing from threads on a shared machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def build(out, seed=0, scale=1.0, pair_path=None, empathy_path=None, psych8k_path=None, autonomy_path=None) -> dict:
    """Train and write OUT/{policy,reflection,empathy,fluency,autonomy}/ + OUT/metrics.json; returns the metrics.
    `scale` multiplies the epochs (at least 1 each) and, below 1, the fraction of training prompts used."""
    if not scale > 0:
        raise files.InputError(f"--scale must be positive, got {scale}")
    with single_thread():
        return _build(out, seed, scale, pair_path, empathy_path, psych8k_path, autonomy_path)


def _build(out, seed, scale, pair_path, empathy_path, psych8k_path, autonomy_path) -> dict:
    root = os.path.dirname(HERE)
    pair_path = pair_path or os.path.join(root, data.DEFAULT_DATA)
    empathy_path = empathy_path or os.path.join(root, data.DEFAULT_EMPATHY)
    psych8k_path = psych8k_path or os.path.join(root, data.PSYCH8K_SAMPLE)
    autonomy_path = autonomy_path or os.path.join(root, data.DEFAULT_AUTONOMY)
    begin, seconds = time.time(), {}
    splits = data.split_dataset(data.load_pair(pair_path), SPLIT_SEED)
    psych_train = data.split_dataset(data.load_psych8k(psych8k_path), SPLIT_SEED)["train"]
    labels = data.load_empathy_labels(empathy_path, pair_path)
    autonomy_labels = data.load_autonomy_labels(autonomy_path, pair_path)
    fraction = min(1.0, scale)
    take = lambda items, least: items[:max(least, math.ceil(len(items) * fraction))]  # noqa: E731
    train, psych_train = take(splits["train"], 8), take(psych_train, 2)
    heldout = take(splits["aggregation"] + splits["inference"], 8)
    epochs = lambda recipe: max(1, round(recipe["epochs"] * scale))  # noqa: E731
    print(f"build-default: {len(train)} train prompts (+{len(psych_train)} Psych8k), {len(heldout)} held-out, "
          f"seed {seed}, scale {scale} -> {out}")
    directories = {name: os.path.join(out, name) for name in ("policy",) + rewards.OBJECTIVES + ("autonomy",)}

    stage = time.time()
    vocab_texts = [data.policy_input(e.prompt) for e in train] + [r for e in train for r in e.responses.values()] + \
                  [t for e in psych_train for t in (e.prompt, e.responses["output"])]
    heldout_tensors = build_policy(directories["policy"], train + psych_train, heldout, vocab_texts, seed, epochs(POLICY_TRAIN))
    seconds["policy"] = time.time() - stage
    stage = time.time()
    build_reflection(directories["reflection"], train, seed + 1, epochs(REFLECTION_TRAIN))
    seconds["reflection"] = time.time() - stage
    stage = time.time()
    build_empathy(directories["empathy"], train, labels, seed + 2, epochs(EMPATHY_TRAIN))
    seconds["empathy"] = time.time() - stage
    stage = time.time()
    build_fluency(directories["fluency"], train + psych_train, heldout, seed + 3, epochs(FLUENCY_TRAIN))
    seconds["fluency"] = time.time() - stage
    stage = time.time()   # last, with its own seed: the four models above do not depend on it
    build_autonomy(directories["autonomy"], train, autonomy_labels, directories["empathy"], seed + 4, epochs(AUTONOMY_TRAIN))
    seconds["autonomy"] = time.time() - stage

    stage = time.time()   # read everything back through the loaders the commands use
    scorers = rewards.load_scorers({name: directories[name] for name in rewards.OBJECTIVES})
    metrics = {"seed": seed, "scale": scale, "split_seed": SPLIT_SEED,
               "data": {"pair": os.path.basename(pair_path), "train_prompts": len(train),
                        "psych8k_train": len(psych_train), "heldout_prompts": len(heldout),
                        "heldout": "aggregation + inference splits"},
               "policy": policy_metrics(directories["policy"], heldout, heldout_tensors, scorers)}
    for name, scorer in scorers.items():
        metrics[name] = {"params": param_count(scorer.model), **scorer_metrics(scorer, heldout)}
    ppl = scorers["fluency"].perplexity([e.prompt for e in heldout for _ in HQ + LQ],
                                        [e.responses[c] for e in heldout for c in HQ + LQ]).view(len(heldout), -1)
    metrics["fluency"].update(hq_median_ppl=ppl[:, :len(HQ)].median().item(), lq_median_ppl=ppl[:, len(HQ):].median().item())
    metrics["autonomy"] = autonomy_metrics(LabelProbability(directories["autonomy"], "autonomy"), heldout, autonomy_labels)
    seconds["evaluate"] = time.time() - stage
    sizes = {name: folder_bytes(d) for name, d in directories.items()}
    metrics["bytes"] = {**sizes, "total": sum(sizes.values())}
    metrics["seconds"] = {**seconds, "total": time.time() - begin}   # wall time: the one entry a rebuild changes
    metrics = rounded(metrics)
    files.write_json(os.path.join(out, "metrics.json"), metrics)
    print(summary(metrics))
    return metrics


def summary(metrics) -> str:
    policy = metrics["policy"]
    lines = [f"policy     | {policy['params']:,} params | held-out SL loss {policy['heldout_sl_loss']:.3f} | "
             f"ends with </s> {policy['ends_with_eos']:.0%} | mean length {policy['mean_length_tokens']:.1f} | greedy scores "
             + " ".join(f"{k} {v:.3f}" for k, v in policy["greedy_scores"].items())]
    for name in rewards.OBJECTIVES:
        m = metrics[name]
        lines.append(f"{name:<10} | {m['params']:,} params | held-out hq {m['hq_mean']:.3f} mq {m['mq_mean']:.3f} "
                     f"lq {m['lq_mean']:.3f} | AUC {m['auc_hq_vs_lq']:.3f} (same prompt {m['auc_hq_vs_lq_same_prompt']:.3f})")
    m = metrics["autonomy"]
    lines.append(f"autonomy   | {m['params']:,} params | held-out autonomy {m['autonomy_mean']:.3f} ({m['heldout_autonomy']}) "
                 f"advice {m['advice_mean']:.3f} ({m['heldout_advice']}) | AUC {m['auc_autonomy_vs_advice']:.3f}")
    for example in policy["examples"][:2]:
        lines.append(f"  example: {example['prompt'][:70]!r} -> {example['output']!r}")
    lines.append(f"files {metrics['bytes']['total'] / 1e6:.1f} MB | " + " ".join(f"{k} {v:.0f}s" for k, v in metrics["seconds"].items()))
    return "\n".join(lines)
