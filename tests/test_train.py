"""Training (model/train.py): schedule, loss masking, data order, and the checkpoint/resume promises."""

from __future__ import annotations

import hashlib
import math
import os
import platform
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import orjson
import pytest
import torch

from model import data as D, loss as L, optim as O, run as R, train as T
from model.checkpoint import ModelFileError, latest_checkpoint, list_checkpoints, load_model, save_model
from model.gpt import GPT
from pipeline.config import EOT, Architecture, Train, load_settings
from tests.synthetic import make_split, write_tiny_ini

ROOT = Path(__file__).resolve().parents[1]

def setup_run(tmp_path, P_drop=0.1, batches_per_shard=6, **train):
    train_json, val = make_split(tmp_path / "data", batches_per_shard=batches_per_shard)
    ini = write_tiny_ini(
        tmp_path / "tiny.ini", tmp_path,
        preprocessing={"path_to_original_data": "data/sample", "pile_sets_to_use": "Github", "max_len_tokens": 32},
        train={"folder_to_save_state_dicts": "{folder}/ckpt", "num_of_chunks_to_use": 2, "max_lr": "3e-3",
               "warmup_steps": 4, "steps_to_attenuate_lr_to_zero": 40, "P_drop": P_drop,
               "checkpoint_every_steps": 5, "keep_checkpoints": 2, "val_every_steps": 10, "val_batches": 3,
               "threads": 1, **train},
        architecture={"positional_encoding_max_pos": 40})
    return ini, train_json, val


def train_here(ini, train_json, val, final, log=None):
    """The trainer in this process (warnings and exceptions reach the test), one thread, log appended to `log`."""
    if log is None:
        return T.train(load_settings(ini), train_json, val, final, threads=1)
    with open(log, "a") as fh:
        return T.train(load_settings(ini), train_json, val, final, threads=1, log=fh)


def cli(ini, train_json, val, final, log):
    return [sys.executable, "-m", "model.train", "--ini", str(ini), "--train", str(train_json), "--val", str(val),
            "--final", str(final), "--log", str(log)]


def weights_sha256(path) -> str:
    model, _, _ = load_model(path)
    h = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        h.update(name.encode())
        h.update(tensor.numpy().tobytes())
    return h.hexdigest()


def metrics(run_dir) -> list[dict]:
    return [orjson.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_bytes().splitlines()]


def run_dir_of(final) -> Path:
    return Path(final).parent / torch.load(final, weights_only=True)["run_dir"]


# --- schedule, targets, loss, order ------------------------------------------------------------------

def test_schedule_warms_up_linearly_then_follows_the_seeds_cosine():
    t = Train(max_lr=1.0, warmup_steps=100, steps_to_attenuate_lr_to_zero=1000)
    assert O.lr_at(0, t) == 0.0  # the original's LambdaLR: the first optimizer step has lr 0
    assert O.lr_at(1, t) == pytest.approx(0.01)
    assert O.lr_at(50, t) == pytest.approx(0.5)
    assert O.lr_at(100, t) == pytest.approx(1.0)
    assert O.lr_at(600, t) == pytest.approx(math.cos(math.pi * 500 / 2000))  # the seed's formula
    assert O.lr_at(1100, t) == pytest.approx(0.0, abs=1e-12)
    assert O.lr_at(5000, t) == 0.0  # stays at zero past the attenuation
    assert O.lr_at(1, Train(max_lr=2.5e-4, warmup_steps=0, steps_to_attenuate_lr_to_zero=10)) == pytest.approx(
        2.5e-4 * math.cos(math.pi / 20))


def test_target_is_the_document_then_endoftext():
    tokens = np.array([[EOT, 5, 6, 7], [EOT, 8, 9, 10]], dtype=np.uint16)
    x, y = L.inputs_and_targets(tokens)
    assert x.tolist() == [[EOT, 5, 6, 7], [EOT, 8, 9, 10]]
    assert y.tolist() == [[5, 6, 7, EOT], [8, 9, 10, EOT]]


