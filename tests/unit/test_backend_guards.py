"""The DDP backend's half of one optimizer step, in one process, where tests/mutate.py found it unguarded: Adam is
almost blind to a gradient's scale, so a backend that hands the optimizer a wrong learning rate, unclipped or
still loss-scaled gradients, or reports another norm than the one it clipped with, trains nearly the same losses.
What the optimizer receives is observed directly (its `step` wrapped on the instance)."""

from __future__ import annotations

import pytest
import torch

from engine.backends.ddp import DDPBackend
from engine.config import load_config
from engine.dist import DistEnv


def _backend(precision: str = "fp32", scales=(1.0, 1.0)):
    torch.manual_seed(0)
    cfg = load_config(None, [f"train.precision={precision}", "optim.weight_decay=0.0"])
    module = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Linear(5, 1))
    backend = DDPBackend(cfg, DistEnv())
    groups = [{"params": list(module[0].parameters()), "weight_decay": 0.0, "lr_scale": scales[0]},
              {"params": list(module[1].parameters()), "weight_decay": 0.0, "lr_scale": scales[1]}]
    backend.setup(module, groups)
    seen: dict = {}
    real = backend.optimizer.step

    def step(*args, **kwargs):  # what the optimizer is handed
        seen["lr"] = [g["lr"] for g in backend.optimizer.param_groups]
        seen["grad_norm"] = float(torch.nn.utils.get_total_norm([p.grad for p in module.parameters()]))
        return real(*args, **kwargs)

    backend.optimizer.step = step
    return backend, module, seen


def _loss(module, scale=1.0):
    x = torch.linspace(-1, 1, 24).reshape(4, 6)
    return module(x).pow(2).sum() * scale


def _true_norm(module, scale=1.0) -> float:
    grads = torch.autograd.grad(_loss(module, scale), list(module.parameters()))
    return float(torch.nn.utils.get_total_norm(list(grads)))


def test_backward_then_step_updates_with_the_scheduled_lr_per_group():
    backend, module, seen = _backend(scales=(0.5, 0.0))
    before = [p.detach().clone() for p in module.parameters()]
    expected = _true_norm(module)
    with backend.accumulate(True):
        backend.backward(_loss(module), True)
    norm = backend.step(0.2, 0.0)
    assert seen["lr"] == [pytest.approx(0.1), 0.0]  # lr x each group's lr_scale
    assert float(norm) == pytest.approx(expected, rel=1e-6) == seen["grad_norm"]
    after = list(module.parameters())
    assert all(not torch.equal(b, a) for b, a in zip(before[:2], after[:2]))  # the first group trained
    assert all(torch.equal(b, a) for b, a in zip(before[2:], after[2:]))  # lr_scale 0: untouched
    assert all(p.grad is None for p in module.parameters())  # cleared for the next step


def test_the_optimizer_gets_clipped_gradients_and_the_reported_norm_is_the_unclipped_one():
    backend, module, seen = _backend()
    expected = _true_norm(module)
    clip = expected / 4
    backend.backward(_loss(module), True)
    norm = backend.step(0.1, clip)
    assert float(norm) == pytest.approx(expected, rel=1e-6)
    assert seen["grad_norm"] == pytest.approx(clip, rel=1e-4)
    for off in (expected * 10, 0.0):  # a clip above the norm, and train.clip_grad=0 (off), leave it alone
        backend.backward(_loss(module), True)
        expected = _true_norm(module)
        backend.step(0.1, off)
        assert seen["grad_norm"] == pytest.approx(expected, rel=1e-6), off


def test_the_measured_memory_counts_the_gradients_of_the_first_step():
    backend, module, _ = _backend()
    backend.backward(_loss(module), True)
    backend.step(0.1, 0.0)
    fp32 = 4 * sum(p.numel() for p in module.parameters())
    assert backend.measured_memory()["grads"] == fp32  # what README's memory table reports for ddp


def test_fp16_loss_scaling_is_undone_before_the_norm_clip_and_update():
    backend, module, seen = _backend("fp16")
    expected = _true_norm(module)
    assert backend.loss_scale() > 1000  # the loss really is scaled up in backward
    backend.backward(_loss(module), True)
    norm = backend.step(0.1, expected / 2)
    assert float(norm) == pytest.approx(expected, rel=1e-5)  # unscaled
    assert seen["grad_norm"] == pytest.approx(expected / 2, rel=1e-4)  # unscaled, then clipped
    # an overflow: the step is skipped, weights untouched, and the scale halves
    scale, weights = backend.loss_scale(), [p.detach().clone() for p in module.parameters()]
    backend.backward(_loss(module, float("inf")), True)
    backend.step(0.1, 0.0)
    assert backend.loss_scale() == scale / 2
    assert all(torch.equal(w, p) for w, p in zip(weights, module.parameters()))
