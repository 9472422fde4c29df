"""Training throughput side by side: this project's trainer step against two reference steps, on the same
shapes, in the same run, in interleaved rounds.

    python bench/train.py                        # default config's model and GPT-2 small, every native dtype,
                                                 # eager and compiled (a long run on a CPU)
    python bench/train.py --shapes default --compile eager --rounds 3 --steps 2      # a quick run
    python bench/train.py --shapes gpt2-small@1026 --steps 1 --rounds 3              # GPT-2 small, 1,026-token batches
    python bench/train.py --device cuda --shapes gpt2-small --dtypes bfloat16
    MKL_ENABLE_INSTRUCTIONS=AVX2 ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 python bench/train.py
                                                 # an AVX2-only CPU, emulated on an AVX-512 one (all three needed)

Trainers, each taking the same batches: forward, backward, gradient norm clipped to 1, one AdamW step.
  project  model/gpt.py, model/loss.py's chunked loss (compiled: with its fused softmax kernel), model/optim.py's
           AdamW, model/train.py's compile
  hf       transformers' GPT2LMHeadModel (attn_implementation="sdpa"), torch.optim.AdamW, F.cross_entropy on
           the full logits
  plain    a textbook GPT-2 written below: nn.Linear, SDPA, tied weights, full logits, F.cross_entropy,
           torch.optim.AdamW
  project-mkl  (only when named in --trainers) the project with model/matmul.py's oneDNN products off: what
           they are worth, in the same run (on a CPU where they are off by default, the project itself)

Each round runs `steps` steps of every trainer, in an order that rotates, so a machine that slows down (other
jobs, heat) slows all of them; tokens/s is the median over rounds. MFU = 6 N tokens/s / peak (N: parameters
without the position embedding, the tied output layer counted once, as nanoGPT estimates it; the same N for
all three), peak = the FLOP/s of a large matmul in the dtype used, measured on this device in this run. A
dtype the device only emulates (bfloat16 on a CPU without AVX512-BF16/AMX) is skipped with a note unless
asked for by name; then it is labelled emulated and its MFU is stated against the float32 peak (an emulated
matmul's own peak says nothing about what the model's kernels run at). Peak memory: on CUDA the allocator's
peak; on a CPU the step's resident-set high-water mark above the resting process (Linux clear_refs) plus the
trainer's parameters and optimizer state.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

if os.environ.get("ATEN_CPU_CAPABILITY"):
    # Emulating another CPU kind: compiled kernels cached by a native run are not keyed by it, and one such
    # kernel, reused under ATEN_CPU_CAPABILITY=avx2, aborted the process (index out of bounds); a cache apart
    import tempfile
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", os.path.join(
        tempfile.gettempdir(), f"torchinductor_{os.environ['ATEN_CPU_CAPABILITY'].lower()}"))

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model.device import DTYPES, autocast, cpu_bf16_reported, cpuinfo, disable_cudnn_attention  # noqa: E402
from model.hf import hf_config  # noqa: E402
from model.gpt import GPT  # noqa: E402
from model import matmul  # noqa: E402
from model.loss import LossModel, inputs_and_targets  # noqa: E402
from model.optim import make_optimizer  # noqa: E402
from model.train import CompiledOrEager, keep_freed_memory, physical_cores  # noqa: E402
from pipeline.config import EOT, VOCAB_SIZE, Architecture, Train, load_settings  # noqa: E402

TRAINERS = ("project", "hf", "plain")  # and, asked for by --trainers, project-mkl: the project without oneDNN
LR = 3e-4

# Dense datasheet peaks, TFLOP/s (float32: TF32 tensor cores where the GPU has them, as training enables
# them; bfloat16/float16 with float32 accumulation), matched on the name torch reports, most specific first.
DATASHEET = [
    ("H200", {"float32": 494.7, "bfloat16": 989.4, "float16": 989.4}),
    ("H100 PCIe", {"float32": 378.0, "bfloat16": 756.0, "float16": 756.0}),
    ("H100", {"float32": 494.7, "bfloat16": 989.4, "float16": 989.4}),
    ("A100", {"float32": 156.0, "bfloat16": 312.0, "float16": 312.0}),
    ("A10G", {"float32": 35.0, "bfloat16": 70.0, "float16": 70.0}),
    ("L40S", {"float32": 183.0, "bfloat16": 362.0, "float16": 362.0}),
    ("L4", {"float32": 60.0, "bfloat16": 121.0, "float16": 121.0}),
    ("RTX 4090", {"float32": 82.6, "bfloat16": 165.2, "float16": 165.2}),
    ("RTX 3090", {"float32": 35.6, "bfloat16": 71.0, "float16": 71.0}),
    ("V100", {"float32": 15.7, "float16": 125.0}),
    ("T4", {"float32": 8.1, "float16": 65.0}),
]


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_peak(device, dtype, seconds=2.0, yardstick: float | None = None, product=torch.matmul) -> float:
    """FLOP/s of the best of repeated n x n @ n x n matmuls over a few sizes (the practical peak). A dtype
    under a quarter of the yardstick (float32's peak) on the first size is emulated: the larger sizes would
    take minutes (0.3 GFLOP/s for bfloat16 on an AVX2 CPU) and are not tried. product: torch's (MKL for a
    CPU's float32) or model/matmul.py's oneDNN one (a @ b^T, the same FLOPs)."""
    best = 0.0
    for n in ((4096, 8192) if device.type == "cuda" else (1024, 2048)):
        if yardstick and best and best < yardstick / 4:
            break
        a = torch.randn(n, n, device=device, dtype=dtype)
        b = torch.randn(n, n, device=device, dtype=dtype)
        product(a, b)
        sync(device)
        t_end = time.perf_counter() + seconds / 2
        while time.perf_counter() < t_end:
            t0 = time.perf_counter()
            for _ in range(3):
                product(a, b)
            sync(device)
            best = max(best, 3 * 2 * n ** 3 / (time.perf_counter() - t0))
    return best


def copy_bandwidth(device, mb: int = 512) -> float:
    """Bytes/s (read + written) of the best of a few copies of a float32 array of `mb` MB: the memory
    bandwidth that a step streaming full logits (412 MB in float32 for 2,048 tokens) is bound by. Printed
    with the figures: on a CPU the references' tokens/s moved up to 2.5x between two runs 20 minutes apart
    (the project's at most 1.23x), so each run states it."""
    a = torch.ones(mb * 2**20 // 4, device=device)
    b = torch.empty_like(a)
    best = float("inf")
    for _ in range(5):
        sync(device)
        t0 = time.perf_counter()
        b.copy_(a)
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * a.numel() * 4 / best


def datasheet_peak(device, dtype: str) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, peaks in DATASHEET:
        if key in name:
            return peaks.get(dtype, 0) * 1e12 or None
    return None


# ---------------------------------------------------------------------------------------------------------
# The textbook GPT-2 (nanoGPT's shape): the reference a reader would write

class PlainAttention(nn.Module):
    def __init__(self, d, h):
        super().__init__()
        self.h = h
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.h, C // self.h).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).contiguous().view(B, T, C))


class PlainBlock(nn.Module):
    def __init__(self, d, h, d_ff):
        super().__init__()
        self.ln_1, self.ln_2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn = PlainAttention(d, h)
        self.fc, self.fc_proj = nn.Linear(d, d_ff), nn.Linear(d_ff, d)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.fc_proj(F.gelu(self.fc(self.ln_2(x)), approximate="tanh"))


class PlainGPT(nn.Module):
    def __init__(self, arch: Architecture):
        super().__init__()
        self.wte = nn.Embedding(VOCAB_SIZE, arch.d_model)
        self.wpe = nn.Embedding(arch.positional_encoding_max_pos, arch.d_model)
        self.blocks = nn.ModuleList(PlainBlock(arch.d_model, arch.h, arch.d_ff) for _ in range(arch.N))
        self.ln_f = nn.LayerNorm(arch.d_model)
        self.lm_head = nn.Linear(arch.d_model, VOCAB_SIZE, bias=False)
        self.lm_head.weight = self.wte.weight
        for p in self.parameters():
            if p.dim() == 2:
                nn.init.normal_(p, 0.0, 0.02)

    def forward(self, idx):
        x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1], device=idx.device))
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.ln_f(x))


