"""DeepSpeed JSON resolution: every "auto" filled from the engine's config, every contradiction named with
both values. Pure functions: no deepspeed runtime, no process group."""

import json
from pathlib import Path

import pytest

from engine.backends import ds_config
from engine.config import load_config
from engine.errors import UsageError

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = [(0, "none"), (1, "none"), (2, "none"), (3, "none"), (2, "cpu"), (3, "cpu")]


def cfg_with(tmp_path, user: dict | None = None, **sets):
    overrides = {"dist.backend": "deepspeed", "train.micro_batch": 2, "train.grad_accum": 4, **sets}
    if user is not None:
        path = tmp_path / "ds.json"
        path.write_text(json.dumps(user))
        overrides["dist.ds_config"] = str(path)
    return load_config(None, [f"{k}={v}" for k, v in overrides.items()])


def resolve(cfg, world=2, hidden=64, params=200_000):
    resolved, problems = ds_config.resolve(cfg, world, hidden, params)
    assert not problems, problems
    return resolved


@pytest.mark.parametrize("stage,offload", SHIPPED)
def test_shipped_configs_are_what_the_engine_runs(stage, offload):
    shipped = json.loads((ROOT / "ds_configs" / ds_config.shipped_name(stage, offload)).read_text())
    assert shipped == ds_config.builtin(stage, offload)
    owned = [shipped["train_batch_size"], shipped["train_micro_batch_size_per_gpu"],
             shipped["gradient_accumulation_steps"], shipped["gradient_clipping"], shipped["bf16"]["enabled"],
             shipped["fp16"]["enabled"]]
    assert owned == ["auto"] * 6


