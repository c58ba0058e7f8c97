"""Backends: how the model is wrapped, sharded, stepped and saved. The loop never branches on them.

`create()` picks one from `dist.backend`; deepspeed is imported only when asked for, and only here.
"""

from __future__ import annotations

from engine.backends.base import Backend
from engine.config import Config
from engine.dist import DistEnv


def create(cfg: Config, env: DistEnv) -> Backend:
    if cfg.dist.backend == "deepspeed":
        from engine.backends.deepspeed import DeepSpeedBackend

        return DeepSpeedBackend(cfg, env)
    if cfg.dist.backend == "fsdp":
        from engine.backends.fsdp import FSDPBackend

        return FSDPBackend(cfg, env)
    from engine.backends.ddp import DDPBackend

    return DDPBackend(cfg, env)


__all__ = ["Backend", "create"]


def checkpoint_reader(ckpt_dir):
    """A function returning full weights from a backend-specific checkpoint layout, or None."""
    from pathlib import Path

    if (Path(ckpt_dir) / "deepspeed").is_dir():
        from engine.backends.deepspeed import full_state_from_checkpoint

        return full_state_from_checkpoint
    if (Path(ckpt_dir) / "fsdp").is_dir():
        from engine.backends.fsdp import full_state_from_checkpoint

        return full_state_from_checkpoint
    return None
