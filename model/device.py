"""Where and in what precision the model runs: the device, `dtype = auto`, autocast, and (for DDP) the
process group's ranks and RNG states.

`dtype = auto` (the default) picks bfloat16 where the device runs it natively and float32 elsewhere:

    CUDA      torch.cuda.is_bf16_supported(including_emulation=False)      (Ampere and newer)
    CPU       oneDNN's bfloat16 support as torch reports it (AVX512-BF16 or AMX on x86, BF16 on Arm),
              confirmed by timing a bfloat16 against a float32 matmul: bfloat16 must be clearly faster

An emulated bfloat16 is an order of magnitude slower than float32 on a CPU (measured: 146 against 1,973
tokens/s on an AVX2-only EPYC), so `auto` never picks it there. float16 is used only when asked for.
"""

from __future__ import annotations

import contextlib
import functools
import os
import time
import warnings
from dataclasses import dataclass

import torch
import torch.distributed as dist

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DTYPE_CHOICES = ("auto", *DTYPES)


@dataclass
class Dist:
    """This process's place in a torchrun job (rank 0 of 1 without one)."""
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def master(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls) -> "Dist":
        if "RANK" in os.environ and int(os.environ.get("WORLD_SIZE", "1")) > 1:
            return cls(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0)))
        return cls()


def resolve_device(name: str, d: Dist | None = None) -> torch.device:
    """auto -> cuda if there is one, else cpu; cuda / cuda:N must exist. Under DDP each rank takes the GPU
    of its local rank. Choosing a CUDA device also turns cuDNN attention off, process-wide (below)."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(name)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {name!r}: this machine has no CUDA GPU (use device = auto or cpu)")
        if d is not None and d.world > 1:
            dev = torch.device("cuda", d.local_rank)
        elif dev.index is None:
            dev = torch.device("cuda", 0)
        if dev.index >= torch.cuda.device_count():
            raise ValueError(f"device {name!r}: this machine has {torch.cuda.device_count()} GPU(s)")
        disable_cudnn_attention()
    return dev


def disable_cudnn_attention() -> None:
    """Attention through flash (or memory-efficient) SDPA, never cuDNN's. torch prefers cuDNN attention on
    Hopper and newer GPUs, and it builds an execution plan for every new (batch, length) shape: 147 ms per
    new shape against 0.29 ms for flash on an H200 (torch 2.11), while this workflow's batches come in
    hundreds of shapes (one per document length) and generation adds a shape per token (GPT-2 small's steps
    on the sample corpus there: a median 170 ms compiled with it, 31 ms eager without). Process-wide, as is
    torch's setting; called wherever a CUDA device is chosen (resolve_device)."""
    torch.backends.cuda.enable_cudnn_sdp(False)


# ---------------------------------------------------------------------------------------------------------
# dtype = auto

@dataclass(frozen=True)
class Precision:
    dtype: str            # float32 | bfloat16 | float16: what runs
    asked: str            # what the config asked for (auto, or a dtype)
    reason: str           # why, in words (for the log and config.json)

    def as_dict(self) -> dict:
        return {"dtype": self.dtype, "asked": self.asked, "reason": self.reason}


@functools.cache
def cpuinfo(path: str = "/proc/cpuinfo") -> dict[str, str]:
    """The first CPU's fields in /proc/cpuinfo (vendor_id, model name, flags, ...); {} where there is none."""
    fields = {}
    with contextlib.suppress(OSError):
        with open(path) as f:
            for line in f:
                if not line.strip():
                    break  # the end of the first CPU's block
                key, _, value = line.partition(":")
                fields.setdefault(key.strip(), value.strip())
    return fields


