"""What a run reports: metrics.jsonl, TensorBoard scalars, the console, throughput and MFU.

Only rank 0 writes; the other ranks get a `Metrics` whose methods do nothing, so callers never test
the rank themselves.

MFU (model FLOPs utilization) = achieved model FLOP/s / peak FLOP/s of the device. For full training of an
LM the FLOPs per token are PaLM's (appendix B)
    FLOPs per token = 6 * N + 12 * L * H * Q * T
N: parameters excluding position embeddings (the tied token embedding counts once: it is the LM-head
matmul), L layers, H heads, Q head dim, T sequence length. The first term is the weight matmuls: 2 FLOPs per
parameter and token forward, 2 for the gradient of the input, 2 for the gradient of the weight; the second
attention's score and value matmuls (4 L H Q T forward, twice that backward). Peak: dense bf16 tensor-core
FLOP/s (989e12 on H100/H200 SXM, 312e12 on A100); none on CPU, where MFU is not reported.

`training_flops_per_token` counts what actually runs, parameter by parameter in forward order, so other runs
are not over-reported: head=cls has no [vocab x width] head matmul (the embedding is only a lookup; GPT-2 124M
at T=1024: 623 instead of 855 MFLOP/token); a frozen weight (model.freeze, LoRA's base) has no weight
gradient (4 instead of 6 FLOPs per parameter and token); and nothing runs backward below the lowest trainable
parameter (frozen bottom blocks: forward only). Adapters count like any trainable weight.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path

import torch

# Dense bf16 peaks by device-name fragment, the most specific first: the PCIe and NVL boards of a chip run
# at lower clocks and power than its SXM board, whose figure (989 TFLOP/s for H100/H200) the issue fixes.
PEAK_BF16_FLOPS = {"H100 PCIe": 756e12, "H100 NVL": 835e12, "H200 NVL": 835e12, "H100": 989e12, "H200": 989e12,
                   "GH200": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12}


def flops_per_token(n_params_no_pos: int, n_layer: int, n_head: int, head_dim: int, seq_len: int) -> float:
    return 6.0 * n_params_no_pos + 12.0 * n_layer * n_head * head_dim * seq_len


def model_flops_per_token(hf_config, n_params: int, seq_len: int) -> float:
    n_no_pos = n_params - hf_config.n_positions * hf_config.n_embd
    return flops_per_token(n_no_pos, hf_config.n_layer, hf_config.n_head, hf_config.n_embd // hf_config.n_head, seq_len)


def training_flops_per_token(model, head: str, seq_len: int) -> float:
    """Model FLOPs per trained token of `model` (a transformers GPT-2 with head `head`, possibly frozen in
    parts or with LoRA adapters) as it trains: see the module docstring. Equals 6N + 12LHQT for full LM
    training (N without position embeddings and vocabulary padding)."""
    config = model.config
    layers, width = int(config.n_layer), int(config.n_embd)
    attention = 4.0 * width * seq_len  # per layer and token, forward: scores (Q K^T) and values (P V)
    numel = lambda p: int(getattr(p, "ds_numel", p.numel()))  # noqa: E731  (a ZeRO-3 partition: its full size)
    total, trainable_below, embedding_trains = 0.0, False, False
    attention_done: set[str] = set()
    for name, p in model.named_parameters():  # forward order for GPT-2; a tied weight appears once (as wte)
        if name.endswith("wpe.weight"):  # a lookup; trains or not, gradients flow to everything above it
            trainable_below |= p.requires_grad
            continue
        if name.endswith("wte.weight"):  # a lookup too; with head=lm it is also the head's matmul (below)
            embedding_trains = p.requires_grad
            trainable_below |= p.requires_grad
            continue
        block = name.split(".attn.c_proj.")[0] if ".attn.c_proj." in name else None
        if block is not None and block not in attention_done:  # scores and values, between c_attn and c_proj
            attention_done.add(block)
            total += attention * (3.0 if trainable_below else 1.0)
        n = numel(p)
        total += 2.0 * n  # forward
        if p.requires_grad:
            total += 2.0 * n  # weight gradient
        if trainable_below:
            total += 2.0 * n  # input gradient, needed by something trainable below
        trainable_below |= p.requires_grad
    if head == "lm":  # the tied head over the real vocabulary (padding rows are the engine's, not the model's)
        n = int(config.get_text_config().vocab_size) * width
        total += 2.0 * n + (2.0 * n if embedding_trains else 0.0) + (2.0 * n if trainable_below else 0.0)
    return total


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    return peak_flops_of(torch.cuda.get_device_name(device))


def peak_flops_of(name: str) -> float | None:
    for key, value in PEAK_BF16_FLOPS.items():
        if key in name:
            return value
    return None


class Metrics:
    """Rank 0's sink for scalars; `enabled=False` makes every method a no-op.

    Every start replaces what earlier attempts logged past its starting step, so each (step, kind) row
    appears once: a run resumed at step s keeps rows up to s, a run starting at step 0 (after an attempt
    that saved nothing) keeps none, its step-0 evaluation included; TensorBoard hides the same events
    (`purge_step`). The files (and trackers) are opened at the first row, so a run that logs nothing
    writes nothing."""

    def __init__(self, run_dir: Path | None, enabled: bool, total_steps: int, start_step: int = 0,
                 progress: bool = True, report_to: tuple[str, ...] | list[str] = ("tensorboard",),
                 config: dict | None = None):
        self.enabled = enabled and run_dir is not None
        self._tb = self._jsonl = self._bar = self._trackers = None
        self._run_dir, self._start, self._report_to, self._config = run_dir, start_step, report_to, config
        if not self.enabled:
            return
        if progress:
            from tqdm import tqdm

            self._bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True,
                             file=sys.stderr, mininterval=1.0, disable=None)

    def _open(self) -> None:
        if self._jsonl is not None:
            return
        from torch.utils.tensorboard import SummaryWriter

        from engine import tracking

        path = self._run_dir / "metrics.jsonl"
        drop_rows_after(path, self._start if self._start else -1)
        # purge_step: TensorBoard hides earlier files' events at and after it (step 0: all of them).
        self._tb = (SummaryWriter(str(self._run_dir / "tb"), purge_step=self._start + 1 if self._start else 0)
                    if "tensorboard" in self._report_to else _NoWriter())
        # MLflow / W&B (run.report_to) get every row below, under the same names and steps
        self._trackers = tracking.Trackers.open(self._report_to, self._run_dir, self._config, self._start)
        self._jsonl = open(path, "a", encoding="utf-8")

    def log(self, step: int, values: dict, prefix: str = "train") -> None:
        if not self.enabled:
            return
        self._open()
        row = {"step": step, **{k: _jsonable(v) for k, v in values.items()}}
        try:
            self._jsonl.write(json.dumps(row) + "\n")
            self._jsonl.flush()
        except OSError as e:  # a full disk: say which file
            raise OSError(e.errno, e.strerror, str(self._run_dir / "metrics.jsonl")) from None
        self._trackers.log(step, values)
        for k, v in values.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
                tag = k if "/" in k else (f"eval/{k[5:]}" if k.startswith("eval_") else f"{prefix}/{k}")
                self._tb.add_scalar(tag, v, step)
        self._tb.flush()

    def text(self, tag: str, text: str, step: int) -> None:
        if self.enabled:
            self._open()
            self._tb.add_text(tag, text, step)

    def image(self, tag: str, hwc_uint8, step: int) -> None:
        """An RGB image (height x width x 3, uint8) in TensorBoard's Images tab."""
        if self.enabled:
            self._open()
            self._tb.add_image(tag, hwc_uint8, step, dataformats="HWC")
            self._tb.flush()

    def print(self, line: str) -> None:
        if not self.enabled:
            return
        if self._bar is not None and not self._bar.disable:
            self._bar.write(line, file=sys.stderr)
        else:
            print(line, file=sys.stderr, flush=True)

    def advance(self, n: int = 1, **postfix) -> None:
        if self._bar is not None:
            if postfix:
                self._bar.set_postfix(postfix, refresh=False)
            self._bar.update(n)

    def close(self, finished: bool = True) -> None:
        """`finished`: this attempt ran to its end (trackers mark their run finished, else killed)."""
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.close()
        if self._jsonl is not None:
            self._tb.close()
            self._jsonl.close()
            self._trackers.close(finished)
        self.enabled = False


