"""Config validation at its edges, where tests/mutate.py found it unguarded: which keys accept 0 (the documented
"0 disables"), which must be positive, and the closed or open upper bound of each range, with the range in the
message exactly as the user must read it."""

import pytest

from engine.config import load_config
from engine.errors import UsageError

ZERO_ALLOWED = ["train.eval_every", "train.eval_batches", "train.clip_grad", "train.sample_tokens",
                "train.stop_at_step", "checkpoint.every", "optim.weight_decay", "optim.warmup_steps", "optim.head_lr",
                "dist.watchdog_s", "data.stride", "data.max_windows", "loss.focal_gamma", "loss.label_smoothing"]
POSITIVE = ["train.micro_batch", "train.grad_accum", "train.max_steps", "train.log_every", "train.max_bad_steps",
            "train.loss_scale_window", "checkpoint.keep", "optim.lr", "optim.eps", "dist.timeout_s",
            "dist.step_timeout_s", "data.seq_len"]
CLS = ["model.head=cls"]  # what optim.head_lr and the loss.* keys need besides


def _problems(*overrides: str) -> str:
    try:
        load_config(None, list(overrides))
    except UsageError as e:
        return str(e)
    return ""


@pytest.mark.parametrize("key", ZERO_ALLOWED)
def test_zero_is_accepted_where_it_means_off_and_negatives_are_not(key):
    assert _problems(*CLS, f"{key}=0") == ""
    assert f"{key} must be " in _problems(*CLS, f"{key}=-1")


@pytest.mark.parametrize("key", POSITIVE)
def test_sizes_and_counts_must_be_positive(key):
    assert f"{key} must be positive (got 0" in _problems(f"{key}=0")


def test_ranges_say_whether_their_upper_bound_is_allowed():
    # data.val_fraction and loss.label_smoothing stop short of 1 (nothing left to train on / no target left)
    assert _problems("data.val_fraction=0") == "" and _problems("data.val_fraction=0.999") == ""
    assert "data.val_fraction must be within [0.0, 1.0) (got 1.0)" in _problems("data.val_fraction=1")
    assert _problems(*CLS, "loss.label_smoothing=0.999") == ""
    assert "loss.label_smoothing must be within [0.0, 1.0) (got 1.0)" in _problems(*CLS, "loss.label_smoothing=1")
    # optim.min_lr_ratio may be 1 (a constant schedule after warmup), not more
    assert _problems("optim.min_lr_ratio=1") == "" and _problems("optim.min_lr_ratio=0") == ""
    assert "optim.min_lr_ratio must be within [0.0, 1.0] (got 1.01)" in _problems("optim.min_lr_ratio=1.01")


@pytest.mark.parametrize("value", ["abc", "1,x", "1;2"])
def test_malformed_class_weights_are_named(value):
    assert f"loss.class_weights must be none, auto or a list of numbers (got {value!r})" in _problems(
        *CLS, f"loss.class_weights={value}")


def test_class_weights_may_hold_zeros_and_fractions_but_not_negatives_or_only_zeros():
    for ok in ("[0, 1]", "[0.5, 2]", "[1, 9]"):
        assert _problems(*CLS, f"loss.class_weights={ok}") == "", ok
    for bad in ("[-1, 2]", "[0, 0]"):
        assert "loss.class_weights must be non-negative with at least one positive weight" in _problems(
            *CLS, f"loss.class_weights={bad}"), bad


@pytest.mark.parametrize("gamma", ["0.5", "2"])
def test_any_focal_gamma_above_zero_needs_the_cls_head(gamma):
    assert "loss.focal_gamma needs model.head=cls" in _problems(f"loss.focal_gamma={gamma}")
    assert _problems(*CLS, f"loss.focal_gamma={gamma}") == ""


def test_auto_weights_and_balanced_sampling_each_alone_are_fine_together_refused():
    assert _problems(*CLS, "loss.class_weights=auto") == ""
    assert _problems(*CLS, "data.balanced_sampling=true") == ""
    assert "both correct the same imbalance" in _problems(*CLS, "loss.class_weights=auto", "data.balanced_sampling=true")
