"""Small synthetic splits in the real shard format, for model tests that need no preprocessing run."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline.config import EOT
from pipeline.io import write_json
from pipeline.shards import Batch, ShardWriter


def random_batches(rng, n_batches, max_len=32, budget=128, vocab=1000):
    """Batches of same-length random documents (start token first), as the shard stage makes them."""
    for _ in range(n_batches):
        seq_len = int(rng.integers(10, max_len + 2))
        n = max(1, budget // seq_len)
        tokens = rng.integers(0, vocab, size=(n, seq_len), dtype=np.uint16)
        tokens[:, 0] = EOT
        yield Batch(tokens=tokens, pile_set=rng.integers(0, 3, size=n).astype(np.int8),
                    n_bytes=rng.integers(20, 200, size=n).astype(np.int32))


def make_split(folder: str | Path, n_chunks=2, shards_per_chunk=2, batches_per_shard=6, val_batches=5,
               max_len=32, budget=128, vocab=1000, seed=0) -> tuple[Path, Path]:
    """Write folder/split/train.json and folder/split/val.arrow like the split stage; return their paths."""
    folder = Path(folder)
    rng = np.random.default_rng(seed)
    chunks = []
    for c in range(n_chunks):
        shard_infos = []
        for s in range(shards_per_chunk):
            path = folder / "sharded" / f"{c:02d}" / f"shard_{s:05d}.arrow"
            path.parent.mkdir(parents=True, exist_ok=True)
            writer = ShardWriter(path)
            for batch in random_batches(rng, batches_per_shard, max_len, budget, vocab):
                writer.add(batch)
            info = writer.close()
            info["path"] = f"../sharded/{c:02d}/{info.pop('file')}"
            shard_infos.append(info)
        chunks.append({"chunk": f"{c:02d}", "shards": shard_infos,
                       **{k: sum(s[k] for s in shard_infos) for k in ("batches", "docs", "tokens")}})
    (folder / "split").mkdir(parents=True, exist_ok=True)
    train_json = folder / "split" / "train.json"
    write_json(train_json, {"chunks": chunks})
    val = folder / "split" / "val.arrow"
    writer = ShardWriter(val)
    for batch in random_batches(rng, val_batches, max_len, budget, vocab):
        writer.add(batch)
    writer.close()
    return train_json, val


TINY_INI = {
    "preprocessing": {"path_to_original_data": "{folder}/data", "path_to_store_preprocessed_data": "{folder}/work",
                      "pile_sets_to_use": "Pile-CC", "max_len_tokens": 40, "max_num_of_tokens_in_batch": 128,
                      "tokens_per_shard": 4096},
    "train": {"folder_to_save_state_dicts": "{folder}/checkpoints", "start_predicting_from_what_token": 2,
              "device": "cpu", "dtype": "float32"},
    "architecture": {"N": 2, "d_model": 32, "d_ff": 64, "h": 2, "d_k": 16, "d_v": 16,
                     "positional_encoding_max_pos": 64},
}


def write_tiny_ini(path: str | Path, folder: str | Path, **overrides: dict) -> Path:
    """A config.ini for a two-layer GPT of width 32 on short documents, paths under `folder`.

    overrides: {section: {key: value}} on top of TINY_INI; each key is written as `key = value`.
    """
    sections = {name: dict(keys) for name, keys in TINY_INI.items()}
    for name, keys in overrides.items():
        sections.setdefault(name, {}).update(keys)
    lines = []
    for name, keys in sections.items():
        lines.append(f"[{name}]")
        lines += [f"{key} = {str(value).format(folder=folder)}" for key, value in keys.items()]
        lines.append("")
    path = Path(path)
    path.write_text("\n".join(lines))
    return path
