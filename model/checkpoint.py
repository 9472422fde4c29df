"""Model files and training checkpoints: torch.save of plain containers and tensors, never a pickled object.

Everything is read back with `torch.load(..., weights_only=True)` and written atomically (a hidden temporary
name in the same folder, then `os.replace`), so a killed writer never leaves a file that looks finished.

    final.pt           {"model": state_dict, "architecture": {...}, "run_dir": "run-<hash>", "train": {...},
                        "step", "tokens", ...}                        <- save_model / load_model
    run-<hash>/step_00001000.pt    a training checkpoint (model, optimizer, RNG states, data cursor, ...)
    run-<hash>/step_00001000.json  its sidecar: sha256 and size of the .pt, written after it
                                   <- save_checkpoint / load_checkpoint / latest_checkpoint
A checkpoint counts only once its sidecar exists and matches the file, so a truncated or corrupted latest
checkpoint is detected and the one before it is used.
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from pathlib import Path

import torch

from pipeline.config import Architecture, as_plain_dict
from pipeline.io import read_json, sha256_file, tmp_path, write_json

from model.gpt import GPT

CHECKPOINT_FORMAT = "gpt2-pile-train-checkpoint/1"
MODEL_FORMAT = "gpt2-pile-model/1"


class ModelFileError(ValueError):
    """A model or checkpoint file that cannot be used; the message names the file and says why."""


def _atomic_save(obj, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_path(path)
    try:
        torch.save(obj, tmp)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _torch_load(path: Path, map_location):
    if not path.is_file():
        raise ModelFileError(f"{path}: no such file")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # zip errors, EOF, unpickling of a forbidden type, ...
        raise ModelFileError(f"{path}: cannot be read as a model file (truncated or corrupt?): "
                             f"{type(e).__name__}: {e}") from None


def save_model(path, model: GPT, arch: Architecture, **extra) -> None:
    """Write a model file: the weights, the architecture and whatever plain values `extra` holds."""
    obj = {"format": MODEL_FORMAT, "model": model.state_dict(), "architecture": as_plain_dict(arch), **extra}
    _atomic_save(obj, Path(path))


def architecture_from(plain: dict, path) -> Architecture:
    names = {f.name for f in dataclasses.fields(Architecture)}
    if not isinstance(plain, dict) or set(plain) != names:
        raise ModelFileError(f"{path}: its 'architecture' entry is not an [architecture] section: {plain!r}")
    return Architecture(**plain)


def check_architecture(found: Architecture, expected: Architecture | None, path) -> None:
    if expected is None or found == expected:
        return
    a, b = as_plain_dict(found), as_plain_dict(expected)
    diffs = ", ".join(f"{k} = {a[k]} in the file but {b[k]} in [architecture]" for k in a if a[k] != b[k])
    raise ModelFileError(f"{path}: the model has another architecture than expected: {diffs}")


def load_model(path, map_location="cpu", expected_arch: Architecture | None = None):
    """(GPT in eval mode, its Architecture, meta) from final.pt or a training checkpoint.

    meta holds the file's other plain entries (run_dir, step, tokens, train, ...), never the optimizer.
    Raises ModelFileError naming the file when it is missing, truncated or corrupt, not a model file, or of
    another architecture than expected_arch.
    """
    path = Path(path)
    obj = _torch_load(path, map_location)
    if not isinstance(obj, dict) or "model" not in obj or "architecture" not in obj:
        raise ModelFileError(f"{path}: not a model file of this project (no 'model' and 'architecture' entries)")
    arch = architecture_from(obj["architecture"], path)
    check_architecture(arch, expected_arch, path)
    model = GPT(arch)
    try:
        model.load_state_dict(obj["model"])
    except RuntimeError as e:
        raise ModelFileError(f"{path}: its weights do not fit the architecture it names: {e}") from None
    model.to(map_location if map_location is not None else "cpu").eval()
    meta = {k: v for k, v in obj.items() if k not in ("model", "optimizer", "scaler", "rng")}
    meta["path"] = str(path)
    return model, arch, meta


def hf_folder_of(source) -> Path | None:
    """The folder `source` names (a local folder, or a hub id's snapshot in the local Hugging Face cache), or
    None: a file, or nothing at all."""
    from model import hf

    path = Path(source)
    if path.is_dir():
        return path
    return None if path.exists() else hf.hub_cache_folder(str(source))


def load_gpt(source, map_location="cpu", expected_arch: Architecture | None = None):
    """(GPT in eval mode, its Architecture, meta) from any model this project can use:

        a model file or training checkpoint (.pt)       load_model
        a Hugging Face GPT-2 folder (config.json +      model/hf.py: OpenAI's gpt2 ... gpt2-xl or one exported
          model.safetensors)                            here (`python -m model.export`)
        a hub id ("gpt2", "openai-community/gpt2")      that folder in the local Hugging Face cache, if there;
                                                        nothing is ever downloaded

    expected_arch: ModelFileError naming both architectures when the model's differs. meta["format"] says
    which kind it was ("huggingface" or this project's MODEL_FORMAT / CHECKPOINT_FORMAT).
    """
    from model import hf

    path = Path(source)
    folder = hf_folder_of(source)
    if folder is not None:
        if not hf.is_hf_folder(folder):
            raise ModelFileError(f"{folder}: a folder without config.json, so not a Hugging Face model folder")
        model, arch, meta = hf.load_hf_folder(folder, map_location, expected_arch)
        if folder != path:  # found in the local cache
            meta["hub_id"] = str(source)
        return model, arch, meta
    if not path.exists() and hf.could_be_hub_id(str(source)):
        raise ModelFileError(f"{path}: no such file or folder, nor a Hugging Face hub id in the local cache "
                             f"(nothing is downloaded here; fetch it once with `hf download {source}`)")
    return load_model(path, map_location, expected_arch)


# ---------------------------------------------------------------------------------------------------------
# Training checkpoints: a .pt and its .json sidecar (sha256), the last `keep` of them kept per run folder.

def checkpoint_path(run_dir, step: int) -> Path:
    return Path(run_dir) / f"step_{step:08d}.pt"


def save_checkpoint(run_dir, step: int, state: dict, keep: int) -> Path:
    """Write step_N.pt, then its sidecar step_N.json (sha256, size); drop all but the last `keep`."""
    path = checkpoint_path(run_dir, step)
    path.with_suffix(".json").unlink(missing_ok=True)  # rewriting a step (a chunk's end): invalid until done
    _atomic_save({"format": CHECKPOINT_FORMAT, **state}, path)
    write_json(path.with_suffix(".json"), {"file": path.name, "step": step, "bytes": path.stat().st_size,
                                           "sha256": sha256_file(path)})
    for old in list_checkpoints(run_dir)[:-keep]:
        old.unlink(missing_ok=True)
        old.with_suffix(".json").unlink(missing_ok=True)
    return path


def list_checkpoints(run_dir) -> list[Path]:
    """The .pt files that have a sidecar, oldest first (a .pt without one was being written when killed)."""
    return sorted(p.with_suffix(".pt") for p in Path(run_dir).glob("step_*.json"))


def load_checkpoint(path, map_location="cpu") -> dict:
    """A training checkpoint, verified against its sidecar's sha256; ModelFileError naming the file if not."""
    path = Path(path)
    sidecar = path.with_suffix(".json")
    try:
        info = read_json(sidecar)
    except Exception as e:
        raise ModelFileError(f"{sidecar}: unreadable checkpoint sidecar ({e})") from None
    if not path.is_file():
        raise ModelFileError(f"{path}: no such file (its sidecar {sidecar.name} exists)")
    size = path.stat().st_size
    if size != info.get("bytes") or sha256_file(path) != info.get("sha256"):
        raise ModelFileError(f"{path}: checksum mismatch ({size} bytes, {info.get('bytes')} expected): "
                             f"the file is truncated or corrupt")
    obj = _torch_load(path, map_location)
    if not isinstance(obj, dict) or obj.get("format") != CHECKPOINT_FORMAT:
        raise ModelFileError(f"{path}: not a training checkpoint of this project")
    return obj


def latest_checkpoint(run_dir, map_location="cpu", expected_arch: Architecture | None = None):
    """(path, state) of the newest checkpoint that verifies, or (None, None) when there is none.

    A checkpoint that fails its checksum or cannot be read is skipped with a warning (the previous one is
    used); one of another architecture is an error, not something to skip.
    """
    for path in reversed(list_checkpoints(run_dir)):
        try:
            state = load_checkpoint(path, map_location)
        except ModelFileError as e:
            warnings.warn(f"{e}; falling back to the previous checkpoint", stacklevel=2)
            continue
        check_architecture(architecture_from(state.get("architecture"), path), expected_arch, path)
        return path, state
    return None, None
