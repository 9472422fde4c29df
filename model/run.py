"""The run folder of a training configuration: its name, its lock and its metrics log.

`folder_to_save_state_dicts/run-<hash>/`, the hash over [architecture], the [train] keys that change the
result, and the train split's manifest: an unchanged configuration resumes, a changed one starts a new run.
It holds config.json, metrics.jsonl, events.out.tfevents.* (TensorBoard's files, when the package is
installed: `tensorboard --logdir checkpoints/` shows every run under its folder's name), the last
`keep_checkpoints` step_N.pt (+ .json sidecar with their sha256, see model/checkpoint.py) and a `lock` file,
flock()ed while a trainer runs (the OS drops it when the process dies, even by SIGKILL, so a lock is never
stale).
"""

from __future__ import annotations

import fcntl
import hashlib
import math
import os
import sys
from pathlib import Path

import orjson

from pipeline.config import Settings, as_plain_dict
from model.checkpoint import ModelFileError, hf_folder_of
from pipeline.io import lines_backwards, sha256_file

# [train] keys that do not change the trained weights: editing them resumes the same run.
OPERATIONAL_KEYS = ("folder_to_save_state_dicts", "keep_checkpoints", "checkpoint_every_steps", "threads",
                    "val_every_steps", "val_batches")


def run_fingerprint(settings: Settings, train_manifest) -> dict:
    train = {k: v for k, v in as_plain_dict(settings.train).items() if k not in OPERATIONAL_KEYS}
    fp = {"train": train, "architecture": as_plain_dict(settings.architecture),
          "train_split_sha256": sha256_file(train_manifest)}
    if settings.train.init_from:  # other weights under the same name are another run
        fp["init_from_sha256"] = {f.name: sha256_file(f) for f in init_from_files(settings.train.init_from)}
    return fp


def init_from_files(source: str) -> list[Path]:
    """The files that hold [train] init_from's weights (a .pt; a folder's config.json and *.safetensors)."""
    path = Path(source)
    folder = hf_folder_of(source)
    if folder is None:
        if not path.is_file():
            raise ModelFileError(f"[train] init_from = {source}: no such file or folder, nor a Hugging Face hub id "
                                 f"in the local cache (nothing is downloaded)")
        return [path]
    files = sorted(folder.glob("*.safetensors")) + [folder / "config.json"]
    if not all(f.is_file() for f in files) or len(files) < 2:
        raise ModelFileError(f"[train] init_from = {source}: {folder} holds no config.json and model.safetensors")
    return files


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


# An 11.5 M-step run logged every step would write ~2 GB of metrics; at most this many training records
# (~20 MB) are written whatever the run's length, each summing every-N steps (see steps_per_record).
MAX_TRAIN_RECORDS = 100_000


def steps_per_record(total_batches: int) -> int:
    """Optimizer steps summed into one training record: 1 (every step) for runs of up to MAX_TRAIN_RECORDS
    batches, more for longer ones (the Pile config's 11.5 M batches: 115). A step holds at least one batch, so
    the run never has more than MAX_TRAIN_RECORDS records (plus one per checkpoint, see Metrics.flush)."""
    return max(1, math.ceil(total_batches / MAX_TRAIN_RECORDS))


def truncate_after(path: Path, step: int) -> int:
    """Drop the records past `step` from the end of a metrics log (records are in step order): a resume from
    the checkpoint of `step` truncates the file there and appends, so the history before it is never read or
    rewritten. A line cut short by a kill goes too; a complete last record whose newline a kill cut off gets
    it back. Returns the new size."""
    if not path.exists():
        return 0
    size = path.stat().st_size
    cut, newline = 0, False
    with open(path, "rb") as fh:
        for offset, line in lines_backwards(fh):
            try:
                rec = orjson.loads(line)
            except orjson.JSONDecodeError:
                continue  # empty, or cut short by a kill
            if rec.get("step", math.inf) <= step:
                cut = min(offset + len(line) + 1, size)
                newline = offset + len(line) == size  # the record ends the file, without its newline
                break
    os.truncate(path, cut)
    if newline:
        with open(path, "ab") as fh:
            fh.write(b"\n")
    return cut + newline


