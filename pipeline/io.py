"""What every stage shares: reading Pile chunks as a stream, atomic outputs, manifests, progress in the log."""

from __future__ import annotations

import contextlib
import hashlib
import os
import queue
import shutil
import sys
import threading
from pathlib import Path
from typing import Iterator

import numpy as np
import orjson
import zstandard
from tqdm import tqdm

READ_BLOCK = 1 << 20  # 1 MiB of compressed or plain bytes at a time: memory stays flat whatever the file's size


class InputError(ValueError):
    """An input file that cannot be read as a whole (truncated or corrupt); the message names the file."""


def _zst_blocks(fh, path) -> Iterator[bytes]:
    """Decompressed blocks of a .zst file of one or more frames; a stream that ends mid-frame is an error.

    zstandard's stream_reader returns a short result for a truncated frame without complaint, so the frames
    are followed by hand: a decompressobj per frame, and `eof` must be reached before the bytes run out.
    """
    dctx = zstandard.ZstdDecompressor()
    dobj, started = dctx.decompressobj(), False
    while True:
        block = fh.read(READ_BLOCK)
        if not block:
            break
        while block:
            started = True
            try:
                out = dobj.decompress(block)
            except zstandard.ZstdError as e:
                raise InputError(f"{path}: the zstd stream is corrupt ({e}); no output written.") from None
            if out:
                yield out
            if dobj.eof:  # a frame ended; what follows (if anything) is the next frame
                block = dobj.unused_data
                dobj, started = dctx.decompressobj(), False
            else:
                block = b""
    if started:
        raise InputError(f"{path}: the zstd stream ends early (truncated download?); no output written.")


def _read_ahead(blocks: Iterator[bytes], depth: int = 2) -> Iterator[bytes]:
    """The same blocks, produced on a thread `depth` blocks ahead: zstd releases the GIL while it
    decompresses, so decompression overlaps the caller's parsing."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    done = object()

    def produce():
        try:
            for block in blocks:
                q.put(block)
            q.put(done)
        except BaseException as e:  # re-raised in the caller's thread
            q.put(e)

    thread = threading.Thread(target=produce, daemon=True)
    thread.start()
    while (item := q.get()) is not done:
        if isinstance(item, BaseException):
            raise item
        yield item
    thread.join()


def iter_lines(path: str | Path) -> Iterator[tuple[int, bytes]]:
    """(line number from 1, line bytes without newline) of a .jsonl or .jsonl.zst file, streamed."""
    path = Path(path)
    with open(path, "rb") as fh:
        blocks = (_read_ahead(_zst_blocks(fh, path)) if path.name.endswith(".zst")
                  else iter(lambda: fh.read(READ_BLOCK), b""))
        rest, number = b"", 0
        for block in blocks:
            lines = (rest + block).split(b"\n")
            rest = lines.pop()
            for line in lines:
                number += 1
                yield number, line
        if rest:
            yield number + 1, rest


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def tmp_path(path: str | Path) -> Path:
    """Where an output is written before it is renamed into place: same folder, so the rename is atomic."""
    path = Path(path)
    return path.with_name(f".{path.name}.tmp.{os.getpid()}")


@contextlib.contextmanager
def atomic_output(path: str | Path, is_dir: bool = False):
    """Yield a temporary path; on success rename it to `path`, on any failure remove it.

    A killed job leaves at most a hidden `.NAME.tmp.PID`, never something at `path` that looks finished.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_path(path)
    for stale in path.parent.glob(f".{path.name}.tmp.*"):  # left by a killed job writing the same output
        _remove(stale)
    if is_dir:
        tmp.mkdir()
    try:
        yield tmp
        if is_dir and path.is_dir():
            shutil.rmtree(path)  # Snakemake may have created the output folder already
        os.replace(tmp, path)
    except BaseException:
        _remove(tmp)
        raise


def _remove(path: Path):
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()


def write_json(path: str | Path, obj) -> None:
    """Atomically write a manifest: sorted keys and a fixed layout, so equal content gives equal bytes."""
    with atomic_output(path) as tmp:
        tmp.write_bytes(orjson.dumps(obj, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS) + b"\n")


def lines_backwards(fh, block: int = 1 << 16):
    """(byte offset, line) of a binary file's lines, last first, read `block` bytes at a time from the end:
    the cost is the lines read, not the file's size."""
    pos = fh.seek(0, os.SEEK_END)
    rest = b""  # the start of a line that began in an earlier block
    while pos > 0:
        n = min(block, pos)
        pos -= n
        fh.seek(pos)
        lines = (fh.read(n) + rest).split(b"\n")
        rest = lines[0]
        offset = pos + len(rest) + 1
        starts = []
        for line in lines[1:]:
            starts.append(offset)
            offset += len(line) + 1
        yield from zip(reversed(starts), reversed(lines[1:]))
    yield 0, rest


def read_json(path: str | Path):
    return orjson.loads(Path(path).read_bytes())


@contextlib.contextmanager
def log_file(log: str | Path | None):
    """The stage's log (Snakemake's `log:`), or stderr when called by hand."""
    if log is None:
        yield sys.stderr
        return
    Path(log).parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w", encoding="utf-8", buffering=1) as fh:
        yield fh


def progress(logfh, desc: str, unit: str, total: int | None = None) -> tqdm:
    """tqdm into the log: rate (documents/s, tokens/s) and elapsed time, refreshed every few seconds."""
    interactive = logfh is sys.stderr and sys.stderr.isatty()
    return tqdm(desc=desc, unit=unit, unit_scale=True, total=total, file=logfh, ascii=True, dynamic_ncols=False,
                mininterval=0.5 if interactive else 5.0, ncols=100)


def count_per_subset(mapping: dict, names, **amounts) -> None:
    """count_by for a whole column at once: names (Arrow strings), amounts (numpy arrays), docs counted too."""
    codes = names.dictionary_encode()
    codes = codes.combine_chunks() if hasattr(codes, "combine_chunks") else codes
    ids = codes.indices.to_numpy(zero_copy_only=False)
    for i, name in enumerate(codes.dictionary.to_pylist()):
        mine = ids == i
        count_by(mapping, name, docs=np.count_nonzero(mine), **{k: v[mine].sum() for k, v in amounts.items()})


def count_by(mapping: dict, key: str, **amounts) -> None:
    """mapping[key][name] += amount for each amount (per-subset counters in manifests)."""
    entry = mapping.setdefault(key, {})
    for name, amount in amounts.items():
        entry[name] = entry.get(name, 0) + int(amount)
