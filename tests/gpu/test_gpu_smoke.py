"""GPU paths (bf16 autocast, SDPA, NCCL); skipped on machines without CUDA."""

import pytest
import torch

from tests.conftest import GPU_ENV, check, read_metrics, run_ftl, gpu_overrides

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_bf16_training_on_gpu(tmp_path):
    run_dir = tmp_path / "gpu"
    check(run_ftl(["train", *gpu_overrides(run_dir, **{"train.precision": "bf16", "train.max_steps": 10})], **GPU_ENV))
    rows = [r for r in read_metrics(run_dir) if "loss" in r]
    assert rows[-1]["loss"] < rows[0]["loss"]
