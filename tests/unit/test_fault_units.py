"""Fault tolerance, the parts that need no second process: RNG round trip, data order after resume,
atomic checkpoints and retention, `latest` resolution, the non-finite guard, config drift, safe loading,
fault-injection parsing, the watchdog (in a child process: it ends its process)."""

import json
import os
import random
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from engine import checkpoint, fault, resume
from engine.data import sources as data
from engine.config import load_config
from engine.errors import UsageError
from tests.conftest import ROOT, env_for_subprocess


# ------------------------------------------------------------------------------------------------ RNG

def _draw():
    return (random.random(), float(np.random.rand()), torch.rand(3).tolist(), torch.randint(0, 10**6, (2,)).tolist())


def test_rng_round_trip_through_a_file(tmp_path):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    _draw()  # move every stream off its seed
    torch.save(checkpoint.rng_state(), tmp_path / "rng.pt")
    expected = [_draw() for _ in range(3)]
    random.seed(99), np.random.seed(99), torch.manual_seed(99)  # scramble
    checkpoint.set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    assert [_draw() for _ in range(3)] == expected
    # and dropout, the consumer that matters, draws the same masks
    checkpoint.set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    a = torch.nn.functional.dropout(torch.ones(64), 0.5)
    checkpoint.set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    assert torch.equal(a, torch.nn.functional.dropout(torch.ones(64), 0.5))


# ------------------------------------------------------------------------------------------ data order

class IdTok:
    pad_token_id = 0


def _ids_dataset(n):
    import datasets

    # sample i is [i+1, i+1, i+1]: the batches say which samples they hold
    ds = datasets.Dataset.from_dict({"input_ids": [[i + 1] * 3 for i in range(n)]}).with_format("numpy")
    return data.Prepared(ds, ds, IdTok(), "lm", 2)


def _samples(batches, steps):
    out = []
    for _ in range(steps):
        mbs = batches.next()
        out.append(sorted(int(x) - 1 for mb in mbs for x in mb["input_ids"][:, 0]))
    return out


def test_data_order_after_resume_is_the_uninterrupted_order_on_any_layout():
    prep = _ids_dataset(37)  # not a multiple of the batch: resumes cross epoch boundaries
    one = data.TrainBatches(prep, data.Layout(1, 0, 4, 2), seed=5, device=torch.device("cpu"))
    uninterrupted = _samples(one, 12)
    assert len({s for step in uninterrupted for s in step}) == 37  # several epochs, all samples seen
    k = 5
    # resumed at step k with the same layout: identical steps
    again = data.TrainBatches(prep, data.Layout(1, 0, 4, 2), 5, torch.device("cpu"), start_sample=k * 8)
    assert _samples(again, 12 - k) == uninterrupted[k:]
    # resumed on 2 ranks (4 x 1 each): together they cover exactly the same samples per step
    ranks = [data.TrainBatches(prep, data.Layout(2, r, 4, 1), 5, torch.device("cpu"), start_sample=k * 8)
             for r in range(2)]
    per_rank = [_samples(b, 12 - k) for b in ranks]
    assert [sorted(a + b) for a, b in zip(*per_rank)] == uninterrupted[k:]
    # a different global batch continues the same stream from the saved sample index
    half = data.TrainBatches(prep, data.Layout(1, 0, 4, 1), 5, torch.device("cpu"), start_sample=k * 8)
    flat = [s for step in _samples(half, 4) for s in step]
    stream = data.GlobalSampler(37, 5).indices(k * 8, 16).tolist()
    assert sorted(flat[:4]) == sorted(stream[:4]) and sorted(flat) == sorted(stream)


# -------------------------------------------------------------------------------- atomic checkpoints

class FileBackend:
    """The Backend methods the Checkpointer calls, writing one small real file."""

    name = "file"

    def __init__(self, value=0.0):
        self.value = value
        self.loaded_from = None
        self.resharded = None

    def save(self, path):
        from safetensors.torch import save_file

        save_file({"w": torch.full((4,), float(self.value))}, str(path / "model.safetensors"))

    def load(self, path):
        from safetensors.torch import load_file

        self.value = float(load_file(str(path / "model.safetensors"))["w"][0])
        self.loaded_from = path

    def load_resharded(self, path, saved_world):
        self.load(path)
        self.resharded = saved_world


