"""Checkpoints: atomic save, `latest`, retention, resume state, and the Hugging Face export.

Layout of a run directory's checkpoints:

    checkpoints/step-000100/      model + optimizer (written by the backend), trainer_state.json,
                                  rng-rank<R>.pt for every rank, COMPLETE (written last)
    checkpoints/latest            the name of the newest complete checkpoint (replaced atomically)

A checkpoint is written under `.tmp-step-NNNNNN`, and only when every rank has finished its part is it
renamed to its final name and `latest` moved to it. A process killed mid-save leaves a `.tmp-*`
directory that resume ignores (and the next save removes). Reading never unpickles arbitrary
objects: tensors come from safetensors or `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import warnings
from pathlib import Path

import numpy as np
import torch

from engine import dist, fastpath

STATE = "trainer_state.json"
COMPLETE = "COMPLETE"


def step_dir_name(step: int) -> str:
    return f"step-{step:06d}"


def is_complete(path: Path) -> bool:
    return (path / COMPLETE).is_file() and (path / STATE).is_file()


def list_complete(ckpt_root: Path) -> list[Path]:
    if not ckpt_root.is_dir():
        return []
    found = [p for p in ckpt_root.iterdir() if p.is_dir() and p.name.startswith("step-") and is_complete(p)]
    return sorted(found, key=lambda p: p.name)


def find_latest(ckpt_root: Path) -> Path | None:
    """The checkpoint `latest` names if it is complete, else the newest complete one, else None."""
    pointer = ckpt_root / "latest"
    if pointer.is_file():
        target = ckpt_root / pointer.read_text(encoding="utf-8").strip()
        if is_complete(target):
            return target
    complete = list_complete(ckpt_root)
    return complete[-1] if complete else None


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def rng_state() -> dict:
    """Every RNG that can influence training on this rank, as tensors and plain values."""
    py = random.getstate()
    np_state = np.random.get_state()
    state = {
        "python": [py[0], list(py[1]), py[2]],
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), int(np_state[2]), int(np_state[3]),
                  float(np_state[4])],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state((n[0], n[1].numpy().astype(np.uint32), n[2], n[3], n[4]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class Checkpointer:
    def __init__(self, run_dir: Path, keep: int, rank: int, world: int):
        self.root = run_dir / "checkpoints"
        self.keep, self.rank, self.world = keep, rank, world

    def save(self, step: int, backend, trainer_state: dict, extras=None) -> Path:
        """Every rank calls this at the same step; returns the final checkpoint path.

        `extras(dir)` runs on rank 0 to add files that make the checkpoint self-contained
        (the model's config.json and the tokenizer), so `ftl export` needs nothing else."""
        final = self.root / step_dir_name(step)
        tmp = self.root / f".tmp-{step_dir_name(step)}"
        if self.rank == 0:
            self.root.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
        dist.barrier()
        backend.save(tmp)
        torch.save(rng_state(), tmp / f"rng-rank{self.rank}.pt")
        if self.rank == 0:
            state = dict(trainer_state, step=step, world_size=self.world)
            (tmp / STATE).write_text(json.dumps(state, indent=1), encoding="utf-8")
            if extras is not None:
                extras(tmp)
        dist.barrier()  # every rank's files are in place
        if self.rank == 0:
            _write_atomic(tmp / COMPLETE, "ok\n")
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            _write_atomic(self.root / "latest", final.name + "\n")
            self._retain()
        dist.barrier()
        return final

    def _retain(self) -> None:
        complete = list_complete(self.root)
        for old in complete[: max(0, len(complete) - self.keep)]:
            try:
                shutil.rmtree(old)
            except OSError as e:  # a stale NFS handle must not kill a healthy run
                warnings.warn(f"could not delete old checkpoint {old}: {e}")
        for stale in self.root.glob(".tmp-step-*"):
            shutil.rmtree(stale, ignore_errors=True)

    def load(self, path: Path, backend) -> dict:
        """Restore backend state and this rank's RNG; returns the trainer state."""
        state = json.loads((path / STATE).read_text(encoding="utf-8"))
        backend.load(path)
        rng_file = path / f"rng-rank{self.rank}.pt"
        if rng_file.is_file():
            set_rng_state(torch.load(rng_file, weights_only=True))
        return state


def export_hf(hf_config, head: str, state_dict: dict, tokenizer, out: Path, label_names: list[str] | None = None) -> None:
    """Write a plain transformers model directory (safetensors + tokenizer) from full weights (rank 0)."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    cfg = hf_config.__class__.from_dict(hf_config.to_dict())
    if label_names:
        cfg.id2label = dict(enumerate(label_names))
        cfg.label2id = {n: i for i, n in enumerate(label_names)}
    auto = AutoModelForSequenceClassification if head == "cls" else AutoModelForCausalLM
    state_dict = dict(state_dict)
    if head == "lm":  # the engine pads the vocabulary (perf.pad_vocab_to); exports keep the real size
        state_dict = fastpath.unpad_state_dict(state_dict, cfg.vocab_size)
    # Tied weights are stored under one name only (safetensors refuses shared storage): restore both.
    for a, b in (("lm_head.weight", "transformer.wte.weight"),):
        if head == "lm" and (a in state_dict) != (b in state_dict):
            state_dict.setdefault(a, state_dict.get(b))
            state_dict.setdefault(b, state_dict.get(a))
    with torch.device("meta"):
        model = auto.from_config(cfg)
    model.load_state_dict(state_dict, strict=False, assign=True)
    model.tie_weights()
    missing = [n for n, p in model.named_parameters() if p.is_meta]
    if missing:
        raise RuntimeError(f"export is missing weights for {missing[:5]}")
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
