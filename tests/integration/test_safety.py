"""Never lose or corrupt a user's work (issue 12), end to end with real processes, files and signals:

- damaged checkpoints (flipped bytes, a truncated safetensors, an invalid trainer_state.json) are named
  by path and reason; resume=auto and `ftl export RUN` fall back to the newest one that verifies; a
  damaged checkpoint named explicitly is refused with exit 2;
- `ftl export --out` never deletes what it did not write; final/ and best/ likewise; a run that is already complete
  rewrites nothing;
- Ctrl-C to `ftl train`: a checkpoint, exit 130 and the exact command that resumes (run here: it resumes);
  a second Ctrl-C during a save ends the process at once; Ctrl-C to torchrun with timed saves
  (checkpoint.every_minutes) on 2 ranks;
- the run-directory lock against a second `ftl train`, a holder killed with SIGKILL, the resume after it
  while a reader holds an old checkpoint, and every logged (step, kind) once after a crash before the
  first checkpoint;
- SIGTERM and SIGINT before the first step end the process at once (75, 130);
- a full disk (a real tmpfs) mid-run: exit 1 naming the place, `latest` unchanged; a run directory on a
  read-only file system: exit 2.
"""

import json
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from engine import checkpoint, cli, integrity, ownership
from tests.conftest import read_metrics, run_ftl, tiny_config, tiny_overrides
from tests.fault_helpers import Watched, ftl_cmd, torchrun_cmd

BASE = {"train.max_steps": 6, "checkpoint.every": 2, "checkpoint.keep": 3, "train.sample_tokens": 0}


def _train(run_dir, **overrides):
    from engine.trainer import Trainer

    trainer = Trainer(tiny_config(run_dir, **{**BASE, **overrides}), progress=False)
    try:
        return trainer, trainer.train()
    finally:
        trainer.close()


@pytest.fixture(scope="module")
def run6(tmp_path_factory):
    run = tmp_path_factory.mktemp("safety") / "run"
    _train(run)
    return run


def _copy(run6, tmp_path) -> Path:
    run = tmp_path / "run"
    shutil.copytree(run6, run)
    return run