def _save(ck, step, backend):
    backend.value = step
    return ck.save(step, backend, {"tokens": step * 10.0, "sample_index": step * 8, "global_batch": 8, "config": {}})


def test_save_is_complete_atomic_and_retained(tmp_path):
    ck = checkpoint.Checkpointer(tmp_path, keep=2, rank=0, world=1)
    backend = FileBackend()
    for step in (1, 2, 3, 4):
        path = _save(ck, step, backend)
        assert checkpoint.is_complete(path)
    root = tmp_path / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step-000003", "step-000004"]
    assert (root / "latest").read_text().strip() == "step-000004"
    state = checkpoint.read_state(root / "step-000004")
    assert (state["step"], state["sample_index"], state["world_size"]) == (4, 32, 1)
    # saving the same step again (a resumed run re-saving) replaces it whole
    backend.value = 40
    ck.save(4, backend, {"tokens": 0.0, "sample_index": 32, "global_batch": 8, "config": {}})
    fresh = FileBackend()
    ck.load(root / "step-000004", fresh)
    assert fresh.value == 40 and not list(root.glob(".old-*")) and not list(root.glob(".tmp-*"))


def test_retention_after_a_rollback_keeps_the_new_saves(tmp_path):
    """A run resumed from an older checkpoint writes lower steps after higher ones: retention and resume
    follow save order, so the checkpoint just written is never the one deleted."""
    ck = checkpoint.Checkpointer(tmp_path, keep=2, rank=0, world=1)
    backend = FileBackend()
    for step in (4, 6, 8):
        _save(ck, step, backend)
    root = tmp_path / "checkpoints"
    path = _save(ck, 5, backend)  # resumed from step-4 (rolled back), trained one step, saved
    assert checkpoint.is_complete(path)
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step-000005", "step-000008"]
    assert checkpoint.find_latest(root) == path
    (root / "latest").unlink()  # even without the pointer, resume picks the newest save, not the highest step
    assert checkpoint.find_latest(root) == path
    _save(ck, 6, backend)
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step-000005", "step-000006"]


def test_a_failed_delete_is_a_warning_not_a_crash(tmp_path, monkeypatch):
    ck = checkpoint.Checkpointer(tmp_path, keep=1, rank=0, world=1)
    backend = FileBackend()
    _save(ck, 1, backend)
    real_rmtree = checkpoint.shutil.rmtree

    def flaky(path, *a, **k):
        if str(path).endswith("step-000001"):
            raise OSError("Stale file handle")
        return real_rmtree(path, *a, **k)

    monkeypatch.setattr(checkpoint.shutil, "rmtree", flaky)
    with pytest.warns(UserWarning, match="could not delete old checkpoint .*step-000001.*Stale file handle"):
        path = _save(ck, 2, backend)
    assert checkpoint.find_latest(tmp_path / "checkpoints") == path
    # the leftover lost its COMPLETE marker first, so nothing can ever resume from it
    assert not checkpoint.is_complete(tmp_path / "checkpoints" / "step-000001")


def test_resume_target_resolution(tmp_path):
    root = tmp_path / "checkpoints"
    assert checkpoint.find_latest(root) is None  # nothing saved yet: start fresh
    ck = checkpoint.Checkpointer(tmp_path, keep=5, rank=0, world=1)
    backend = FileBackend()
    for step in (2, 4):
        _save(ck, step, backend)
    assert checkpoint.find_latest(root).name == "step-000004"
    # a torn save (a process killed before COMPLETE) is never picked, even when newer
    torn = root / ".tmp-step-000006"
    torn.mkdir()
    (torn / checkpoint.STATE).write_text("{}")
    partial = root / "step-000008"  # a directory without COMPLETE (e.g. copied by hand, half-way)
    partial.mkdir()
    (partial / checkpoint.STATE).write_text("{}")
    assert checkpoint.find_latest(root).name == "step-000004"
    # `latest` missing: the newest complete one
    (root / "latest").unlink()
    assert checkpoint.find_latest(root).name == "step-000004"
    # `latest` naming a deleted or incomplete checkpoint: the newest complete one
    (root / "latest").write_text("step-000008\n")
    assert checkpoint.find_latest(root).name == "step-000004"
    # `latest` is followed when it names an older complete checkpoint (a user rolled back)
    (root / "latest").write_text("step-000002\n")
    assert checkpoint.find_latest(root).name == "step-000002"


