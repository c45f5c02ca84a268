"""Greedy generation speed: t5.generate vs Hugging Face `generate` on the same random weights, and
the matrix-multiply floor of the same decode, all in one run.

t5-small shape (d_model 512, 6+6 layers, 8 heads, d_ff 2048, vocab 32128; `--shape tiny`: d_model
64, 2+2 layers, where per-step overhead rather than matmuls dominates), batch 16, ~40-token
prompts, exactly 64 new tokens (eos is set to a sentinel id that the random model never picks; the
script checks both produced 64 tokens and the same ones), 2 torch threads. Timed, alternating:
emorl with no adapter, emorl with one unmerged random LoRA adapter (r=8 on q,k,v,o,wi,wo), HF, and
the floor: the decoder's linear layers for 16 rows plus the LM head, 64 steps, nothing else
(`decode_floor`, also used by the other benches), and apart the encoder's GEMMs (`encoder_floor`:
every decode pays them once per prompt, the floor leaves them out). Medians are compared; the last lines are the
headline ratios with their goals.

    .venv/bin/python bench/bench_generate.py [--shape small|tiny] [--reps 5] [--device cpu] [--threads 2]
"""
import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import lora  # noqa: E402
import files  # noqa: E402
import t5  # noqa: E402

SHAPES = {  # t5-small: matmul-bound on CPU; tiny: shows the per-step Python overhead instead
    "small": dict(vocab_size=32128, d_model=512, d_kv=64, d_ff=2048, num_layers=6, num_heads=8),
    "tiny": dict(vocab_size=1024, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4),
}
COMMON = dict(dropout_rate=0.1, feed_forward_proj="relu", decoder_start_token_id=0, pad_token_id=0)


def build(shape, eos, device):
    import transformers

    torch.manual_seed(0)
    hf = transformers.T5ForConditionalGeneration(transformers.T5Config(**shape, **COMMON, eos_token_id=eos))
    with torch.no_grad():  # HF's init on a random model emits one token forever; spread the weights out
        for name, p in hf.named_parameters():
            if not name.endswith("layer_norm.weight"):
                p.normal_(0.0, p.shape[-1] ** -0.5)
    ours = t5.T5ForConditionalGeneration(t5.T5Config(**shape, **COMMON, eos_token_id=eos))
    key_map = t5.checkpoint_key_map(ours)
    state = {key_map[k]: v for k, v in hf.state_dict().items() if key_map.get(k, k) is not None}
    files.load_strict(ours, state, "random HF t5-small")
    return hf.to(device).eval(), ours.to(device).eval()


def gemms(pairs, device="cpu", repeats=1):
    """One timed call of F.linear(x, w) for every (weight, rows) pair, `repeats` times, random x [rows, in]."""
    inputs = {(rows, w.shape[1]): torch.randn(rows, w.shape[1], device=device) for w, rows in pairs}

    def run():
        with torch.no_grad():
            for _ in range(repeats):
                for w, rows in pairs:
                    torch.nn.functional.linear(inputs[rows, w.shape[1]], w)
    return run


def decode_floor(model, rows, head_rows=None, steps=64, device="cpu"):
    """The matrix multiplies a cached decode cannot avoid, and nothing else: per step, every decoder linear
    layer on `rows` new tokens (cross-attention K/V are computed once per prompt, so not here) and the LM
    head on `head_rows` (default `rows`). Base weights only, random inputs."""
    weights = [m.weight for name, m in model.decoder.named_modules() if isinstance(m, torch.nn.Linear)
               and not name.endswith(("EncDecAttention.k", "EncDecAttention.v"))]
    head = model.shared.weight if model.config.tie_word_embeddings else model.lm_head.weight
    return gemms([(w, rows) for w in weights] + [(head, head_rows or rows)], device, repeats=steps)


def encoder_floor(model, rows, device="cpu"):
    """The prompt's matrix multiplies, which `decode_floor` leaves out: every encoder linear layer on `rows`
    prompt tokens and the decoder's cross-attention K/V projections of the encoder output."""
    weights = [m.weight for m in model.encoder.modules() if isinstance(m, torch.nn.Linear)]
    weights += [m.weight for name, m in model.decoder.named_modules()
                if name.endswith(("EncDecAttention.k", "EncDecAttention.v"))]
    return gemms([(w, rows) for w in weights], device)


