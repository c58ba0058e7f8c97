"""Inputs longer than `data.seq_len`: truncation, or strided windows with overlap.

`data.overflow=truncate` (the default) keeps the first seq_len tokens of a document (an unpacked LM
sample keeps seq_len + 1: inputs plus shifted targets) and drops the rest.

`data.overflow=window` cuts a document into windows whose starts are `data.stride` tokens apart, so
consecutive windows share seq_len - stride tokens (stride = seq_len: no overlap). `data.max_windows`
caps the windows of one document (the rest of it is dropped).

- LM (data.pack=false): a window row holds up to seq_len + 1 tokens. Its first `skip` targets were
  already targets of the previous window and are masked, so every token of a document after the first
  is a target exactly once, with at least seq_len - stride tokens of context after the first window.
  (The overlap buys context, not extra targets.) This is the arithmetic of the sliding-window
  perplexity of `eval.stride`, applied to training samples.
- cls, training: every window is a sample carrying its document's label. The last window is aligned to
  the end of the document, so no window is a short tail of a few tokens.
- cls, evaluation: all windows of a document are scored in one forward pass and their class
  probabilities pooled into ONE prediction per document (`data.window_pool`): `mean` averages the
  window probabilities (a soft vote); `max` takes each class's largest probability over the windows
  and renormalizes (the evidence of one window can decide). Loss, accuracy and F1 count documents.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class WindowSpec:
    seq_len: int
    stride: int
    max_windows: int = 0  # 0: no cap
    pool: str = "mean"

    @classmethod
    def from_config(cls, data_cfg) -> "WindowSpec | None":
        if data_cfg.overflow != "window":
            return None
        return cls(data_cfg.seq_len, data_cfg.stride or data_cfg.seq_len, data_cfg.max_windows, data_cfg.window_pool)

    @property
    def max_tokens(self) -> int:
        """Tokens of a document that the windows can reach (0: all)."""
        return self.seq_len + (self.max_windows - 1) * self.stride if self.max_windows else 0


def num_windows(n_tokens: int, seq_len: int, stride: int) -> int:
    """Windows of `seq_len` tokens, `stride` apart, needed to cover `n_tokens` tokens."""
    if n_tokens <= seq_len:
        return 1 if n_tokens > 0 else 0
    return 1 + -(-(n_tokens - seq_len) // stride)


def lm_windows(ids, seq_len: int, stride: int, max_windows: int = 0) -> list[tuple[list[int], int]]:
    """(row, skip) pairs for one document: a row holds up to seq_len + 1 tokens (inputs and shifted
    targets); its first `skip` targets belong to an earlier window. Documents under 2 tokens have none."""
    ids = list(ids)
    n = len(ids)
    out: list[tuple[list[int], int]] = []
    start, scored = 0, 0  # scored: index of the last token that has been a target so far
    while n >= 2 and (not max_windows or len(out) < max_windows):
        row = ids[start:start + seq_len + 1]
        out.append((row, max(0, scored - start)))
        scored = start + len(row) - 1
        if scored >= n - 1:
            break
        start += stride
    return out


def cls_windows(ids, seq_len: int, stride: int, max_windows: int = 0) -> list[list[int]]:
    """Windows of one document for classification; the last one ends at the document's end."""
    ids = list(ids)
    n = len(ids)
    count = num_windows(n, seq_len, stride)
    if max_windows:
        count = min(count, max_windows)
    starts = [min(k * stride, max(0, n - seq_len)) for k in range(count)]
    if max_windows and count < num_windows(n, seq_len, stride):
        starts = [k * stride for k in range(count)]  # capped: the covered prefix, no jump to the end
    return [ids[s:s + seq_len] for s in starts]


def cls_eval_batch(rows, labels, spec: WindowSpec, pad_id: int) -> dict[str, torch.Tensor]:
    """Documents -> all their windows as one padded batch, with `window_doc` mapping each window to
    its document's position in `rows` (what `pool` needs)."""
    windows, owner = [], []
    for i, r in enumerate(rows):
        ws = cls_windows(r, spec.seq_len, spec.stride, spec.max_windows) or [[pad_id]]
        windows += ws
        owner += [i] * len(ws)
    width = max(len(w) for w in windows)
    ids = np.full((len(windows), width), pad_id, dtype=np.int64)
    mask = np.zeros((len(windows), width), dtype=np.int64)
    for i, w in enumerate(windows):
        ids[i, : len(w)], mask[i, : len(w)] = w, 1
    return {"input_ids": torch.from_numpy(ids), "attention_mask": torch.from_numpy(mask),
            "window_doc": torch.tensor(owner, dtype=torch.long),
            "labels": torch.as_tensor(np.asarray(labels), dtype=torch.long)}


def pool(window_logits: torch.Tensor, window_doc: torch.Tensor, n_docs: int, mode: str = "mean") -> torch.Tensor:
    """Window logits [W, K] -> per-document LOG-probabilities [n_docs, K] of the pooled distribution.

    Log-probabilities are valid logits (log_softmax leaves them unchanged), so cross-entropy and argmax
    downstream treat them like a single forward's logits."""
    probs = window_logits.float().softmax(-1)
    k = probs.shape[-1]
    index = window_doc.view(-1, 1).expand(-1, k)
    if mode == "mean":
        summed = torch.zeros(n_docs, k, device=probs.device).scatter_add_(0, index, probs)
        counts = torch.zeros(n_docs, device=probs.device).index_add_(0, window_doc, torch.ones_like(window_doc,
                                                                                                   dtype=probs.dtype))
        pooled = summed / counts.clamp(min=1).unsqueeze(-1)
    elif mode == "max":
        pooled = torch.zeros(n_docs, k, device=probs.device).scatter_reduce_(0, index, probs, "amax",
                                                                              include_self=False)
        pooled = pooled / pooled.sum(-1, keepdim=True).clamp(min=1e-30)
    else:
        raise ValueError(f"unknown window pooling {mode!r}")
    return pooled.clamp(min=1e-30).log()


@torch.no_grad()
def classify_texts(model, tokenizer, texts: list[str], seq_len: int, stride: int, pool_mode: str = "mean",
                   max_windows: int = 0) -> torch.Tensor:
    """Class probabilities [len(texts), K] for texts of any length (windows pooled per text)."""
    ids = tokenizer(list(texts), add_special_tokens=False)["input_ids"]
    spec = WindowSpec(seq_len, stride, max_windows, pool_mode)
    batch = cls_eval_batch(ids, [0] * len(ids), spec, tokenizer.pad_token_id)
    device = next(model.parameters()).device
    logits = model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device)).logits
    return pool(logits, batch["window_doc"].to(device), len(ids), pool_mode).exp()
