"""Fine-tuning paths on CUDA (bf16 autocast with LoRA and class weights, streaming eval on the device);
skipped on machines without CUDA."""

import json

import pytest
import torch

from tests.conftest import GPU_ENV, check, read_metrics, run_ftl, gpu_overrides

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_bf16_lora_classifier_with_class_weights_on_gpu(tmp_path):
    run_dir = tmp_path / "gpu_cls"
    check(run_ftl(["train", *gpu_overrides(run_dir, **{
        "model.head": "cls", "data.source": "builtin:stdlib_packages", "data.seq_len": 64, "train.precision": "bf16",
        "model.lora_rank": 8, "loss.class_weights": "auto", "loss.focal_gamma": 1.0, "train.max_steps": 20,
        "train.eval_every": 10, "train.eval_batches": 0, "eval.metric": "macro_f1"})], **GPU_ENV))
    evals = [r for r in read_metrics(run_dir) if "eval_macro_f1" in r]
    assert [r["step"] for r in evals] == [0, 10, 20]
    report = json.loads((run_dir / "eval/latest.json").read_text())
    assert sum(map(sum, report["confusion"])) == report["eval_samples"]
    assert (run_dir / "best/config.json").is_file() and (run_dir / "final/model.safetensors").is_file()


def test_sliding_window_perplexity_on_gpu(tmp_path):
    run_dir = tmp_path / "gpu_lm"
    check(run_ftl(["train", *gpu_overrides(run_dir, **{"train.precision": "bf16", "eval.stride": 16,
                                                         "train.max_steps": 4})], **GPU_ENV))
    last = [r for r in read_metrics(run_dir) if "eval_sliding_ppl" in r][-1]
    assert last["eval_sliding_ppl"] > 1.0
