"""The training objective: inputs and targets of a batch, and the cross-entropy of GPT-2's output layer,
computed without ever holding the whole (tokens x 50,257) logit matrix.

    x = [<|endoftext|>] + doc      y = doc + [<|endoftext|>]      loss = sum_i -log softmax(h_i W^T)[y_i]

positions i < start (`start_predicting_from_what_token`) are context only: neither scored nor given logits.

The logits of a batch are 412 MB in float32 for 2,048 tokens; autograd's `F.cross_entropy(h @ W.T)` keeps them
(and its softmax) for the backward pass and streams them through memory about ten times. Here they exist
only `rows` tokens at a time: for each chunk of tokens

    z = h_c W^T (float32)   lse = logsumexp(z)   loss += lse - z[y]   p = softmax(z) - onehot(y)
    dL/dh_c = p W           dL/dW += p^T h_c

so the gradients are made in the forward pass, while the chunk's logits exist (the Liger-kernel trick:
the loss is the last node of the graph, so its backward only scales them by the incoming gradient). Nothing
of size tokens x vocabulary is stored or recomputed: three matmuls, as autograd's, and tokens x d_model
extra memory. On a CPU in float32 each chunk is also split by vocabulary (_cpu_float32_chunk): its logits
are made and exponentiated a cache-sized block at a time, with the normalisation folded into the gradient
matmuls, so they go through memory twice instead of about eight times.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch
import torch.nn as nn

from pipeline.config import EOT, VOCAB_SIZE

from model.gpt import GPT
from model.matmul import mm_nt

IGNORE = -100  # a target < 0 (F.cross_entropy's ignore_index) is not scored and gets no gradient


def inputs_and_targets(tokens: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch (n, L) of `[<|endoftext|>] + doc` rows -> input = the rows, target = `doc + [<|endoftext|>]`."""
    x = torch.from_numpy(tokens.astype(np.int64))
    y = torch.cat([x[:, 1:], torch.full((x.shape[0], 1), EOT, dtype=torch.int64)], dim=1)
    return x, y


def predicted_positions(seq_len: int, start: int) -> int:
    return max(seq_len - start, 0)


def chunk_rows(device: torch.device, dtype: torch.dtype = torch.float32) -> int:
    """Tokens per chunk. On a CPU in float32 (vocabulary blocks, see _cpu_float32_chunk) 256 rows: the
    default model's training step ran 5,133 tok/s against 5,092 with 512 and 4,673 with 128 (EPYC, 2 cores,
    interleaved); for d_model 768 from 256 rows up the matmuls run near full speed. In bfloat16 oneDNN
    repacks the whole weight for every matmul call, so fewer, longer chunks pay: 1,024 rows ran 2.4x faster
    than 64 (and 1.4x autograd's full-logits loss). On a GPU 2,048 rows (400 MB of float32 logits) keep the
    matmuls at full speed and stay small beside the activations."""
    if device.type != "cpu":
        return 2048
    if dtype != torch.float32:
        return 1024
    return 256


def _compute_dtype(device: torch.device, dtype: torch.dtype) -> torch.dtype:
    """The matmul dtype: autocast's where it is on (as autograd's loss would run), else the input's."""
    return torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else dtype


LOG2E = 1.4426950408889634
BLOCK_ROWS = 32  # a CPU bfloat16 chunk's rows converted to float32 at a time: 6 MB, so they stay in the cache


def _chunk(logits, y_c, probs: bool = False, ignored_c=None):
    """A chunk's (softmax - onehot(y) where probs, zeroed on the rows ignored_c, in the logits' dtype, else
    None; logsumexp; the target logit), float32, eagerly.

    bfloat16/float16 logits on a CPU go BLOCK_ROWS at a time, each block's p written back over its logits:
    converted whole, the float32 copy of a 1,024-row chunk is 206 MB, and each of the six passes below
    would stream it through memory (the softmax took 65 ms a chunk against 39 ms blocked, d_model 64, EPYC)."""
    if logits.dtype == torch.float32 or logits.device.type != "cpu":
        return _softmax_terms_eager(logits.float(), y_c, probs, ignored_c, logits.dtype)
    n = len(y_c)
    lse = torch.empty(n, dtype=torch.float32)
    target = torch.empty(n, dtype=torch.float32)
    for a in range(0, n, BLOCK_ROWS):
        b = slice(a, a + BLOCK_ROWS)
        p, lse[b], target[b] = _softmax_terms_eager(logits[b].float(), y_c[b], probs,
                                                    None if ignored_c is None else ignored_c[b])
        if probs:
            logits[b] = p
    return (logits if probs else None), lse, target