def ratio_line(measure, ratio, goal, floor_ratio=None):
    """The headline format the README's table is built from."""
    return f"{measure}: {ratio:.2f}x (goal {goal})" + (f" | {floor_ratio:.2f}x floor" if floor_ratio else "")


def timed(fn, device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = fn()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - start, out


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="small")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    shape = SHAPES[args.shape]
    eos = shape["vocab_size"] - 1  # a sentinel id: random weights practically never pick it
    hf, ours = build(shape, eos, args.device)
    lora.add_adapter(ours, "bench", targets=("q", "k", "v", "o", "wi", "wo"))
    with torch.no_grad():  # a trained-looking adapter: B != 0, so its low-rank path really runs
        for parameter in lora.adapter_parameters(ours, "bench"):
            parameter.normal_(0, 0.02)
    g = torch.Generator().manual_seed(1)
    lengths = torch.randint(36, 45, (args.batch,), generator=g)
    input_ids = torch.randint(3, shape["vocab_size"] - 100, (args.batch, int(lengths.max())), generator=g)
    attention_mask = (torch.arange(input_ids.shape[1])[None, :] < lengths[:, None]).long()
    input_ids = input_ids.masked_fill(attention_mask == 0, 0)
    input_ids[torch.arange(args.batch), lengths - 1] = 1
    input_ids, attention_mask = input_ids.to(args.device), attention_mask.to(args.device)

    def run_ours():
        with lora.adapters_disabled(ours):
            return t5.generate(ours, input_ids, attention_mask, max_new_tokens=args.new_tokens)[0]

    def run_adapter():
        return t5.generate(ours, input_ids, attention_mask, max_new_tokens=args.new_tokens)[0]

    def run_hf():
        return hf.generate(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=args.new_tokens,
                           min_length=0, num_beams=1, do_sample=False, eos_token_id=eos, pad_token_id=0,
                           decoder_start_token_id=0)[:, 1:]

    runs = {"ours": run_ours, "adapter": run_adapter, "HF": run_hf,
            "floor": decode_floor(ours, args.batch, steps=args.new_tokens, device=args.device),
            "encoder": encoder_floor(ours, input_ids.numel(), device=args.device)}
    times, outputs = {name: [] for name in runs}, {}
    with torch.inference_mode():
        for run in runs.values():  # warm-up
            run()
        for _ in range(args.reps):
            for name, run in runs.items():
                seconds, outputs[name] = timed(run, args.device)
                times[name].append(seconds)
    ours_tokens, hf_tokens = outputs["ours"], outputs["HF"]
    assert ours_tokens.shape == (args.batch, args.new_tokens), f"ours stopped early: {tuple(ours_tokens.shape)}"
    assert hf_tokens.shape == ours_tokens.shape, f"HF stopped early: {tuple(hf_tokens.shape)}"
    same = torch.equal(ours_tokens, hf_tokens)
    median = {name: statistics.median(t) for name, t in times.items()}
    print(f"shape {args.shape} | device {args.device} | threads {torch.get_num_threads()} | batch {args.batch} | prompt {input_ids.shape[1]} "
          f"| new tokens {args.new_tokens} | reps {args.reps} | tokens identical to HF: {same}")
    labels = {"ours": "emorl, no adapter", "adapter": "emorl, one unmerged adapter", "HF": "HF generate",
              "floor": "floor (decoder GEMMs + LM head)", "encoder": "the encoder's GEMMs (not in the floor)"}
    for name, label in labels.items():
        print(f"{label:32s} median {median[name]:.3f}s min {min(times[name]):.3f}s "
              f"(runs {', '.join(f'{t:.3f}' for t in times[name])})")
    hf_median = median["HF"]
    print(f"floor vs HF generate: {median['floor'] / hf_median:.2f}x; "
          f"floor + the encoder's GEMMs vs HF generate: {(median['floor'] + median['encoder']) / hf_median:.2f}x")
    print(ratio_line("greedy, one model (no adapter) vs HF generate", median["ours"] / hf_median, "<= 0.6x",
                     median["ours"] / median["floor"]))
    print(ratio_line("greedy, one unmerged adapter vs HF generate", median["adapter"] / hf_median, "<= 0.7x",
                     median["adapter"] / median["floor"]))


if __name__ == "__main__":
    main()
