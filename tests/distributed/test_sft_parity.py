"""Invariant 1 on instruction data: with prompt/completion examples packed into rows (so every micro-batch
and rank holds a different number of target tokens), world x micro_batch x grad_accum splits of one global
batch give the same losses, gradient norms and final weights on every backend: a single process (micro 8),
and 2 gloo ranks (micro 2 x accum 2) under DDP and DeepSpeed ZeRO 0, 1, 2 and 3.

All 2-rank runs train in ONE torchrun launch (tests/distributed/sft_parity_worker.py), one after another.
The ZeRO-3 run also evaluates with greedy generations at every evaluation: every rank must enter each
forward (the parameters are gathered), so a rank generating alone would hang the launch.

Adding a backend is one line in BACKENDS (e.g. "fsdp": {"dist.backend": "fsdp"})."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import (ROOT, check, env_for_subprocess, free_port, read_metrics, tiny_config, train_losses)

BACKENDS = {
    "ddp": {},
    "zero0": {"dist.backend": "deepspeed", "dist.zero_stage": 0},
    "zero1": {"dist.backend": "deepspeed", "dist.zero_stage": 1},
    "zero2": {"dist.backend": "deepspeed", "dist.zero_stage": 2},
    "zero3": {"dist.backend": "deepspeed", "dist.zero_stage": 3, "train.eval_every": 2, "eval.generations": 2,
              "eval.generation_tokens": 4},
}
# fp32 on CPU: the splits differ only in summation order (see tests/distributed/test_deepspeed.py)
LOSS_RTOL = 1e-5
WEIGHT_ATOL = 1e-6
STEPS = 4


def sft_overrides(data: Path, micro: int, accum: int, **extra) -> dict:
    return {"data.source": str(data), "data.format": "prompt_completion", "data.seq_len": 48,
            "data.val_fraction": 0.1, "train.micro_batch": micro, "train.grad_accum": accum, "train.max_steps": STEPS,
            "train.sample_tokens": 0, "optim.lr": 3e-3, "optim.eps": 1e-6, "train.clip_grad": 0.5,
            "data.tokenizer_vocab": 500, "perf.ce_chunk_tokens": 40, "eval.generations": 0, **extra}


def write_sft_data(path: Path, n: int = 96) -> Path:
    """Prompt/completion pairs of very different lengths (pydoc text), so packed rows carry uneven target counts."""
    import pydoc_data.topics

    texts = [t for t in pydoc_data.topics.topics.values() if len(t) > 200]
    with open(path, "w") as f:
        for i in range(n):
            t = texts[i % len(texts)]
            cut = 10 + (i * 7) % 60
            f.write(json.dumps({"prompt": t[:cut], "completion": t[cut:cut + 5 + (i * 13) % 90]}) + "\n")
    return path


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("sft_parity")
    data = write_sft_data(root / "pairs.jsonl")
    from engine.trainer import Trainer

    trainer = Trainer(tiny_config(root / "single", **sft_overrides(data, 8, 1)), progress=False)
    try:
        trainer.train()
    finally:
        trainer.close()
    specs = [f"{name}=" + ",".join(f"{k}={v}" for k, v in extra.items()) for name, extra in BACKENDS.items()]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", "--rdzv-backend=c10d",
           f"--rdzv-endpoint=127.0.0.1:{free_port()}", str(ROOT / "tests/distributed/sft_parity_worker.py"),
           str(root), str(data), *specs]
    proc = check(subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env_for_subprocess()))
    return root, proc


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "final" / "model.safetensors"))


@pytest.mark.parametrize("name", list(BACKENDS))
def test_sft_splits_agree_on_every_backend(runs, name):
    root, _ = runs
    single, run_dir = root / "single", root / name
    ref = train_losses(single)
    assert len(ref) == STEPS and ref[-1] < ref[0]  # it trained
    rows = [r for r in read_metrics(run_dir) if "loss" in r]
    assert [r["loss"] for r in rows] == pytest.approx(ref, rel=LOSS_RTOL)
    ref_norms = [r["grad_norm"] for r in read_metrics(single) if "loss" in r]
    assert [r["grad_norm"] for r in rows] == pytest.approx(ref_norms, rel=LOSS_RTOL)
    # the same tokens (non-pad) were seen: packed rows, padding excluded
    assert rows[-1]["tokens"] == [r for r in read_metrics(single) if "loss" in r][-1]["tokens"]
    w, rw = weights(run_dir), weights(single)
    assert w.keys() == rw.keys()
    worst = max(float((rw[k] - w[k]).abs().max()) for k in rw)
    assert worst < WEIGHT_ATOL, f"{name}: max weight difference {worst:.3g}"


def test_zero3_evaluates_with_generations_on_every_rank(runs):
    root, proc = runs
    evals = [json.loads(p.read_text()) for p in sorted((root / "zero3" / "eval").glob("step-*.json"))]
    assert [e["step"] for e in evals] == [0, 2, 4]
    for e in evals:
        assert len(e["generations"]) == 2 and all(isinstance(g["completion"], str) for g in e["generations"])
        assert e["eval_loss"] > 0
    assert "greedy completion at step 2" in proc.stdout + proc.stderr
