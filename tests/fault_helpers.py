"""Helpers for the fault-tolerance tests: processes whose output is watched line by line (to send a
signal at a chosen point, not after a guessed sleep), and checkpoint/metrics readers."""

from __future__ import annotations

import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import torch
from safetensors.torch import load_file

from tests.conftest import env_for_subprocess, free_port, read_metrics


class Watched:
    """A subprocess whose merged stdout/stderr is collected by a thread; `wait_for` blocks until a line
    matches (or the process ends, or the timeout passes)."""

    def __init__(self, cmd: list[str], **env):
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
                                     env=env_for_subprocess(**env))
        self.lines: list[str] = []
        self._cond = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            with self._cond:
                self.lines.append(line)
                self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    def wait_for(self, pattern: str, timeout: float = 120.0) -> float:
        """Block until a line matches `pattern`; returns the monotonic time it was seen."""
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        seen = 0
        with self._cond:
            while True:
                for line in self.lines[seen:]:
                    if rx.search(line):
                        return time.monotonic()
                seen = len(self.lines)
                if self.proc.poll() is not None and not self._reader.is_alive():
                    raise AssertionError(f"process ended (rc {self.proc.returncode}) before {pattern!r}:\n{self.output[-6000:]}")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"no line matched {pattern!r} within {timeout} s:\n{self.output[-6000:]}")
                self._cond.wait(min(left, 0.5))

    def wait(self, timeout: float = 180.0) -> int:
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill_tree()
            raise
        self._reader.join(10)
        return rc

    def descendants(self, name_contains: str = "engine.cli") -> list[psutil.Process]:
        return [p for p in psutil.Process(self.proc.pid).children(recursive=True)
                if name_contains in " ".join(p.cmdline())]

    def kill_tree(self) -> None:
        for p in psutil.Process(self.proc.pid).children(recursive=True):
            p.kill()
        self.proc.kill()

    @property
    def output(self) -> str:
        with self._cond:
            return "".join(self.lines)


def torchrun_cmd(nproc: int, args: list[str], extra: list[str] | None = None) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}", "--rdzv-backend=c10d",
            f"--rdzv-endpoint=127.0.0.1:{free_port()}", *(extra or []), "-m", "engine.cli", *map(str, args)]


def ftl_cmd(args: list[str]) -> list[str]:
    return [sys.executable, "-m", "engine.cli", *map(str, args)]


def losses_by_step(run_dir: Path) -> dict[int, float]:
    """Training losses by step; a step logged twice (an attempt's rows not replaced) fails loudly."""
    rows = [r for r in read_metrics(run_dir) if "loss" in r]
    steps = [r["step"] for r in rows]
    assert len(steps) == len(set(steps)), f"steps logged more than once: {steps}"
    return {r["step"]: r["loss"] for r in rows}


def checkpoint_tensors(ckpt: Path) -> dict[str, torch.Tensor]:
    """Model weights and (flattened) optimizer state of a DDP checkpoint."""
    out = {f"model.{k}": v for k, v in load_file(str(ckpt / "model.safetensors")).items()}
    opt = torch.load(ckpt / "optimizer.pt", weights_only=True)["optimizer"]
    for pid, st in opt["state"].items():
        for k, v in st.items():
            out[f"opt.{pid}.{k}"] = torch.as_tensor(v)
    return out


def max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


def bitwise_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> list[str]:
    """Names of the tensors that differ in any bit (empty: identical)."""
    assert a.keys() == b.keys()
    return [k for k in a if not torch.equal(a[k], b[k])]


# Readers of a finished run, shared by the backend tests (test_deepspeed.py, test_fsdp.py).
def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "final" / "model.safetensors"))


def grad_norms(run_dir: Path) -> list[float]:
    return [r["grad_norm"] for r in read_metrics(run_dir) if "loss" in r]


def memory_row(run_dir: Path) -> dict:
    rows = [r["memory"] for r in read_metrics(run_dir) if "memory" in r]
    assert len(rows) == 1, rows  # logged once, after the first step
    return rows[0]
