"""Stage 3, shard: pack documents into batches of one length, and batches into shard files.

The seed sorted a chunk's documents by length and cut each run of equal lengths into batches of as many
documents as fit in `max_num_of_tokens_in_batch` (a document of L tokens, start token included, counts
L): no padding ever, big batches of short documents, 4 documents of 513 tokens. This stage makes the
same batches without sorting the chunk in memory: documents wait in one pending list per length, and a
list leaves as a batch the moment it is full; what remains at the end leaves as the last, partial batch
of each length. The set of batches is the seed's (a stable sort groups the same documents the same way);
only their order differs, and training shuffles it anyway. Memory: at most one batch per length.

Batches go into shard files (see shards.py) of at most `tokens_per_shard` tokens; the shards and a
manifest are written into a temporary folder that is renamed into place when complete.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from pipeline.config import PILE_SET_ID, PILE_SET_NAMES
from pipeline.io import atomic_output, count_by, log_file, progress, write_json
from pipeline.shards import Batch, ShardWriter


def docs_per_batch(seq_len: int, max_num_of_tokens_in_batch: int) -> int:
    return max_num_of_tokens_in_batch // seq_len


class BatchPacker:
    """Collects documents by length; yields a Batch whenever one length has a full batch."""

    def __init__(self, max_num_of_tokens_in_batch: int):
        self.budget = max_num_of_tokens_in_batch
        self.pending: dict[int, list[tuple[np.ndarray, int, int]]] = {}

    def add(self, tokens: np.ndarray, pile_set: int, n_bytes: int):
        seq_len = len(tokens)
        docs = self.pending.setdefault(seq_len, [])
        docs.append((tokens.copy(), pile_set, n_bytes))  # copy: do not pin the reader's whole row group
        if len(docs) == docs_per_batch(seq_len, self.budget):
            del self.pending[seq_len]
            return _batch(docs)
        return None

    def remainder(self):
        """The last, partial batch of every length, shortest first."""
        for seq_len in sorted(self.pending):
            yield _batch(self.pending[seq_len])
        self.pending.clear()


def _batch(docs) -> Batch:
    return Batch(tokens=np.stack([d[0] for d in docs]), pile_set=np.array([d[1] for d in docs], np.int8),
                 n_bytes=np.array([d[2] for d in docs], np.int32))


class ShardSet:
    """Shard files shard_00000.arrow, ... in a folder, each holding at most tokens_per_shard tokens."""

    def __init__(self, folder: Path, tokens_per_shard: int):
        self.folder, self.budget = folder, tokens_per_shard
        self.writer: ShardWriter | None = None
        self.infos: list[dict] = []

    def add(self, batch: Batch):
        if self.writer is not None and self.writer.tokens + batch.tokens.size > self.budget:
            self.infos.append(self.writer.close())
            self.writer = None
        if self.writer is None:
            self.writer = ShardWriter(self.folder / f"shard_{len(self.infos):05d}.arrow")
        self.writer.add(batch)

    def close(self) -> list[dict]:
        if self.writer is not None:
            self.infos.append(self.writer.close())
            self.writer = None
        return self.infos


def run(src, out, *, max_num_of_tokens_in_batch: int, tokens_per_shard: int, log=None) -> dict:
    """Shard the tokenized chunk `src` into the folder `out` (shard files + manifest.json)."""
    packer = BatchPacker(max_num_of_tokens_in_batch)
    per_subset: dict = {}
    lengths_seen: dict[int, int] = {}
    with log_file(log) as logfh, atomic_output(out, is_dir=True) as tmp:
        started = time.perf_counter()
        shards = ShardSet(tmp, tokens_per_shard)
        source = pq.ParquetFile(src)
        bar = progress(logfh, f"shard {src}", "docs")
        for group in range(source.num_row_groups):
            table = source.read_row_group(group)
            column = table.column("tokens").combine_chunks()
            offsets, values = column.offsets.to_numpy(), column.values.to_numpy()
            names = table.column("pile_set_name").to_pylist()
            n_bytes = table.column("n_bytes").to_numpy()
            for i, name in enumerate(names):
                seq_len = int(offsets[i + 1] - offsets[i])
                if seq_len > max_num_of_tokens_in_batch:
                    raise ValueError(f"{src}: document {i} of row group {group} has {seq_len} tokens, more than "
                                     f"max_num_of_tokens_in_batch ({max_num_of_tokens_in_batch})")
                lengths_seen[seq_len] = lengths_seen.get(seq_len, 0) + 1
                count_by(per_subset, name, docs=1, tokens=seq_len)
                batch = packer.add(values[offsets[i]:offsets[i + 1]], PILE_SET_ID[name], int(n_bytes[i]))
                if batch is not None:
                    shards.add(batch)
            bar.update(len(names))
        for batch in packer.remainder():
            shards.add(batch)
        infos = shards.close()
        bar.close()
        result = {
            "stage": "shard", "input": str(src), "output": str(out),
            "params": {"max_num_of_tokens_in_batch": max_num_of_tokens_in_batch,
                       "tokens_per_shard": tokens_per_shard},
            "shards": infos,
            **{k: sum(s[k] for s in infos) for k in ("batches", "docs", "tokens")},
            "per_subset": per_subset,
            "distinct_lengths": len(lengths_seen),
            "pile_set_names": list(PILE_SET_NAMES),
        }
        write_json(tmp / "manifest.json", result)
        print(f"shard {src}: {result['docs']} documents, {result['tokens']} tokens in {result['batches']} batches, "
              f"{len(infos)} shards; {time.perf_counter() - started:.1f} s", file=logfh)
    return result
