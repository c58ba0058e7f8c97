"""FSDP2 on CUDA: bf16 mixed precision with NCCL, CPU offload (parameter shards and optimizer state in host
memory, only the running block's gathered weights on the GPU), per-block compile with inductor, and 2 GPUs
against one. Skipped on machines without CUDA (the CPU/gloo behaviour is tested in tests/distributed)."""

import pytest
import torch

from tests.conftest import check, read_metrics, run_ftl, tiny_overrides, torchrun

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
FSDP = {"dist.backend": "fsdp", "train.precision": "bf16", "train.max_steps": 10}


def _memory(run_dir):
    rows = [r for r in read_metrics(run_dir) if "loss" in r]
    assert rows[-1]["loss"] < rows[0]["loss"]
    return [r["memory"] for r in read_metrics(run_dir) if "memory" in r][0]


def test_bf16_fsdp_on_one_gpu_keeps_fp32_shards_on_the_gpu(tmp_path):
    run_dir = tmp_path / "bf16"
    proc = check(run_ftl(["train", *tiny_overrides(run_dir, **FSDP)]))
    assert "export check: final/" in proc.stdout + proc.stderr
    (rank,) = _memory(run_dir)["measured"]
    assert rank["params_device"].startswith("cuda") and rank["optimizer_device"].startswith("cuda")
    assert rank["params_at_build"] == 0 and rank["cuda_max_allocated"] > 0


def test_offload_puts_shards_and_optimizer_state_in_host_memory(tmp_path):
    on_gpu, offloaded = tmp_path / "gpu", tmp_path / "offload"
    check(run_ftl(["train", *tiny_overrides(on_gpu, **{**FSDP, "model.name": "gpt2-mini"})]))
    check(run_ftl(["train", *tiny_overrides(offloaded, **{**FSDP, "model.name": "gpt2-mini", "dist.offload": "cpu"})]))
    (resident,), (offload,) = _memory(on_gpu)["measured"], _memory(offloaded)["measured"]
    assert offload["params_device"] == offload["optimizer_device"] == "cpu"
    # the fp32 shards, gradients and moments (16 bytes per parameter, params = 4) left the GPU: at least half
    assert offload["cuda_max_allocated"] < resident["cuda_max_allocated"] - 2 * resident["params"]


def test_per_block_compile_with_inductor(tmp_path):
    run_dir = tmp_path / "compiled"
    check(run_ftl(["train", *tiny_overrides(run_dir, **{**FSDP, "model.compile": True})], timeout=900))
    _memory(run_dir)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_fsdp_on_two_gpus_matches_one(tmp_path):
    common = {"dist.backend": "fsdp", "train.max_steps": 4, "train.sample_tokens": 0, "train.precision": "fp32"}
    one, two = tmp_path / "one", tmp_path / "two"
    check(run_ftl(["train", *tiny_overrides(one, **common, **{"train.micro_batch": 8})]))
    check(torchrun(2, ["train", *tiny_overrides(two, **common, **{"train.micro_batch": 4})]))
    a = [r["loss"] for r in read_metrics(one) if "loss" in r]
    b = [r["loss"] for r in read_metrics(two) if "loss" in r]
    assert b == pytest.approx(a, rel=1e-4)  # TF32/cuBLAS reduction order: looser than on CPU
