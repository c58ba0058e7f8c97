"""The CLI side of the DeepSpeed backend: bad DeepSpeed input exits 2 before anything is written, and the
deepspeed launcher's extra argument and environment are understood."""

import json

import pytest

from engine.cli import main
from tests.conftest import assert_train_refused

CASES = [
    # (id, --set overrides, JSON written to {tmp}/ds.json or None, expected fragments)
    ("unknown-stage", ["dist.backend=deepspeed", "dist.zero_stage=4"], None,
     ["dist.zero_stage must be 0, 1, 2 or 3 (got 4)"]),
    ("unknown-json-stage", ["dist.backend=deepspeed"], {"zero_optimization": {"stage": "3b"}},
     ["zero_optimization.stage must be 0, 1, 2 or 3 (got 3b)"]),
    ("contradictions", ["dist.backend=deepspeed", "train.grad_accum=2"],
     {"gradient_accumulation_steps": 4, "train_batch_size": 6, "bf16": {"enabled": True}},
     ["3 problems", "gradient_accumulation_steps=4 contradicts train.grad_accum=2",
      "train_batch_size=6 contradicts train.micro_batch x train.grad_accum = 8 for every world size",
      "bf16.enabled=true contradicts train.precision=fp32"]),
    ("zero-without-deepspeed", ["dist.zero_stage=2"], None,
     ["dist.zero_stage / dist.ds_config need dist.backend=deepspeed"]),
    ("missing-json", ["dist.backend=deepspeed", "dist.ds_config={tmp}/nope.json"], None, ["no such file"]),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_deepspeed_input_exits_2(case, tmp_path, capsys):
    _, overrides, user_json, expected = case
    if user_json is not None:
        (tmp_path / "ds.json").write_text(json.dumps(user_json))
        overrides = overrides + [f"dist.ds_config={tmp_path / 'ds.json'}"]
    assert_train_refused(tmp_path, overrides, expected, capsys)


def test_the_deepspeed_launchers_local_rank_argument_is_accepted(capsys):
    # `deepspeed ... $(which ftl) train` runs `ftl --local_rank=N train ...`
    main(["--local_rank=1", "config", "show", "--set", "dist.backend=deepspeed"])
    assert "backend: deepspeed" in capsys.readouterr().out


def test_launcher_environment_of_the_deepspeed_launcher(monkeypatch):
    from engine import dist

    for k, v in {"RANK": "3", "LOCAL_RANK": "1", "WORLD_SIZE": "4", "LOCAL_SIZE": "2", "CROSS_RANK": "1",
                 "CROSS_SIZE": "2", "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29500"}.items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert dist.launcher_env() == {"rank": 3, "world_size": 4, "local_rank": 1, "local_world_size": 2,
                                   "launcher": "deepspeed"}
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")  # torchrun's name for it
    assert dist.launcher_env()["launcher"] == "torchrun"