def test_loss_ignores_positions_before_start_predicting_from_what_token():
    torch.manual_seed(0)
    model = L.LossModel(GPT(Architecture(N=1, d_model=16, d_ff=32, h=2, d_k=8, d_v=8,
                                         positional_encoding_max_pos=16)))
    x = torch.randint(0, 1000, (2, 10))
    y = torch.randint(0, 1000, (2, 10))
    y2 = y.clone()
    y2[:, :3] = 7  # targets of the ignored positions changed
    with torch.no_grad():
        assert model(x, y, 3).item() == model(x, y2, 3).item()
        logits = model.gpt(x)
        ref = torch.nn.functional.cross_entropy(logits[:, 3:].reshape(-1, logits.shape[-1]), y[:, 3:].reshape(-1),
                                                reduction="sum")
        assert model(x, y, 3).item() == pytest.approx(ref.item(), rel=1e-5)
        assert model(x, y, 0).item() != pytest.approx(ref.item(), rel=1e-3)


def test_data_order_is_shuffled_seeded_per_epoch_and_chunk():
    shape = np.array([[4, 30]] * 50)
    a = D.batch_order(1337, 0, 0, shape, start=8)
    assert sorted(a.tolist()) == list(range(50)) and a.tolist() != list(range(50))
    assert np.array_equal(a, D.batch_order(1337, 0, 0, shape, start=8))
    assert not np.array_equal(a, D.batch_order(1337, 1, 0, shape, start=8))
    assert not np.array_equal(a, D.batch_order(1337, 0, 1, shape, start=8))
    assert D.chunk_order(1337, 0, 17).tolist() == list(range(17))  # the original's order by default
    shuffled = D.chunk_order(1337, 0, 17, shuffle=True)
    assert sorted(shuffled.tolist()) == list(range(17)) and shuffled.tolist() != list(range(17))
    shape[::2, 1] = 8  # batches with nothing to predict are left out
    assert sorted(D.batch_order(1337, 0, 0, shape, start=8).tolist()) == list(range(1, 50, 2))


def test_optimizer_steps_gather_batches_up_to_the_token_budget():
    shape = np.array([[4, 25]] * 10)  # 100 tokens per batch
    order = np.arange(10)
    assert D.step_groups(order, shape, 0, 1) == [(i, i + 1) for i in range(10)]
    assert D.step_groups(order, shape, 250, 1) == [(0, 3), (3, 6), (6, 9), (9, 10)]
    assert D.step_groups(order, shape, 0, 4) == [(0, 4), (4, 8), (8, 10)]


def test_weight_decay_only_on_two_dimensional_weights():
    gpt = GPT(Architecture(N=1, d_model=16, d_ff=32, h=2, d_k=8, d_v=8, positional_encoding_max_pos=16))
    opt = O.make_optimizer(gpt, Train(weight_decay=0.1), torch.device("cpu"))
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and all(p.dim() == 2 for p in decay["params"])
    assert no_decay["weight_decay"] == 0.0 and all(p.dim() == 1 for p in no_decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(gpt.parameters()))
    everything = O.make_optimizer(gpt, Train(weight_decay=0.1, weight_decay_all_parameters=True), torch.device("cpu"))
    assert [len(g["params"]) for g in everything.param_groups] == [len(list(gpt.parameters())), 0]


