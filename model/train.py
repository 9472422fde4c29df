"""One epoch (or `[train] epochs`) of GPT-2 from scratch over the train split, resumable at any moment.

    python -m model.train --ini config.ini --train work/preprocessed/split/train.json \
        --val work/preprocessed/split/val.arrow --final checkpoints/final.pt
    torchrun --standalone --nproc_per_node=2 -m model.train --ini ... (DDP; `launch` does this when
        [train] nproc_per_node > 1)

Run folder. `folder_to_save_state_dicts/run-<hash>/`, the hash over [architecture], the [train] keys that
change the result, and the train split's manifest: an unchanged configuration resumes, a changed one starts
a new run. It holds config.json, metrics.jsonl, the last `keep_checkpoints` step_N.pt (+ .json sidecar with
their sha256) and a `lock` file, flock()ed while a trainer runs (the OS drops it when the process dies,
even by SIGKILL, so a lock is never stale).

Data order (as the seed): per epoch the chunks are shuffled, and within a chunk its batches, seeded by
(seed, epoch) and (seed, epoch, chunk). An optimizer step takes the next batches of the chunk until
tokens_per_optimizer_step tokens (at least one batch per rank); under DDP they are dealt out round-robin.
A checkpoint is written every checkpoint_every_steps steps and at the end of every chunk; it holds the model,
the optimizer, the grad scaler, every rank's RNG states and the data cursor (epoch, chunk, batch position),
so that a killed run resumed from it ends, on CPU, with bitwise the same weights as an uninterrupted one.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import fcntl
import hashlib
import math
import os
import signal
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import orjson
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from pipeline.config import EOT, VOCAB_SIZE, Architecture, Settings, Train, as_plain_dict, load_settings
from pipeline.io import progress, sha256_file, tmp_path, write_json
from pipeline.shards import ShardReader, read_train_manifest

from model.checkpoint import (ModelFileError, check_architecture, architecture_from, latest_checkpoint,
                              list_checkpoints, save_checkpoint, save_model)
from model.gpt import GPT

# [train] keys that do not change the trained weights: editing them resumes the same run.
OPERATIONAL_KEYS = ("folder_to_save_state_dicts", "keep_checkpoints", "checkpoint_every_steps", "threads",
                    "val_every_steps", "val_batches")


# ---------------------------------------------------------------------------------------------------------
# Schedule and loss

def lr_at(step: int, t: Train) -> float:
    """The seed's schedule for optimizer step `step` (1, 2, ...): linear warm-up over warmup_steps, then
    cos(pi/2 * (step - warmup) / steps_to_attenuate_lr_to_zero), reaching 0 and staying there."""
    warm = step / t.warmup_steps if t.warmup_steps > 0 else 1.0
    x = (step - t.warmup_steps) / max(t.steps_to_attenuate_lr_to_zero, 1)
    decay = math.cos(math.pi * max(x, 0.0) / 2) if x < 1 else 0.0
    return t.max_lr * max(0.0, min(warm, decay))


def inputs_and_targets(tokens: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch (n, L) of `[<|endoftext|>] + doc` rows -> input = the rows, target = `doc + [<|endoftext|>]`."""
    x = torch.from_numpy(tokens.astype(np.int64))
    y = torch.cat([x[:, 1:], torch.full((x.shape[0], 1), EOT, dtype=torch.int64)], dim=1)
    return x, y


