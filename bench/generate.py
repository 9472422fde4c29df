"""Generation speed with and without the KV cache: greedy search, 200 new tokens, median of a few runs.

    python bench/generate.py                                  # the config.ini architecture, random weights
    python bench/generate.py --model checkpoints/final.pt     # a trained model
    python bench/generate.py --gpt2-small --repeats 1 --prompt-lengths 16  # GPT-2 small's 124 M parameters

Without the cache every new token re-reads the prompt and all tokens so far (only the last position's logits
are computed, as a careful implementation would), so its cost per token grows with the sequence; with the cache
it reads one position. Stopping at <|endoftext|> is off, so every run makes exactly --tokens tokens.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model.evaluate import resolve_device, set_threads  # noqa: E402
from model.generate import generate  # noqa: E402
from pipeline.config import EOT, Architecture, load_settings  # noqa: E402


def timed(fn, device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ini", default="config.ini")
    p.add_argument("--model", help="model file (default: random weights of the ini's [architecture])")
    p.add_argument("--gpt2-small", action="store_true", help="random weights of GPT-2 small (N=12, d_model=768)")
    p.add_argument("--tokens", type=int, default=200, help="new tokens per run (default 200)")
    p.add_argument("--prompt-lengths", default="16,256", help="prompt lengths in tokens (default 16,256)")
    p.add_argument("--repeats", type=int, default=3, help="runs per setting; the median is reported")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--threads", type=int, default=0)
    args = p.parse_args(argv)

    set_threads(args.threads)
    device = resolve_device(args.device)
    s = load_settings(args.ini)
    if args.model:
        from model.checkpoint import load_model

        model, arch, _ = load_model(args.model, map_location=device)
        what = args.model
    else:
        from model.gpt import GPT

        arch = Architecture() if args.gpt2_small else s.architecture
        torch.manual_seed(0)
        model = GPT(arch).to(device).eval()
        what = "random weights, GPT-2 small" if args.gpt2_small else f"random weights, {args.ini} [architecture]"
    n_params = sum(q.numel() for q in model.parameters())
    print(f"model: {what}: N={arch.N} d_model={arch.d_model} h={arch.h} context={arch.positional_encoding_max_pos}, "
          f"{n_params / 1e6:.1f} M parameters")
    print(f"device: {device} ({torch.get_num_threads()} threads)" if device.type == "cpu" else f"device: "
          f"{torch.cuda.get_device_name(device)}", f"dtype {args.dtype}, torch {torch.__version__}")
    print(f"greedy search, {args.tokens} new tokens, batch 1, median of {args.repeats} runs (interleaved, after a warm-up)\n")
    print(f"{'prompt':>8} {'KV cache':>10} {'no cache':>10} {'speed-up':>9}   (tokens/s)")

    g = torch.Generator().manual_seed(0)
    rows = []
    for length in (int(x) for x in args.prompt_lengths.split(",")):
        if length + args.tokens > arch.positional_encoding_max_pos:
            print(f"{length:>8}  skipped: {length} + {args.tokens} tokens exceed the context")
            continue
        prompt = [[EOT] + torch.randint(0, 50000, (length - 1,), generator=g).tolist()]
        def once(use_cache, n=args.tokens):
            generate(model, prompt, n, use_cache=use_cache, dtype=args.dtype, stop_at_eot=False)

        times = {True: [], False: []}
        for use_cache in (True, False):
            once(use_cache, 5)  # warm-up (allocator, kernels)
        for _ in range(args.repeats):  # interleaved, so that a change of machine load hits both alike
            for use_cache in (True, False):
                times[use_cache].append(timed(lambda: once(use_cache), device))
        rates = {k: args.tokens / statistics.median(v) for k, v in times.items()}
        rows.append((length, rates[True], rates[False]))
        print(f"{length:>8} {rates[True]:>10,.1f} {rates[False]:>10,.1f} {rates[True] / rates[False]:>8.1f}x"
              f"   ({1000 / rates[True]:.1f} vs {1000 / rates[False]:.1f} ms per token)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
