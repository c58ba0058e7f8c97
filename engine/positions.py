"""More learned positions than a GPT-2 was trained with (`model.max_positions`).

GPT-2 adds a learned vector per position (`transformer.wpe`, 1,024 rows). To train on longer
sequences the table is extended to N rows and `n_positions` raised in the model's config, so the
exported `final/` is an ordinary GPT2 checkpoint with N positions that plain `transformers` loads.

The new rows of a pretrained table are initialized (`model.position_init`):
- copy: the table is tiled, row i = old row i mod 1024. The first 1,024 positions are untouched, so
  the model behaves exactly as before on short inputs; later positions start from vectors the model
  already knows (as Longformer initialized its 4,096 positions from RoBERTa's 512).
- interpolate: the table is stretched linearly over the new length (row i samples the old table at
  i * (1023 / (N - 1))), keeping the table's smooth shape but moving every position a little.
A randomly initialized model is simply built with N positions.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from engine.errors import UsageError


def extended_table(old: torch.Tensor, n: int, mode: str) -> torch.Tensor:
    """The [n, d] position table grown from `old` [m, d] (n >= m)."""
    m = old.shape[0]
    if n < m:
        raise ValueError(f"cannot shrink a position table from {m} to {n} rows")
    if mode == "copy":
        reps = -(-n // m)
        return old.repeat(reps, 1)[:n].clone()
    if mode == "interpolate":
        stretched = F.interpolate(old.t().unsqueeze(0).float(), size=n, mode="linear", align_corners=True)
        return stretched.squeeze(0).t().to(old.dtype).contiguous()
    raise ValueError(f"unknown position init {mode!r}")


def extend(hf_model: nn.Module, n: int, mode: str) -> bool:
    """Grow the model's position embeddings to `n` rows in place; returns whether anything changed."""
    wpe = hf_model.get_submodule("transformer.wpe")
    m = getattr(wpe.weight, "ds_shape", wpe.weight.shape)[0]  # a ZeRO-3 partition is flat: its full shape counts
    if n <= m:
        return False
    if hasattr(wpe.weight, "ds_id"):  # partitioned by ZeRO-3 at construction: rows are not all here
        raise UsageError(f"model.max_positions={n} cannot extend a pretrained model's {m} positions under ZeRO-3; "
                         f"extend it once with dist.zero_stage<=2 (a 1-step run) and fine-tune from that run's final/")
    new = nn.Embedding(n, wpe.weight.shape[1], device=wpe.weight.device, dtype=wpe.weight.dtype)
    with torch.no_grad():
        new.weight.copy_(extended_table(wpe.weight.detach(), n, mode))
    hf_model.transformer.wpe = new
    hf_model.config.n_positions = n
    return True
