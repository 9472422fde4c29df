"""One epoch (or `[train] epochs`) of GPT-2 from scratch over the train split, resumable at any moment.

    python -m model.train --ini config.ini --train work/preprocessed/split/train.json \
        --val work/preprocessed/split/val.arrow --final checkpoints/final.pt
    torchrun --standalone --nproc_per_node=2 -m model.train --ini ... (DDP; `launch` does this when
        [train] nproc_per_node > 1)

The pieces live beside this file: model/loss.py (inputs, targets, the loss), model/data.py (the shards and
the seeded data order), model/optim.py (AdamW, the schedule), model/run.py (run folder, lock, metrics),
model/checkpoint.py (checkpoint files), model/device.py (device, dtype = auto, DDP ranks, RNG states).

A checkpoint is written every checkpoint_every_steps steps and at the end of every chunk; it holds the model,
the optimizer, the grad scaler, every rank's RNG states and the data cursor (epoch, chunk, batch position),
so that a killed run resumed from it ends, on CPU, with bitwise the same weights as an uninterrupted one.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import math
import os
import signal
import subprocess
import sys
import time
import traceback
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn

from pipeline.config import Settings, as_plain_dict, load_settings
from pipeline.io import progress, write_json
from pipeline.shards import ShardReader

from model.checkpoint import ModelFileError, latest_checkpoint, load_gpt, save_checkpoint, save_model
from model.data import TrainData, batch_order, chunk_order, step_groups
from model.device import Dist, Precision, autocast, gather_rng, resolve_device, resolve_precision, restore_rng
from model.gpt import GPT
from model.loss import LossModel, compile_error, inputs_and_targets, predicted_positions
from model.optim import lr_at, make_optimizer
from model.run import Metrics, RunLock, run_dir_for, steps_per_record
from model.signals import EXIT_PREEMPTED, STOP_SIGNALS, Preempted, StopRequest

# ---------------------------------------------------------------------------------------------------------
# The training loop

def physical_cores() -> int:
    """Physical CPU cores available to this process: a second hyperthread of a core adds no matmul units, and
    torch's threads on both contend for them (os.cpu_count() counts logical CPUs)."""
    cpus = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else set(range(os.cpu_count() or 1))
    cores = set()
    for cpu in cpus:
        try:
            siblings = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology/thread_siblings_list").read_text().strip()
        except OSError:
            return len(cpus)
        cores.add(siblings)
    return max(1, len(cores))


def usable_cores(threads: int = 0) -> int:
    """The physical cores to use: all of them, or `threads` (Snakemake's --cores) where that is fewer."""
    cores = physical_cores()
    return min(threads or cores, cores)


class CompiledOrEager(nn.Module):
    """torch.compile(model), or the model itself where compiling fails (no C++ compiler for the CPU backend,
    an operator inductor cannot lower): the first call tries the compiled model, and an error there is
    logged and the run goes on eagerly instead of dying after its set-up."""

    def __init__(self, model: nn.Module, log=None):
        super().__init__()
        self.model = model
        self.compiled = torch.compile(model, dynamic=True)  # every batch has its own (n, seq_len)
        self.log = log or sys.stderr

    def forward(self, *args):
        if self.compiled is not None:
            try:
                return self.compiled(*args)
            except Exception as e:  # noqa: BLE001 (any compiler failure; a real error recurs eagerly below)
                print(f"warning: torch.compile failed ({compile_error(e)}); training without it",
                      file=self.log, flush=True)
                self.compiled = None
        return self.model(*args)


