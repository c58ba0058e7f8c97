"""Single-process fault tolerance end to end: a process killed (SIGKILL) in the middle of a checkpoint
save resumes from the previous complete checkpoint and reproduces the uninterrupted run bit for bit
(dropout on); config drift on resume; fp16 dynamic loss scaling backing off and recovering."""

import shutil

import pytest

from engine import checkpoint
from engine.errors import UsageError
from tests.conftest import read_metrics, tiny_config, tiny_overrides
from tests.fault_helpers import Watched, bitwise_equal, checkpoint_tensors, ftl_cmd, losses_by_step

SINGLE = {"model.dropout": 0.1, "train.max_steps": 8, "checkpoint.every": 2, "checkpoint.keep": 3,
          "train.sample_tokens": 0}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted run, in this process (one thread, like the CLI runs it is compared with)."""
    run = tmp_path_factory.mktemp("reference") / "run"
    trainer = _trainer(run)
    try:
        trainer.train()
    finally:
        trainer.close()
    return run


@pytest.fixture(scope="module")
def killed_and_resumed(reference, tmp_path_factory):
    run = tmp_path_factory.mktemp("killed") / "run"
    victim = Watched(ftl_cmd(["train", *tiny_overrides(run, **SINGLE)]), FTL_FAULT_INJECT="hang_save@step=6")
    victim.wait_for(r"FTL_FAULT hang_save rank 0 step 6")  # step 6's files written, COMPLETE not yet
    victim.proc.kill()  # SIGKILL: no handler, no cleanup
    assert victim.wait() == -9
    root = run / "checkpoints"
    torn = {"tmp": sorted(p.name for p in (root / ".tmp-step-000006").iterdir()),
            "latest": (root / "latest").read_text().strip(), "found": checkpoint.find_latest(root).name,
            "steps_logged": sorted(losses_by_step(run))}
    trainer = _trainer(run)  # the same command again (in this process: it is the same code path)
    try:
        resumed = {"from": trainer.resume_from, "step": trainer.step, "sample": trainer.sample_index}
        trainer.train()
    finally:
        trainer.close()
    return run, torn, resumed


def test_kill_during_save_resumes_from_the_previous_checkpoint_bitwise(reference, killed_and_resumed):
    run, torn, resumed = killed_and_resumed
    # the killed save left its files under a temporary name, never marked complete, never `latest`
    assert "model.safetensors" in torn["tmp"] and "trainer_state.json" in torn["tmp"] and "COMPLETE" not in torn["tmp"]
    assert torn["latest"] == torn["found"] == "step-000004"
    assert torn["steps_logged"] == [1, 2, 3, 4, 5, 6]  # the killed attempt had logged past its checkpoint
    assert resumed == {"from": run / "checkpoints" / "step-000004", "step": 4, "sample": 16}
    # the resumed run replaced the rows of steps 5-6 and matches the uninterrupted run bit for bit
    assert losses_by_step(run) == losses_by_step(reference)
    assert bitwise_equal(checkpoint_tensors(run / "checkpoints" / "step-000008"),
                         checkpoint_tensors(reference / "checkpoints" / "step-000008")) == []
    names = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert names == ["latest", "step-000004", "step-000006", "step-000008"]  # torn save gone, keep=3


def _trainer(run_dir, **overrides):
    from engine.trainer import Trainer

    return Trainer(tiny_config(run_dir, **{**SINGLE, **overrides}), progress=False)


def test_config_drift_on_resume(killed_and_resumed, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(killed_and_resumed[0], run)
    before = {p: p.stat().st_mtime_ns for p in run.rglob("*") if p.name != "LOCK"}  # LOCK names its holder
    for change, named in (({"model.name": "gpt2-mini"}, "model.name 'gpt2-tiny'; this run has 'gpt2-mini'"),
                          ({"data.source": "builtin:stdlib"}, "data.source 'builtin:pydoc'"),
                          ({"data.seq_len": 64}, "data.seq_len 32")):
        with pytest.raises(UsageError) as e:
            _trainer(run, **change)
        assert named in e.value.render() and "checkpoint.resume=none" in e.value.render()
    assert {p: p.stat().st_mtime_ns for p in run.rglob("*") if p.name != "LOCK"} == before  # nothing written
    # lr and max_steps: a logged warning, and the run continues from its checkpoint
    capsys.readouterr()
    trainer = _trainer(run, **{"optim.lr": 5e-4, "train.max_steps": 10})
    try:
        trainer.train()
    finally:
        trainer.close()
    out = capsys.readouterr()
    assert ("warning: resuming with changed settings: train.max_steps 8 -> 10; optim.lr 0.001 -> 0.0005"
            in out.out + out.err)
    assert sorted(losses_by_step(run))[-3:] == [8, 9, 10]


def test_fp16_loss_scale_backs_off_on_overflow_and_recovers(tmp_path, monkeypatch):
    monkeypatch.setenv("FTL_FAULT_INJECT", "nan@step=3")
    run = tmp_path / "run"
    trainer = _trainer(run, **{"model.dropout": 0.0, "train.precision": "fp16", "train.loss_scale_window": 2,
                               "train.max_steps": 6, "checkpoint.every": 1, "checkpoint.keep": 10})
    try:
        trainer.train()
    finally:
        trainer.close()
    rows = {r["step"]: r for r in read_metrics(run) if "loss" in r}
    scale = {s: r["loss_scale"] for s, r in rows.items()}
    assert rows[3]["skipped_steps"] == 1 and all("skipped_steps" not in rows[s] for s in (1, 2, 4, 5, 6))
    assert scale[3] == scale[2] / 2  # backed off on the overflow ...
    assert scale[5] == scale[3] * 2  # ... and grew back after loss_scale_window=2 clean steps
    assert bitwise_equal(checkpoint_tensors(run / "checkpoints" / "step-000003"),
                         checkpoint_tensors(run / "checkpoints" / "step-000002")) == []
    assert rows[6]["loss"] < rows[1]["loss"]  # and it trained
