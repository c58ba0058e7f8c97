"""Loss normalization under padding and uneven micro-batches; the LR schedule; parameter groups."""

import math

import pytest
import torch

from engine import losses, model as model_lib, optim
from engine.config import ModelConfig, OptimConfig
from engine.data.sources import collate, train_bpe


def _module():
    import pydoc_data.topics

    tok = train_bpe(list(pydoc_data.topics.topics.values())[:10], 300)
    cfg = ModelConfig(name="gpt2-tiny")
    torch.manual_seed(0)
    return model_lib.TrainModule(model_lib.build(cfg, model_lib.resolve(cfg), tok), "lm")


def _grads(module):
    return torch.cat([p.grad.flatten() for p in module.parameters() if p.grad is not None]).clone()


def test_global_token_normalization_makes_uneven_splits_exact():
    """One global batch of padded LM samples, accumulated as micro-batches with very different target
    counts, gives the gradient of the full batch's token mean; per-micro-batch means do not."""
    module = _module()
    torch.manual_seed(1)
    lengths = [40, 3, 25, 2, 33, 5]
    rows = [torch.randint(0, 300, (n,)).numpy() for n in lengths]

    full = collate(rows, "lm", pad_id=0)
    module.zero_grad()
    (module(**full) / losses.target_count(full, "lm")).backward()
    reference = _grads(module)

    micro = [collate(rows[i:i + 2], "lm", pad_id=0) for i in range(0, 6, 2)]
    total = sum(losses.target_count(mb, "lm") for mb in micro)
    module.zero_grad()
    for mb in micro:
        (module(**mb) / total).backward()
    assert torch.allclose(_grads(module), reference, rtol=1e-5, atol=1e-7)

    module.zero_grad()
    for mb in micro:  # the common mistake: mean per micro-batch, divided by the number of micro-batches
        (module(**mb) / losses.target_count(mb, "lm") / len(micro)).backward()
    assert not torch.allclose(_grads(module), reference, rtol=1e-3, atol=1e-5)


def test_target_counts():
    b = collate([torch.arange(5).numpy(), torch.arange(2).numpy()], "lm", pad_id=0)
    assert losses.target_count(b, "lm").item() == 4 + 1
    c = {"labels": torch.tensor([0, 1, 1]), "loss_weights": torch.tensor([0.5, 2.0, 2.0])}
    assert losses.target_count(c, "cls").item() == 4.5
    assert losses.target_count({"labels": torch.tensor([0, 1, 1])}, "cls").item() == 3


def test_lr_schedule():
    cfg = OptimConfig(lr=1.0, warmup_steps=10, schedule="cosine", min_lr_ratio=0.1)
    lrs = [optim.lr_at(s, cfg, 110) for s in range(110)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert lrs[10] == pytest.approx(1.0)
    assert lrs[60] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert optim.lr_at(110, cfg, 110) == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
    lin = OptimConfig(lr=2.0, warmup_steps=0, schedule="linear", min_lr_ratio=0.0)
    assert optim.lr_at(50, lin, 100) == pytest.approx(1.0)
    const = OptimConfig(lr=3.0, warmup_steps=0, schedule="constant")
    assert optim.lr_at(99, const, 100) == 3.0


def test_no_weight_decay_on_biases_norms_and_embeddings():
    module = _module()
    groups = {g["name"]: g for g in optim.param_groups(module, 0.1)}
    names = {id(p): n for n, p in module.named_parameters()}
    decayed = [names[id(p)] for p in groups["decay"]["params"]]
    plain = [names[id(p)] for p in groups["no_decay"]["params"]]
    assert all(n.endswith(".weight") and "ln_" not in n and "wte" not in n and "wpe" not in n for n in decayed)
    assert any("wte" in n for n in plain) and any(n.endswith(".bias") for n in plain) and any("ln_f" in n for n in plain)
    assert groups["decay"]["weight_decay"] == 0.1 and groups["no_decay"]["weight_decay"] == 0.0
    # the tied lm_head weight is the embedding: counted once
    total = sum(p.numel() for g in groups.values() for p in g["params"])
    assert total == model_lib.num_parameters(module)
