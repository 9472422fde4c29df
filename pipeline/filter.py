"""Stage 1, filter: keep documents of the chosen Pile subsets, drop short ones, cut long ones.

Seed semantics: a document is split on whitespace; fewer than `min_len_words` words and it is dropped;
otherwise its first `max_len_words` words are kept, re-joined with single spaces.

Streams the chunk (4 MiB blocks) and writes Parquet row groups of a few thousand documents, so memory does
not depend on the chunk's size. A malformed line (bad JSON or UTF-8, missing `text` or
`meta.pile_set_name`) is skipped, counted and reported with its line number; a truncated or corrupt .zst
stream is an error and leaves no output.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import orjson
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.io import atomic_output, count_per_subset, iter_lines, log_file, progress, sha256_file, write_json

SCHEMA = pa.schema([("text", pa.string()), ("pile_set_name", pa.string())])
ROWS_PER_GROUP = 4096
MAX_EXAMPLES = 20  # malformed lines quoted in the manifest; all are counted


def cut_words(text: str, min_len_words: int, max_len_words: int) -> tuple[str, int] | None:
    """(the first max_len_words whitespace words joined by single spaces, their number), or None under
    min_len_words."""
    words = text.split(maxsplit=max_len_words)  # stops splitting early: a long book costs no more than 256 words
    if len(words) < min_len_words:
        return None
    words = words[:max_len_words]
    return " ".join(words), len(words)


def parse_line(line: bytes) -> tuple[str, str]:
    """(text, pile_set_name) of one Pile line; ValueError says what is wrong with it."""
    try:
        doc = orjson.loads(line)
    except orjson.JSONDecodeError as e:
        raise ValueError(f"not valid JSON or UTF-8 ({e})") from None
    if not isinstance(doc, dict):
        raise ValueError("not a JSON object")
    text, meta = doc.get("text"), doc.get("meta")
    if not isinstance(text, str):
        raise ValueError("no string 'text'")
    name = meta.get("pile_set_name") if isinstance(meta, dict) else None
    if not isinstance(name, str):
        raise ValueError("no string 'meta.pile_set_name'")
    return text, name


def run(src, out, manifest, *, pile_sets_to_use, min_len_words: int, max_len_words: int, log=None) -> dict:
    """Filter one chunk `src` (.jsonl or .jsonl.zst) into `out` (Parquet: text, pile_set_name)."""
    wanted = set(pile_sets_to_use)
    kept: dict = {}
    dropped = {"other_subset": 0, "under_min_len_words": 0, "malformed": 0}
    examples, docs_in, words_cut = [], 0, 0
    texts, names, words = [], [], []
    with log_file(log) as logfh, atomic_output(out) as tmp:
        started = time.perf_counter()
        writer = pq.ParquetWriter(tmp, SCHEMA, compression="zstd")

        # Parquet compresses on a thread of its own (pyarrow releases the GIL): one row group in flight.
        write_pool, writing = ThreadPoolExecutor(1), None

        def flush():
            nonlocal words_cut, writing
            if texts:
                table = pa.table({"text": texts, "pile_set_name": names}, schema=SCHEMA)
                if writing is not None:
                    writing.result()
                writing = write_pool.submit(writer.write_table, table)
                n_words = np.array(words)
                words_cut += int(n_words.sum())
                count_per_subset(kept, table["pile_set_name"], words=n_words,
                                 bytes=pc.binary_length(table["text"]).to_numpy(zero_copy_only=False))
                texts.clear(), names.clear(), words.clear()

        bar = progress(logfh, f"filter {Path(src).name}", "docs")
        for number, line in iter_lines(src):
            if not line.strip():
                continue
            docs_in += 1
            bar.update()
            try:
                text, name = parse_line(line)
            except ValueError as e:
                dropped["malformed"] += 1
                if len(examples) < MAX_EXAMPLES:
                    examples.append(f"{src}:{number}: {e}")
                print(f"{src}:{number}: skipped: {e}", file=logfh)
                continue
            if name not in wanted:
                dropped["other_subset"] += 1
                continue
            cut = cut_words(text, min_len_words, max_len_words)
            if cut is None:
                dropped["under_min_len_words"] += 1
                continue
            texts.append(cut[0])
            names.append(name)
            words.append(cut[1])
            if len(texts) == ROWS_PER_GROUP:
                flush()
        flush()
        if writing is not None:
            writing.result()
        write_pool.shutdown()
        writer.close()
        bar.close()
        seconds = time.perf_counter() - started
        result = {
            "stage": "filter", "input": str(src), "output": str(out),
            "params": {"pile_sets_to_use": sorted(wanted), "min_len_words": min_len_words,
                       "max_len_words": max_len_words},
            "docs_in": docs_in, "docs_kept": sum(v["docs"] for v in kept.values()), "words_kept": words_cut,
            "bytes_kept": sum(v["bytes"] for v in kept.values()),
            "per_subset": kept, "dropped": dropped, "malformed_examples": examples,
            "sha256": sha256_file(tmp),
        }
        print(f"filter {src}: {docs_in} documents in, {result['docs_kept']} kept, dropped {dropped}; "
              f"{seconds:.1f} s", file=logfh)
    write_json(manifest, result)
    return result