def test_resume_bad_paths_exit_2_and_write_nothing(tmp_path, capsys):
    from engine.cli import main
    from tests.conftest import tiny_overrides

    run_dir = tmp_path / "run"
    for bogus in (tmp_path / "no" / "such" / "checkpoint", tmp_path):
        with pytest.raises(SystemExit) as e:
            main(["train", *tiny_overrides(run_dir), "--set", f"checkpoint.resume={bogus}"])
        err = capsys.readouterr().err
        assert e.value.code == 2 and "checkpoint.resume" in err and str(bogus) in err, err
        assert not run_dir.exists()


def test_world_size_change_goes_through_load_resharded(tmp_path):
    two = checkpoint.Checkpointer(tmp_path, keep=2, rank=0, world=2)
    backend = FileBackend()
    path = _save(two, 3, backend)  # as rank 0 of 2 (no process group: the barriers are no-ops)
    torch.save(checkpoint.rng_state(), path / "rng-rank1.pt")
    one = checkpoint.Checkpointer(tmp_path, keep=2, rank=0, world=1)
    fresh = FileBackend()
    assert one.load(path, fresh)["sample_index"] == 24
    assert fresh.resharded == 2 and fresh.value == 3
    # a rank with no RNG file of its own (the job grew) is re-seeded from the step instead
    grown = checkpoint.Checkpointer(tmp_path, keep=2, rank=2, world=3)
    seen = []
    grown.load(path, FileBackend(), reseed=seen.append)
    assert seen == [3]


# ----------------------------------------------------------------------------------- safe loading

class Evil:
    def __reduce__(self):
        return (os.system, (f"touch {Evil.marker}",))


def test_checkpoints_never_execute_pickles(tmp_path):
    """A tampered checkpoint file holding a code-executing pickle is refused, and the code never runs."""
    ck = checkpoint.Checkpointer(tmp_path, keep=2, rank=0, world=1)
    path = _save(ck, 1, FileBackend())
    Evil.marker = tmp_path / "pwned"
    torch.save({"python": Evil()}, path / "rng-rank0.pt")
    with pytest.raises(Exception, match="Weights only load failed|Unsupported global"):
        ck.load(path, FileBackend())
    assert not Evil.marker.exists()


def test_ddp_backend_refuses_a_pickled_optimizer_file(tmp_path):
    from engine.backends.ddp import DDPBackend
    from engine.dist import DistEnv

    cfg = load_config(None, [])
    backend = DDPBackend(cfg, DistEnv())
    module = torch.nn.Linear(4, 2)
    backend.setup(module, [{"params": list(module.parameters())}])
    backend.save(tmp_path)
    Evil.marker = tmp_path / "pwned"
    torch.save({"optimizer": Evil()}, tmp_path / "optimizer.pt")
    with pytest.raises(Exception, match="Weights only load failed|Unsupported global"):
        backend.load(tmp_path)
    assert not Evil.marker.exists()


# ------------------------------------------------------------------------------ the non-finite guard

def _adamw_pair(fused):
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 4)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1, fused=fused or None,
                            foreach=None if fused else True)
    return model, opt


def _snapshot(model, opt):
    state = {f"p{i}": p.detach().clone() for i, p in enumerate(model.parameters())}
    for i, s in enumerate(opt.state.values()):
        state.update({f"s{i}.{k}": v.detach().clone() for k, v in s.items()})
    return state


