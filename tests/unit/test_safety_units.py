"""Never lose or corrupt a user's work (issue 12), the parts that need no training run: checkpoint digests
and what verification catches, the resume choice among damaged checkpoints, retention that keeps a
verified checkpoint and one a reader holds (a real second process holds the lock), the run-directory lock
against a real second process (and after that process is SIGKILLed), the targets an export may replace,
log rows of an earlier attempt, duplicate config keys, long documents tokenized in pieces, and the
Ctrl-C / timed-save flags."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from safetensors.torch import load_file, save_file

from engine import checkpoint, dist, fault, integrity, metrics, ownership
from engine.commands import launch as launcher
from engine.config import load_config
from engine.errors import EXIT_INTERRUPTED, EXIT_PREEMPTED, UsageError
from tests.conftest import ROOT, env_for_subprocess


class FileBackend:
    """What the Checkpointer calls on a backend: one engine-written file (hashed while written) and one
    written by a 'library' the engine does not control (found and hashed after the barrier)."""

    name = "file"

    def __init__(self, value=0.0):
        self.value = value

    def save(self, path):
        integrity.save_safetensors({"w": torch.full((64,), float(self.value))}, path / "model.safetensors")
        os.makedirs(path / "lib", exist_ok=True)
        save_file({"m": torch.full((8,), float(self.value))}, str(path / "lib" / "moments.safetensors"))

    def load(self, path):
        self.value = float(load_file(str(path / "model.safetensors"))["w"][0])

    def load_resharded(self, path, saved_world):
        self.load(path)


def _save(ck, step, value=None):
    backend = FileBackend(step if value is None else value)
    return ck.save(step, backend, {"tokens": step * 10.0, "sample_index": step * 8, "global_batch": 8, "config": {}})


def _flip(path, at=100, n=64):
    with open(path, "r+b") as f:
        f.seek(at)
        data = bytearray(f.read(n))
        f.seek(at)
        f.write(bytes(b ^ 0xFF for b in data))


# ------------------------------------------------------------------------------------------- digests

def test_every_file_of_a_checkpoint_has_a_digest_and_the_same_permissions(tmp_path):
    ck = checkpoint.Checkpointer(tmp_path, keep=5, rank=0, world=1)
    path = _save(ck, 1)
    listed, problem = integrity.read_manifest(path)
    assert problem is None
    on_disk = {p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file()}
    assert set(listed) == on_disk - {"MANIFEST.json", "COMPLETE"}  # the library's file too (found after the barrier)
    assert all(e["hashed_by"] == 0 and e == dict(integrity.hash_file(path / rel), hashed_by=0) for rel, e in listed.items())
    assert checkpoint.verify(path) == []
    # safetensors' own writer leaves 0600; the engine's files all get the umask's mode (issue: 0600 vs 0644)
    umask = os.umask(0)
    os.umask(umask)
    modes = {rel: (path / rel).stat().st_mode & 0o777 for rel in listed if rel != "lib/moments.safetensors"}
    assert set(modes.values()) == {0o666 & ~umask}, modes


def test_verification_names_each_damaged_file_and_why(tmp_path):
    ck = checkpoint.Checkpointer(tmp_path, keep=5, rank=0, world=1)
    path = _save(ck, 1)
    _flip(path / "model.safetensors")  # bit flips: same size
    with open(path / "lib" / "moments.safetensors", "r+b") as f:  # truncated
        f.truncate(50)
    (path / "rng-rank0.pt").unlink()  # optional: the loader warns instead (see the RNG test below)
    problems = checkpoint.verify(path)
    assert len(problems) == 2, problems
    assert "model.safetensors: its content differs from the digest" in problems[1]
    assert "lib/moments.safetensors: 50 bytes, saved with" in problems[0]
    (path / checkpoint.STATE).write_text('{"step": 1, "tok')  # an invalid trainer_state.json
    assert any(p.startswith("trainer_state.json: not valid JSON") for p in checkpoint.verify(path))


def test_a_large_file_is_checked_in_chunks_split_across_ranks(tmp_path, monkeypatch):
    monkeypatch.setattr(integrity, "CHUNK_BYTES", 4096)  # a page: the smallest chunk that can be mapped
    path = tmp_path / "ck"
    path.mkdir()
    with integrity.recording(path) as rec:
        integrity.write_bytes(path / "big.bin", os.urandom(5 * 4096 + 100))
        integrity.write_bytes(path / "small.bin", b"x" * 10)
    assert len(rec.files["big.bin"][integrity.ALGORITHM]) == 6 and rec.files["big.bin"] == integrity.hash_file(path / "big.bin")
    (path / "MANIFEST.json").write_bytes(integrity.write_manifest(path, rec.files))
    (path / "trainer_state.json").write_text('{"step": 1}')
    _flip(path / "big.bin", at=2 * 4096 + 7, n=1)
    listed, items, problems = integrity.plan(path, "trainer_state.json")
    assert problems == [] and len(items) == 7
    shares = integrity.balance(items, 2)  # what two ranks check, each its half of the bytes
    assert sorted(shares[0] + shares[1]) == sorted((rel, i) for rel, i, _ in items) and all(shares)
    found = [p for share in shares for p in integrity.check_items(path, share, listed)]
    assert found == ["big.bin: its content differs from the digest recorded when it was saved (bytes 8192-12288 "
                     "changed on disk)"]


def test_checkpoints_without_digests_are_parsed(tmp_path):
    """A checkpoint written before digests existed: a truncated safetensors or .pt is still caught."""
    ck = checkpoint.Checkpointer(tmp_path, keep=5, rank=0, world=1)
    path = _save(ck, 1)
    (path / "MANIFEST.json").unlink()
    assert checkpoint.verify(path) == []
    with open(path / "model.safetensors", "r+b") as f:
        f.truncate(200)
    with open(path / "rng-rank0.pt", "r+b") as f:
        f.truncate(200)
    problems = checkpoint.verify(path)
    assert any(p.startswith("model.safetensors:") and "truncated" in p for p in problems), problems
    assert any(p.startswith("rng-rank0.pt: not a readable torch file") for p in problems), problems


def test_resume_auto_falls_back_to_the_newest_checkpoint_that_verifies(tmp_path):
    ck = checkpoint.Checkpointer(tmp_path, keep=5, rank=0, world=1)
    for step in (2, 4, 6):
        _save(ck, step)
    root = tmp_path / "checkpoints"
    _flip(root / "step-000006" / "model.safetensors")
    lines = []
    assert checkpoint.choose(root, lines.append) == root / "step-000004"
    assert f"checkpoint {root / 'step-000006'} failed verification and is skipped: model.safetensors" in lines[0]
    assert "using " + str(root / "step-000004") in lines[1]
    # a checkpoint named explicitly must verify: exit 2 naming the path and the reason
    with pytest.raises(UsageError) as e:
        checkpoint.check_explicit(root / "step-000006")
    assert e.value.exit_code == 2 and "step-000006 is damaged: model.safetensors" in e.value.render()
    # none verifies: exit 2 naming every one, rather than starting over beside them
    (root / "step-000004" / checkpoint.STATE).write_text("not json")
    with open(root / "step-000002" / "model.safetensors", "r+b") as f:
        f.truncate(10)
    with pytest.raises(UsageError) as e:
        checkpoint.choose(root, lines.append)
    text = e.value.render()
    assert "3 problems" in text and "checkpoint.resume=none" in text
    assert "step-000004: trainer_state.json: not valid JSON" in text and "step-000002: model.safetensors: 10 bytes" in text


def test_retention_keeps_the_verified_checkpoint_until_a_newer_one_verifies(tmp_path, monkeypatch):
    ck = checkpoint.Checkpointer(tmp_path, keep=1, rank=0, world=1)
    root = tmp_path / "checkpoints"
    first = _save(ck, 2)
    ck.verified = first  # the run resumed from it
    real_verify = checkpoint.verify
    monkeypatch.setattr(checkpoint, "verify", lambda path, collective=False: ["broken on disk"]
                        if path.name == "step-000004" else real_verify(path, collective))
    with pytest.warns(UserWarning, match="step-000004 does not verify right after it was written"):
        _save(ck, 4)
    assert sorted(p.name for p in root.glob("step-*")) == ["step-000002", "step-000004"]  # 2 kept beyond keep=1
    _save(ck, 6)  # verifies: it becomes the protected one, and both older ones go
    assert sorted(p.name for p in root.glob("step-*")) == ["step-000006"] and ck.verified == root / "step-000006"


HOLD_SHARED = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from engine import ownership
    lock = ownership.SharedLock(Path(sys.argv[1]))
    print("held", flush=True)
    sys.stdin.readline()  # until the test says so
""")


