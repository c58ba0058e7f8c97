"""Class imbalance: class weights, auto weights, focal loss, label smoothing, the class-balanced sampler."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from engine import losses
from engine.data import sources as data
from engine.config import LossConfig, load_config
from engine.errors import UsageError


def _batch(seed=0, n=12, k=4):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, k, generator=g, requires_grad=True), torch.randint(0, k, (n,), generator=g)


def test_class_weights_change_the_loss_as_computed_by_hand():
    logits, labels = _batch()
    w = torch.tensor([1.0, 4.0, 0.5, 2.0])
    mb = {"labels": labels, "loss_weights": w[labels]}
    loss = losses.cls_loss_sum(logits, labels, mb["loss_weights"]) / losses.target_count(mb, "cls")
    logp = torch.log_softmax(logits.detach(), -1)
    by_hand = sum(-w[y] * logp[i, y] for i, y in enumerate(labels.tolist())) / sum(w[y] for y in labels.tolist())
    assert loss.item() == pytest.approx(by_hand.item(), rel=1e-6)
    assert loss.item() == pytest.approx(F.cross_entropy(logits, labels, weight=w).item(), rel=1e-6)
    plain = losses.cls_loss_sum(logits, labels) / len(labels)
    assert abs(loss.item() - plain.item()) > 1e-3  # the weights matter


def test_weighted_loss_is_exact_across_micro_batches():
    """Normalizing by the global sum of sample weights gives the full batch's weighted mean, whatever the
    split; dividing each micro-batch by its own weight sum does not."""
    logits, labels = _batch(1, n=10)
    w = torch.tensor([1.0, 9.0, 0.2, 3.0])
    full = F.cross_entropy(logits, labels, weight=w)
    (ref,) = torch.autograd.grad(full, logits)
    parts = [slice(0, 3), slice(3, 4), slice(4, 10)]
    total = sum(losses.target_count({"labels": labels[s], "loss_weights": w[labels[s]]}, "cls") for s in parts)
    acc = sum(losses.cls_loss_sum(logits[s], labels[s], w[labels[s]]) / total for s in parts)
    (got,) = torch.autograd.grad(acc, logits)
    assert acc.item() == pytest.approx(full.item(), rel=1e-6) and torch.allclose(got, ref, atol=1e-7)
    naive = sum(losses.cls_loss_sum(logits[s], labels[s], w[labels[s]]) / w[labels[s]].sum() for s in parts) / 3
    assert abs(naive.item() - full.item()) > 1e-3


def test_auto_weights_from_label_counts():
    weights, problems = losses.class_weights(LossConfig(class_weights="auto"), [6, 3, 1, 0])
    assert problems == []
    n, k = 10, 3  # samples, classes present
    assert weights.tolist() == pytest.approx([n / (k * 6), n / (k * 3), n / (k * 1), 0.0])
    counts = torch.tensor([6.0, 3.0, 1.0])
    assert (counts * weights[:3]).tolist() == pytest.approx([n / k] * 3)  # every class carries the same weight
    explicit, _ = losses.class_weights(LossConfig(class_weights=[1, 2, 3, 4]), [6, 3, 1, 0])
    assert explicit.tolist() == [1, 2, 3, 4]
    assert losses.class_weights(LossConfig(), [6, 3]) == (None, [])
    _, problems = losses.class_weights(LossConfig(class_weights="1,2"), [6, 3, 1])
    assert "has 2 weights but there are 3 classes" in problems[0]


def test_focal_loss_reduces_to_cross_entropy_at_gamma_zero():
    logits, labels = _batch(2)
    ce = F.cross_entropy(logits, labels, reduction="sum")
    assert losses.cls_loss_sum(logits, labels, focal_gamma=0.0).item() == pytest.approx(ce.item(), rel=1e-6)
    # the general formula, used for gamma > 0, also equals CE at gamma=0 (with and without smoothing)
    logp = torch.log_softmax(logits, -1)
    for eps in (0.0, 0.1):
        smooth = F.cross_entropy(logits, labels, reduction="sum", label_smoothing=eps)
        q = F.one_hot(labels, 4) * (1 - eps) + eps / 4
        assert (-(q * logp).sum()).item() == pytest.approx(smooth.item(), rel=1e-6)
        assert losses.cls_loss_sum(logits, labels, label_smoothing=eps).item() == pytest.approx(smooth.item(), rel=1e-6)
    # gamma = 2: -(1 - p_t)^2 log p_t, by hand; easy samples count less than under CE
    p_t = logp.exp()[torch.arange(len(labels)), labels]
    by_hand = (-(1 - p_t) ** 2 * torch.log(p_t)).sum()
    focal = losses.cls_loss_sum(logits, labels, focal_gamma=2.0)
    assert focal.item() == pytest.approx(by_hand.item(), rel=1e-5) and focal.item() < ce.item()


def test_balanced_sampler_frequencies_and_determinism():
    labels = np.array([0] * 100 + [1] * 10 + [2] * 1 + [3] * 9)
    rng = np.random.default_rng(0)
    labels = labels[rng.permutation(len(labels))]  # classes interleaved in the file
    n = len(labels)
    s = data.BalancedSampler(labels, seed=5)
    stream = s.indices(0, 3 * n)
    for e in range(3):  # every epoch: each class exactly n / K times
        counts = np.bincount(labels[stream[e * n:(e + 1) * n]], minlength=4)
        assert counts.tolist() == [30, 30, 30, 30]
    # the common class is drawn without replacement, the rare ones cycle through all their samples
    first = stream[:n]
    common = stream[labels[stream] == 0]  # 90 draws over 3 epochs from 100 samples: no repeats across epochs
    assert len(common) == 90 and len(set(common.tolist())) == 90
    assert set(first[labels[first] == 1].tolist()) == set(np.flatnonzero(labels == 1).tolist())
    # addressed by global index: any window equals the same slice, from a fresh sampler too (resume)
    assert np.array_equal(data.BalancedSampler(labels, seed=5).indices(97, 150), stream[97:247])
    assert not np.array_equal(data.BalancedSampler(labels, seed=6).indices(0, n), first)
    # a uniform sampler would give the rare class ~1 draw per epoch
    assert np.bincount(labels[data.GlobalSampler(n, 5).indices(0, n)], minlength=4)[2] == 1


def test_train_batches_carry_class_weights_and_balance():
    import datasets

    rows = {"input_ids": [[1, 2, 3]] * 20, "labels": [0] * 16 + [1] * 4}
    ds = datasets.Dataset.from_dict(rows).with_format("numpy")

    class Tok:
        pad_token_id = 0

    prep = data.Prepared(ds, ds.select([]), Tok(), "cls", 8, ["a", "b"], class_weights=torch.tensor([0.5, 2.0]),
                         balanced=True)
    tb = data.TrainBatches(prep, data.Layout(1, 0, 10, 2), seed=0, device=torch.device("cpu"))
    mbs = tb.micro_batches(0)  # one epoch: 20 samples
    assert sum(mb["labels"].tolist().count(1) for mb in mbs) == 10  # balanced: half of them are the rare class
    for mb in mbs:
        assert mb["loss_weights"].tolist() == [0.5 if y == 0 else 2.0 for y in mb["labels"].tolist()]
    assert sum(losses.target_count(mb, "cls").item() for mb in mbs) == pytest.approx(10 * 0.5 + 10 * 2.0)


def test_fine_tuning_config_problems_are_reported_together():
    with pytest.raises(UsageError) as e:
        load_config(None, ["loss.class_weights=auto", "loss.focal_gamma=-1", "model.freeze=embeddings,blocks:x",
                           "eval.patience=3", "eval.stride=500", "optim.layer_lr_decay=1.5", "optim.head_lr=1e-3",
                           "data.balanced_sampling=true", "eval.metric=macro_f1"])
    msg = str(e.value)
    for fragment in ("loss.class_weights needs model.head=cls",
                     "loss.focal_gamma must be >= 0",
                     "model.freeze entry 'blocks:x' is not one of",
                     "eval.stride=500 must not exceed data.seq_len=128",
                     "eval.metric 'macro_f1' is not reported for model.head=lm",
                     "optim.layer_lr_decay must be within (0, 1]",
                     "optim.head_lr needs model.head=cls",
                     "data.balanced_sampling needs model.head=cls",
                     "both correct the same imbalance"):
        assert fragment in msg, msg
    with pytest.raises(UsageError) as e:
        load_config(None, ["model.head=cls", "model.lora_rank=4", "model.lora_targets=c_attn,q_proj",
                           "model.freeze=embeddings", "eval.patience=2", "train.eval_every=0",
                           "loss.class_weights=[1,-2]"])
    msg = str(e.value)
    for fragment in ("model.lora_targets must be a non-empty subset of c_attn, c_proj, c_fc",
                     "model.freeze and model.lora_rank both choose what trains",
                     "eval.patience needs eval.metric", "eval.patience needs train.eval_every > 0",
                     "loss.class_weights must be non-negative"):
        assert fragment in msg, msg
    cfg = load_config(None, ["model.head=cls", "loss.class_weights=[1, 2.5]", "eval.metric=macro_f1"])
    assert cfg.loss.class_weight_values() == [1.0, 2.5] and cfg.eval.metric_key == "eval_macro_f1" and cfg.eval.maximize