def test_auto_values_are_filled_from_the_engine_config(tmp_path):
    path = ROOT / "ds_configs" / "zero3_offload.json"
    cfg = load_config(None, ["dist.backend=deepspeed", f"dist.ds_config={path}", "train.micro_batch=2",
                             "train.grad_accum=4", "train.clip_grad=0.5", "train.precision=bf16"])
    r = resolve(cfg, world=2, hidden=64)
    ds = r.ds
    assert (ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"], ds["train_batch_size"]) == (2, 4, 16)
    assert ds["gradient_clipping"] == 0.5 and ds["bf16"]["enabled"] is True and ds["fp16"]["enabled"] is False
    z = ds["zero_optimization"]
    assert (z["stage"], z["offload_optimizer"]["device"], z["offload_param"]["device"]) == (3, "cpu", "cpu")
    # the model-derived sizes: a model smaller than a bucket gets buckets of its own size
    assert (z["reduce_bucket_size"], z["stage3_prefetch_bucket_size"], z["stage3_param_persistence_threshold"]) \
        == (200_000, 200_000, 640)
    assert (r.stage, r.offload, r.offload_params) == (3, "cpu", True)
    assert "auto" not in json.dumps(ds)


def test_the_json_stage_is_used_when_dist_zero_stage_is_left_alone(tmp_path):
    r = resolve(cfg_with(tmp_path, {"zero_optimization": {"stage": 2}}))
    assert r.stage == 2 and r.ds["zero_optimization"]["stage"] == 2
    r = resolve(cfg_with(tmp_path, {"zero_optimization": {"stage": "auto"}}, **{"dist.zero_stage": 1}))
    assert r.stage == 1


def test_an_optimizer_section_gets_the_engine_hyperparameters(tmp_path):
    user = {"optimizer": {"type": "AdamW", "params": {"lr": "auto", "betas": "auto", "eps": "auto",
                                                      "weight_decay": "auto", "torch_adam": True}}}
    r = resolve(cfg_with(tmp_path, user, **{"optim.lr": 2e-4, "optim.eps": 1e-6}))
    assert r.has_optimizer_section
    assert r.ds["optimizer"]["params"] == {"lr": 2e-4, "betas": [0.9, 0.95], "eps": 1e-6, "weight_decay": 0.1,
                                           "torch_adam": True}


def test_an_all_auto_scheduler_is_dropped(tmp_path):
    user = {"scheduler": {"type": "WarmupCosineLR", "params": {"warmup_num_steps": "auto", "total_num_steps": "auto"}}}
    assert "scheduler" not in resolve(cfg_with(tmp_path, user)).ds


CONTRADICTIONS = [
    # (id, user JSON or None for the built-in config, --set, expected fragments); each exits 2 from `ftl train`
    ("accumulation", {"gradient_accumulation_steps": 8}, {},
     ["gradient_accumulation_steps=8 contradicts train.grad_accum=4"]),
    ("micro-batch", {"train_micro_batch_size_per_gpu": 3}, {},
     ["train_micro_batch_size_per_gpu=3 contradicts train.micro_batch=2"]),
    ("global-batch-never-fits", {"train_batch_size": 12}, {},
     ["train_batch_size=12 contradicts train.micro_batch x train.grad_accum = 8 for every world size"]),
    ("bf16-vs-fp32", {"bf16": {"enabled": True}}, {}, ["bf16.enabled=true contradicts train.precision=fp32"]),
    ("fp16-vs-bf16", {"fp16": {"enabled": True}}, {"train.precision": "bf16"},
     ["fp16.enabled=true contradicts train.precision=bf16"]),
    ("clipping", {"gradient_clipping": 0.3}, {}, ["gradient_clipping=0.3 contradicts train.clip_grad=1.0"]),
    ("stage-vs-stage", {"zero_optimization": {"stage": 2}}, {"dist.zero_stage": 3},
     ["zero_optimization.stage=2 contradicts dist.zero_stage=3"]),
    ("unknown-json-stage", {"zero_optimization": {"stage": 4}}, {},
     ["zero_optimization.stage must be 0, 1, 2 or 3 (got 4)"]),
    ("unknown-stage", None, {"dist.zero_stage": 5}, ["dist.zero_stage must be 0, 1, 2 or 3 (got 5)"]),
    ("offload-at-stage-0", None, {"dist.offload": "cpu"}, ["dist.offload=cpu needs ZeRO stage 1, 2 or 3"]),
    ("offload-device", {"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "gpu"}}}, {},
     ["zero_optimization.offload_optimizer.device must be none, cpu or nvme (got gpu)"]),
    ("param-offload-below-3", {"zero_optimization": {"stage": 2, "offload_param": {"device": "cpu"}}}, {},
     ["offload_param to cpu needs dist.zero_stage=3 (the stage is 2)"]),
    ("lr", {"optimizer": {"type": "AdamW", "params": {"lr": 0.1}}}, {},
     ["optimizer.params.lr=0.1 contradicts optim.lr=0.001"]),
    ("sgd", {"optimizer": {"type": "SGD"}}, {}, ["optimizer.type=SGD is not supported"]),
    ("scheduler", {"scheduler": {"type": "WarmupLR", "params": {"warmup_num_steps": 10}}}, {},
     ["scheduler sets warmup_num_steps, but the engine sets the learning rate every step"]),
]


@pytest.mark.parametrize("case", CONTRADICTIONS, ids=[c[0] for c in CONTRADICTIONS])
def test_contradictions_name_both_values(case, tmp_path):
    _, user, sets, expected = case
    with pytest.raises(UsageError) as e:
        cfg_with(tmp_path, user, **sets)
    text = e.value.render()
    for fragment in expected:
        assert fragment in text, text


def test_the_global_batch_is_checked_against_the_world_size(tmp_path):
    cfg = cfg_with(tmp_path, {"train_batch_size": 24})  # a multiple of 2 x 4: only the world size can tell
    assert ds_config.resolve(cfg, world=3, hidden=64)[1] == []
    _, problems = ds_config.resolve(cfg, world=2, hidden=64)
    assert problems == [f"dist.ds_config {tmp_path / 'ds.json'}: train_batch_size=24 contradicts train.micro_batch x "
                        f"train.grad_accum x world=16 (2 x 4 x 2 ranks); set it to \"auto\" or change "
                        f"train.micro_batch, train.grad_accum or the number of ranks"]


def test_load_config_reports_every_deepspeed_problem_at_once(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"gradient_accumulation_steps": 8, "bf16": {"enabled": True},
                               "zero_optimization": {"stage": 7}}))
    with pytest.raises(UsageError) as e:
        load_config(None, ["dist.backend=deepspeed", f"dist.ds_config={bad}", "train.grad_accum=4"])
    text = e.value.render()
    assert "3 problems" in text
    for fragment in ("gradient_accumulation_steps=8 contradicts train.grad_accum=4", "bf16.enabled=true",
                     "zero_optimization.stage must be 0, 1, 2 or 3 (got 7)"):
        assert fragment in text
    # without the world size only multiples can be checked: 12 is no multiple of 2 x 4 for any world
    tbs = tmp_path / "tbs.json"
    tbs.write_text(json.dumps({"train_batch_size": 12}))
    with pytest.raises(UsageError, match="train_batch_size=12 contradicts"):
        load_config(None, ["dist.backend=deepspeed", f"dist.ds_config={tbs}", "train.micro_batch=2",
                           "train.grad_accum=4"])


