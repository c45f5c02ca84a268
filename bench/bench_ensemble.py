"""Benchmark of hidden-state ensemble decoding (Eq. 2), 3 LoRA adapters, batch 16, ~40-token prompts,
64 new tokens, t5-small-shaped random weights, all measured in the same run:

  (a) emorl's 3-adapter ensemble (one mixed-adapter batch, KV cache) vs HF `generate` with ONE model
      of the same shape — goal <= 1.0x — and vs its floor: the decoder's linear layers for 48 rows
      plus one LM head on 16 rows, 64 steps, nothing else (bench_generate.decode_floor); printed
      beside it, the floor plus the GEMMs of the three adapters' encoders (bench_generate.encoder_floor);
  (b) emorl's ensemble vs the public code's way: three full model copies (HF T5 with the adapter
      merged), no cache, the whole sequence (encoder included) recomputed at every step — goal >= 30x;
  (c) peak memory of the 3-adapter ensemble vs greedy decoding with one model — goal <= 1.12x
      (CUDA: torch.cuda.max_memory_allocated; CPU: peak RSS of a fresh subprocess for each).
The last lines are the headline ratios with their goals. 2 torch threads by default.

The embedding row of </s> is zeroed so that no run stops early: every side decodes exactly 64 tokens.

    .venv/bin/python bench/bench_ensemble.py [--reps 3] [--device cpu] [--threads 2] [--skip-public]
"""
import argparse
import copy
import os
import statistics
import subprocess
import sys
import threading
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import lora  # noqa: E402
import search  # noqa: E402
import t5  # noqa: E402
from bench_generate import decode_floor, encoder_floor, ratio_line  # noqa: E402

NAMES = ["reflection", "empathy", "fluency"]
WEIGHTS = [0.8, 0.5, 0.05]


def hf_config():
    from transformers import T5Config as HFConfig
    return HFConfig(vocab_size=32128, d_model=512, d_kv=64, d_ff=2048, num_layers=6, num_heads=8, feed_forward_proj="relu",
                    dropout_rate=0.0, decoder_start_token_id=0, eos_token_id=1, pad_token_id=0)


def our_model(seed):
    """A t5-small-shaped T5 with three random, non-zero adapters (and </s> zeroed out, see above)."""
    torch.manual_seed(seed)
    config = t5.T5Config(vocab_size=32128, d_model=512, d_kv=64, d_ff=2048, num_layers=6, num_decoder_layers=6,
                         num_heads=8, dropout_rate=0.0, feed_forward_proj="relu", tie_word_embeddings=True)
    ours = t5.T5ForConditionalGeneration(config)
    with torch.no_grad():
        ours.shared.weight[1].zero_()                            # </s> never wins the argmax: 64 tokens everywhere
    for name in NAMES:
        lora.add_adapter(ours, name)
        with torch.no_grad():
            for parameter in lora.adapter_parameters(ours, name):
                parameter.normal_(0, 0.02)
    return ours.eval()


def prompts(seed, device):
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 32000, (16, 40), generator=generator)
    ids[:, -1] = 1
    return ids.to(device), torch.ones_like(ids).to(device)


def build(seed, device):
    """(HF model, our model with 3 adapters, prompts) sharing one set of base weights."""
    from transformers import T5ForConditionalGeneration as HFT5
    ours = our_model(seed)
    hf = HFT5(hf_config()).eval()
    hf.load_state_dict({k: v for k, v in ours.state_dict().items() if ".lora_" not in k}, strict=False)
    hf.lm_head.weight = hf.shared.weight
    return hf.to(device), ours.to(device), *prompts(seed, device)


def public_way(models, weights, ids, mask, steps=64):
    """The public code's decoding: K full models, no cache, the whole prefix (and encoder) recomputed each step."""
    prefix = torch.zeros(ids.shape[0], 1, dtype=torch.long, device=ids.device)
    for _ in range(steps):
        hidden = sum(w * m(input_ids=ids, attention_mask=mask, decoder_input_ids=prefix, output_hidden_states=True)
                     .decoder_hidden_states[-1][:, -1] for w, m in zip(weights, models))
        logits = models[0].lm_head(hidden * models[0].config.d_model ** -0.5)
        prefix = torch.cat([prefix, logits.argmax(-1, keepdim=True)], dim=1)
    return prefix[:, 1:]


def merged_hf_copies(hf, ours):
    """Three deep copies of the HF model, each with one of our adapters merged into its weights."""
    copies = []
    for name in NAMES:
        model = copy.deepcopy(hf)
        lora.merge(ours, {name: 1.0})
        state = {k: v.clone() for k, v in ours.state_dict().items() if ".lora_" not in k}
        lora.unmerge(ours)
        model.load_state_dict(state, strict=False)
        copies.append(model)
    return copies


def timed(fn, reps):
    fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), out


