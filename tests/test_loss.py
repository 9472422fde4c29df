"""The chunked output layer + cross-entropy (model/loss.py) against F.cross_entropy on the full logits."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from model import loss as L
from model.gpt import GPT
from pipeline.config import Architecture

VOCAB = 1000


def case(tokens=150, d=16, padded=1024, ignored=0, seed=0):
    """Hidden states, a padded output weight (rows past VOCAB are padding) and targets; the first `ignored`
    targets are -100."""
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(tokens, d, generator=g).requires_grad_()
    w = (0.3 * torch.randn(padded, d, generator=g)).requires_grad_()
    y = torch.randint(0, VOCAB, (tokens,), generator=g)
    y[:ignored] = L.IGNORE
    return h, w, y


def reference(h, w, y):
    return F.cross_entropy(h @ w[:VOCAB].t(), y, reduction="sum", ignore_index=L.IGNORE)


@pytest.fixture(autouse=True)
def fused_kernel_not_failed(monkeypatch):
    """Each test starts with the fused kernel allowed (a failure in one test would make the others' `fused`
    cases quietly run the eager path); `L._fused["failed"]` after a call tells whether it really ran."""
    monkeypatch.setitem(L._fused, "failed", False)


@pytest.mark.parametrize("fused", [False, True], ids=["eager", "fused"])
@pytest.mark.parametrize("ignored", [0, 7])
@pytest.mark.parametrize("rows", [16, 64, 1000])  # several chunks with a ragged last one; one chunk
def test_chunked_loss_and_gradients_equal_full_logits_cross_entropy_in_float32(rows, ignored, fused):
    h, w, y = case(ignored=ignored)
    chunked = L.linear_cross_entropy(h, w, y, vocab=VOCAB, rows=rows, fused=fused)
    assert not L._fused["failed"]  # fused asked for: on a CPU in float32 the vocabulary-block path all the same
    ref = reference(h, w, y)
    assert chunked.dtype == torch.float32
    torch.testing.assert_close(chunked, ref, rtol=2e-6, atol=0)
    # an upstream gradient other than 1, as a mean or a grad scaler gives
    got = torch.autograd.grad(chunked * 0.37, (h, w))
    want = torch.autograd.grad(ref * 0.37, (h, w))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert got[1][VOCAB:].abs().max() == 0  # padding rows are never scored
    if ignored:
        assert got[0][:ignored].abs().max() == 0


def test_ignored_targets_change_nothing():
    h, w, y = case(ignored=5)
    y2 = y.clone()
    y2[:5] = -1  # any negative target is ignored
    assert L.linear_cross_entropy(h, w, y, vocab=VOCAB, rows=16).item() == \
        L.linear_cross_entropy(h, w, y2, vocab=VOCAB, rows=16).item()
    h3, w3, y3 = h[5:].detach(), w, y[5:]
    assert L.linear_cross_entropy(h, w, y, vocab=VOCAB, rows=16).item() == pytest.approx(
        L.linear_cross_entropy(h3, w3, y3, vocab=VOCAB, rows=16).item(), rel=1e-6)


@pytest.mark.parametrize("fused", [False, True], ids=["eager", "fused"])
def test_under_bfloat16_autocast_the_loss_is_the_autocast_reference_within_bfloat16_round_off(fused):
    h, w, y = case(tokens=96, d=32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        chunked = L.linear_cross_entropy(h, w, y, vocab=VOCAB, rows=32, fused=fused)
        ref = reference(h, w, y)
    assert not L._fused["failed"]
    exact = reference(h, w, y)
    assert chunked.dtype == torch.float32
    torch.testing.assert_close(chunked, ref.float(), rtol=1e-2, atol=0)
    torch.testing.assert_close(chunked, exact, rtol=1e-2, atol=0)
    got = torch.autograd.grad(chunked, (h, w))
    want = torch.autograd.grad(exact, (h, w))
    assert got[0].dtype == h.dtype and got[1].dtype == w.dtype  # gradients in the parameters' dtype
    for a, b in zip(got, want):
        assert (a - b).norm() <= 0.02 * b.norm()


def test_bfloat16_chunks_converted_a_few_rows_at_a_time_give_what_the_whole_chunk_gives(monkeypatch):
    """On a CPU a bfloat16 chunk's softmax runs BLOCK_ROWS rows at a time, each block's p written back over
    its logits: 7 blocks of 10 rows (the last one ragged, the ignored targets inside the first) against one
    conversion of the whole 64-row chunk, for the loss, both gradients and token_nll_chunked."""
    h, w, y = case(tokens=150, d=32, ignored=13)
    out = {}
    for block in (10, 10**6):
        monkeypatch.setattr(L, "BLOCK_ROWS", block)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = L.linear_cross_entropy(h, w, y, vocab=VOCAB, rows=64)
            nll = L.token_nll_chunked(h, w, y, vocab=VOCAB, rows=64)
        out[block] = (loss, *torch.autograd.grad(loss, (h, w)), nll)
    for a, b in zip(out[10], out[10**6]):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    assert out[10][1][:13].abs().max() == 0 and out[10][3][:13].abs().max() == 0  # ignored: no gradient, 0


def test_a_fused_kernel_that_fails_to_compile_falls_back_to_the_eager_loss_with_one_warning(monkeypatch):
    def broken(*args):
        raise RuntimeError("no C++ compiler")
    monkeypatch.setitem(L._fused, "fn", broken)
    monkeypatch.setitem(L._fused, "failed", False)
    h, w, y = case()
    with torch.autocast("cpu", dtype=torch.bfloat16):  # a CPU's float32 chunks never take the fused kernel
        with pytest.warns(UserWarning, match="fused loss kernel failed to compile .*no C\\+\\+ compiler") as caught:
            fused = L.linear_cross_entropy(h, w, y, vocab=VOCAB, rows=16, fused=True)  # 10 chunks, one warning
        assert L._fused["failed"] and len([w for w in caught if "fused loss" in str(w.message)]) == 1
        eager = L.linear_cross_entropy(h, w, y, vocab=VOCAB, rows=16)
    assert fused.item() == eager.item()
    torch.testing.assert_close(torch.autograd.grad(fused, (h, w)), torch.autograd.grad(eager, (h, w)))


@pytest.mark.parametrize("ignored", [0, 7])
def test_the_fused_kernel_computes_the_eager_chunks_terms_in_float32(ignored):
    """What a GPU runs in float32 when the model is compiled (a CPU's float32 chunks take
    _cpu_float32_chunk instead): p = softmax - onehot, zero on ignored rows; logsumexp; target logit."""
    h, w, y = case(ignored=ignored)
    logits = (h @ w[:VOCAB].t()).detach()
    p, lse, target = L.fused_softmax_terms(logits, y)
    assert not L._fused["failed"]
    ignored_c = (y < 0) if ignored else None
    want = L._chunk(logits.clone(), y, True, ignored_c)
    for a, b in zip((p, lse, target), want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_token_nll_chunked_is_the_per_token_cross_entropy_and_0_at_ignored_targets():
    h, w, y = case(tokens=2 * 75, ignored=3)
    nll = L.token_nll_chunked(h.view(2, 75, -1), w, y.view(2, 75), vocab=VOCAB, rows=16)
    assert nll.shape == (2, 75) and nll.dtype == torch.float32 and not nll.requires_grad
    ref = F.cross_entropy(h @ w[:VOCAB].t(), y, reduction="none", ignore_index=L.IGNORE).view(2, 75)
    torch.testing.assert_close(nll, ref.detach(), rtol=2e-6, atol=1e-6)
    assert nll.view(-1)[:3].tolist() == [0.0, 0.0, 0.0]


def test_no_grad_forward_stores_no_gradients():
    h, w, y = case()
    with torch.no_grad():
        loss = L.linear_cross_entropy(h, w, y, vocab=VOCAB, rows=16)
    assert loss.item() == pytest.approx(reference(h, w, y).item(), rel=2e-6)


def test_chunk_rows_fit_the_device():
    assert L.chunk_rows(torch.device("cpu")) == 256
    assert L.chunk_rows(torch.device("cpu"), torch.bfloat16) == 1024
    assert L.chunk_rows(torch.device("cuda")) == 2048


@pytest.mark.parametrize("block", [100, 4096])  # 10 vocabulary blocks (a target in each); one
def test_cpu_float32_chunks_by_vocabulary_block_give_the_softmax_gradients(monkeypatch, block):
    """_cpu_float32_chunk folds the normalisation into the matmuls (e_b with per-block maxima, rescaled):
    its nll, dL/dh and dL/dW, written over NaN-filled memory (first) and then added to, against autograd."""
    monkeypatch.setattr(L, "VOCAB_BLOCK", block)
    h, w, y = case(ignored=9)
    h, w = h.detach(), w.detach()[:VOCAB]
    ignored = y < 0
    grad_w = torch.full(w.shape, float("nan"))
    nll, grad_h = L._cpu_float32_chunk(h, w, y, ignored, grad_w, first=True)
    hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
    ref = F.cross_entropy(hh @ ww.t(), y, reduction="none", ignore_index=L.IGNORE)
    want_h, want_w = torch.autograd.grad(ref.sum(), (hh, ww))
    torch.testing.assert_close(nll[~ignored], ref[~ignored], rtol=2e-6, atol=2e-6)
    torch.testing.assert_close(grad_h, want_h, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad_w, want_w, rtol=1e-5, atol=1e-6)
    assert grad_h[:9].abs().max() == 0
    L._cpu_float32_chunk(h, w, y, ignored, grad_w, first=False)  # a second chunk adds
    torch.testing.assert_close(grad_w, 2 * want_w, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("tokens", [150, 0])
def test_the_weight_gradient_overwrites_the_memory_it_is_given(tokens):
    """grad_w comes from torch.empty (no 150 MB zero fill for GPT-2): the first chunk must overwrite it, the
    padding rows be zeroed, and no tokens give zeros. The freed NaNs below are what empty() most likely
    hands out next (glibc reuses a freed block of the same size)."""
    h, w, y = case(tokens=tokens)
    for dtype in (torch.float32, torch.bfloat16):
        torch.full(w.shape, float("nan"))  # freed at once
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            grad_w = torch.autograd.grad(L.linear_cross_entropy(h, w, y, vocab=VOCAB, rows=64), w)[0]
            want = torch.autograd.grad(reference(h, w, y), w)[0] if tokens else torch.zeros_like(w)
        assert grad_w.isfinite().all() and grad_w[VOCAB:].abs().max() == 0
        assert (grad_w - want).norm() <= (0.02 if dtype == torch.bfloat16 else 1e-5) * want.norm()


TINY = Architecture(N=2, d_model=16, d_ff=32, h=2, d_k=8, d_v=8, positional_encoding_max_pos=24)


class FullLogits(torch.nn.Module):
    """The textbook objective: the whole logit matrix, then F.cross_entropy."""

    def __init__(self, gpt):
        super().__init__()
        self.gpt = gpt

    def forward(self, x, y, start):
        logits = self.gpt(x)[:, start:]
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y[:, start:].reshape(-1), reduction="sum")


def test_training_with_the_chunked_loss_gives_the_full_logits_weights_within_float32_round_off():
    weights = []
    for objective in (L.LossModel, FullLogits):
        torch.manual_seed(0)
        gpt = GPT(TINY, P_drop=0.0)
        model = objective(gpt)
        initial = {k: v.clone() for k, v in gpt.state_dict().items()}
        # SGD: Adam divides by sqrt(v), which blows a near-zero gradient's round-off up to a whole step
        opt = torch.optim.SGD(gpt.parameters(), lr=1.0)
        g = torch.Generator().manual_seed(1)
        for _ in range(4):
            x = torch.randint(0, 50257, (3, 20), generator=g)
            y = torch.randint(0, 50257, (3, 20), generator=g)
            loss = model(x, y, 4) / (3 * 16)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        weights.append({k: v.clone() for k, v in gpt.state_dict().items()})
    for k in weights[0]:
        torch.testing.assert_close(weights[0][k], weights[1][k], rtol=1e-4, atol=1e-5)
    assert not torch.equal(weights[0]["transformer.wte.weight"], initial["transformer.wte.weight"])
