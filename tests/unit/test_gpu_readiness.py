"""What a first GPU run needs, proved on the CPU (issue 13): each test simulates the GPU condition it is about
(a CUDA-typed device without CUDA, 16-bit rounding, a prefetching thread that fails, a deferred status read)
and fails without the fix it guards."""

from __future__ import annotations

import math
import re
import threading
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from engine import dist, fastpath, fault, losses, metrics, model as model_lib
from engine.data import sources as data
from engine.config import ModelConfig, PerfConfig, load_config
from engine.dist import DistEnv
from engine.errors import ExportMismatch, UsageError
from tests.conftest import ROOT, assert_train_refused, env_for_subprocess, tiny_config, tiny_overrides


# --------------------------------------------------------------------------------------------- TF32

@pytest.fixture
def tf32_restored():
    state = fastpath.tf32_state()
    yield
    fastpath.restore_tf32(state)


def test_tf32_is_set_through_an_api_both_getters_read(tf32_restored):
    """After configure() on a CUDA device the legacy getter still answers (inductor's max-autotune calls it;
    torch >= 2.9 raises "mix of the legacy and new APIs" after the per-backend fp32_precision setters)."""
    cfg = load_config(None, ["train.precision=fp32"])
    fastpath.configure(cfg, torch.device("cuda"))  # a CUDA-typed device: configure touches no GPU
    assert torch.get_float32_matmul_precision() == "high"
    assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
    if hasattr(torch.backends.cuda.matmul, "fp32_precision"):  # the new API agrees
        assert torch.backends.cuda.matmul.fp32_precision == "tf32"
    with fastpath.exact_fp32():  # the export check's probe
        assert torch.get_float32_matmul_precision() == "highest" and not torch.backends.cuda.matmul.allow_tf32
    assert torch.get_float32_matmul_precision() == "high"
    cfg = load_config(None, ["train.precision=fp32", "perf.tf32=false"])
    fastpath.configure(cfg, torch.device("cuda"))
    assert torch.get_float32_matmul_precision() == "highest"


# ----------------------------------------------------------------------------------- one GPU per rank

def _launched(monkeypatch, visible: int, local_rank: int, local_world: int, launcher: str = "torchrun"):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: visible > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: visible)

    def no_gpu_here(*a, **k):
        raise AssertionError("torch.cuda.set_device must not be reached")

    monkeypatch.setattr(torch.cuda, "set_device", no_gpu_here)
    return {"rank": local_rank, "world_size": local_world, "local_rank": local_rank,
            "local_world_size": local_world, "launcher": launcher}


def test_more_local_ranks_than_visible_gpus_is_refused(monkeypatch):
    """Two ranks on one GPU would fail inside NCCL ("Duplicate GPU detected"): exit 2 before anything."""
    layout = _launched(monkeypatch, visible=2, local_rank=1, local_world=4)
    with pytest.raises(UsageError) as e:
        dist.cuda_device_index(layout)
    text = e.value.render()
    assert "4 ranks on this node but only 2 visible GPUs" in text and "--nproc-per-node 2" in text
    layout = _launched(monkeypatch, visible=1, local_rank=0, local_world=2)
    with pytest.raises(UsageError, match="2 ranks on this node but only 1 visible GPU"):
        dist.cuda_device_index(layout)
    assert dist.cuda_device_index(_launched(monkeypatch, visible=2, local_rank=1, local_world=2)) == 1
    # srun with one GPU bound per task: every task sees its own GPU as device 0
    assert dist.cuda_device_index(_launched(monkeypatch, visible=1, local_rank=3, local_world=4, launcher="srun")) == 0
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    _launched(monkeypatch, visible=1, local_rank=1, local_world=2)
    with pytest.raises(UsageError, match="each rank needs a GPU of its own"):
        dist.init("auto")  # the real entry point, before any process group or device is touched


def test_train_device_cuda_without_a_gpu_is_a_usage_error(tmp_path, capsys):
    """On this CPU machine: exit 2, one message, nothing written."""
    assert_train_refused(tmp_path, ["train.device=cuda"], ["train.device=cuda but this process sees no CUDA GPU"],
                         capsys)


def test_the_cpu_suite_is_pinned_to_the_cpu(tmp_path):
    """On a GPU machine the suite outside tests/gpu must still run in fp32 on the CPU (its assertions are exact)."""
    assert tiny_config(tmp_path / "r").train.device == "cpu"
    assert env_for_subprocess()["CUDA_VISIBLE_DEVICES"] == ""
    assert env_for_subprocess(CUDA_VISIBLE_DEVICES="0")["CUDA_VISIBLE_DEVICES"] == "0"
    assert "CUDA_VISIBLE_DEVICES" not in env_for_subprocess(CUDA_VISIBLE_DEVICES=None)  # GPU_ENV, nothing hidden