@contextlib.contextmanager
def keep_freed_memory():
    """glibc hands every large free()d block (the logits, 100s of MB) back to the OS, and the next step pays
    page faults to zero it again; during training keep it in the heap instead. The default model's CPU step:
    0.59 s against 0.68 s with glibc's defaults (56,000 page faults a step; GPT-2 small's: 1.05x)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_MMAP_MAX = -1, -3, -4
        libc.mallopt(M_MMAP_MAX, 0)
        libc.mallopt(M_TRIM_THRESHOLD, 2**31 - 1)  # a C int: 1 << 40 wrapped to 0, which trims on every free
    except (OSError, AttributeError):  # not glibc
        yield
        return
    try:
        yield
    finally:
        # Any mallopt turns glibc's sliding mmap threshold off for good, so its defaults cannot come back: with
        # the 128 KB start value fixed, every tensor of 128 KB or more would be mmapped and faulted in afresh
        # (a GPT-2 small attention layer's forward + backward in the state the old exit here left: 121-127 ms
        # against 72-74). Set what the sliding threshold reaches once a 32 MB block has been freed instead.
        libc.mallopt(M_MMAP_MAX, 65536)
        libc.mallopt(M_MMAP_THRESHOLD, 32 * 2**20)
        libc.mallopt(M_TRIM_THRESHOLD, 64 * 2**20)
        libc.malloc_trim(0)  # the memory to the OS


def train(settings: Settings, train_manifest, val_shard, final_path, threads: int = 0, log=None) -> Path:
    """Train (or resume) the run of these settings; write final_path; return it. Stops early with Preempted
    (after a checkpoint) on SIGTERM, SIGINT or SIGUSR1 when called in a process's main thread."""
    with keep_freed_memory(), StopRequest() as stop:
        return _setup_and_train(settings, train_manifest, val_shard, final_path, threads, log, stop)


