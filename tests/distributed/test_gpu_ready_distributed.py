"""Collectives a GPU run depends on, with 2 real gloo ranks (one torchrun launch, see gpu_ready_probe.py):
the count all-reduce is asynchronous (the first forward does not wait for it), and the collective timeout
reaches every process group (the hang watchdog must fire first on DeepSpeed's groups too)."""

import json
import sys

from tests.conftest import env_for_subprocess, free_port


def test_count_allreduce_overlaps_the_forward_and_timeouts_reach_every_group(tmp_path):
    import subprocess

    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", "--rdzv-backend=c10d",
           f"--rdzv-endpoint=127.0.0.1:{free_port()}", "-m", "tests.distributed.gpu_ready_probe", str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env_for_subprocess())
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = {r["rank"]: r for r in (json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{"))}
    assert set(rows) == {0, 1}, proc.stdout
    # rank 0 started its forward while the count was still being reduced (rank 1 had not joined it yet)
    assert rows[1]["saw_rank0_forward_before_joining"] is True
    assert rows[0]["count"] == rows[1]["count"] > 0
    for r in rows.values():
        assert len(r["timeouts_after"]) >= 2 and set(r["timeouts_after"]) == {3.0}, r
        assert min(r["timeouts_before"]) > 3.0
    assert rows[0]["timed_out"] and rows[0]["waited_s"] < 7.5, rows[0]  # not the 8 s until rank 1 came back
