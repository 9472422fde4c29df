"""Training throughput and model FLOP utilisation (MFU) against this machine's measured matmul peak.

    python bench/train.py                       # default config's model and GPT-2 small, float32 and bfloat16
    python bench/train.py --models gpt2-small --dtypes bfloat16 --compile --device cuda
    python bench/train.py --models gpt2-small --dtypes bfloat16 --accumulate 1,4   # 4 batches per AdamW step

For each model and dtype: forward + backward + AdamW step on batches of max_num_of_tokens_in_batch tokens
(4 documents of 513 tokens, the longest batches of the seed's data) or, with --split, on the real batches of
a train split. MFU = 6 * params * tokens/s / peak, params without the position embedding (the tied
wte/lm_head matmul is counted once, as in nanoGPT's estimate), peak = the measured throughput of a large
matmul in the same dtype on the same device, measured in the same run.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model.gpt import GPT  # noqa: E402
from model.loss import LossModel, inputs_and_targets  # noqa: E402
from model.optim import make_optimizer  # noqa: E402
from pipeline.config import EOT, Architecture, Train, load_settings  # noqa: E402
from pipeline.shards import ShardReader, read_train_manifest  # noqa: E402

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def matmul_peak(device, dtype, n=None, seconds=2.0) -> float:
    """FLOP/s of the best of repeated n x n @ n x n matmuls (the machine's practical peak for this dtype)."""
    n = n or (8192 if device.type == "cuda" else 2048)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(2):
        a @ b
    sync(device)
    best, t_end = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < t_end:
        t0 = time.perf_counter()
        for _ in range(3):
            a @ b
        sync(device)
        best = max(best, 3 * 2 * n ** 3 / (time.perf_counter() - t0))
    return best


def synthetic_batches(arch: Architecture, budget: int, n: int, rng):
    L = min(arch.positional_encoding_max_pos, 513)
    docs = max(1, budget // L)
    for _ in range(n):
        tokens = rng.integers(0, 50257, size=(docs, L), dtype=np.uint16)
        tokens[:, 0] = EOT
        yield tokens


def split_batches(train_json, n: int, rng):
    """n batches drawn at random from a real train split (its mix of lengths and batch sizes)."""
    shards = [s for c in read_train_manifest(train_json) for s in c["shards"]]
    readers = [ShardReader(s) for s in shards]
    index = [(r, i) for r in readers for i in range(len(r))]
    for k in rng.choice(len(index), size=min(n, len(index)), replace=False):
        r, i = index[k]
        yield np.array(r[i].tokens)


def bench_model(name, arch, dtype_name, device, batches, start, compile_, warmup, log, accumulate=1):
    torch.manual_seed(0)
    gpt = GPT(arch).to(device)
    model = LossModel(gpt)
    if compile_:
        model = torch.compile(model, dynamic=True)
    opt = make_optimizer(gpt, Train(), device)
    amp = DTYPES[dtype_name]
    ctx = (lambda: torch.autocast(device.type, dtype=amp)) if amp is not torch.float32 else contextlib.nullcontext
    scaler = torch.amp.GradScaler(device.type, enabled=amp is torch.float16)

    calls = [0]

    def step(tokens):
        x, y = inputs_and_targets(tokens)
        x, y = x.to(device), y.to(device)
        with ctx():
            loss = model(x, y, start) / (x.shape[0] * (x.shape[1] - start))
        scaler.scale(loss).backward()
        calls[0] += 1
        if calls[0] % accumulate:  # gradient accumulation: the optimizer steps every `accumulate` batches
            return
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(gpt.parameters(), 1.0)
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)

    for tokens in batches[:warmup]:
        step(tokens)
    sync(device)
    t0 = time.perf_counter()
    tokens_done = 0
    for tokens in batches[warmup:]:
        step(tokens)
        tokens_done += tokens.size
    sync(device)
    dt = time.perf_counter() - t0
    n_steps = len(batches) - warmup
    params = gpt.num_params() - gpt.transformer.wpe.weight.numel()
    return {"model": name, "dtype": dtype_name, "accumulate": accumulate, "params": params, "tokens_per_s": tokens_done / dt,
            "step_s": dt / n_steps, "tokens_per_step": tokens_done / n_steps,
            "model_flops_per_s": 6 * params * tokens_done / dt}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ini", default="config.ini", help="the default config (its [architecture] and batch size)")
    p.add_argument("--models", default="default,gpt2-small")
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--device", default="cpu")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: all cores)")
    p.add_argument("--steps", type=int, default=0, help="timed steps per model (0: 3 for GPT-2 small on CPU, 20 else)")
    p.add_argument("--accumulate", default="1", help="batches per optimizer step, e.g. 1,4 (each is timed)")
    p.add_argument("--split", default=None, help="a train.json: time the default model on its real batches")
    a = p.parse_args(argv)

    device = torch.device(a.device)
    torch.set_num_threads(a.threads or os.cpu_count())
    settings = load_settings(a.ini)
    budget = settings.preprocessing.max_num_of_tokens_in_batch
    start = settings.train.start_predicting_from_what_token
    machine = (torch.cuda.get_device_name(device) if device.type == "cuda"
               else f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads")
    print(f"# bench/train.py, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, torch {torch.__version__}, "
          f"device {device} ({machine}), compile={a.compile}")

    peaks = {}
    for dt in a.dtypes.split(","):
        peaks[dt] = matmul_peak(device, DTYPES[dt])
        print(f"matmul peak {dt:9s} {peaks[dt] / 1e9:9.1f} GFLOP/s")
    best_peak = max(peaks.values())

    models = {"default": settings.architecture, "gpt2-small": Architecture()}
    rng = np.random.default_rng(0)
    rows = []
    for name in a.models.split(","):
        arch = models[name]
        small_cpu = name == "gpt2-small" and device.type == "cpu"
        steps = a.steps or (3 if small_cpu else 20)
        warmup = 1 if small_cpu else 3
        if a.split and name == "default":
            batches = list(split_batches(a.split, steps + warmup, rng))
        else:
            batches = list(synthetic_batches(arch, budget, steps + warmup, rng))
        for dt, acc in [(dt, int(k)) for dt in a.dtypes.split(",") for k in a.accumulate.split(",")]:
            warm = warmup if acc == 1 else acc  # warm-up: one whole optimizer step
            n = warm + max(steps, acc) // acc * acc  # then whole optimizer steps
            batches_k = (batches * (n // len(batches) + 1))[:n]
            r = bench_model(name, arch, dt, device, batches_k, start, a.compile, warm, sys.stdout, acc)
            r["mfu"] = r["model_flops_per_s"] / peaks[dt]
            r["mfu_best_peak"] = r["model_flops_per_s"] / best_peak
            rows.append(r)
            print(f"{name:10s} {dt:9s} x{acc} params {r['params'] / 1e6:7.2f} M  {r['tokens_per_step']:6.0f} tok/batch  "
                  f"{r['step_s'] * 1e3:8.1f} ms/batch  {r['tokens_per_s']:9.0f} tok/s  "
                  f"{r['model_flops_per_s'] / 1e9:7.1f} GFLOP/s  MFU {100 * r['mfu']:5.1f}% of the {dt} peak, "
                  f"{100 * r['mfu_best_peak']:5.1f}% of the best peak", flush=True)
    return rows


if __name__ == "__main__":
    main()
