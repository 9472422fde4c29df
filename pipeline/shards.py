"""The shard file: batches of same-length documents, memory-mapped with Arrow, never pickled.

A shard is an Arrow IPC file. Each row is one batch of `n` documents of one length `seq_len` (the start
token <|endoftext|> included), so a batch is an (n, seq_len) matrix with no padding:

    seq_len   int32                 tokens per document, start token included
    tokens    large_list<uint16>    n * seq_len token ids, row-major
    pile_set  list<int8>            per document: index into config.PILE_SET_NAMES
    n_bytes   list<int32>           per document: UTF-8 bytes of the text its tokens cover

Rows are grouped into record batches of a few hundred; a reader opens the file with `pa.memory_map`, so a
batch is a zero-copy numpy view of the page cache and a shard costs no memory until it is read.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import orjson
import pyarrow as pa

from pipeline.config import PILE_SET_NAMES
from pipeline.io import sha256_file

SCHEMA = pa.schema(
    [("seq_len", pa.int32()), ("tokens", pa.large_list(pa.uint16())), ("pile_set", pa.list_(pa.int8())),
     ("n_bytes", pa.list_(pa.int32()))],
    metadata={"format": "gpt2-pile-shard/1", "pile_set_names": orjson.dumps(PILE_SET_NAMES)},
)
ROWS_PER_RECORD_BATCH = 256


@dataclass
class Batch:
    tokens: np.ndarray    # (n, seq_len) uint16, tokens[:, 0] == EOT
    pile_set: np.ndarray  # (n,) int8
    n_bytes: np.ndarray   # (n,) int32

    @property
    def n_docs(self) -> int:
        return self.tokens.shape[0]


class ShardWriter:
    """Append batches to one Arrow file, a few hundred rows per record batch (memory stays small)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._writer = pa.ipc.new_file(str(self.path), SCHEMA)
        self._rows: list[Batch] = []
        self.batches = self.docs = self.tokens = 0

    def add(self, batch: Batch) -> None:
        self._rows.append(batch)
        self.batches += 1
        self.docs += batch.n_docs
        self.tokens += batch.tokens.size
        if len(self._rows) == ROWS_PER_RECORD_BATCH:
            self._flush()

    def _flush(self) -> None:
        if not self._rows:
            return
        rows, self._rows = self._rows, []

        def lists(arrays, list_type, value_type, offset_type):
            sizes = np.array([a.size for a in arrays], dtype=offset_type)
            offsets = np.concatenate([np.zeros(1, offset_type), np.cumsum(sizes, dtype=offset_type)])
            values = np.concatenate([a.ravel() for a in arrays]).astype(value_type, copy=False)
            return list_type.from_arrays(pa.array(offsets), pa.array(values))

        record = pa.record_batch(
            [pa.array([b.tokens.shape[1] for b in rows], pa.int32()),
             lists([b.tokens for b in rows], pa.LargeListArray, np.uint16, np.int64),
             lists([b.pile_set for b in rows], pa.ListArray, np.int8, np.int32),
             lists([b.n_bytes for b in rows], pa.ListArray, np.int32, np.int32)],
            schema=SCHEMA,
        )
        self._writer.write_batch(record)

    def close(self) -> dict:
        """Finish the file; return what it holds (for manifests)."""
        self._flush()
        self._writer.close()
        return {"file": self.path.name, "batches": self.batches, "docs": self.docs, "tokens": self.tokens,
                "sha256": sha256_file(self.path)}


class ShardReader:
    """Random access to the batches of a shard file, as zero-copy numpy views of a memory map."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._reader = pa.ipc.open_file(pa.memory_map(str(self.path)))
        if self._reader.schema.metadata.get(b"format") != SCHEMA.metadata[b"format"]:
            raise ValueError(f"{self.path}: not a shard file of this project (format {self._reader.schema.metadata})")
        self._parts = []  # per record batch: (seq_len, tokens offsets, values, pile_set ..., n_bytes ...)
        starts = [0]
        for k in range(self._reader.num_record_batches):
            rb = self._reader.get_batch(k)
            cols = [rb.column(i) for i in range(4)]
            self._parts.append(
                (cols[0].to_numpy(),)
                + tuple(x for c in cols[1:] for x in (c.offsets.to_numpy(), c.values.to_numpy(zero_copy_only=True)))
            )
            starts.append(starts[-1] + rb.num_rows)
        self._starts = np.array(starts)

    def __len__(self) -> int:
        return int(self._starts[-1])

    def __getitem__(self, i: int) -> Batch:
        if not 0 <= i < len(self):
            raise IndexError(f"{self.path}: batch {i} of {len(self)}")
        k = int(np.searchsorted(self._starts, i, side="right") - 1)
        j = i - int(self._starts[k])
        seq_len, t_off, t_val, p_off, p_val, b_off, b_val = self._parts[k]
        return Batch(tokens=t_val[t_off[j]:t_off[j + 1]].reshape(-1, int(seq_len[j])),
                     pile_set=p_val[p_off[j]:p_off[j + 1]], n_bytes=b_val[b_off[j]:b_off[j + 1]])

    def seq_lens(self) -> np.ndarray:
        return np.concatenate([p[0] for p in self._parts]) if self._parts else np.zeros(0, np.int32)

    def n_docs(self) -> np.ndarray:
        """Documents per batch, for every batch, without touching the tokens."""
        return (np.concatenate([np.diff(p[3]) for p in self._parts]) if self._parts else np.zeros(0, np.int64))

    def __iter__(self):
        for i in range(len(self)):
            yield self[i]


def read_train_manifest(path: str | Path) -> list[dict]:
    """The train split: a list of chunks, each {'chunk': name, 'shards': [absolute shard paths],
    'shard_batches': [batches of each shard], 'tokens': ..., ...}."""
    path = Path(path)
    chunks = orjson.loads(path.read_bytes())["chunks"]
    for chunk in chunks:
        chunk["shard_batches"] = [int(s["batches"]) for s in chunk["shards"]]
        chunk["shards"] = [str((path.parent / s["path"]).resolve()) for s in chunk["shards"]]
    return chunks
