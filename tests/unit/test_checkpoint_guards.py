"""The checkpoint save protocol between ranks, without a process group: two Checkpointers (rank 0 and rank 1)
save the same step in two threads whose `dist.barrier` is a real two-party barrier. Each rank is made slow at the
point where a missing synchronization would show, so the protocol is checked, not the luck of the timing:

- rank 1 writes into the checkpoint only after rank 0 has created it (rank 0 slow to create it);
- COMPLETE appears only when every rank's files are in place (rank 1 slow to write its files);
- no rank returns from the save before the checkpoint is complete and `latest` names it (rank 0 slow to flush),
  or a rank exiting right after its save (a preemption, exit 75) could have torchrun kill rank 0 mid-commit.

Plus what a restarted save of the same step finds: the torn temporary directory of a killed save is replaced.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest
import torch

from engine import checkpoint, integrity

SLOW = 0.4  # seconds a rank lingers where a missing barrier would let the other one run ahead


class RankBackend:
    """What a DDP rank writes: rank 0 the model, every rank nothing else (its RNG file comes from the Checkpointer)."""

    def __init__(self, rank: int):
        self.rank = rank

    def save(self, path: Path) -> None:
        if self.rank == 1:
            time.sleep(SLOW)  # rank 1 is the slow writer
            torch.save({"part": torch.ones(2)}, path / "part-rank1.pt")  # a library's file, like DeepSpeed's:
            integrity.record(path / "part-rank1.pt")  # the backend reports it, to be hashed by its writer
        else:
            from safetensors.torch import save_file

            save_file({"w": torch.arange(4.0)}, str(path / "model.safetensors"))


def _extras(d: Path) -> None:
    (d / "config.json").write_text("{}", encoding="utf-8")


class ThreadGroup:
    """The collectives a save uses, between two threads: a real two-party barrier, and object exchanges built
    on it (each rank's value in a slot; everyone reads all slots; nobody writes the next round's slot before
    every rank has read this one)."""

    def __init__(self, rank0: int):
        self.rank0, self.barrier, self.slots = rank0, threading.Barrier(2, timeout=30), [None, None]

    def rank(self) -> int:
        return 0 if threading.get_ident() == self.rank0 else 1

    def all_gather_object(self, obj) -> list:
        self.slots[self.rank()] = obj
        self.barrier.wait()
        out = list(self.slots)
        self.barrier.wait()
        return out

    def broadcast_object(self, obj=None, src: int = 0):
        return self.all_gather_object(obj)[src]

    def agree_on_error(self, message):
        return next((m for m in self.all_gather_object(message) if m), None)

    def install(self, monkeypatch) -> None:
        for name in ("rank", "all_gather_object", "broadcast_object", "agree_on_error"):
            monkeypatch.setattr(checkpoint.dist, name, getattr(self, name))
        monkeypatch.setattr(checkpoint.dist, "barrier", lambda: self.barrier.wait())


def test_two_ranks_save_in_lockstep(tmp_path, monkeypatch):
    rank0 = threading.get_ident()
    group = ThreadGroup(rank0)
    barrier = group.barrier
    group.install(monkeypatch)
    observed: dict = {}
    real_rmtree, real_fsync, real_write = checkpoint.shutil.rmtree, checkpoint.os.fsync, checkpoint._write_atomic
    root = tmp_path / "checkpoints"

    def slow_rmtree(path, *a, **k):  # rank 0 clears the temporary directory before creating it: slowly
        if threading.get_ident() == rank0 and ".tmp-" in str(path):
            time.sleep(2 * SLOW)  # longer than rank 1 takes to start writing
        return real_rmtree(path, *a, **k)

    def slow_fsync(fd):  # rank 0 flushes slowly
        if threading.get_ident() == rank0:
            time.sleep(SLOW / 10)
        return real_fsync(fd)

    def write_atomic(path, text):
        if path.name == checkpoint.COMPLETE:
            observed["at_complete"] = sorted(p.name for p in path.parent.iterdir())
            manifest = path.parent / integrity.MANIFEST
            observed["manifest"] = json.loads(manifest.read_text())["files"] if manifest.exists() else {}
        return real_write(path, text)

    monkeypatch.setattr(checkpoint.shutil, "rmtree", slow_rmtree)
    monkeypatch.setattr(checkpoint.os, "fsync", slow_fsync)
    monkeypatch.setattr(checkpoint, "_write_atomic", write_atomic)
    state = {"tokens": 0.0, "sample_index": 16, "global_batch": 8, "config": {}}
    errors: list = []

    def rank1():
        try:
            ck = checkpoint.Checkpointer(tmp_path, keep=2, rank=1, world=2)
            path = ck.save(2, RankBackend(1), state)
            # the moment rank 1 is free to go on (or to exit), the checkpoint is complete and current
            observed["rank1_returned"] = (checkpoint.is_complete(path), checkpoint.find_latest(root) == path)
        except BaseException as e:  # noqa: BLE001  (reported by the main thread)
            errors.append(e)
            barrier.abort()

    thread = threading.Thread(target=rank1)
    thread.start()
    try:
        final = checkpoint.Checkpointer(tmp_path, keep=2, rank=0, world=2).save(2, RankBackend(0), state, _extras)
    finally:
        thread.join(60)
    assert not errors, f"rank 1 failed: {errors[0]!r}"
    written = ["part-rank1.pt", "rng-rank1.pt", "rng-rank0.pt", "model.safetensors", checkpoint.STATE, "config.json"]
    assert {*written, integrity.MANIFEST} <= set(observed["at_complete"]), observed["at_complete"]
    # the manifest rank 0 wrote before COMPLETE holds the digest of every rank's files, each hashed by the rank
    # that wrote it (rank 1's files by rank 1, while it wrote them: rank 0 does not read them back)
    assert sorted(observed["manifest"]) == sorted(written), observed["manifest"]
    assert {f: d["hashed_by"] for f, d in observed["manifest"].items() if f.endswith("rank1.pt")} == {
        "part-rank1.pt": 1, "rng-rank1.pt": 1}
    assert observed["rank1_returned"] == (True, True)
    assert sorted(p.name for p in final.iterdir()) == sorted([checkpoint.COMPLETE, integrity.MANIFEST, *written])
    assert checkpoint.verify(final) == []
    rng = torch.load(final / "rng-rank1.pt", weights_only=True)
    assert {"python", "numpy", "torch"} <= rng.keys()


def test_a_torn_save_of_the_same_step_is_replaced_not_merged(tmp_path):
    """A save killed part-way leaves `.tmp-step-N`; the next save of step N starts from an empty directory."""
    root = tmp_path / "checkpoints"
    torn = root / ".tmp-step-000003"
    torn.mkdir(parents=True)
    (torn / "part-rank7.pt").write_bytes(b"from a job of 8 ranks that died")
    (torn / checkpoint.COMPLETE).write_text("ok 1\n")  # even a marker written by hand is not carried over
    final = checkpoint.Checkpointer(tmp_path, keep=2, rank=0, world=1).save(
        3, RankBackend(0), {"tokens": 0.0, "sample_index": 8, "global_batch": 8, "config": {}})
    assert sorted(p.name for p in final.iterdir()) == sorted([checkpoint.COMPLETE, checkpoint.STATE, integrity.MANIFEST,
                                                             "model.safetensors", "rng-rank0.pt"])
    assert not torn.exists() and checkpoint.find_latest(root) == final


@pytest.mark.parametrize("keep", [1, 3])
def test_retention_keeps_exactly_keep_checkpoints_and_never_the_one_being_resumed(tmp_path, keep):
    ck = checkpoint.Checkpointer(tmp_path, keep=keep, rank=0, world=1)
    for step in range(1, 6):
        ck.save(step, RankBackend(0), {"tokens": 0.0, "sample_index": step, "global_batch": 1, "config": {}})
    names = [p.name for p in checkpoint.list_complete(tmp_path / "checkpoints")]
    assert names == [checkpoint.step_dir_name(s) for s in range(6 - keep, 6)]
    assert checkpoint.find_latest(tmp_path / "checkpoints").name == "step-000005"


def test_the_next_save_removes_what_killed_saves_left(tmp_path):
    """`.tmp-step-N` of a killed save (another step) and `.old-step-N` of an interrupted replacement go with the next
    save: nothing resumes from them, and they would otherwise fill the disk save after save."""
    root = tmp_path / "checkpoints"
    for leftover in (".tmp-step-000007", ".old-step-000002-1234"):
        (root / leftover).mkdir(parents=True)
        (root / leftover / "model.safetensors").write_bytes(b"partial")
    final = checkpoint.Checkpointer(tmp_path, keep=2, rank=0, world=1).save(
        8, RankBackend(0), {"tokens": 0.0, "sample_index": 8, "global_batch": 1, "config": {}})
    assert sorted(p.name for p in root.iterdir()) == ["latest", final.name]