def peak_memory(mode, device, seed):
    """Peak memory (bytes) of one decode with our model alone: the CUDA allocator's peak, or on CPU
    the peak RSS of a fresh process that builds the model and decodes once."""
    if device.startswith("cuda"):
        ours = our_model(seed).to(device)
        ids, mask = prompts(seed, device)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        with torch.no_grad():
            run_mode(mode, ours, ids, mask)
        return torch.cuda.max_memory_allocated()
    out = subprocess.run([sys.executable, __file__, "--_memory", mode, "--seed", str(seed),
                          "--threads", str(torch.get_num_threads())], capture_output=True,
                         text=True, check=True)
    return int(out.stdout.strip().splitlines()[-1])


def resident_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_while(fn):
    """Peak resident set while fn() runs (sampled every millisecond by a thread; torch releases the GIL)."""
    peak, done = [resident_bytes()], threading.Event()

    def watch():
        while not done.is_set():
            peak[0] = max(peak[0], resident_bytes())
            time.sleep(0.001)
    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        fn()
    finally:
        done.set()
        watcher.join()
    return max(peak[0], resident_bytes())


def run_mode(mode, ours, ids, mask):
    if mode == "ensemble":
        return search.ensemble_generate(ours, NAMES, WEIGHTS, ids, mask, level="hidden", max_new_tokens=64)
    lora.set_adapter(ours, NAMES[0])
    return t5.generate(ours, ids, mask, max_new_tokens=64)[0]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2, help="torch threads (0: torch's default)")
    parser.add_argument("--skip-public", action="store_true", help="skip (b), the slow public-code decoding")
    parser.add_argument("--_memory", choices=["ensemble", "single"], help=argparse.SUPPRESS)
    cli = parser.parse_args()
    if cli.threads:
        torch.set_num_threads(cli.threads)
    if cli._memory:                                               # child process of (c)
        ours = our_model(cli.seed)
        ids, mask = prompts(cli.seed, "cpu")
        with torch.no_grad():
            print(peak_while(lambda: run_mode(cli._memory, ours, ids, mask)))
        return

    hf, ours, ids, mask = build(cli.seed, cli.device)
    print(f"device {cli.device}, torch threads {torch.get_num_threads()}, batch 16 x 40-token prompts, 64 new tokens")
    with torch.no_grad():
        hf_time, hf_out = timed(lambda: hf.generate(input_ids=ids, attention_mask=mask, do_sample=False, num_beams=1,
                                                    max_new_tokens=64), cli.reps)
        ours_time, ours_out = timed(lambda: run_mode("ensemble", ours, ids, mask), cli.reps)
        single_time, _ = timed(lambda: run_mode("single", ours, ids, mask), cli.reps)
        floor_time, _ = timed(decode_floor(ours, 3 * ids.shape[0], head_rows=ids.shape[0], device=cli.device), cli.reps)
        encoders_time, _ = timed(encoder_floor(ours, 3 * ids.numel(), device=cli.device), cli.reps)
    assert hf_out.shape[1] - 1 == ours_out.shape[1] == 64, (hf_out.shape, ours_out.shape)
    print(f"(a) HF generate, one model      {hf_time:7.2f}s")
    print(f"    emorl one adapter           {single_time:7.2f}s  ({single_time / hf_time:.2f}x HF)")
    print(f"    emorl 3-adapter ensemble    {ours_time:7.2f}s  ratio ensemble / HF one model = {ours_time / hf_time:.2f}x")
    print(f"    floor (48-row decoder GEMMs + LM head) {floor_time:7.2f}s  ({floor_time / hf_time:.2f}x HF)")
    print(f"    + the three encoders' GEMMs (not in the floor) {floor_time + encoders_time:7.2f}s"
          f"  ({(floor_time + encoders_time) / hf_time:.2f}x HF)")
    lines = [ratio_line("3-adapter hidden ensemble vs HF generate of ONE model", ours_time / hf_time, "<= 1.0x",
                        ours_time / floor_time)]
    if not cli.skip_public:
        models = merged_hf_copies(hf, ours)
        with torch.no_grad():
            start = time.perf_counter()
            public_out = public_way(models, [w / sum(WEIGHTS) for w in WEIGHTS], ids, mask)
            public_time = time.perf_counter() - start
        agree = (public_out == ours_out).float().mean().item()
        print(f"(b) public code's way (3 copies, no cache) {public_time:7.2f}s  emorl is {public_time / ours_time:.1f}x faster"
              f"  (same tokens: {agree:.1%})")
        lines.append(f"3-adapter ensemble vs the public code's way (3 copies, no cache): "
                     f"{public_time / ours_time:.1f}x faster (goal >= 30x)")
        del models
    ensemble_peak = peak_memory("ensemble", cli.device, cli.seed)
    single_peak = peak_memory("single", cli.device, cli.seed)
    print(f"(c) peak memory: one model {single_peak / 2**20:.0f} MiB | 3-adapter ensemble {ensemble_peak / 2**20:.0f} MiB"
          f" | ratio {ensemble_peak / single_peak:.2f}x")
    lines.append(ratio_line("peak memory, 3-adapter ensemble vs one model", ensemble_peak / single_peak, "<= 1.12x"))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