# --------------------------------------------------------------------------------- prefetching thread

@pytest.fixture(scope="module")
def prepared():
    cfg = tiny_config(Path("/nonexistent-run"))
    raw = data.load_raw(cfg.data, cfg.run.seed)
    tok = data.train_bpe(data.text_iterator(raw["train"], "text"), 300)
    return data.prepare(raw, tok, cfg.data, "lm")


def _next_within(batches, seconds: float):
    """batches.next() on a helper thread: (result or exception, finished in time)."""
    box: dict = {}

    def call():
        try:
            box["value"] = batches.next()
        except BaseException as e:  # noqa: BLE001
            box["error"] = e

    t = threading.Thread(target=call, daemon=True)
    t.start()
    t.join(seconds)
    return box, not t.is_alive()


def test_a_failing_prefetch_thread_fails_the_loop_at_once(prepared, monkeypatch):
    """The thread's error reaches next() immediately (not a 20-minute "hang" on an empty queue), on every later
    call too, and close() joins the thread. Simulated: a CUDA-typed device on a CPU-only machine makes the
    thread's pin_memory() raise; then a data error at the third batch."""
    layout = data.Layout(1, 0, 2, 1)
    batches = data.TrainBatches(prepared, layout, 0, torch.device("cuda"))
    box, done = _next_within(batches, 30)
    assert done, "next() hung after the prefetching thread died"
    assert isinstance(box.get("error"), RuntimeError) and "prefetching thread failed" in str(box["error"])
    assert box["error"].__cause__ is not None  # the thread's own exception, with its traceback
    assert isinstance(_next_within(batches, 30)[0].get("error"), RuntimeError)  # and stays failed
    thread = batches._thread
    batches.close()
    assert not thread.is_alive()

    calls = []
    real = data.TrainBatches.micro_batches

    def third_fails(self, start):
        calls.append(start)
        if len(calls) == 3:
            raise ValueError("row 17 is broken")
        return real(self, start)

    monkeypatch.setattr(data.TrainBatches, "micro_batches", third_fails)
    batches = data.TrainBatches(prepared, layout, 0, torch.device("cpu"))
    batches._prefetch = 2  # the CUDA path's thread, on the CPU (no pinning)
    results = [_next_within(batches, 30) for _ in range(3)]
    assert all(done for _, done in results)
    assert "error" not in results[0][0] and "error" not in results[1][0]
    assert "row 17 is broken" in str(results[2][0]["error"].__cause__)
    thread = batches._thread
    batches.close()
    assert not thread.is_alive()
    # a healthy thread, blocked on a full queue: close() returns only once it has ended
    monkeypatch.setattr(data.TrainBatches, "micro_batches", real)
    batches = data.TrainBatches(prepared, layout, 0, torch.device("cpu"))
    batches._prefetch = 2
    batches.next()
    deadline = time.monotonic() + 30
    while batches._q.qsize() < 2 and time.monotonic() < deadline:  # the queue fills up: the worker waits in put()
        time.sleep(0.01)
    thread = batches._thread
    batches.close()
    assert not thread.is_alive()


# ------------------------------------------------------------------------------ transformers 4.x blocks

class LegacyBlock(torch.nn.Module):
    """A transformers 4.x GPT2Block as causal_body sees it: returns a tuple, does not checkpoint itself."""

    def __init__(self, block):
        super().__init__()
        self.block = block
        self.calls = 0

    def forward(self, hidden, **kwargs):
        self.calls += 1
        return (self.block(hidden),)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_causal_body_runs_transformers_4_blocks(prepared, checkpointing):
    """4.x blocks return tuples (a TypeError in the LayerNorm that follows) and leave activation checkpointing
    to GPT2Model.forward, which the fast path skips (checkpointing would silently be off): both handled."""
    cfg = ModelConfig(name="gpt2-tiny")
    torch.manual_seed(0)
    hf = model_lib.build(cfg, model_lib.resolve(cfg), prepared.tokenizer)
    ids = torch.randint(0, len(prepared.tokenizer), (2, 13))
    expected = fastpath.causal_body(hf.transformer, ids)
    expected.sum().backward()
    g_expected = hf.transformer.h[0].mlp.c_fc.weight.grad.clone()
    hf.zero_grad()
    if checkpointing:
        hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    hf.train()
    for i, block in enumerate(hf.transformer.h):
        block.gradient_checkpointing = False  # 4.x: the block does not checkpoint itself
        hf.transformer.h[i] = LegacyBlock(block)
    got = fastpath.causal_body(hf.transformer, ids)
    got.sum().backward()
    assert torch.allclose(got, expected, atol=1e-6)
    assert torch.allclose(hf.transformer.h[0].block.mlp.c_fc.weight.grad, g_expected, atol=1e-6)
    # checkpointed: each block runs again in the backward
    assert [b.calls for b in hf.transformer.h] == [2 if checkpointing else 1] * len(hf.transformer.h)