def _softmax_terms_eager(z, y_c, probs, ignored_c, dtype=torch.float32):
    """_chunk's work on float32 logits z, in z's one buffer (overwritten): one exp per logit (torch.logsumexp
    and a softmax after it would take two)."""
    target = z.gather(1, y_c.clamp(min=0)[:, None])[:, 0]  # an ignored target reads class 0; masked later
    m = z.amax(dim=1)
    z.sub_(m[:, None])
    # on a CPU exp(z - m) as 2^((z - m) log2 e): torch's exp2 kernel ran 2.9x its exp (1.9x under AVX2), the
    # default model's step 1.05x (float32) and 1.09x (bfloat16) faster, at float32 round-off (7e-6 relative);
    # on a GPU both are memory-bound and the multiply would be one more pass
    e = z.mul_(LOG2E).exp2_() if z.device.type == "cpu" else z.exp_()
    s = e.sum(dim=1)
    lse = m + s.log()
    if not probs:
        return None, lse, target
    p = e.mul_(s.reciprocal()[:, None])  # softmax, in place: the chunk's only tokens x vocab buffer
    p[torch.arange(len(y_c), device=p.device), y_c.clamp(min=0)] -= 1.0
    if ignored_c is not None:
        p.masked_fill_(ignored_c[:, None], 0.0)
    return p.to(dtype), lse, target


VOCAB_BLOCK = 4096  # CPU float32: vocabulary entries per block of logits (4 MB for 256 tokens: in the cache)


def _cpu_float32_chunk(h_c, w, y_c, ignored_c=None, grad_w=None, first=True):
    """A chunk's nll (R,) on a CPU in float32 and, given grad_w, dL/dh_c (R, d) with dL/dW added into grad_w
    (written over where first): the logits made one block of VOCAB_BLOCK vocabulary rows at a time and used
    while the block is in the cache.

    Block b of W gives the logits z_b = h W_b^T (R x block), their row maxima m_b, e_b = exp(z_b - m_b) in
    place, s_b = sum e_b and e_b W_b. With M = max_b m_b, S = sum_b exp(m_b - M) s_b and
    c_b = exp(m_b - M) / S (flash attention's rescaling):

        lse = M + log S      dL/dh = sum_b c_b (e_b W_b) - W[y]      dL/dW_b = e_b^T (c_b h) - onehot(y)_b^T h

    the last in a second pass that reads each e_b once. The logits are written once and read once, where
    normalising the whole chunk's softmax in memory streamed them eight times: d_model 64's loss ran 1.25x
    faster (EPYC, 2 cores; the same at d_model 768, whose matmuls are nearly all of it).

    The first two products have contiguous left operands, so they go to oneDNN (model/matmul.py): GPT-2
    small's loss, forward and backward, ran at 188 GFLOP/s against 158 with MKL in the former (V, R) layout
    (2,020 tokens, EPYC Zen 4, 2 cores, interleaved medians; the (R, V) layout alone, with MKL, 158)."""
    V, R = w.shape[0], h_c.shape[0]
    y = y_c.clamp(min=0)  # an ignored target reads class 0; masked below and by the caller
    target = torch.empty(R, dtype=torch.float32)
    m, s, e_w, es = [], [], [], []
    for v in range(0, V, VOCAB_BLOCK):
        w_b = w[v:v + VOCAB_BLOCK]
        z_b = mm_nt(h_c, w_b)  # (R, block)
        here = (y >= v) & (y < v + z_b.shape[1])
        target = torch.where(here, z_b.gather(1, (y - v).clamp(0, z_b.shape[1] - 1)[:, None])[:, 0], target)
        m_b = z_b.amax(dim=1)
        e_b = z_b.sub_(m_b[:, None]).mul_(LOG2E).exp2_()  # exp as exp2: see _softmax_terms_eager
        s.append(e_b.sum(dim=1))
        m.append(m_b)
        es.append(e_b)
        if grad_w is not None:
            e_w.append(mm_nt(e_b, w_b.t()))  # e_b W_b
    m, s = torch.stack(m), torch.stack(s)
    M = m.amax(dim=0)
    c = (m - M).mul_(LOG2E).exp2_()  # (blocks, R)
    S = (c * s).sum(dim=0)
    nll = M + S.log() - target
    if grad_w is None:
        return nll, None
    scored = None if ignored_c is None else ~ignored_c
    c.mul_(S.reciprocal() if scored is None else S.reciprocal() * scored)  # an ignored row: no gradient
    grad_h = torch.einsum("br,brd->rd", c, torch.stack(e_w))
    grad_h.sub_(w[y] if scored is None else w[y] * scored[:, None])
    for i, v in enumerate(range(0, V, VOCAB_BLOCK)):
        g = grad_w[v:v + VOCAB_BLOCK]
        g.addmm_(es[i].t(), h_c * c[i][:, None], beta=0.0 if first else 1.0)
    grad_w.index_add_(0, y if scored is None else y[scored], h_c if scored is None else h_c[scored], alpha=-1.0)
    return nll, grad_h


