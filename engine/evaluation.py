"""Evaluation: streaming metrics reduced over ranks, sliding-window perplexity, reports, best/ and early stopping.

Streaming: nothing per sample is kept. A classification eval accumulates, on the device, the summed loss,
the sample count and a K x K confusion matrix; one all-reduce of each at the end gives every rank the
global numbers, and every score (accuracy, macro/micro/weighted F1, per-class precision/recall/F1/support)
is a function of the confusion matrix (`metrics.cls_scores`). Memory is O(K^2), whatever the split size.

Sliding windows (eval.stride, head=lm): each validation document is scored whole, in windows of
data.seq_len input tokens that start `stride` tokens apart. Every token after the first is predicted
exactly once, by the first window that reaches it, with at least seq_len - stride tokens of context
(fewer only near the start of the document). A document that fits in one window is scored exactly as a
direct forward pass over it would score it.
"""

from __future__ import annotations

import contextlib
import json
import math
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from engine import dist, losses, metrics
from engine.data import sources as data, windows as windows_lib
from engine.config import EvalConfig


# ------------------------------------------------------------------------------------ streaming metrics

class ClsStream:
    """Running sums for a classification eval: [loss, count] and the confusion matrix [true, predicted]."""

    def __init__(self, num_labels: int, device: torch.device):
        self.k = max(1, num_labels)
        self.sums = torch.zeros(2, device=device, dtype=torch.float64)
        self.confusion = torch.zeros(self.k, self.k, device=device, dtype=torch.float64)

    def update(self, logits: torch.Tensor, labels: torch.Tensor, valid: torch.Tensor | None = None) -> None:
        logits = logits.float()
        valid = torch.ones_like(labels, dtype=torch.bool) if valid is None else valid
        per = torch.nn.functional.cross_entropy(logits, labels, reduction="none")
        self.sums += torch.stack([(per * valid).sum().double(), valid.sum().double()])
        idx = labels[valid] * self.k + logits.argmax(-1)[valid]
        self.confusion.view(-1).index_add_(0, idx, torch.ones_like(idx, dtype=torch.float64))

    def reduce(self) -> "ClsStream":
        dist.all_reduce_sum(self.sums)
        dist.all_reduce_sum(self.confusion)
        return self


@dataclass
class EvalReport:
    """One evaluation: `scalars` go to metrics.jsonl/TensorBoard; the rest to eval/*.json and reports."""

    scalars: dict
    head: str
    label_names: list[str] = field(default_factory=list)
    per_class: dict = field(default_factory=dict)  # precision/recall/f1/support/predicted lists
    confusion: list[list[int]] | None = None
    generations: list[dict] = field(default_factory=list)  # sft: {prompt, completion, reference}

    def to_json(self) -> dict:
        out = {"head": self.head, **self.scalars}
        if self.generations:
            out["generations"] = self.generations
        if self.head == "cls":
            out["labels"] = self.label_names
            out["per_class"] = {name: {k: self.per_class[k][i] for k in ("precision", "recall", "f1", "support")}
                                for i, name in enumerate(self.label_names)}
            out["confusion"] = self.confusion
        return out


def cls_report(stream: ClsStream, label_names: list[str]) -> EvalReport:
    loss_total, count = stream.sums.tolist()
    if count == 0:
        return EvalReport({}, "cls", list(label_names))
    scores = metrics.cls_scores(stream.confusion.cpu())
    scalars = {"eval_loss": loss_total / count, "eval_accuracy": scores["accuracy"],
               "eval_macro_f1": scores["macro_f1"], "eval_micro_f1": scores["micro_f1"],
               "eval_weighted_f1": scores["weighted_f1"], "eval_balanced_accuracy": scores["balanced_accuracy"],
               "eval_samples": int(count)}
    names = list(label_names) or [str(i) for i in range(stream.k)]
    per_class = {k: scores[k] for k in ("precision", "recall", "f1", "support", "predicted")}
    confusion = [[int(x) for x in row] for row in stream.confusion.cpu().tolist()]
    return EvalReport(scalars, "cls", names, per_class, confusion)


# ------------------------------------------------------------------------------------------- evaluate