def test_not_json(tmp_path):
    bad = tmp_path / "broken.json"
    bad.write_text("{'stage': 3,}")
    with pytest.raises(UsageError, match="is not valid JSON"):
        load_config(None, ["dist.backend=deepspeed", f"dist.ds_config={bad}"])


def test_fp16_loss_scale_window_follows_the_engine_config(tmp_path):
    assert resolve(cfg_with(tmp_path, **{"train.loss_scale_window": 250})).ds["fp16"]["loss_scale_window"] == 250
    assert resolve(cfg_with(tmp_path)).ds["fp16"]["loss_scale_window"] == 1000
    with pytest.raises(UsageError, match="fp16.loss_scale_window=500 contradicts train.loss_scale_window=250"):
        cfg_with(tmp_path, {"fp16": {"loss_scale_window": 500}}, **{"train.loss_scale_window": 250})


def test_offload_at_stage_0_is_one_problem_not_three(tmp_path):
    """The built-in stage-0 config has no optimizer offload section to contradict dist.offload."""
    with pytest.raises(UsageError) as e:
        cfg_with(tmp_path, None, **{"dist.offload": "cpu"})
    assert e.value.problems == ["dist.offload=cpu needs ZeRO stage 1, 2 or 3 (the optimizer state must be partitioned "
                                "to be offloaded); set dist.zero_stage"]


def test_bucket_sizes_are_sized_for_throughput():
    """GPT-2 124M: a backward in 3 reductions, not the ~210 of hidden^2 buckets; ZeRO-3 can prefetch at least
    two of the largest block weights (c_fc, 4 hidden^2); 1.5B: 32 reductions; a tiny model's buffers are no
    larger than the model."""
    from math import ceil

    gpt2 = ds_config.bucket_sizes(768, 124_440_000)
    assert ceil(124_440_000 / gpt2["reduce_bucket_size"]) == 3
    assert ceil(124_440_000 / 768**2) > 200  # what hidden^2 gave
    assert gpt2["stage3_prefetch_bucket_size"] >= 2 * 4 * 768**2
    assert gpt2["stage3_param_persistence_threshold"] == 7680  # biases and LayerNorms stay whole
    xl = ds_config.bucket_sizes(1600, 1_557_611_200)
    assert ceil(1_557_611_200 / xl["reduce_bucket_size"]) == 32
    assert xl["stage3_prefetch_bucket_size"] >= 2 * 4 * 1600**2
    tiny = ds_config.bucket_sizes(64, 150_000)
    assert tiny["reduce_bucket_size"] == tiny["stage3_prefetch_bucket_size"] == 150_000


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_bf16_gradients_accumulate_and_reduce_in_fp32_where_deepspeed_can(tmp_path, stage):
    """bf16: data_types.grad_accum_dtype=fp32 at stages 1-3 (stage 0 cannot: a warning says so and what to do),
    communication_data_type=fp32 at every stage, written into the JSON DeepSpeed gets (and prints)."""
    r = resolve(cfg_with(tmp_path, **{"dist.zero_stage": stage, "train.precision": "bf16"}))
    assert r.ds["communication_data_type"] == "fp32"
    if stage == 0:
        assert "grad_accum_dtype" not in r.ds.get("data_types", {})
        assert r.notes == [ds_config.STAGE0_BF16_NOTE]
    else:
        assert r.ds["data_types"] == {"grad_accum_dtype": "fp32"} and r.notes == []
    fp32 = resolve(cfg_with(tmp_path, **{"dist.zero_stage": stage}))  # fp32 training: nothing to widen
    assert "data_types" not in fp32.ds and "communication_data_type" not in fp32.ds and fp32.notes == []
    mine = resolve(cfg_with(tmp_path, {"data_types": {"grad_accum_dtype": "bf16"}, "communication_data_type": "bf16"},
                            **{"dist.zero_stage": stage, "train.precision": "bf16"}))
    assert mine.ds["data_types"] == {"grad_accum_dtype": "bf16"} and mine.ds["communication_data_type"] == "bf16"
