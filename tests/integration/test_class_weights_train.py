"""Class weights reach the training batches and the loss the trainer steps on.

A tiny, imbalanced two-class task (3:1). For `loss.class_weights=[1, 9]`, `auto` and `[1, 9]` with focal loss, the
loss of the first optimizer step (2 micro-batches, through `Trainer.train_step` with the trainer's own batches)
must equal the weighted loss computed by hand over the same samples from the initial model's logits, with weights
taken from the config (or, for auto, from the label counts), and must differ from the unweighted loss. Dropping the
weights anywhere between the config and the loss (never attached to the batches, or attached but not passed to the
model's loss while the trainer still divides by their sum) changes that number.
"""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from engine.data import sources as data
from tests.conftest import tiny_config

CLASSES = ("common", "rare")  # label ids 0, 1 (sorted names)


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    rng = random.Random(0)
    words = {"common": "bright calm clean fresh gentle happy kind lovely".split(),
             "rare": "awful broken cold dirty grim harsh nasty rotten".split()}
    path = tmp_path_factory.mktemp("weights") / "task.jsonl"
    with open(path, "w") as f:
        for i in range(64):
            label = "rare" if i % 4 == 0 else "common"
            f.write(json.dumps({"text": " ".join(rng.choices(words[label], k=rng.randint(2, 9))), "label": label}) + "\n")
    return path


def _settings(task, **extra):
    return {"model.head": "cls", "data.source": task, "data.seq_len": 16, "data.tokenizer_vocab": 300,
            "data.val_fraction": 0.25, "train.micro_batch": 8, "train.grad_accum": 2, "train.max_steps": 1,
            "train.eval_batches": 1, "train.sample_tokens": 0, **extra}


def _by_hand(trainer, weights_of, gamma: float) -> tuple[float, float]:
    """(weighted, unweighted) loss of step 1 from the initial weights: the step's samples (global sample indices
    0..B-1 of the seeded stream), the model's logits, and per-sample losses written out here."""
    lay, cfg = trainer.layout, trainer.cfg
    idx = data.GlobalSampler(len(trainer.data.train), cfg.run.seed).indices(0, lay.global_batch)
    rows = trainer.data.train[idx.tolist()]
    batch = data.collate(list(rows["input_ids"]), "cls", trainer.data.tokenizer.pad_token_id, rows["labels"])
    labels = batch["labels"]
    assert 0 < int(labels.sum()) < len(labels), "the step must hold both classes"
    module = trainer.backend.module
    with torch.no_grad():
        logp = F.log_softmax(module.logits(batch["input_ids"], batch["attention_mask"]).float(), -1)
    logp_t = logp[torch.arange(len(labels)), labels]
    per_sample = -((1 - logp_t.exp()) ** gamma) * logp_t
    w = weights_of(trainer)[labels]
    return float((w * per_sample).sum() / w.sum()), float(per_sample.mean())


def _auto(trainer) -> torch.Tensor:
    counts = np.bincount(np.asarray(trainer.data.train["labels"]), minlength=2).astype(np.float64)
    return torch.tensor(counts.sum() / (2 * counts), dtype=torch.float64)  # N / (K * n_c)


CASES = {
    "explicit": ({"loss.class_weights": "[1, 9]"}, lambda t: torch.tensor([1.0, 9.0], dtype=torch.float64), 0.0),
    "auto": ({"loss.class_weights": "auto"}, _auto, 0.0),
    "focal": ({"loss.class_weights": "[1, 9]", "loss.focal_gamma": 2.0},
              lambda t: torch.tensor([1.0, 9.0], dtype=torch.float64), 2.0),
}


@pytest.mark.parametrize("case", CASES)
def test_step_one_loss_is_the_hand_computed_weighted_loss(task, tmp_path, case):
    from engine.trainer import Trainer

    overrides, weights_of, gamma = CASES[case]
    trainer = Trainer(tiny_config(tmp_path / "run", **_settings(task, **overrides)), progress=False)
    try:
        weighted, unweighted = _by_hand(trainer, weights_of, gamma)
        micro_batches = trainer.batches.next()
        # the weights ride in the batches the loop trains on: each sample's class weight
        w = weights_of(trainer).float()
        for mb in micro_batches:
            assert "loss_weights" in mb and torch.allclose(mb["loss_weights"].float(), w[mb["labels"]]), mb
        loss_sum, count, *_ = trainer.train_step(micro_batches)
        step_loss = float(loss_sum) / float(count)
    finally:
        trainer.close()
    assert step_loss == pytest.approx(weighted, rel=1e-5), (step_loss, weighted, unweighted)
    assert abs(weighted - unweighted) > 1e-3 * unweighted  # 100x the tolerance above: the data tells them apart
