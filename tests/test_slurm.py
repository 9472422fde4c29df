"""The SLURM profile (profiles/slurm) with the real snakemake-executor-plugin-slurm, on a fake cluster: fake
sbatch, srun, sacct and the other commands the plugin calls, which record every call and run each job on this
machine (no GPU) through the plugin's job step. One run of the whole workflow shows every rule's partition,
GPUs, CPUs, memory and time limit, evaluate running where it lands, and training signalled as at the time
limit, submitted again by Snakemake and resumed from the checkpoint written at the signal.
"""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import orjson
import pytest
import torch
import yaml

from model import evaluate
from model.signals import STOP_SIGNALS
from tests.test_main_job import tiny_config
from tests.test_workflow import ROOT, SNAKEMAKE, copy_workflow, edit

FAKE_SLURM = """#!{python}
# sbatch, srun, sacct and the other SLURM commands the plugin calls: one script under each name. Every call is
# recorded. sbatch runs the job at once, on this machine, as a node would, and records its exit status, which
# sacct reports. srun runs its command in a process group of its own (a job step); when the job asked for a
# --signal, the first training step of the run gets it once the trainer has logged a step, as at a time limit.
import fcntl, json, os, signal, subprocess, sys, time
from pathlib import Path
state = Path(os.environ["FAKE_SLURM_STATE"])
name, args = Path(sys.argv[0]).name, sys.argv[1:]


def train_steps():
    steps = []
    for metrics in Path.cwd().glob("checkpoints/run-*/metrics.jsonl"):
        for line in metrics.read_bytes().split(b"\\n"):
            try:
                rec = json.loads(line)
            except ValueError:  # empty, or being written
                continue
            if rec.get("kind") == "train":
                steps.append(rec["step"])
    return steps


with open(state / "calls.jsonl", "a") as fh:
    fh.write(json.dumps([name, *args]) + "\\n")
if name == "sbatch":
    opts = dict(a.split("=", 1) if a.startswith("--") and "=" in a else (a, "") for a in args)
    flags = dict(zip(args, args[1:]))
    with open(state / "lock", "w") as lock:  # the plugin submits from two threads
        fcntl.flock(lock, fcntl.LOCK_EX)
        jobid = str(1001 + len(list(state.glob("*.exit"))) + len(list(state.glob("*.running"))))
        (state / f"{{jobid}}.running").write_text("")
    log = Path(flags["--output"].replace("%j", jobid))
    log.parent.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, SLURM_JOB_ID=jobid, FAKE_SLURM_SIGNAL=opts.get("--signal", ""))
    with open(log, "w") as out:
        rc = subprocess.run(["/bin/sh", "-c", opts["--wrap"]], cwd=flags["-D"], env=env, stdout=out,
                            stderr=subprocess.STDOUT).returncode
    (state / f"{{jobid}}.exit").write_text(str(rc))
    (state / f"{{jobid}}.running").unlink()
    print(jobid)
elif name == "sacct" and "--format=JobIdRaw,State" in args:
    for f in state.glob("*.exit"):
        print(f.stem + "|" + ("COMPLETED" if f.read_text() == "0" else "FAILED"))
elif name == "srun":
    command = args[next(i for i, a in enumerate(args) if not a.startswith("-")):]
    step = subprocess.Popen(command, start_new_session=True)
    sig = os.environ.get("FAKE_SLURM_SIGNAL", "").split("@")[0].split(":")[-1]
    marker = state / "signalled"
    if sig and "train:" in " ".join(command) and not marker.exists():
        while step.poll() is None:
            steps = train_steps()
            if steps:
                os.killpg(step.pid, getattr(signal, "SIG" + sig))  # every process of the step
                marker.write_text(json.dumps({{"signal": sig, "after_step": max(steps)}}))
                break
            time.sleep(0.02)
    rc = step.wait()
    try:  # the step is over when its command is: SLURM kills whatever of it is left
        os.killpg(step.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    sys.exit(rc)
"""
SLURM_COMMANDS = ("sbatch", "srun", "sacct", "squeue", "sinfo", "scancel", "scontrol", "sacctmgr", "sshare")


