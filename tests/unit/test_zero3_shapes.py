"""Helpers outside the backend that look at parameter shapes must read a ZeRO-3 partition's full shape.

Under ZeRO-3 every parameter is an empty (or flat) partition; DeepSpeed records the real shape in `ds_shape`
and the real size in `ds_numel`. Here the partitioning is imitated on a real model, without DeepSpeed, to pin
the three places that depend on it (the 2-rank runs in tests/distributed exercise them for real)."""

import torch
from torch import nn

from engine import model as model_lib, optim, positions


def partitioned(module: nn.Module) -> nn.Module:
    """Every parameter replaced by an empty partition carrying DeepSpeed's ds_* attributes (tied ones stay tied)."""
    replaced: dict[int, nn.Parameter] = {}
    for sub in module.modules():
        for name, p in list(sub.named_parameters(recurse=False)):
            if id(p) not in replaced:
                empty = nn.Parameter(torch.empty(0, dtype=p.dtype))
                empty.ds_shape, empty.ds_numel, empty.ds_id = p.shape, p.numel(), len(replaced)
                replaced[id(p)] = empty
            setattr(sub, name, replaced[id(p)])
    return module


def tiny_lm(n_positions: int = 1024):
    from transformers import GPT2LMHeadModel

    cfg = model_lib.preset_config("gpt2-tiny", vocab_size=300)
    cfg.n_positions = n_positions
    return GPT2LMHeadModel(cfg)


def test_weight_decay_groups_use_the_full_shape():
    full = optim.param_groups(tiny_lm(), 0.1)
    sharded = optim.param_groups(partitioned(tiny_lm()), 0.1)
    # a partition is 1-D: read naively, every matrix would lose its weight decay
    assert [len(g["params"]) for g in sharded] == [len(g["params"]) for g in full]
    assert [g["name"] for g in sharded] == ["decay", "no_decay"]


def test_parameter_count_uses_the_full_size():
    assert model_lib.num_parameters(partitioned(tiny_lm())) == model_lib.num_parameters(tiny_lm()) > 0


def test_a_model_built_with_the_positions_is_not_extended_again():
    model = partitioned(tiny_lm(n_positions=1100))
    assert positions.extend(model, 1100, "copy") is False  # already 1,100 rows, though the partition holds none
