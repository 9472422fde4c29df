"""Stage 4, split: the validation set from the val chunk, the training set from the others, no leakage.

Validation, as the seed did: whole batches of the val chunk, drawn at random (seeded) until about
`num_of_docs` documents. Training: the shards of the train chunks as they are (listed, not copied).
Leakage: a validation document whose token sequence also occurs in a training chunk is dropped from its
batch and counted. Only the validation documents' hashes are held in memory; the training shards are
streamed past them once.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np

from pipeline.config import PILE_SET_NAMES
from pipeline.io import atomic_output, count_by, log_file, progress, read_json, write_json
from pipeline.shards import Batch, ShardReader, ShardWriter


def doc_hash(tokens: np.ndarray) -> bytes:
    return hashlib.blake2b(tokens.tobytes(), digest_size=16).digest()


def shard_paths(sharded_dir) -> list[Path]:
    manifest = read_json(Path(sharded_dir) / "manifest.json")
    return [Path(sharded_dir) / s["file"] for s in manifest["shards"]]


def choose_val_batches(readers: list[ShardReader], num_of_docs: int, seed: int) -> list[tuple[int, int]]:
    """(shard, batch) pairs drawn at random until at least num_of_docs documents, in file order."""
    index = [(s, b, int(n)) for s, r in enumerate(readers) for b, n in enumerate(r.n_docs())]
    chosen, docs = [], 0
    for i in np.random.default_rng(seed).permutation(len(index)):
        if docs >= num_of_docs:
            break
        chosen.append(index[i][:2])
        docs += index[i][2]
    return sorted(chosen)


def run(train_dirs, val_dir, train_out, val_out, manifest, *, num_of_docs: int, seed: int, log=None) -> dict:
    """Write the train split (a list of shards, `train_out`), the val split (`val_out`) and a manifest."""
    with log_file(log) as logfh:
        val_readers = [ShardReader(p) for p in shard_paths(val_dir)]
        chosen = choose_val_batches(val_readers, num_of_docs, seed)
        val_batches = [val_readers[s][b] for s, b in chosen]
        val_hashes = {doc_hash(row) for batch in val_batches for row in batch.tokens}

        # Stream every training document past the validation hashes.
        leaked: set[bytes] = set()
        chunks, train_subsets = [], {}
        bar = progress(logfh, "split: leakage check", "docs")
        for train_dir in train_dirs:
            sharded = read_json(Path(train_dir) / "manifest.json")
            for path in shard_paths(train_dir):
                for batch in ShardReader(path):
                    for row in batch.tokens:
                        h = doc_hash(row)
                        if h in val_hashes:
                            leaked.add(h)
                    bar.update(batch.n_docs)
            for name, counts in sharded["per_subset"].items():
                count_by(train_subsets, name, **counts)
            rel = os.path.relpath(Path(train_dir), Path(train_out).parent)
            chunks.append({
                "chunk": Path(train_dir).name,
                "shards": [{**{k: v for k, v in s.items() if k != "file"}, "path": f"{rel}/{s['file']}"}
                           for s in sharded["shards"]],
                **{k: sharded[k] for k in ("batches", "docs", "tokens")},
            })
        bar.close()

        val_subsets, dropped = {}, {}
        with atomic_output(val_out) as tmp:
            writer = ShardWriter(tmp)
            for batch in val_batches:
                keep = np.array([doc_hash(row) not in leaked for row in batch.tokens])
                for p in batch.pile_set[~keep]:
                    count_by(dropped, PILE_SET_NAMES[p], docs=1)
                if keep.any():
                    batch = Batch(batch.tokens[keep], batch.pile_set[keep], batch.n_bytes[keep])
                    writer.add(batch)
                    for p, n in zip(batch.pile_set, batch.n_bytes):
                        count_by(val_subsets, PILE_SET_NAMES[p], docs=1, tokens=batch.tokens.shape[1], bytes=n)
            val_info = writer.close()
        write_json(train_out, {"chunks": chunks, **{k: sum(c[k] for c in chunks) for k in
                                                    ("batches", "docs", "tokens")}})
        result = {
            "stage": "split", "params": {"num_of_docs": num_of_docs, "seed": seed},
            "val": {"chunk": Path(val_dir).name, "batches_chosen": len(chosen),
                    "docs_chosen": sum(b.n_docs for b in val_batches), **{k: val_info[k] for k in
                    ("batches", "docs", "tokens", "sha256")}, "per_subset": val_subsets,
                    "dropped_in_training_too": {"docs": sum(d["docs"] for d in dropped.values()),
                                                "per_subset": dropped}},
            "train": {"chunks": [c["chunk"] for c in chunks],
                      **{k: sum(c[k] for c in chunks) for k in ("batches", "docs", "tokens")},
                      "per_subset": train_subsets},
        }
        write_json(manifest, result)
        print(f"split: val {val_info['docs']} documents ({result['val']['dropped_in_training_too']['docs']} dropped: "
              f"also in training), train {result['train']['docs']} documents in {len(chunks)} chunks", file=logfh)
    return result