def test_training_dependency_floors():
    """get_total_norm / clip_grads_with_norm_ (both backends' step) arrived in torch 2.6; the fast path was
    run on transformers 4.57.1 (tuple-returning blocks, run_block) and 5.x. setup.py must not promise less."""
    from engine import compat

    text = (ROOT / "setup.py").read_text() + compat.TRANSFORMERS_TRAIN  # setup.py reads the latter
    floors = dict(re.findall(r'"?(torch|transformers|deepspeed)>=([\d.]+)"?', text))
    as_tuple = lambda v: tuple(int(x) for x in v.split("."))  # noqa: E731
    assert as_tuple(floors["torch"]) >= (2, 6)
    assert as_tuple(floors["transformers"]) >= (4, 57)
    assert hasattr(torch.nn.utils, "get_total_norm") and hasattr(torch.nn.utils, "clip_grads_with_norm_")


# ------------------------------------------------------------------------------ MFU counts what runs

@pytest.fixture(scope="module")
def gpt2_124m():
    from transformers import GPT2Config, GPT2ForSequenceClassification, GPT2LMHeadModel

    with torch.device("meta"):
        return GPT2LMHeadModel(GPT2Config()), GPT2ForSequenceClassification(GPT2Config(num_labels=4))


def test_mfu_flops_count_what_runs(gpt2_124m):
    lm, cls = gpt2_124m
    n = sum(p.numel() for p in lm.parameters())
    palm = metrics.model_flops_per_token(lm.config, n, 1024)
    assert metrics.training_flops_per_token(lm, "lm", 1024) == palm == pytest.approx(855.2e6, rel=1e-3)
    # head=cls: no [vocab x width] head matmul; the embedding is only a lookup
    assert metrics.training_flops_per_token(cls, "cls", 1024) == pytest.approx(623.6e6, rel=1e-3)
    frozen = [p for p in lm.parameters()]
    try:
        for p in frozen:
            p.requires_grad_(False)
        lm.transformer.h[11].mlp.c_fc.weight.requires_grad_(True)  # only the top MLP trains
        top_only = metrics.training_flops_per_token(lm, "lm", 1024)
        lm.transformer.h[11].mlp.c_fc.weight.requires_grad_(False)
        lm.transformer.h[0].ln_1.weight.requires_grad_(True)  # LoRA-like: grads flow through every frozen weight
        through = metrics.training_flops_per_token(lm, "lm", 1024)
    finally:
        for p in frozen:
            p.requires_grad_(True)
    attention = 12 * 12 * 768 * 1024
    n_blocks = sum(p.numel() for p in lm.transformer.h.parameters())
    head = 50257 * 768
    # below block 11's MLP: forward only; from there up: input gradients; c_fc: its weight gradient too
    assert top_only < 0.45 * palm
    # every weight frozen but gradients flow through all of them: 4 FLOPs per weight, not 6 (the "1.5x")
    assert through == pytest.approx(4 * (n_blocks + 2 * 768 + head) + attention, rel=1e-4)
    assert (palm - attention) / (through - attention) == pytest.approx(1.5, rel=1e-3)  # the weight matmuls


def test_the_trainer_reports_mfu_flops_of_its_own_run(tmp_path):
    from engine.trainer import Trainer

    for extra, ratio in (({}, 1.0), ({"model.freeze": "embeddings,blocks:1"}, None)):
        trainer = Trainer(tiny_config(tmp_path / f"r{len(extra)}", **extra), progress=False)
        try:
            fpt = trainer.flops_per_token
            palm = metrics.model_flops_per_token(trainer.hf_config, trainer.n_params, 32)
            if ratio:
                assert fpt == palm
            else:
                assert fpt < 0.8 * palm
        finally:
            trainer.close()


