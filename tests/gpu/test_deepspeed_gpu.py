"""DeepSpeed on CUDA: bf16 ZeRO with NCCL, ZeRO-Offload with DeepSpeedCPUAdam and pinned memory, the CUDA
memory figures. Skipped on machines without CUDA (the CPU/gloo behaviour is tested in tests/distributed)."""

import pytest
import torch

from tests.conftest import check, read_metrics, run_ftl, tiny_overrides, torchrun

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
GPU = {"DS_ACCELERATOR": "cuda"}  # tests/conftest.py defaults it to cpu


def _trained(run_dir):
    rows = [r for r in read_metrics(run_dir) if "loss" in r]
    assert rows[-1]["loss"] < rows[0]["loss"]
    memory = [r["memory"] for r in read_metrics(run_dir) if "memory" in r][0]
    assert all(m["cuda_max_allocated"] > 0 for m in memory["measured"])
    return memory


@pytest.mark.parametrize("stage", [2, 3])
def test_bf16_zero_on_one_gpu(stage, tmp_path):
    run_dir = tmp_path / f"z{stage}"
    check(run_ftl(["train", *tiny_overrides(run_dir, **{"dist.backend": "deepspeed", "dist.zero_stage": stage,
                                                        "train.precision": "bf16", "train.max_steps": 10})], **GPU))
    _trained(run_dir)


def test_zero3_offload_with_deepspeed_cpu_adam(tmp_path):
    run_dir = tmp_path / "z3off"
    proc = check(run_ftl(["train", *tiny_overrides(run_dir, **{
        "dist.backend": "deepspeed", "dist.zero_stage": 3, "dist.offload": "cpu", "train.precision": "bf16",
        "train.max_steps": 10})], timeout=900, **GPU))
    assert '"offload_optimizer": {"device": "cpu", "pin_memory": true}' in proc.stdout + proc.stderr
    memory = _trained(run_dir)
    assert memory["planned"]["offloaded"] == ["optimizer", "params"]


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_zero3_on_two_gpus_matches_one(tmp_path):
    common = {"dist.backend": "deepspeed", "dist.zero_stage": 3, "train.max_steps": 4, "train.sample_tokens": 0}
    one, two = tmp_path / "one", tmp_path / "two"
    check(run_ftl(["train", *tiny_overrides(one, **common, **{"train.micro_batch": 8})], **GPU))
    check(torchrun(2, ["train", *tiny_overrides(two, **common, **{"train.micro_batch": 4})], **GPU))
    a = [r["loss"] for r in read_metrics(one) if "loss" in r]
    b = [r["loss"] for r in read_metrics(two) if "loss" in r]
    assert b == pytest.approx(a, rel=1e-4)  # TF32/cuBLAS reduction order: looser than on CPU