def fake_slurm(folder: Path) -> dict:
    """A PATH whose SLURM commands are the fake; returns the environment to run Snakemake in."""
    bin_dir, state = folder / "bin", folder / "slurm"
    bin_dir.mkdir(parents=True)
    state.mkdir()
    script = bin_dir / "fake_slurm"
    script.write_text(FAKE_SLURM.format(python=sys.executable))
    script.chmod(0o755)
    for name in SLURM_COMMANDS:
        (bin_dir / name).symlink_to(script)
    return dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", FAKE_SLURM_STATE=str(state))


def options(argv: list[str]) -> dict[str, str]:
    """{option: value} of one sbatch or srun call as the plugins write them (`-p gpu`, `--gpus=2`, `-n1`)."""
    opts, args = {}, iter(argv)
    for arg in args:
        if arg.startswith("--") and "=" in arg:
            key, value = arg.split("=", 1)
            opts[key] = value
        elif arg in ("-p", "-t", "-D", "-A", "--mem", "--job-name", "--output", "--comment"):
            opts[arg] = next(args)
        else:
            opts[arg] = ""
    return opts


@pytest.fixture(scope="module")
def cluster_run(tmp_path_factory):
    """The whole workflow under the profile, on a fake cluster whose nodes are this machine (no GPU): every job
    through sbatch, the plugin's job step (srun) and the rule; training gets the profile's signal once, after
    its first step, and must come back by itself. Returns (workflow folder, {rule: [sbatch options]},
    [srun calls], Snakemake's output)."""
    folder = tmp_path_factory.mktemp("slurm")
    wf = copy_workflow(folder / "wf", docs_per_chunk=30)
    tiny_config(wf)  # [train] device = auto: a GPU where the node has one, else its CPU
    shutil.copytree(ROOT / "profiles", wf / "profiles")
    env = fake_slurm(folder)
    proc = subprocess.run(SNAKEMAKE + ["--profile", "profiles/slurm", "--slurm-init-seconds-before-status-checks", "1"],
                          cwd=wf, env=env, capture_output=True, text=True)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    jobs: dict[str, list[dict]] = {}
    sruns = []
    for line in (folder / "slurm" / "calls.jsonl").read_text().splitlines():
        call = json.loads(line)
        if call[0] == "sbatch":
            opts = options(call[1:])
            jobs.setdefault(re.match(r"rule_(\w+?)(_wildcards_|$)", opts["--comment"])[1], []).append(opts)
        elif call[0] == "srun":
            sruns.append(call[1:])
    return wf, jobs, sruns, out


PROFILE = yaml.safe_load((ROOT / "profiles" / "slurm" / "config.yaml").read_text())

# What each rule must get: (partition, GPUs, CPUs, memory in MB, time limit in minutes). CPUs are the
# Snakefile's threads for preprocessing and the profile's set-threads for train and evaluate, never this
# machine's core count; GPUs follow [train]: one per process (nproc_per_node = 1 here), one for evaluate.
EXPECTED = {
    "filter_chunk": ("cpu", None, "2", "2000", "30"),
    "tokenize_chunk": ("cpu", None, "2", "2000", "60"),
    "shard_chunk": ("cpu", None, "2", "2000", "15"),
    "split": ("cpu", None, "1", "2000", "60"),
    "train": ("gpu", "1", "32", "64000", "2880"),
    "evaluate": ("gpu", "1", "8", "16000", "60"),
    "report": ("cpu", None, "1", "2000", "15"),
}


def test_every_rule_is_submitted_with_its_partition_gpus_cpus_memory_and_time(cluster_run):
    _, jobs, sruns, _ = cluster_run
    assert sorted(jobs) == sorted(EXPECTED)
    assert [len(jobs[r]) for r in ("filter_chunk", "tokenize_chunk", "shard_chunk")] == [3, 3, 3]
    for rule, (partition, gpus, cpus, mem, minutes) in EXPECTED.items():
        for opts in jobs[rule]:
            got = (opts["-p"], opts.get("--gpus"), opts["--cpus-per-task"], opts["--mem"], opts["-t"])
            assert got == (partition, gpus, cpus, mem, minutes), rule
    # inside the allocation the rule runs as a job step with its GPUs and the CPUs it was given (Snakemake
    # there caps threads at the CPUs the node lets it use: the allocation; this machine's, here)
    steps = {re.search(r"--target-jobs (\w+):", " ".join(call))[1]: options(call) for call in sruns}
    node_cpus = len(os.sched_getaffinity(0))
    assert (steps["train"]["--cpus-per-task"], steps["train"]["--gpus"]) == (str(min(32, node_cpus)), "1")
    assert (steps["evaluate"]["--cpus-per-task"], steps["evaluate"]["--gpus"]) == (str(min(8, node_cpus)), "1")


