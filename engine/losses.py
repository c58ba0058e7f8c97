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


def lm_loss_sum(logits: torch.Tensor, labels: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """Summed next-token cross-entropy; labels are already shifted, IGNORE marks no target."""
    return F.cross_entropy(logits.flatten(0, -2).float(), labels.flatten(), ignore_index=IGNORE, reduction="sum",
                           label_smoothing=label_smoothing)


def cls_loss_sum(logits: torch.Tensor, labels: torch.Tensor, sample_weights: torch.Tensor | None = None,
                 focal_gamma: float = 0.0, label_smoothing: float = 0.0) -> torch.Tensor:
    """Summed per-sample loss, each sample scaled by its weight (1 when none).

    The per-sample loss is -sum_k q_k (1 - p_k)^gamma log p_k with q the (smoothed) target distribution:
    cross-entropy at gamma=0, focal loss (Lin et al. 2017) at gamma>0 with a one-hot target. Class
    weights arrive as per-sample weights (the weight of each sample's class), and the trainer divides by
    their global sum, which is PyTorch's CrossEntropyLoss(weight=...) mean, exact across micro-batches.
    """
    logits = logits.float()
    if focal_gamma == 0.0:
        per = F.cross_entropy(logits, labels, reduction="none", label_smoothing=label_smoothing)
    else:
        logp = F.log_softmax(logits, dim=-1)
        k = logits.shape[-1]
        target = F.one_hot(labels, k).to(logp.dtype) * (1.0 - label_smoothing) + label_smoothing / k
        per = -(target * (1.0 - logp.exp()).pow(focal_gamma) * logp).sum(-1)
    if sample_weights is not None:
        per = per * sample_weights
    return per.sum()


def class_weights(spec, label_counts: list[int]) -> tuple[torch.Tensor | None, list[str]]:
    """loss.class_weights resolved against the training split: (one weight per class or None, problems).

    auto: N / (K * n_c) over the K classes present (sklearn's "balanced"), so each class carries the same
    total weight; classes absent from the training split get 0 (they are never a target there).
    """
    counts = torch.tensor(label_counts, dtype=torch.float64)
    explicit = spec.class_weight_values()
    if explicit is not None:
        if len(explicit) != len(counts):
            return None, [f"loss.class_weights has {len(explicit)} weights but there are {len(counts)} classes; give one "
                          f"per class in label order"]
        return torch.tensor(explicit, dtype=torch.float32), []
    if not spec.auto_weights:
        return None, []
    present = counts > 0
    weights = torch.where(present, counts.sum() / (present.sum() * counts.clamp(min=1)), torch.zeros_like(counts))
    return weights.float(), []


def target_count(batch: dict[str, torch.Tensor], head: str) -> torch.Tensor:
    """What one micro-batch contributes to the step's normalizer (float, on the batch's device).

    lm: the number of predicted tokens. cls: the sum of sample weights (the sample count when unweighted).
    """
    if head == "lm":
        return (batch["labels"] != IGNORE).sum().to(torch.float32)
    if "loss_weights" in batch:
        return batch["loss_weights"].sum().to(torch.float32)
    return torch.tensor(float(batch["labels"].numel()), device=batch["labels"].device)
