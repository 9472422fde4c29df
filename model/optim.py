"""AdamW and the seed's learning-rate schedule."""

from __future__ import annotations

import math

import torch

from pipeline.config import Train

from model.gpt import GPT


def lr_at(step: int, t: Train) -> float:
    """The seed's schedule for optimizer step `step` (1, 2, ...): linear warm-up over warmup_steps, then
    cos(pi/2 * (step - warmup) / steps_to_attenuate_lr_to_zero), reaching 0 and staying there."""
    warm = step / t.warmup_steps if t.warmup_steps > 0 else 1.0
    x = (step - t.warmup_steps) / max(t.steps_to_attenuate_lr_to_zero, 1)
    decay = math.cos(math.pi * max(x, 0.0) / 2) if x < 1 else 0.0
    return t.max_lr * max(0.0, min(warm, decay))


def make_optimizer(gpt: GPT, t: Train, device: torch.device) -> torch.optim.AdamW:
    """AdamW; weight decay on 2-D weights (matmuls and embeddings) only, not on biases and LayerNorms."""
    decay = [p for p in gpt.parameters() if p.dim() >= 2]
    no_decay = [p for p in gpt.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": t.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    kw = {"fused": True} if device.type == "cuda" else {}
    return torch.optim.AdamW(groups, lr=lr_at(1, t), **kw)