def test_adamw_is_fused_on_cpu_and_steps_like_the_per_tensor_loop():
    gpt = GPT(Architecture(N=1, d_model=16, d_ff=32, h=2, d_k=8, d_v=8, positional_encoding_max_pos=16))
    opt = O.make_optimizer(gpt, Train(max_lr=1e-2, warmup_steps=0), torch.device("cpu"))
    assert all(g["fused"] for g in opt.param_groups)
    twin = GPT(gpt.arch)
    twin.load_state_dict(gpt.state_dict())
    loop = torch.optim.AdamW([{"params": [p for p in twin.parameters() if p.dim() >= 2], "weight_decay": 0.01},
                              {"params": [p for p in twin.parameters() if p.dim() < 2], "weight_decay": 0.0}],
                             lr=opt.param_groups[0]["lr"], foreach=False)
    for model, o in ((gpt, opt), (twin, loop)):
        for p in model.parameters():
            p.grad = torch.full_like(p, 0.1)
        o.step()
    for a, b in zip(gpt.parameters(), twin.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_a_model_that_fails_to_compile_trains_eagerly_with_one_warning(monkeypatch):
    import io

    def broken_compile(model, **kw):
        def run(*args):
            raise RuntimeError("InductorError: no working C++ compiler found")
        return run

    monkeypatch.setattr(torch, "compile", broken_compile)
    torch.manual_seed(0)
    gpt = GPT(Architecture(N=1, d_model=16, d_ff=32, h=2, d_k=8, d_v=8, positional_encoding_max_pos=16))
    log = io.StringIO()
    model = T.CompiledOrEager(L.LossModel(gpt), log)
    x, y = torch.randint(0, 1000, (2, 10)), torch.randint(0, 1000, (2, 10))
    assert model(x, y, 2).item() == L.LossModel(gpt)(x, y, 2).item()
    model(x, y, 2)
    assert log.getvalue().count("warning: torch.compile failed") == 1
    assert "no working C++ compiler found); training without it" in log.getvalue()


def test_a_compile_failure_is_told_by_the_error_inductor_wrapped():
    from torch._dynamo.exc import BackendCompilerFailed

    def inductor():
        pass
    e = BackendCompilerFailed(inductor, ValueError("Cannot view a tensor with shape [4, 12, 513, 64]\nmore"), None)
    assert L.compile_error(e) == "BackendCompilerFailed: ValueError: Cannot view a tensor with shape [4, 12, 513, 64]"
    assert L.compile_error(RuntimeError("\nno C++ compiler\nat all")) == "RuntimeError: no C++ compiler"


def test_threads_default_to_physical_cores_not_hyperthreads(monkeypatch):
    siblings = {0: "0,2", 1: "1,3", 2: "0,2", 3: "1,3"}  # 2 cores, 2 hyperthreads each
    monkeypatch.setattr(T.os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
    monkeypatch.setattr(T.Path, "read_text", lambda self: siblings[int(self.parts[-3][3:])] + "\n")
    assert T.physical_cores() == 2


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's allocator settings")
def test_memory_freed_during_training_stays_in_the_heap():
    """Inside keep_freed_memory a freed 64 MB block is reused without page faults (glibc would trim it off the
    heap and the next step would fault it back in: 16,384 pages). A mallopt value that overflowed a C int once
    set the trim threshold to 0, which trims on every free. In a fresh interpreter: a heap with nothing else."""
    code = """if True:
        import ctypes, resource
        from model.train import keep_freed_memory
        libc = ctypes.CDLL("libc.so.6")
        libc.malloc.restype, libc.malloc.argtypes, libc.free.argtypes = ctypes.c_void_p, [ctypes.c_size_t], [ctypes.c_void_p]
        def faults(n=64 * 2**20):
            before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            p = libc.malloc(n)
            ctypes.memset(p, 1, n)
            libc.free(p)
            return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
        with keep_freed_memory():
            inside = [faults() for _ in range(3)]
        after = [faults(2**20) for _ in range(3)]
        print([inside, after])
    """
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    (first, *again), after = orjson.loads(out)
    assert first > 10_000 and max(again) < 1000, out
    # and after it, a 1 MB block is not mmapped and faulted in (256 pages) on every allocation, as it was once
    # the context had set glibc's 128 KB mmap threshold for good
    assert max(after[1:]) < 64, out


# --- a whole (tiny) run ------------------------------------------------------------------------------

def test_training_lowers_the_loss_and_writes_final_pt_and_metrics(tmp_path):
    ini, train_json, val = setup_run(tmp_path, P_drop=0.0)
    final = tmp_path / "ckpt" / "final.pt"
    T.launch(ini, train_json, val, final, threads=1, log=tmp_path / "train.log")
    model, arch, meta = load_model(final, expected_arch=load_settings(ini).architecture)
    run_dir = run_dir_of(final)
    assert run_dir.parent == final.parent and run_dir.name.startswith("run-")
    recs = metrics(run_dir)
    train, val_recs = [r for r in recs if r["kind"] == "train"], [r for r in recs if r["kind"] == "val"]
    assert [r["step"] for r in train] == list(range(1, meta["step"] + 1))
    assert set(train[0]) == {"kind", "step", "batches", "tokens", "loss", "lr", "grad_norm", "tokens_per_s",
                             "elapsed_s"}
    assert train[-1]["tokens"] == meta["tokens"] == sum(c["tokens"] for c in orjson.loads(train_json.read_bytes())["chunks"])
    assert val_recs[0]["step"] == 0 and val_recs[-1]["step"] == meta["step"]
    assert val_recs[0]["val_loss"] == pytest.approx(math.log(50257), rel=0.01)  # untrained: uniform
    assert val_recs[-1]["val_loss"] < val_recs[0]["val_loss"] - 1.0
    assert len(list_checkpoints(run_dir)) == 2  # keep_checkpoints
    assert "wrote" in (tmp_path / "train.log").read_text()
    precision = orjson.loads((run_dir / "config.json").read_bytes())["precision"]
    assert precision == {"dtype": "float32", "asked": "float32", "reason": "asked for"} == meta["precision"]


def test_sigkill_then_resume_gives_identical_weights(tmp_path):
    ini, train_json, val = setup_run(tmp_path)  # dropout on: the RNG states must be restored too
    full = tmp_path / "full" / "final.pt"
    subprocess.run(cli(ini, train_json, val, full, tmp_path / "full.log"), cwd=ROOT, check=True)
    os.rename(tmp_path / "ckpt", tmp_path / "uninterrupted")

    final = tmp_path / "ckpt" / "final.pt"
    proc = subprocess.Popen(cli(ini, train_json, val, final, tmp_path / "killed.log"), cwd=ROOT)
    def last_step():
        try:
            return max(r["step"] for r in metrics(next((tmp_path / "ckpt").glob("run-*"))))
        except (StopIteration, FileNotFoundError, ValueError, orjson.JSONDecodeError):
            return 0

    deadline = time.time() + 120
    while last_step() < 12 and time.time() < deadline:  # two steps past the checkpoint of step 10
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not final.exists()
    run_dir = next((tmp_path / "ckpt").glob("run-*"))
    killed_at = max(r["step"] for r in metrics(run_dir))
    subprocess.run(cli(ini, train_json, val, final, tmp_path / "resumed.log"), cwd=ROOT, check=True)

    assert "resuming" in (tmp_path / "resumed.log").read_text()
    assert weights_sha256(final) == weights_sha256(full)
    steps = [(r["kind"], r["step"]) for r in metrics(run_dir)]
    assert len(steps) == len(set(steps)), "a step logged twice after the resume"
    ref = metrics(next((tmp_path / "uninterrupted").glob("run-*")))
    assert [(r["kind"], r["step"], r.get("loss"), r.get("val_loss")) for r in metrics(run_dir)] == \
           [(r["kind"], r["step"], r.get("loss"), r.get("val_loss")) for r in ref]
    assert killed_at >= 12 and load_model(final)[2]["step"] > killed_at


def test_corrupted_latest_checkpoint_falls_back_to_the_previous_with_a_warning(tmp_path):
    ini, train_json, val = setup_run(tmp_path, P_drop=0.0)
    final = tmp_path / "ckpt" / "final.pt"
    train_here(ini, train_json, val, final)
    run_dir = run_dir_of(final)
    last_step = load_model(final)[2]["step"]
    ckpts = list_checkpoints(run_dir)
    latest, previous = ckpts[-1], ckpts[-2]
    data = bytearray(latest.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped bit in the middle
    latest.write_bytes(bytes(data))
    with pytest.warns(UserWarning, match=rf"{latest.name}: checksum mismatch.*previous checkpoint"):
        path, state = latest_checkpoint(run_dir)
    assert path == previous and state["step"] < last_step

    latest.write_bytes(bytes(data[:1000]))  # truncated: the trainer resumes from the previous one
    final.unlink()
    with pytest.warns(UserWarning, match="truncated or corrupt"):
        train_here(ini, train_json, val, final, log=tmp_path / "again.log")
    assert f"from {previous.name}" in (tmp_path / "again.log").read_text()
    assert load_model(final)[2]["step"] == last_step and len(list_checkpoints(run_dir)) == 2


def test_checkpoint_of_another_architecture_is_refused(tmp_path):
    ini, train_json, val = setup_run(tmp_path, P_drop=0.0)
    final = tmp_path / "ckpt" / "final.pt"
    train_here(ini, train_json, val, final)
    run_dir = run_dir_of(final)
    other = Architecture(N=3, d_model=32, d_ff=64, h=2, d_k=16, d_v=16, positional_encoding_max_pos=40)
    with pytest.raises(ModelFileError, match=r"step_\d+\.pt: the model has another architecture.*N = 2 in the file but 3"):
        latest_checkpoint(run_dir, expected_arch=other)


def test_changed_train_setting_starts_a_new_run_and_unchanged_one_resumes(tmp_path):
    ini, train_json, val = setup_run(tmp_path, P_drop=0.0)
    final = tmp_path / "ckpt" / "final.pt"
    train_here(ini, train_json, val, final)
    first = run_dir_of(final)
    sha = weights_sha256(final)
    final.unlink()
    train_here(ini, train_json, val, final, log=tmp_path / "again.log")  # the finished run: no training
    assert run_dir_of(final) == first and weights_sha256(final) == sha
    assert "resuming" in (tmp_path / "again.log").read_text()
    ini.write_text(ini.read_text().replace("max_lr = 3e-3", "max_lr = 1e-3").replace("keep_checkpoints = 2",
                                                                                     "keep_checkpoints = 3"))
    train_here(ini, train_json, val, final)
    assert run_dir_of(final) != first and weights_sha256(final) != sha
    ini.write_text(ini.read_text().replace("keep_checkpoints = 3", "keep_checkpoints = 4"))  # operational only
    assert R.run_dir_for(load_settings(ini), train_json)[0] == run_dir_of(final)


def test_second_trainer_on_the_same_run_is_refused(tmp_path):
    ini, train_json, val = setup_run(tmp_path, P_drop=0.0)
    run_dir, _ = R.run_dir_for(load_settings(ini), train_json)
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from model.run import RunLock; from pathlib import Path;"
                               "lock = RunLock(Path(sys.argv[1])); lock.acquire(); print('locked', flush=True); time.sleep(60)",
         str(run_dir)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(RuntimeError, match=rf"{run_dir.name}/lock: another trainer \(pid {holder.pid}"):
            train_here(ini, train_json, val, tmp_path / "ckpt" / "final.pt")
    finally:
        holder.kill()
        holder.wait()
    train_here(ini, train_json, val, tmp_path / "ckpt" / "final.pt")  # the lock died with its holder
    assert (tmp_path / "ckpt" / "final.pt").exists()


def test_ddp_with_two_gloo_processes_matches_one_process(tmp_path):
    # Steps of >= 300 tokens (about 3 batches) are the same steps for 1 and 2 processes; DDP deals the
    # batches of a step out to the 2 ranks and averages their gradients, so the weights must agree.
    ini, train_json, val = setup_run(tmp_path, P_drop=0.0, tokens_per_optimizer_step=300)
    single = tmp_path / "single" / "final.pt"
    train_here(ini, train_json, val, single)
    ini.write_text(ini.read_text().replace("[train]", "[train]\nnproc_per_node = 2")
                   .replace(f"{tmp_path}/ckpt", f"{tmp_path}/ddp"))
    final = tmp_path / "ddp" / "final.pt"
    T.launch(ini, train_json, val, final, threads=2, log=tmp_path / "ddp.log")
    meta = load_model(final)[2]
    assert meta["world_size"] == 2
    assert meta["step"] == load_model(single)[2]["step"] and meta["tokens"] == load_model(single)[2]["tokens"]
    a, b = load_model(single)[0].state_dict(), load_model(final)[0].state_dict()
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=2e-5, rtol=1e-4, msg=name)
    recs = metrics(run_dir_of(final))
    assert recs[-1]["kind"] == "val" and recs[-1]["val_loss"] < recs[0]["val_loss"] - 0.3


# --- preemption: SIGTERM, SIGINT, SIGUSR1 --------------------------------------------------------------

def wait_for_step(run_parent: Path, step: int, proc, timeout=120) -> None:
    def last_step():
        try:
            return max(r["step"] for r in metrics(next(run_parent.glob("run-*"))) if r["kind"] == "train")
        except (StopIteration, FileNotFoundError, ValueError, orjson.JSONDecodeError):
            return 0
    deadline = time.time() + timeout
    while last_step() < step and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    assert proc.poll() is None, "training ended before the signal could be sent"


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """A whole run with dropout on (the RNG states must survive a stop too): its weights' sha256."""
    tmp = tmp_path_factory.mktemp("uninterrupted")
    ini, train_json, val = setup_run(tmp)
    subprocess.run(cli(ini, train_json, val, tmp / "ckpt" / "final.pt", tmp / "log"), cwd=ROOT, check=True)
    return weights_sha256(tmp / "ckpt" / "final.pt")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGUSR1], ids=lambda s: s.name)