class _NoWriter:
    """TensorBoard left out of run.report_to: the SummaryWriter calls do nothing."""

    def __getattr__(self, name):
        return lambda *a, **k: None


def drop_rows_after(path: Path, step: int) -> None:
    """Rewrite metrics.jsonl without the rows past `step` (-1: all of them), atomically: a torn file
    would lose history."""
    if not path.is_file():
        return
    def keep(line: str) -> bool:
        try:
            return json.loads(line).get("step", 0) <= step
        except ValueError:  # a line torn by the kill that ended the previous attempt
            return False

    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    kept = [ln for ln in lines if ln.strip() and keep(ln)]
    if len(kept) != len(lines):
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(kept), encoding="utf-8")
        os.replace(tmp, path)


def _jsonable(v):
    if isinstance(v, float) and not math.isfinite(v):
        return None if math.isnan(v) else (1e308 if v > 0 else -1e308)
    return v


class Throughput:
    """Tokens/s and MFU over the window since the last `read()`; the clock is read at log steps only."""

    def __init__(self, flops_per_token: float, peak: float | None, world: int):
        self.fpt, self.peak, self.world = flops_per_token, peak, world
        self._t = time.perf_counter()

    def reset(self) -> None:
        self._t = time.perf_counter()

    def read(self, tokens: float) -> dict:
        now = time.perf_counter()
        dt, self._t = max(now - self._t, 1e-9), now
        tps = tokens / dt
        out = {"tokens_per_s": tps}
        if self.peak:
            out["mfu"] = tps * self.fpt / (self.peak * self.world)
        return out