def hf_gpt2(arch: Architecture):
    from transformers import GPT2Config, GPT2LMHeadModel
    cfg = GPT2Config(**{**hf_config(arch, P_drop=0.0), "use_cache": False})  # the config our export writes
    return GPT2LMHeadModel._from_config(cfg, attn_implementation="sdpa")


# ---------------------------------------------------------------------------------------------------------
# One trainer: a model, its optimizer, its step

@dataclass
class Trainer:
    name: str
    step: object          # step(x, y) -> None
    params: nn.Module     # whose parameters and optimizer state count as its resting memory
    opt: torch.optim.Optimizer


def build(name, arch, device, dtype, compiled, start) -> Trainer:
    torch.manual_seed(0)
    amp = lambda: autocast(device, dtype)  # noqa: E731
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == "float16")
    if name == "project-mkl":  # the project's step with model/matmul.py's oneDNN products off
        inner = build("project", arch, device, dtype, compiled, start)

        def step(x, y):
            was, matmul.ENABLED = matmul.ENABLED, False
            try:
                inner.step(x, y)
            finally:
                matmul.ENABLED = was
        return Trainer(name, step, inner.params, inner.opt)
    if name == "project":  # model/train.py's train_step, one batch per optimizer step
        gpt = GPT(arch, P_drop=0.0).to(device)
        model = LossModel(gpt, fused_loss=compiled)
        model = CompiledOrEager(model) if compiled else model
        opt = make_optimizer(gpt, Train(max_lr=LR, warmup_steps=0), device)  # lr LR from the first step

        def step(x, y):
            with amp():
                nll = model(x, y, start)
            scaler.scale(nll * (1.0 / y[:, start:].numel())).backward()
            clip_and_update(scaler, opt, gpt)
        return Trainer(name, step, gpt, opt)

    net = (hf_gpt2(arch) if name == "hf" else PlainGPT(arch)).to(device)
    fwd = torch.compile(net) if compiled else net
    opt = torch.optim.AdamW(net.parameters(), lr=LR, weight_decay=0.01)

    def step(x, y):
        with amp():
            out = fwd(x)
            logits = out.logits if name == "hf" else out
            loss = F.cross_entropy(logits[:, start:].reshape(-1, logits.shape[-1]), y[:, start:].reshape(-1))
        scaler.scale(loss).backward()
        clip_and_update(scaler, opt, net)
    return Trainer(name, step, net, opt)