def test_stop_signal_checkpoints_the_current_step_exits_75_and_the_resume_is_bitwise_identical(
        tmp_path, sig, uninterrupted):
    ini, train_json, val = setup_run(tmp_path)
    final = tmp_path / "ckpt" / "final.pt"
    proc = subprocess.Popen(cli(ini, train_json, val, final, tmp_path / "stopped.log"), cwd=ROOT)
    wait_for_step(tmp_path / "ckpt", 7, proc)  # between the checkpoints of steps 5 and 10
    sent = time.monotonic()
    proc.send_signal(sig)
    assert proc.wait(timeout=30) == 75
    assert time.monotonic() - sent < 10
    assert not final.exists()
    run_dir = next((tmp_path / "ckpt").glob("run-*"))
    stopped_at = max(r["step"] for r in metrics(run_dir) if r["kind"] == "train")
    assert list_checkpoints(run_dir)[-1].name == f"step_{stopped_at:08d}.pt" and stopped_at % 5 != 0
    log = (tmp_path / "stopped.log").read_text()
    assert f"stopped by {sig.name} after step {stopped_at}" in log and "run the same command again" in log

    subprocess.run(cli(ini, train_json, val, final, tmp_path / "resumed.log"), cwd=ROOT, check=True)
    assert f"from step_{stopped_at:08d}.pt" in (tmp_path / "resumed.log").read_text()
    assert weights_sha256(final) == uninterrupted