def cpu_bf16_reported() -> bool:
    """Does torch (oneDNN) report native bfloat16 matmuls on this CPU? Honours ONEDNN_MAX_CPU_ISA."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


@functools.cache
def cpu_bf16_speedup(n: int = 384, repeats: int = 5) -> float:
    """float32 time / bfloat16 time of an n x n matmul on this CPU, best of `repeats` (about 30 ms in all);
    > 1 where bfloat16 is native, far below 1 where it is emulated."""
    def best(dtype):
        a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
        a @ b
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            a @ b
            times.append(time.perf_counter() - t0)
        return min(times)

    with torch.random.fork_rng(devices=[]):
        return best(torch.float32) / best(torch.bfloat16)


NATIVE_SPEEDUP = 1.2  # bfloat16 must beat float32 by this much on the test matmul to count as native


def resolve_precision(asked: str, device: torch.device) -> Precision:
    """The dtype that runs for [train] dtype = `asked` on `device`, and why; warns for an emulated bfloat16."""
    if asked not in DTYPE_CHOICES:
        raise ValueError(f"dtype {asked!r} is not one of {', '.join(DTYPE_CHOICES)}")
    if device.type == "cuda":
        native = torch.cuda.is_bf16_supported(including_emulation=False)
        name = torch.cuda.get_device_name(device)
        if asked == "auto":
            return Precision("bfloat16" if native else "float32", asked,
                             f"{name} {'runs' if native else 'does not run'} bfloat16 natively")
        return Precision(asked, asked, "asked for")
    if asked in ("auto", "bfloat16"):
        reported = cpu_bf16_reported()
        speedup = cpu_bf16_speedup() if reported or asked == "bfloat16" else None
        native = reported and speedup >= NATIVE_SPEEDUP
        if asked == "auto":
            if not reported:
                why = "torch reports no native bfloat16 on this CPU (no AVX512-BF16/AMX or Arm BF16)"
            elif not native:
                why = (f"torch reports native bfloat16 on this CPU, but a bfloat16 matmul ran only {speedup:.2f}x "
                       f"the float32 speed")
            else:
                why = f"native bfloat16 on this CPU: a bfloat16 matmul ran {speedup:.1f}x the float32 speed"
            return Precision("bfloat16" if native else "float32", asked, why)
        if not native:
            warnings.warn(f"dtype = bfloat16 on a CPU without native bfloat16: it is emulated, and a matmul ran "
                          f"{1 / speedup:.0f}x slower than in float32 here; expect training about that much "
                          f"slower (dtype = auto or float32 avoids it)", stacklevel=2)
            return Precision("bfloat16", asked, f"asked for; emulated on this CPU ({1 / speedup:.0f}x slower "
                                                f"matmuls than float32)")
    return Precision(asked, asked, "asked for")


def autocast(device: torch.device, dtype: str):
    """Autocast to bfloat16/float16; float32 runs as is (dtype already resolved, not auto)."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    if dtype == "float32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=DTYPES[dtype])


def set_threads(threads: int) -> None:
    if threads and threads > 0:
        torch.set_num_threads(threads)


# ---------------------------------------------------------------------------------------------------------
# RNG states of every rank (for checkpoints that resume bitwise)

def gather_rng(d: Dist, device: torch.device) -> dict:
    """Every rank's RNG states (CPU and, on GPU, CUDA) as uint8 tensors, gathered on every rank."""
    states = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        states["cuda"] = torch.cuda.get_rng_state(device)
    if d.world == 1:
        return {k: [v] for k, v in states.items()}
    comm = device if device.type == "cuda" else torch.device("cpu")
    out = {}
    for k, v in states.items():
        parts = [torch.empty_like(v, device=comm) for _ in range(d.world)]
        dist.all_gather(parts, v.to(comm))
        out[k] = [p.cpu() for p in parts]
    return out


def restore_rng(rng: dict, d: Dist, device: torch.device, log) -> None:
    if len(rng["torch"]) != d.world:
        print(f"warning: the checkpoint was written by {len(rng['torch'])} processes, this run has {d.world}: "
              f"dropout will not repeat exactly", file=log)
    torch.set_rng_state(rng["torch"][d.rank % len(rng["torch"])])
    if device.type == "cuda" and "cuda" in rng:
        torch.cuda.set_rng_state(rng["cuda"][d.rank % len(rng["cuda"])], device)
