"""Pile-scale promises: training under an open-file limit far below the shard count; metrics of bounded size
that a resume truncates at the checkpoint instead of rewriting; the live TensorBoard view."""

from __future__ import annotations

import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import orjson
import pytest

from model import run as R
from model.checkpoint import load_model
from model.data import TrainData
from model.run import Metrics
from pipeline.io import lines_backwards
from pipeline.shards import ShardReader, ShardWriter
from tests.synthetic import make_split, random_batches, write_tiny_ini
from tests.test_train import ROOT, cli


def tiny_run(tmp_path, **split):
    train_json, val = make_split(tmp_path / "data", **split)
    ini = write_tiny_ini(
        tmp_path / "tiny.ini", tmp_path,
        preprocessing={"path_to_original_data": "data/sample", "pile_sets_to_use": "Github", "max_len_tokens": 32},
        train={"folder_to_save_state_dicts": "{folder}/ckpt", "num_of_chunks_to_use": split.get("n_chunks", 2),
               "warmup_steps": 4, "steps_to_attenuate_lr_to_zero": 40, "checkpoint_every_steps": 7,
               "val_every_steps": 10, "val_batches": 2, "threads": 1})
    return ini, train_json, val


# --- shards opened when needed ---------------------------------------------------------------------------

def test_training_runs_with_an_open_file_limit_far_below_the_number_of_shards(tmp_path):
    ini, train_json, val = tiny_run(tmp_path, n_chunks=2, shards_per_chunk=60, batches_per_shard=1)
    chunks = orjson.loads(train_json.read_bytes())["chunks"]
    n_shards = sum(len(c["shards"]) for c in chunks)
    limit = 48  # Python, torch and the run's own files need about 20 of these
    assert n_shards == 120 > 2 * limit

    def lower_limit():
        resource.setrlimit(resource.RLIMIT_NOFILE, (limit, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))

    final = tmp_path / "ckpt" / "final.pt"
    proc = subprocess.run(cli(ini, train_json, val, final, tmp_path / "train.log"), cwd=ROOT,
                          preexec_fn=lower_limit, capture_output=True, text=True)
    assert proc.returncode == 0, (tmp_path / "train.log").read_text()[-3000:] + proc.stderr[-3000:]
    meta = load_model(final)[2]
    assert meta["tokens"] == chunks[0]["tokens"] + chunks[1]["tokens"]  # every batch of every shard trained on


def test_at_most_max_open_shards_are_open_and_batches_are_those_of_the_shards(tmp_path):
    train_json, _ = make_split(tmp_path, n_chunks=2, shards_per_chunk=7, batches_per_shard=3)
    data = TrainData(train_json, max_open=3)
    assert data.total_batches() == 42
    for c in range(2):
        shards = [ShardReader(p) for p in data.chunks[c]["shards"]]
        expected = [b.tokens for r in shards for b in r]
        assert len(data.shape(c)) == len(expected) == 21
        for b in np.random.default_rng(c).permutation(21):
            tokens = data.tokens(c, int(b))
            assert np.array_equal(tokens, expected[b])
            assert tuple(data.shape(c)[b]) == tokens.shape
            assert data.open_shards() <= 3
    assert data.total_tokens() == sum(int(s[:, 0] @ s[:, 1]) for s in (data.shape(0), data.shape(1)))


def test_a_shard_rewritten_after_the_split_is_an_error_naming_it(tmp_path):
    train_json, _ = make_split(tmp_path, n_chunks=1, shards_per_chunk=2, batches_per_shard=3)
    data = TrainData(train_json)
    shard = Path(data.chunks[0]["shards"][1])
    writer = ShardWriter(shard)
    for batch in random_batches(np.random.default_rng(5), 4):
        writer.add(batch)
    writer.close()
    with pytest.raises(ValueError, match=rf"{shard}: 4 batches, but .*train.json lists 3 .*run the split stage again"):
        data.shape(0)


# --- metrics of bounded size; a resume truncates instead of rewriting -------------------------------------

def records(path) -> list[dict]:
    return [orjson.loads(line) for line in Path(path).read_bytes().splitlines()]


def test_every_n_steps_make_one_record_and_a_checkpoint_closes_the_window(tmp_path):
    m = Metrics(tmp_path / "metrics.jsonl", None, every=10, tokens=0, elapsed_s=0.0, tensorboard=False)
    for step in range(1, 96):
        m.train(step=step, batches=2 * step, tokens=100 * step, loss=float(step), lr=step / 1000,
                grad_norm=float(step % 7), elapsed_s=step / 4)
        if step == 37:
            m.flush()  # what the trainer does before each checkpoint
        if step == 50:
            m.val(step=50, tokens=5000, val_loss=3.5)
    m.close()
    recs = records(tmp_path / "metrics.jsonl")
    train = [r for r in recs if r["kind"] == "train"]
    assert [r["step"] for r in train] == [10, 20, 30, 37, 40, 50, 60, 70, 80, 90, 95]
    assert [r["kind"] for r in recs].index("val") == 6  # right after the record of step 50
    r40 = train[4]  # steps 38, 39, 40
    assert r40["loss"] == pytest.approx(39.0) and r40["grad_norm"] == max(s % 7 for s in (38, 39, 40))
    assert r40["tokens_per_s"] == pytest.approx(300 / 0.75) and r40["batches"] == 80 and r40["lr"] == 0.04
    assert train[-1]["loss"] == pytest.approx(93.0) and train[-1]["elapsed_s"] == 95 / 4
    assert set(train[0]) == {"kind", "step", "batches", "tokens", "loss", "lr", "grad_norm", "tokens_per_s",
                             "elapsed_s"}