@torch.no_grad()
def evaluate_report(module, prepared: data.Prepared, env: dist.DistEnv, micro_batch: int, max_batches: int = 0,
                    autocast=contextlib.nullcontext, windows=None, generation_tokens: int = 32) -> EvalReport:
    """Evaluate on the validation split (and, for lm with `windows`, the sliding-window set), reduced
    over ranks. Every rank must call it: each runs the same number of forwards (ZeRO-3 forwards are
    collectives), the last batches padded and masked.

    prompt_completion/chat data: the loss and perplexity are over the targets only (the completions),
    and the held-out prompts get greedy completions of up to `generation_tokens` tokens."""
    was_training = module.training
    module.eval()
    try:
        if prepared.head == "cls":
            stream = ClsStream(prepared.num_labels, env.device)
            for batch in data.eval_batches(prepared, env.world_size, env.rank, micro_batch, env.device, max_batches):
                with autocast():
                    logits = module.logits(batch["input_ids"], batch["attention_mask"]).float()
                if "window_doc" in batch:  # data.overflow=window: one pooled prediction per document
                    logits = windows_lib.pool(logits, batch["window_doc"], batch["labels"].shape[0],
                                              prepared.windows.pool)
                stream.update(logits, batch["labels"], batch.get("valid"))
            return cls_report(stream.reduce(), prepared.label_names)
        scalars = _lm_loss(module, prepared, env, micro_batch, max_batches, autocast, None, "eval")
        if windows is not None:
            scalars.update(_lm_loss(module, prepared, env, micro_batch, max_batches, autocast, windows, "eval_sliding"))
        report = EvalReport(scalars, "lm")
        if prepared.sft and prepared.prompts and generation_tokens:
            report.generations = greedy_generations(module, prepared, env.device, autocast, generation_tokens)
        return report
    finally:
        module.train(was_training)


@torch.no_grad()
def greedy_generations(module, prepared: data.Prepared, device: torch.device, autocast=contextlib.nullcontext,
                       max_new_tokens: int = 32) -> list[dict]:
    """Greedy completions of the held-out prompts, cut at EOS or the chat template's end-of-turn marker.

    Every rank runs exactly `max_new_tokens` forwards per prompt, whatever it generates: under ZeRO-3
    each forward gathers parameters from all ranks, so no rank may stop early or generate alone. No KV
    cache: the engine's module is the training one, and these are a few short prompts."""
    tok = prepared.tokenizer
    stop = set(prepared.chat.stop_ids if prepared.chat is not None else [tok.eos_token_id])
    room = int(module.hf.config.n_positions) - max_new_tokens
    out = []
    for p in prepared.prompts:
        x = torch.tensor([p["ids"][-room:]], dtype=torch.long, device=device)
        new = []
        for _ in range(max_new_tokens):
            with autocast():
                nxt = module.logits(x)[:, -1].argmax(-1, keepdim=True)
            x = torch.cat([x, nxt], dim=1)
        new = x[0, -max_new_tokens:].tolist()
        cut = next((i for i, t in enumerate(new) if t in stop), len(new))
        out.append({"prompt": p["prompt"], "completion": tok.decode(new[:cut], skip_special_tokens=True),
                    "reference": p["reference"]})
    return out


def _lm_loss(module, prepared, env, micro_batch, max_batches, autocast, dataset, prefix) -> dict:
    sums = torch.zeros(2, device=env.device, dtype=torch.float64)  # [summed loss, predicted tokens]
    for batch in data.eval_batches(prepared, env.world_size, env.rank, micro_batch, env.device, max_batches, dataset):
        with autocast():
            s = module(**batch)  # eval mode: plain cross-entropy (no label smoothing)
        sums += torch.stack([s.double(), losses.target_count(batch, "lm").double()])
    loss_total, count = dist.all_reduce_sum(sums).tolist()
    if count == 0:
        return {}
    loss = loss_total / count
    return {f"{prefix}_loss": loss, f"{prefix}_ppl": math.exp(min(loss, 700.0))}


def evaluate(module, prepared: data.Prepared, env: dist.DistEnv, micro_batch: int, max_batches: int = 0,
             autocast=contextlib.nullcontext, windows=None) -> dict:
    """The scalars of `evaluate_report`: eval_loss and eval_ppl (lm), or eval_loss, eval_accuracy,
    eval_macro_f1, eval_micro_f1, eval_weighted_f1, eval_balanced_accuracy (cls)."""
    return evaluate_report(module, prepared, env, micro_batch, max_batches, autocast, windows).scalars


