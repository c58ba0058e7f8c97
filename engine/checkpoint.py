"""Checkpoints: atomic save, `latest`, retention, resume state, and the Hugging Face export.

Layout of a run directory's checkpoints:

    checkpoints/step-000100/      model + optimizer (written by the backend), trainer_state.json,
                                  rng-rank<R>.pt for every rank, MANIFEST.json (every file's size and
                                  digest), COMPLETE (written last)
    checkpoints/latest            the name of the newest complete checkpoint (replaced atomically)

A checkpoint is written under `.tmp-step-NNNNNN`, and only when every rank has finished its part, the
manifest holds every file's digest (engine/integrity.py) and the files are fsynced is COMPLETE written,
the directory renamed to its final name and `latest` moved to it. A process killed mid-save leaves a
`.tmp-*` directory that resume ignores (and the next save removes); a save that fails on any rank (a full
disk) fails on every rank, removes its directory and leaves `latest` where it was. A checkpoint being
deleted (retention, or replaced by a new save of the same step) loses its COMPLETE marker first, so a
half-deleted directory is never picked either. Reading never unpickles arbitrary objects: tensors come
from safetensors or `torch.load(weights_only=True)`.

Before a checkpoint is used (resume, `ftl export`) every file is checked against its digest. Retention
keeps the newest checkpoint known to verify until a newer one has verified too, and never deletes a
checkpoint that a reader (`ftl export RUN`) holds (engine/ownership.py).

The data position is the global sample index, and the model/optimizer files are the backend's: a
checkpoint written by W ranks resumes on any other number of ranks through `Backend.load_resharded`.
"""

from __future__ import annotations

import errno
import json
import os
import random
import shutil
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from engine import compat, dist, fastpath, fault, integrity, ownership
from engine.errors import DiskFull

STATE = "trainer_state.json"
COMPLETE = "COMPLETE"
# Exports above this size are written as several safetensors files plus model.safetensors.index.json
# (gpt2-large and gpt2-xl in fp32), which transformers reloads the same way; smaller ones as one file.
EXPORT_SHARD_SIZE = "2GB"


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


def has_digests(path: Path) -> bool:
    return (path / integrity.MANIFEST).is_file()


def verify(path: Path, collective: bool = False) -> list[str]:
    """Why checkpoint `path` must not be used (empty: every file matches its digest and parses).

    collective=True: every rank calls it and hashes a share of the files (split by size), and all get
    the same answer. A checkpoint written before digests existed is only parsed."""
    listed, items, problems = integrity.plan(path, STATE)
    rank, world = (dist.rank(), dist.world_size()) if collective else (0, 1)
    mine = integrity.check_items(path, integrity.balance(items, world)[rank], listed)
    if world > 1:
        mine = [p for part in dist.all_gather_object(mine) for p in part]
    return problems + sorted(mine)


def candidates(ckpt_root: Path) -> list[Path]:
    """Complete checkpoints in the order resume tries them: the one `latest` names, then the others from
    the newest save back."""
    complete = list(reversed(list_complete(ckpt_root)))
    first = find_latest(ckpt_root)
    return ([first] if first else []) + [c for c in complete if c != first]


def choose(ckpt_root: Path, log, collective: bool = False, hold=None):
    """resume=auto: the first of `candidates` that verifies, saying which were skipped and why; None when
    there is no checkpoint. Raises UsageError (exit 2) when checkpoints exist and none verifies.

    hold(path) -> lock: a reader's shared lock, taken before verifying (ownership.SharedLock); returns
    (path, lock) then, and a candidate deleted meanwhile (ownership.Vanished) is passed over."""
    from engine.errors import UsageError

    skipped: list[str] = []
    for c in candidates(ckpt_root):
        lock = None
        if hold is not None:
            try:
                lock = hold(c)
            except ownership.Vanished:
                continue
        problems = verify(c, collective)
        if not problems:
            if skipped:
                log(f"warning: using {c}, the newest checkpoint that verifies; skipped {len(skipped)} newer "
                    f"one(s) that failed verification (left as they are, for you to inspect)")
            elif not has_digests(c):
                log(f"warning: {c} was written without digests (an older ftl): its files were only checked to parse")
            return (c, lock) if hold is not None else c
        if lock is not None:
            lock.release()
        why = "; ".join(problems)
        skipped.append(f"{c}: {why}")
        log(f"warning: checkpoint {c} failed verification and is skipped: {why}")
    if skipped:
        raise UsageError([f"checkpoint {s}" for s in skipped],
                         hint=f"No checkpoint in {ckpt_root} verifies (checkpoint.resume=auto). The damaged ones are "
                              f"left as they are. Start over with checkpoint.resume=none (or another run.dir), or "
                              f"restore the files from a copy.")
    return (None, None) if hold is not None else None


