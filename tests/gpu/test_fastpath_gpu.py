"""The fast path where it is meant to run; skipped on machines without CUDA.

What matters on the GPU, asserted: GPT-2 124M at T=1024 reports its MFU by the stated formula; the host
syncs of a training step are counted from the CUDA runtime (torch's sync debug mode does not see
cudaEventSynchronize or a library's own waits) and bounded; the fused (compiled) chunked loss equals the
plain loss; the head's weight gradient is accumulated in fp32 by one cuBLAS call; compile is on by default
and has no graph break; a default bf16 run passes its export check."""

import json
import math

import pytest
import torch

from tests.conftest import GPU_ENV, check, gpu_config, gpu_overrides, read_metrics, run_ftl

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_train_step_never_waits_on_the_host(tmp_path):
    """No torch-level host-device synchronization inside train_step (bf16, chunked loss, padded vocab,
    prefetching loader): CUDA's sync debug mode turns any .item()/nonzero/blocking copy into an error."""
    from engine.trainer import Trainer

    cfg = gpu_config(tmp_path / "run", **{"data.tokenizer_vocab": 500, "train.grad_accum": 2,
                                          "perf.ce_chunk_tokens": 40, "train.max_steps": 8, "model.compile": "false"})
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


def _profiled(tmp_path, out_name: str, extra: list[str]) -> dict:
    out = tmp_path / out_name
    check(run_ftl(["bench", "--preset", "gpt2-mini", "--micro-batch", "8", "--seq-len", "256", "--steps", "4",
                   "--warmup", "3", "--baselines", "none", "--profile", "--compile", "off", "--out", out, *extra],
                  timeout=900, **GPU_ENV))
    return json.loads((out / "throughput.json").read_text())["profile"]


@pytest.mark.gpu_heavy
def test_host_syncs_per_step_are_counted_and_bounded(tmp_path):
    """The loop as it runs (bench's _loop_step) under torch.profiler: CUDA runtime calls that block the host.
    DDP: at most the guard's one deferred event wait per step. DeepSpeed ZeRO-2 bf16: its optimizer's own
    waits counted too, bounded (the number is recorded by benchmarks/gpu_check.sh)."""
    ddp = _profiled(tmp_path, "ddp", [])
    assert ddp["host_syncs_per_step"] <= 1.0, ddp
    zero2 = _profiled(tmp_path, "zero2", ["--backend", "zero2"])
    print(f"measured: host syncs per step: ddp {ddp['host_syncs_per_step']} {ddp['host_syncs']}, "
          f"zero2 {zero2['host_syncs_per_step']} {zero2['host_syncs']}")
    assert zero2["host_syncs_per_step"] <= 8, zero2


@pytest.mark.gpu_heavy
def test_gpt2_124m_reports_its_mfu(tmp_path):
    """GPT-2 124M at T=1024, bf16, compiled (the default on CUDA): MFU = tokens/s x 855.2 MFLOP/token / peak,
    and on an H100/H200 at least 25% (the design target is 50%; benchmarks/RESULTS.md has the measurement)."""
    from engine import metrics

    out = tmp_path / "bench"
    check(run_ftl(["bench", "--preset", "gpt2", "--micro-batch", "8", "--seq-len", "1024", "--steps", "6",
                   "--warmup", "4", "--baselines", "none", "--compile", "on", "--out", out], timeout=1200, **GPU_ENV))
    report = json.loads((out / "throughput.json").read_text())
    point = report["points"][0]
    assert point["failed"] == {}, point["failed"]
    assert point["flops_per_token"] == pytest.approx(855.2e6, rel=1e-3)
    ours = point["results"]["ours"]
    peak = metrics.peak_flops(torch.device("cuda"))
    print(f"measured: gpt2 T=1024 mb8 compiled: {ours['tokens_per_s']:.0f} tokens/s, MFU {ours['mfu']}, "
          f"peak {ours['peak_gpu_mib']:.0f} MiB on {report['environment']['gpu']}")
    if peak is None:
        pytest.skip(f"{report['environment']['gpu']} has no peak in engine/metrics.py")
    assert ours["mfu"] == pytest.approx(ours["tokens_per_s"] * point["flops_per_token"] / peak, rel=1e-9)
    if any(name in report["environment"]["gpu"] for name in ("H100", "H200")):
        assert ours["mfu"] >= 0.25


