"""DeepSpeed on CUDA: bf16 ZeRO with NCCL, ZeRO-Offload with DeepSpeedCPUAdam and pinned memory, the CUDA
memory figures. Skipped on machines without CUDA (the CPU/gloo behaviour is tested in tests/distributed)."""

import pytest
import torch

from tests.conftest import GPU_ENV, check, read_metrics, run_ftl, gpu_overrides, torchrun

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
GPU = GPU_ENV  # tests/conftest.py hides GPUs from subprocesses and defaults DS_ACCELERATOR to cpu


def _trained(run_dir):
    rows = [r for r in read_metrics(run_dir) if "loss" in r]
    assert rows[-1]["loss"] < rows[0]["loss"]
    memory = [r["memory"] for r in read_metrics(run_dir) if "memory" in r][0]
    assert all(m["cuda_max_allocated"] > 0 for m in memory["measured"])
    return memory


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_bf16_zero_on_one_gpu(stage, tmp_path):
    """bf16 ZeRO with NCCL: gradients accumulated and reduced in fp32 (what DeepSpeed really built), the
    export checks (best/ at step 0, final/) pass at bf16's tolerance."""
    run_dir = tmp_path / f"z{stage}"
    proc = check(run_ftl(["train", *gpu_overrides(run_dir, **{
        "dist.backend": "deepspeed", "dist.zero_stage": stage, "train.precision": "bf16", "train.max_steps": 10,
        "train.eval_every": 5, "eval.metric": "eval_loss"})], **GPU))
    assert "gradients accumulated in float32 and reduced in float32" in proc.stderr, proc.stderr[-3000:]
    assert proc.stderr.count("export check: ") >= 2 and "FAILED" not in proc.stderr
    _trained(run_dir)


@pytest.mark.gpu_heavy  # builds DeepSpeed's CPUAdam op (a minute or more)
def test_zero3_offload_with_deepspeed_cpu_adam(tmp_path):
    """DeepSpeed's own CPUAdam really ran (its C++ op built); a failed build falling back to torch AdamW fails
    this test instead of passing it."""
    run_dir = tmp_path / "z3off"
    proc = check(run_ftl(["train", *gpu_overrides(run_dir, **{
        "dist.backend": "deepspeed", "dist.zero_stage": 3, "dist.offload": "cpu", "train.precision": "bf16",
        "train.max_steps": 10})], timeout=900, **GPU))
    assert '"offload_optimizer": {"device": "cpu", "pin_memory": true}' in proc.stdout + proc.stderr
    assert "DeepSpeedCPUAdam unavailable" not in proc.stderr
    assert "over DeepSpeedCPUAdam" in proc.stdout + proc.stderr, proc.stderr[-3000:]
    memory = _trained(run_dir)
    assert memory["planned"]["offloaded"] == ["optimizer", "params"]


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_zero3_on_two_gpus_matches_one(tmp_path):
    common = {"dist.backend": "deepspeed", "dist.zero_stage": 3, "train.max_steps": 4, "train.sample_tokens": 0}
    one, two = tmp_path / "one", tmp_path / "two"
    check(run_ftl(["train", *gpu_overrides(one, **common, **{"train.micro_batch": 8})], **GPU))
    check(torchrun(2, ["train", *gpu_overrides(two, **common, **{"train.micro_batch": 4})], **GPU))
    a = [r["loss"] for r in read_metrics(one) if "loss" in r]
    b = [r["loss"] for r in read_metrics(two) if "loss" in r]
    assert b == pytest.approx(a, rel=1e-4)  # TF32/cuBLAS reduction order: looser than on CPU
