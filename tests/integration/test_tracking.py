"""run.report_to and train.epochs, for real: MLflow read back with MlflowClient across a crash and two
resumes; W&B offline read back from its own files across a resume on another world size, with the run's
length given in epochs; a missing extra is exit 2 with the pip command."""

import json
import math
import struct
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import assert_train_refused, check, read_metrics, run_ftl, tiny_overrides, torchrun


def _expected(run_dir: Path) -> dict[tuple[int, str], float]:
    """(step, name) -> value for every number metrics.jsonl holds (what a tracker must show)."""
    out = {}
    for row in read_metrics(run_dir):
        for k, v in row.items():
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
                out[(row["step"], k)] = float(v)
    return out


# --------------------------------------------------------------------------------------------- MLflow

def test_mlflow_run_matches_metrics_jsonl_across_a_crash_and_resumes(tmp_path):
    from mlflow.tracking import MlflowClient

    run = tmp_path / "run"
    args = ["train", "--no-progress", *tiny_overrides(run, **{"checkpoint.every": 2, "train.eval_every": 3,
                                                              "run.report_to": "[mlflow]"})]
    # attempt 1 dies as step 6 starts: steps 1-5 are logged, the newest checkpoint is step 4
    first = run_ftl(args, FTL_FAULT_INJECT="crash@step=6,rank=0")
    assert first.returncode != 0 and max(r["step"] for r in read_metrics(run)) == 5, first.stderr[-2000:]
    err = first.stderr
    assert err.index("model gpt2-tiny (") < err.index("eval before training")  # the banner comes first
    assert first.stdout == ""  # every log line on one stream (stderr)
    # attempt 2 resumes from step 4 with another lr (steps 5-6 log new lr values); attempt 3 extends to step 8
    second = check(run_ftl([*args, "--set", "optim.lr=2e-3"]))
    assert second.stdout == "" and "resumed from" in second.stderr
    check(run_ftl([*args, "--set", "optim.lr=2e-3", "--set", "train.max_steps=8"]))
    assert not (run / "tb").exists()  # tensorboard left out of report_to

    state = json.loads((run / "mlflow.json").read_text())
    assert state["tracking_uri"] == f"sqlite:///{run.resolve() / 'mlruns' / 'mlflow.db'}"
    client = MlflowClient(state["tracking_uri"])
    (exp,) = [e for e in client.search_experiments() if e.name == "ftl-engine"]
    (only,) = client.search_runs([exp.experiment_id])  # one MLflow run for the three attempts
    assert only.info.run_id == state["run_id"] and only.info.status == "FINISHED"
    tags, params = only.data.tags, only.data.params
    assert tags["ftl.resumed_from_step"] == "6" and tags["ftl.resume_steps"] == "4,6"
    assert tags["ftl.changed.optim.lr"] == "0.002 from step 4" and tags["ftl.changed.train.max_steps"] == "8 from step 6"
    resolved = yaml.safe_load((run / "config.yaml").read_text())
    assert params["optim.lr"] == "0.001" and params["train.micro_batch"] == str(resolved["train"]["micro_batch"])
    assert params["run.report_to"] == '["mlflow"]' and len(params) == sum(len(s) for s in resolved.values())

    expected = _expected(run)
    got: dict[tuple[int, str], tuple[int, float]] = {}
    for key in {k for _, k in expected}:
        for m in client.get_metric_history(only.info.run_id, key):
            if (m.step, key) not in got or m.timestamp >= got[(m.step, key)][0]:
                got[(m.step, key)] = (m.timestamp, m.value)
    # the last value logged for each step is metrics.jsonl's (attempt 1's step 5 was logged again, later)
    assert {k: v for k, (_, v) in got.items()} == expected
    lr5 = [m.value for m in client.get_metric_history(only.info.run_id, "lr") if m.step == 5]
    assert len(lr5) == 2 and lr5[0] != lr5[1]  # MLflow keeps the failed attempt's value; the newer one counts
    assert max(s for s, _ in expected) == 8


# -------------------------------------------------------------------------------------- W&B + epochs