# ---------------------------------------------------------------------------- chunked loss precision

def test_head_weight_gradient_accumulates_in_fp32():
    """Chunk products of 16-bit operands are summed in fp32, not rounded to 16 bits each: two chunks whose
    products nearly cancel keep their small sum (rounded per chunk: a quarter of it lost)."""
    g = torch.Generator().manual_seed(0)
    a1 = torch.randn(256, 32, generator=g).bfloat16()
    b1 = torch.randn(256, 48, generator=g).bfloat16()
    a2 = (-a1.float() * (1 - 2**-7)).bfloat16()  # exact in bf16: the second product is -(1 - 2^-7) x the first
    acc = torch.zeros(32, 48)
    acc = losses._accumulate_fp32(acc, a1.t(), b1)
    acc = losses._accumulate_fp32(acc, a2.t(), b1)
    ref = a1.double().t() @ b1.double() + a2.double().t() @ b1.double()
    assert acc.dtype == torch.float32
    assert float((acc.double() - ref).norm() / ref.norm()) < 1e-4  # fp32 rounding of the large partial sum
    rounded = torch.mm(a1.t(), b1).float() + torch.mm(a2.t(), b1).float()  # what per-chunk rounding gives
    assert float((rounded.double() - ref).norm() / ref.norm()) > 1e-2


