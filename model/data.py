"""The training data: the train split's shards (memory-mapped), the seeded order of chunks and batches, and
the grouping of batches into optimizer steps.

Data order (as the seed): the chunks in order (or shuffled per epoch, [train] shuffle_chunks), and within a
chunk its batches shuffled, seeded by (seed, epoch, chunk). An optimizer step takes the next batches of the chunk until
tokens_per_optimizer_step tokens (at least one batch per rank); under DDP they are dealt out round-robin.
"""

from __future__ import annotations

import resource
from collections import OrderedDict

import numpy as np

from pipeline.shards import ShardReader, read_train_manifest


def open_shards_budget() -> int:
    """Shard files one process may keep open: a quarter of its open-file limit (`ulimit -n`), at most 256.

    At the Pile config's tokens_per_shard a chunk has about 75 shards, so under the common limit of 1024 a
    chunk's shards all stay open while it trains; under a lower limit the least recently used is closed and
    reopened when needed again (about 1 ms for a shard of 3,000 batches, measured)."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return 256
    return max(2, min(256, soft // 4))


class TrainData:
    """The train split's batches, addressed per chunk as batch numbers 0 .. n-1 of that chunk.

    Shards are opened when needed, never all at once: the totals come from the split's manifest, a chunk's
    batch shapes (n_docs, seq_len) are read from its shards when training reaches it (one chunk's shapes in
    memory), and at most `max_open` shard files are open, the least recently used closed first.
    """

    def __init__(self, manifest_path, max_open: int | None = None):
        self.manifest_path = manifest_path
        self.chunks = read_train_manifest(manifest_path)  # per chunk: 'shards' as absolute paths
        self.max_open = max_open or open_shards_budget()
        self._readers: OrderedDict[str, ShardReader] = OrderedDict()
        self._loaded: tuple[int, np.ndarray, np.ndarray] | None = None  # (chunk, shard starts, shapes)

    def reader(self, path: str) -> ShardReader:
        if path in self._readers:
            self._readers.move_to_end(path)
        else:
            while len(self._readers) >= self.max_open:
                self._readers.popitem(last=False)  # the last reference: Arrow closes the file and its map
            self._readers[path] = ShardReader(path)
        return self._readers[path]

    def open_shards(self) -> int:
        return len(self._readers)

    def _chunk(self, c: int) -> tuple[np.ndarray, np.ndarray]:
        """(first batch number of each shard, shapes) of chunk c, read from its shards on the first call."""
        if self._loaded is None or self._loaded[0] != c:
            paths = self.chunks[c]["shards"]
            for path in [p for p in self._readers if p not in paths]:
                del self._readers[path]  # the previous chunk's shards
            shapes = []
            for path, listed in zip(paths, self.chunks[c]["shard_batches"]):
                r = self.reader(path)
                if len(r) != listed:
                    raise ValueError(f"{path}: {len(r)} batches, but {self.manifest_path} lists {listed} (the shard "
                                     f"was rewritten after the split; run the split stage again)")
                shapes.append(np.stack([r.n_docs(), r.seq_lens()], 1).astype(np.int64))
            starts = np.concatenate([[0], np.cumsum(self.chunks[c]["shard_batches"], dtype=np.int64)])
            shape = np.concatenate(shapes) if shapes else np.zeros((0, 2), np.int64)
            self._loaded = (c, starts, shape)
        return self._loaded[1], self._loaded[2]

    def tokens(self, chunk: int, b: int) -> np.ndarray:
        starts, _ = self._chunk(chunk)
        s = int(np.searchsorted(starts, b, side="right")) - 1
        return self.reader(self.chunks[chunk]["shards"][s])[int(b - starts[s])].tokens

    def shape(self, c: int) -> np.ndarray:
        """(n_batches, 2) array of (n_docs, seq_len) of chunk c's batches (read when first asked)."""
        return self._chunk(int(c))[1]

    def total_tokens(self) -> int:
        return sum(int(chunk["tokens"]) for chunk in self.chunks)

    def total_batches(self) -> int:
        return sum(sum(chunk["shard_batches"]) for chunk in self.chunks)


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
