"""Invariant 8, every rank's files before COMPLETE, with a real torchrun job of 2 gloo ranks.

Rank 1 is held inside the save of step 4 (FTL_FAULT_INJECT=hang_save), after writing its own files. Rank 0 must
then wait for it and never mark the checkpoint complete. Where rank 0 waits is observed, not guessed with a
sleep: tests/hooks/sitecustomize.py prints every collective a rank enters, so once rank 0 has entered its first
collective after its own files (its marker: slow_save of 0 s at the same point), it either waits there for rank
1 (correct: COMPLETE can no longer appear) or has already passed the point where COMPLETE is written (the bug: a
checkpoint that looks complete while a rank's part may be missing). The job is then killed. No COMPLETE for step 4
may exist, and resume must pick step 2.
"""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

from engine import checkpoint
from tests.conftest import ROOT, tiny_overrides
from tests.fault_helpers import Watched, torchrun_cmd

HOOKS = ROOT / "tests" / "hooks"


def hooked_env(hooks: str) -> dict:
    """Environment for a child that loads tests/hooks/sitecustomize.py with `hooks` on."""
    return {"FTL_TEST_HOOKS": hooks,
            "PYTHONPATH": os.pathsep.join([str(HOOKS), str(ROOT), os.environ.get("PYTHONPATH", "")])}


def wait_for_after(job: Watched, marker: str, pattern: str, timeout: float = 120.0) -> str:
    """The first line matching `pattern` that comes after the first line matching `marker`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        lines = list(job.lines)
        start = next((i for i, line in enumerate(lines) if re.search(marker, line)), None)
        if start is not None:
            hit = next((line for line in lines[start + 1:] if re.search(pattern, line)), None)
            if hit:
                return hit
        if job.proc.poll() is not None:
            break
        time.sleep(0.1)
    raise AssertionError(f"no {pattern!r} after {marker!r} (rc {job.proc.poll()}):\n{job.output[-6000:]}")


def test_complete_waits_for_every_rank_and_resume_picks_the_previous_checkpoint(tmp_path):
    run = tmp_path / "run"
    settings = {"train.max_steps": 6, "checkpoint.every": 2, "checkpoint.keep": 5, "train.sample_tokens": 0}
    job = Watched(torchrun_cmd(2, ["train", *tiny_overrides(run, **settings)]),
                  FTL_FAULT_INJECT="hang_save@step=4,rank=1;slow_save@step=4,rank=0,seconds=0",
                  **hooked_env("trace_collectives"))
    try:
        job.wait_for(r"FTL_FAULT hang_save rank 1 step 4", timeout=240)  # rank 1 wrote its files and stopped
        wait_for_after(job, r"FTL_FAULT slow_save rank 0 step 4", r"FTL_TEST collective \w+ rank=0")
    finally:
        job.kill_tree()
        job.wait()
    root = run / "checkpoints"
    assert not (root / "step-000004").exists() and not (root / ".tmp-step-000004" / checkpoint.COMPLETE).exists(), (
        "rank 0 marked step 4 complete while rank 1 was still inside its save")
    for ckpt in checkpoint.list_complete(root):  # whatever is complete holds every rank's part
        assert {"rng-rank0.pt", "rng-rank1.pt"} <= {p.name for p in ckpt.iterdir()}, ckpt
    assert [p.name for p in checkpoint.list_complete(root)] == ["step-000002"]
    assert checkpoint.find_latest(root) == root / "step-000002"  # what checkpoint.resume=auto resumes from