def test_sigterm_reaches_every_ddp_rank_through_the_launcher(tmp_path):
    ini, train_json, val = setup_run(tmp_path, P_drop=0.0, nproc_per_node=2)
    final = tmp_path / "ckpt" / "final.pt"
    proc = subprocess.Popen(cli(ini, train_json, val, final, tmp_path / "ddp.log") + ["--threads", "2"], cwd=ROOT)
    wait_for_step(tmp_path / "ckpt", 3, proc)
    proc.send_signal(signal.SIGTERM)  # the launcher only: it passes the signal on through torchrun
    assert proc.wait(timeout=30) == 75
    run_dir = next((tmp_path / "ckpt").glob("run-*"))
    stopped_at = max(r["step"] for r in metrics(run_dir) if r["kind"] == "train")
    assert list_checkpoints(run_dir)[-1].name == f"step_{stopped_at:08d}.pt"
    assert not final.exists()
    subprocess.run(cli(ini, train_json, val, final, tmp_path / "ddp.log") + ["--threads", "2"], cwd=ROOT, check=True)
    assert load_model(final)[2]["step"] > stopped_at


# --- the schedule does not depend on the number of processes --------------------------------------------

def test_one_and_two_processes_follow_the_same_learning_rate_over_the_tokens_seen(tmp_path):
    ini, train_json, val = setup_run(tmp_path, P_drop=0.0, warmup_steps=6, steps_to_attenuate_lr_to_zero=40)
    one = tmp_path / "one" / "final.pt"
    train_here(ini, train_json, val, one)
    ini.write_text(ini.read_text().replace("[train]", "[train]\nnproc_per_node = 2"))
    two = tmp_path / "two" / "final.pt"
    T.launch(ini, train_json, val, two, threads=2, log=tmp_path / "two.log")

    def lr_by_tokens_before(final):
        recs = [r for r in metrics(run_dir_of(final)) if r["kind"] == "train"]
        before = [0] + [r["tokens"] for r in recs[:-1]]
        return dict(zip(before, (r["lr"] for r in recs))), recs[-1]

    lr_one, last_one = lr_by_tokens_before(one)
    lr_two, last_two = lr_by_tokens_before(two)
    assert len(lr_two) < len(lr_one)  # two batches per step: fewer steps
    for tokens, lr in lr_two.items():  # the same rate at the same point of the data
        assert lr == pytest.approx(lr_one[tokens], abs=1e-12)
    assert last_two["batches"] == last_one["batches"] and last_two["tokens"] == last_one["tokens"]
    t = load_settings(ini).train
    one_batch = max(abs(O.lr_at(b, t) - O.lr_at(b - 1, t)) for b in range(1, last_one["batches"] + 1))
    assert abs(last_two["lr"] - last_one["lr"]) <= one_batch  # the same final rate, within one batch's step