# ----------------------------------------------------------------------------------- sliding windows

def sliding_windows(ids: list[int], seq_len: int, stride: int) -> list[tuple[list[int], int]]:
    """(row, skip) pairs covering one document: rows of up to seq_len + 1 tokens (inputs and shifted
    targets) starting `stride` apart; a row's first `skip` targets were scored by an earlier window. The
    same arithmetic as data.overflow=window's LM training windows (engine/data/windows.py)."""
    return windows_lib.lm_windows(ids, seq_len, stride)


def window_dataset(raw_split, tokenizer, text_column: str, seq_len: int, stride: int):
    """The sliding windows of every document of `raw_split` as a dataset (input_ids, skip); rank 0
    tokenizes first and the others read its cache."""

    def fn(batch):
        ids = tokenizer([t or "" for t in batch[text_column]], add_special_tokens=False)["input_ids"]
        rows = [w for x in ids for w in sliding_windows(x, seq_len, stride)]
        return {"input_ids": [r for r, _ in rows], "skip": [k for _, k in rows]}

    ds = raw_split
    for turn in (0, 1):
        if (turn == 0) == dist.is_main():
            ds = raw_split.map(fn, batched=True, batch_size=200, remove_columns=raw_split.column_names,
                               desc="sliding windows")
        dist.barrier()
    return ds.with_format("numpy")


# ------------------------------------------------------------------------------------------- reports

