"""The same 2-rank CPU training run under every sharding backend: losses, bytes per rank, wall time.

    python benchmarks/backends_cpu.py --out benchmarks/results/backends-cpu      # ~10 min on 2 busy cores

Each backend trains the same job (`ftl train` under torchrun, 2 gloo ranks, fp32, one global batch of
2 ranks x micro 2 x accum 2 unpacked documents of uneven lengths, the same seed) and the script reads back
what the run itself logged: the loss of every step, the bytes each rank measured after the first step
(parameters, gradients, optimizer state) and the wall time of the whole `torchrun` command (start-up, data,
training, checkpoint, export, evaluation). Prints a Markdown table and writes backends.json next to it.
The model (`--preset`) is gpt2-mini by default: 4 layers x 128 wide with a 4096-token BPE vocabulary.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import socket
import subprocess
import sys
import time
from pathlib import Path

BACKENDS = {
    "ddp": {"dist.backend": "ddp"},
    "zero1": {"dist.backend": "deepspeed", "dist.zero_stage": 1},
    "zero2": {"dist.backend": "deepspeed", "dist.zero_stage": 2},
    "zero3": {"dist.backend": "deepspeed", "dist.zero_stage": 3},
    "fsdp": {"dist.backend": "fsdp"},
    "fsdp (no reshard)": {"dist.backend": "fsdp", "dist.reshard_after_forward": False},
    "fsdp (offload)": {"dist.backend": "fsdp", "dist.offload": "cpu"},
}


def corpus(path: Path) -> Path:
    import pydoc_data.topics

    texts = list(pydoc_data.topics.topics.values())
    with open(path, "w") as f:
        for i, t in enumerate(texts[:400]):
            f.write(json.dumps({"text": t[: 40 + (i * 37) % 800]}) + "\n")
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(name: str, overrides: dict, out: Path, data: Path, args) -> dict:
    run_dir = out / "runs" / name.replace(" ", "_").replace("(", "").replace(")", "")
    base = {"run.dir": run_dir, "model.name": args.preset, "data.source": data, "data.pack": "false",
            "data.seq_len": 128, "data.tokenizer_vocab": 4096, "train.micro_batch": 2, "train.grad_accum": 2,
            "train.max_steps": args.steps, "train.log_every": 1, "train.eval_every": 0, "train.eval_batches": 2,
            "train.sample_tokens": 0, "train.precision": "fp32", "optim.lr": 1e-3, "optim.eps": 1e-6,
            "optim.warmup_steps": 2, "checkpoint.resume": "none", **overrides}
    sets = [x for k, v in base.items() for x in ("--set", f"{k}={str(v).lower() if isinstance(v, bool) else v}")]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", "--rdzv-backend=c10d",
           f"--rdzv-endpoint=127.0.0.1:{free_port()}", "-m", "engine.cli", "train", "--no-progress", *sets]
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", DS_ACCELERATOR="cpu",
               TOKENIZERS_PARALLELISM="false")
    start = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.monotonic() - start
    if proc.returncode:
        raise SystemExit(f"{name} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    memory = next(r["memory"] for r in rows if "memory" in r)
    return {"backend": name, "losses": [r["loss"] for r in rows if "loss" in r], "wall_s": wall,
            "measured": memory["measured"], "planned": memory["planned"]}


def mib(n: float) -> str:
    return f"{n / 2**20:.2f}"


def table(results: list[dict]) -> str:
    lines = ["| backend | loss step 1 | loss last step | params MiB/rank | grads MiB/rank | optimizer MiB/rank | "
             "params at build MiB/rank | wall s |", "|---|---|---|---|---|---|---|---|"]
    for r in results:
        m = r["measured"][0]  # rank 0; rank 1 measured the same within FSDP's padding
        lines.append(f"| {r['backend']} | {r['losses'][0]:.6f} | {r['losses'][-1]:.6f} | {mib(m['params'])} | "
                     f"{mib(m['grads'])} | {mib(m['optimizer'])} | {mib(m.get('params_at_build', 0))} | "
                     f"{r['wall_s']:.0f} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/backends-cpu"))
    p.add_argument("--preset", default="gpt2-mini")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--backends", default=",".join(BACKENDS))
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    data = corpus(args.out / "docs.jsonl")
    results = []
    for name in args.backends.split(","):
        print(f"[backends] {name}", file=sys.stderr, flush=True)
        results.append(run(name, BACKENDS[name], args.out, data, args))
    import torch

    report = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="minutes"),
              "command": " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]), "machine": platform.platform(),
              "cpus": os.cpu_count(), "load_average": os.getloadavg(), "torch": torch.__version__,
              "results": results}
    (args.out / "backends.json").write_text(json.dumps(report, indent=1), encoding="utf-8")
    text = table(results)
    (args.out / "backends.md").write_text(text + "\n", encoding="utf-8")
    print(text)


if __name__ == "__main__":
    main()