def test_retention_leaves_a_checkpoint_that_a_reader_holds(tmp_path):
    """`ftl export RUN` holds a shared lock on the checkpoint it reads (here a real second process does):
    retention passes it over and a later save deletes it once the reader is done."""
    ck = checkpoint.Checkpointer(tmp_path, keep=1, rank=0, world=1)
    root = tmp_path / "checkpoints"
    _save(ck, 2)
    reader = subprocess.Popen([sys.executable, "-c", HOLD_SHARED, str(root / "step-000002" / "COMPLETE")],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env_for_subprocess(), cwd=ROOT)
    try:
        assert reader.stdout.readline().strip() == "held"
        _save(ck, 4)
        assert checkpoint.is_complete(root / "step-000002"), "deleted under a reader"
    finally:
        reader.communicate("go\n", timeout=60)
    _save(ck, 6)
    assert sorted(p.name for p in root.glob("step-*")) == ["step-000006"]


def test_a_missing_rng_file_warns_that_the_resume_is_not_bit_exact(tmp_path, capsys):
    ck = checkpoint.Checkpointer(tmp_path, keep=2, rank=0, world=1)
    path = _save(ck, 3)
    (path / "rng-rank0.pt").unlink()
    assert checkpoint.verify(path) == []  # still usable ...
    reseeded = []
    ck.load(path, FileBackend(), reseed=reseeded.append)
    assert reseeded == [3]
    err = capsys.readouterr().err
    assert "rng-rank0.pt is missing" in err and "no longer bit-exact" in err  # ... with a warning