def test_the_whole_workflow_runs_and_evaluate_uses_the_device_its_node_has(cluster_run):
    wf, jobs, _, _ = cluster_run
    assert jobs["evaluate"][0]["-p"] == jobs["train"][0]["-p"]  # the GPU partition, like training
    perplexity = orjson.loads((wf / "results" / "perplexity.json").read_bytes())
    # [train] device = auto: the GPU where the node has one; this machine's CPU otherwise
    assert perplexity["device"] == ("cuda" if torch.cuda.is_available() else "cpu")
    assert (wf / "results" / "plots" / "training.png").stat().st_size > 0


def test_training_stopped_by_the_time_limit_signal_is_submitted_again_and_resumes(cluster_run):
    wf, jobs, _, out = cluster_run
    assert len(jobs["train"]) == 2
    # Snakemake's log says that the first job failed, where its log is, and that it submits it again
    assert re.search(r"SLURM-job '\d+' failed", out) and "Trying to restart job" in out
    # that log (kept: the job failed) says why
    first_log = Path(re.search(r"\S+/rule_train/\d+\.log", out)[0])
    assert re.search(r"training stopped on a signal after writing a checkpoint \(exit 75\) \(stopped by SIGTERM "
                     r"after step \d+ \([\d,]+ tokens\)\)", first_log.read_text())
    log = (wf / "checkpoints" / "logs" / "train.log").read_text()  # the second job's: Snakemake starts it anew
    resumed = re.search(r"resuming \S+ from step_(\d+)\.pt", log)
    assert resumed, log[-3000:]
    # from the checkpoint written at the signal: after the step in progress when it came (or the next one,
    # had it come between that step's check for a signal and its line in metrics.jsonl)
    sent = json.loads((wf.parent / "slurm" / "signalled").read_text())
    assert sent["signal"] == "TERM" and sent["after_step"] < int(resumed[1]) <= sent["after_step"] + 2
    assert (wf / "checkpoints" / "final.pt").exists()


def test_the_signal_is_sent_to_the_job_step_ahead_of_the_time_limit_and_requeues(cluster_run):
    _, jobs, sruns, _ = cluster_run
    train = jobs["train"][0]
    spec = re.fullmatch(r"(?:(\w+):)?(\w+)@(\d+)", train["--signal"])
    assert spec, train["--signal"]
    # not B: that signals only the batch shell (the /bin/sh of --wrap), which dies of it
    assert spec[1] is None
    assert signal.Signals[f"SIG{spec[2]}"] in STOP_SIGNALS
    assert int(spec[3]) >= 120  # time to finish a step and write a 1.5 GB checkpoint
    assert "--requeue" in train  # preemption: SLURM queues the job again itself
    assert PROFILE["retries"] >= 3  # the time limit: Snakemake submits it again
    # a signal without B: reaches job steps: the plugin runs the rule in one (srun), in a thread of the step's
    # Snakemake (the next test shows that Snakemake waiting for the trainer)
    assert "--executor slurm-jobstep" in train["--wrap"]
    for step in (call for call in sruns if "train:" in call):
        command = step[next(i for i, arg in enumerate(step) if not arg.startswith("-")):]
        assert command[1:3] == ["-m", "snakemake"] and "--force-use-threads" in command


def test_threads_and_gpus_come_from_the_config_and_cores_not_this_machine(tmp_path):
    assert PROFILE["set-threads"] == {"train": 32, "evaluate": 8}
    wf = copy_workflow(tmp_path / "wf", docs_per_chunk=20)
    edit(wf / "config.ini", "nproc_per_node = 1", "nproc_per_node = 4")
    out = subprocess.run(SNAKEMAKE + ["--cores", "3", "-n"], cwd=wf, capture_output=True, text=True).stdout
    parts = re.split(r"^rule (\w+):$", out, flags=re.M)  # text, name, its lines, name, its lines, ...
    jobs = dict(zip(parts[1::2], parts[2::2]))
    for rule, threads, gpus in (("train", 3, 4), ("evaluate", 3, 1)):
        assert f"threads: {threads}\n" in jobs[rule] and f"gpu={gpus}" in jobs[rule], jobs[rule]
    edit(wf / "config.ini", "device = auto", "device = cpu")
    out = subprocess.run(SNAKEMAKE + ["--cores", "3", "-n"], cwd=wf, capture_output=True, text=True).stdout
    assert "gpu=0" in out and not re.search(r"gpu=[1-9]", out)