def _flip(path, n=64):
    with open(path, "r+b") as f:
        f.seek(path.stat().st_size // 2)
        data = bytearray(f.read(n))
        f.seek(path.stat().st_size // 2)
        f.write(bytes(b ^ 0xFF for b in data))


def _snapshot(root: Path) -> dict:
    return {p: (p.stat().st_mtime_ns, p.stat().st_size) for p in root.rglob("*") if p.name != "LOCK"}


def _exit_code(args, capsys) -> tuple[int, str]:
    try:
        cli.main(args)
        code = 0
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr().err


# ------------------------------------------------------------------------------ damaged checkpoints

def test_damaged_checkpoints_are_named_skipped_and_refused(run6, tmp_path, capsys):
    run = _copy(run6, tmp_path)
    root = run / "checkpoints"
    # every file of every checkpoint has a digest, with one file mode throughout (safetensors' 0600 is gone)
    for ck in root.glob("step-*"):
        listed, _ = integrity.read_manifest(ck)
        assert set(listed) == {p.relative_to(ck).as_posix() for p in ck.rglob("*") if p.is_file()} - {"MANIFEST.json", "COMPLETE"}
    modes = {oct(p.stat().st_mode & 0o777) for d in (root / "step-000006", run / "final") for p in d.rglob("*") if p.is_file()}
    assert len(modes) == 1, modes
    _flip(root / "step-000006" / "optimizer.pt")  # what the issue did: resume used to succeed, loss 1.4e8
    _flip(root / "step-000006" / "model.safetensors")  # ... and `ftl export` shipped this with exit 0
    before = _snapshot(run)
    code, err = _exit_code(["train", *tiny_overrides(run, **BASE), "--set", "train.max_steps=8",
                            "--set", f"checkpoint.resume={root / 'step-000006'}"], capsys)
    assert code == 2 and "Traceback" not in err, err
    assert f"checkpoint {root / 'step-000006'} is damaged: model.safetensors: its content differs" in err
    assert "optimizer.pt: its content differs" in err
    assert _snapshot(run) == before  # nothing written
    code, err = _exit_code(["export", str(root / "step-000006"), "--out", str(tmp_path / "x")], capsys)
    assert code == 2 and "is damaged: model.safetensors" in err and not (tmp_path / "x").exists()
    # `ftl export RUN` (a real process): the newest checkpoint that verifies, saying which it skipped
    proc = run_ftl(["export", run, "--out", tmp_path / "exported"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"checkpoint {root / 'step-000006'} failed verification and is skipped" in proc.stderr
    assert json.loads((tmp_path / "exported" / "export.json").read_text())["source"] == f"checkpoint {root / 'step-000004'}"
    # resume=auto: continues from step 4, trains to 8 (the damaged step 6 is replaced by a good save)
    trainer, summary = _train(run, **{"train.max_steps": 8})
    err = capsys.readouterr().err
    assert trainer.resume_from == root / "step-000004" and summary["step"] == 8
    assert "failed verification and is skipped: model.safetensors: its content differs" in err
    assert checkpoint.verify(root / "step-000006") == []
    assert all(r["loss"] < 10 for r in read_metrics(run) if "loss" in r)
    # nothing verifies: a truncated safetensors, an invalid trainer_state.json, flipped bytes -> exit 2
    with open(root / "step-000008" / "model.safetensors", "r+b") as f:
        f.truncate(1000)
    (root / "step-000006" / "trainer_state.json").write_text('{"step": 6, "tok')
    _flip(root / "step-000004" / "rng-rank0.pt")
    code, err = _exit_code(["train", *tiny_overrides(run, **BASE), "--set", "train.max_steps=10"], capsys)
    assert code == 2 and "Traceback" not in err, err
    for name, why in (("step-000008", "model.safetensors: 1000 bytes, saved with"),
                      ("step-000006", "trainer_state.json: not valid JSON"),
                      ("step-000004", "rng-rank0.pt: its content differs")):
        assert f"{root / name}: {why}" in err, err


# ----------------------------------------------------------------------------------- write targets

def test_export_never_deletes_what_it_did_not_write(run6, tmp_path, capsys, monkeypatch):
    run = _copy(run6, tmp_path)
    work = tmp_path / "work"
    work.mkdir()
    (work / "notes.txt").write_text("precious")
    monkeypatch.chdir(work)
    before = {**_snapshot(run), **_snapshot(work)}
    for out, why in ((".", "is the current directory"), (str(run), "is the source"), (str(tmp_path), "contains"),
                     (str(work / "notes.txt"), "is a file")):
        code, err = _exit_code(["export", str(run), "--out", out, "--force"], capsys)
        assert code == 2 and why in err, (out, err)
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "model.safetensors").write_text("someone else's")
    code, err = _exit_code(["export", str(run / "final"), "--out", str(theirs), "--force"], capsys)
    assert code == 2 and "not an earlier export (no export.json); it is left alone" in err
    assert (theirs / "model.safetensors").read_text() == "someone else's" and len(list(theirs.iterdir())) == 1
    assert {**_snapshot(run), **_snapshot(work)} == before  # nothing touched
    out = tmp_path / "exported"
    code, err = _exit_code(["export", str(run / "final"), "--out", str(out)], capsys)
    assert code == 0, err
    assert sorted(json.loads((out / "export.json").read_text())["files"]) == sorted(ownership.list_files(out))
    code, err = _exit_code(["export", str(run / "final"), "--out", str(out)], capsys)
    assert code == 2 and "holds an earlier export; pass --force" in err
    code, err = _exit_code(["export", str(run / "final"), "--out", str(out), "--format", "torchscript", "--force"], capsys)
    assert code == 0 and (out / "model.pt").is_file() and not (out / "model.safetensors").exists(), err
    # final/ holding a file the engine did not write: the run stops at start (exit 2), nothing written
    (run / "final" / "my-notes.txt").write_text("mine")
    before = _snapshot(run)
    code, err = _exit_code(["train", *tiny_overrides(run, **BASE), "--set", "train.max_steps=8"], capsys)
    assert code == 2 and "run.dir's final/" in err and "my-notes.txt" in err, err
    assert _snapshot(run) == before
    # best/ likewise (a directory the user made there, without the engine's export.json)
    (run / "final" / "my-notes.txt").unlink()
    (run / "best").mkdir()
    (run / "best" / "weights.bin").write_text("mine")
    before = _snapshot(run)
    code, err = _exit_code(["train", *tiny_overrides(run, **BASE), "--set", "train.max_steps=8"], capsys)
    assert code == 2 and "run.dir's best/" in err and "run.dir's final/" not in err, err
    assert _snapshot(run) == before


def test_an_already_complete_run_rewrites_nothing(run6, tmp_path, capsys):
    run = _copy(run6, tmp_path)
    before = _snapshot(run)
    config = (run / "config.yaml").read_bytes()
    code, err = _exit_code(["train", *tiny_overrides(run, **BASE), "--set", "train.log_every=3"], capsys)
    assert code == 0 and "run already complete at step 6" in err
    assert (run / "config.yaml").read_bytes() == config and _snapshot(run) == before


# ----------------------------------------------------------------------------------------- Ctrl-C

def test_ctrl_c_saves_exits_130_and_prints_the_command_that_resumes(tmp_path):
    run = tmp_path / "run"
    job = Watched(ftl_cmd(["train", *tiny_overrides(run, **{"train.max_steps": 40, "train.sample_tokens": 0})]))
    job.wait_for(r"step 3/40")
    job.proc.send_signal(signal.SIGINT)
    rc = job.wait()
    out = job.output
    assert rc == 130, out[-3000:]
    m = re.search(r"stopped: interrupted \(Ctrl-C\): checkpoint (\S+) saved at step (\d+); to resume: (.+)", out)
    assert m, out[-3000:]
    ckpt, step, command = Path(m[1]), int(m[2]), m[3]
    assert checkpoint.is_complete(ckpt) and checkpoint.verify(ckpt) == [] and step >= 3
    assert not (run / "PREEMPTED").exists()  # a person's Ctrl-C does not ask for a requeue
    # The printed command, run by a shell: it resumes there. A Ctrl-C, then a second one while the save
    # sits (slow_save): the process ends at once, that save stays incomplete, `latest` stays where it was.
    resumed = Watched(["bash", "-c", command], FTL_FAULT_INJECT="slow_save@seconds=120")
    resumed.wait_for(rf"resumed from {re.escape(str(ckpt))} at step {step}")
    resumed.wait_for(rf"step {step + 1}/40")
    rank = _the_rank(resumed)
    rank.send_signal(signal.SIGINT)
    resumed.wait_for(r"FTL_FAULT slow_save")
    t0 = time.monotonic()
    rank.send_signal(signal.SIGINT)
    assert resumed.wait(60) == 130
    took = time.monotonic() - t0
    assert took < 30 and "aborted: second Ctrl-C" in resumed.output, resumed.output[-2000:]
    assert checkpoint.find_latest(run / "checkpoints") == ckpt
    print(f"measured: second Ctrl-C -> exit 130 in {took:.2f} s, mid-save")


def _the_rank(job):
    """The `ftl train` process of a job started through a shell (bash may have exec'ed it itself)."""
    import psutil

    me = psutil.Process(job.proc.pid)
    return me if "engine.cli" in " ".join(me.cmdline()) else job.descendants("engine.cli")[0]


def test_ctrl_c_to_torchrun_with_timed_saves_on_two_ranks(tmp_path):
    """checkpoint.every_minutes (rank 0's clock, agreed in the step's all-reduce) saves at steps that are
    no multiple of anything, each with both ranks' files; then SIGINT to torchrun itself."""
    run = tmp_path / "run"
    over = {"train.max_steps": 2000, "train.sample_tokens": 0, "checkpoint.every_minutes": 0.004,
            "checkpoint.keep": 100, "model.dropout": 0.1}
    job = Watched(torchrun_cmd(2, ["train", *tiny_overrides(run, **over)]))
    job.wait_for(r"step \d+/2000")
    # Ctrl-C only once a timed save is complete: on an idle machine the first steps take less than the 0.24 s
    # a timed save waits for, on a busy one more, so a step number alone is timing luck either way
    deadline = time.monotonic() + 180
    while not list(run.glob("checkpoints/step-*/COMPLETE")):
        assert job.proc.poll() is None and time.monotonic() < deadline, job.output[-4000:]
        time.sleep(0.05)
    job.proc.send_signal(signal.SIGINT)  # torchrun forwards it to both ranks (its own session holds them)
    job.wait(180)
    out = job.output
    m = re.search(r"stopped: interrupted \(Ctrl-C\): checkpoint (\S+) saved at step (\d+)", out)
    assert m, out[-4000:]
    saves = sorted(run.glob("checkpoints/step-*"))
    assert len(saves) >= 2, saves  # timed saves happened before the Ctrl-C one
    for ck in saves:
        listed, _ = integrity.read_manifest(ck)
        assert checkpoint.verify(ck) == [] and listed["rng-rank1.pt"]["hashed_by"] == 1
        assert listed["model.safetensors"]["hashed_by"] == 0
    print(f"measured: timed saves at steps {[int(p.name[5:]) for p in saves]}; Ctrl-C checkpoint at step {m[2]}")


# --------------------------------------------------------------------------- lock, readers and logs

def test_one_run_per_directory_a_killed_holder_and_a_reader(tmp_path, capsys):
    run = tmp_path / "run"
    args = ["train", *tiny_overrides(run, **{**BASE, "train.max_steps": 8})]
    # an attempt that crashes before its first checkpoint: the next start (from 0) drops its rows
    crashed = Watched(ftl_cmd(args), FTL_FAULT_INJECT="crash@step=3")
    assert crashed.wait() == -signal.SIGKILL
    assert [r["step"] for r in read_metrics(run) if "loss" in r] == [1, 2]
    holder = Watched(ftl_cmd(args), FTL_FAULT_INJECT="hang_save@step=4")
    holder.wait_for(r"FTL_FAULT hang_save rank 0 step 4")  # holds the lock, stuck in a save
    rows = (run / "metrics.jsonl").read_text()
    second = run_ftl(args)
    assert second.returncode == 2 and "Traceback" not in second.stderr, second.stderr[-3000:]
    assert (f"run.dir {run} is in use by another run: host {os.uname().nodename}, pid {holder.proc.pid}, "
            f"since {time.strftime('%Y-%m-%d')}") in second.stderr
    assert (run / "metrics.jsonl").read_text() == rows  # the refused run wrote nothing
    holder.proc.kill()  # SIGKILL: the OS releases the lock
    assert holder.wait() == -signal.SIGKILL
    # The resume, while a reader (what `ftl export RUN` does) holds step 2, which retention (keep=3 of
    # 2, 4, 6, 8) would delete: it is left for a later save.
    step2 = run / "checkpoints" / "step-000002"
    reader = ownership.SharedLock(step2 / "COMPLETE")
    try:
        trainer, _ = _train(run, **{"train.max_steps": 8})  # in this process: it is the same code path
    finally:
        reader.release()
    assert trainer.resume_from == step2
    assert f"{step2} is being read by another process" in capsys.readouterr().err and checkpoint.is_complete(step2)
    rows = read_metrics(run)
    kinds = [(r["step"], "eval" if any(k.startswith("eval_") for k in r) else "train" if "loss" in r else "other")
             for r in rows]
    assert len(kinds) == len(set(kinds)), kinds
    assert [s for s, k in kinds if k == "train"] == list(range(1, 9)) and [s for s, k in kinds if k == "eval"][0] == 0
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run / "tb"))
    acc.Reload()
    assert [e.step for e in acc.Scalars("train/loss")] == list(range(1, 9))
    assert [e.step for e in acc.Scalars("eval/loss")][0] == 0 and len(acc.Scalars("eval/loss")) == 2


# --------------------------------------------------------------------------- before the first step

@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 75), (signal.SIGINT, 130)])
def test_a_signal_before_the_first_step_ends_the_process_at_once(tmp_path, sig, code):
    run = tmp_path / "run"
    # the standard library's source: preparing it takes minutes here, so the signal lands inside it
    job = Watched(ftl_cmd(["train", *tiny_overrides(run, **{"data.source": "builtin:stdlib"})]))
    job.wait_for(r"preparing data: builtin:stdlib")
    time.sleep(2)
    t0 = time.monotonic()
    job.proc.send_signal(sig)
    rc = job.wait(120)
    took = time.monotonic() - t0
    assert rc == code and "before the first step" in job.output and "Traceback" not in job.output, job.output[-3000:]
    assert took < 60 and not (run / "checkpoints").exists()
    print(f"measured: {signal.Signals(sig).name} during data preparation -> exit {rc} after {took:.1f} s")


