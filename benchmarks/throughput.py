"""Throughput / MFU / memory grid: the engine against a plain PyTorch loop and Hugging Face Trainer.

Same as `ftl bench` (the implementation is engine/commands/bench.py, so an installed engine has it too):

    python benchmarks/throughput.py --quick                      # CPU smoke grid, seconds
    python benchmarks/throughput.py --preset gpt2 --micro-batch 16,32 --seq-len 1024 --compile off,on
    torchrun --nproc-per-node 8 benchmarks/throughput.py --preset gpt2-xl --backend ddp,zero2,zero3

See benchmarks/RESULTS.md for the recorded numbers and the exact commands.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from engine.cli import main  # noqa: E402

if __name__ == "__main__":
    main(["bench", *sys.argv[1:]])