def check_explicit(path: Path, collective: bool = False) -> None:
    """checkpoint.resume=PATH or `ftl export PATH`: a checkpoint the user named must verify (exit 2)."""
    from engine.errors import UsageError

    problems = verify(path, collective)
    if problems:
        raise UsageError([f"checkpoint {path} is damaged: {p}" for p in problems],
                         hint="Name another checkpoint (or use checkpoint.resume=auto, which picks the newest one "
                              "that verifies), or restore the files from a copy.")


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
        # The newest checkpoint known to verify (the one a run resumed from, once checked): retention keeps
        # it until a newer one has verified too.
        self.verified: Path | None = None

    def save(self, step: int, backend, trainer_state: dict, extras=None) -> Path:
        """Every rank calls this at the same step; returns the final checkpoint path.

        `extras(dir)` runs on rank 0 to add files that make the checkpoint self-contained
        (the model's config.json and the tokenizer), so `ftl export` needs nothing else.
        A failure to write on any rank (a full disk) is raised on every rank, nothing is left of this save
        and `latest` still names the previous checkpoint."""
        final = self.root / step_dir_name(step)
        tmp = self.root / f".tmp-{step_dir_name(step)}"
        error = None
        if self.rank == 0:
            try:
                self.root.mkdir(parents=True, exist_ok=True)
                shutil.rmtree(tmp, ignore_errors=True)
                tmp.mkdir()
            except OSError as e:
                error = e
        self._raise_if_any(step, tmp, error, during="creating")  # also the barrier: the directory exists
        with integrity.recording(tmp) as recorded:  # digests of what this rank writes, taken as it writes
            try:
                backend.save(tmp)
                integrity.save_torch(rng_state(), tmp / f"rng-rank{self.rank}.pt")
                if self.rank == 0:
                    state = dict(trainer_state, step=step, world_size=self.world)
                    integrity.write_bytes(tmp / STATE, json.dumps(state, indent=1).encode("utf-8"))
                    if extras is not None:
                        extras(tmp)
            except Exception as e:  # noqa: BLE001 - every rank must learn of it, or the others wait forever
                error = e
        fault.inject_in_save(step, self.rank)  # FTL_FAULT_INJECT=hang_save/slow_save (tests); inert otherwise
        # Every rank's files are in place once this returns (it is the barrier), with their digests.
        gathered = dist.all_gather_object((_describe(error) if error else None, recorded.files))
        self._raise_if_any(step, tmp, error, during="writing", others=[g[0] for g in gathered])
        # `hashed_by`: the rank that hashed the file (for a backend's files, the rank that wrote it).
        files = {rel: dict(d, hashed_by=r) for r, (_, part) in enumerate(gathered) for rel, d in part.items()}
        # Files nobody recorded (the tokenizer, a library's side files): rank 0 lists them, every rank
        # hashes a share.
        shares = dist.broadcast_object(integrity.balance(integrity.unlisted_files(tmp, files), self.world)
                                       if self.rank == 0 else None)
        try:
            mine = {rel: integrity.hash_file(tmp / rel) for rel in shares[self.rank]}
        except OSError as e:
            error, mine = e, {}
        gathered = dist.all_gather_object((_describe(error) if error else None, mine))
        self._raise_if_any(step, tmp, error, during="hashing", others=[g[0] for g in gathered])
        for r, (_, part) in enumerate(gathered):
            files.update({rel: dict(d, hashed_by=r) for rel, d in part.items()})
        if self.rank == 0:
            try:
                _write_atomic(tmp / integrity.MANIFEST, integrity.write_manifest(tmp, files).decode("utf-8"))
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
            except OSError as e:
                error = e
        self._raise_if_any(step, tmp, error, during="completing")  # the last barrier
        return final

    def _raise_if_any(self, step: int, tmp: Path, error: BaseException | None, during: str,
                      others: list | None = None) -> None:
        """The save's barrier, and how a failure anywhere ends it everywhere: every rank raises, rank 0
        removes the half-written directory first (freeing the space)."""
        if others is None:
            first = dist.agree_on_error(_describe(error) if error else None)
        else:
            first = next((o for o in others if o), None)
        if not first:
            return
        if self.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        dist.barrier()
        previous = find_latest(self.root)
        kept = f"`latest` still names {previous}" if previous else "there is no earlier checkpoint"
        if is_disk_full(error) or "no space left on device" in first:
            raise DiskFull(f"no space left on device while {during} checkpoint step {step} in {tmp} ({first}); the "
                           f"incomplete checkpoint was removed and {kept}. Free space there and run the same "
                           f"command again to resume") from error
        if error is not None:
            raise error
        raise RuntimeError(f"checkpoint step {step} failed on another rank while {during} it ({first}); {kept}")

    def _retain(self) -> None:
        """Keep the `keep` most recently saved checkpoints (the one just written always among them), and
        the newest one known to verify until a newer one verifies; leave one a reader holds for later."""
        complete = list_complete(self.root)
        doomed = complete[: max(0, len(complete) - self.keep)]
        protected = self.verified if self.verified in complete else None
        if doomed and (protected is None or protected in doomed):
            newest = complete[-1]
            problems = verify(newest)  # the page cache usually has it: cheap, and only every `keep` saves
            if problems:
                warnings.warn(f"checkpoint {newest} does not verify right after it was written "
                              f"({'; '.join(problems)}); keeping the older checkpoints", stacklevel=2)
                doomed = [d for d in doomed if d != protected] if protected else []
            else:
                self.verified = newest
        for old in doomed:
            lock = ownership.try_exclusive(old / COMPLETE)
            if lock is None:
                print(f"note: {old} is being read by another process (ftl export?); it will be deleted by a "
                      f"later save", file=sys.stderr, flush=True)
                continue
            try:
                _delete(old)
            except OSError as e:  # a stale NFS handle or a read-only file must not kill a healthy run
                warnings.warn(f"could not delete old checkpoint {old}: {e}", stacklevel=2)
            finally:
                if isinstance(lock, int) and not isinstance(lock, bool):
                    os.close(lock)
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
        else:
            if self.rank < saved_world:  # it was saved and is gone: say what that costs
                print(f"warning: {rng_file} is missing: rank {self.rank} continues with a fresh random stream, so "
                      f"this resume is no longer bit-exact (dropout and any sampling differ from an uninterrupted "
                      f"run)", file=sys.stderr, flush=True)
            if reseed is not None:
                reseed(int(state["step"]))
        return state


