"""Invariant 1: world x micro_batch x grad_accum splits of one global batch give the same losses and the
same final weights. Unpacked variable-length documents make the target counts uneven across
micro-batches and ranks, so a loop that averages per micro-batch fails this test."""

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import check, read_metrics, tiny_config, tiny_overrides, torchrun, train_losses

# fp32 on CPU: the splits differ only in summation order (gloo all-reduce, accumulation order).
# optim.eps=1e-6 below: some gradients are mathematically zero (the attention key bias: softmax ignores
# it), and with eps=1e-8 Adam turns their ~1e-10 summation noise into full +-lr updates.
LOSS_RTOL = 1e-5
WEIGHT_ATOL = 1e-6


def ga_overrides(corpus: Path, run_dir: Path, micro: int, accum: int) -> dict:
    return dict(
        **{"data.source": str(corpus), "data.pack": "false", "data.seq_len": 48, "data.val_fraction": 0.1,
           "train.micro_batch": micro, "train.grad_accum": accum, "train.max_steps": 4, "train.sample_tokens": 0,
           "optim.lr": 3e-3, "optim.eps": 1e-6, "train.clip_grad": 0.5,
           # the fast path on, and doing work: vocabulary 500 padded to 512, the loss in chunks of 40 tokens
           "data.tokenizer_vocab": 500, "perf.ce_chunk_tokens": 40},
    )


def run_in_process(run_dir: Path, corpus: Path, micro: int, accum: int) -> Path:
    from engine.trainer import Trainer

    cfg = tiny_config(run_dir, **ga_overrides(corpus, run_dir, micro, accum))
    trainer = Trainer(cfg, progress=False)
    try:
        trainer.train()
    finally:
        trainer.close()
    return run_dir


def grad_norms(run_dir: Path) -> list[float]:
    return [r["grad_norm"] for r in read_metrics(run_dir) if "grad_norm" in r]


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "final" / "model.safetensors"))


def test_splits_of_one_global_batch_agree(tmp_path, variable_length_corpus):
    corpus = variable_length_corpus
    one_8 = run_in_process(tmp_path / "w1_m8_a1", corpus, 8, 1)
    one_4x2 = run_in_process(tmp_path / "w1_m4_a2", corpus, 4, 2)
    two = tmp_path / "w2_m2_a2"
    check(torchrun(2, ["train", *tiny_overrides(two, **ga_overrides(corpus, two, 2, 2))]))

    ref_losses = train_losses(one_8)
    assert len(ref_losses) == 4
    for other in (one_4x2, two):
        assert (other / "tokenizer" / "tokenizer.json").read_text() == (one_8 / "tokenizer" / "tokenizer.json").read_text()
        assert train_losses(other) == pytest.approx(ref_losses, rel=LOSS_RTOL), other.name
        # the gradient itself, not only what Adam makes of it: Adam is nearly blind to a gradient's scale, so a split
        # whose gradient is off by a constant factor (a forgotten `world`) trains almost the same weights
        assert grad_norms(other) == pytest.approx(grad_norms(one_8), rel=LOSS_RTOL), other.name
        ref_w, w = final_weights(one_8), final_weights(other)
        assert ref_w.keys() == w.keys()
        worst = max(float((ref_w[k] - w[k]).abs().max()) for k in ref_w)
        assert worst < WEIGHT_ATOL, f"{other.name}: max weight difference {worst:.3g}"
    # the run actually trained: weights moved from their initialization by far more than the tolerance
    assert train_losses(one_8)[-1] < ref_losses[0] and min(grad_norms(one_8)) > 0