def test_a_grown_job_reseeds_its_new_ranks_silently(tmp_path, capsys):
    ck = checkpoint.Checkpointer(tmp_path, keep=2, rank=0, world=1)
    path = _save(ck, 3)
    checkpoint.Checkpointer(tmp_path, keep=2, rank=1, world=2).load(path, FileBackend(), reseed=lambda s: None)
    assert "missing" not in capsys.readouterr().err  # rank 1 never had a stream: nothing lost


def test_streaming_safetensors_reads_back_with_safetensors(tmp_path):
    tensors = {"a": torch.randn(3, 4), "b": torch.arange(5), "c": torch.randn(2).bfloat16(), "d": torch.tensor(3.0),
               "e": torch.zeros(0), "f": torch.tensor([True, False]), "g": torch.randn(7).half()}
    integrity.save_safetensors(tensors, tmp_path / "x.safetensors", {"k": "v"})
    got = load_file(str(tmp_path / "x.safetensors"))
    assert got.keys() == tensors.keys() and all(torch.equal(got[k], tensors[k]) for k in tensors)
    assert integrity.safetensors_problem(tmp_path / "x.safetensors") is None
    emb = torch.randn(10, 4)
    kept, removed = integrity.dedupe_shared({"lm_head.weight": emb, "wte.weight": emb, "b": torch.ones(2)})
    assert set(kept) == {"lm_head.weight", "b"} and removed == {"wte.weight": "lm_head.weight"}


# --------------------------------------------------------------------------------------------- lock

HOLD_RUN_LOCK = textwrap.dedent("""
    import os, sys, time
    from pathlib import Path
    from engine import ownership
    ownership.RunLock(Path(sys.argv[1])).acquire()
    if sys.argv[2] == "fork":  # a data worker forked while the lock is held, still alive when the holder dies
        child = os.fork()
        if child == 0:
            time.sleep(60)
            os._exit(0)
        print(child, flush=True)
    print("locked", flush=True)
    sys.stdin.readline()
""")


def _holder(tmp_path, mode="plain", **env):
    proc = subprocess.Popen([sys.executable, "-c", HOLD_RUN_LOCK, str(tmp_path), mode], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, env=env_for_subprocess(**env), cwd=ROOT)
    child = int(proc.stdout.readline()) if mode == "fork" else None
    assert proc.stdout.readline().strip() == "locked"
    return proc, child


