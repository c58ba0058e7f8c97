"""The loss functions against formulas written out by hand, where tests/mutate.py found them unguarded: the plain
LM loss (the path `perf.chunked_ce=false` trains with), focal loss at gamma=1 (not only 0 and 2), and focal loss
with label smoothing."""

import pytest
import torch
import torch.nn.functional as F

from engine import losses


def test_lm_loss_sum_is_the_summed_next_token_cross_entropy_over_real_targets():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 5, 11, generator=g)
    labels = torch.randint(0, 11, (3, 5), generator=g)
    labels[0, :2] = losses.IGNORE
    labels[2, 4] = losses.IGNORE
    logp = F.log_softmax(logits, -1)
    keep = labels != losses.IGNORE
    by_hand = -logp[keep, labels[keep]].sum()
    assert losses.lm_loss_sum(logits, labels).item() == pytest.approx(by_hand.item(), rel=1e-6)
    eps = 0.1  # smoothing: (1 - eps) * CE + eps * mean over the vocabulary of -log p
    smooth = ((1 - eps) * -logp[keep, labels[keep]] + eps * -logp[keep].mean(-1)).sum()
    assert losses.lm_loss_sum(logits, labels, eps).item() == pytest.approx(smooth.item(), rel=1e-6)


@pytest.mark.parametrize("gamma", [0.5, 1.0, 3.0])
@pytest.mark.parametrize("eps", [0.0, 0.2])
def test_focal_loss_with_smoothing_by_hand(gamma, eps):
    """-sum_k q_k (1 - p_k)^gamma log p_k with q the smoothed one-hot target, for any gamma > 0."""
    g = torch.Generator().manual_seed(1)
    k = 4
    logits, labels = torch.randn(7, k, generator=g), torch.randint(0, k, (7,), generator=g)
    weights = torch.rand(7, generator=g) + 0.5
    p = F.softmax(logits, -1)
    q = torch.full((7, k), eps / k)
    q[torch.arange(7), labels] += 1 - eps
    per_sample = -(q * (1 - p) ** gamma * p.log()).sum(-1)
    got = losses.cls_loss_sum(logits, labels, weights, focal_gamma=gamma, label_smoothing=eps)
    assert got.item() == pytest.approx((weights * per_sample).sum().item(), rel=1e-5)
    plain = losses.cls_loss_sum(logits, labels, weights, label_smoothing=eps)
    assert got.item() < plain.item()  # the focal factor only ever shrinks the loss