@pytest.mark.parametrize("fused", [False, True], ids=["foreach", "fused"])
def test_a_nonfinite_step_leaves_weights_and_optimizer_state_untouched(fused):
    model, opt = _adamw_pair(fused)
    for bad_value in (None, float("nan"), float("inf")):
        model(torch.randn(2, 8)).sum().backward()
        if bad_value is not None:
            next(model.parameters()).grad[0, 0] = bad_value
        norm = torch.nn.utils.get_total_norm([p.grad for p in model.parameters()])
        before = _snapshot(model, opt)
        fault.step_unless_nonfinite(opt, norm)
        after = _snapshot(model, opt)
        opt.zero_grad()
        if bad_value is None:
            assert any(not torch.equal(before[k], after[k]) for k in before if k.startswith("p"))
        else:
            assert before.keys() == after.keys()
            assert all(torch.equal(before[k], after[k]) for k in before), f"{bad_value} changed state"
    # the guard leaves no trace on the optimizer, and it still trains
    assert not hasattr(opt, "found_inf") and "step" not in vars(opt)
    steps = [float(s["step"]) for s in opt.state.values()]
    assert steps == [1.0, 1.0]


def test_nan_if_nonfinite_is_exact_when_finite_and_poisons_the_gradient_otherwise():
    w = torch.randn(5, requires_grad=True)
    loss = (w * 3).sum()
    out = fault.nan_if_nonfinite(loss)
    assert torch.equal(out, loss)  # bit for bit
    out.backward()
    assert torch.equal(w.grad, torch.full((5,), 3.0))
    w.grad = None
    inf_loss = (w * 3).sum() + float("inf")
    fault.nan_if_nonfinite(inf_loss).backward()
    assert torch.isnan(w.grad).all()


def test_fp16_loss_scale_backs_off_and_recovers():
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0, growth_interval=2)
    model, opt = _adamw_pair(False)
    scales = []
    for step in range(5):
        loss = model(torch.randn(2, 8)).sum()
        scaler.scale(loss * (float("inf") if step == 1 else 1.0)).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()
        scales.append(scaler.get_scale())
    assert scales == [1024.0, 512.0, 512.0, 1024.0, 1024.0]


# ---------------------------------------------------------------------------------------- config drift

def test_config_drift_errors_warnings_and_silence(tmp_path):
    saved = load_config(None, ["model.name=gpt2-tiny", "data.seq_len=32"]).to_dict()
    same = load_config(None, ["model.name=gpt2-tiny", "data.seq_len=32", "train.log_every=3", "run.dir=elsewhere",
                              "dist.watchdog_s=5"])
    assert resume.config_drift(saved, same) == ([], [])
    changed = load_config(None, ["model.name=gpt2-mini", "data.seq_len=64", "data.source=builtin:stdlib",
                                 "run.seed=7", "optim.lr=5e-4", "train.max_steps=999"])
    errors, warns = resume.config_drift(saved, changed)
    assert sorted(e.split()[0] for e in errors) == ["data.seq_len", "data.source", "model.name", "run.seed"]
    assert sorted(w.split()[0] for w in warns) == ["optim.lr", "train.max_steps"]
    assert "optim.lr 0.001 -> 0.0005" in warns
    state = {"config": saved, "world_size": 2, "global_batch": 32, "sample_index": 320, "step": 10}
    with pytest.raises(UsageError) as e:
        resume.check_config(tmp_path, state, changed, world_size=1)
    msg = e.value.render()
    assert "4 problems" in msg and "model.name 'gpt2-tiny'; this run has 'gpt2-mini'" in msg
    assert "checkpoint.resume=none" in msg
    lines = []
    lr_only = load_config(None, ["model.name=gpt2-tiny", "data.seq_len=32", "optim.lr=5e-4", "train.micro_batch=8"])
    resume.check_config(tmp_path, state, lr_only, world_size=1, log=lines.append)
    text = "\n".join(lines)
    assert "warning: resuming with changed settings: train.micro_batch 16 -> 8; optim.lr 0.001 -> 0.0005" in text
    assert "global batch changes from 32 to 8" in text and "global sample 320" in text
    assert "written by 2 rank(s) on 1" in text


def test_model_shape_drift_is_an_error(tmp_path):
    from engine.model import preset_config

    preset_config("gpt2-tiny", 512).to_json_file(tmp_path / "config.json")
    resume.check_model_shape(tmp_path, preset_config("gpt2-tiny", 512))
    with pytest.raises(UsageError, match=r"n_layer 2 -> 4, n_embd 64 -> 128"):
        resume.check_model_shape(tmp_path, preset_config("gpt2-mini", 512))
    with pytest.raises(UsageError, match=r"vocab_size 512 -> 600"):
        resume.check_model_shape(tmp_path, preset_config("gpt2-tiny", 600))