class LinearCrossEntropy(torch.autograd.Function):
    """sum_i -log softmax(h_i W^T)[y_i] with a hand-written backward, for the CPU.

    The (tokens x 50,257) logits are made ROWS rows at a time and turned into probabilities while they are in
    cache; only the probabilities (in h's dtype) go to memory, saved for the backward pass, which is
    (softmax - onehot(y)) @ W and its transpose @ h. Autograd's log_softmax + nll_loss make about ten passes
    over the whole logits matrix in memory, which dominated a small model's training step.
    """

    ROWS = 64

    @staticmethod
    def forward(ctx, h, w, y):
        keep = any(ctx.needs_input_grad)  # no backward (validation): no probabilities to keep
        probs = torch.empty(h.shape[0] if keep else 0, w.shape[0], dtype=h.dtype, device=h.device)
        loss = torch.zeros((), dtype=torch.float32, device=h.device)
        for a in range(0, h.shape[0], LinearCrossEntropy.ROWS):
            z = (h[a:a + LinearCrossEntropy.ROWS] @ w.t()).float()
            target_logit = z.gather(1, y[a:a + LinearCrossEntropy.ROWS, None])
            m = z.amax(dim=1, keepdim=True)
            z = z.sub_(m).exp_()
            s = z.sum(dim=1, keepdim=True)
            loss += (s.log() + m - target_logit).sum()
            if keep:
                probs[a:a + LinearCrossEntropy.ROWS] = z.div_(s)
        ctx.save_for_backward(h, w, y, probs)
        return loss

    @staticmethod
    def backward(ctx, grad):
        h, w, y, probs = ctx.saved_tensors
        probs[torch.arange(len(y), device=y.device), y] -= 1.0  # softmax - onehot, in place (used once)
        grad = grad.to(h.dtype)
        return (probs @ w) * grad, (probs.t() @ h) * grad, None


class LossModel(nn.Module):
    """GPT plus its loss, in one forward (what DDP and torch.compile wrap): the summed negative
    log-likelihood of the targets at positions >= start (the loss ignores the first `start` positions)."""

    def __init__(self, gpt: GPT):
        super().__init__()
        self.gpt = gpt

    def forward(self, x: torch.Tensor, y: torch.Tensor, start: int) -> torch.Tensor:
        h = self.gpt.hidden_states(x)[:, start:]          # no logits for positions the loss ignores
        if h.is_cuda:  # the padded matmul is the fast one on a GPU; torch.compile fuses the slice into the loss
            logits = self.gpt.lm_head(h)[..., :VOCAB_SIZE]
            return F.cross_entropy(logits.reshape(-1, VOCAB_SIZE).float(), y[:, start:].reshape(-1), reduction="sum")
        # On a CPU the logits' memory traffic dominates a small model's step: one contiguous (tokens, 50257)
        # matrix, the padded rows left out, and a fused loss.
        w = self.gpt.lm_head.weight[:VOCAB_SIZE]
        h = h.reshape(-1, h.shape[-1])
        if torch.is_autocast_enabled(h.device.type):
            dtype = torch.get_autocast_dtype(h.device.type)
            h, w = h.to(dtype), w.to(dtype)
        return LinearCrossEntropy.apply(h, w, y[:, start:].reshape(-1))


def predicted_positions(seq_len: int, start: int) -> int:
    return max(seq_len - start, 0)


# ---------------------------------------------------------------------------------------------------------
# Data: the train split's shards, memory-mapped; the seeded order; the cursor

class TrainData:
    """The batches of every train chunk (memory-mapped shards), addressed per chunk as (shard, batch)."""

    def __init__(self, manifest_path):
        self.chunks = read_train_manifest(manifest_path)
        self.readers: dict[str, ShardReader] = {}
        self.index = []      # per chunk: (n_batches, 2) array of (shard number, batch number in the shard)
        self.shape = []      # per chunk: (n_batches, 2) array of (n_docs, seq_len)
        for chunk in self.chunks:
            idx, shp = [], []
            for s, path in enumerate(chunk["shards"]):
                r = self.reader(path)
                idx.append(np.stack([np.full(len(r), s), np.arange(len(r))], 1))
                shp.append(np.stack([r.n_docs(), r.seq_lens()], 1))
            self.index.append(np.concatenate(idx) if idx else np.zeros((0, 2), np.int64))
            self.shape.append(np.concatenate(shp).astype(np.int64) if shp else np.zeros((0, 2), np.int64))

    def reader(self, path) -> ShardReader:
        if path not in self.readers:
            self.readers[path] = ShardReader(path)
        return self.readers[path]

    def tokens(self, chunk: int, b: int) -> np.ndarray:
        s, j = self.index[chunk][b]
        return self.reader(self.chunks[chunk]["shards"][s])[int(j)].tokens

    def total_tokens(self) -> int:
        return int(sum((s[:, 0] * s[:, 1]).sum() for s in self.shape))


