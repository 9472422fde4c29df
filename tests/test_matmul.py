"""model/matmul.py: oneDNN's float32 matmuls give torch's values and gradients, and stand aside where they
do not apply."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from model import loss as L, matmul as M
from model.device import cpuinfo
from model.gpt import GPT
from pipeline.config import Architecture

ROOT = Path(__file__).resolve().parents[1]
needs_onednn = pytest.mark.skipif(not M.AVAILABLE, reason="this torch has no oneDNN")


@pytest.fixture(autouse=True)
def onednn_on(monkeypatch):
    """Each test starts with the oneDNN path on, the layers' too, also on a CPU without AVX-512 (where the
    layers keep MKL by default)."""
    monkeypatch.setattr(M, "ENABLED", True)
    monkeypatch.setattr(M, "LAYERS", True)


@pytest.mark.parametrize("capability", ["native", "avx2"])
def test_onednn_is_on_by_default_on_amd_cpus_and_its_layers_with_avx512_only(capability):
    """A new process decides from the CPU's vendor (oneDNN on AMD, MKL on Intel and others) and torch's CPU
    capability: the layers on oneDNN with AVX-512, on MKL on an AVX2-only CPU (emulated here as the bench does,
    with ATEN_CPU_CAPABILITY); the loss's products on AMD CPUs of both kinds."""
    env = {k: v for k, v in os.environ.items() if k != "ATEN_CPU_CAPABILITY"}
    if capability == "avx2":
        env["ATEN_CPU_CAPABILITY"] = "avx2"
    out = subprocess.run([sys.executable, "-c", "import torch, model.matmul as M; "
                          "print(torch.backends.cpu.get_cpu_capability(), M.LAYERS, M.ENABLED)"],
                         cwd=ROOT, env=env, capture_output=True, text=True, check=True).stdout.split()
    amd = cpuinfo().get("vendor_id") == "AuthenticAMD"
    assert out[1:] == [str(out[0].startswith("AVX512")), str(amd)]
    if capability == "avx2":
        assert out == ["AVX2", "False", str(amd)]


def test_cpuinfo_reads_the_first_cpus_fields(tmp_path):
    f = tmp_path / "cpuinfo"
    f.write_text("processor\t: 0\nvendor_id\t: AuthenticAMD\nmodel name\t: AMD EPYC 9R14\nflags\t\t: fpu avx2\n\n"
                 "processor\t: 1\nvendor_id\t: GenuineIntel\n")
    assert cpuinfo(str(f)) == {"processor": "0", "vendor_id": "AuthenticAMD", "model name": "AMD EPYC 9R14",
                               "flags": "fpu avx2"}
    assert cpuinfo(str(tmp_path / "missing")) == {}


@pytest.fixture
def calls(monkeypatch):
    """How many products went to oneDNN."""
    n = {"onednn": 0}
    real = M._onednn_mm_nt

    def counting(a, b, bias):
        n["onednn"] += 1
        return real(a, b, bias)
    monkeypatch.setattr(M, "_onednn_mm_nt", counting)
    return n


def float64_reference(x, w, b, g):
    xd, wd = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    bd = None if b is None else b.detach().double().requires_grad_()
    y = F.linear(xd, wd, bd)
    grads = torch.autograd.grad(y, [t for t in (xd, wd, bd) if t is not None], g.double())
    return y, grads


@needs_onednn
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(300, 96), (3, 70, 96)], ids=["2d", "3d"])
def test_linear_equals_f_linear_values_and_gradients_in_float32(calls, shape, bias):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(*shape, generator=g).requires_grad_()
    w = torch.randn(200, 96, generator=g).requires_grad_()
    b = torch.randn(200, generator=g).requires_grad_() if bias else None
    y = M.linear(x, w, b)
    up = torch.randn(y.shape, generator=g)
    got = torch.autograd.grad(y, [t for t in (x, w, b) if t is not None], up)
    assert calls["onednn"] == 2  # the forward and the input gradient; the weight gradient is torch's
    want_y, want = float64_reference(x, w, b, up)
    assert y.shape == want_y.shape and y.dtype == torch.float32
    torch.testing.assert_close(y.double(), want_y, rtol=1e-5, atol=1e-5)
    for a, r in zip(got, want):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a.double(), r, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(y, F.linear(x, w, b), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case", ["disabled", "layers off", "float64", "bfloat16 autocast", "unavailable"])
def test_linear_is_f_linear_where_onednn_does_not_apply(calls, monkeypatch, case):
    x, w, b = torch.randn(20, 8), torch.randn(5, 8), torch.randn(5)
    if case == "disabled":
        monkeypatch.setattr(M, "ENABLED", False)
    if case == "layers off":
        monkeypatch.setattr(M, "LAYERS", False)
    if case == "unavailable":
        monkeypatch.setattr(M, "AVAILABLE", False)
    if case == "float64":
        x, w, b = x.double(), w.double(), b.double()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=case == "bfloat16 autocast"):
        y = M.linear(x, w, b)
        want = F.linear(x, w, b)
    assert calls["onednn"] == 0
    assert y.dtype == want.dtype
    torch.testing.assert_close(y, want, rtol=0, atol=0)


@needs_onednn
def test_gpt_training_step_gives_the_same_loss_and_gradients_with_and_without_onednn(monkeypatch, calls):
    """The model's linear layers and the chunked loss, oneDNN against MKL: equal within float32 round-off."""
    arch = Architecture(N=2, d_model=64, d_ff=256, h=4, d_k=16, d_v=16, positional_encoding_max_pos=40)
    x = torch.randint(0, 50257, (3, 40), generator=torch.Generator().manual_seed(1))
    y = torch.roll(x, -1, dims=1)

    def loss_and_grads():
        torch.manual_seed(0)
        model = L.LossModel(GPT(arch))
        nll = model(x, y, 0)
        nll.backward()
        return nll.detach(), {n: p.grad for n, p in model.named_parameters()}

    with_onednn = loss_and_grads()
    assert calls["onednn"] > 0
    monkeypatch.setattr(M, "ENABLED", False)
    without = loss_and_grads()
    torch.testing.assert_close(with_onednn[0], without[0], rtol=1e-6, atol=0)
    for name, grad in without[1].items():
        # against each tensor's largest entry: a bias's gradient is a sum over tokens that nearly cancels
        err = (with_onednn[1][name] - grad).abs().max() / grad.abs().max()
        assert err < 1e-5, (name, float(err))


@needs_onednn
@pytest.mark.skipif(not (shutil.which("g++") or shutil.which("c++")), reason="torch.compile on a CPU needs a C++ compiler")
def test_linear_compiles_in_one_graph_forward_and_backward():
    """torch.compile takes the oneDNN product as an opaque op (inductor's own lowering of it failed on
    training graphs): no graph break, the op run forward and backward, the same values and gradients as eager."""
    torch._dynamo.reset()
    lin = M.Linear(32, 48)
    x = torch.randn(64, 32, requires_grad=True)
    compiled = torch.compile(lambda t: F.gelu(lin(t)).sum(), fullgraph=True)
    compiled(x)  # the compile, outside the profile
    with torch.profiler.profile() as prof:
        got = compiled(x)
        got_grads = torch.autograd.grad(got, (x, lin.weight, lin.bias))
    ran = [e.key for e in prof.key_averages() if "onednn_mm_nt" in e.key]
    assert ran and sum(e.count for e in prof.key_averages() if e.key in ran) >= 2, ran
    want = F.gelu(F.linear(x, lin.weight, lin.bias)).sum()
    want_grads = torch.autograd.grad(want, (x, lin.weight, lin.bias))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for a, b in zip(got_grads, want_grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
