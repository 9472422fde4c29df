"""AdamW and the seed's learning-rate schedule."""

from __future__ import annotations

import math

import torch

from pipeline.config import Train

from model.gpt import GPT


def lr_at(batches: int, t: Train) -> float:
    """The seed's schedule after `batches` batches of training: linear warm-up over warmup_steps, then
    cos(pi/2 * (batches - warmup) / steps_to_attenuate_lr_to_zero), reaching 0 and staying there (the
    original's cosine would turn negative past that point; its run ended before).

    The unit is the batch, the original's optimizer step (it took one batch per step), not this run's optimizer
    step: with N processes, or with gradients accumulated over tokens_per_optimizer_step, a step takes several
    batches, and counting batches keeps the curve over the data the same, so the run ends at the same rate.
    An optimizer step uses the rate at the batches seen before it, as the original's LambdaLR did (stepped
    after each optimizer step, so the first step has lr_at(0): 0 during warm-up)."""
    warm = batches / t.warmup_steps if t.warmup_steps > 0 else 1.0
    x = (batches - t.warmup_steps) / max(t.steps_to_attenuate_lr_to_zero, 1)
    decay = math.cos(math.pi * max(x, 0.0) / 2) if x < 1 else 0.0
    return t.max_lr * max(0.0, min(warm, decay))


def make_optimizer(gpt: GPT, t: Train, device: torch.device) -> torch.optim.AdamW:
    """AdamW; weight decay on 2-D weights (matmuls and embeddings) only, not on biases and LayerNorm gains
    (pulling a gain towards 0 only fights the normalisation), unless weight_decay_all_parameters (the original)."""
    decay = [p for p in gpt.parameters() if p.dim() >= 2 or t.weight_decay_all_parameters]
    no_decay = [p for p in gpt.parameters() if p.dim() < 2 and not t.weight_decay_all_parameters]
    groups = [{"params": decay, "weight_decay": t.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # fused: one kernel over all parameters, on CPU as on CUDA (torch's default on a CPU is a Python loop over
    # the tensors: 5.5x slower on GPT-2 small, 0.51 against 0.12 s a step on 2 EPYC cores; foreach was slower
    # still there); foreach where there is no fused kernel
    kw = {"fused": True} if device.type in ("cpu", "cuda") else {"foreach": True}
    return torch.optim.AdamW(groups, lr=lr_at(0, t), **kw)