def _setup_and_train(settings, train_manifest, val_shard, final_path, threads, log, stop):
    log = log or sys.stderr
    t = settings.train
    d = Dist.from_env()
    device = resolve_device(t.device, d)
    if device.type == "cuda":  # TF32 matmuls for float32 (bfloat16/float16 autocast does not need it)
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if d.world > 1:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    n_threads = t.threads or max(1, usable_cores(threads) // (d.world if device.type == "cpu" else 1))
    torch.set_num_threads(n_threads)
    precision = choose_precision(t.dtype, device, d, log)

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
        return _train(settings, d, device, precision, run_dir, fingerprint, train_manifest, val_shard, final_path,
                      log, stop)
    finally:
        lock.release()
        if d.world > 1 and dist.is_initialized():
            exc = sys.exc_info()[1]
            if exc is not None:  # a stop or an error: its traceback's frames still hold the DDP wrapper, whose
                traceback.clear_frames(exc.__traceback__)  # teardown after the process group's can hang
                gc.collect()
            dist.destroy_process_group()


def choose_precision(asked: str, device: torch.device, d: Dist, log) -> Precision:
    """[train] dtype resolved on this device (auto: bfloat16 where native, else float32), rank 0's choice on
    every rank; a warning (emulated bfloat16) goes to the log too."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        precision = resolve_precision(asked, device)
    for w in caught:
        if d.master:
            print(f"warning: {w.message}", file=log, flush=True)
        warnings.warn(w.message, stacklevel=3)
    if d.world > 1:  # a timing could differ between ranks: rank 0 decides for all
        box = [precision]
        dist.broadcast_object_list(box, src=0)
        precision = box[0]
    return precision


def _train(settings, d: Dist, device, precision: Precision, run_dir: Path, fingerprint, train_manifest, val_shard,
           final_path, log, stop: StopRequest):
    t, arch = settings.train, settings.architecture
    say = (lambda msg: print(msg, file=log, flush=True)) if d.master else (lambda msg: None)
    if d.master:
        for stray in list(run_dir.glob(".*.tmp.*")) + [p for p in run_dir.glob("step_*.pt")
                                                        if not p.with_suffix(".json").exists()]:
            stray.unlink(missing_ok=True)  # left by a kill in the middle of a write
        write_json(run_dir / "config.json", {**fingerprint, "precision": precision.as_dict()})

    # -- model, optimizer, precision
    torch.manual_seed(t.seed)  # the same initial weights on every rank
    gpt = GPT(arch, P_drop=t.P_drop, init_std=t.init_std, scale_residual_init=t.scale_residual_init,
              attention_dropout=t.attention_dropout).to(device)
    optimizer = make_optimizer(gpt, t, device)
    amp = lambda: autocast(device, precision.dtype)  # noqa: E731
    scaler = torch.amp.GradScaler(device.type, enabled=precision.dtype == "float16")
    torch.manual_seed(t.seed + 1 + d.rank)  # dropout differs between ranks

    # -- resume
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ckpt_path, state = latest_checkpoint(run_dir, map_location="cpu", expected_arch=arch)
    for w in caught:
        print(f"warning: {w.message}", file=log, flush=True)
        warnings.warn(w.message, stacklevel=2)
    step, batches, tokens_seen, elapsed = 0, 0, 0, 0.0
    cursor = {"epoch": 0, "chunk": 0, "batch": 0}
    if state is None and t.init_from:
        try:
            init, _, _ = load_gpt(t.init_from, "cpu", expected_arch=arch)
        except ModelFileError as e:
            raise ModelFileError(f"[train] init_from: {e}") from None
        gpt.load_state_dict(init.state_dict())
        del init
        say(f"initial weights from {t.init_from}")
    if state is not None:
        gpt.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"]) if state["scaler"] else None
        restore_rng(state["rng"], d, device, log)
        step, tokens_seen, elapsed, cursor = state["step"], state["tokens"], state["elapsed_s"], state["cursor"]
        batches = state["batches"]
        say(f"resuming {run_dir} from {ckpt_path.name}: step {step}, {batches:,} batches, {tokens_seen:,} tokens, "
            f"cursor {cursor}")
    else:
        say(f"starting run {run_dir} (no checkpoint yet)")

    compiled = t.compiles_on(device.type)
    model = LossModel(gpt, fused_loss=compiled)
    if compiled:
        model = CompiledOrEager(model, log)
    if d.world > 1:
        model = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    model_plain = LossModel(gpt)  # validation: no DDP hooks, no compile

    data = TrainData(train_manifest)
    metrics = Metrics(run_dir / "metrics.jsonl", step if state is not None else None, tokens=tokens_seen,
                      elapsed_s=elapsed, every=steps_per_record(data.total_batches() * t.epochs),
                      log=log) if d.master else None
    val = ShardReader(val_shard)
    val_batches = [val[i].tokens for i in range(min(t.val_batches, len(val)))]
    total_tokens = data.total_tokens() * t.epochs
    start = t.start_predicting_from_what_token
    say(f"{gpt.num_params():,} parameters ({gpt.num_params(non_embedding=True):,} without embeddings), "
        f"{len(data.chunks)} chunks, {total_tokens:,} tokens over {t.epochs} epoch(s), device {device}, "
        f"dtype {precision.dtype} ({precision.reason}), {d.world} process(es) x {torch.get_num_threads()} threads")

    def validate() -> float:
        gpt.eval()
        nll, n = 0.0, 0
        with torch.no_grad(), amp():
            for tokens in val_batches:
                if tokens.shape[1] <= start:
                    continue
                x, y = inputs_and_targets(tokens)
                nll += model_plain(x.to(device), y.to(device), start).item()
                n += tokens.shape[0] * predicted_positions(tokens.shape[1], start)
        gpt.train()
        return nll / max(n, 1)

    def checkpoint(done=False) -> Path | None:
        rng = gather_rng(d, device)  # a collective: every rank takes part
        if metrics is not None:
            metrics.flush()  # the log holds every step up to each checkpoint (a resume truncates it there)
        if d.master:
            return save_checkpoint(run_dir, step, {
                "model": gpt.state_dict(), "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
                "rng": rng, "cursor": dict(cursor), "step": step, "batches": batches, "tokens": tokens_seen,
                "elapsed_s": elapsed, "done": done, "world_size": d.world, "architecture": as_plain_dict(arch),
                "train": as_plain_dict(t)}, keep=t.keep_checkpoints)
        return None

    def train_step(c: int, group: list[int]) -> tuple[float, torch.Tensor, bool]:
        """One optimizer step over the batches `group` of chunk c (dealt out among the ranks): (mean loss,
        grad norm, whether any rank was asked to stop)."""
        shape = data.shape(c)
        n_pred = sum(int(shape[b, 0]) * predicted_positions(int(shape[b, 1]), start) for b in group)
        mine = group[d.rank::d.world] or group[:1]   # a rank with no batch left runs one with weight 0
        weight = (d.world / n_pred) if group[d.rank::d.world] else 0.0  # DDP averages over ranks
        for g in optimizer.param_groups:
            g["lr"] = lr
        loss_sum = torch.zeros((), device=device)
        for i, b in enumerate(mine):
            x, y = inputs_and_targets(data.tokens(c, b))
            if device.type == "cuda":  # from pinned memory the copy is asynchronous: it overlaps the last step's work
                x, y = x.pin_memory(), y.pin_memory()
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            sync = i == len(mine) - 1 or d.world == 1
            with model.no_sync() if (d.world > 1 and not sync) else contextlib.nullcontext():
                with amp():
                    nll = model(x, y, start)
                scaler.scale(nll * weight).backward()
            if weight:
                loss_sum += nll.detach()
        stop_now = stop.requested
        if d.world > 1:  # the step's loss and the ranks' stop flags in one all-reduce
            both = torch.stack([loss_sum, torch.tensor(float(stop_now), device=device)])
            dist.all_reduce(both)
            loss_sum, stop_now = both[0], bool(both[1].item() > 0)
        scaler.unscale_(optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(gpt.parameters(), t.grad_clip if t.grad_clip > 0 else math.inf)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        return loss_sum.item() / n_pred, grad_norm, stop_now

    if d.master and state is None and t.val_every_steps:
        metrics.val(step=0, tokens=0, val_loss=validate())

    bar = progress(log, "train", "tok", total=total_tokens) if d.master else None
    if bar is not None:
        bar.update(tokens_seen)
    gpt.train()
    done = state is not None and state.get("done", False)
    while not done and cursor["epoch"] < t.epochs:
        e = cursor["epoch"]
        corder = chunk_order(t.seed, e, len(data.chunks), t.shuffle_chunks)
        while cursor["chunk"] < len(corder):
            c = int(corder[cursor["chunk"]])
            shape = data.shape(c)
            order = batch_order(t.seed, e, c, shape, start)
            for begin, end in step_groups(order, shape, t.tokens_per_optimizer_step, d.world):
                if begin < cursor["batch"]:
                    continue
                t0 = time.perf_counter()
                group = [int(b) for b in order[begin:end]]
                lr = lr_at(batches, t)  # the schedule counts batches, whatever the number of processes
                loss, grad_norm, stop_now = train_step(c, group)
                step += 1
                batches += len(group)
                step_tokens = sum(int(shape[b, 0] * shape[b, 1]) for b in group)
                tokens_seen += step_tokens
                cursor["batch"] = end
                dt = time.perf_counter() - t0
                elapsed += dt
                if d.master:
                    metrics.train(step=step, batches=batches, tokens=tokens_seen, loss=loss, lr=lr,
                                  grad_norm=float(grad_norm), elapsed_s=elapsed)
                    bar.update(step_tokens)
                    bar.set_postfix(loss=f"{loss:.3f}", lr=f"{lr:.2e}", refresh=False)
                    if t.val_every_steps and step % t.val_every_steps == 0:
                        metrics.val(step=step, tokens=tokens_seen, val_loss=validate())
                if step % t.checkpoint_every_steps == 0 or stop_now:
                    path = checkpoint()
                if stop_now:
                    if bar is not None:
                        bar.close()
                    if d.master:
                        metrics.close()
                    raise Preempted(f"stopped by {stop.name or 'a signal on another rank'} after step {step} "
                                    f"({tokens_seen:,} tokens): checkpoint {path or 'of this step'} written; "
                                    f"run the same command again to resume from it")
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
            metrics.val(step=step, tokens=tokens_seen, val_loss=validate())
        checkpoint(done=True)
    if bar is not None:
        bar.close()
    final_path = Path(final_path)
    if d.master:
        save_model(final_path, gpt, arch, run_dir=os.path.relpath(run_dir, final_path.parent), step=step,
                   tokens=tokens_seen, elapsed_s=elapsed, train=as_plain_dict(t), world_size=d.world,
                   precision=precision.as_dict())
        metrics.close()
        say(f"wrote {final_path}: {step} steps, {tokens_seen:,} tokens, {elapsed:.0f} s of training")
    return final_path


# ---------------------------------------------------------------------------------------------------------
# Entry points: the Snakefile's `launch`, and the CLI (also what torchrun runs)

def _die_with_parent():
    """In the child: get SIGTERM when the parent (Snakemake) dies, even by SIGKILL (Linux)."""
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _child_env(**extra) -> dict:
    root = str(Path(__file__).resolve().parents[1])
    return dict(os.environ, PYTHONPATH=os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]), **extra)


def launch(ini_path, train_manifest, val_shard, final_path, threads: int = 0, log=None) -> None:
    """The `train` rule: the trainer as a process of its own (`python -m model.train`, which starts torchrun
    when [train] nproc_per_node > 1), so that it can catch SIGTERM/SIGINT/SIGUSR1 in its main thread and stop
    with a checkpoint; Snakemake's `run:` block runs in a worker thread, where Python allows no handlers."""
    cmd = [sys.executable, "-m", "model.train", "--ini", str(ini_path), "--train", str(train_manifest),
           "--val", str(val_shard), "--final", str(final_path), "--threads", str(threads)]
    if log:
        Path(log).parent.mkdir(parents=True, exist_ok=True)
        cmd += ["--log", str(log)]
    proc = subprocess.run(cmd, env=_child_env(), preexec_fn=_die_with_parent)
    where = f"; see {log}" if log else ""
    if proc.returncode == EXIT_PREEMPTED:
        # the trainer's own line (which signal, after which step) into the error: Snakemake deletes the rule's
        # log before it runs the job again, while its error message stays in its own (or the SLURM job's) log
        stopped = [line for line in _tail(log).splitlines() if line.startswith("stopped by ")] if log else []
        why = f" ({stopped[-1].split(':')[0]})" if stopped else ""
        raise RuntimeError(f"training stopped on a signal after writing a checkpoint (exit {EXIT_PREEMPTED}){why}; "
                           f"run the same command again to resume{where}")
    if proc.returncode != 0:
        raise RuntimeError(f"training failed (exit {proc.returncode}){where}")


def _tail(path, size: int = 1 << 16) -> str:
    """The last `size` bytes of a text file ('' if it is missing): a weeks-long run's log is 100s of MB."""
    try:
        with open(path, "rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - size))
            return f.read().decode(errors="replace")
    except OSError:
        return ""


def run_torchrun(settings: Settings, argv: list[str], threads: int, log) -> int:
    """[train] nproc_per_node > 1: torchrun with that many processes; a stop signal that reaches this process
    goes on to torchrun as SIGTERM, which passes it to every rank (torchrun does not pass on SIGUSR1)."""
    n = settings.train.nproc_per_node
    per_proc = settings.train.threads or max(1, usable_cores(threads) // n)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}",
           "-m", "model.train", *argv, "--threads", str(per_proc * n)]
    print(" ".join(cmd), file=log, flush=True)
    # torchrun in a session of its own: a signal to our process group reaches it once, through us
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=_child_env(OMP_NUM_THREADS=str(per_proc)),
                            preexec_fn=lambda: (os.setsid(), _die_with_parent()))
    seen = []

    def forward(signum, frame):
        seen.append(signum)
        proc.send_signal(signal.SIGTERM)

    previous = {sig: signal.signal(sig, forward) for sig in STOP_SIGNALS}
    try:
        rc = proc.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if rc != 0 and seen:
        print(f"torchrun stopped on {signal.Signals(seen[0]).name} (passed on to every rank as SIGTERM)",
              file=log, flush=True)
        return EXIT_PREEMPTED
    return rc


def main(argv=None) -> int:
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
        if settings.train.nproc_per_node > 1 and "LOCAL_RANK" not in os.environ:
            args = ["--ini", a.ini, "--train", a.train, "--val", a.val, "--final", a.final]
            return run_torchrun(settings, args, a.threads, fh)
        try:
            train(settings, a.train, a.val, a.final, threads=a.threads, log=fh)
        except Preempted as e:
            if Dist.from_env().master:
                print(str(e), file=fh, flush=True)
            return EXIT_PREEMPTED
    return 0


if __name__ == "__main__":
    sys.exit(main())