def clip_and_update(scaler, opt, model) -> None:
    """The end of every trainer's step, the same on each side: gradient norm clipped to 1, AdamW, zeroed."""
    scaler.unscale_(opt)
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    scaler.step(opt)
    scaler.update()
    opt.zero_grad(set_to_none=True)


def resting_bytes(tr: Trainer) -> int:
    """Parameters and optimizer state: what the trainer holds between steps."""
    n = sum(p.numel() * p.element_size() for p in tr.params.parameters())
    for state in tr.opt.state.values():
        n += sum(v.numel() * v.element_size() for v in state.values() if torch.is_tensor(v))
    return n


def _status_kb(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1])
    return 0


def peak_memory(tr: Trainer, x, y, device) -> float | None:
    """Bytes at the peak of one step: CUDA's allocator peak, or on a CPU resting state + the step's RSS rise."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        tr.step(x, y)
        sync(device)
        return torch.cuda.max_memory_allocated(device)
    try:
        gc.collect()
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # freed heap back to the OS: the step's rise is its own
        base = _status_kb("VmRSS")
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
        tr.step(x, y)
        return (_status_kb("VmHWM") - base) * 1024 + resting_bytes(tr)
    except OSError:
        return None


# ---------------------------------------------------------------------------------------------------------

def batches_for(arch, tokens, n, rng):
    """n batches of `tokens` tokens: documents of the longest length (513 tokens, as the seed's data)."""
    L = min(arch.positional_encoding_max_pos, 513)
    docs = max(1, tokens // L)
    out = []
    for _ in range(n):
        t = rng.integers(0, VOCAB_SIZE - 1, size=(docs, L), dtype=np.uint16)
        t[:, 0] = EOT
        out.append(inputs_and_targets(t))
    return out


def native_dtypes(device, peaks) -> dict[str, str]:
    """dtype -> 'native' or why it is not (emulated, unsupported)."""
    out = {"float32": "native"}
    if device.type == "cuda":
        out["bfloat16"] = ("native" if torch.cuda.is_bf16_supported(including_emulation=False)
                           else "emulated (no bfloat16 tensor cores)")
        out["float16"] = "native"
        return out
    # torch's report, confirmed by the matmul being faster than float32 at all: an emulated one is 10-100x
    # slower, while a native one's lead shrinks to ~1.2x on a busy machine
    fast = lambda dt: peaks.get(dt, 0) > peaks["float32"]  # noqa: E731
    out["bfloat16"] = ("native" if cpu_bf16_reported() and fast("bfloat16") else
                       f"emulated (matmul {peaks.get('bfloat16', 0) / 1e9:.1f} against {peaks['float32'] / 1e9:.1f} "
                       f"GFLOP/s in float32)")
    out["float16"] = ("native" if fast("float16") else
                      f"emulated (matmul {peaks.get('float16', 0) / 1e9:.1f} GFLOP/s)")
    return out


def machine_line(device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}, CUDA {torch.version.cuda}"
    info = cpuinfo()
    model = info.get("model name") or platform.processor() or platform.machine()
    flags = set(info.get("flags", "").split())
    isa = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile", "avx512_fp16") if f in flags]
    env = {k: os.environ[k] for k in ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS")
           if k in os.environ}
    emulated = f"; EMULATING {env}" if env else ""
    return (f"{model}, {physical_cores()} physical cores, {torch.get_num_threads()} threads, flags "
            f"{' '.join(isa)}; torch CPU capability {torch.backends.cpu.get_cpu_capability()}{emulated}")


def parse_shapes(text, default_arch, default_tokens):
    out = []
    for item in text.split(","):
        name, _, tokens = item.partition("@")
        arch = {"default": default_arch, "gpt2-small": Architecture()}.get(name)
        if arch is None:
            raise SystemExit(f"--shapes: {name!r} is not one of default, gpt2-small (optionally @TOKENS)")
        out.append((name, arch, int(tokens) if tokens else default_tokens))
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ini", default="config.ini", help="the default config (its [architecture] and batch size)")
    p.add_argument("--shapes", default="default,gpt2-small",
                   help="default and/or gpt2-small, each optionally @TOKENS per batch (default: the config's "
                        "max_num_of_tokens_in_batch, rounded down to whole 513-token documents)")
    p.add_argument("--dtypes", default="native", help="native (every dtype the device runs natively) or a list")
    p.add_argument("--compile", default="both", choices=("eager", "compiled", "both"))
    p.add_argument("--trainers", default=",".join(TRAINERS))
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: the physical cores)")
    p.add_argument("--steps", type=int, default=0, help="timed steps per trainer per round (0: 1 for GPT-2 small "
                                                        "on a CPU, 3 else)")
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds; tokens/s is their median")
    # GPT-2 small's second eager step still paid 256,000 page faults (the heap growing to its working size)
    p.add_argument("--warmup", type=int, default=0, help="untimed steps first (0: 2 eager, 3 compiled)")
    a = p.parse_args(argv)

    device = torch.device(a.device)
    if device.type == "cuda":  # as model/train.py, for every trainer: TF32 for float32 matmuls, no cuDNN attention
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        disable_cudnn_attention()
    torch.set_num_threads(a.threads or physical_cores())
    settings = load_settings(a.ini)
    start = settings.train.start_predicting_from_what_token
    shapes = parse_shapes(a.shapes, settings.architecture, settings.preprocessing.max_num_of_tokens_in_batch)
    trainers = a.trainers.split(",")
    modes = {"eager": [False], "compiled": [True], "both": [False, True]}[a.compile]
    try:
        import transformers
        hf_version = transformers.__version__
    except ImportError:
        hf_version = "not installed"
        trainers = [t for t in trainers if t != "hf"]
    commit = subprocess.run(["git", "describe", "--always", "--dirty"], capture_output=True, text=True,
                            cwd=Path(__file__).parent).stdout.strip()
    print(f"# bench/train.py, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, commit {commit}, "
          f"torch {torch.__version__}, transformers {hf_version}")
    print(f"# device {device}: {machine_line(device)}")
    threads = f", {torch.get_num_threads()} threads" if device.type == "cpu" else ""
    print(f"# memory copy {copy_bandwidth(device) / 1e9:.1f} GB/s (read + write{threads})")

    asked = list(DTYPES) if a.dtypes == "native" else a.dtypes.split(",")
    # float32 always: the yardstick that tells an emulated dtype
    peaks = {"float32": matmul_peak(device, torch.float32)}
    if matmul.AVAILABLE and device.type == "cpu":
        # some of the project's float32 matmuls go to oneDNN (model/matmul.py): the peak is the faster
        # library's, so that no trainer's MFU is stated against a peak it outruns
        torch_peak, onednn_peak = peaks["float32"], matmul_peak(device, torch.float32, product=matmul.mm_nt)
        peaks["float32"] = max(torch_peak, onednn_peak)
        print(f"# matmul float32: torch (MKL) {torch_peak / 1e9:.1f}, oneDNN {onednn_peak / 1e9:.1f} GFLOP/s; "
              f"the peak below is the higher")
    peaks.update({dt: matmul_peak(device, DTYPES[dt], yardstick=peaks["float32"]) for dt in asked if dt != "float32"})
    status = native_dtypes(device, peaks)
    dtypes = [dt for dt in asked if a.dtypes != "native" or status[dt] == "native"]
    for dt in asked:
        sheet = datasheet_peak(device, dt)
        note = f", datasheet {sheet / 1e12:.0f} TFLOP/s" if sheet else ""
        run = "" if dt in dtypes else ": skipped"
        print(f"# matmul peak {dt:9s} {peaks[dt] / 1e9:10.1f} GFLOP/s measured{note} ({status[dt]}){run}")

    rng = np.random.default_rng(0)
    rows = []
    print(f"\n{'shape':18s} {'dtype':9s} {'mode':8s} {'trainer':8s} {'tok/s':>9s} {'MFU':>7s} {'MFU sheet':>9s} "
          f"{'peak MB':>8s} {'project/this':>12s}")
    with keep_freed_memory():  # model/train.py's allocator setting, for every trainer alike
        for shape, arch, tokens in shapes:
            n_params = GPT(arch).num_params() - arch.positional_encoding_max_pos * arch.d_model
            small_cpu = shape == "gpt2-small" and device.type == "cpu"
            steps = a.steps or (1 if small_cpu else 3)
            batches = batches_for(arch, tokens, 4, rng)
            batches = [(x.to(device), y.to(device)) for x, y in batches]
            for dt in dtypes:
                emulated = status[dt] != "native"
                peak = max(peaks[dt], peaks["float32"]) if emulated else peaks[dt]
                for compiled in modes:
                    mode = "compiled" if compiled else "eager"
                    built = {name: build(name, arch, device, dt, compiled, start) for name in trainers}
                    warm = a.warmup or (3 if compiled else 2)
                    for tr in built.values():
                        for i in range(warm):
                            tr.step(*batches[i % len(batches)])
                    sync(device)
                    speed = {name: [] for name in built}
                    for r in range(a.rounds):
                        order = trainers[r % len(trainers):] + trainers[:r % len(trainers)]
                        for name in order:
                            t0 = time.perf_counter()
                            n_tok = 0
                            for i in range(steps):
                                x, y = batches[(r * steps + i) % len(batches)]
                                built[name].step(x, y)
                                n_tok += x.numel()
                            sync(device)
                            speed[name].append(n_tok / (time.perf_counter() - t0))
                    for name in trainers:
                        tps = statistics.median(speed[name])
                        mem = peak_memory(built[name], *batches[0], device)
                        mfu = 6 * n_params * tps / peak
                        sheet = datasheet_peak(device, dt)
                        row = dict(shape=f"{shape}@{batches[0][0].numel()}",
                                   dtype=dt + (" (emulated)" if emulated else ""), mode=mode, trainer=name, tokens_per_s=tps, mfu=mfu,
                                   mfu_sheet=6 * n_params * tps / sheet if sheet else None, peak_bytes=mem,
                                   rounds=speed[name])
                        rows.append(row)
                        ratio = statistics.median(speed["project"]) / tps if "project" in speed else float("nan")
                        # above 100%: the peak was measured while the machine was busier than during the steps
                        mfu_s = f"{100 * mfu:6.1f}%" if mfu <= 1 else "  >100%"
                        sheet_s = f"{100 * row['mfu_sheet']:8.1f}%" if sheet else "        -"
                        mem_s = f"{mem / 2**20:8.0f}" if mem else "       -"
                        print(f"{row['shape']:18s} {row['dtype']:9s} {mode:8s} {name:8s} {tps:9.0f} {mfu_s} "
                              f"{sheet_s} {mem_s} {ratio:11.2f}x", flush=True)
                    del built
                    gc.collect()
                    torch._dynamo.reset()
    summary(rows, trainers)
    return rows


def summary(rows, trainers):
    """Each trainer at its best of eager and compiled, and project / reference."""
    if "project" not in trainers or len(trainers) < 2:
        return
    print("\nbest of eager/compiled per trainer; ratio = project tok/s / reference tok/s")
    keys = list(dict.fromkeys((r["shape"], r["dtype"]) for r in rows))  # in the order they ran
    for shape, dt in keys:
        best = {}
        for r in rows:
            if (r["shape"], r["dtype"]) == (shape, dt):
                if r["trainer"] not in best or r["tokens_per_s"] > best[r["trainer"]]["tokens_per_s"]:
                    best[r["trainer"]] = r
        proj = best["project"]
        mfu = f"{100 * proj['mfu']:.1f}%" if proj["mfu"] <= 1 else ">100%: peak measured low"
        parts = [f"project {proj['tokens_per_s']:.0f} tok/s ({proj['mode']}, MFU {mfu})"]
        for name in trainers[1:]:
            if name in best:
                ref = best[name]
                mem = (f", memory {proj['peak_bytes'] / ref['peak_bytes']:.2f}x"
                       if proj["peak_bytes"] and ref["peak_bytes"] else "")
                parts.append(f"{name} {ref['tokens_per_s']:.0f} ({ref['mode']}): "
                             f"{proj['tokens_per_s'] / ref['tokens_per_s']:.2f}x{mem}")
        print(f"{shape:18s} {dt:9s} " + "; ".join(parts))


if __name__ == "__main__":
    main()