# ------------------------------------------------------------------------------ injection and watchdog

def test_fault_injection_is_inert_unless_set_and_strict_when_set(monkeypatch):
    monkeypatch.delenv("FTL_FAULT_INJECT", raising=False)
    assert fault.planned("crash", 3, 1) is None
    monkeypatch.setenv("FTL_FAULT_INJECT", "crash@step=3,rank=1; nan@step=2 ;slow_save@seconds=0.5")
    assert fault.planned("crash", 3, 1) == fault.Fault("crash", 3, 1)
    assert fault.planned("crash", 3, 0) is None and fault.planned("crash", 4, 1) is None
    assert fault.planned("nan", 2, 5).rank is None  # no rank: every rank
    assert fault.planned("slow_save", 17, 0).seconds == 0.5
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")  # after an elastic restart: attempt 0 faults are off
    assert fault.planned("crash", 3, 1) is None
    with pytest.raises(UsageError) as e:
        fault.parse_faults("explode@step=1;crash@stp=2")
    assert "unknown fault 'explode'" in str(e.value) and "'stp=2'" in str(e.value)


def test_watchdog_dumps_every_thread_and_exits_4(tmp_path):
    script = textwrap.dedent(f"""
        import threading, time
        from engine.fault import Watchdog
        def data_loader_stuck_in_io():
            time.sleep(60)
        threading.Thread(target=data_loader_stuck_in_io, name="loader", daemon=True).start()
        Watchdog({str(tmp_path)!r}, rank=3, world=4, poll_s=0.05).arm(step=17, seconds=0.5)
        def main_thread_stuck_in_a_collective():
            time.sleep(60)
        main_thread_stuck_in_a_collective()
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, cwd=ROOT,
                          env=env_for_subprocess())
    assert proc.returncode == 4, proc.stderr
    dump = (tmp_path / "hang-rank3.txt").read_text()
    assert "rank 3 of 4, step 17" in dump and "deadline of 0.5 s" in dump
    assert "main_thread_stuck_in_a_collective" in dump and "data_loader_stuck_in_io" in dump
    assert "'MainThread'" in dump and "'loader'" in dump
    assert "step 17 exceeded its deadline of 0.5 s" in proc.stderr and "hang-rank3.txt" in proc.stderr


def test_launcher_forwards_the_preemption_signal_and_waits_for_the_save():
    from engine.commands import launch as launcher

    plan = launcher.LaunchPlan(["--set", "train.max_steps=5"], nproc_per_node=2)
    cmd = plan.command()
    assert "--signals-to-handle=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1" in cmd
    assert f"--shutdown-timeout={launcher.SHUTDOWN_TIMEOUT_S}" in cmd
    assert "TORCH_DISABLE_SHARE_RDZV_TCP_STORE" not in plan.env()
    plan.max_restarts = 2
    assert plan.env()["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] == "1"


def test_the_elastic_store_trap_is_named(monkeypatch):
    from engine import dist

    monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", "True")
    monkeypatch.setenv("TORCHELASTIC_MAX_RESTARTS", "0")
    assert dist.elastic_store_problem() is None
    monkeypatch.setenv("TORCHELASTIC_MAX_RESTARTS", "2")
    assert "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1" in dist.elastic_store_problem()
    monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", "False")  # what that variable gives the workers
    assert dist.elastic_store_problem() is None


def test_metrics_of_an_interrupted_attempt_are_replaced_on_resume(tmp_path):
    from engine.metrics import drop_rows_after

    path = tmp_path / "metrics.jsonl"
    rows = [{"step": s, "loss": 1.0} for s in range(1, 7)] + [{"step": 4, "eval_loss": 2.0}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 7, "lo')  # torn last line
    drop_rows_after(path, 4)
    assert [json.loads(x)["step"] for x in path.read_text().splitlines()] == [1, 2, 3, 4, 4]
