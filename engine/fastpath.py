"""The fast path: what the training forward does differently from stock transformers, and why.

Every piece is switchable from the `perf` config section (and `train.precision`, `model.compile`,
`model.gradient_checkpointing`, `optim.fused`); docs/performance.md lists them with their defaults.

1. Padded vocabulary. The tied embedding / LM head is padded to a multiple of `perf.pad_vocab_to`
   rows (GPT-2's 50257 -> 50304), so the largest matmul of the model has tensor-core friendly shapes.
   The padded logits are masked to -inf before the softmax (they take no probability mass and get
   no gradient), `logits()` returns only the real vocabulary, the model config keeps the real
   `vocab_size`, and every export slices the padding off (`unpad_state_dict`).

2. `LMHead`: the output layer as a module whose forward takes the labels and returns the summed
   loss, computed by `losses.linear_cross_entropy_sum` in chunks of tokens without materializing the
   [tokens x vocab] fp32 logits. The weight is read inside the head's OWN forward on purpose:
   DeepSpeed ZeRO-3 gathers a partitioned parameter for the forward of the module that owns it. Read
   anywhere else it is an empty shard, unless DeepSpeed's getter hook notices the read inside some
   other module's eager forward and registers it as that module's "external parameter" (0.19.8 does;
   the hook is skipped while torch.compile traces, and outside every forward the shard stays empty).
   Here ZeRO-3 gathers the tied weight for the head's forward like for any nn.Linear and releases it
   after, no backend has to `register_external_parameter`, and no backend has to know about the
   chunked loss (tests/distributed/test_zero3_lm_head.py runs it under real ZeRO-3).

3. Causal body. For packed LM data (every batch full length, no attention_mask) the GPT-2 blocks are
   called directly with no mask, so SDPA runs with is_causal=True (the flash kernel on GPU).
   transformers' own GPT2Model.forward would, on every forward, read device values back twice
   (`warn_if_padding_and_no_attention_mask` checks the pad id in input_ids; the packed-sequence
   detection calls `.all()` on the position ids): two host-device syncs per micro-batch. The blocks,
   their weights and HF's per-block activation checkpointing are the stock modules; only the
   dispatch around them is skipped. Unpacked data goes through transformers' forward, which builds
   the padding mask, for every batch: the path is chosen per run, not per batch, because ZeRO-3
   needs the same module sequence on every rank.

4. Fused GELU. GPT-2's activation ("gelu_new", transformers' NewGELUActivation) is the tanh
   approximation written as 8 elementwise operations, 8 kernels forward and more backward in eager
   mode. `F.gelu(approximate="tanh")` is the same function in one kernel (measured on CPU: 5x faster
   forward + backward, max difference 2.4e-7 in fp32). Exports are unaffected (no weights change, the
   config still says gelu_new); compiled runs fuse either.

5. `configure()`: TF32 matmuls for fp32 on CUDA (through the legacy API: see `set_tf32`), and
   `train.precision=auto` resolved to bf16 on a GPU that supports it (fp32 elsewhere).

6. Packed examples (prompt_completion/chat with data.pack=true, text with data.isolate_documents): the
   causal body above assumes positions 0..T-1 and plain causal attention, which would let an example
   see the ones packed before it. Such batches carry `position_ids` (restarting at 0 per example) and
   `document_ids`; `causal_body` then embeds those positions and gives every block the block-diagonal
   causal mask of `document_mask` (SDPA with a boolean mask: the memory-efficient kernel on GPU, not
   flash). The transformers path gets the same mask as a prepared 4D mask. Invariant 6 (a packed row's
   per-token losses and gradients equal its examples run alone) is tested with these default settings.

7. Compilation. `resolve_compile()`: model.compile=auto is on for CUDA (DDP, ZeRO 0-2); `CompiledOrEager`
   falls back to eager with a message if compiling the step fails; `compile_report()` states the graphs
   and graph breaks after the first step. The chunked loss's per-chunk work is compiled on its own on CUDA
   (perf.fused_loss, losses.py) so eager runs get fused kernels for it too.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn

from engine import losses

# logits chunk budget for perf.ce_chunk_tokens=0, per device: rows x padded vocab <= this many values. On the CPU
# 2^26 (a 256 MiB fp32 block: the eager softmax passes stay cheap); on CUDA 2^28 (for GPT-2's 50304 rows, 5336
# rows: 16k-token micro-batches in 4 chunks, each matmul large enough to run near the tensor-core peak, 0.5 GiB
# of bf16 logits and as much gradient alive at a time).
CHUNK_ELEMENTS = {"cpu": 1 << 26, "cuda": 1 << 28}
CHUNK_ROW_MULTIPLE = 64  # tensor-core friendly row counts


def resolve_precision(precision: str, device: torch.device | None = None) -> str:
    """train.precision with `auto` decided: bf16 on a CUDA device that supports it, else fp32.
    Without a device (config validation, before any process group) the default CUDA device decides."""
    if precision != "auto":
        return precision
    cuda = torch.cuda.is_available() if device is None else device.type == "cuda"
    return "bf16" if cuda and torch.cuda.is_bf16_supported() else "fp32"


def configure(cfg, device: torch.device) -> None:
    """Process-wide switches, set once before the model is built; resolves train.precision=auto."""
    cfg.train.precision = resolve_precision(cfg.train.precision, device)
    if device.type == "cuda":
        set_tf32(cfg.perf.tf32)
        losses.probe_fp32_accumulation(device)  # the chunked loss's fp32-output GEMM, if this torch has it


# TF32. torch >= 2.9 has two ways to say it: the legacy `torch.set_float32_matmul_precision` /
# `cudnn.allow_tf32` and the per-backend `fp32_precision` attributes. Setting the new ones makes the legacy
# getter `torch.get_float32_matmul_precision()` raise ("mix of the legacy and new APIs"), and inductor's
# max-autotune calls that getter. The legacy setters update the new state consistently on every torch from
# 1.12 to 2.13 (both getters answer afterwards), so the engine only ever uses them.

def set_tf32(enabled: bool) -> None:
    """TF32 tensor-core math for fp32 matmuls and convolutions on CUDA, on or off (process-wide)."""
    torch.set_float32_matmul_precision("high" if enabled else "highest")
    torch.backends.cudnn.allow_tf32 = enabled


def tf32_state() -> tuple[str, bool]:
    """The current TF32 settings, to restore later; readable even after someone used the new API."""
    try:
        matmul = torch.get_float32_matmul_precision()
    except RuntimeError:  # set through the new API by other code: read that instead
        matmul = "high" if torch.backends.cuda.matmul.fp32_precision == "tf32" else "highest"
    try:
        conv = bool(torch.backends.cudnn.allow_tf32)
    except RuntimeError:
        conv = torch.backends.cudnn.conv.fp32_precision == "tf32"
    return matmul, conv


def restore_tf32(state: tuple[str, bool]) -> None:
    torch.set_float32_matmul_precision(state[0])
    torch.backends.cudnn.allow_tf32 = state[1]


@contextlib.contextmanager
def exact_fp32():
    """TF32 off inside the block (logit checks compare true fp32 results), restored after."""
    state = tf32_state()
    set_tf32(False)
    try:
        yield
    finally:
        restore_tf32(state)


def resolve_compile(cfg, device: torch.device, log=print, supported: bool = True) -> bool:
    """model.compile with auto decided: on for CUDA with DDP or ZeRO 0-2 (`supported`: the backend can
    compile at all), off elsewhere (on the CPU compiling costs more than it saves; ZeRO-3's parameter hooks
    are not proven under compile here). On when asked for, unless inductor has no Triton to generate CUDA
    kernels with: then a message, and eager."""
    want = cfg.model.compile
    if want is None:
        want = (supported and device.type == "cuda"
                and not (cfg.dist.backend == "deepspeed" and cfg.dist.zero_stage >= 3))
    if want and device.type == "cuda" and cfg.perf.compile_backend == "inductor" and not _has_triton():
        log("warning: model.compile: inductor needs Triton to generate CUDA kernels and it is not installed "
            "(pip install triton); training without compilation")
        return False
    return bool(want)


def _has_triton() -> bool:
    try:
        from torch.utils._triton import has_triton
    except ImportError:  # very old torch: try the import itself
        import importlib.util

        return importlib.util.find_spec("triton") is not None
    return has_triton()


def compile_options(perf) -> tuple[object, dict]:
    """(backend, torch.compile keyword arguments) for model.compile=true, shared by every backend."""
    from engine import fault

    backend = perf.compile_backend
    if fault.planned("compile_fail", 0, 0) is not None:  # tests: a backend that fails like a broken toolchain
        backend = _failing_compiler
    return backend, ({} if perf.compile_mode == "default" else {"mode": perf.compile_mode})


def _failing_compiler(graph_module, example_inputs):
    raise RuntimeError("FTL_FAULT_INJECT compile_fail: the compiler backend failed")


class CompiledOrEager:
    """The compiled training forward, replaced for good by the eager one if compiling it fails.

    torch.compile compiles lazily, at the first call, before any gradient or collective of that step
    exists, so falling back there is safe: the same micro-batch runs again eagerly. A failure later (the
    backward is compiled at the first backward) is not caught: it names model.compile in its message."""

    def __init__(self, compiled, eager, undo=None, log=print):
        self.compiled, self.eager, self.undo, self.log = compiled, eager, undo, log
        self.checked = False

    def __call__(self, *args, **kwargs):
        if self.checked:
            return self.compiled(*args, **kwargs)
        try:
            out = self.compiled(*args, **kwargs)
        except Exception as e:  # noqa: BLE001  (whatever the compiler raised: eager is always right)
            first = str(e).strip().splitlines()[0] if str(e).strip() else ""
            self.log(f"warning: model.compile: compiling the training step failed ({type(e).__name__}: {first}); "
                     f"continuing without compilation (set model.compile=false to skip the attempt)")
            if self.undo is not None:
                self.undo()
            self.compiled = self.eager
            out = self.eager(*args, **kwargs)
        self.checked = True
        return out

    def __getattr__(self, name):  # no_sync(), module, ... of the wrapped model
        return getattr(self.eager, name)


def start_compile_report() -> None:
    """Forget what dynamo compiled before (its counters are per process), so the report covers this run."""
    from torch._dynamo.utils import counters

    counters.clear()


def compile_report() -> str:
    """What dynamo made of the training step so far: graphs and graph breaks (each break splits the step into
    separately compiled pieces with Python in between; the fast path is meant to have none)."""
    from torch._dynamo.utils import counters

    breaks = counters.get("graph_break", {})
    n_breaks = sum(breaks.values())
    graphs = counters.get("stats", {}).get("unique_graphs", 0)
    line = f"model.compile: the training step compiled into {graphs} graph(s) with {n_breaks} graph break(s)"
    if n_breaks:
        line += ": " + "; ".join(f"{reason} (x{n})" for reason, n in list(breaks.items())[:3])
    return line


def padded_size(vocab: int, multiple: int) -> int:
    return -(-vocab // multiple) * multiple if multiple > 1 else vocab


class LMHead(nn.Module):
    """Replaces GPT2LMHeadModel.lm_head (same `weight`, the tied, possibly padded embedding).

    `head(hidden)` -> logits over the real vocabulary (what transformers' forward and generation call);
    `head(hidden, labels)` -> summed cross-entropy over the targets (labels already shifted, IGNORE
    where nothing is predicted), chunked or plain as configured.
    """

    def __init__(self, weight: nn.Parameter, vocab_size: int, chunked: bool = True, chunk_tokens: int = 0,
                 fused: bool = True):
        super().__init__()
        self.weight = weight
        self.vocab_size = vocab_size
        self.chunked = chunked
        self.chunk_tokens = chunk_tokens
        self.fused = fused

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]

    def chunk_rows(self, tokens: int | None = None, device: torch.device | None = None) -> int:
        """Rows per chunk: perf.ce_chunk_tokens, else the device's budget (CHUNK_ELEMENTS) split evenly over
        `tokens` rows (equal chunks: one compiled shape, no small remainder chunk)."""
        if self.chunk_tokens:
            return self.chunk_tokens
        rows_of = self.weight.ds_shape[0] if hasattr(self.weight, "ds_shape") else self.weight.shape[0]
        kind = (device or self.weight.device).type
        budget = max(CHUNK_ROW_MULTIPLE, CHUNK_ELEMENTS.get(kind, CHUNK_ELEMENTS["cpu"]) // max(1, rows_of))
        if tokens is None or tokens <= budget:
            return budget if tokens is None else max(1, tokens)
        chunks = -(-tokens // budget)
        rows = -(-tokens // chunks)
        return min(budget, -(-rows // CHUNK_ROW_MULTIPLE) * CHUNK_ROW_MULTIPLE)

    def forward(self, hidden: torch.Tensor, labels: torch.Tensor | None = None,
                label_smoothing: float = 0.0, grad_scale: torch.Tensor | None = None) -> torch.Tensor:
        if labels is None:
            return F.linear(hidden, self.weight)[..., : self.vocab_size]
        if self.chunked:
            rows = self.chunk_rows(labels.numel(), hidden.device)
            return losses.linear_cross_entropy_sum(hidden, self.weight, labels, self.vocab_size, rows,
                                                   label_smoothing, grad_scale, self.fused)
        logits = F.linear(hidden, self.weight)[..., : self.vocab_size]  # slicing drops padded columns
        if label_smoothing:
            return F.cross_entropy(logits.flatten(0, -2).float(), labels.flatten(), ignore_index=losses.IGNORE,
                                   reduction="sum", label_smoothing=label_smoothing)
        return losses.lm_loss_sum(logits, labels)

    def extra_repr(self) -> str:
        return (f"vocab={self.vocab_size}, padded={self.weight.shape[0]}, chunked={self.chunked}, "
                f"chunk_tokens={self.chunk_tokens or 'auto'}, fused={self.fused}")


def install_lm_head(hf_model: nn.Module, perf) -> None:
    """Pad the tied embedding to `perf.pad_vocab_to` rows and put an `LMHead` in place of lm_head.

    Uses transformers' own resize (which gathers under ZeRO-3 and re-ties), then restores the real
    vocabulary size in the config: exports, generation and the logit check all see the real one."""
    real = hf_model.get_input_embeddings().num_embeddings
    if padded_size(real, perf.pad_vocab_to) != real:
        hf_model.resize_token_embeddings(real, pad_to_multiple_of=perf.pad_vocab_to, mean_resizing=False)
    hf_model.config.get_text_config().vocab_size = real
    hf_model.vocab_size = real
    hf_model.lm_head = LMHead(hf_model.get_output_embeddings().weight, real, perf.chunked_ce, perf.ce_chunk_tokens,
                              perf.fused_loss)


def padding_parameters(hf_model: nn.Module) -> int:
    """Parameters that exist only because of vocabulary padding (left out of N in the MFU formula)."""
    head = getattr(hf_model, "lm_head", None)
    if not isinstance(head, LMHead):
        return 0
    rows, dim = head.weight.ds_shape if hasattr(head.weight, "ds_shape") else head.weight.shape
    return (rows - head.vocab_size) * dim


def unpad_state_dict(state: dict[str, torch.Tensor], vocab_size: int) -> dict[str, torch.Tensor]:
    """The exported weights: vocabulary-sized tensors cut back to the real `vocab_size` rows."""
    out = dict(state)
    for name in ("transformer.wte.weight", "lm_head.weight"):
        t = out.get(name)
        if t is not None and t.ndim == 2 and t.shape[0] > vocab_size:
            out[name] = t[:vocab_size].clone()
    return out


class TanhGELU(nn.Module):
    """GPT-2's "gelu_new" in one kernel."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(x, approximate="tanh")


def fuse_gelu(model: nn.Module) -> int:
    """Swap every transformers NewGELUActivation for `TanhGELU`; returns how many were swapped."""
    from transformers.activations import NewGELUActivation

    swapped = 0
    for module in model.modules():
        for name, child in module.named_children():
            if type(child) is NewGELUActivation:
                setattr(module, name, TanhGELU())
                swapped += 1
    return swapped


def causal_body(transformer: nn.Module, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None,
                document_ids: torch.Tensor | None = None) -> torch.Tensor:
    """GPT2Model's forward for unpadded causal batches, without its mask building (see point 3 above).

    Same modules in the same order: token + position embedding, dropout, blocks (each checkpointed
    by transformers when gradient checkpointing is on), final LayerNorm.

    Packed rows (point 6) pass `position_ids` (restarting at 0 for every example) and `document_ids`:
    the blocks then get the block-diagonal causal mask instead of is_causal."""
    positions = torch.arange(input_ids.shape[1], device=input_ids.device)[None] if position_ids is None else position_ids
    mask = None if document_ids is None else document_mask(document_ids)
    hidden = transformer.drop(transformer.wte(input_ids) + transformer.wpe(positions))
    for block in transformer.h:
        hidden = (run_block(transformer, block, hidden) if mask is None
                  else run_block(transformer, block, hidden, attention_mask=mask))
    return transformer.ln_f(hidden)


def run_block(transformer: nn.Module, block: nn.Module, hidden: torch.Tensor, **kwargs) -> torch.Tensor:
    """One GPT2Block as GPT2Model.forward runs it, on every supported transformers: 5.x blocks return the
    hidden states and checkpoint themselves (GradientCheckpointingLayer); 4.x blocks return a tuple and
    leave activation checkpointing to GPT2Model.forward, which this path skips, so it is done here."""
    if (getattr(transformer, "gradient_checkpointing", False) and transformer.training
            and not getattr(block, "gradient_checkpointing", False)):
        out = transformer._gradient_checkpointing_func(block.__call__, hidden, **kwargs)
    else:
        out = block(hidden, **kwargs)
    return out[0] if isinstance(out, tuple) else out


def document_mask(document_ids: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """[batch, 1, T, T] attention mask of packed rows: position q sees position k iff k <= q and both belong
    to the same document (block-diagonal causal). Boolean (True: attend) for SDPA; with `dtype`, the
    additive form (0 / dtype's minimum) that eager attention adds to its scores. The diagonal is always
    allowed, so no row is fully masked (which would give NaN)."""
    t = document_ids.shape[-1]
    causal = torch.ones(t, t, dtype=torch.bool, device=document_ids.device).tril()
    allowed = (document_ids[:, :, None] == document_ids[:, None, :]) & causal
    allowed = allowed[:, None]
    if dtype is None:
        return allowed
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(~allowed, torch.finfo(dtype).min)


def can_use_causal_body(hf_model: nn.Module, perf) -> bool:
    cfg = hf_model.config
    return (perf.causal_body and cfg._attn_implementation == "sdpa" and not cfg.add_cross_attention
            and hasattr(hf_model, "transformer"))
