"""The fast path where it is meant to run; skipped on machines without CUDA."""

import json
import math

import pytest
import torch

from tests.conftest import check, run_ftl, tiny_config

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_train_step_never_waits_on_the_host(tmp_path):
    """No host-device synchronization inside train_step (bf16, chunked loss, padded vocab, prefetching
    loader): CUDA's sync debug mode turns any .item()/nonzero/blocking copy into an error."""
    from engine.trainer import Trainer

    cfg = tiny_config(tmp_path / "run", **{"data.tokenizer_vocab": 500, "train.grad_accum": 2,
                                          "perf.ce_chunk_tokens": 40, "train.max_steps": 8})
    trainer = Trainer(cfg, progress=False)
    try:
        assert cfg.train.precision == "bf16"  # auto on a bf16-capable GPU
        for _ in range(2):
            trainer.train_step(trainer.batches.next())
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            for _ in range(3):
                loss_sum, count, tokens, grad_norm, _ = trainer.train_step(trainer.batches.next())
        finally:
            torch.cuda.set_sync_debug_mode("default")
        assert math.isfinite(float(loss_sum / count)) and float(grad_norm) > 0
    finally:
        trainer.close()


def test_chunked_loss_bf16_on_gpu():
    from engine import losses

    g = torch.Generator(device="cuda").manual_seed(0)
    h = torch.randn(4096, 768, device="cuda", generator=g).requires_grad_()
    w = (0.02 * torch.randn(50304, 768, device="cuda", generator=g)).requires_grad_()
    y = torch.randint(0, 50257, (4096,), device="cuda", generator=g)
    ref = torch.nn.functional.cross_entropy((h @ w.T)[:, :50257].float(), y, reduction="sum")
    gh_ref, gw_ref = torch.autograd.grad(ref, [h, w])
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = losses.linear_cross_entropy_sum(h, w, y, 50257, 1024)
    gh, gw = torch.autograd.grad(loss, [h, w])
    assert float((loss - ref).abs() / ref) < 1e-2
    assert float((gh - gh_ref).norm() / gh_ref.norm()) < 3e-2
    assert float((gw - gw_ref).norm() / gw_ref.norm()) < 3e-2


def test_bench_reports_mfu_on_gpu(tmp_path):
    out = tmp_path / "bench"
    check(run_ftl(["bench", "--preset", "gpt2-mini", "--micro-batch", "8", "--seq-len", "256", "--steps", "5",
                   "--warmup", "2", "--out", out], timeout=900))
    report = json.loads((out / "throughput.json").read_text())
    for impl, r in report["points"][0]["results"].items():
        assert r["peak_gpu_mib"] > 0, impl
        assert r["mfu"] is None or 0 < r["mfu"] < 1, impl  # None only on a GPU missing from the peak table


def test_inductor_compile_matches_eager_on_gpu(tmp_path):
    """model.compile=true with inductor (Triton kernels) against eager, bf16, a few steps."""
    from tests.conftest import train_losses
    from engine.trainer import Trainer

    losses = {}
    for compiled in (False, True):
        run = tmp_path / f"compile-{compiled}"
        trainer = Trainer(tiny_config(run, **{"model.compile": str(compiled).lower(), "data.tokenizer_vocab": 500,
                                             "train.max_steps": 4, "train.sample_tokens": 0}), progress=False)
        try:
            trainer.train()
        finally:
            trainer.close()
        losses[compiled] = train_losses(run)
    assert losses[True] == pytest.approx(losses[False], rel=2e-2)  # bf16: kernels round differently