# --- init_from ----------------------------------------------------------------------------------------

def test_init_from_a_hugging_face_folder_starts_from_its_weights(tmp_path):
    from model.export import export_model

    ini, train_json, val = setup_run(tmp_path, P_drop=0.0, max_lr="1e-12")  # lr ~ 0: the weights barely move
    arch = load_settings(ini).architecture
    torch.manual_seed(123)
    source = GPT(arch, init_std=0.1)
    export_model(source, arch, tmp_path / "hf")
    ini.write_text(ini.read_text().replace("[train]\n", f"[train]\ninit_from = {tmp_path / 'hf'}\n"))
    final = tmp_path / "final.pt"
    train_here(ini, train_json, val, final, log=tmp_path / "train.log")
    trained, _, _ = load_model(final)
    for name, w in source.state_dict().items():
        torch.testing.assert_close(trained.state_dict()[name], w, atol=1e-6, rtol=0, msg=name)
    assert f"initial weights from {tmp_path / 'hf'}" in (tmp_path / "train.log").read_text()
    assert "init_from_sha256" in orjson.loads((run_dir_of(final) / "config.json").read_bytes())


def test_init_from_another_architecture_is_an_error_naming_both(tmp_path):
    ini, train_json, val = setup_run(tmp_path, P_drop=0.0)
    arch = load_settings(ini).architecture
    other = Architecture(**{**{k: getattr(arch, k) for k in arch.__dataclass_fields__}, "N": arch.N + 1})
    save_model(tmp_path / "other.pt", GPT(other), other)
    ini.write_text(ini.read_text().replace("[train]\n", f"[train]\ninit_from = {tmp_path / 'other.pt'}\n"))
    with pytest.raises(ModelFileError, match=rf"init_from.*N = {arch.N + 1}.*{arch.N}"):
        train_here(ini, train_json, val, tmp_path / "final.pt")
    assert not (tmp_path / "final.pt").exists()


