"""The GPU path, where a CUDA GPU is present (skipped elsewhere): the chunked loss, flash attention, fused
AdamW, bfloat16 autocast, torch.compile, a stop and resume, and evaluation, each on the GPU. CI has no GPU;
these run on a GPU machine with `python3 run.py test tests/test_cuda.py` (or plain pytest)."""

from __future__ import annotations

import math
import signal
import subprocess

import pytest
import torch

from model import evaluate as E, loss as L, optim as O
from model.checkpoint import list_checkpoints, load_model
from model.device import resolve_device
from model.gpt import GPT
from pipeline.config import Architecture, Train, load_settings
from tests.test_loss import VOCAB, case, fused_kernel_not_failed, reference  # noqa: F401 (an autouse fixture)
from tests.test_train import ROOT, cli, metrics, run_dir_of, setup_run, wait_for_step

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU on this machine")
CUDA = torch.device("cuda", 0)


@pytest.fixture(autouse=True)
def exact_float32_matmuls():
    """Training turns TF32 on for the process; these comparisons want float32 itself."""
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = before


def on_cuda(h, w, y):
    return (h.detach().to(CUDA).requires_grad_(), w.detach().to(CUDA).requires_grad_(), y.to(CUDA))


@pytest.mark.parametrize("fused", [False, True], ids=["eager", "fused"])
@pytest.mark.parametrize("ignored", [0, 7])
def test_chunked_loss_on_cuda_equals_full_logits_cross_entropy_in_float32(ignored, fused):
    h, w, y = on_cuda(*case(tokens=3000, d=64, ignored=ignored))  # two chunks of 2,048 rows, the last ragged
    chunked = L.linear_cross_entropy(h, w, y, vocab=VOCAB, fused=fused)
    assert not L._fused["failed"]  # fused: the compiled kernel ran
    ref = reference(h, w, y)
    torch.testing.assert_close(chunked, ref, rtol=1e-5, atol=0)
    got = torch.autograd.grad(chunked * 0.37, (h, w))
    want = torch.autograd.grad(ref * 0.37, (h, w))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    assert got[1][VOCAB:].abs().max() == 0


@pytest.mark.parametrize("fused", [False, True], ids=["eager", "fused"])
def test_chunked_loss_under_cuda_bfloat16_autocast_is_within_bfloat16_round_off(fused):
    h, w, y = on_cuda(*case(tokens=3000, d=64))
    with torch.autocast("cuda", dtype=torch.bfloat16):
        chunked = L.linear_cross_entropy(h, w, y, vocab=VOCAB, fused=fused)
    assert not L._fused["failed"]
    exact = reference(h, w, y)
    torch.testing.assert_close(chunked, exact, rtol=1e-2, atol=0)
    got = torch.autograd.grad(chunked, (h, w))
    want = torch.autograd.grad(exact, (h, w))
    for a, b in zip(got, want):
        assert a.dtype == torch.float32 and (a - b).norm() <= 0.02 * b.norm()


def test_attention_runs_on_the_flash_kernel_in_bfloat16():
    from torch.nn.attention import SDPBackend, sdpa_kernel
    assert resolve_device("cuda") == CUDA and not torch.backends.cuda.cudnn_sdp_enabled()
    torch.manual_seed(0)
    gpt = GPT(Architecture(N=2, d_model=128, d_ff=512, h=2, d_k=64, d_v=64, positional_encoding_max_pos=256),
              P_drop=0.0).to(CUDA)
    x = torch.randint(0, 50257, (4, 256), device=CUDA)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        default = gpt.hidden_states(x)
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):  # raises if the model's call cannot use flash
            flash = gpt.hidden_states(x)
            flash.float().square().mean().backward()
    assert torch.equal(flash, default)  # flash is the kernel SDPA picks on its own


def test_adamw_is_fused_on_cuda():
    gpt = GPT(Architecture(N=1, d_model=16, d_ff=32, h=2, d_k=8, d_v=8, positional_encoding_max_pos=16)).to(CUDA)
    assert O.make_optimizer(gpt, Train(), CUDA).defaults["fused"] is True


def test_training_on_cuda_in_auto_dtype_with_compile_lowers_the_loss_then_stops_and_resumes(tmp_path):
    ini, train_json, val = setup_run(tmp_path, P_drop=0.0, device="cuda", dtype="auto", compile="true")
    final = tmp_path / "ckpt" / "final.pt"
    with open(tmp_path / "stderr.txt", "w") as stderr:
        proc = subprocess.Popen(cli(ini, train_json, val, final, tmp_path / "stopped.log"), cwd=ROOT, stderr=stderr)
        wait_for_step(tmp_path / "ckpt", 7, proc, timeout=300)  # the compile comes first
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 75
        run_dir = next((tmp_path / "ckpt").glob("run-*"))
        stopped_at = max(r["step"] for r in metrics(run_dir) if r["kind"] == "train")
        assert list_checkpoints(run_dir)[-1].name == f"step_{stopped_at:08d}.pt"
        subprocess.run(cli(ini, train_json, val, final, tmp_path / "resumed.log"), cwd=ROOT, check=True,
                       timeout=600, stderr=stderr)
    log = (tmp_path / "stopped.log").read_text() + (tmp_path / "resumed.log").read_text()
    assert "torch.compile failed" not in log, log
    assert "fused loss kernel failed" not in (tmp_path / "stderr.txt").read_text()
    assert f"from step_{stopped_at:08d}.pt" in log
    model, _, meta = load_model(final)  # a GPU-trained model loads on a CPU
    assert meta["precision"]["dtype"] == "bfloat16"  # auto on a GPU with bfloat16
    recs = metrics(run_dir_of(final))
    val_losses = [r["val_loss"] for r in recs if r["kind"] == "val"]
    assert val_losses[0] == pytest.approx(math.log(50257), rel=0.01) and val_losses[-1] < val_losses[0] - 1.0
    steps = [(r["kind"], r["step"]) for r in recs]
    assert len(steps) == len(set(steps)) and meta["step"] > stopped_at


def test_evaluation_on_cuda_gives_the_cpus_figures(tmp_path):
    ini, train_json, val = setup_run(tmp_path, P_drop=0.0)
    s = load_settings(ini)
    torch.manual_seed(0)
    model = GPT(s.architecture)
    start = s.train.start_predicting_from_what_token
    cpu = E.overall(E.evaluate_model(model, val, start, torch.device("cpu"), "float32"))
    gpu = E.overall(E.evaluate_model(model.to(CUDA), val, start, CUDA, "float32"))
    assert (gpu.documents, gpu.tokens) == (cpu.documents, cpu.tokens)
    assert gpu.nll == pytest.approx(cpu.nll, rel=1e-5)
    with_bf16 = E.overall(E.evaluate_model(model, val, start, CUDA, "bfloat16"))
    assert with_bf16.nll == pytest.approx(cpu.nll, rel=2e-2)