def is_disk_full(error: BaseException | None) -> bool:
    """Whether `error` (or what caused it) is a full disk, however the writing library reported it."""
    seen = 0
    while error is not None and seen < 10:
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        text = str(error)
        if "No space left on device" in text or "StorageFull" in text or "Disk quota exceeded" in text:
            return True
        error, seen = error.__cause__ or error.__context__, seen + 1
    return False


def _describe(error: BaseException) -> str:
    rank = dist.rank()
    if is_disk_full(error):
        where = getattr(error, "filename", None)
        return f"rank {rank}: no space left on device" + (f" writing {where}" if where else "")
    return f"rank {rank}: {type(error).__name__}: {error}"


def export_hf(hf_config, head: str, state_dict: dict, tokenizer, out: Path, label_names: list[str] | None = None,
              info: dict | None = None, extras=None) -> None:
    """Write a plain transformers model directory (safetensors + tokenizer) from full weights (rank 0);
    `extras(dir)` adds files before the directory appears (a LoRA run's adapter/).

    It is written under a temporary sibling and renamed into place; an existing `out` is replaced only if
    the engine wrote it (its export.json, which this writes with `info`, lists its files)."""
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
        from engine.data.sft import end_of_turn_ids

        stop = end_of_turn_ids(tokenizer)
        if len(stop) > 1:
            model.generation_config.eos_token_id = stop
    missing = [n for n, p in model.named_parameters() if p.is_meta]
    if missing:
        raise RuntimeError(f"export is missing weights for {missing[:5]}")

    def write(tmp):
        model.save_pretrained(tmp, safe_serialization=True, max_shard_size=EXPORT_SHARD_SIZE)
        compat.save_tokenizer(tokenizer, tmp, cfg.n_positions)  # loadable by every transformers >= 4.57
        if extras is not None:
            extras(tmp)

    write_model_dir(out, write,
                    {"written_by": "ftl-engine", "format": "hf", **(info or {})})


def write_dir_atomically(out: Path, write) -> None:
    """A directory inside the run (which the engine owns while it holds the run lock) replaced whole:
    `write(tmp)` fills a temporary sibling, which then takes `out`'s place."""
    tmp = ownership.temp_sibling(out)
    try:
        write(tmp)
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_model_dir(out: Path, write, info: dict) -> None:
    """`write(tmp)` fills a temporary sibling of `out`, stamped with export.json, then renamed into place."""
    from engine.errors import UsageError

    tmp = ownership.temp_sibling(out)
    try:
        write(tmp)
        ownership.stamp(tmp, info)
        ownership.replace_dir(tmp, out, what=f"{out.name}/")
    except UsageError:
        raise  # the target was not ours: the message says where the new directory is kept
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if is_disk_full(e):
            raise DiskFull(f"no space left on device while writing {out} ({e}); nothing was replaced") from e
        raise