def confusion_image(confusion: list[list[int]], max_pixels: int = 768) -> np.ndarray:
    """The confusion matrix as an RGB heat map (rows: true class, columns: predicted), each row scaled by
    its support so rare classes are as visible as common ones; rows without support stay grey."""
    c = np.asarray(confusion, dtype=np.float64)
    k = max(1, c.shape[0])
    cell = max(1, min(32, max_pixels // k))
    support = c.sum(1, keepdims=True)
    frac = np.divide(c, support, out=np.zeros_like(c), where=support > 0)
    white, blue = np.array([255.0, 255.0, 255.0]), np.array([8.0, 48.0, 107.0])
    rgb = white + frac[..., None] * (blue - white)
    rgb[(support[:, 0] == 0)] = 200.0
    img = np.repeat(np.repeat(rgb, cell, axis=0), cell, axis=1)
    if cell >= 4:  # thin grid lines between cells
        img[::cell, :, :] = 230.0
        img[:, ::cell, :] = 230.0
    return img.clip(0, 255).astype(np.uint8)


def markdown_table(report: EvalReport) -> str:
    rows = ["| class | precision | recall | f1 | support |", "|---|---|---|---|---|"]
    pc = report.per_class
    for i, name in enumerate(report.label_names):
        rows.append(f"| {name} | {pc['precision'][i]:.3f} | {pc['recall'][i]:.3f} | {pc['f1'][i]:.3f} | {pc['support'][i]} |")
    return "\n".join(rows)


def write_report(run_dir: Path, step: int, report: EvalReport, sink: metrics.Metrics) -> None:
    """eval/step-NNNNNN.json (and eval/latest.json) in the run directory; for cls also the confusion
    matrix image and the per-class table in TensorBoard. Rank 0 only (others pass a disabled sink)."""
    if not sink.enabled or not report.scalars:
        return
    out = run_dir / "eval"
    out.mkdir(exist_ok=True)
    blob = json.dumps({"step": step, **report.to_json()}, indent=1)
    (out / f"step-{step:06d}.json").write_text(blob, encoding="utf-8")
    (out / "latest.json").write_text(blob, encoding="utf-8")
    if report.head == "cls" and report.confusion is not None:
        sink.image("eval/confusion_matrix", confusion_image(report.confusion), step)
        sink.text("eval/per_class", markdown_table(report), step)
    if report.generations:
        sink.text("eval/generations", generations_markdown(report.generations), step)


def generations_markdown(generations: list[dict]) -> str:
    rows = ["| prompt | greedy completion | reference |", "|---|---|---|"]
    cell = lambda t: str(t).replace("|", "\\|").replace("\n", "<br>")
    for g in generations:
        rows.append(f"| {cell(g['prompt'])} | {cell(g['completion'])} | {cell(g['reference'])} |")
    return "\n".join(rows)


def render_text(report: EvalReport, header: dict | None = None, max_matrix: int = 30) -> str:
    """A readable report for `ftl eval`: headline numbers, the per-class table, the confusion matrix."""
    lines = [f"{k}: {v}" for k, v in (header or {}).items()]
    for k, v in report.scalars.items():
        lines.append(f"{k}: {v:.4f}" if isinstance(v, float) else f"{k}: {v}")
    for g in report.generations:
        lines += ["", f"prompt:    {json.dumps(g['prompt'])}", f"greedy:    {json.dumps(g['completion'])}",
                  f"reference: {json.dumps(g['reference'])}"]
    if report.head != "cls" or report.confusion is None:
        return "\n".join(lines)
    names, pc = report.label_names, report.per_class
    w = max([8, *(len(n) for n in names)])
    lines += ["", f"{'class':<{w}}  precision  recall      f1  support  predicted"]
    for i, n in enumerate(names):
        lines.append(f"{n:<{w}}  {pc['precision'][i]:9.3f}  {pc['recall'][i]:6.3f}  {pc['f1'][i]:6.3f}  "
                     f"{pc['support'][i]:7d}  {pc['predicted'][i]:9d}")
    total = sum(pc["support"])
    lines.append(f"{'macro avg':<{w}}  {_avg(pc['precision'], pc):9.3f}  {_avg(pc['recall'], pc):6.3f}  "
                 f"{report.scalars.get('eval_macro_f1', 0.0):6.3f}  {total:7d}")
    k = len(names)
    if k > max_matrix:
        lines += ["", f"confusion matrix: {k} classes, too wide to print; see --json"]
        return "\n".join(lines)
    cw = max(3, len(str(max(max(r) for r in report.confusion))) + 1)
    lines += ["", "confusion matrix (rows: true class, columns: predicted; column j is class j)",
              f"{'':<{w + 4}}" + "".join(f"{j:>{cw}}" for j in range(k))]
    for i, n in enumerate(names):
        lines.append(f"{n:<{w}} {i:>2} " + "".join(f"{x:>{cw}}" for x in report.confusion[i]))
    return "\n".join(lines)


def _avg(values: list[float], pc: dict) -> float:
    present = [v for v, s, p in zip(values, pc["support"], pc["predicted"]) if s or p]
    return sum(present) / len(present) if present else 0.0


# ------------------------------------------------------------------------------ best/ and early stopping

class BestTracker:
    """Tracks eval.metric across evaluations: which was best, and whether patience has run out."""

    def __init__(self, cfg: EvalConfig):
        self.key, self.maximize = cfg.metric_key, cfg.maximize
        self.patience, self.min_delta = cfg.patience, cfg.min_delta
        self.best: float | None = None
        self.best_step: int | None = None
        self.bad_evals = 0
        self.stopped = False

    @property
    def enabled(self) -> bool:
        return bool(self.key)

    def update(self, step: int, scalars: dict) -> bool:
        """Record one evaluation; True when it is a new best."""
        if not self.enabled or self.key not in scalars:
            return False
        value = float(scalars[self.key])
        if self.best is None or (value - self.best > self.min_delta if self.maximize else self.best - value > self.min_delta):
            self.best, self.best_step, self.bad_evals = value, step, 0
            return True
        self.bad_evals += 1
        return False

    @property
    def should_stop(self) -> bool:
        return bool(self.patience) and self.bad_evals >= self.patience

    def state(self) -> dict:
        return {"best": self.best, "best_step": self.best_step, "bad_evals": self.bad_evals, "stopped": self.stopped,
                "metric": self.key}

    def load_state(self, state: dict | None) -> None:
        if state and state.get("metric") == self.key:
            self.best, self.best_step = state.get("best"), state.get("best_step")
            self.bad_evals, self.stopped = int(state.get("bad_evals", 0)), bool(state.get("stopped", False))


def copy_model_dir(src: Path, dst: Path) -> None:
    """best/ from an export already on disk (final/ when the last evaluation is the best), atomically; an
    existing best/ is replaced only if the engine wrote it."""
    from engine import checkpoint

    def copy(tmp: Path) -> None:
        for f in src.iterdir():
            (shutil.copytree if f.is_dir() else shutil.copy2)(f, tmp / f.name)

    checkpoint.write_model_dir(dst, copy, {"written_by": "ftl-engine", "format": "hf", "copied_from": str(src)})
