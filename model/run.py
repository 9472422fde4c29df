"""The run folder of a training configuration: its name, its lock and its metrics log.

`folder_to_save_state_dicts/run-<hash>/`, the hash over [architecture], the [train] keys that change the
result, and the train split's manifest: an unchanged configuration resumes, a changed one starts a new run.
It holds config.json, metrics.jsonl, the last `keep_checkpoints` step_N.pt (+ .json sidecar with their
sha256, see model/checkpoint.py) and a `lock` file, flock()ed while a trainer runs (the OS drops it when the
process dies, even by SIGKILL, so a lock is never stale).
"""

from __future__ import annotations

import fcntl
import hashlib
import math
import os
from pathlib import Path

import orjson

from pipeline.config import Settings, as_plain_dict
from model.checkpoint import ModelFileError
from pipeline.io import sha256_file, tmp_path

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
    from model import hf

    path = Path(source)
    folder = path if path.is_dir() else (None if path.exists() else hf.hub_cache_folder(source))
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
