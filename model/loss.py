"""The training objective: inputs and targets of a batch, and the summed cross-entropy of GPT-2's output
layer, computed without ever holding the whole (tokens x 50,257) logit matrix when that is what costs.

    x = [<|endoftext|>] + doc      y = doc + [<|endoftext|>]      loss = sum_i -log softmax(h_i W^T)[y_i]

positions i < start (`start_predicting_from_what_token`) are context only: neither scored nor given logits.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from pipeline.config import EOT, VOCAB_SIZE

from model.gpt import GPT


def inputs_and_targets(tokens: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch (n, L) of `[<|endoftext|>] + doc` rows -> input = the rows, target = `doc + [<|endoftext|>]`."""
    x = torch.from_numpy(tokens.astype(np.int64))
    y = torch.cat([x[:, 1:], torch.full((x.shape[0], 1), EOT, dtype=torch.int64)], dim=1)
    return x, y


def predicted_positions(seq_len: int, start: int) -> int:
    return max(seq_len - start, 0)


class LinearCrossEntropy(torch.autograd.Function):
    """sum_i -log softmax(h_i W^T)[y_i] with a hand-written backward, for the CPU.

    The (tokens x 50,257) logits are made ROWS rows at a time and turned into probabilities while they are in
    cache; only the probabilities (in h's dtype) go to memory, saved for the backward pass, which is
    (softmax - onehot(y)) @ W and its transpose @ h. Autograd's log_softmax + nll_loss make about ten passes
    over the whole logits matrix in memory, which dominated a small model's training step.
    """

    ROWS = 64

    @staticmethod
    def forward(ctx, h, w, y):
        keep = any(ctx.needs_input_grad)  # no backward (validation): no probabilities to keep
        probs = torch.empty(h.shape[0] if keep else 0, w.shape[0], dtype=h.dtype, device=h.device)
        loss = torch.zeros((), dtype=torch.float32, device=h.device)
        for a in range(0, h.shape[0], LinearCrossEntropy.ROWS):
            z = (h[a:a + LinearCrossEntropy.ROWS] @ w.t()).float()
            target_logit = z.gather(1, y[a:a + LinearCrossEntropy.ROWS, None])
            m = z.amax(dim=1, keepdim=True)
            z = z.sub_(m).exp_()
            s = z.sum(dim=1, keepdim=True)
            loss += (s.log() + m - target_logit).sum()
            if keep:
                probs[a:a + LinearCrossEntropy.ROWS] = z.div_(s)
        ctx.save_for_backward(h, w, y, probs)
        return loss

    @staticmethod
    def backward(ctx, grad):
        h, w, y, probs = ctx.saved_tensors
        probs[torch.arange(len(y), device=y.device), y] -= 1.0  # softmax - onehot, in place (used once)
        grad = grad.to(h.dtype)
        return (probs @ w) * grad, (probs.t() @ h) * grad, None


class LossModel(nn.Module):
    """GPT plus its loss, in one forward (what DDP and torch.compile wrap): the summed negative
    log-likelihood of the targets at positions >= start (the loss ignores the first `start` positions)."""

    def __init__(self, gpt: GPT):
        super().__init__()
        self.gpt = gpt

    def forward(self, x: torch.Tensor, y: torch.Tensor, start: int) -> torch.Tensor:
        h = self.gpt.hidden_states(x)[:, start:]          # no logits for positions the loss ignores
        if h.is_cuda:  # the padded matmul is the fast one on a GPU; torch.compile fuses the slice into the loss
            logits = self.gpt.lm_head(h)[..., :VOCAB_SIZE]
            return F.cross_entropy(logits.reshape(-1, VOCAB_SIZE).float(), y[:, start:].reshape(-1), reduction="sum")
        # On a CPU the logits' memory traffic dominates a small model's step: one contiguous (tokens, 50257)
        # matrix, the padded rows left out, and a fused loss.
        w = self.gpt.lm_head.weight[:VOCAB_SIZE]
        h = h.reshape(-1, h.shape[-1])
        if torch.is_autocast_enabled(h.device.type):
            dtype = torch.get_autocast_dtype(h.device.type)
            h, w = h.to(dtype), w.to(dtype)
        return LinearCrossEntropy.apply(h, w, y[:, start:].reshape(-1))
