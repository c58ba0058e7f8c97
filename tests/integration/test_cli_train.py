"""`ftl train` end to end as a subprocess: run directory contract, TensorBoard read back, export logits,
and the commands that work on the exported model."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import check, read_metrics, run_ftl, tiny_overrides


@pytest.fixture(scope="module")
def lm_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("lm") / "run"
    proc = check(run_ftl(["train", *tiny_overrides(run_dir, **{"train.eval_every": 3, "checkpoint.every": 3,
                                                                 "train.max_steps": 6})]))
    return run_dir, proc


def test_run_directory_contract(lm_run):
    run_dir, proc = lm_run
    for name in ("config.yaml", "metrics.jsonl", "tb", "checkpoints/latest", "final/config.json",
                 "final/model.safetensors", "final/tokenizer.json"):
        assert (run_dir / name).exists(), name
    assert (run_dir / "checkpoints/latest").read_text().strip() == "step-000006"
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("step-*")) == ["step-000003", "step-000006"]
    rows = read_metrics(run_dir)
    train_rows = [r for r in rows if "loss" in r]
    assert [r["step"] for r in train_rows] == [1, 2, 3, 4, 5, 6]
    for r in train_rows:
        assert {"step", "loss", "lr", "grad_norm", "tokens", "tokens_per_s", "epoch"} <= r.keys()
    epochs = [r["epoch"] for r in train_rows]  # samples seen / training samples
    assert 0 < epochs[0] and epochs == sorted(epochs) and epochs[-1] == pytest.approx(6 * epochs[0], rel=1e-3)
    assert train_rows[-1]["tokens"] == 6 * 4 * 32  # steps x micro_batch x seq_len, packed
    evals = [r for r in rows if "eval_loss" in r]
    assert [r["step"] for r in evals] == [0, 3, 6] and all("eval_ppl" in r for r in evals)
    assert evals[-1]["eval_loss"] < evals[0]["eval_loss"]
    # the console shows the loss, the evals, a sample and where the run went
    for text in ("eval before training", "step 6/6", "eval after training", "sample:", "run directory:"):
        assert text in proc.stderr
    # what runs is said before anything it computes, and every log line goes to one stream
    assert proc.stderr.index("model gpt2-tiny (") < proc.stderr.index("eval before training")
    assert proc.stdout == ""


def test_tensorboard_events_read_back(lm_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir, _ = lm_run
    acc = EventAccumulator(str(run_dir / "tb"))
    acc.Reload()
    tags = acc.Tags()["scalars"]
    for tag in ("train/loss", "train/lr", "train/grad_norm", "train/tokens_per_s", "eval/loss", "eval/ppl"):
        assert tag in tags, tags
    losses = acc.Scalars("train/loss")
    assert [e.step for e in losses] == [1, 2, 3, 4, 5, 6]
    jsonl = [r["loss"] for r in read_metrics(run_dir) if "loss" in r]
    assert [e.value for e in losses] == pytest.approx(jsonl, rel=1e-6)
    assert [e.value for e in acc.Scalars("train/lr")][:2] == pytest.approx([5e-4, 1e-3])


def test_final_reloads_with_plain_transformers_and_matches_the_engine(lm_run):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from engine import model as model_lib

    run_dir, _ = lm_run
    hf = AutoModelForCausalLM.from_pretrained(run_dir / "final").eval()
    tok = AutoTokenizer.from_pretrained(run_dir / "final")
    ids = tok(["The with statement", "A class definition"], return_tensors="pt", padding=True)
    # the engine's own model: the last checkpoint's weights (as the backend saved them) in a TrainModule
    # whose every weight was scrambled first, so nothing of final/ survives unless the checkpoint has it
    engine_state = load_file(str(run_dir / "checkpoints/step-000006/model.safetensors"))
    module = model_lib.TrainModule(AutoModelForCausalLM.from_pretrained(run_dir / "final"), "lm").eval()
    with torch.no_grad():
        for p in module.parameters():
            p.normal_()
    missing, unexpected = module.load_state_dict(engine_state, strict=False)
    # the tied embedding is stored under one of its two names; both name one tensor
    assert not unexpected and len(missing) <= 1 and set(missing) <= {"hf.lm_head.weight", "hf.transformer.wte.weight"}
    assert module.hf.lm_head.weight is module.hf.transformer.wte.weight
    with torch.no_grad():
        ours = module.logits(ids["input_ids"], ids["attention_mask"])
        theirs = hf(**ids).logits
    assert torch.allclose(ours, theirs, atol=1e-5)
    assert hf.lm_head.weight.data_ptr() == hf.transformer.wte.weight.data_ptr()  # still tied after reload


def test_generate_and_eval_on_the_exported_model(lm_run, tmp_path):
    run_dir, _ = lm_run
    a = check(run_ftl(["generate", run_dir / "final", "--prompt", "The with", "--max-new-tokens", "5", "--seed", "1"]))
    b = check(run_ftl(["generate", run_dir, "--prompt", "The with", "--max-new-tokens", "5", "--seed", "1"]))
    assert a.stdout.startswith("The with") and a.stdout == b.stdout  # seeded; run dir resolves to final/
    ev = check(run_ftl(["eval", run_dir, "--data", "builtin:pydoc", "--json", "--max-batches", "2", "--batch-size", "4"]))
    res = json.loads(ev.stdout)
    assert res["eval_loss"] > 0 and res["eval_ppl"] > 1 and res["split"] == "validation"
    # the same numbers the run logged at its end: same split, same samples
    logged = [r for r in read_metrics(run_dir) if "eval_loss" in r][-1]
    assert res["eval_loss"] == pytest.approx(logged["eval_loss"], rel=1e-4)
    # without --data: the run's own data source (its config.yaml), so the same numbers
    own = check(run_ftl(["eval", run_dir, "--json", "--max-batches", "2", "--batch-size", "4"]))
    assert json.loads(own.stdout) == res
    shutil.copytree(run_dir / "final", tmp_path / "model")  # a model directory alone knows no data
    bare = run_ftl(["eval", tmp_path / "model"])
    assert bare.returncode == 2 and "--data is needed" in bare.stderr and "Traceback" not in bare.stderr


def test_rerun_resumes_and_export_command(lm_run, tmp_path):
    run_dir, _ = lm_run
    again = check(run_ftl(["train", *tiny_overrides(run_dir, **{"train.max_steps": 6})]))
    assert "run already complete at step 6" in again.stderr
    # checkpoint.resume=none ignores the checkpoints there and trains from step 0: the same losses again
    fresh_dir = tmp_path / "fresh"
    shutil.copytree(run_dir, fresh_dir)
    fresh = check(run_ftl(["train", *tiny_overrides(fresh_dir, **{"train.max_steps": 6, "checkpoint.resume": "none"})]))
    assert "step 1/6" in fresh.stderr and "resumed from" not in fresh.stderr and "already complete" not in fresh.stderr
    first = [r["loss"] for r in read_metrics(run_dir) if "loss" in r]
    assert [r["loss"] for r in read_metrics(fresh_dir) if "loss" in r][-6:] == first
    out = tmp_path / "exported"
    check(run_ftl(["export", run_dir / "checkpoints/step-000003", "--out", out]))
    w3 = load_file(str(out / "model.safetensors"))
    ck = load_file(str(run_dir / "checkpoints/step-000003/model.safetensors"))
    assert torch.equal(w3["transformer.h.0.mlp.c_fc.weight"], ck["hf.transformer.h.0.mlp.c_fc.weight"])
    assert all(torch.equal(w3[k], ck["hf." + k]) for k in w3 if "hf." + k in ck)
    # the tied embedding is stored once in the checkpoint and restored under its own name
    assert torch.equal(w3["transformer.wte.weight"], ck["hf.lm_head.weight"])


def test_config_show_and_help():
    shown = check(run_ftl(["config", "show", "--set", "train.max_steps=50", "--set", "optim.lr=1e-4"]))
    assert "max_steps: 50" in shown.stdout and "lr: 0.0001" in shown.stdout
    top = check(run_ftl(["--help"]))
    for cmd in ("train", "launch", "eval", "generate", "export", "config"):
        assert cmd in top.stdout
        assert check(run_ftl([cmd, "--help"])).stdout.startswith("Usage: ftl " + cmd)
    keys = check(run_ftl(["config", "keys"]))
    assert "train.grad_accum" in keys.stdout and "Micro-batches per optimizer step" in keys.stdout


def test_launch_dry_run():
    out = check(run_ftl(["launch", "--nproc-per-node", "2", "--dry-run", "--set", "train.max_steps=5"])).stdout
    assert ("torch.distributed.run --nproc-per-node=2 --standalone "
            "--signals-to-handle=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1 --shutdown-timeout=300 "
            "-m engine.cli train --set train.max_steps=5") in out
    restarts = check(run_ftl(["launch", "--nproc-per-node", "2", "--max-restarts", "3", "--dry-run"])).stdout
    assert restarts.startswith("TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 ") and "--max-restarts=3" in restarts