# ------------------------------------------------------------------------------- full / read-only disk

@pytest.fixture
def tmpfs(tmp_path):
    mounts = []

    def mount(name, *options):
        where = tmp_path / name
        where.mkdir()
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", ",".join(options), "tmpfs", str(where)], capture_output=True)
        if r.returncode:
            pytest.skip(f"cannot mount a tmpfs here (needs root): {r.stderr.decode().strip()}")
        mounts.append(where)
        return where

    yield mount
    for where in reversed(mounts):
        subprocess.run(["umount", "-l", str(where)], check=False)


def test_a_full_disk_mid_run_exits_1_and_keeps_the_previous_checkpoint(tmpfs):
    disk = tmpfs("disk", "size=48m")
    run = disk / "run"
    over = {"train.max_steps": 2, "train.sample_tokens": 0, "train.eval_batches": 1, "checkpoint.every": 0}
    _train(run, **over)
    # leave ~256 KiB: the next checkpoint (about 2.5 MB) cannot fit
    free = shutil.disk_usage(disk).free
    with open(disk / "filler", "wb") as f:
        f.write(b"\0" * (free - (256 << 10)))
    proc = run_ftl(["train", *tiny_overrides(run, **{**over, "train.max_steps": 4})])
    err = proc.stderr
    assert proc.returncode == 1 and "Traceback" not in err, err[-3000:]
    assert (f"no space left on device while writing checkpoint step 4 in {run / 'checkpoints' / '.tmp-step-000004'}"
            in err), err[-3000:]
    assert f"`latest` still names {run / 'checkpoints' / 'step-000002'}" in err
    assert (run / "checkpoints" / "latest").read_text().strip() == "step-000002"
    assert not (run / "checkpoints" / ".tmp-step-000004").exists()  # its space was given back
    assert checkpoint.verify(run / "checkpoints" / "step-000002") == []


def test_a_run_dir_on_a_read_only_file_system_is_refused(tmpfs, capsys):
    ro = tmpfs("ro", "ro", "size=1m")
    code, err = _exit_code(["train", *tiny_overrides(ro / "run")], capsys)
    assert code == 2 and f"run.dir {ro / 'run'} cannot be created: {ro} is not writable (read-only file system)" in err
