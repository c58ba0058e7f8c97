"""The DeepSpeed backend's step at ZeRO stages 0 and 2 (tests/distributed/deepspeed_step_probe.py, one process):
two accumulated micro-batches give exactly the gradient of their sum (DeepSpeed must not divide by
gradient_accumulation_steps again), the reported norm is that gradient's, unclipped; the torch optimizer gets
the gradient clipped to train.clip_grad and each group's lr x lr_scale. Parity with DDP (test_deepspeed.py)
compares losses, which Adam makes nearly blind to the gradient's scale; this looks at the step itself."""

import json
import subprocess
import sys

import pytest

from tests.conftest import ROOT, env_for_subprocess


def test_deepspeed_hands_the_optimizer_the_clipped_global_gradient_and_each_groups_lr():
    proc = subprocess.run([sys.executable, "-m", "tests.distributed.deepspeed_step_probe", "0", "2"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300, env=env_for_subprocess())
    assert proc.returncode == 0, proc.stderr[-4000:]
    for stage, got in json.loads(proc.stdout.strip().splitlines()[-1]).items():
        assert got["norm"] == pytest.approx(got["true_norm"], rel=1e-5), (stage, got)
        assert got["grad_norm"] == pytest.approx(got["true_norm"] / 4, rel=1e-4), (stage, got)
        assert got["lr"] == [pytest.approx(0.1), 0.0], (stage, got)
        assert got["moved"] == [True, True, False, False], (stage, got)  # lr_scale 0: that group stays
        assert got["grad_bytes"] > 0, (stage, got)  # the memory report counts the gradients of the first step