def test_the_run_lock_names_its_holder_and_dies_with_it(tmp_path):
    holder, _ = _holder(tmp_path, SLURM_JOB_ID="4242")
    try:
        with pytest.raises(UsageError) as e:
            ownership.RunLock(tmp_path).acquire()
        text = e.value.render()
        assert e.value.exit_code == 2 and f"run.dir {tmp_path} is in use by another run" in text
        assert f"pid {holder.pid}, since {time.strftime('%Y-%m-%d')}" in text and "SLURM job 4242" in text
    finally:
        holder.kill()  # SIGKILL: no cleanup runs
        holder.wait()
    lock = ownership.RunLock(tmp_path).acquire()  # the OS released it with the process
    assert lock.held and json.loads((tmp_path / "LOCK").read_text())["pid"] == os.getpid()
    lock.release()
    # a holder killed while a process it forked lives on: that child closed its copy, the lock is free
    holder, child = _holder(tmp_path, "fork")
    try:
        holder.kill()
        holder.wait()
        ownership.RunLock(tmp_path).acquire().release()
    finally:
        os.kill(child, signal.SIGKILL)


def test_run_dir_problems(tmp_path):
    (tmp_path / "afile").write_text("x")
    assert "is an existing file" in ownership.run_dir_problems(tmp_path / "afile")[0]
    assert "is a file" in ownership.run_dir_problems(tmp_path / "afile" / "run")[0]
    assert ownership.run_dir_problems(tmp_path / "new" / "deep" / "run") == []


# ------------------------------------------------------------------------------------------ targets

def _export_dir(path, extra=()):
    path.mkdir(parents=True)
    (path / "model.safetensors").write_text("w")
    ownership.stamp(path, {"format": "hf"})
    for name in extra:
        (path / name).write_text("mine")


def test_export_targets(tmp_path, monkeypatch):
    src = tmp_path / "runs" / "r1"
    src.mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "runs")
    t = ownership.target_problems
    assert "is the current directory" in t(tmp_path / "runs", True)[0]
    assert "contains the current directory" in t(tmp_path, True)[0]
    assert "is the source" in t(src, True, [src])[0]
    assert "contains the source" in t(tmp_path / "runs", True, [tmp_path / "elsewhere" / "x", src])[0]
    assert t(src / "exported", False, [src]) == []  # a new directory inside the source is fine
    (tmp_path / "file").write_text("x")
    assert "is an existing file" in t(tmp_path / "file", True)[0]
    (tmp_path / "empty").mkdir()
    assert t(tmp_path / "empty", False) == []
    (tmp_path / "theirs").mkdir()
    (tmp_path / "theirs" / "notes.txt").write_text("precious")
    assert "is not an earlier export" in t(tmp_path / "theirs", True)[0]
    _export_dir(tmp_path / "old")
    assert "pass --force" in t(tmp_path / "old", False)[0] and t(tmp_path / "old", True) == []
    _export_dir(tmp_path / "mixed", extra=["notes.txt"])
    assert "holds files it did not write (notes.txt)" in t(tmp_path / "mixed", True)[0]
    os.symlink(tmp_path / "old", tmp_path / "link")
    assert "symbolic link" in t(tmp_path / "link", True)[0]
    # replace_dir checks again at the moment of the swap
    new = ownership.temp_sibling(tmp_path / "theirs")
    with pytest.raises(UsageError, match="holds files the engine did not write"):
        ownership.replace_dir(new, tmp_path / "theirs")
    assert (tmp_path / "theirs" / "notes.txt").read_text() == "precious" and new.is_dir()
    ownership.replace_dir(new, tmp_path / "old")
    assert list((tmp_path / "old").iterdir()) == []


# ----------------------------------------------------------------------------------------- logs

def test_a_start_from_step_0_drops_every_row_of_the_failed_attempt(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    def attempt(start, steps):
        m = metrics.Metrics(tmp_path, True, 10, start, progress=False)
        if start == 0:
            m.log(0, {"eval_loss": 9.0})
        for s in steps:
            m.log(s, {"loss": float(s)})
        m.close()

    attempt(0, [1, 2, 3])  # crashed after step 3, nothing saved
    time.sleep(1.1)  # TensorBoard event files are named by the second they are opened
    attempt(0, [1, 2])
    time.sleep(1.1)
    attempt(2, [3, 4])  # resumed from a checkpoint at step 2
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], "eval_loss" in r) for r in rows] == [(0, True), (1, False), (2, False), (3, False), (4, False)]
    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    assert [e.step for e in acc.Scalars("train/loss")] == [1, 2, 3, 4]
    assert [e.step for e in acc.Scalars("eval/loss")] == [0]
    # a run that logs nothing (already complete) writes nothing
    other = tmp_path / "quiet"
    other.mkdir()
    metrics.Metrics(other, True, 10, 0, progress=False).close()
    assert list(other.iterdir()) == []


