"""The whole main job through Snakemake with a tiny model: train, evaluate, report, rerun rules, resume.

One module-scoped run of `snakemake --cores 2` (the default target) on a few hundred sample documents with a
one-layer model; the tests then look at its outputs or work on copies of the finished folder.
"""

import hashlib
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import orjson
import pytest
import torch

from tests.test_workflow import SNAKEMAKE, copy_workflow, edit, planned_jobs, snakemake

TINY = {  # a one-layer model on documents of at most 64 tokens: the whole job in about a minute
    "max_len_tokens": "64", "max_num_of_tokens_in_batch": "260", "positional_encoding_max_pos": "65",
    "N": "1", "d_model": "32", "d_ff": "64", "h": "2", "d_k": "16", "d_v": "16",
    "dtype": "float32", "warmup_steps": "20", "steps_to_attenuate_lr_to_zero": "400", "max_lr": "3e-3",
    "checkpoint_every_steps": "10", "val_every_steps": "10", "val_batches": "4", "tokens_per_optimizer_step": "0",
}


def tiny_config(folder: Path) -> None:
    text = (folder / "config.ini").read_text()
    for key, value in TINY.items():
        text, n = re.subn(rf"^{key}\s*=.*$", f"{key} = {value}", text, count=1, flags=re.M)
        assert n == 1, key
    (folder / "config.ini").write_text(text)


def weights_sha256(path) -> str:
    """sha256 of a model file's weights (the file also holds its training time, which differs)."""
    h = hashlib.sha256()
    for name, tensor in torch.load(path, weights_only=True)["model"].items():
        h.update(name.encode() + tensor.numpy().tobytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def _main_job(tmp_path_factory):
    folder = copy_workflow(tmp_path_factory.mktemp("main") / "wf", docs_per_chunk=80)
    tiny_config(folder)
    out = snakemake(folder)  # the default target: preprocessing, train, evaluate, report
    return folder, out


@pytest.fixture
def main_job(_main_job, tmp_path):
    return Path(shutil.copytree(_main_job[0], tmp_path / "done", symlinks=True))


def test_the_default_target_trains_evaluates_and_plots(_main_job):
    folder, out = _main_job
    ppl = orjson.loads((folder / "results" / "perplexity.json").read_bytes())
    text = orjson.dumps(ppl).decode()
    assert (folder / "checkpoints" / "final.pt").exists()
    for name in ("training.png", "throughput.png", "perplexity.png"):
        assert (folder / "results" / "plots" / name).read_bytes()[:4] == b"\x89PNG"
    assert (folder / "results" / "perplexity.md").read_text().count("|") > 20
    assert "perplexity" in text and "bits_per_byte" in text
    assert "Nothing to be done" in snakemake(folder)


def test_editing_train_reruns_training_and_evaluation_but_no_preprocessing(main_job):
    edit(main_job / "config.ini", "max_lr = 3e-3", "max_lr = 2e-3")
    assert planned_jobs(main_job, "all") == {"all": 1, "train": 1, "evaluate": 1, "report": 1}


def test_snakemake_report_includes_the_plots(main_job):
    snakemake(main_job, "--report", "report.html")
    html = (main_job / "report.html").read_bytes()
    assert len(html) > 50_000 and b"perplexity.png" in html and b"training.png" in html


def test_sigkill_of_snakemake_during_training_then_unlock_and_rerun_resumes_to_the_same_weights(main_job):
    final = main_job / "checkpoints" / "final.pt"
    reference = weights_sha256(final)
    runs = list((main_job / "checkpoints").glob("run-*"))
    assert len(runs) == 1
    shutil.rmtree(runs[0])
    final.unlink()
    proc = subprocess.Popen(SNAKEMAKE + ["--cores", "2", "train"], cwd=main_job, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        if list((main_job / "checkpoints").glob("run-*/step_*.json")):  # a checkpoint and its checksum
            break
        time.sleep(0.05)
    assert proc.poll() is None, "training finished before a checkpoint was seen"
    os.killpg(proc.pid, signal.SIGKILL)  # Snakemake and its job, as a lost node or `kill -9` would
    proc.wait()
    assert not final.exists()
    snakemake(main_job, "--unlock")
    snakemake(main_job, "train")
    log = (main_job / "checkpoints" / "logs" / "train.log").read_text()
    assert "resum" in log.lower(), log[-2000:]
    assert weights_sha256(final) == reference


def test_sigterm_to_snakemake_train_checkpoints_the_current_step_and_the_rerun_gives_the_same_weights(main_job):
    # What SLURM does at a time limit or a preemption: SIGTERM to every process of the job, SIGKILL 30 s later.
    final = main_job / "checkpoints" / "final.pt"
    reference = weights_sha256(final)
    shutil.rmtree(next((main_job / "checkpoints").glob("run-*")))
    final.unlink()
    proc = subprocess.Popen(SNAKEMAKE + ["--cores", "2", "train"], cwd=main_job, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        ckpts = list((main_job / "checkpoints").glob("run-*/step_*.json"))
        if ckpts and metrics_steps(main_job) >= 13:  # past the checkpoint of step 10, short of step 20
            break
        time.sleep(0.05)
    assert proc.poll() is None, "training finished before the signal could be sent"
    os.killpg(proc.pid, signal.SIGTERM)
    sent = time.monotonic()
    proc.wait(timeout=30)
    while time.monotonic() - sent < 30 and group_alive(proc.pid):
        time.sleep(0.1)
    assert not group_alive(proc.pid), "a process of the job outlived SIGTERM by 30 s"
    stopped_at = metrics_steps(main_job)
    assert stopped_at % 10 != 0
    assert (next((main_job / "checkpoints").glob("run-*")) / f"step_{stopped_at:08d}.json").exists()
    assert not final.exists()
    log = (main_job / "checkpoints" / "logs" / "train.log").read_text()
    assert f"stopped by SIGTERM after step {stopped_at}" in log
    snakemake(main_job, "--unlock")
    snakemake(main_job, "train")
    assert f"from step_{stopped_at:08d}.pt" in (main_job / "checkpoints" / "logs" / "train.log").read_text()
    assert weights_sha256(final) == reference


def metrics_steps(folder) -> int:
    """The last training step logged so far in the run's metrics.jsonl (0 before the first)."""
    try:
        lines = next((folder / "checkpoints").glob("run-*")).joinpath("metrics.jsonl").read_bytes().splitlines()
    except (StopIteration, FileNotFoundError):
        return 0
    steps = [0]
    for line in lines:
        try:
            rec = orjson.loads(line)
        except orjson.JSONDecodeError:
            continue
        if rec.get("kind") == "train":
            steps.append(rec["step"])
    return max(steps)


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True
