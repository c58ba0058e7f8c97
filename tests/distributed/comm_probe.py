"""Run under torchrun (2 gloo ranks) by test_communication.py: real `Trainer.train()` runs of several backends and
`train.grad_accum` values in ONE job, with every collective counted per optimizer step.

Counting happens below the engine, at the c10d dispatcher: a TorchDispatchMode sees every `c10d::*` op, whether
Python issued it (the engine's all-reduces, DeepSpeed's reductions) or C++ did (DDP's reducer all-reducing its
gradient buckets in the backward). Steps are told apart by wrapping the trainer's per-step hook
(`fault.step_begins`) on the instance, so the count covers the whole loop iteration: the step, the loss
normalizer, the per-step flags and the log-step reductions.

A second observation, in the style of Accelerate's sync test: every backward's gradients are copied right after it
(wrapping `backend.backward` on the instance), and the two ranks compare them after the run, outside the count. A
non-final micro-batch must leave the ranks with different gradients (nothing was reduced), the final one with
equal ones (the step's single reduction).

    python -m torch.distributed.run --nproc-per-node 2 ... -m tests.distributed.comm_probe OUT.json SCENARIOS.json

SCENARIOS.json: {"name": {"overrides": {key: value}, "grads": bool}}. OUT.json (rank 0):
{"name": {"steps": {step: {op: count}}, "grads": [[equal after backward i of the probed step]]}}.
"""

from __future__ import annotations

import json
import sys
import time
from collections import Counter
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

# Steps 1-3 carry one-off collectives (the memory report's gather, DDP's bucket rebuild, ZeRO-3's prefetch trace):
# steps 4 (a plain step) and 5 (the last, a log step) are counted.
FIRST_COUNTED = 4
GRAD_STEP = 4  # the step whose per-backward gradients are compared across ranks


class CollectiveCounter(TorchDispatchMode):
    """Counts c10d ops (every collective, whoever issued it) under the current label."""

    def __init__(self):
        super().__init__()
        self.label = None
        self.counts: dict[int, Counter] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "c10d" and self.label is not None:
            self.counts.setdefault(self.label, Counter())[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


class LoopDone(Exception):
    pass


def trainable(backend) -> list[torch.nn.Parameter]:
    return [p for p in backend.module.parameters() if p.requires_grad]


def local_grads(backend) -> torch.Tensor:
    """This rank's full local gradient, flattened (DDP and ZeRO-0/1 keep it in .grad)."""
    return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).detach().flatten().float().clone()
                      for p in trainable(backend)])


def run(name: str, spec: dict, root: Path, env, tokenizer: str | None) -> dict:
    from engine import dist
    from engine.config import load_config
    from engine.trainer import Trainer

    overrides = {"run.dir": str(root / name), "model.name": "gpt2-tiny", "data.seq_len": 32,
                 "data.tokenizer_vocab": 512, "train.micro_batch": 2, "train.max_steps": 5, "train.log_every": 5,
                 "train.eval_every": 0, "train.eval_batches": 1, "train.sample_tokens": 0, "optim.warmup_steps": 1,
                 "dist.watchdog_s": 0, **({"data.tokenizer": tokenizer} if tokenizer else {}), **spec["overrides"]}
    cfg = load_config(None, [f"{k}={v}" for k, v in overrides.items()])
    trainer = Trainer(cfg, env, progress=False)
    counter = CollectiveCounter()
    snapshots: list[torch.Tensor] = []
    fault, backend = trainer.fault, trainer.backend
    step_begins, loop_done, backward = fault.step_begins, fault.loop_done, backend.backward

    def on_step(step: int) -> None:
        if step == FIRST_COUNTED:
            counter.__enter__()  # a dispatch mode slows every op down: only the steps the test reads
        counter.label = step if step >= FIRST_COUNTED else None
        step_begins(step)

    def on_loop_done() -> None:
        counter.label = None
        counter.__exit__(None, None, None)
        loop_done()
        raise LoopDone  # the final checkpoint, export and evaluation are not what this probe is about

    def on_backward(loss, last):
        backward(loss, last)
        if spec.get("grads") and counter.label == GRAD_STEP:
            label, counter.label = counter.label, None  # clones are not collectives, but keep the count pure
            snapshots.append(local_grads(backend))
            counter.label = label

    fault.step_begins, fault.loop_done, backend.backward = on_step, on_loop_done, on_backward
    try:
        trainer.train()
    except LoopDone:
        pass
    finally:
        trainer.close()
    out = {"steps": {step: dict(c) for step, c in counter.counts.items()}}
    if spec.get("grads"):
        both = dist.all_gather_object([s.numpy() for s in snapshots])
        out["grads"] = [bool((torch.from_numpy(a) == torch.from_numpy(b)).all()) for a, b in zip(*both)]
        out["grad_norms"] = [float(s.norm()) for s in snapshots]
    return out


def main(out_file: str, scenarios_file: str) -> None:
    from engine import dist

    scenarios = json.loads(Path(scenarios_file).read_text())
    root = Path(out_file).parent / "runs"
    env = dist.init("cpu", 120)
    results, tokenizer = {}, None
    for name, spec in scenarios.items():
        start = time.monotonic()
        results[name] = run(name, spec, root, env, tokenizer)
        results[name]["seconds"] = round(time.monotonic() - start, 1)
        tokenizer = tokenizer or str(root / name / "tokenizer")  # train the BPE once
    if env.is_main:
        Path(out_file).write_text(json.dumps(results, indent=1))
    dist.shutdown()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
