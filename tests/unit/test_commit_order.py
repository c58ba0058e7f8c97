"""Invariant 8, the commit order of a checkpoint: every byte flushed (fsync), MANIFEST.json (every file's digest)
included -> COMPLETE -> the rename that makes it visible -> `latest`. The rename only makes a checkpoint visible; without the flush before the marker a power
cut can leave a checkpoint that says COMPLETE over files that never reached the disk, and nothing else in the
suite can see that. So the order itself is recorded here: every fsync (which file or directory it flushed), and
every rename, with whether COMPLETE existed at that moment."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from engine import checkpoint, integrity


class TwoFileBackend:
    """The Backend methods the Checkpointer calls: a weights file and a nested directory, like DeepSpeed's."""

    def save(self, path: Path) -> None:
        from safetensors.torch import save_file

        save_file({"w": torch.arange(8.0)}, str(path / "model.safetensors"))
        (path / "shards").mkdir()
        torch.save({"m": torch.ones(3)}, path / "shards" / "optim-rank0.pt")


def _extras(d: Path) -> None:
    (d / "tokenizer").mkdir()
    (d / "tokenizer" / "tokenizer.json").write_text("{}", encoding="utf-8")


class Recorder:
    """Wraps os.fsync / os.fdatasync / os.replace / os.rename; each event notes whether the new COMPLETE existed."""

    def __init__(self, monkeypatch, root: Path, step: int):
        self.tmp = root / f".tmp-{checkpoint.step_dir_name(step)}" / checkpoint.COMPLETE
        self.final = root / checkpoint.step_dir_name(step) / checkpoint.COMPLETE
        self.old = self.final.stat().st_ino if self.final.exists() else None  # a checkpoint this save replaces
        self.events, self.sizes = [], {}
        for name in ("fsync", "fdatasync"):
            real = getattr(os, name)
            monkeypatch.setattr(os, name, self._flush(real))
        for name in ("replace", "rename"):
            real = getattr(os, name)
            monkeypatch.setattr(os, name, self._move(real))

    def _complete_exists(self) -> bool:
        """Whether the NEW checkpoint's COMPLETE exists (under its temporary name or its final one)."""
        return self.tmp.exists() or (self.final.exists() and self.final.stat().st_ino != self.old)

    def _flush(self, real):
        def flush(fd):
            path = _logical(os.readlink(f"/proc/self/fd/{fd}"))
            self.events.append(("flush", path, self._complete_exists()))
            self.sizes[path] = os.fstat(fd).st_size  # what the OS holds at the flush (Python's buffer excluded)
            return real(fd)
        return flush

    def _move(self, real):
        def move(src, dst, *a, **k):
            out = real(src, dst, *a, **k)
            self.events.append(("move", (_logical(str(src)), _logical(str(dst))), self._complete_exists()))
            return out
        return move


def _logical(path: str) -> str:
    """A path as it is in the final checkpoint: `.tmp-step-N` is `step-N` before its rename."""
    return path.replace(".tmp-step-", "step-")


@pytest.mark.parametrize("resave", [False, True], ids=["new", "same-step-again"])
def test_every_byte_is_flushed_before_complete_and_complete_before_the_rename(tmp_path, monkeypatch, resave):
    ck = checkpoint.Checkpointer(tmp_path, keep=3, rank=0, world=1)
    state = {"tokens": 0.0, "sample_index": 8, "global_batch": 8, "config": {}}
    if resave:  # a resumed run saving a step that exists already replaces it through the same commit
        ck.save(4, TwoFileBackend(), state, _extras)
    rec = Recorder(monkeypatch, tmp_path / "checkpoints", 4)
    final = ck.save(4, TwoFileBackend(), state, _extras)
    monkeypatch.undo()
    events = rec.events

    assert {"model.safetensors", "shards", "tokenizer", "rng-rank0.pt", checkpoint.STATE} <= {p.name for p in final.iterdir()}
    # 1. every file and directory of the final checkpoint was flushed while COMPLETE did not exist yet
    flushed_before = {path for kind, path, complete in events if kind == "flush" and not complete}
    everything = {str(p) for p in final.rglob("*") if p.name != checkpoint.COMPLETE} | {str(final)}
    assert everything - flushed_before == set(), "written but not flushed before COMPLETE"
    # ... MANIFEST.json among them, listing every other file of the checkpoint with its digest, so COMPLETE
    # never stands over files the manifest does not vouch for
    manifest = final / integrity.MANIFEST
    assert str(manifest) in flushed_before, "MANIFEST.json is not written and flushed before COMPLETE"
    listed = set(json.loads(manifest.read_text(encoding="utf-8"))["files"])
    on_disk = {str(p.relative_to(final)) for p in final.rglob("*") if p.is_file()} - {checkpoint.COMPLETE,
                                                                                     integrity.MANIFEST}
    assert listed == on_disk
    assert checkpoint.verify(final) == []

    # ... with all their bytes: a file flushed before it is fully written (Python's buffer not yet handed to the OS)
    short = {p: (rec.sizes[p], Path(p).stat().st_size) for p in everything if Path(p).is_file()
             and rec.sizes[p] != Path(p).stat().st_size}
    assert not short, f"flushed before all their bytes were written (size at flush, final size): {short}"

    # 2. COMPLETE itself is durable before the checkpoint becomes visible, and it appears before the rename
    visible = [i for i, (kind, what, _) in enumerate(events) if kind == "move" and what[1] == str(final)
               and what[0] == str(final)]  # the directory rename (.tmp-step-N -> step-N, both logical step-N)
    assert len(visible) == 1, events
    rename = visible[0]
    assert events[rename][2], "the checkpoint was renamed into place before COMPLETE was written"
    marker = str(final / checkpoint.COMPLETE)
    complete_flushed = [i for i, (kind, what, _) in enumerate(events) if kind == "flush" and
                        (what == marker or what.startswith(str(final / f".{checkpoint.COMPLETE}")))]
    assert complete_flushed and complete_flushed[0] < rename, "COMPLETE's own bytes are not flushed before the rename"
    assert rec.sizes[events[complete_flushed[-1]][1]] == (final / checkpoint.COMPLETE).stat().st_size > 0

    # 3. `latest` moves only after the rename, and the rename itself is made durable (its directory flushed)
    latest = str(tmp_path / "checkpoints" / "latest")
    moved_latest = [i for i, (kind, what, _) in enumerate(events) if kind == "move" and what[1] == latest]
    assert moved_latest and moved_latest[0] > rename
    # ... itself replaced atomically: its new content flushed under a temporary name, then renamed over the old
    src = events[moved_latest[0]][1][0]
    assert src != latest and any(kind == "flush" and what == src for kind, what, _ in events[rename:moved_latest[0]])
    assert rec.sizes[src] == Path(latest).stat().st_size > 0
    assert any(kind == "flush" and what == str(tmp_path / "checkpoints") for kind, what, _ in events[rename:])
    assert checkpoint.find_latest(tmp_path / "checkpoints") == final
