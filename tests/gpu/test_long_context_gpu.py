"""Long sequences on a GPU: the real peak memory of a checkpointed step against the benchmark's numbers,
and the serving/explaining paths on CUDA. Skipped without CUDA (written without a GPU at hand: the
CPU tests check the same bound on saved activations)."""

import importlib.util

import pytest
import torch

from tests.conftest import ROOT

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _bench():
    spec = importlib.util.spec_from_file_location("long_context", ROOT / "benchmarks" / "long_context.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.gpu_heavy
def test_checkpointed_peak_memory_stays_within_the_reported_limits():
    bench = _bench()
    T = 4096
    on = bench.measure("gpt2", T, True, "cuda")
    off = bench.measure("gpt2", T, False, "cuda")
    meta_off = bench.measure("gpt2", T, False, "meta")
    block = meta_off["saved_MiB"] / 12  # one block's activations, the math-attention upper bound
    head = bench.train_module("gpt2", T, True, "meta").hf.lm_head
    chunk_logits = 2 * head.chunk_rows() * head.weight.shape[0] * 4 / 2**20  # one chunk's fp32 logits (+ its cast)
    assert on["saved_MiB"] <= on["bound_MiB"]
    assert on["peak_MiB"] <= on["bound_MiB"] + block + chunk_logits, (on, block, chunk_logits)
    assert on["peak_MiB"] < off["peak_MiB"]
