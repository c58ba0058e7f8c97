"""Losses as SUMS over targets, and the target counts that normalize them.

Why sums: with gradient accumulation and several ranks, the mean loss of an optimizer step is
    sum over all micro-batches and ranks of per-target losses  /  global number of targets.
Averaging per micro-batch (what most loops do) weights a micro-batch with few targets as much as a
full one, so different world x micro x accum splits of one global batch give different updates.
The trainer all-reduces `target_count` once per step and divides the summed loss by it.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

IGNORE = -100


def lm_loss_sum(logits: torch.Tensor, labels: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """Summed next-token cross-entropy; labels are already shifted, IGNORE marks no target."""
    return F.cross_entropy(logits.flatten(0, -2).float(), labels.flatten(), ignore_index=IGNORE, reduction="sum",
                           label_smoothing=label_smoothing)


def cls_loss_sum(logits: torch.Tensor, labels: torch.Tensor, sample_weights: torch.Tensor | None = None,
                 focal_gamma: float = 0.0, label_smoothing: float = 0.0) -> torch.Tensor:
    """Summed per-sample loss, each sample scaled by its weight (1 when none).

    The per-sample loss is -sum_k q_k (1 - p_k)^gamma log p_k with q the (smoothed) target distribution:
    cross-entropy at gamma=0, focal loss (Lin et al. 2017) at gamma>0 with a one-hot target. Class
    weights arrive as per-sample weights (the weight of each sample's class), and the trainer divides by
    their global sum, which is PyTorch's CrossEntropyLoss(weight=...) mean, exact across micro-batches.
    """
    logits = logits.float()
    if focal_gamma == 0.0:
        per = F.cross_entropy(logits, labels, reduction="none", label_smoothing=label_smoothing)
    else:
        logp = F.log_softmax(logits, dim=-1)
        k = logits.shape[-1]
        target = F.one_hot(labels, k).to(logp.dtype) * (1.0 - label_smoothing) + label_smoothing / k
        per = -(target * (1.0 - logp.exp()).pow(focal_gamma) * logp).sum(-1)
    if sample_weights is not None:
        per = per * sample_weights
    return per.sum()


def class_weights(spec, label_counts: list[int]) -> tuple[torch.Tensor | None, list[str]]:
    """loss.class_weights resolved against the training split: (one weight per class or None, problems).

    auto: N / (K * n_c) over the K classes present (sklearn's "balanced"), so each class carries the same
    total weight; classes absent from the training split get 0 (they are never a target there).
    """
    counts = torch.tensor(label_counts, dtype=torch.float64)
    explicit = spec.class_weight_values()
    if explicit is not None:
        if len(explicit) != len(counts):
            return None, [f"loss.class_weights has {len(explicit)} weights but there are {len(counts)} classes; give one "
                          f"per class in label order"]
        return torch.tensor(explicit, dtype=torch.float32), []
    if not spec.auto_weights:
        return None, []
    present = counts > 0
    weights = torch.where(present, counts.sum() / (present.sum() * counts.clamp(min=1)), torch.zeros_like(counts))
    return weights.float(), []


def target_count(batch: dict[str, torch.Tensor], head: str) -> torch.Tensor:
    """What one micro-batch contributes to the step's normalizer (float, on the batch's device).

    lm: the number of predicted tokens. cls: the sum of sample weights (the sample count when unweighted).
    """
    if head == "lm":
        return (batch["labels"] != IGNORE).sum().to(torch.float32)
    if "loss_weights" in batch:
        return batch["loss_weights"].sum().to(torch.float32)
    # new_full fills on the device; torch.tensor(n, device=cuda) would be a blocking host-to-device copy
    return batch["labels"].new_full((), batch["labels"].numel(), dtype=torch.float32)


def linear_cross_entropy_sum(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, vocab_size: int,
                             chunk_tokens: int, label_smoothing: float = 0.0,
                             grad_scale: torch.Tensor | float | None = None, fused: bool = True) -> torch.Tensor:
    """`lm_loss_sum(hidden @ weight.T [..., :vocab_size], labels)` without the [tokens x vocab] logits.

    The tokens are processed `chunk_tokens` rows at a time. For each chunk the forward computes the
    logits, the loss and, right away, the chunk's gradients with respect to `hidden` and `weight`
    (softmax minus one-hot): three matmuls per chunk, the same FLOPs as forward + backward of the
    plain path, and only one chunk of logits alive at a time. The backward then only scales the
    stored gradients by the incoming scalar. Rows of `weight` beyond `vocab_size` (vocabulary padding)
    are masked out of the softmax, so they take no probability mass and receive zero gradient.

    Under autocast the matmuls run in the autocast dtype (as nn.Linear would), the softmax and the
    loss in fp32, and the weight gradient is accumulated over chunks in fp32 (`_accumulate_fp32`: no
    per-chunk rounding to 16 bits). `grad_scale` (fp16): the incoming gradient the backward expects
    (loss scale x normalization). Without it, softmax probabilities below fp16's smallest number (6e-8)
    would vanish when the chunk's gradient is cast to fp16 for its matmuls, which in the plain path run in
    the backward, after the loss scale has lifted them; with it, the chunk's gradient is scaled before the
    cast (an overflow becomes inf, which the loss scaler detects and skips) and unscaled in the backward.
    `fused`: on CUDA, each chunk's elementwise work runs as compiled, fused kernels (perf.fused_loss).
    """
    dev = hidden.device.type
    dtype = torch.get_autocast_dtype(dev) if _autocast_on(dev) else weight.dtype
    h2, y = hidden.reshape(-1, hidden.shape[-1]), labels.reshape(-1)
    chunk = max(1, int(chunk_tokens))
    if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
        scale = grad_scale if dtype == torch.float16 else None  # bf16 has fp32's range: nothing to lift
        return _LinearCrossEntropySum.apply(h2, weight, y, vocab_size, chunk, float(label_smoothing), dtype, scale,
                                            fused)
    return _chunked_ce(h2, weight, y, vocab_size, chunk, float(label_smoothing), dtype, False, False, None, fused)[0]


def _autocast_on(device_type: str) -> bool:
    try:
        return torch.is_autocast_enabled(device_type)
    except RuntimeError:  # a device type without autocast (meta: benchmarks/long_context.py counts sizes)
        return False


def _softmax_xent(z: torch.Tensor, y: torch.Tensor, vocab: int, smoothing: float, scale, need_grad: bool):
    """One chunk's elementwise work: (summed loss in fp32, d loss / d z in z's dtype or None).

    z: [rows x padded vocab] logits (16-bit under autocast). The fp32 block is touched as few times as
    eager PyTorch allows: one exp pass serves both the log-sum-exp and the softmax, and the target mask is
    folded into the softmax's per-row scale. Compiled (`softmax_xent_for`), it is a few fused kernels
    that read z and write the gradient once each."""
    out_dtype = z.dtype
    z = z.float()
    if z.shape[1] > vocab:
        z[:, vocab:] = float("-inf")  # padding: exp() makes these exactly 0 below
    valid = (y != IGNORE).float()
    target = torch.where(y != IGNORE, y, torch.zeros_like(y))
    z_target = z.gather(1, target[:, None]).squeeze(1)
    z_mean = z[:, :vocab].mean(dim=1) if smoothing else None
    z_max = z.amax(dim=1, keepdim=True)
    e = z.sub_(z_max).exp_()  # in place: z is not needed any more
    row_sum = e.sum(dim=1, keepdim=True)
    lse = (z_max + row_sum.log()).squeeze(1)
    per = lse - z_target
    if smoothing:
        per = (1.0 - smoothing) * per + smoothing * (lse - z_mean)
    loss = (per * valid).sum()
    if not need_grad:
        return loss, None
    g = e.mul_(valid[:, None] / row_sum)  # softmax on target rows, 0 on ignored ones
    g.scatter_add_(1, target[:, None], ((smoothing - 1.0) * valid)[:, None])
    if smoothing:
        g[:, :vocab] -= (smoothing / vocab) * valid[:, None]
    if scale is not None:
        g = g * scale
    return loss, g.to(out_dtype)


_compiled: dict = {}  # device type -> the compiled _softmax_xent, or None after it failed


def softmax_xent_for(device: torch.device, enabled: bool):
    """The per-chunk function to use: compiled into fused kernels on CUDA (perf.fused_loss), else eager.
    A compilation that fails says so once and falls back to eager for the rest of the process."""
    if not enabled or device.type != "cuda":
        return _softmax_xent
    fn = _compiled.get(device.type, False)
    if fn is False:
        fn = _compiled[device.type] = _FallbackOnFailure(torch.compile(_softmax_xent, dynamic=False))
    return fn or _softmax_xent


class _FallbackOnFailure:
    def __init__(self, compiled):
        self.compiled = compiled

    def __call__(self, *args):
        try:
            return self.compiled(*args)
        except Exception as e:  # noqa: BLE001  (any compiler failure: the eager function is always right)
            import sys

            print(f"warning: perf.fused_loss: compiling the chunked loss failed ({type(e).__name__}: "
                  f"{str(e).splitlines()[0] if str(e) else ''}); using the eager chunked loss",
                  file=sys.stderr, flush=True)
            _compiled[args[0].device.type] = None
            return _softmax_xent(*args)


# torch >= 2.8 has addmm with an fp32 output for 16-bit operands (cuBLAS, CUDA only). Whether it runs here is
# found out once, eagerly, by `probe_fp32_accumulation` (fastpath.configure calls it for the run's device):
# probing inside a compiled model would trace a try/except. Until then the operands are upcast (slower, exact).
ADDMM_OUT_DTYPE = False


def probe_fp32_accumulation(device: torch.device) -> bool:
    """Try the fp32-output addmm on `device` once; sets ADDMM_OUT_DTYPE."""
    global ADDMM_OUT_DTYPE
    if device.type != "cuda" or "dtype" not in torch.ops.aten.addmm.overloads():
        return ADDMM_OUT_DTYPE
    try:
        a = torch.ones(8, 8, device=device, dtype=torch.bfloat16)
        out = torch.addmm(torch.ones(8, 8, device=device), a, a, out_dtype=torch.float32)
        ADDMM_OUT_DTYPE = out.dtype == torch.float32 and bool((out == 9).all())
    except Exception:  # noqa: BLE001  (no such kernel, no CUDA at all: the upcast path)
        ADDMM_OUT_DTYPE = False
    return ADDMM_OUT_DTYPE


def _accumulate_fp32(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """acc + a @ b with the product accumulated in fp32, for 16-bit a and b: the fp32 sum over chunks never
    holds a chunk's product rounded to 16 bits. On CUDA one cuBLAS call with an fp32 output (`out_dtype`); on
    the CPU the operands are upcast first. A CUDA torch without `out_dtype` (< 2.8) adds the 16-bit product
    (upcasting a [vocab x chunk] gradient there would cost a GiB and an fp32 GEMM). Returns the accumulator."""
    if a.dtype == torch.float32:
        return acc.addmm_(a, b)
    if a.device.type == "cuda":
        return torch.addmm(acc, a, b, out_dtype=torch.float32) if ADDMM_OUT_DTYPE else acc.add_(torch.mm(a, b))
    return acc.addmm_(a.float(), b.float())


def _chunked_ce(hidden, weight, labels, vocab, chunk, smoothing, dtype, need_h, need_w, scale=None, fused=True):
    """(summed loss, d loss / d hidden or None, d loss / d weight in fp32 or None); the gradients are
    multiplied by `scale` when given."""
    dev = hidden.device.type
    # inside a compiled model dynamo traces the plain function into the model's own graph
    step = _softmax_xent if torch.compiler.is_compiling() else softmax_xent_for(hidden.device, fused)
    with torch.autocast(dev, enabled=False) if _autocast_on(dev) else contextlib.nullcontext():
        w = weight.to(dtype)
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        for start in range(0, hidden.shape[0], chunk):
            h = hidden[start:start + chunk].to(dtype)
            z = torch.mm(h, w.t())
            loss, g = step(z, labels[start:start + chunk], vocab, smoothing, scale, need_h or need_w)
            total += loss
            if need_h:
                grad_h[start:start + chunk] = torch.mm(g, w)
            if need_w:
                grad_w = _accumulate_fp32(grad_w, g.t(), h)
    return total, grad_h, grad_w


class _LinearCrossEntropySum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, vocab, chunk, smoothing, dtype, scale, fused):
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        total, grad_h, grad_w = _chunked_ce(hidden, weight, labels, vocab, chunk, smoothing, dtype, need_h, need_w,
                                            scale, fused)
        ctx.save_for_backward(grad_h, grad_w)
        ctx.weight_dtype = weight.dtype
        ctx.scale = scale
        return total

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w = ctx.saved_tensors
        factor = grad_out.float() if ctx.scale is None else grad_out.float() / ctx.scale  # undo the forward's scale
        gh = (grad_h.float() * factor).to(grad_h.dtype) if grad_h is not None else None
        gw = (grad_w * factor).to(ctx.weight_dtype) if grad_w is not None else None
        return gh, gw, None, None, None, None, None, None, None
