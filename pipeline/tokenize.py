"""Stage 2, tokenize: GPT-2 BPE of each filtered document, <|endoftext|> first, cut to max_len_tokens.

GPT-2 marks document boundaries with <|endoftext|> (50256) and has no separate BOS token, so each
document starts with it and the vocabulary stays GPT-2's 50,257. For every document the output keeps
its subset and the UTF-8 bytes of the text its kept tokens cover (for bits per byte at evaluation).

Reads the filtered Parquet file one row group at a time and encodes each group with tiktoken's
`encode_ordinary_batch` on `threads` threads (tiktoken releases the GIL).
"""

from __future__ import annotations

import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.config import EOT
from pipeline.io import atomic_output, count_by, log_file, progress, sha256_file, write_json
from pipeline.tokenizer import gpt2_encoding, token_byte_lengths

SCHEMA = pa.schema([("tokens", pa.list_(pa.uint16())), ("pile_set_name", pa.string()), ("n_bytes", pa.int32())])


def encode_documents(texts: list[str], max_len_tokens: int, threads: int) -> tuple[np.ndarray, np.ndarray, int]:
    """(offsets, tokens, documents cut): document i is tokens[offsets[i]:offsets[i+1]], EOT first."""
    encoded = gpt2_encoding().encode_ordinary_batch(texts, num_threads=threads)
    full = np.fromiter((len(t) for t in encoded), dtype=np.int64, count=len(encoded))
    lengths = np.minimum(full, max_len_tokens) + 1
    offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    tokens = np.empty(offsets[-1], dtype=np.uint16)
    for start, ids in zip(offsets[:-1], encoded):
        n = min(len(ids), max_len_tokens)
        tokens[start] = EOT
        tokens[start + 1:start + 1 + n] = ids[:n]
    return offsets, tokens, int(np.count_nonzero(full > max_len_tokens))


def run(src, out, manifest, *, max_len_tokens: int, threads: int = 1, log=None) -> dict:
    """Tokenize the filtered chunk `src` into `out` (Parquet: tokens, pile_set_name, n_bytes)."""
    byte_len = token_byte_lengths()
    per_subset: dict = {}
    docs = tokens_total = truncated = 0
    with log_file(log) as logfh, atomic_output(out) as tmp:
        started = time.perf_counter()
        source = pq.ParquetFile(src)
        writer = pq.ParquetWriter(tmp, SCHEMA, compression="zstd")
        bar = progress(logfh, f"tokenize {src}", "tok", total=None)
        for group in range(source.num_row_groups):
            table = source.read_row_group(group)
            texts = table.column("text").to_pylist()
            offsets, tokens, cut = encode_documents(texts, max_len_tokens, threads)
            truncated += cut
            lengths = np.diff(offsets)
            # bytes covered: the sum of the kept tokens' byte lengths (EOT covers none)
            n_bytes = np.add.reduceat(byte_len[tokens], offsets[:-1]) if len(texts) else np.zeros(0, np.int64)
            names = table.column("pile_set_name")
            writer.write_table(pa.table({
                "tokens": pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), pa.array(tokens)),
                "pile_set_name": names,
                "n_bytes": pa.array(n_bytes.astype(np.int32)),
            }, schema=SCHEMA))
            for name, length, nb in zip(names.to_pylist(), lengths.tolist(), n_bytes.tolist()):
                count_by(per_subset, name, docs=1, tokens=length, bytes=nb)
            docs += len(texts)
            tokens_total += int(tokens.size)
            bar.update(int(tokens.size))
        writer.close()
        bar.close()
        seconds = time.perf_counter() - started
        result = {
            "stage": "tokenize", "input": str(src), "output": str(out),
            "params": {"max_len_tokens": max_len_tokens, "start_token": EOT},
            "docs": docs, "tokens": tokens_total, "docs_cut_to_max_len_tokens": truncated, "per_subset": per_subset,
            "sha256": sha256_file(tmp),
        }
        print(f"tokenize {src}: {docs} documents, {tokens_total} tokens (start tokens included); "
              f"{seconds:.1f} s, {tokens_total / max(seconds, 1e-9):,.0f} tokens/s", file=logfh)
    write_json(manifest, result)
    return result
