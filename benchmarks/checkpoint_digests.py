"""What checkpoint digests cost on a gpt2-medium-shaped checkpoint (355M parameters, DDP: model.safetensors
1.42 GB + optimizer.pt 2.84 GB of AdamW moments), against the save itself.

    python benchmarks/checkpoint_digests.py --dir /tmp/ckbench [--preset gpt2-medium] [--repeats 2]

Measures, each the best of --repeats:
  save (as before)     safetensors' own writer + torch.save to a path, fsync, COMPLETE, rename: the save
                       before digests existed
  save (digests)       the engine's save now: both files hashed while written (xxh3-128), the manifest,
                       fsync, COMPLETE, rename
  save (no hashing)    the same code with the hasher replaced by a no-op: what hashing itself costs
  verify, warm         every file re-read and hashed, from the page cache (retention's read-back, and a
                       resume right after a save)
  verify, cold         the same after the files were dropped from the page cache (posix_fadvise), as a
                       resume on a new node sees them
  load, cold           backend.load alone, from a cold cache; and verify + load, cold: what a resume pays
                       for verification over what loading costs anyway
Prints one JSON line and a table; writes nothing but the checkpoints under --dir (removed at the end).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from engine import backends, checkpoint, dist, integrity, model as model_lib  # noqa: E402
from engine.config import load_config  # noqa: E402


def build(preset: str, run_dir: Path):
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = load_config(None, [f"model.name={preset}", "model.init=random", f"run.dir={run_dir}"])
    n_layer, n_embd, n_head = model_lib.PRESETS[preset]
    hf = GPT2LMHeadModel(GPT2Config(n_layer=n_layer, n_embd=n_embd, n_head=n_head, vocab_size=model_lib.GPT2_VOCAB))
    module = model_lib.TrainModule(hf, "lm", perf=cfg.perf)
    env = dist.DistEnv()
    backend = backends.create(cfg, env)
    backend.setup(module, [{"params": [p for p in module.parameters() if p.requires_grad], "weight_decay": 0.0}])
    for p in module.parameters():  # one step so that AdamW holds both moments for every parameter
        p.grad = torch.zeros_like(p)
    backend.step(1e-4, 0.0)
    return backend


def drop_cache(path: Path) -> None:
    for p in path.rglob("*"):
        if p.is_file():
            fd = os.open(p, os.O_RDONLY)
            try:
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def save_as_before(backend, root: Path, step: int) -> Path:
    """The DDP save and commit as they were before digests (safetensors' writer, torch.save to a path)."""
    from safetensors.torch import save_model

    tmp, final = root / f".tmp-{checkpoint.step_dir_name(step)}", root / checkpoint.step_dir_name(step)
    tmp.mkdir(parents=True)
    save_model(backend.module, str(tmp / "model.safetensors"))
    torch.save({"optimizer": backend.optimizer.state_dict()}, tmp / "optimizer.pt")
    checkpoint._fsync_tree(tmp)
    checkpoint._write_atomic(tmp / checkpoint.COMPLETE, "ok\n")
    os.replace(tmp, final)
    return final


class NoHash:
    def update(self, data):
        pass

    def hexdigest(self):
        return "0"


def timed(fn):
    t = time.perf_counter()
    out = fn()
    return time.perf_counter() - t, out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", default="/tmp/ckbench")
    ap.add_argument("--preset", default="gpt2-medium")
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    work = Path(args.dir)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    backend = build(args.preset, work)
    ck = checkpoint.Checkpointer(work, keep=100, rank=0, world=1)
    state = {"tokens": 0.0, "sample_index": 0, "global_batch": 8, "config": {}}
    best: dict[str, float] = {}

    def note(key, seconds):
        best[key] = min(best.get(key, float("inf")), seconds)

    step = 0
    real_hasher = integrity.new_hasher
    for _ in range(args.repeats):
        for mode in ("before", "digests", "no hashing"):
            step += 1
            if mode == "before":
                dt, path = timed(lambda: save_as_before(backend, work / "checkpoints", step))
            else:
                integrity.new_hasher = real_hasher if mode == "digests" else NoHash
                try:
                    dt, path = timed(lambda: ck.save(step, backend, state))
                finally:
                    integrity.new_hasher = real_hasher
            note(f"save ({mode})", dt)
            if mode == "digests":
                note("verify, warm", timed(lambda: checkpoint.verify(path))[0])
                drop_cache(path)
                note("verify, cold", timed(lambda: checkpoint.verify(path))[0])
                drop_cache(path)
                note("load, cold", timed(lambda: backend.load(path))[0])
                drop_cache(path)
                note("verify + load, cold", timed(lambda: (checkpoint.verify(path), backend.load(path)))[0])
            shutil.rmtree(path)
    size = sum(p.stat().st_size for p in (work / "checkpoints").rglob("*") if p.is_file())
    shutil.rmtree(work, ignore_errors=True)
    report = {"preset": args.preset, "repeats": args.repeats, "seconds": {k: round(v, 3) for k, v in best.items()},
              "hashing_share_of_save": round((best["save (digests)"] - best["save (no hashing)"]) / best["save (digests)"], 4),
              "save_overhead_vs_before": round(best["save (digests)"] / best["save (before)"] - 1, 4),
              "verify_warm_share_of_save": round(best["verify, warm"] / best["save (digests)"], 4),
              "verify_added_to_cold_resume": round(best["verify + load, cold"] - best["load, cold"], 3),
              "leftover_bytes": size}
    print(json.dumps(report))
    for k, v in best.items():
        print(f"{k:24s} {v:8.2f} s")


if __name__ == "__main__":
    main()