STEP_SNAKEFILE = """
rule train:
    output: "final.txt"
    run:
        import subprocess, sys
        rc = subprocess.run([sys.executable, "trainer.py", output[0]]).returncode
        if rc != 0:
            raise RuntimeError(f"trainer exit {rc}")
"""
STEP_TRAINER = """
import signal, sys, time
from pathlib import Path
got = []
for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1):
    signal.signal(sig, lambda s, f: got.append(s))
Path("ready").write_text("")
while not got:
    time.sleep(0.01)
time.sleep(1)  # the rest of the step, and the checkpoint
Path("stopped").write_text(signal.Signals(got[0]).name)
sys.exit(75)
"""


def test_the_profiles_signal_lets_the_steps_snakemake_wait_for_the_trainer(tmp_path):
    """SLURM sends a --signal without B: to every process of the job step: here Snakemake running the rule
    and the trainer it started (a stand-in that stops a second after the signal, like the real one). The
    step must last until the trainer has stopped: had Snakemake died of the signal (SIGUSR1 does that), SLURM
    would end the step and kill the trainer mid-checkpoint."""
    extra = PROFILE["set-resources"]["train"]["slurm_extra"]
    sig = signal.Signals["SIG" + re.search(r"--signal=(?:\w+:)?(\w+)@", extra)[1]]
    (tmp_path / "Snakefile").write_text(STEP_SNAKEFILE)
    (tmp_path / "trainer.py").write_text(STEP_TRAINER)
    # --force-use-threads: the rule's `run:` in a thread of this Snakemake, as in the plugin's job step (without
    # it a local Snakemake runs it under `/bin/sh -c`, which dies of SIGTERM at once)
    proc = subprocess.Popen(SNAKEMAKE + ["--cores", "1", "--force-use-threads"], cwd=tmp_path,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        while not (tmp_path / "ready").exists():
            assert proc.poll() is None, "Snakemake ended before the trainer started"
            time.sleep(0.05)
        os.killpg(proc.pid, sig)  # every process of the step
        rc = proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert (tmp_path / "stopped").read_text() == sig.name
    assert rc == 1, f"Snakemake ended with {rc} (a negative number: killed by that signal)"


def test_evaluate_on_a_node_without_the_gpu_of_train_device_uses_the_cpu(tmp_path, monkeypatch):
    from model.checkpoint import save_model
    from model.gpt import GPT
    from pipeline.config import Architecture
    from tests.synthetic import make_split

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # a CPU node, whatever this machine has
    arch = Architecture(N=1, d_model=16, d_ff=32, h=2, d_k=8, d_v=8, positional_encoding_max_pos=64)
    _, val = make_split(tmp_path, n_chunks=1, shards_per_chunk=1, batches_per_shard=1, val_batches=2)
    save_model(tmp_path / "final.pt", GPT(arch), arch)
    out = tmp_path / "results"
    doc = evaluate.run(tmp_path / "final.pt", val, out / "perplexity.json", out / "perplexity.md", 2, "cuda",
                       "auto", threads=1, log=tmp_path / "evaluate.log", untrained_baseline=False)
    assert doc["device"] == "cpu" and orjson.loads((out / "perplexity.json").read_bytes())["device"] == "cpu"
    assert "device = cuda, but this machine has no CUDA GPU: evaluating on the CPU" in \
        (tmp_path / "evaluate.log").read_text()
    # asked for by name (python -m model.evaluate --device cuda), the device is kept to
    with pytest.raises(ValueError, match="no CUDA GPU"):
        evaluate.run(tmp_path / "final.pt", val, out / "p.json", out / "p.md", 2, "cuda", "auto", threads=1,
                     log=tmp_path / "strict.log", untrained_baseline=False, strict_device=True)
