"""Run by test_gpu_ready_distributed.py under `torchrun --nproc-per-node 2` (gloo): two properties of the loop's
collectives that a GPU run depends on, checked with real ranks.

1. The per-step count all-reduce does not hold up the first forward. Rank 1 enters its step only after rank
   0's first forward has started (a marker file written by a forward hook), so a blocking all-reduce on rank 0
   (waiting for rank 1 before its forward) would make rank 1 wait in vain.
2. `dist.set_timeout` reaches every process group, not only the default one (DeepSpeed makes its own): after
   it, a collective on a second group times out after those seconds when the peer stays away.

Each rank prints one JSON line."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as torch_dist


def main(run_dir: str) -> None:
    from engine import dist
    from engine.trainer import Trainer
    from tests.conftest import tiny_config

    run = Path(run_dir)
    trainer = Trainer(tiny_config(run / "run", **{"train.max_steps": 2, "train.sample_tokens": 0}), progress=False)
    rank = trainer.env.rank
    out: dict = {"rank": rank}
    marker = run / "rank0-forward-started"
    if rank == 0:
        trainer.backend.module.register_forward_pre_hook(lambda *a: marker.touch())
    else:
        deadline = time.monotonic() + 20
        while not marker.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        out["saw_rank0_forward_before_joining"] = marker.exists()
    loss_sum, count, *_ = trainer.train_step(trainer.batches.next())
    out["count"] = float(count)

    # every group gets the timeout, a library's own too
    other = torch_dist.new_group([0, 1])
    before = dist.group_timeouts()
    dist.set_timeout(3.0)
    out["timeouts_before"], out["timeouts_after"] = before, dist.group_timeouts()
    if rank == 0:
        start = time.monotonic()
        try:
            torch_dist.all_reduce(torch.ones(1), group=other)  # rank 1 is not there for 8 s
            out["timed_out"] = False
        except Exception as e:  # noqa: BLE001  (gloo raises a RuntimeError naming the timeout)
            out["timed_out"] = True
            out["error"] = str(e).splitlines()[0][:200]
        out["waited_s"] = time.monotonic() - start
    else:
        time.sleep(8)
    print(json.dumps(out), flush=True)
    trainer.close()
    os._exit(0)  # the second group is broken on purpose: skip its teardown


if __name__ == "__main__":
    main(sys.argv[1])
