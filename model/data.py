"""The training data: the train split's shards (memory-mapped), the seeded order of chunks and batches, and
the grouping of batches into optimizer steps.

Data order (as the seed): the chunks in order (or shuffled per epoch, [train] shuffle_chunks), and within a
chunk its batches shuffled, seeded by (seed, epoch, chunk). An optimizer step takes the next batches of the chunk until
tokens_per_optimizer_step tokens (at least one batch per rank); under DDP they are dealt out round-robin.
"""

from __future__ import annotations

import numpy as np

from pipeline.shards import ShardReader, read_train_manifest


class TrainData:
    """The batches of every train chunk (memory-mapped shards), addressed per chunk as (shard, batch)."""

    def __init__(self, manifest_path):
        self.chunks = read_train_manifest(manifest_path)
        self.readers: dict[str, ShardReader] = {}
        self.index = []      # per chunk: (n_batches, 2) array of (shard number, batch number in the shard)
        self.shape = []      # per chunk: (n_batches, 2) array of (n_docs, seq_len)
        for chunk in self.chunks:
            idx, shp = [], []
            for s, path in enumerate(chunk["shards"]):
                r = self.reader(path)
                idx.append(np.stack([np.full(len(r), s), np.arange(len(r))], 1))
                shp.append(np.stack([r.n_docs(), r.seq_lens()], 1))
            self.index.append(np.concatenate(idx) if idx else np.zeros((0, 2), np.int64))
            self.shape.append(np.concatenate(shp).astype(np.int64) if shp else np.zeros((0, 2), np.int64))

    def reader(self, path) -> ShardReader:
        if path not in self.readers:
            self.readers[path] = ShardReader(path)
        return self.readers[path]

    def tokens(self, chunk: int, b: int) -> np.ndarray:
        s, j = self.index[chunk][b]
        return self.reader(self.chunks[chunk]["shards"][s])[int(j)].tokens

    def total_tokens(self) -> int:
        return int(sum((s[:, 0] * s[:, 1]).sum() for s in self.shape))


def chunk_order(seed: int, epoch: int, n_chunks: int, shuffle: bool = False) -> np.ndarray:
    """The chunks in numeric order, as the original read them ([train] shuffle_chunks = false), or shuffled
    per epoch, seeded."""
    if not shuffle:
        return np.arange(n_chunks)
    return np.random.default_rng([seed, epoch]).permutation(n_chunks)


def batch_order(seed: int, epoch: int, chunk: int, shape: np.ndarray, start: int) -> np.ndarray:
    """The shuffled batches of a chunk; batches too short to predict anything (seq_len <= start) left out."""
    order = np.random.default_rng([seed, epoch, chunk]).permutation(len(shape))
    return order[shape[order, 1] > start]


def step_groups(order: np.ndarray, shape: np.ndarray, tokens_per_step: int, world: int) -> list[tuple[int, int]]:
    """Split a chunk's order into optimizer steps [(begin, end), ...]: at least `world` batches and at least
    tokens_per_step tokens each (the chunk's last step may fall short)."""
    groups, begin, tokens = [], 0, 0
    for i, b in enumerate(order):
        tokens += int(shape[b, 0] * shape[b, 1])
        if i + 1 - begin >= world and tokens >= tokens_per_step:
            groups.append((begin, i + 1))
            begin, tokens = i + 1, 0
    if begin < len(order):
        groups.append((begin, len(order)))
    return groups
