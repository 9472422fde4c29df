"""Tiny Pile-style chunks for tests: lines of the shipped sample corpus, or made-up documents."""

from __future__ import annotations

from pathlib import Path

import orjson
import zstandard

from pipeline.io import iter_lines

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "data" / "sample"


def doc_line(text: str, name: str) -> bytes:
    return orjson.dumps({"text": text, "meta": {"pile_set_name": name}})


def write_chunk(path: str | Path, lines: list[bytes]) -> Path:
    """Write lines as .jsonl or (by the name) .jsonl.zst."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = b"".join(line + b"\n" for line in lines)
    path.write_bytes(zstandard.ZstdCompressor(level=3).compress(data) if path.name.endswith(".zst") else data)
    return path


def sample_lines(chunk: str, n: int | None = None) -> list[bytes]:
    lines = [line for _, line in iter_lines(SAMPLE / f"{chunk}.jsonl.zst")]
    return lines[:n] if n else lines


def small_corpus(folder: str | Path, docs_per_chunk: int = 250) -> Path:
    """00, 01 and val chunks with the first documents of the sample corpus's chunks."""
    folder = Path(folder)
    for chunk in ("00", "01", "val"):
        write_chunk(folder / f"{chunk}.jsonl.zst", sample_lines(chunk, docs_per_chunk))
    return folder
