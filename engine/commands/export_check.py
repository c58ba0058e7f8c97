"""How an export is checked against the PyTorch model: a fixed padded probe batch, a logits comparison with a
tolerance, and the error a failed check raises (exit 1, nothing shipped).

Shared by `ftl export` (engine/commands/export.py, every format) and the checkpoint -> Hugging Face export
(engine/commands/models.py), which is why it is a module of its own: neither of those imports the other back.
"""

from __future__ import annotations

import torch

PROBE_TEXTS = ["The with statement is used to wrap the execution of a block", "A class definition", "x = 1"]


class ExportCheckFailed(RuntimeError):
    """An export that does not reproduce the PyTorch model: never ship it."""


def probe(tokenizer, texts=PROBE_TEXTS, max_len: int | None = None) -> dict[str, torch.Tensor]:
    """A fixed batch with right padding (the graph exports are checked on padded input)."""
    old = tokenizer.padding_side
    tokenizer.padding_side = "right"
    try:
        enc = tokenizer(list(texts), return_tensors="pt", padding=True, truncation=bool(max_len), max_length=max_len)
    finally:
        tokenizer.padding_side = old
    return {"input_ids": enc["input_ids"].long(), "attention_mask": enc["attention_mask"].long()}


def compare(ours: torch.Tensor, theirs: torch.Tensor, mask: torch.Tensor | None, what: str,
            rtol: float = 1e-4) -> float:
    """Max |difference| (at mask positions for per-token logits); raises if above rtol * max(1, |logits|)."""
    ours, theirs = torch.as_tensor(ours).float(), torch.as_tensor(theirs).float()
    if ours.shape != theirs.shape:
        raise ExportCheckFailed(f"{what}: logits shape {tuple(ours.shape)} != PyTorch's {tuple(theirs.shape)}")
    diff = (ours - theirs).abs()
    if mask is not None and diff.dim() == 3:
        diff = diff[mask.bool()]
    worst = float(diff.max()) if diff.numel() else 0.0
    limit = rtol * max(1.0, float(theirs.abs().max()))
    if not worst <= limit:  # also catches NaN
        raise ExportCheckFailed(f"{what} does not reproduce the PyTorch logits: max abs difference {worst:.3g} "
                                f"> tolerance {limit:.3g}")
    return worst
