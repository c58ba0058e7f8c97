"""Losses as SUMS over targets, and the target counts that normalize them.

Why sums: with gradient accumulation and several ranks, the mean loss of an optimizer step is
    sum over all micro-batches and ranks of per-target losses  /  global number of targets.
Averaging per micro-batch (what most loops do) weights a micro-batch with few targets as much as a
full one, so different world x micro x accum splits of one global batch give different updates.
The trainer all-reduces `target_count` once per step and divides the summed loss by it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE = -100


def lm_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed next-token cross-entropy; labels are already shifted, IGNORE marks no target."""
    return F.cross_entropy(logits.flatten(0, -2).float(), labels.flatten(), ignore_index=IGNORE, reduction="sum")


def cls_loss_sum(logits: torch.Tensor, labels: torch.Tensor, sample_weights: torch.Tensor | None = None) -> torch.Tensor:
    """Summed per-sample cross-entropy, each sample scaled by its weight (1 when none)."""
    losses = F.cross_entropy(logits.float(), labels, reduction="none")
    if sample_weights is not None:
        losses = losses * sample_weights
    return losses.sum()


def target_count(batch: dict[str, torch.Tensor], head: str) -> torch.Tensor:
    """What one micro-batch contributes to the step's normalizer (float, on the batch's device).

    lm: the number of predicted tokens. cls: the sum of sample weights (the sample count when unweighted).
    """
    if head == "lm":
        return (batch["labels"] != IGNORE).sum().to(torch.float32)
    if "loss_weights" in batch:
        return batch["loss_weights"].sum().to(torch.float32)
    return torch.tensor(float(batch["labels"].numel()), device=batch["labels"].device)
