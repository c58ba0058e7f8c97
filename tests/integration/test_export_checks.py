"""Invariants 3 and 8: the export checks can fail, and when they do nothing is left looking like a good export.

- The trainer's check of final/: an export corrupted on disk right after it is written (one tensor scaled, through
  tests/hooks/sitecustomize.py in the child) makes `ftl train` exit 1 naming the logit gap, keeps the final
  checkpoint, and leaves no final/ that looks like a model; and `Trainer.verify_export`, handed a model whose
  weights differ from the export by one layer scaled by 1.01, fails while the unchanged model passes.
- `ftl export`'s weight check: one element of one tensor moved by a single float step right after the export is
  written (far below any logit tolerance, so only the exact weight comparison can see it): exit 1, a message naming
  the tensor, nothing at --out and no temporary directory left beside it.
"""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch

from engine import checkpoint, cli
from engine.commands import export as deploy
from tests.conftest import ROOT, run_ftl, tiny_config, tiny_overrides

HOOKS = ROOT / "tests" / "hooks"
RUN = {"train.max_steps": 2, "checkpoint.every": 0, "train.sample_tokens": 0, "train.eval_batches": 1}


def _hooks_module():
    spec = importlib.util.spec_from_file_location("ftl_test_hooks", HOOKS / "sitecustomize.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # FTL_TEST_HOOKS is unset here: defines the helpers, installs nothing
    return module


def looks_like_a_model(path) -> bool:
    return path.is_dir() and (path / "config.json").is_file() and any(path.glob("*.safetensors"))


@pytest.fixture(scope="module")
def corrupted_final(tmp_path_factory):
    """`ftl train` whose final/ is corrupted on disk as soon as it is written (ln_f.weight x 1.5)."""
    run = tmp_path_factory.mktemp("corrupted") / "run"
    env = {"FTL_TEST_HOOKS": "perturb_export=transformer.ln_f.weight:scale=1.5",
           "PYTHONPATH": os.pathsep.join([str(HOOKS), str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = run_ftl(["train", "--no-progress", *tiny_overrides(run, **RUN)], **env)
    return run, proc


def test_a_corrupted_final_fails_the_run_with_exit_1_and_keeps_the_checkpoint(corrupted_final):
    run, proc = corrupted_final
    out = proc.stdout + proc.stderr
    assert "FTL_TEST perturbed transformer.ln_f.weight" in out, out[-3000:]  # the corruption happened
    assert proc.returncode == 1, f"exit {proc.returncode}\n{out[-4000:]}"
    assert "logits" in out and "final" in out, out[-4000:]  # names the failed comparison
    assert not looks_like_a_model(run / "final"), "a final/ that failed its check still looks like a good model"
    latest = checkpoint.find_latest(run / "checkpoints")  # the weights themselves are safe
    assert latest is not None and checkpoint.read_state(latest)["step"] == RUN["train.max_steps"]


def test_the_trainers_check_fails_for_weights_that_differ_from_the_export(corrupted_final, tmp_path):
    from engine.trainer import Trainer

    run, _ = corrupted_final
    trainer = Trainer(tiny_config(run, **RUN), progress=False)  # resumes the final checkpoint's weights
    try:
        good = tmp_path / "good"
        trainer.export(good)  # the export of these very weights passes
        layer = trainer.backend.module.hf.transformer.ln_f.weight
        with torch.no_grad():
            layer.mul_(1.01)
        with pytest.raises(Exception, match=r"(?i)logit"):
            trainer.verify_export(good)
        with torch.no_grad():
            layer.div_(1.01)
        trainer.verify_export(good)  # and passes again once the weights are the export's
    finally:
        trainer.close()


def test_ftl_export_weight_check_catches_one_float_step(corrupted_final, tmp_path, monkeypatch, capsys):
    from transformers import PreTrainedModel

    run, _ = corrupted_final
    ckpt = checkpoint.find_latest(run / "checkpoints")
    hooks = _hooks_module()
    name = "transformer.h.0.mlp.c_fc.weight"
    real = PreTrainedModel.save_pretrained

    def save_and_corrupt(self, save_directory, *args, **kwargs):
        result = real(self, save_directory, *args, **kwargs)
        hooks.perturb_file(os.path.join(str(save_directory), "model.safetensors"), name, "ulp")
        return result

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", save_and_corrupt)
    parent = tmp_path / "exports"
    parent.mkdir()
    out = parent / "model"
    with pytest.raises(SystemExit) as e:
        cli.main(["export", str(ckpt), "--out", str(out)])
    err = capsys.readouterr().err
    assert e.value.code == 1 and name in err, err
    assert not out.exists() and list(parent.iterdir()) == [], "something was left at or beside --out"
    monkeypatch.undo()
    report = deploy.export(ckpt, out, "hf")  # without the corruption the same export passes
    assert report["max_abs_diff"] <= 1e-5 and looks_like_a_model(out)
