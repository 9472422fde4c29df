"""Stage 2, tokenize: GPT-2 BPE of each filtered document, <|endoftext|> first, cut to max_len_tokens.

GPT-2 marks document boundaries with <|endoftext|> (50256) and has no separate BOS token, so each
document starts with it and the vocabulary stays GPT-2's 50,257. For every document the output keeps
its subset and the UTF-8 bytes of the text its kept tokens cover (for bits per byte at evaluation).

Reads the filtered Parquet file one row group at a time and encodes it on `threads` threads (tiktoken
releases the GIL), the next row group while this one is written. A document's text is cut to
text_bound(max_len_tokens) characters before it is encoded, so a 10 MB run of letters with no space (a DNA or
base64 blob) costs what a 64 KB one does, and the tokens kept are those of the whole text (see text_bound).
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.config import EOT
from pipeline.io import atomic_output, count_per_subset, log_file, progress, sha256_file, write_json
from pipeline.tokenizer import gpt2_encoding, token_byte_lengths

SCHEMA = pa.schema([("tokens", pa.list_(pa.uint16())), ("pile_set_name", pa.string()), ("n_bytes", pa.int32())])


SLICE = 256  # documents per task: small enough to spread a row group over the threads, big enough to be cheap
START = np.array([EOT], dtype=np.uint32)


def text_bound(max_len_tokens: int) -> int:
    """Characters of a document worth encoding: (max_len_tokens + 1) x the longest GPT-2 token (128 bytes).

    Why this never changes the kept tokens of normal text: tiktoken splits the text with GPT-2's regex into
    pieces P1, P2, ... and encodes each piece on its own. Let Pk be the first piece at which the count of
    tokens reaches max_len_tokens; the kept tokens all come from P1..Pk. P1..Pk-1 hold fewer than
    max_len_tokens tokens of at most 128 bytes each, so Pk starts before byte (max_len_tokens - 1) x 128.
    A piece's match depends on its own characters and the one after it (the possessive and look-ahead parts of
    the regex), so a cut at (max_len_tokens + 1) x 128 bytes leaves P1..Pk as they were whenever Pk (one word,
    number, punctuation or whitespace run) is under 2 x 128 - 4 = 252 bytes. Only a single piece longer than
    that, e.g. a blob with no spaces, can tokenize differently near the cut, and it is cut anyway. A character
    is at least one byte, so cutting at that many characters keeps at least that many bytes. And the cut text
    still has more than max_len_tokens tokens (each covers at most 128 bytes), so the document counts as cut.
    """
    return (max_len_tokens + 1) * int(token_byte_lengths().max())


def encode_slice(texts: list[str], max_len_tokens: int) -> tuple[np.ndarray, np.ndarray, int]:
    """(lengths, tokens, documents cut) of a few documents: EOT + the first max_len_tokens BPE tokens each.

    Runs on a worker thread; tiktoken releases the GIL while it encodes, so threads encode in parallel.
    encode_to_numpy with no special tokens allowed or disallowed is encode_ordinary (a literal "<|endoftext|>" in
    a document is ordinary text), but its ids come as one array, not a Python list of ints to build and then
    flatten while holding the GIL.
    """
    enc = gpt2_encoding()
    bound = text_bound(max_len_tokens)
    encoded = [enc.encode_to_numpy(text[:bound], disallowed_special=()) for text in texts]
    full = np.fromiter(map(len, encoded), dtype=np.int64, count=len(encoded))
    pieces = []
    for ids in encoded:
        pieces += (START, ids[:max_len_tokens])
    tokens = np.concatenate(pieces).astype(np.uint16) if pieces else np.zeros(0, np.uint16)
    return np.minimum(full, max_len_tokens) + 1, tokens, int(np.count_nonzero(full > max_len_tokens))


def encode_groups(source: pq.ParquetFile, max_len_tokens: int, pool: ThreadPoolExecutor):
    """(row group table, lengths, tokens, documents cut) per row group, in order.

    The next row group is already being encoded while the caller writes this one: the main thread's work
    (Parquet, byte counts) overlaps the encoding instead of leaving the encoder threads idle.
    """
    def submit(group):
        table = source.read_row_group(group)
        texts = table.column("text").to_pylist()
        return table, [pool.submit(encode_slice, texts[i:i + SLICE], max_len_tokens)
                       for i in range(0, len(texts), SLICE)]

    ahead = submit(0) if source.num_row_groups else None
    for group in range(source.num_row_groups):
        table, futures = ahead
        ahead = submit(group + 1) if group + 1 < source.num_row_groups else None
        parts = [f.result() for f in futures]
        lengths = np.concatenate([p[0] for p in parts]) if parts else np.zeros(0, np.int64)
        tokens = np.concatenate([p[1] for p in parts]) if parts else np.zeros(0, np.uint16)
        yield table, lengths, tokens, sum(p[2] for p in parts)


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
        with ThreadPoolExecutor(max(1, threads)) as pool:
            for table, lengths, tokens, cut in encode_groups(source, max_len_tokens, pool):
                truncated += cut
                offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
                np.cumsum(lengths, out=offsets[1:])
                # bytes covered: the sum of the kept tokens' byte lengths (EOT covers none)
                n_bytes = (np.add.reduceat(byte_len[tokens], offsets[:-1]) if len(lengths)
                           else np.zeros(0, np.int64))
                names = table.column("pile_set_name")
                writer.write_table(pa.table({
                    "tokens": pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), pa.array(tokens)),
                    "pile_set_name": names,
                    "n_bytes": pa.array(n_bytes.astype(np.int32)),
                }, schema=SCHEMA))
                count_per_subset(per_subset, names, tokens=lengths, bytes=n_bytes)
                docs += len(lengths)
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