def test_fp16_loss_scaling_covers_gradients_computed_in_the_forward():
    """fp16: softmax probabilities of never-targeted tokens (here ~1e-7) are subnormal or zero in fp16 unless
    scaled first. The plain path scales them (its matmuls run in the backward, after the loss scale); the
    chunked head computes them in its forward and scales by `grad_scale`. Unscaled, their weight-gradient rows
    come out 40-100% wrong."""
    g = torch.Generator().manual_seed(0)
    n, dim, vocab = 64, 32, 256
    h = torch.randn(n, dim, generator=g)
    h[:, 0] = 1.0
    w = 0.3 * torch.randn(vocab, dim, generator=g)
    w[vocab // 2:, 0] = -14.0  # the upper half: probabilities 1e-9 .. 1e-6
    h.requires_grad_(), w.requires_grad_()
    y = torch.randint(0, vocab // 2, (n,), generator=g)
    incoming = 2.0**16 / n  # loss scale x 1/count, the gradient the backward brings
    ref = torch.autograd.grad(F.cross_entropy(h.double() @ w.double().T, y, reduction="sum"), [w])[0]

    def weight_grad(loss_fn):
        with torch.autocast("cpu", dtype=torch.float16):
            loss = loss_fn()
        return torch.autograd.grad(loss * incoming, [w])[0] / incoming

    rare = torch.arange(vocab) >= vocab // 2

    def row_error(grad):
        return float(((grad.double() - ref).norm(dim=1) / ref.norm(dim=1))[rare].median())

    plain = row_error(weight_grad(lambda: F.cross_entropy((h @ w.T).float(), y, reduction="sum")))
    scaled = row_error(weight_grad(lambda: losses.linear_cross_entropy_sum(h, w, y, vocab, 16,
                                                                         grad_scale=torch.tensor(incoming))))
    unscaled = row_error(weight_grad(lambda: losses.linear_cross_entropy_sum(h, w, y, vocab, 16)))
    assert plain < 1e-2 and scaled < 1.5 * plain + 1e-3
    assert unscaled > 0.2  # what the engine computed before


def test_chunk_size_is_chosen_per_device():
    head = fastpath.LMHead(torch.nn.Parameter(torch.zeros(50304, 8)), 50257)
    cpu, cuda = head.chunk_rows(None, torch.device("cpu")), head.chunk_rows(None, torch.device("cuda"))
    assert cpu * 50304 <= 2**26 and cuda * 50304 <= 2**28 and cuda >= 4 * cpu - 64
    rows = head.chunk_rows(16 * 1024, torch.device("cuda"))  # GPT-2 124M's micro-batch
    assert rows % 64 == 0 and math.ceil(16384 / rows) == 4 and rows * 4 - 16384 < 4 * 64  # four equal chunks
    assert head.chunk_rows(300, torch.device("cpu")) == 300  # fewer tokens than a chunk: one chunk
    assert fastpath.LMHead(head.weight, 50257, chunk_tokens=100).chunk_rows(16384, torch.device("cuda")) == 100


# ------------------------------------------------------------------------------ the step's status

class _Backend:
    def __init__(self, module):
        self.module = module

    def loss_scale(self):
        return None


@pytest.mark.parametrize("what", ["nan", "signal"])
def test_the_final_step_status_is_read(tmp_path, monkeypatch, what):
    """On CUDA a step's status (non-finite, preemption) is read one step late; the run's last step has no next
    step, so it must be read at once. Deferred reading simulated on the CPU (defer=True)."""
    monkeypatch.delenv("FTL_FAULT_INJECT", raising=False)
    cfg = load_config(None, ["dist.watchdog_s=0", "train.max_bad_steps=1"])
    printed: list[str] = []
    guard = fault.FaultTolerance(cfg, DistEnv(), tmp_path, _Backend(torch.nn.Linear(1, 1)), printed.append,
                                 defer=True)
    try:
        stops = []
        for step in (1, 2, 3):
            guard.step_begins(step)
            if what == "signal" and step == 3:
                guard.signals.received = "SIGTERM"
            guard.all_reduce_count(torch.tensor(5.0)).wait()
            norm = torch.tensor(math.nan if (what == "nan" and step == 3) else 1.0)
            if what == "nan" and step == 3:
                with pytest.raises(fault.Diverged, match="steps 3-3"):
                    guard.step_ends(step, norm, final=True)
                break
            stops.append(guard.step_ends(step, norm, final=step == 3))
        if what == "signal":
            assert stops == [False, False, True]
    finally:
        guard.close()


# ---------------------------------------------------------------------------------------- timeouts

@pytest.mark.parametrize("sets", [[], ["dist.watchdog_s=300"], ["dist.watchdog_s=3000", "dist.step_timeout_s=60"],
                                  ["dist.timeout_s=100", "dist.watchdog_s=50"]])
def test_the_watchdog_fires_before_any_collective_times_out(sets, tmp_path):
    """A stuck NCCL collective must meet the watchdog (stack dump, exit 4) before its own timeout (an abort
    with neither): in every phase the collective timeout exceeds the watchdog's deadline."""
    cfg = load_config(None, sets)
    d = cfg.dist
    assert fault.startup_collective_timeout(cfg) > d.timeout_s  # start-up and the first step
    assert fault.collective_timeout(cfg, d.watchdog_s, step_phase=True) > d.watchdog_s  # steps
    assert fault.collective_timeout(cfg, d.timeout_s) > d.timeout_s  # evaluation, saves
    assert fault.collective_timeout(cfg, d.watchdog_s, step_phase=True) >= d.step_timeout_s
    off = load_config(None, sets + ["dist.watchdog_s=0"])  # no watchdog: the configured timeouts as they are
    assert fault.collective_timeout(off, 0, step_phase=True) == off.dist.step_timeout_s


# ------------------------------------------------------------------------------------- export check

def test_export_check_tolerance_follows_the_compute_dtype():
    from engine.trainer import compare_logits, export_tolerance

    assert export_tolerance(torch.float32) == 1e-4
    assert export_tolerance(torch.bfloat16) == 4 * 2**-7 and export_tolerance(torch.float16) == 4 * 2**-10
    g = torch.Generator().manual_seed(0)
    logits = 8 * torch.randn(2, 5, 40, generator=g)
    # bf16: one unit in the last place at the largest logit is rounding, not a broken export
    ours = logits.bfloat16()
    ulp = torch.finfo(torch.bfloat16).eps * logits.abs().max()
    diff, tol = compare_logits(ours, (logits + ulp * (logits == logits.max())).bfloat16().float(), None,
                               Path("final"), "cpu, bfloat16")
    assert 0 < diff <= tol
    # fp32: TF32's 10-bit mantissa on one side (what the old check compared) is far outside fp32's tolerance
    tf32_like = (logits.view(torch.int32) & ~0x1FFF).view(torch.float32)
    with pytest.raises(ExportMismatch) as e:
        compare_logits(logits, tf32_like, None, Path("final"), "cpu, float32")
    text = str(e.value)
    assert re.search(r"max \|difference\| [\d.e-]+ at sample \d, position \d, token \d+ \(engine", text), text
    # padding positions never count
    mask = torch.ones(2, 5, dtype=torch.long)
    mask[1, 3:] = 0
    broken = logits.clone()
    broken[1, 4] += 5.0
    assert compare_logits(logits, broken, mask, Path("final"), "cpu, float32")[0] == 0.0
    with pytest.raises(ExportMismatch, match="sample 1, position 4"):
        compare_logits(logits, broken, None, Path("final"), "cpu, float32")


# ------------------------------------------------------------------------- identical initial weights

@pytest.mark.parametrize("head", ["lm", "cls"])
def test_zero3_construction_initializes_like_ddp_on_any_device(prepared, head):
    """Under deepspeed.zero.Init the model's tensors live on the GPU in bf16: constructors draw from the CUDA
    generator and a bf16 draw gives other numbers than an fp32 one, so ZeRO-3 would start elsewhere than DDP.
    Simulated with float64 tensors (other draws than fp32, like the GPU's): built through the ZeRO-3 init path,
    the weights must equal a plain fp32 CPU build exactly, and the CPU generator end in the same state."""
    import deepspeed

    from engine.backends.deepspeed import _gathered_init

    cfg = ModelConfig(name="gpt2-tiny", head=head)
    torch.manual_seed(0)
    ref = model_lib.build(cfg, model_lib.resolve(cfg), prepared.tokenizer, 3)
    after = torch.get_rng_state()
    torch.manual_seed(0)
    torch.set_default_dtype(torch.float64)
    try:
        with _gathered_init(deepspeed):
            other = model_lib.build(cfg, model_lib.resolve(cfg), prepared.tokenizer, 3)
    finally:
        torch.set_default_dtype(torch.float32)
    assert next(other.parameters()).dtype == torch.float64
    expected = dict(ref.named_parameters())
    for name, p in other.named_parameters():
        assert torch.equal(p.detach().float(), expected[name].detach()), name
    assert torch.equal(torch.get_rng_state(), after)


# ------------------------------------------------------------------------------------- bench honesty

def test_bench_isolates_each_implementations_settings_and_reports_a_failed_point(tf32_restored):
    """`--ablate`'s TF32-off (ours-plain, configured on a CUDA device) must not leak into the baselines measured
    after it; an implementation that fails (a DeepSpeed op that does not build) is recorded as failed and the
    grid goes on; a usage error still exits 2."""
    from engine.commands import bench

    env = DistEnv()
    row = {"label": "gpt2 ddp mb16x1 T1024", "results": {}, "skipped": {}, "failed": {}}
    fastpath.set_tf32(True)
    plain = load_config(None, ["train.precision=fp32", "perf.tf32=false"])
    bench._attempt(row, "ours-plain", env, lambda: fastpath.configure(plain, torch.device("cuda")))
    assert torch.get_float32_matmul_precision() == "high"  # restored for the next implementation

    def build_fails():
        raise RuntimeError("Error building extension 'fused_adam'\nninja: build stopped")

    assert bench._attempt(row, "hf", env, build_fails) is None
    assert row["failed"] == {"hf": "RuntimeError: Error building extension 'fused_adam'"}
    row["results"]["ours"] = {"tokens_per_s": 1.0, "mfu": None, "step_time_ms": 1.0, "peak_gpu_mib": None,
                              "rss_mib": 1.0}
    text = bench.table({"points": [row]})
    assert "FAILED (1)" in text and "hf failed: RuntimeError: Error building extension 'fused_adam'" in text
    with pytest.raises(UsageError):
        bench._attempt(row, "ours", env, lambda: load_config(None, ["train.micro_batch=0"]))


# --------------------------------------------------------------------------------- compile by default

@pytest.mark.parametrize("backend, stage, device, expected", [
    ("ddp", 0, "cuda", True), ("deepspeed", 2, "cuda", True), ("deepspeed", 3, "cuda", False),
    ("ddp", 0, "cpu", False)])
def test_compile_is_on_by_default_on_cuda(tmp_path, monkeypatch, backend, stage, device, expected):
    """model.compile left empty: on for a CUDA device with DDP or ZeRO 0-2, off on the CPU and for ZeRO-3 (a
    CUDA-typed device needs no GPU to decide). Without Triton, inductor cannot compile for CUDA: a warning, eager."""
    cfg = tiny_config(tmp_path / "r")
    cfg.model.compile, cfg.dist.backend, cfg.dist.zero_stage = None, backend, stage
    monkeypatch.setattr(fastpath, "_has_triton", lambda: True)
    assert fastpath.resolve_compile(cfg, torch.device(device)) is expected
    assert fastpath.resolve_compile(cfg, torch.device(device), supported=False) is False
    said = []
    monkeypatch.setattr(fastpath, "_has_triton", lambda: False)
    assert fastpath.resolve_compile(cfg, torch.device(device), log=said.append) is False
    assert bool(said) is expected and all("needs Triton" in s and "without compilation" in s for s in said)
    cfg.model.compile = False
    assert fastpath.resolve_compile(cfg, torch.device(device)) is False
