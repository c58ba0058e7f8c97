"""Packing on instruction data: tokens per step and tokens/s with data.pack=true and false, and the loss.

    python benchmarks/sft_packing.py                                   # gpt2-mini, builtin:stdlib_qa, chat
    python benchmarks/sft_packing.py --model gpt2 --seq-len 512 --steps 40 --set train.precision=bf16

Both runs train the same model from the same seed on the same examples for the same number of steps with
the same micro-batch; only data.pack differs. Reported per run (rank 0, one process):
- packing efficiency: non-pad tokens / positions of the packed rows (the run log's number);
- tokens/step and tokens/s: NON-PAD tokens (what the engine's tokens/tokens_per_s count), the median of
  the logged windows after the first (which holds start-up);
- examples/step: how many whole examples one optimizer step learns from;
- eval_loss after training: the completion-only loss on the held-out examples, the same for both runs
  (packing never mixes examples: invariant 6), so it tells whether more tokens per step bought progress.

Writes OUT/sft_packing.json and OUT/sft_packing.md (see docs/sft.md for the numbers measured).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def run(out: Path, pack: bool, args) -> dict:
    from engine.config import load_config
    from engine.trainer import Trainer

    run_dir = out / ("packed" if pack else "unpacked")
    sets = [f"run.dir={run_dir}", f"model.name={args.model}", f"data.source={args.source}",
            f"data.format={args.format}", f"data.seq_len={args.seq_len}", f"data.pack={str(pack).lower()}",
            f"train.micro_batch={args.micro_batch}", f"train.max_steps={args.steps}", "train.log_every=5",
            "train.eval_every=0", "checkpoint.resume=none", "eval.generations=0", *args.set]
    trainer = Trainer(load_config(None, sets), progress=False)
    try:
        stats = trainer.data.stats["train"]
        t0 = time.perf_counter()
        result = trainer.train()
        wall = time.perf_counter() - t0
    finally:
        trainer.close()
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "tokens_per_s" in r]
    tokens = [b["tokens"] - a["tokens"] for a, b in zip(train_rows, train_rows[1:])]
    steps = [b["step"] - a["step"] for a, b in zip(train_rows, train_rows[1:])]
    evals = [r for r in rows if "eval_loss" in r]
    return {"pack": pack, "packing_efficiency": stats.efficiency, "rows": stats.rows, "examples": stats.kept,
            "examples_per_step": args.micro_batch * stats.kept / max(stats.rows, 1),
            "tokens_per_step": sum(tokens) / max(sum(steps), 1),
            "tokens_per_s": statistics.median(r["tokens_per_s"] for r in train_rows[1:]),
            "eval_loss_before": evals[0]["eval_loss"], "eval_loss_after": evals[-1]["eval_loss"],
            "wall_s": wall, "steps": result["step"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="gpt2-mini")
    ap.add_argument("--source", default="builtin:stdlib_qa")
    ap.add_argument("--format", default="chat", choices=("prompt_completion", "chat"))
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--micro-batch", type=int, default=16)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="extra engine config override")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/out/sft-packing"))
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    results = [run(args.out, pack, args) for pack in (True, False)]
    import torch

    meta = {"command": "python " + " ".join(sys.argv), "date": time.strftime("%Y-%m-%d"),
            "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
                       f"{'cuda ' + torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu'}",
            "torch": torch.__version__}
    (args.out / "sft_packing.json").write_text(json.dumps({"meta": meta, "runs": results}, indent=1))
    lines = [f"`{meta['command']}` ({meta['date']}, {meta['machine']}, torch {meta['torch']})", "",
             "| data.pack | packing efficiency | examples/step | tokens/step | tokens/s | eval loss before | after |",
             "|---|---|---|---|---|---|---|"]
    for r in results:
        eff = f"{100 * r['packing_efficiency']:.1f}%" if r["packing_efficiency"] else "-"
        lines.append(f"| {str(r['pack']).lower()} | {eff} | {r['examples_per_step']:.1f} | {r['tokens_per_step']:.0f} | "
                     f"{r['tokens_per_s']:.0f} | {r['eval_loss_before']:.3f} | {r['eval_loss_after']:.3f} |")
    (args.out / "sft_packing.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
