"""Config loading, overrides, coercion and validation that reports every problem at once."""

import pytest

from engine.config import Config, describe, load_config
from engine.errors import UsageError


def test_defaults_are_the_offline_demo_job():
    cfg = load_config()
    assert cfg.model.name == "gpt2-mini" and cfg.data.source == "builtin:pydoc"
    assert str(cfg.run_dir) == "runs/default"
    assert cfg.validate() == []


def test_file_then_overrides_with_type_coercion(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("train:\n  max_steps: 10\n  micro_batch: 2\noptim:\n  lr: 0.01\n")
    cfg = load_config(str(f), ["train.max_steps=50", "optim.lr=1e-4", "model.compile=true", "optim.betas=[0.8,0.9]"])
    assert cfg.train.max_steps == 50 and cfg.train.micro_batch == 2
    assert cfg.optim.lr == 1e-4 and isinstance(cfg.optim.lr, float)  # YAML reads 1e-4 as a string
    assert cfg.model.compile is True
    assert cfg.optim.betas == [0.8, 0.9]


def test_json_config_file(tmp_path):
    f = tmp_path / "c.json"
    f.write_text('{"train": {"max_steps": 7}}')
    assert load_config(str(f)).train.max_steps == 7


@pytest.mark.parametrize(
    "overrides, expected",
    [
        (["train.micro_batchh=4"], "unknown config key 'train.micro_batchh'; did you mean 'train.micro_batch'?"),
        (["trian.max_steps=4"], "unknown config key 'trian'"),
        (["train.max_steps=abc"], "train.max_steps must be an integer (got 'abc')"),
        (["train.micro_batch=0"], "train.micro_batch must be positive (got 0)"),
        (["optim.lr=-1"], "optim.lr must be positive (got -1.0)"),
        (["data.seq_len=0"], "data.seq_len must be positive"),
        (["train.precision=fp8"], "train.precision must be one of auto, fp32, bf16, fp16 (got 'fp8')"),
        (["model.head=regression"], "model.head must be one of lm, cls"),
        (["dist.zero_stage=5", "dist.backend=deepspeed"], "dist.zero_stage must be 0, 1, 2 or 3 (got 5)"),
        (["dist.zero_stage=2"], "need dist.backend=deepspeed"),
        (["model.compile=maybe"], "model.compile must be true or false"),
        (["optim.betas=[0.9]"], "optim.betas must be two numbers"),
        (["checkpoint.resume=/no/such/ckpt"], "checkpoint.resume: no checkpoint at '/no/such/ckpt'"),
        (["train.max_steps"], "must look like section.key=value"),
    ],
)
def test_each_bad_value_is_named(overrides, expected):
    with pytest.raises(UsageError) as e:
        load_config(None, overrides)
    assert expected in str(e.value)


def test_every_problem_reported_at_once():
    with pytest.raises(UsageError) as e:
        load_config(None, ["train.micro_batch=0", "optim.lr=0", "data.seq_len=-3", "bogus.key=1"])
    msg = str(e.value)
    assert msg.startswith("error: 4 problems:")
    for part in ("train.micro_batch", "optim.lr", "data.seq_len", "'bogus'"):
        assert part in msg


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(UsageError, match="config file not found"):
        load_config(str(tmp_path / "nope.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [1, 2\n")
    with pytest.raises(UsageError, match="cannot parse config file"):
        load_config(str(bad))
    flat = tmp_path / "flat.yaml"
    flat.write_text("- 1\n- 2\n")
    with pytest.raises(UsageError, match="must hold a mapping"):
        load_config(str(flat))


def test_every_key_documents_itself():
    rows = describe()
    keys = {k for k, *_ in rows}
    for k in ("run.seed", "model.head", "data.seq_len", "train.grad_accum", "optim.schedule", "dist.zero_stage",
              "checkpoint.keep"):
        assert k in keys
    assert all(help_text for *_, help_text in rows)


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(None, ["train.max_steps=9"])
    f = tmp_path / "resolved.yaml"
    f.write_text(cfg.to_yaml())
    assert load_config(str(f)) == cfg
    assert isinstance(Config().to_dict()["optim"]["betas"], list)


def test_every_builtin_source_is_documented():
    """`ftl config keys` (the data.source help) names every builtin:<name> the engine registers."""
    from engine.data import sources as data
    from engine.config import describe

    (help_text,) = [h for key, _, _, h in describe() if key == "data.source"]
    assert set(data.BUILTINS) >= {"pydoc", "stdlib", "stdlib_packages"}
    for name in data.BUILTINS:
        assert f"builtin:{name} " in help_text, name


def test_epochs_or_max_steps():
    from engine.config import load_config

    assert load_config(None, ["train.epochs=1.5"]).train.epochs == 1.5
    with pytest.raises(UsageError, match="train.epochs=2 and train.max_steps=10 are both set"):
        load_config(None, ["train.epochs=2", "train.max_steps=10"])
    with pytest.raises(UsageError, match="train.epochs must be >= 0"):
        load_config(None, ["train.epochs=-1"])
    assert load_config(None, ["train.epochs=0", "train.max_steps=10"]).train.max_steps == 10  # epochs 0: unset
