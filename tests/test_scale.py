"""Pile-scale promises: training under an open-file limit far below the shard count; metrics of bounded size
that a resume truncates at the checkpoint instead of rewriting; the live TensorBoard view."""

from __future__ import annotations

import resource
import subprocess
import sys
from pathlib import Path

import numpy as np
import orjson
import pytest

from model.data import TrainData
from model.checkpoint import load_model
from pipeline.shards import ShardReader, ShardWriter
from tests.synthetic import make_split, random_batches, write_tiny_ini

ROOT = Path(__file__).resolve().parents[1]


def tiny_run(tmp_path, **split):
    train_json, val = make_split(tmp_path / "data", **split)
    ini = write_tiny_ini(
        tmp_path / "tiny.ini", tmp_path,
        preprocessing={"path_to_original_data": "data/sample", "pile_sets_to_use": "Github", "max_len_tokens": 32},
        train={"folder_to_save_state_dicts": "{folder}/ckpt", "num_of_chunks_to_use": split.get("n_chunks", 2),
               "warmup_steps": 4, "steps_to_attenuate_lr_to_zero": 40, "checkpoint_every_steps": 7,
               "val_every_steps": 10, "val_batches": 2, "threads": 1})
    return ini, train_json, val


def cli(ini, train_json, val, final, log):
    return [sys.executable, "-m", "model.train", "--ini", str(ini), "--train", str(train_json), "--val", str(val),
            "--final", str(final), "--log", str(log)]


# --- shards opened when needed ---------------------------------------------------------------------------

def test_training_runs_with_an_open_file_limit_far_below_the_number_of_shards(tmp_path):
    ini, train_json, val = tiny_run(tmp_path, n_chunks=2, shards_per_chunk=60, batches_per_shard=1)
    n_shards = sum(len(c["shards"]) for c in orjson.loads(train_json.read_bytes())["chunks"])
    limit = 48  # Python, torch and the run's own files need about 20 of these
    assert n_shards == 120 > 2 * limit

    def lower_limit():
        resource.setrlimit(resource.RLIMIT_NOFILE, (limit, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))

    final = tmp_path / "ckpt" / "final.pt"
    proc = subprocess.run(cli(ini, train_json, val, final, tmp_path / "train.log"), cwd=ROOT,
                          preexec_fn=lower_limit, capture_output=True, text=True)
    assert proc.returncode == 0, (tmp_path / "train.log").read_text()[-3000:] + proc.stderr[-3000:]
    meta = load_model(final)[2]
    assert meta["tokens"] == orjson.loads(train_json.read_bytes())["chunks"][0]["tokens"] + \
        orjson.loads(train_json.read_bytes())["chunks"][1]["tokens"]  # every batch of every shard trained on


def test_at_most_max_open_shards_are_open_and_batches_are_those_of_the_shards(tmp_path):
    train_json, _ = make_split(tmp_path, n_chunks=2, shards_per_chunk=7, batches_per_shard=3)
    data = TrainData(train_json, max_open=3)
    assert data.total_batches() == 42
    for c in range(2):
        shards = [ShardReader(p) for p in data.chunks[c]["shards"]]
        expected = [b.tokens for r in shards for b in r]
        assert len(data.shape[c]) == len(expected) == 21
        for b in np.random.default_rng(c).permutation(21):
            tokens = data.tokens(c, int(b))
            assert np.array_equal(tokens, expected[b])
            assert tuple(data.shape[c][b]) == tokens.shape
            assert data.open_shards() <= 3
    assert data.total_tokens() == sum(int(s[:, 0] @ s[:, 1]) for s in (data.shape[0], data.shape[1]))


def test_a_shard_rewritten_after_the_split_is_an_error_naming_it(tmp_path):
    train_json, _ = make_split(tmp_path, n_chunks=1, shards_per_chunk=2, batches_per_shard=3)
    data = TrainData(train_json)
    shard = Path(data.chunks[0]["shards"][1])
    writer = ShardWriter(shard)
    for batch in random_batches(np.random.default_rng(5), 4):
        writer.add(batch)
    writer.close()
    with pytest.raises(ValueError, match=rf"{shard}: 4 batches, but .*train.json lists 3 .*run the split stage again"):
        data.shape[0]