# ---------------------------------------------------------------------------------------- config

def test_duplicate_config_keys_are_an_error(tmp_path):
    y = tmp_path / "c.yaml"
    y.write_text("train:\n  max_steps: 5\n  max_steps: 9\nmodel:\n  name: gpt2-tiny\n")
    with pytest.raises(UsageError, match=r"key 'max_steps' is given twice \(lines 2 and 3\)"):
        load_config(str(y))
    j = tmp_path / "c.json"
    j.write_text('{"train": {"max_steps": 5, "max_steps": 9}}')
    with pytest.raises(UsageError, match="key 'max_steps' is given twice"):
        load_config(str(j))
    y.write_text("base: &b\n  lr: 1.0e-4\noptim:\n  <<: *b\n  lr: 2.0e-4\n")  # an override of a merge key is fine
    with pytest.raises(UsageError, match="unknown config key 'base'"):
        load_config(str(y))


# ------------------------------------------------------------------------------------------ data

def test_long_documents_are_tokenized_in_pieces_with_the_same_ids(monkeypatch):
    import pydoc_data.topics

    from engine.data import sources as data

    text = " ".join(list(pydoc_data.topics.topics.values())[:60]) + "  two  spaces\tand a tab  "
    tok = data.train_bpe([[text]], 400)
    whole = tok(text, add_special_tokens=False)["input_ids"]
    monkeypatch.setattr(data, "PIECE_CHARS", 3000)
    parts = data.pieces(text)
    assert len(parts) > 20 and "".join(parts) == text and max(map(len, parts)) <= 3000
    assert list(data.token_ids(tok, [text])[0]) == whole


# --------------------------------------------------------------------------------------- signals

class _Env:
    def __init__(self, rank):
        self.rank, self.world_size, self.is_main, self.device = rank, 1, rank == 0, torch.device("cpu")


def test_only_rank_0_clock_asks_for_a_timed_save(monkeypatch):
    cfg = load_config(None, ["checkpoint.every_minutes=0.001"])
    backend = type("B", (), {"loss_scale": lambda self: None})()
    for rank, expected in ((0, True), (1, False)):
        signals = fault.PreemptionSignals()  # not installed: the handler is called by hand below
        ft = fault.FaultTolerance(cfg, _Env(rank), "/tmp", backend, signals=signals)
        ft.loop_starts()
        time.sleep(0.1)
        ft.all_reduce_count(torch.tensor(5.0)).wait()  # asynchronous (issue 13): the loop waits at the first backward
        assert not ft.step_ends(1, torch.tensor(1.0))
        assert ft.save_due is expected
        # a Ctrl-C (and no preemption signal): the stop is agreed, and it ends with 130, not 75
        signals.deferred()
        signals._handle(signal.SIGINT, None)
        ft.all_reduce_count(torch.tensor(5.0)).wait()  # asynchronous (issue 13): the loop waits at the first backward
        assert ft.step_ends(2, torch.tensor(1.0))
        stop = ft.preempted(2, "/ckpt")
        assert stop.exit_code == EXIT_INTERRUPTED and "to resume: cd " in str(stop)
        ft.close()
    # before the loop a signal ends the process where it is: 75 for SIGTERM, 130 for SIGINT
    early = fault.PreemptionSignals()
    with pytest.raises(BaseException) as e:  # not an Exception: library wrappers must not swallow it
        early._handle(signal.SIGTERM, None)
    assert not isinstance(e.value, Exception)
    assert e.value.exit_code == EXIT_PREEMPTED and "before the first step" in str(e.value)
    with pytest.raises(BaseException) as e:
        early._handle(signal.SIGINT, None)
    assert e.value.exit_code == EXIT_INTERRUPTED


def test_resume_command_continues_from_the_new_checkpoint():
    cfg = load_config(None, ["checkpoint.resume=none"])
    text = fault.resume_command(cfg)
    assert text.startswith(f"cd {os.getcwd()} && ") and text.endswith("--set checkpoint.resume=auto")
    assert launcher.preempted_exit_code([130, 130]) == 130 and launcher.preempted_exit_code([130, -15]) == 130
    assert launcher.preempted_exit_code([130, 1]) is None and launcher.preempted_exit_code([75, 130]) is None