class Metrics:
    """metrics.jsonl (one JSON object per line) and, when the package is installed, TensorBoard event files.

    {"kind": "train", "step", "batches", "tokens", "loss", "lr", "grad_norm", "tokens_per_s", "elapsed_s"}
        one per `every` optimizer steps (see steps_per_record), and one for the steps since the last record at
        every checkpoint (flush): loss is the mean of the steps' losses, grad_norm their largest, tokens_per_s
        the window's tokens over its seconds; step, batches, tokens, lr and elapsed_s those of its last step.
    {"kind": "val", "step", "tokens", "val_loss"}
        one per periodic validation.

    Records are in step order and the log holds every step up to each checkpoint, so a resume from the
    checkpoint of step S truncates the file after S (truncate_after) and appends: the resumed log is the
    uninterrupted run's.
    """

    def __init__(self, path: Path, resume_step: int | None, *, every: int = 1, tokens: int = 0,
                 elapsed_s: float = 0.0, tensorboard: bool = True, log=None):
        self.path, self.every = Path(path), every
        keep_through = resume_step if resume_step is not None else -1  # a new run keeps nothing
        truncate_after(self.path, keep_through)
        self.fh = open(self.path, "ab", buffering=0)
        self._window: list[dict] = []
        self._start = (tokens, elapsed_s)  # tokens and seconds before the window's first step
        self.tb = open_tensorboard(self.path.parent, keep_through + 1, log) if tensorboard else None

    def train(self, *, step: int, batches: int, tokens: int, loss: float, lr: float, grad_norm: float,
              elapsed_s: float, **extra: float) -> None:
        """One optimizer step; written as part of a record every `every` steps."""
        self._window.append(dict(step=step, batches=batches, tokens=tokens, loss=loss, lr=lr,
                                 grad_norm=grad_norm, elapsed_s=elapsed_s, **extra))
        if step % self.every == 0:
            self.flush()

    def flush(self) -> None:
        """Write the steps since the last record as one record (before every checkpoint: see the class)."""
        if not self._window:
            return
        w, last = self._window, self._window[-1]
        seconds = last["elapsed_s"] - self._start[1]
        rec = {"kind": "train", "step": last["step"], "batches": last["batches"], "tokens": last["tokens"],
               "loss": sum(r["loss"] for r in w) / len(w), "lr": last["lr"],
               "grad_norm": max(r["grad_norm"] for r in w),
               "tokens_per_s": (last["tokens"] - self._start[0]) / seconds if seconds > 0 else math.nan,
               "elapsed_s": last["elapsed_s"]}
        for key in last.keys() - rec.keys():
            rec[key] = sum(r[key] for r in w) / len(w)
        self._window, self._start = [], (last["tokens"], last["elapsed_s"])
        self._write(rec)

    def val(self, *, step: int, tokens: int, val_loss: float) -> None:
        self._write({"kind": "val", "step": step, "tokens": tokens, "val_loss": val_loss})

    def _write(self, rec: dict) -> None:
        self.fh.write(orjson.dumps(rec, option=orjson.OPT_SERIALIZE_NUMPY) + b"\n")
        if self.tb is not None:
            if rec["kind"] == "train":
                for key, tag in TENSORBOARD_TAGS.items():
                    self.tb.add_scalar(tag, rec[key], rec["step"])
            else:
                self.tb.add_scalar("loss/val", rec["val_loss"], rec["step"])

    def close(self) -> None:
        self.flush()
        self.fh.close()
        if self.tb is not None:
            self.tb.close()


TENSORBOARD_TAGS = {"loss": "loss/train", "lr": "learning_rate", "tokens_per_s": "tokens_per_s",
                    "grad_norm": "grad_norm"}


def open_tensorboard(folder: Path, purge_step: int, log=None):
    """A SummaryWriter on `folder`, or None (with a one-line note in the log) when tensorboard is missing.

    purge_step: TensorBoard hides the events of earlier files from this step on, so the steps a resumed run
    repeats are shown once (the same rule as truncate_after); a new run (purge_step 0) hides them all."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        print("TensorBoard: not installed, no live view (pip install tensorboard); metrics go to metrics.jsonl",
              file=log or sys.stderr, flush=True)
        return None
    return SummaryWriter(str(folder), purge_step=purge_step, flush_secs=30)
