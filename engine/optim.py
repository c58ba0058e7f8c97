"""Optimizer and learning-rate schedule.

AdamW with two parameter groups: matrices decay; biases, LayerNorm weights and embeddings do not
(decaying an embedding pulls rare tokens to zero; decaying a gain or bias fights normalization).
The schedule is a pure function of the step, so a resumed run needs no scheduler state to be exact.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from engine.config import OptimConfig


def decays(name: str, p: nn.Parameter, embedding_ids: set[int]) -> bool:
    """Whether weight decay applies: matrices yes; biases, LayerNorms and embeddings no."""
    ndim = len(getattr(p, "ds_shape", p.shape))  # a ZeRO-3 partition is flat; its full shape decides
    return not (ndim < 2 or id(p) in embedding_ids or "ln_" in name or "norm" in name.lower())


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    decay, no_decay, seen = [], [], set()
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        (decay if decays(name, p, embeddings) else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay, "name": "decay"},
              {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"}]
    return [g for g in groups if g["params"]]


def adamw(groups: list[dict], cfg: OptimConfig, device: torch.device) -> torch.optim.Optimizer:
    """torch AdamW; fused on CUDA (one kernel for all parameters, optim.fused), foreach elsewhere."""
    fused = device.type == "cuda" and cfg.fused
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps,
                             fused=fused or None, foreach=None if fused else True)


def lr_at(step: int, cfg: OptimConfig, max_steps: int) -> float:
    """Learning rate for optimizer step `step` (0-based): linear warmup, then cosine/linear/constant."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return cfg.lr
    span = max(1, max_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    floor = cfg.lr * cfg.min_lr_ratio
    if cfg.schedule == "linear":
        return floor + (cfg.lr - floor) * (1.0 - progress)
    return floor + (cfg.lr - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
