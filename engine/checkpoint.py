"""Checkpoints: atomic save, `latest`, retention, resume state, and the Hugging Face export.

Layout of a run directory's checkpoints:

    checkpoints/step-000100/      model + optimizer (written by the backend), trainer_state.json,
                                  rng-rank<R>.pt for every rank, COMPLETE (written last)
    checkpoints/latest            the name of the newest complete checkpoint (replaced atomically)

A checkpoint is written under `.tmp-step-NNNNNN`, and only when every rank has finished its part (and
its files are fsynced) is COMPLETE written, the directory renamed to its final name and `latest` moved
to it. A process killed mid-save leaves a `.tmp-*` directory that resume ignores (and the next save
removes). A checkpoint being deleted (retention, or replaced by a new save of the same step) loses its
COMPLETE marker first, so a half-deleted directory is never picked either. Reading never unpickles
arbitrary objects: tensors come from safetensors or `torch.load(weights_only=True)`.

The data position is the global sample index, and the model/optimizer files are the backend's: a
checkpoint written by W ranks resumes on any other number of ranks through `Backend.load_resharded`.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from engine import compat, dist, fastpath, fault

STATE = "trainer_state.json"
COMPLETE = "COMPLETE"


def step_dir_name(step: int) -> str:
    return f"step-{step:06d}"


def is_complete(path: Path) -> bool:
    return (path / COMPLETE).is_file() and (path / STATE).is_file()


def _saved_at(path: Path) -> int:
    """When a checkpoint was completed (ns): its COMPLETE marker holds the time, older markers fall back to
    the marker's mtime."""
    marker = path / COMPLETE
    try:
        return int(marker.read_text(encoding="utf-8").split()[1])
    except (IndexError, ValueError, OSError):
        return marker.stat().st_mtime_ns


def list_complete(ckpt_root: Path) -> list[Path]:
    """Complete checkpoints, oldest SAVE first. Save order, not step order: a run resumed from an older
    checkpoint (a rollback) writes lower step numbers after higher ones, and its new saves are the ones
    to keep and resume from; the abandoned higher steps go first."""
    if not ckpt_root.is_dir():
        return []
    found = [p for p in ckpt_root.iterdir() if p.is_dir() and p.name.startswith("step-") and is_complete(p)]
    return sorted(found, key=lambda p: (_saved_at(p), p.name))


def find_latest(ckpt_root: Path) -> Path | None:
    """The checkpoint `latest` names if it is complete, else the newest saved complete one, else None."""
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


def read_state(path: Path) -> dict:
    """A checkpoint's trainer_state.json: step, tokens, sample_index, global_batch, world_size, config."""
    return json.loads((path / STATE).read_text(encoding="utf-8"))


def _fsync_tree(root: Path) -> None:
    """Flush every file under `root` (and the directories) to stable storage before COMPLETE is written:
    the rename only makes a checkpoint visible, it does not make its bytes durable."""
    for dirpath, _, files in os.walk(root):
        for name in files:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(dirpath))


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some filesystems refuse fsync on directories
        pass
    finally:
        os.close(fd)


def _delete(path: Path) -> None:
    """Remove a checkpoint so that no intermediate state looks complete: the marker goes first."""
    (path / COMPLETE).unlink(missing_ok=True)
    shutil.rmtree(path)


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
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()  # this rank's device only: resumable on another GPU count
    return state


def set_rng_state(state: dict) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state((n[0], n[1].numpy().astype(np.uint32), n[2], n[3], n[4]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        cuda = state["cuda"]
        torch.cuda.set_rng_state(cuda[0] if isinstance(cuda, (list, tuple)) else cuda)


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
        fault.inject_in_save(step, self.rank)  # FTL_FAULT_INJECT=hang_save/slow_save (tests); inert otherwise
        dist.barrier()  # every rank's files are in place
        if self.rank == 0:
            _fsync_tree(tmp)
            _write_atomic(tmp / COMPLETE, f"ok {time.time_ns()}\n")
            if final.exists():  # a second save of the same step (a resumed run re-saving): retire the old one
                retired = self.root / f".old-{final.name}-{os.getpid()}"
                os.replace(final, retired)
                (retired / COMPLETE).unlink(missing_ok=True)
                shutil.rmtree(retired, ignore_errors=True)
            os.replace(tmp, final)
            _write_atomic(self.root / "latest", final.name + "\n")
            _fsync_dir(self.root)
            self._retain()
        dist.barrier()
        return final

    def _retain(self) -> None:
        """Keep the `keep` most recently saved checkpoints (the one just written always among them)."""
        complete = list_complete(self.root)
        for old in complete[: max(0, len(complete) - self.keep)]:
            try:
                _delete(old)
            except OSError as e:  # a stale NFS handle or a read-only file must not kill a healthy run
                warnings.warn(f"could not delete old checkpoint {old}: {e}", stacklevel=2)
        for stale in [*self.root.glob(".tmp-step-*"), *self.root.glob(".old-step-*"), *self.root.glob(".universal-step-*")]:
            shutil.rmtree(stale, ignore_errors=True)

    def load(self, path: Path, backend, reseed=None) -> dict:
        """Restore backend state and this rank's RNG; returns the trainer state.

        A checkpoint written by another number of ranks goes through `backend.load_resharded`. Ranks
        with no RNG file of their own (a job grown from 1 to 2 ranks) call `reseed(step)` instead, which
        gives them a fresh stream that still depends only on the seed, the rank and the step."""
        state = read_state(path)
        saved_world = int(state.get("world_size", self.world))
        if saved_world == self.world:
            backend.load(path)
        else:
            backend.load_resharded(path, saved_world)
        rng_file = path / f"rng-rank{self.rank}.pt"
        if rng_file.is_file():
            set_rng_state(torch.load(rng_file, weights_only=True))
        elif reseed is not None:
            reseed(int(state["step"]))
        return state


def export_hf(hf_config, head: str, state_dict: dict, tokenizer, out: Path, label_names: list[str] | None = None,
              extras=None) -> None:
    """Write a plain transformers model directory (safetensors + tokenizer) from full weights (rank 0);
    `extras(dir)` adds files before the directory appears (a LoRA run's adapter/)."""
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
    if head == "lm":  # plain `generate` stops where the engine does: EOS and a chat template's end-of-turn marker
        from engine.sft import end_of_turn_ids

        stop = end_of_turn_ids(tokenizer)
        if len(stop) > 1:
            model.generation_config.eos_token_id = stop
    missing = [n for n, p in model.named_parameters() if p.is_meta]
    if missing:
        raise RuntimeError(f"export is missing weights for {missing[:5]}")
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    compat.save_tokenizer(tokenizer, tmp, cfg.n_positions)  # loadable by every transformers >= 4.57
    if extras is not None:
        extras(tmp)
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
