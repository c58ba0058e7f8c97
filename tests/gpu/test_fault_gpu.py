"""Fault tolerance on CUDA: the guard reads its flags without stalling the device (torch's sync debug
mode turns any host sync into an error), fused AdamW skips a non-finite step on the device, and a
preempted GPU run stops one step after the signal is seen, saves, and exits 75. Skipped without CUDA."""

import math
import signal

import pytest
import torch

from engine import fault
from engine.config import load_config
from engine.dist import DistEnv
from engine.errors import EXIT_PREEMPTED
from tests.conftest import GPU_ENV, read_metrics, gpu_overrides
from tests.fault_helpers import Watched, bitwise_equal, checkpoint_tensors, ftl_cmd

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


class _Backend:
    def __init__(self, module):
        self.module = module

    def loss_scale(self):
        return None


def test_the_guard_and_the_fused_skip_add_no_host_sync(tmp_path, monkeypatch):
    monkeypatch.delenv("FTL_FAULT_INJECT", raising=False)
    dev = torch.device("cuda")
    torch.manual_seed(0)
    model = torch.nn.Linear(64, 64).to(dev)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True)
    cfg = load_config(None, ["dist.watchdog_s=0", "train.max_bad_steps=5"])
    printed = []
    guard = fault.FaultTolerance(cfg, DistEnv(device=dev), tmp_path, _Backend(model), printed.append)
    x = torch.randn(8, 64, device=dev)
    count = torch.full((), 512.0, device=dev)
    poison = torch.full((), math.nan, device=dev)
    one = torch.ones((), device=dev)
    snapshots = {}
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # any host sync below raises
    try:
        for step in range(1, 5):
            guard.step_begins(step)
            guard.all_reduce_count(count).wait()
            loss = model(x).square().sum() * (poison if step == 2 else one)
            fault.nan_if_nonfinite(loss).backward()
            norm = torch.nn.utils.get_total_norm([p.grad for p in model.parameters()], foreach=True)
            fault.step_unless_nonfinite(opt, norm)
            opt.zero_grad(set_to_none=True)
            assert guard.step_ends(step, norm) is False
            snapshots[step] = [p.detach().clone() for p in model.parameters()]
    finally:
        torch.cuda.set_sync_debug_mode(0)
        guard.close()
    assert all(torch.equal(a, b) for a, b in zip(snapshots[1], snapshots[2]))  # step 2 skipped on the device
    assert not all(torch.equal(a, b) for a, b in zip(snapshots[2], snapshots[3]))
    # read one step late, from pinned memory: step 2's skip is reported at step 3's boundary
    assert printed and printed[0].startswith("step 2: non-finite loss or gradient norm")
    assert guard.log_fields() == {"skipped_steps": 1}


def test_a_preempted_gpu_run_saves_and_exits_75_and_a_nan_step_is_skipped(tmp_path):
    run = tmp_path / "run"
    args = ["train", *gpu_overrides(run, **{"train.max_steps": 200, "checkpoint.every": 1, "checkpoint.keep": 500,
                                             "train.sample_tokens": 0})]
    job = Watched(ftl_cmd(args), FTL_FAULT_INJECT="nan@step=3", **GPU_ENV)
    job.wait_for(r"step 6/200")
    job.proc.send_signal(signal.SIGTERM)
    assert job.wait() == EXIT_PREEMPTED, job.output[-4000:]
    assert "stopped: preempted (SIGTERM received)" in job.output
    assert (run / "PREEMPTED").is_file()
    assert bitwise_equal(checkpoint_tensors(run / "checkpoints" / "step-000003"),
                         checkpoint_tensors(run / "checkpoints" / "step-000002")) == []
    rows = {r["step"]: r for r in read_metrics(run) if "loss" in r}
    assert rows[3]["skipped_steps"] == 1
