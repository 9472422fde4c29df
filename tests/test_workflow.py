"""End to end through Snakemake: stage targets, reruns on edits, --forcerun, and a job killed mid-write.

Each test runs the workflow on a copy of the repository's Snakefile and packages in a temporary folder,
with a few hundred documents of the sample corpus, so editing code or config touches only the copy.
"""

import hashlib
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.corpus import sample_lines, small_corpus, write_chunk

ROOT = Path(__file__).resolve().parents[1]
SNAKEMAKE = [sys.executable, "-m", "snakemake"]
STAGE_FILES = {"filter": "filtered/{}.parquet", "tokenize": "tokenized/{}.parquet", "shard": "sharded/{}",
               "split": "split/train.json"}


def copy_workflow(folder: Path, docs_per_chunk: int = 200) -> Path:
    """A copy of the workflow with a small corpus, and config.ini pointing at it; it trains on both numbered
    chunks of the sample corpus (config.ini trains on one), so that two train chunks go through every stage."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("Snakefile", "config.ini"):
        shutil.copy(ROOT / name, folder / name)
    edit(folder / "config.ini", "num_of_chunks_to_use = 1", "num_of_chunks_to_use = 2")
    for package in ("pipeline", "model", "report"):
        if (ROOT / package).exists():
            shutil.copytree(ROOT / package, folder / package, ignore=shutil.ignore_patterns("__pycache__"))
    small_corpus(folder / "data" / "sample", docs_per_chunk=docs_per_chunk)
    return folder


@pytest.fixture
def workflow_dir(tmp_path):
    return copy_workflow(tmp_path / "wf")


@pytest.fixture(scope="module")
def _preprocessed(tmp_path_factory):
    folder = copy_workflow(tmp_path_factory.mktemp("preprocessed") / "wf")
    snakemake(folder, "split")
    return folder


@pytest.fixture
def preprocessed(_preprocessed, tmp_path):
    """A workflow copy whose preprocessing is done (copied with mtimes and Snakemake's records)."""
    return Path(shutil.copytree(_preprocessed, tmp_path / "done", symlinks=True))


def snakemake(workdir, *args, check=True):
    proc = subprocess.run(SNAKEMAKE + ["--cores", "2", *args], cwd=workdir, capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise AssertionError(f"snakemake {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}")
    return proc.stdout + proc.stderr


def planned_jobs(workdir, target="split") -> dict[str, int]:
    """{rule: jobs} that `snakemake -n TARGET` would run (its 'Job stats' table)."""
    out = snakemake(workdir, target, "-n")
    if "Nothing to be done" in out:
        return {}
    table = out.split("Job stats:")[1].split("total")[0]
    return {m[1]: int(m[2]) for m in re.finditer(r"^(\w+)\s+(\d+)\s*$", table, re.M)}


def edit(path, old, new):
    text = Path(path).read_text()
    assert old in text, old
    Path(path).write_text(text.replace(old, new, 1))


def digests(workdir) -> dict[str, str]:
    """sha256 of every stage output (not logs, not Snakemake's bookkeeping)."""
    base = Path(workdir) / "work" / "preprocessed"
    return {str(p.relative_to(base)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(base.rglob("*")) if p.is_file() and "logs" not in p.parts
            and p.name != ".snakemake_timestamp"}


def test_each_stage_target_runs_up_to_that_stage_and_a_second_run_does_nothing(workflow_dir):
    base = workflow_dir / "work" / "preprocessed"
    stages = list(STAGE_FILES)
    for i, stage in enumerate(stages):
        snakemake(workflow_dir, stage)
        for done in stages[: i + 1]:
            assert (base / STAGE_FILES[done].format("val")).exists(), (stage, done)
        for later in stages[i + 1:]:
            assert not (base / STAGE_FILES[later].format("val")).exists(), (stage, later)
        assert "Nothing to be done" in snakemake(workflow_dir, stage)


@pytest.mark.parametrize("section_key, old, new, expected", [
    ("[preprocessing] max_len_tokens", "max_len_tokens = 512", "max_len_tokens = 300",
     {"tokenize_chunk": 3, "shard_chunk": 3, "split": 1}),
    ("[preprocessing] min_len_words", "min_len_words = 16", "min_len_words = 20",
     {"filter_chunk": 3, "tokenize_chunk": 3, "shard_chunk": 3, "split": 1}),
    ("[preprocessing] tokens_per_shard", "tokens_per_shard = 262144", "tokens_per_shard = 100000",
     {"shard_chunk": 3, "split": 1}),
    ("[val] num_of_docs", "num_of_docs = 10000", "num_of_docs = 50", {"split": 1}),
    ("[train] max_lr", "max_lr = ", "max_lr = 0.0123 # ", {}),
])
def test_editing_a_config_value_reruns_exactly_the_stages_that_read_it(preprocessed, section_key, old, new,
                                                                        expected):
    assert planned_jobs(preprocessed) == {}
    edit(preprocessed / "config.ini", old, new)
    assert planned_jobs(preprocessed) == expected, section_key


def test_editing_a_stages_code_reruns_that_stage_and_what_follows(preprocessed):
    edit(preprocessed / "pipeline" / "shard.py", '"""Stage 3', '"""(edited) Stage 3')
    assert planned_jobs(preprocessed) == {"shard_chunk": 3, "split": 1}
    edit(preprocessed / "pipeline" / "io.py", '"""What every', '"""(edited) What every')
    assert planned_jobs(preprocessed) == {"filter_chunk": 3, "tokenize_chunk": 3, "shard_chunk": 3, "split": 1}


def test_forcerun_of_one_stage_reruns_it_and_gives_identical_outputs(preprocessed):
    workflow_dir = preprocessed
    before = digests(workflow_dir)
    filtered = workflow_dir / "work" / "preprocessed" / "filtered" / "00.parquet"
    tokenized = workflow_dir / "work" / "preprocessed" / "tokenized" / "00.parquet"
    mtimes = filtered.stat().st_mtime_ns, tokenized.stat().st_mtime_ns
    out = snakemake(workflow_dir, "split", "--forcerun", "tokenize_chunk")
    assert "Job stats" in out and "filter_chunk" not in out.split("Job stats:")[1].split("total")[0]
    assert filtered.stat().st_mtime_ns == mtimes[0] and tokenized.stat().st_mtime_ns > mtimes[1]
    assert digests(workflow_dir) == before


def test_a_bad_config_stops_the_workflow_before_any_job(workflow_dir):
    edit(workflow_dir / "config.ini", "pile_sets_to_use = Gutenberg (PG-19)|", "pile_sets_to_use = Gutenberg|")
    proc = subprocess.run(SNAKEMAKE + ["--cores", "2", "split"], cwd=workflow_dir, capture_output=True, text=True)
    assert proc.returncode != 0
    assert "config.ini [preprocessing] pile_sets_to_use: 'Gutenberg' is not a Pile subset; did you mean " \
           "'Gutenberg (PG-19)'?" in proc.stdout + proc.stderr
    assert not (workflow_dir / "work").exists()


def test_another_ini_is_selected_with_config_ini(workflow_dir):
    alt = workflow_dir / "alt.ini"
    alt.write_text((workflow_dir / "config.ini").read_text().replace("work/preprocessed", "work/alt"))
    snakemake(workflow_dir, "filter", "--config", "ini=alt.ini")
    assert (workflow_dir / "work" / "alt" / "filtered" / "val.parquet").exists()
    assert not (workflow_dir / "work" / "preprocessed").exists()


def test_sigkill_of_a_job_mid_write_leaves_nothing_finished_and_the_rerun_is_identical(tmp_path, workflow_dir):
    # a chunk big enough that its filter job is caught while writing
    big = sample_lines("00") * 6
    for folder in (workflow_dir, tmp_path / "reference"):
        if folder != workflow_dir:
            shutil.copytree(workflow_dir, folder)
        write_chunk(folder / "data" / "sample" / "00.jsonl.zst", big)
    snakemake(tmp_path / "reference", "split")

    filtered = workflow_dir / "work" / "preprocessed" / "filtered"
    proc = subprocess.Popen(SNAKEMAKE + ["--cores", "1", "split"], cwd=workflow_dir, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    killed = None
    deadline = time.monotonic() + 120
    while killed is None and time.monotonic() < deadline and proc.poll() is None:
        for tmp in filtered.glob(".00.parquet.tmp.*") if filtered.exists() else ():
            if tmp.stat().st_size > 0:  # the job is writing: kill it (its pid is in the name)
                killed = int(tmp.name.rsplit(".", 1)[1])
                os.kill(killed, signal.SIGKILL)
                break
        time.sleep(0.005)
    assert killed is not None, "the filter job of chunk 00 was never caught writing"
    assert proc.wait(timeout=120) != 0
    assert not (filtered / "00.parquet").exists() and not (filtered / "00.json").exists()
    assert not (workflow_dir / "work" / "preprocessed" / "tokenized" / "00.parquet").exists()

    snakemake(workflow_dir, "split")  # the rerun: no --unlock or --rerun-incomplete needed
    assert digests(workflow_dir) == digests(tmp_path / "reference")