def cls_scores(confusion: torch.Tensor) -> dict:
    """Classification scores from a confusion matrix [true, predicted] of counts, as scikit-learn defines
    them: averages run over the classes that occur as a label or a prediction (F1 0 where undefined);
    balanced accuracy is the mean recall over classes that occur as a label; micro-F1 of single-label
    predictions equals accuracy. Per-class lists cover every class."""
    c = confusion.double()
    tp = c.diag()
    support, predicted = c.sum(1), c.sum(0)
    precision = torch.where(predicted > 0, tp / predicted.clamp(min=1), torch.zeros_like(tp))
    recall = torch.where(support > 0, tp / support.clamp(min=1), torch.zeros_like(tp))
    f1 = torch.where(precision + recall > 0, 2 * precision * recall / (precision + recall).clamp(min=1e-12),
                     torch.zeros_like(tp))
    present = (support > 0) | (predicted > 0)
    total = c.sum()

    def mean(x, where):
        return float(x[where].mean()) if where.any() else 0.0

    return {
        "accuracy": float(tp.sum() / total) if total > 0 else 0.0,
        "macro_f1": mean(f1, present),
        "micro_f1": float(tp.sum() / total) if total > 0 else 0.0,
        "weighted_f1": float((f1 * support).sum() / total) if total > 0 else 0.0,
        "macro_precision": mean(precision, present),
        "macro_recall": mean(recall, present),
        "balanced_accuracy": mean(recall, support > 0),
        "precision": precision.tolist(),
        "recall": recall.tolist(),
        "f1": f1.tolist(),
        "support": [int(x) for x in support.tolist()],
        "predicted": [int(x) for x in predicted.tolist()],
    }