def chunk_order(seed: int, epoch: int, n_chunks: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(n_chunks)


def batch_order(seed: int, epoch: int, chunk: int, shape: np.ndarray, start: int) -> np.ndarray:
    """The shuffled batches of a chunk; batches too short to predict anything (seq_len <= start) left out."""
    order = np.random.default_rng([seed, epoch, chunk]).permutation(len(shape))
    return order[shape[order, 1] > start]


def step_groups(order: np.ndarray, shape: np.ndarray, tokens_per_step: int, world: int) -> list[tuple[int, int]]:
    """Split a chunk's order into optimizer steps [(begin, end), ...]: at least `world` batches and at least
    tokens_per_step tokens each (the chunk's last step may fall short)."""
    groups, begin, tokens = [], 0, 0
    for i, b in enumerate(order):
        tokens += int(shape[b, 0] * shape[b, 1])
        if i + 1 - begin >= world and tokens >= tokens_per_step:
            groups.append((begin, i + 1))
            begin, tokens = i + 1, 0
    if begin < len(order):
        groups.append((begin, len(order)))
    return groups


# ---------------------------------------------------------------------------------------------------------
# Run folder, lock, metrics

def run_fingerprint(settings: Settings, train_manifest) -> dict:
    train = {k: v for k, v in as_plain_dict(settings.train).items() if k not in OPERATIONAL_KEYS}
    return {"train": train, "architecture": as_plain_dict(settings.architecture),
            "train_split_sha256": sha256_file(train_manifest)}


def run_dir_for(settings: Settings, train_manifest) -> tuple[Path, dict]:
    fp = run_fingerprint(settings, train_manifest)
    digest = hashlib.sha256(orjson.dumps(fp, option=orjson.OPT_SORT_KEYS)).hexdigest()[:12]
    return Path(settings.train.folder_to_save_state_dicts) / f"run-{digest}", fp


class RunLock:
    """An exclusive flock on run_dir/lock for as long as the trainer lives; a second trainer is refused."""

    def __init__(self, run_dir: Path):
        self.path = run_dir / "lock"
        self.fh = None

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fh = open(self.path, "a+")
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            holder = fh.read().strip() or "another process"
            fh.close()
            raise RuntimeError(f"{self.path}: another trainer ({holder}) is training this run right now; "
                               f"wait for it or stop it first") from None
        fh.seek(0)
        fh.truncate()
        fh.write(f"pid {os.getpid()} on {os.uname().nodename}\n")
        fh.flush()
        self.fh = fh

    def release(self) -> None:
        if self.fh is not None:
            fcntl.flock(self.fh, fcntl.LOCK_UN)
            self.fh.close()
            self.fh = None


class Metrics:
    """metrics.jsonl: one JSON object per line; on resume, lines past the checkpoint's step are dropped."""

    def __init__(self, path: Path, resume_step: int | None):
        self.path = path
        kept = []
        if resume_step is not None and path.exists():
            for line in path.read_bytes().splitlines():
                try:
                    rec = orjson.loads(line)
                except orjson.JSONDecodeError:
                    continue  # a line cut short by a kill
                if rec.get("step", math.inf) <= resume_step:
                    kept.append(line)
        tmp = tmp_path(path)
        tmp.write_bytes(b"".join(line + b"\n" for line in kept))
        os.replace(tmp, path)
        self.fh = open(path, "ab", buffering=0)

    def write(self, **rec) -> None:
        self.fh.write(orjson.dumps(rec, option=orjson.OPT_SERIALIZE_NUMPY) + b"\n")

    def close(self):
        self.fh.close()


# ---------------------------------------------------------------------------------------------------------
# Devices, precision, distributed

@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def master(self) -> bool:
        return self.rank == 0


def pick_device(name: str, d: Dist) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise RuntimeError(f"[train] device = {name}, but torch sees no CUDA device")
        if d.world > 1:
            name = f"cuda:{d.local_rank}"
        elif name == "cuda":
            name = "cuda:0"
        torch.cuda.set_device(name)
    return torch.device(name)


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


def make_optimizer(gpt: GPT, t: Train, device: torch.device) -> torch.optim.AdamW:
    """AdamW; weight decay on 2-D weights (matmuls and embeddings) only, not on biases and LayerNorms."""
    decay = [p for p in gpt.parameters() if p.dim() >= 2]
    no_decay = [p for p in gpt.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": t.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    kw = {"fused": True} if device.type == "cuda" else {}
    return torch.optim.AdamW(groups, lr=lr_at(1, t), **kw)


# ---------------------------------------------------------------------------------------------------------
# The training loop

@contextlib.contextmanager
def keep_freed_memory():
    """glibc hands every large free()d block (the logits, 100s of MB) back to the OS, and the next step pays
    page faults to zero it again; during training keep it in the heap instead (about 15% faster on CPU)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4
        libc.mallopt(M_MMAP_MAX, 0)
        libc.mallopt(M_TRIM_THRESHOLD, 1 << 40)
    except (OSError, AttributeError):  # not glibc
        yield
        return
    try:
        yield
    finally:
        libc.mallopt(M_MMAP_MAX, 65536)        # glibc's defaults back, and the memory to the OS
        libc.mallopt(M_TRIM_THRESHOLD, 128 * 1024)
        libc.malloc_trim(0)


def train(settings: Settings, train_manifest, val_shard, final_path, threads: int = 0, log=None) -> Path:
    """Train (or resume) the run of these settings; write final_path; return it."""
    with keep_freed_memory():
        return _setup_and_train(settings, train_manifest, val_shard, final_path, threads, log)


def _setup_and_train(settings, train_manifest, val_shard, final_path, threads, log):
    log = log or sys.stderr
    t, arch = settings.train, settings.architecture
    d = Dist()
    if "RANK" in os.environ and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        d = Dist(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0)))
    device = pick_device(t.device, d)
    if device.type == "cuda":  # TF32 matmuls for float32 (bfloat16/float16 autocast does not need it)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if d.world > 1:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    n_threads = t.threads or max(1, (threads or os.cpu_count() or 1) // (d.world if device.type == "cpu" else 1))
    torch.set_num_threads(n_threads)

    run_dir, fingerprint = run_dir_for(settings, train_manifest)
    lock = RunLock(run_dir)
    ok = 1
    if d.master:
        try:
            lock.acquire()
        except RuntimeError:
            ok = 0
            if d.world == 1:
                raise
    if d.world > 1:
        flag = torch.tensor([ok], device=device if device.type == "cuda" else "cpu")
        dist.broadcast(flag, 0)
        if not flag.item():
            dist.destroy_process_group()
            raise RuntimeError(f"{run_dir / 'lock'}: another trainer is training this run right now")
    try:
        return _train(settings, d, device, run_dir, fingerprint, train_manifest, val_shard, final_path, log)
    finally:
        lock.release()
        if d.world > 1 and dist.is_initialized():
            dist.destroy_process_group()


def _train(settings, d: Dist, device, run_dir: Path, fingerprint, train_manifest, val_shard, final_path, log):
    t, arch = settings.train, settings.architecture
    say = (lambda msg: print(msg, file=log, flush=True)) if d.master else (lambda msg: None)
    if d.master:
        for stray in list(run_dir.glob(".*.tmp.*")) + [p for p in run_dir.glob("step_*.pt")
                                                        if not p.with_suffix(".json").exists()]:
            stray.unlink(missing_ok=True)  # left by a kill in the middle of a write
        write_json(run_dir / "config.json", fingerprint)

    # -- model, optimizer, precision
    torch.manual_seed(t.seed)  # the same initial weights on every rank
    gpt = GPT(arch, P_drop=t.P_drop, init_std=t.init_std).to(device)
    optimizer = make_optimizer(gpt, t, device)
    amp_dtype = {"float32": None, "bfloat16": torch.bfloat16, "float16": torch.float16}[t.dtype]
    autocast = (lambda: torch.autocast(device.type, dtype=amp_dtype)) if amp_dtype else contextlib.nullcontext
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype is torch.float16)
    torch.manual_seed(t.seed + 1 + d.rank)  # dropout differs between ranks

    # -- resume
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ckpt_path, state = latest_checkpoint(run_dir, map_location="cpu", expected_arch=arch)
    for w in caught:
        print(f"warning: {w.message}", file=log, flush=True)
        warnings.warn(w.message, stacklevel=2)
    step, tokens_seen, elapsed = 0, 0, 0.0
    cursor = {"epoch": 0, "chunk": 0, "batch": 0}
    if state is not None:
        gpt.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"]) if state["scaler"] else None
        restore_rng(state["rng"], d, device, log)
        step, tokens_seen, elapsed, cursor = state["step"], state["tokens"], state["elapsed_s"], state["cursor"]
        say(f"resuming {run_dir} from {ckpt_path.name}: step {step}, {tokens_seen:,} tokens, cursor {cursor}")
    else:
        say(f"starting run {run_dir} (no checkpoint yet)")
    metrics = Metrics(run_dir / "metrics.jsonl", step if state is not None else None) if d.master else None

    model = LossModel(gpt)
    if t.compile:
        model = torch.compile(model, dynamic=True)  # every batch has its own (n, seq_len)
    if d.world > 1:
        model = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)

    data = TrainData(train_manifest)
    val = ShardReader(val_shard)
    val_batches = [val[i].tokens for i in range(min(t.val_batches, len(val)))]
    total_tokens = data.total_tokens() * t.epochs
    start = t.start_predicting_from_what_token
    say(f"{gpt.num_params():,} parameters ({gpt.num_params(non_embedding=True):,} without embeddings), "
        f"{len(data.chunks)} chunks, {total_tokens:,} tokens over {t.epochs} epoch(s), device {device}, "
        f"dtype {t.dtype}, {d.world} process(es) x {torch.get_num_threads()} threads")

    def validate() -> float:
        gpt.eval()
        nll, n = 0.0, 0
        with torch.no_grad(), autocast():
            for tokens in val_batches:
                if tokens.shape[1] <= start:
                    continue
                x, y = inputs_and_targets(tokens)
                nll += model_plain(x.to(device), y.to(device), start).item()
                n += tokens.shape[0] * predicted_positions(tokens.shape[1], start)
        gpt.train()
        return nll / max(n, 1)

    model_plain = LossModel(gpt)

    def checkpoint(done=False):
        rng = gather_rng(d, device)  # a collective: every rank takes part
        if d.master:
            save_checkpoint(run_dir, step, {
                "model": gpt.state_dict(), "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
                "rng": rng, "cursor": dict(cursor), "step": step, "tokens": tokens_seen, "elapsed_s": elapsed,
                "done": done, "world_size": d.world, "architecture": as_plain_dict(arch),
                "train": as_plain_dict(t)}, keep=t.keep_checkpoints)

    if d.master and state is None and t.val_every_steps:
        metrics.write(kind="val", step=0, tokens=0, val_loss=validate())

    bar = progress(log, "train", "tok", total=total_tokens) if d.master else None
    if bar is not None:
        bar.update(tokens_seen)
    gpt.train()
    done = state is not None and state.get("done", False)
    while not done and cursor["epoch"] < t.epochs:
        e = cursor["epoch"]
        corder = chunk_order(t.seed, e, len(data.chunks))
        while cursor["chunk"] < len(corder):
            c = int(corder[cursor["chunk"]])
            shape = data.shape[c]
            order = batch_order(t.seed, e, c, shape, start)
            for begin, end in step_groups(order, shape, t.tokens_per_optimizer_step, d.world):
                if begin < cursor["batch"]:
                    continue
                t0 = time.perf_counter()
                group = [int(b) for b in order[begin:end]]
                n_pred = sum(int(shape[b, 0]) * predicted_positions(int(shape[b, 1]), start) for b in group)
                step_tokens = sum(int(shape[b, 0] * shape[b, 1]) for b in group)
                mine = group[d.rank::d.world] or group[:1]   # a rank with no batch left runs one with weight 0
                weight = (d.world / n_pred) if group[d.rank::d.world] else 0.0  # DDP averages over ranks
                lr = lr_at(step + 1, t)
                for g in optimizer.param_groups:
                    g["lr"] = lr
                loss_sum = torch.zeros((), device=device)
                for i, b in enumerate(mine):
                    x, y = inputs_and_targets(data.tokens(c, b))
                    x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                    sync = i == len(mine) - 1 or d.world == 1
                    ctx = model.no_sync() if (d.world > 1 and not sync) else contextlib.nullcontext()
                    with ctx:
                        with autocast():
                            nll = model(x, y, start)
                        scaler.scale(nll * weight).backward()
                    if weight:
                        loss_sum += nll.detach()
                if d.world > 1:
                    dist.all_reduce(loss_sum)
                scaler.unscale_(optimizer)
                grad_norm = torch.nn.utils.clip_grad_norm_(gpt.parameters(), t.grad_clip if t.grad_clip > 0 else math.inf)
                scaler.step(optimizer)
                scaler.update()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                tokens_seen += step_tokens
                cursor["batch"] = end
                dt = time.perf_counter() - t0
                elapsed += dt
                if d.master:
                    loss = loss_sum.item() / n_pred
                    metrics.write(kind="train", step=step, tokens=tokens_seen, loss=loss, lr=lr,
                                  grad_norm=float(grad_norm), tokens_per_s=step_tokens / dt, elapsed_s=elapsed)
                    bar.update(step_tokens)
                    bar.set_postfix(loss=f"{loss:.3f}", lr=f"{lr:.2e}", refresh=False)
                    if t.val_every_steps and step % t.val_every_steps == 0:
                        metrics.write(kind="val", step=step, tokens=tokens_seen, val_loss=validate())
                if step % t.checkpoint_every_steps == 0:
                    checkpoint()
            cursor["chunk"] += 1
            cursor["batch"] = 0
            if cursor["chunk"] == len(corder):
                cursor["epoch"] += 1
                cursor["chunk"] = 0
            if cursor["epoch"] < t.epochs:
                checkpoint()  # the end of a chunk (the very end is the final checkpoint, below)
            if cursor["epoch"] > e:
                break
    if not done:
        if d.master and t.val_every_steps and step % t.val_every_steps != 0:
            metrics.write(kind="val", step=step, tokens=tokens_seen, val_loss=validate())
        checkpoint(done=True)
    if bar is not None:
        bar.close()
    final_path = Path(final_path)
    if d.master:
        save_model(final_path, gpt, arch, run_dir=os.path.relpath(run_dir, final_path.parent), step=step,
                   tokens=tokens_seen, elapsed_s=elapsed, train=as_plain_dict(t), world_size=d.world)
        metrics.close()
        say(f"wrote {final_path}: {step} steps, {tokens_seen:,} tokens, {elapsed:.0f} s of training")
    return final_path


# ---------------------------------------------------------------------------------------------------------
# Entry points: the Snakefile's `launch`, and the CLI (also what torchrun runs)

def _die_with_parent():
    """In the child: get SIGTERM when the parent (Snakemake) dies, even by SIGKILL (Linux)."""
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def launch(ini_path, train_manifest, val_shard, final_path, threads: int = 0, log=None) -> None:
    """The `train` rule: in this process, or under torchrun with [train] nproc_per_node processes."""
    settings = load_settings(ini_path)
    log_path = Path(log) if log else None
    if log_path:
        log_path.parent.mkdir(parents=True, exist_ok=True)
    n = settings.train.nproc_per_node
    with (open(log_path, "a", encoding="utf-8", buffering=1) if log_path else contextlib.nullcontext(sys.stderr)) as fh:
        if n == 1:
            train(settings, train_manifest, val_shard, final_path, threads=threads, log=fh)
            return
        per_proc = settings.train.threads or max(1, (threads or os.cpu_count() or 1) // n)
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}",
               "-m", "model.train", "--ini", str(ini_path), "--train", str(train_manifest), "--val", str(val_shard),
               "--final", str(final_path), "--threads", str(per_proc * n)]
        print(" ".join(cmd), file=fh, flush=True)
        env = dict(os.environ, OMP_NUM_THREADS=str(per_proc),
                   PYTHONPATH=os.pathsep.join([str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH", "")]))
        proc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, preexec_fn=_die_with_parent)
        if proc.returncode != 0:
            raise RuntimeError(f"torchrun exited with {proc.returncode}; see {log_path or 'the output above'}")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ini", required=True)
    p.add_argument("--train", required=True, help="the train split's train.json")
    p.add_argument("--val", required=True, help="the val split's val.arrow")
    p.add_argument("--final", required=True, help="where the final model goes (final.pt)")
    p.add_argument("--threads", type=int, default=0, help="CPU threads in all (0: [train] threads or all cores)")
    p.add_argument("--log", default=None, help="append the log here (default: stderr)")
    a = p.parse_args(argv)
    settings = load_settings(a.ini)
    with (open(a.log, "a", encoding="utf-8", buffering=1) if a.log else contextlib.nullcontext(sys.stderr)) as fh:
        train(settings, a.train, a.val, a.final, threads=a.threads, log=fh)


if __name__ == "__main__":
    main()