def _softmax_terms(logits, y):
    """(softmax - onehot(y), zeroed where y < 0, in the logits' dtype; logsumexp; the target logit) of a
    chunk's logits, as one expression for torch.compile: it becomes two passes over the logits (a row's max
    and sum of exps, then p) where the eager _chunk takes six, which on a GPU are most of the loss's time."""
    z = logits.float()
    m = z.amax(dim=1, keepdim=True)
    e = torch.exp(z - m)
    s = e.sum(dim=1, keepdim=True)
    target = z.gather(1, y.clamp(min=0)[:, None])[:, 0]
    onehot = torch.arange(z.shape[1], device=z.device)[None, :] == y[:, None]  # y < 0 matches no column
    p = (e / s - onehot.float()).masked_fill((y < 0)[:, None], 0.0)
    return p.to(logits.dtype), (m + s.log())[:, 0], target


_fused = {"fn": None, "failed": False}


def compile_error(e: BaseException) -> str:
    """What a torch.compile failure says, in one line (inductor's messages run to pages). Dynamo's
    BackendCompilerFailed says only "backend='inductor' raised:" on its first line: name the error it wraps."""
    name, inner = type(e).__name__, getattr(e, "inner_exception", None)
    if isinstance(inner, BaseException):
        name, e = f"{name}: {type(inner).__name__}", inner
    return f"{name}: {(str(e).strip().splitlines() or [''])[0][:300]}"


def fused_softmax_terms(logits, y):
    """_softmax_terms compiled (once, for any chunk shape), or None where compiling fails (no C++ compiler
    for the CPU backend, say): then the eager path runs, after one warning. Used on GPUs and for a CPU's
    bfloat16 (a CPU's float32 chunks take _cpu_float32_chunk, faster than it). In float32 it holds p beside
    the logits (the eager path reuses the logits' buffer): one more chunk of tokens x vocab."""
    if _fused["failed"]:
        return None
    if _fused["fn"] is None:
        # not fullgraph: past dynamo's recompile limit (dtypes, a 1-row last chunk) it runs eagerly, no error
        _fused["fn"] = torch.compile(_softmax_terms, dynamic=True)
    try:
        return _fused["fn"](logits, y)
    except torch.OutOfMemoryError:
        raise  # not a compiler failure
    except Exception as e:  # noqa: BLE001 (any compiler failure: the eager path computes the same)
        warnings.warn(f"the fused loss kernel failed to compile ({compile_error(e)}); using the eager one",
                      stacklevel=2)
        _fused["failed"] = True
        return None


class LinearCrossEntropy(torch.autograd.Function):
    """sum_i -log softmax(h_i W[:vocab]^T)[y_i] over the rows i with y_i >= 0, chunk by chunk (see the module).

    h (T, d), weight (V', d) with V' >= vocab (rows past vocab: padding, never scored; their gradient is 0),
    y (T,). Gradients come back in h's and weight's dtypes; the loss is float32."""

    @staticmethod
    @torch.compiler.disable  # a Python loop over chunks: torch.compile graphs the model around it
    def forward(ctx, h, weight, y, vocab, rows, fused=False):
        device = h.device
        dtype = _compute_dtype(device, h.dtype)
        need_grad = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        with torch.autocast(device.type, enabled=False):
            w = weight[:vocab].to(dtype)
            hd = h.to(dtype)
            loss = torch.zeros((), dtype=torch.float32, device=device)
            grad_h = torch.empty(h.shape, dtype=torch.float32, device=device) if need_grad else None
            grad_w = None
            if need_grad:  # the first chunk overwrites the rows < vocab: no 150 MB zero fill (GPT-2) before it
                grad_w = torch.empty(weight.shape, dtype=torch.float32, device=device)
                (grad_w[vocab:] if h.shape[0] else grad_w).zero_()
            ignored = y < 0
            any_ignored = bool(ignored.any())
            by_vocabulary = device.type == "cpu" and dtype == torch.float32  # fused or not: it beat the kernel
            for a in range(0, h.shape[0], rows):
                h_c, y_c = hd[a:a + rows], y[a:a + rows]
                ignored_c = ignored[a:a + rows] if any_ignored else None
                if by_vocabulary:  # its gradients made inside, dL/dW added into grad_w
                    nll, g_h = _cpu_float32_chunk(h_c, w, y_c, ignored_c, grad_w[:vocab] if need_grad else None,
                                                  first=a == 0)
                else:
                    logits = h_c @ w.t()
                    terms = fused_softmax_terms(logits, y_c) if (fused and need_grad) else None
                    p, lse, target = terms if terms is not None else _chunk(logits, y_c, need_grad, ignored_c)
                    nll = lse - target
                if ignored_c is not None:
                    nll = nll.masked_fill(ignored_c, 0.0)
                loss += nll.sum()
                if not need_grad:
                    continue
                if by_vocabulary:
                    grad_h[a:a + rows] = g_h
                    continue
                grad_h[a:a + rows] = p @ w
                if dtype == torch.float32:  # beta 0: the first chunk ignores what empty() left there
                    grad_w[:vocab].addmm_(p.t(), h_c, beta=1.0 if a else 0.0)
                elif a:  # a bfloat16/float16 matmul, accumulated over the chunks in float32
                    grad_w[:vocab].add_(p.t() @ h_c)
                else:
                    grad_w[:vocab].copy_(p.t() @ h_c)
        ctx.save_for_backward(grad_h, grad_w)
        ctx.dtypes = (h.dtype, weight.dtype)
        return loss

    @staticmethod
    def backward(ctx, grad):
        grad_h, grad_w = ctx.saved_tensors
        # d(grad * loss)/dh = grad * dloss/dh: the forward's gradients, scaled in place (no logits recomputed;
        # the graph is not meant to be walked twice, as after every training loss)
        return grad_h.mul_(grad).to(ctx.dtypes[0]), grad_w.mul_(grad).to(ctx.dtypes[1]), None, None, None, None


