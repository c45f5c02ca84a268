"""Greedy generation speed: t5.generate vs Hugging Face `generate` on the same random weights.

t5-small shape (d_model 512, 6+6 layers, 8 heads, d_ff 2048, vocab 32128; `--shape tiny`: d_model
64, 2+2 layers, where per-step overhead rather than matmuls dominates), batch 16, ~40-token
prompts, exactly 64 new tokens (eos is set to a sentinel id that the random model never picks; the
script checks both produced 64 tokens and the same ones). Repetitions alternate ours / HF; the
median of each is reported with the ratio ours/HF (goal <= 1.0).

    .venv/bin/python bench/bench_generate.py [--shape small|tiny] [--reps 5] [--device cpu] [--threads N]
"""
import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
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
    t5.load_strict(ours, state, "random HF t5-small")
    return hf.to(device).eval(), ours.to(device).eval()


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
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    shape = SHAPES[args.shape]
    eos = shape["vocab_size"] - 1  # a sentinel id: random weights practically never pick it
    hf, ours = build(shape, eos, args.device)
    g = torch.Generator().manual_seed(1)
    lengths = torch.randint(36, 45, (args.batch,), generator=g)
    input_ids = torch.randint(3, shape["vocab_size"] - 100, (args.batch, int(lengths.max())), generator=g)
    attention_mask = (torch.arange(input_ids.shape[1])[None, :] < lengths[:, None]).long()
    input_ids = input_ids.masked_fill(attention_mask == 0, 0)
    input_ids[torch.arange(args.batch), lengths - 1] = 1
    input_ids, attention_mask = input_ids.to(args.device), attention_mask.to(args.device)

    def run_ours():
        return t5.generate(ours, input_ids, attention_mask, max_new_tokens=args.new_tokens)[0]

    def run_hf():
        return hf.generate(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=args.new_tokens,
                           min_length=0, num_beams=1, do_sample=False, eos_token_id=eos, pad_token_id=0,
                           decoder_start_token_id=0)[:, 1:]

    ours_times, hf_times = [], []
    with torch.inference_mode():
        run_ours(), run_hf()  # warm-up
        for _ in range(args.reps):
            seconds, ours_tokens = timed(run_ours, args.device)
            ours_times.append(seconds)
            seconds, hf_tokens = timed(run_hf, args.device)
            hf_times.append(seconds)
    assert ours_tokens.shape == (args.batch, args.new_tokens), f"ours stopped early: {tuple(ours_tokens.shape)}"
    assert hf_tokens.shape == ours_tokens.shape, f"HF stopped early: {tuple(hf_tokens.shape)}"
    same = torch.equal(ours_tokens, hf_tokens)
    ours_median, hf_median = statistics.median(ours_times), statistics.median(hf_times)
    print(f"shape {args.shape} | device {args.device} | threads {torch.get_num_threads()} | batch {args.batch} | prompt {input_ids.shape[1]} "
          f"| new tokens {args.new_tokens} | reps {args.reps} | tokens identical: {same}")
    print(f"ours median {ours_median:.3f}s min {min(ours_times):.3f}s (runs {', '.join(f'{t:.3f}' for t in ours_times)})")
    print(f"HF   median {hf_median:.3f}s min {min(hf_times):.3f}s (runs {', '.join(f'{t:.3f}' for t in hf_times)})")
    print(f"ratio ours/HF: median {ours_median / hf_median:.2f} | min {min(ours_times) / min(hf_times):.2f}")


if __name__ == "__main__":
    main()
