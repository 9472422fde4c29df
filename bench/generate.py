"""Generation speed with and without the KV cache: greedy search, 200 new tokens, median of a few runs.

    python bench/generate.py                                  # the config.ini architecture, random weights
    python bench/generate.py --model checkpoints/final.pt     # a trained model
    python bench/generate.py --gpt2-small --repeats 1 --prompt-lengths 16  # GPT-2 small's 124 M parameters

Without the cache ("no cache") every new token re-reads the prompt and all tokens so far, computing only the
last position's logits (as a careful implementation would, e.g. nanoGPT's), so its cost per token grows with the
sequence; with the cache it reads one position. --naive adds the textbook loop `model(sequence)[:, -1]`, which
also computes the 50,257 logits of every position at every step. All methods must give the same tokens. Stopping at <|endoftext|> is off, so every run makes exactly --tokens tokens.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model.device import resolve_device, set_threads  # noqa: E402
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


@torch.inference_mode()
def naive_greedy(model, prompt: list[int], n_new: int, device) -> list[int]:
    """The textbook loop: re-run the model on the whole sequence and keep the last position's logits."""
    seq = torch.tensor([prompt], device=device)
    for _ in range(n_new):
        nxt = model(seq)[:, -1].argmax(dim=-1, keepdim=True)
        seq = torch.cat([seq, nxt], dim=1)
    return seq[0, len(prompt):].tolist()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ini", default="config.ini")
    p.add_argument("--model", help="model file (default: random weights of the ini's [architecture])")
    p.add_argument("--gpt2-small", action="store_true", help="random weights of GPT-2 small (N=12, d_model=768)")
    p.add_argument("--tokens", type=int, default=200, help="new tokens per run (default 200)")
    p.add_argument("--prompt-lengths", default="16,256", help="prompt lengths in tokens (default 16,256)")
    p.add_argument("--repeats", type=int, default=3, help="runs per setting; the median is reported")
    p.add_argument("--naive", action="store_true",
                   help="also time the naive loop: model(sequence)[:, -1], the logits of every position each step")
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
    head = f"{'prompt':>8} {'KV cache':>10} {'no cache':>10} {'speed-up':>9}"
    if args.naive:
        head += f" {'naive':>10} {'speed-up':>9}"
    print(f"{head}   (new tokens/s)")

    g = torch.Generator().manual_seed(0)
    for length in (int(x) for x in args.prompt_lengths.split(",")):
        if length + args.tokens > arch.positional_encoding_max_pos:
            print(f"{length:>8}  skipped: {length} + {args.tokens} tokens exceed the context")
            continue
        prompt = [[EOT] + torch.randint(0, 50000, (length - 1,), generator=g).tolist()]
        def once(how, n=args.tokens):
            if how == "naive":
                return naive_greedy(model, prompt[0], n, device)
            return generate(model, prompt, n, use_cache=how == "cache", dtype=args.dtype, stop_at_eot=False)[0]

        hows = ("cache", "no cache") + (("naive",) if args.naive else ())
        outputs = {how: once(how, 5) for how in hows}  # warm-up (allocator, kernels)
        assert len({tuple(o) for o in outputs.values()}) == 1, "the methods disagree"
        times = {how: [] for how in hows}
        for _ in range(args.repeats):  # interleaved, so that a change of machine load hits all alike
            for how in hows:
                times[how].append(timed(lambda: once(how), device))
        rate = {k: args.tokens / statistics.median(v) for k, v in times.items()}
        line = (f"{length:>8} {rate['cache']:>10,.1f} {rate['no cache']:>10,.1f} "
                f"{rate['cache'] / rate['no cache']:>8.1f}x")
        if args.naive:
            line += f" {rate['naive']:>10,.1f} {rate['cache'] / rate['naive']:>8.1f}x"
        ms = " vs ".join(f"{1000 / rate[h]:.1f}" for h in hows)
        print(f"{line}   ({ms} ms per token)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