def wandb_history(path: Path) -> list[dict]:
    """The history rows of a W&B offline run file (run-<id>.wandb): W&B's LevelDB-style log of protobuf
    records (a 7-byte header, then 32 KiB blocks of records, each with a 7-byte header: crc, length, type)."""
    from wandb.proto import wandb_internal_pb2 as pb

    raw = path.read_bytes()
    assert raw[:4] == b":W&B", raw[:7]
    records, pending, pos, block = [], b"", 7, 32768
    while pos + 7 <= len(raw):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", raw[pos:pos + 7])
        chunk, pos = raw[pos + 7:pos + 7 + length], pos + 7 + length
        if kind == 0:
            break
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):  # a full record, or the last piece of one
            records.append(pending)
    rows = []
    for data in records:
        rec = pb.Record()
        rec.ParseFromString(data)
        if rec.WhichOneof("record_type") == "history":
            rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in rec.history.item})
    return rows


def _without_max_steps(args: list[str]) -> list[str]:
    i = args.index("train.max_steps=6")
    return args[:i - 1] + args[i + 1:]


def test_epochs_resolve_once_and_wandb_offline_continues_on_another_world_size(tmp_path):
    run = tmp_path / "run"
    args = ["train", "--no-progress", *_without_max_steps(tiny_overrides(run, **{
        "train.epochs": 0.01, "optim.warmup_steps": 20, "run.report_to": "[tensorboard,wandb]"}))]
    env = {"WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    # 2 ranks, global batch 8: 0.01 epochs of N samples is ceil(0.01 N / 8) steps; stop halfway
    first = check(torchrun(2, [*args, "--set", "train.stop_at_step=4"], **env))
    text = (run / "config.yaml").read_text()
    steps = yaml.safe_load(text)["train"]["max_steps"]
    samples = int(text.split(": ")[1].split(" training samples")[0])
    assert steps == math.ceil(0.01 * samples / 8) and steps > 4, text.splitlines()[0]
    assert text.startswith(f"# train.epochs=0.01 resolved to train.max_steps={steps}: {samples} training samples, "
                           f"global batch 8")
    assert yaml.safe_load(text)["train"]["epochs"] == 0.0  # config.yaml trains again as it is
    assert f"train.epochs=0.01: {steps} steps" in first.stderr
    assert "warning: optim.warmup_steps=20 is longer than the run" in first.stderr
    ckpt = json.loads((run / "checkpoints/step-000004/trainer_state.json").read_text())
    assert ckpt["epochs"] == {"epochs": 0.01, "max_steps": steps, "train_samples": samples, "global_batch": 8}
    # 1 rank (global batch 4): the same total, not ceil((0.01 N - 32) / 4) more steps
    second = check(run_ftl(args, **env))
    assert f"step {steps}/{steps}" in second.stderr and "train.epochs=0.01:" not in second.stderr
    rows = [r for r in read_metrics(run) if "loss" in r]
    assert rows[-1]["step"] == steps
    seen = {r["step"]: 8 * min(r["step"], 4) + 4 * max(0, r["step"] - 4) for r in rows}
    assert [r["epoch"] for r in rows] == [round(seen[r["step"]] / samples, 6) for r in rows]

    # W&B: one run id for both attempts (rank 0 only: one offline run per attempt), the same rows as metrics.jsonl
    run_id = json.loads((run / "wandb.json").read_text())["run_id"]
    files = sorted((run / "wandb").glob("offline-run-*/run-*.wandb"))
    assert [f.name for f in files] == [f"run-{run_id}.wandb"] * 2
    logged = {}
    for f in files:  # in attempt order (the directory names start with the time)
        for row in wandb_history(f):
            step = row.pop("step")
            logged.update({(step, k): float(v) for k, v in row.items() if not k.startswith("_")})
    assert logged == _expected(run)


# -------------------------------------------------------------------------------------------- extras

@pytest.mark.parametrize("tracker,module", [("mlflow", "mlflow"), ("mlflow", "sqlalchemy"), ("wandb", "wandb")])
def test_missing_extra_is_exit_2_with_the_pip_command(tracker, module, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setitem(sys.modules, module, None)  # how Python marks a module that cannot be imported
    assert_train_refused(tmp_path, [f"run.report_to=[tensorboard,{tracker}]"],
                         [f"run.report_to includes {tracker} but {module} is not installed: "
                          f"pip install 'ftl-engine[{tracker}]'"], capsys)


def test_unknown_tracker_is_refused(tmp_path, capsys):
    assert_train_refused(tmp_path, ["run.report_to=[tensorbord]"],
                         ["run.report_to: unknown tracker(s) 'tensorbord'; choose from tensorboard, mlflow, wandb"], capsys)
