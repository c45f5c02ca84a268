"""Benchmark: one SCST step (16 prompts x 3 samples, 64 new tokens, t5-small-shaped random weights, LoRA
r=8 on q,k,v,o,wi,wo) with scst.py vs the same step written with transformers + peft, same weights,
same run, same machine, 2 torch threads. Prints both medians, the floor and, as its last line, the
ratio ours / HF (goal <= 0.7x) and ours / floor. The floor is the step's matrix multiplies and nothing
else (`step_floor`): the sampling decode's (its encoder, then 48 rows through the decoder's linear layers and
the LM head, 64 steps: bench_generate.encoder_floor, decode_floor) plus three teacher-forced passes' worth (policy forward,
reference forward, and the backward's input gradients, which cost one forward's GEMMs): every encoder
linear layer on 48 x 40 prompt rows, every decoder linear layer on 48 x 64 response rows (cross-attention
K/V on the prompt rows) and the LM head on the response rows.

Both sides share everything that is not model work: a stand-in tokenizer (fixed ~40-token prompts)
and a stand-in scorer, so the ratio measures sampling + teacher-forced policy/reference passes +
backward + AdamW. The HF side computes the log-probs and the full KL with the formula written for
autograd (scst.logprobs_and_kl_formula: what a transformers + peft user writes); emorl's side uses
scst.token_logprobs_and_kl, whose gradient is written out. A third timing, HF with emorl's KL
function, shows how much of the difference that function is.

    .venv/bin/python bench/bench_scst.py [--reps 3] [--device cpu] [--threads 2]
"""
import argparse
import os
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import lora  # noqa: E402
import scst  # noqa: E402
import t5  # noqa: E402
from bench_generate import decode_floor, encoder_floor, ratio_line  # noqa: E402

TARGETS = ["q", "k", "v", "o", "wi", "wo"]


class FixedTokenizer:
    """Stand-in: every prompt is the same random 40-token sequence; decoding returns a fixed text."""

    def __init__(self, vocab_size, length=40, seed=0):
        generator = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(3, vocab_size - 100, (length,), generator=generator)
        self.ids[-1] = 1

    def batch_encode(self, texts, max_length=128, device="cpu"):
        ids = self.ids.repeat(len(texts), 1).to(device)
        return ids, torch.ones_like(ids)

    def batch_decode(self, tokens):
        return ["a response of some words" for _ in range(len(tokens))]


def stand_in_scorer(prompts, responses):
    return torch.rand(len(responses))


def hf_scst_step(peft_model, tokenizer, optimizer, prompts, args, logprobs_and_kl=scst.logprobs_and_kl_formula):
    k = args.samples_per_prompt
    ids, mask = tokenizer.batch_encode(prompts, device=args.device)
    ids, mask = ids.repeat_interleave(k, 0), mask.repeat_interleave(k, 0)
    peft_model.eval()
    with torch.no_grad():
        out = peft_model.generate(input_ids=ids, attention_mask=mask, do_sample=True, top_k=0, temperature=1.0,
                                  max_new_tokens=args.max_new_tokens)
    tokens = out[:, 1:]
    scores = stand_in_scorer(prompts, tokenizer.batch_decode(tokens))
    advantages = scst.scst_advantages(scores.view(len(prompts), k)).view(-1)
    decoder_input_ids = scst.shift_right(tokens, 0)
    peft_model.train()
    logits = peft_model(input_ids=ids, attention_mask=mask, decoder_input_ids=decoder_input_ids).logits
    with torch.no_grad(), peft_model.disable_adapter():
        reference = peft_model(input_ids=ids, attention_mask=mask, decoder_input_ids=decoder_input_ids).logits
    sampled, kl = logprobs_and_kl(logits, reference, tokens)
    loss = scst.scst_loss(sampled, kl, scst.response_mask(tokens, 1), advantages, args.beta)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_([p for p in peft_model.parameters() if p.requires_grad], args.grad_clip)
    optimizer.step()
    return tokens.shape[1]