def linear_cross_entropy(h: torch.Tensor, weight: torch.Tensor, y: torch.Tensor, vocab: int = VOCAB_SIZE,
                         rows: int | None = None, fused: bool = False) -> torch.Tensor:
    """Summed cross-entropy of logits h @ weight[:vocab].T (h (..., d), y (...) with -100 = not scored),
    without the logit matrix; in autocast's dtype where it is on. Equals
    F.cross_entropy((h @ weight[:vocab].T).flatten(0, -2), y.flatten(), reduction="sum").
    fused: each chunk's softmax work as one compiled kernel (torch.compile), as a compiled model runs it."""
    h = h.reshape(-1, h.shape[-1])
    rows = rows or chunk_rows(h.device, _compute_dtype(h.device, h.dtype))
    return LinearCrossEntropy.apply(h, weight, y.reshape(-1), vocab, rows, fused)


@torch.no_grad()
def token_nll_chunked(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                      vocab: int = VOCAB_SIZE, rows: int | None = None) -> torch.Tensor:
    """Per-token negative log-likelihood -log softmax(hidden @ weight[:vocab].T)[targets], float32, of
    targets' shape (0 where a target is < 0), without the (tokens x vocab) logits: for evaluation.

    hidden (..., d): GPT.hidden_states; weight: the output layer's (gpt.lm_head.weight; padded rows past
    vocab are left out); in autocast's dtype where autocast is on, as the model's logits would be."""
    h = hidden.reshape(-1, hidden.shape[-1])
    y = targets.reshape(-1)
    dtype = _compute_dtype(h.device, h.dtype)
    rows = rows or chunk_rows(h.device, dtype)
    out = torch.empty(y.shape, dtype=torch.float32, device=h.device)
    with torch.autocast(h.device.type, enabled=False):
        w = weight[:vocab].to(dtype)
        hd = h.to(dtype)
        for a in range(0, h.shape[0], rows):
            if h.device.type == "cpu" and dtype == torch.float32:
                out[a:a + rows] = _cpu_float32_chunk(hd[a:a + rows], w, y[a:a + rows])[0]
                continue
            _, lse, target = _chunk(hd[a:a + rows] @ w.t(), y[a:a + rows])
            out[a:a + rows] = lse - target
    return out.masked_fill_(y < 0, 0.0).view(targets.shape)


class LossModel(nn.Module):
    """GPT plus its loss, in one forward (what DDP and torch.compile wrap): the summed negative
    log-likelihood of the targets at positions >= start (the loss ignores the first `start` positions)."""

    def __init__(self, gpt: GPT, fused_loss: bool = False):
        super().__init__()
        self.gpt = gpt
        self.fused_loss = fused_loss  # the loss's softmax as a compiled kernel (with a compiled model)

    def forward(self, x: torch.Tensor, y: torch.Tensor, start: int) -> torch.Tensor:
        h = self.gpt.hidden_states(x)[:, start:]          # no logits for positions the loss ignores
        return linear_cross_entropy(h, self.gpt.lm_head.weight, y[:, start:], fused=self.fused_loss)
