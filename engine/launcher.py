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
    cmd += preemption_flags()
    return cmd + ["-m", "engine.cli", "train", *train_args]


# torchrun forwards only TERM/INT/HUP/QUIT to the workers by default and kills itself on SIGUSR1, the
# signal SLURM's `--signal=USR1@T` sends; and it SIGKILLs workers 30 s after forwarding, which can cut
# a checkpoint save short. Where this torch supports it, ask it to forward USR1 and to wait longer.
FORWARDED_SIGNALS = "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1"
SHUTDOWN_TIMEOUT_S = 300


def preemption_flags() -> list[str]:
    try:
        from torch.distributed.launcher.api import LaunchConfig

        fields = getattr(LaunchConfig, "__dataclass_fields__", {})
    except ImportError:
        return []
    flags = []
    if "signals_to_handle" in fields:
        flags.append(f"--signals-to-handle={FORWARDED_SIGNALS}")
    if "shutdown_timeout" in fields:
        flags.append(f"--shutdown-timeout={SHUTDOWN_TIMEOUT_S}")
    return flags


def launcher_env(max_restarts: int = 0) -> dict[str, str]:
    """Environment torchrun itself needs. With restarts, a store shared between the rendezvous and the
    workers hands restarted workers the previous attempt's keys (pytorch#135712): give each attempt its own."""
    return {"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"} if max_restarts else {}


def render(cmd: list[str], env: dict[str, str] | None = None) -> str:
    prefix = "".join(f"{k}={shlex.quote(v)} " for k, v in (env or {}).items())
    return prefix + shlex.join(cmd)