def step_floor(model, samples, prompt_len, new_tokens, device):
    """One timed call of the SCST step's matrix multiplies alone (see the module docstring)."""
    decode = decode_floor(model, samples, steps=new_tokens, device=device)            # the sampling decode
    encoder = encoder_floor(model, samples * prompt_len, device=device)
    teacher_forced = decode_floor(model, samples * new_tokens, steps=1, device=device)   # every response row at once

    def run():
        encoder()                                           # the sampling decode's prompt
        decode()
        for _ in range(3):                                  # policy forward, reference forward, backward
            encoder()
            teacher_forced()
    return run


def timed(fn, reps):
    fn()                                                      # warm-up
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2, help="torch threads (0: torch's default)")
    cli = parser.parse_args()
    if cli.threads:
        torch.set_num_threads(cli.threads)
    from peft import LoraConfig, get_peft_model
    from transformers import T5Config as HFConfig, T5ForConditionalGeneration as HFT5

    torch.manual_seed(cli.seed)
    hf_config = HFConfig(vocab_size=32128, d_model=512, d_kv=64, d_ff=2048, num_layers=6, num_heads=8,
                         feed_forward_proj="relu", dropout_rate=0.0, decoder_start_token_id=0, eos_token_id=1, pad_token_id=0)
    hf_model = HFT5(hf_config).eval()
    with tempfile.TemporaryDirectory() as folder:          # same weights on both sides
        hf_model.save_pretrained(folder)
        config = t5.T5Config.from_json(os.path.join(folder, "config.json"))
    ours = t5.T5ForConditionalGeneration(config)
    ours.load_state_dict({k: v for k, v in hf_model.state_dict().items() if k in ours.state_dict()}, strict=True)
    ours.to(cli.device)
    hf_model.to(cli.device)
    args = argparse.Namespace(objective="bench", device=cli.device, samples_per_prompt=3, max_new_tokens=64, beta=0.05,
                              grad_clip=2.0, combine="mean", top_k=0)              # HF side samples with top_k=0 too
    tokenizer = FixedTokenizer(hf_config.vocab_size)
    prompts = [f"prompt {i}" for i in range(16)]

    lora.add_adapter(ours, "bench", targets=TARGETS)
    ours_optimizer = torch.optim.AdamW(lora.adapter_parameters(ours, "bench"), lr=1e-4)
    generator = torch.Generator(device=cli.device).manual_seed(cli.seed)
    scorers = {"bench": stand_in_scorer}

    def ours_step():
        scst.scst_step(ours, tokenizer, scorers, ours_optimizer, prompts, {"bench": 1.0}, args, generator)

    peft_model = get_peft_model(hf_model, LoraConfig(r=8, lora_alpha=32, lora_dropout=0.05, target_modules=TARGETS,
                                                     task_type="SEQ_2_SEQ_LM"))
    hf_optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-4)

    def hf_step(logprobs_and_kl=scst.logprobs_and_kl_formula):
        hf_scst_step(peft_model, tokenizer, hf_optimizer, prompts, args, logprobs_and_kl)

    print(f"device {cli.device}, torch threads {torch.get_num_threads()}, {cli.reps} reps after a warm-up")
    hf_time = timed(hf_step, cli.reps)
    hf_fused_time = timed(lambda: hf_step(scst.token_logprobs_and_kl), cli.reps)
    ours_time = timed(ours_step, cli.reps)
    floor_time = timed(step_floor(ours, 3 * len(prompts), tokenizer.ids.numel(), args.max_new_tokens, cli.device),
                       cli.reps)
    print(f"one SCST step, 16 prompts x 3 samples x 64 tokens, t5-small shape: "
          f"transformers+peft {hf_time:.2f}s (with emorl's KL function {hf_fused_time:.2f}s) | emorl {ours_time:.2f}s"
          f" | floor (the step's GEMMs) {floor_time:.2f}s")
    print(ratio_line("one SCST step vs transformers + peft", ours_time / hf_time, "<= 0.7x", ours_time / floor_time))


if __name__ == "__main__":
    main()
