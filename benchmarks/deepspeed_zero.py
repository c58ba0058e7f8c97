"""Per-rank memory and loss agreement of every ZeRO stage against DDP and one process (the table in docs/distributed.md).

    python benchmarks/deepspeed_zero.py [--nproc 2] [--steps 4] [--model gpt2-tiny] [--out DIR]

Each configuration trains the same global batch (nproc x micro 2 x accum 2; the reference: 1 process x micro
4*nproc) on padded documents of uneven length, under torchrun, then reads back metrics.jsonl (the `memory` row
logged after the first step, the losses) and final/ (the weights). Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = [  # name, --set overrides
    ("ddp", {}),
    ("zero0", {"dist.backend": "deepspeed", "dist.zero_stage": 0}),
    ("zero1", {"dist.backend": "deepspeed", "dist.zero_stage": 1}),
    ("zero2", {"dist.backend": "deepspeed", "dist.zero_stage": 2}),
    ("zero3", {"dist.backend": "deepspeed", "dist.zero_stage": 3}),
    ("zero1+offload", {"dist.backend": "deepspeed", "dist.zero_stage": 1, "dist.offload": "cpu"}),
    ("zero2+offload", {"dist.backend": "deepspeed", "dist.zero_stage": 2, "dist.offload": "cpu"}),
    ("zero3+offload", {"dist.backend": "deepspeed", "dist.zero_stage": 3, "dist.offload": "cpu"}),
]


def corpus(path: Path) -> Path:
    import pydoc_data.topics

    texts = list(pydoc_data.topics.topics.values())
    with open(path, "w") as f:
        for i, t in enumerate(texts[:64]):
            f.write(json.dumps({"text": t[: 20 + (i * 37) % 400]}) + "\n")
    return path


def run(run_dir: Path, nproc: int, sets: dict, env: dict) -> float:
    args = []
    for k, v in sets.items():
        args += ["--set", f"{k}={v}"]
    if nproc == 1:
        cmd = [sys.executable, "-m", "engine.cli", "train", "--no-progress", *args]
    else:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}", "--rdzv-backend=c10d",
               f"--rdzv-endpoint=127.0.0.1:{port}", "-m", "engine.cli", "train", "--no-progress", *args]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    if proc.returncode != 0:
        sys.exit(f"{run_dir.name} failed:\n{proc.stderr[-4000:]}")
    return time.perf_counter() - t0


def rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def kib(n: float) -> str:
    return f"{n / 1024:.0f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--model", default="gpt2-tiny")
    ap.add_argument("--out", type=Path, default=None)
    a = ap.parse_args()
    from safetensors.torch import load_file

    out = a.out or Path(tempfile.mkdtemp(prefix="ftl-zero-"))
    out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", OMP_NUM_THREADS="1",
               TOKENIZERS_PARALLELISM="false")
    data = corpus(out / "docs.jsonl")
    common = {"model.name": a.model, "data.source": data, "data.pack": "false", "data.seq_len": 48,
              "data.tokenizer_vocab": 512, "train.max_steps": a.steps, "train.log_every": 1, "train.eval_every": 0,
              "train.eval_batches": 2, "train.sample_tokens": 0, "optim.lr": 3e-3, "optim.eps": 1e-6,
              "optim.warmup_steps": 2, "train.clip_grad": 0.5}
    ref = out / "single"
    run(ref, 1, {**common, "run.dir": ref, "train.micro_batch": 4 * a.nproc, "train.grad_accum": 1}, env)
    ref_loss = [r["loss"] for r in rows(ref) if "loss" in r]
    ref_w = load_file(str(ref / "final/model.safetensors"))
    full = 4 * sum(v.numel() for v in ref_w.values())
    print(f"{a.model}: {full / 1024:.0f} KiB of fp32 weights; {a.nproc} ranks x micro 2 x accum 2 vs 1 x micro "
          f"{4 * a.nproc}, {a.steps} steps\n")
    print("| config | planned params / grads / optimizer (KiB per rank) | measured rank 0: params / grads / optimizer "
          "(KiB) | max rel. loss diff | max abs. weight diff | wall s |")
    print("|---|---|---|---|---|---|")
    for name, sets in CONFIGS:
        run_dir = out / name
        wall = run(run_dir, a.nproc, {**common, **sets, "run.dir": run_dir, "train.micro_batch": 2,
                                      "train.grad_accum": 2}, env)
        mem = next(r["memory"] for r in rows(run_dir) if "memory" in r)
        p, m = mem["planned"], mem["measured"][0]
        loss = [r["loss"] for r in rows(run_dir) if "loss" in r]
        w = load_file(str(run_dir / "final/model.safetensors"))
        dl = max(abs(x - y) / abs(y) for x, y in zip(loss, ref_loss))
        dw = max(float((w[k] - ref_w[k]).abs().max()) for k in ref_w)
        off = f" (offloaded: {', '.join(p['offloaded'])})" if p.get("offloaded") else ""
        print(f"| {name} | {kib(p['params'])} / {kib(p['grads'])} / {kib(p['optimizer'])}{off} | "
              f"{kib(m['params'])} / {kib(m['grads'])} / {kib(m['optimizer'])} | {dl:.1e} | {dw:.1e} | {wall:.1f} |")


if __name__ == "__main__":
    main()