def test_init_from_a_missing_path_is_an_error_naming_the_key(tmp_path):
    ini, train_json, val = setup_run(tmp_path, P_drop=0.0)
    ini.write_text(ini.read_text().replace("[train]\n", f"[train]\ninit_from = {tmp_path / 'nowhere'}\n"))
    with pytest.raises(ModelFileError, match=r"\[train\] init_from = .*nowhere"):
        train_here(ini, train_json, val, tmp_path / "final.pt")


def test_a_stopped_launch_names_the_signal_and_step_in_its_error(tmp_path, monkeypatch):
    """Snakemake deletes train.log before the job runs again; its error message keeps why the last one ended."""
    log = tmp_path / "train.log"

    def trainer(cmd, **kwargs):
        log.write_text("starting run\nstopped by SIGTERM after step 12 (3,456 tokens): checkpoint x written; "
                       "run the same command again to resume from it\n")
        return subprocess.CompletedProcess(cmd, 75)
    monkeypatch.setattr(T.subprocess, "run", trainer)
    with pytest.raises(RuntimeError, match=r"\(exit 75\) \(stopped by SIGTERM after step 12 \(3,456 tokens\)\); "
                                           r"run the same command again to resume; see .*train\.log"):
        T.launch("x.ini", "train.json", "val.arrow", tmp_path / "final.pt", log=log)