def test_an_11_m_step_run_writes_at_most_100_000_training_records():
    assert R.steps_per_record(11_500_000) == 115 and 11_500_000 / 115 <= R.MAX_TRAIN_RECORDS
    assert R.steps_per_record(100_000) == 1 and R.steps_per_record(100_001) == 2 and R.steps_per_record(0) == 1


def test_resume_truncates_the_log_after_the_checkpoint_step_and_appends(tmp_path):
    path = tmp_path / "metrics.jsonl"
    m = Metrics(path, None, tensorboard=False)
    for step in range(1, 51):
        m.train(step=step, batches=step, tokens=10 * step, loss=1.0, lr=0.1, grad_norm=1.0, elapsed_s=step)
        if step % 10 == 0:
            m.val(step=step, tokens=10 * step, val_loss=2.0)
    m.fh.write(b'{"kind": "train", "st')  # killed in the middle of a write
    m.fh.close()
    before = path.read_bytes()
    inode = path.stat().st_ino

    m = Metrics(path, 30, tokens=300, elapsed_s=30.0, tensorboard=False)  # resumed from the checkpoint of step 30
    after_truncation = path.read_bytes()
    m.train(step=31, batches=31, tokens=310, loss=5.0, lr=0.1, grad_norm=1.0, elapsed_s=32.0)
    m.close()
    assert path.stat().st_ino == inode  # the same file, truncated, not a rewritten copy
    assert before.startswith(after_truncation)
    recs = records(path)
    assert [(r["kind"], r["step"]) for r in recs][-3:] == [("train", 30), ("val", 30), ("train", 31)]
    assert len(recs) == 30 + 3 + 1 and recs[-1]["tokens_per_s"] == pytest.approx(10 / 2.0)

    Metrics(path, None, tensorboard=False).close()  # a new run (no checkpoint): nothing kept
    assert path.read_bytes() == b""


def test_lines_backwards_gives_every_line_with_its_offset(tmp_path):
    data = b"".join(b"x" * n + b"\n" for n in (0, 5, 70000, 3, 0, 1)) + b"tail"
    (tmp_path / "f").write_bytes(data)
    with open(tmp_path / "f", "rb") as fh:
        got = list(lines_backwards(fh, block=1000))
    assert [line for _, line in reversed(got)] == data.split(b"\n")
    assert all(data[offset:offset + len(line)] == line for offset, line in got)


# --- the live view: TensorBoard -------------------------------------------------------------------------

def test_tensorboard_shows_each_step_once_after_a_kill_and_resume(tmp_path):
    ea = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator",
                             reason="tensorboard is not installed (it is in requirements-test.txt)")
    ini, train_json, val = tiny_run(tmp_path)
    final = tmp_path / "ckpt" / "final.pt"
    proc = subprocess.Popen(cli(ini, train_json, val, final, tmp_path / "train.log"), cwd=ROOT)
    deadline = time.time() + 120
    log_of = lambda: next((tmp_path / "ckpt").glob("run-*/metrics.jsonl"), None)  # noqa: E731
    while time.time() < deadline and proc.poll() is None:
        path = log_of()
        if path and sum(r["kind"] == "train" for r in records(path)) >= 10:
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)  # past the checkpoint of step 7: steps 8, 9, 10, ... are done again
    proc.wait()
    path = log_of()
    inode, killed = path.stat().st_ino, records(path)
    subprocess.run(cli(ini, train_json, val, final, tmp_path / "train.log"), cwd=ROOT, check=True)

    assert path.stat().st_ino == inode  # truncated after step 7 and appended to, not rewritten
    recs = records(path)
    assert recs[:len([r for r in killed if r["step"] <= 7])] == [r for r in killed if r["step"] <= 7]
    steps = [r["step"] for r in recs if r["kind"] == "train"]
    assert max(r["step"] for r in killed) >= 10 and steps == list(range(1, load_model(final)[2]["step"] + 1))
    train = {r["step"]: r for r in recs if r["kind"] == "train"}
    acc = ea.EventAccumulator(str(path.parent))  # what `tensorboard --logdir <run dir>` reads
    acc.Reload()
    assert set(acc.Tags()["scalars"]) == {"loss/train", "loss/val", "learning_rate", "tokens_per_s", "grad_norm"}
    events = acc.Scalars("loss/train")
    assert [e.step for e in events] == sorted(train)  # the steps repeated after the stop are shown once
    assert [e.value for e in events] == pytest.approx([train[s]["loss"] for s in sorted(train)], rel=1e-6)
    assert [e.value for e in acc.Scalars("learning_rate")] == pytest.approx(
        [train[s]["lr"] for s in sorted(train)], rel=1e-6)
    assert [e.step for e in acc.Scalars("loss/val")] == [r["step"] for r in recs if r["kind"] == "val"]


def test_without_tensorboard_training_logs_one_line_and_writes_metrics(tmp_path):
    code = ("import sys; sys.modules['tensorboard'] = None\n"  # as if it were not installed
            "from pathlib import Path; from model.run import Metrics\n"
            "m = Metrics(Path(sys.argv[1]), None, log=sys.stdout)\n"
            "m.train(step=1, batches=1, tokens=5, loss=2.0, lr=0.1, grad_norm=1.0, elapsed_s=1.0); m.close()\n")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "metrics.jsonl")], cwd=ROOT,
                         capture_output=True, text=True, check=True).stdout
    assert out.count("\n") == 1 and out.startswith("TensorBoard: not installed")
    assert records(tmp_path / "metrics.jsonl")[0]["loss"] == 2.0
    assert not list(tmp_path.glob("events.out.tfevents.*"))
