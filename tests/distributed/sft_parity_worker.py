"""One torchrun launch, several SFT trainings: `python -m torch.distributed.run --nproc-per-node 2
tests/distributed/sft_parity_worker.py ROOT DATA name=key=value,... ...`.

Each argument after DATA names a run and its backend overrides; the runs train one after another in the
same two processes (one process group), which saves the interpreter start, the imports and the data
preparation of a torchrun launch per backend. tests/distributed/test_sft_parity.py compares the runs."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.conftest import tiny_config  # noqa: E402
from tests.distributed.test_sft_parity import sft_overrides  # noqa: E402


def main(root: str, data: str, specs: list[str]) -> None:
    from engine import dist
    from engine.trainer import Trainer

    for spec in specs:
        name, _, rest = spec.partition("=")
        extra = dict(kv.split("=", 1) for kv in rest.split(",") if kv)
        trainer = Trainer(tiny_config(Path(root) / name, **sft_overrides(Path(data), 2, 2, **extra)), progress=False)
        try:
            trainer.train()
        finally:
            trainer.close()
            del trainer
    dist.shutdown()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3:])