def test_fused_chunked_loss_equals_the_plain_loss_on_gpu():
    """perf.fused_loss: each chunk's softmax and gradient compiled (Triton kernels) against the plain loss in
    fp64; the head's weight gradient accumulated in fp32 by torch.addmm(out_dtype=float32)."""
    from engine import losses

    assert losses.probe_fp32_accumulation(torch.device("cuda")), "no fp32-output addmm (torch >= 2.8 has it)"
    g = torch.Generator(device="cuda").manual_seed(0)
    h = torch.randn(4096, 768, device="cuda", generator=g).requires_grad_()
    w = (0.02 * torch.randn(50304, 768, device="cuda", generator=g)).requires_grad_()
    y = torch.randint(0, 50257, (4096,), device="cuda", generator=g)
    y[::7] = losses.IGNORE
    ref = torch.nn.functional.cross_entropy((h.double() @ w.double().T)[:, :50257], y, reduction="sum",
                                            ignore_index=losses.IGNORE)
    gh_ref, gw_ref = torch.autograd.grad(ref, [h, w])
    for fused in (True, False):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = losses.linear_cross_entropy_sum(h, w, y, 50257, 1024, fused=fused)
        gh, gw = torch.autograd.grad(loss * 2.0, [h, w])
        assert float((loss - ref).abs() / ref) < 1e-2
        assert float((gh / 2 - gh_ref).norm() / gh_ref.norm()) < 3e-2
        assert float((gw / 2 - gw_ref).norm() / gw_ref.norm()) < 3e-2
    assert losses._compiled.get("cuda") not in (None, False), "the fused chunk function fell back to eager"


def test_a_default_gpu_run_compiles_without_graph_breaks_and_passes_its_export_check(tmp_path):
    """The defaults on CUDA: bf16 autocast, model.compile on (auto), TF32; the export check reloads in fp32 on
    the GPU with TF32 off and passes at fp32's tolerance."""
    run = tmp_path / "run"
    proc = check(run_ftl(["train", *gpu_overrides(run, **{"data.tokenizer_vocab": 500, "train.max_steps": 6,
                                                          "train.sample_tokens": 0})], timeout=900, **GPU_ENV))
    assert "with 0 graph break(s)" in proc.stderr, proc.stderr[-3000:]
    assert "export check: final/ reloaded by plain transformers gives the engine's logits" in proc.stderr
    resolved = (run / "config.yaml").read_text()
    assert "compile: true" in resolved and "precision: bf16" in resolved
    rows = [r for r in read_metrics(run) if "loss" in r]
    assert rows[-1]["loss"] < rows[0]["loss"]


def test_inductor_compile_matches_eager_on_gpu(tmp_path):
    """model.compile=true with inductor (Triton kernels) against eager, bf16, a few steps."""
    from tests.conftest import train_losses
    from engine.trainer import Trainer

    losses = {}
    for compiled in (False, True):
        run = tmp_path / f"compile-{compiled}"
        trainer = Trainer(gpu_config(run, **{"model.compile": str(compiled).lower(), "data.tokenizer_vocab": 500,
                                             "train.max_steps": 4, "train.sample_tokens": 0}), progress=False)
        try:
            trainer.train()
        finally:
            trainer.close()
        losses[compiled] = train_losses(run)
    assert losses[True] == pytest.approx(losses[False], rel=2e-2)  # bf16: kernels round differently


def test_tf32_getters_and_the_deferred_final_step_on_gpu(tmp_path):
    """After the engine configured TF32, inductor's getter works; a NaN in the run's last step is reported."""
    from engine import fastpath

    cfg = gpu_config(tmp_path / "r", **{"train.precision": "fp32"})
    fastpath.configure(cfg, torch.device("cuda"))
    assert torch.get_float32_matmul_precision() == "high"
    run = tmp_path / "nan"
    proc = run_ftl(["train", *gpu_overrides(run, **{"train.max_steps": 3, "train.max_bad_steps": 1,
                                                    "train.sample_tokens": 0, "model.compile": "false"})],
                   timeout=600, FTL_FAULT_INJECT="nan@step=3", **GPU_ENV)
    assert proc.returncode == 3 and "steps 3-3: 1 consecutive steps had a non-finite" in proc.stderr, proc.stderr[-2000:]
