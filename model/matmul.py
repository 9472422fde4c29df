"""Float32 matmuls on a CPU through oneDNN, where torch's own go through MKL.

torch multiplies float32 matrices on a CPU with MKL's sgemm. oneDNN (bundled with torch, which uses it for
bfloat16 and for inference-time fusions) multiplies the same float32 matrices, in float32, faster on the AMD
CPU we measured: GPT-2 small's layer shapes ran 1.04-1.08x faster forward and 1.05-1.08x for the input
gradient, the loss's (4,096 x 768) x (768 x 256) logit blocks 1.12-1.15x (AMD EPYC Zen 4, 2 cores, interleaved
medians), and GPT-2 small's whole step 1.07x compiled, 1.10x eager (bench/train.py's project-mkl); on an Intel
Xeon it was the slower (see ENABLED). It is only faster with a contiguous left operand (a transposed one is
copied first, and loses), so it takes the products whose left operand is contiguous: a linear layer's forward
x W^T + b and input gradient g W, not its weight gradient g^T x (MKL's, as before).

It is used on AMD CPUs (ENABLED), and on those without AVX-512 only for the loss's products (LAYERS). Where
oneDNN is missing (a torch built without it), on other devices, under autocast and in other dtypes, everything
here is torch's own F.linear / matmul: the same values up to float32 round-off.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from model.device import cpuinfo


def _available() -> bool:
    try:
        return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
    except (AttributeError, RuntimeError):
        return False


def _avx512() -> bool:
    try:
        return torch.backends.cpu.get_cpu_capability().startswith("AVX512")
    except (AttributeError, RuntimeError):
        return False


# On AMD CPUs only, where it was measured to pay (above). On an Intel Xeon with AMX (KVM, 2 cores, AVX-512) MKL,
# Intel's own, was the faster: a large float32 matmul 372-376 against oneDNN's 345-364 GFLOP/s, and GPT-2
# small's eager step 328 against 304 tok/s with oneDNN (bench/train.py's project-mkl, 2026-12-06).
# False: MKL everywhere (the bench's project-mkl, and a way out should a oneDNN build misbehave).
ENABLED = cpuinfo().get("vendor_id") == "AuthenticAMD"
# The linear layers too, where that was measured to pay: CPUs with AVX-512. Under emulated AVX2
# (ATEN_CPU_CAPABILITY=avx2, ONEDNN_MAX_CPU_ISA=AVX2 on the same EPYC) oneDNN's input gradient g W, its weight
# read transposed, ran 0.72-0.89x MKL's, the small layers of the default model 0.81-0.96x, and GPT-2 small's
# step 0.94x eager; the loss's products still won there (1.09-1.30x), so the loss keeps them on AMD CPUs of
# both kinds.
LAYERS = _avx512()
AVAILABLE = _available()


def use_onednn(*tensors: torch.Tensor) -> bool:
    """True where x @ w^T should go to oneDNN: CPU float32 tensors, no autocast, oneDNN in this torch."""
    return (ENABLED and AVAILABLE and all(t.device.type == "cpu" and t.dtype == torch.float32 for t in tensors)
            and not torch.is_autocast_enabled("cpu"))


@torch.library.custom_op("pile_gpt::onednn_mm_nt", mutates_args=())
def _onednn_mm_nt(a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    # an op of its own, opaque to torch.compile: inductor's lowering of _linear_pointwise is for inference
    # graphs with constant weights, and failed on a training graph (LoweringException)
    return torch.ops.mkldnn._linear_pointwise(a.contiguous(), b, bias, "none", [], "")


@_onednn_mm_nt.register_fake
def _(a, b, bias):
    return a.new_empty(a.shape[0], b.shape[0])


def mm_nt(a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """a @ b.T (+ bias) for a (M, K) and b (N, K): oneDNN where use_onednn, else torch's addmm/mm. No autograd
    (the loss makes its gradients itself); b may be a transposed view (oneDNN reads it in place), a is made
    contiguous."""
    if use_onednn(a, b):
        return _onednn_mm_nt(a, b, bias)
    return torch.addmm(bias, a, b.t()) if bias is not None else a @ b.t()


class _LinearFunction(torch.autograd.Function):
    """y = x W^T + b for 2-D x (`linear` has chosen oneDNN): forward and input gradient through oneDNN, weight
    gradient g^T x through torch."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return _onednn_mm_nt(x, weight, bias)

    @staticmethod
    def backward(ctx, g):
        x, weight = ctx.saved_tensors
        # g W: W^T's transpose, read in place; g made contiguous inside the op
        grad_x = _onednn_mm_nt(g, weight.t(), None) if ctx.needs_input_grad[0] else None
        grad_w = g.t() @ x if ctx.needs_input_grad[1] else None
        grad_b = g.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return grad_x, grad_w, grad_b


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(x, weight, bias), through oneDNN on a CPU in float32 (see the module), for x of any rank."""
    if not (LAYERS and use_onednn(x, weight, *(() if bias is None else (bias,)))):
        return F.linear(x, weight, bias)
    y = _LinearFunction.apply(x.reshape(-1, x.shape[-1]), weight, bias)
    return y.view(*x.shape[:-1], weight.shape[0])


class Linear(nn.Linear):
    """nn.Linear (same parameters, same state_dict) whose forward is `linear` above."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)
