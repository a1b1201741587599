"""AdamW with decoupled weight decay on matrices only, and a warmup + cosine/linear learning-rate schedule."""
from __future__ import annotations

import math

import torch


def adamw(model: torch.nn.Module, learning_rate: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW over the trainable parameters; 2-D and larger tensors decay, biases and norms do not."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in trainable if p.dim() >= 2]
    no_decay = [p for p in trainable if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # foreach: one vectorised update over all tensors (CUDA's default, ~2.5x faster than the per-tensor loop on CPUs)
    return torch.optim.AdamW(groups, lr=learning_rate, betas=(0.9, 0.95), foreach=True)


def apply_gradients(model: torch.nn.Module, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler) -> None:
    """One optimizer step from the (scaled) gradients: unscale, clip the norm to 1, step, update the loss
    scale, clear the gradients."""
    scaler.unscale_(optimizer)
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)


def learning_rate_at(step: int, peak: float, warmup_steps: int, max_steps: int, schedule: str = "cosine") -> float:
    """Linear warmup to ``peak`` over ``warmup_steps``, then cosine or linear decay to peak/10 at ``max_steps``."""
    if step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
    floor = peak / 10
    if schedule == "linear":
        return peak - (peak - floor) * progress
    return floor + 0.5 * (peak - floor) * (1 + math.cos(math.pi * progress))


def set_learning_rate(optimizer: torch.optim.Optimizer, value: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = value
