"""Launcher command lines: what `ftl launch` runs (and prints with --dry-run)."""

from __future__ import annotations

import shlex
import sys

import torch


def default_nproc() -> int:
    """All local GPUs, or one process on a CPU machine."""
    return torch.cuda.device_count() if torch.cuda.is_available() else 1


def torchrun_command(nproc_per_node: int, train_args: list[str], nnodes: int = 1, node_rank: int = 0,
                     rdzv_endpoint: str | None = None, max_restarts: int = 0, python: str | None = None) -> list[str]:
    cmd = [python or sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc_per_node}"]
    if nnodes > 1 or rdzv_endpoint:
        if not rdzv_endpoint:
            raise ValueError("--rdzv-endpoint HOST:PORT is required with --nnodes > 1")
        cmd += [f"--nnodes={nnodes}", f"--node-rank={node_rank}", "--rdzv-backend=c10d",
                f"--rdzv-endpoint={rdzv_endpoint}"]
    else:
        cmd += ["--standalone"]
    if max_restarts:
        cmd += [f"--max-restarts={max_restarts}"]
    return cmd + ["-m", "engine.cli", "train", *train_args]


def render(cmd: list[str]) -> str:
    return shlex.join(cmd)
