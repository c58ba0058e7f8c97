"""Invariant 4, failures surface as errors: a mistake found on ONE rank stops every rank with its message.

Rank 1 alone fails to read the data (tests/hooks/sitecustomize.py makes engine.data.sources.load_raw raise the engine's
UsageError there only, as a file one node cannot read would). The ranks agree on errors before any further
collective (`dist.agree_on_error`), so rank 0, the one rank that prints, reports rank 1's problem and every rank
exits 2, before anything is written. Without an agreement right after the data is read, rank 0 went on into the
tokenizer's broadcast and the tokenization barriers while rank 1 waited in the later agreement: a hang until the
30-minute collective timeout (found by this test; engine/trainer.py now agrees after reading too).
"""

from __future__ import annotations

from tests.conftest import tiny_overrides, torchrun
from tests.distributed.test_checkpoint_barrier import hooked_env


def test_an_error_on_one_rank_is_reported_by_rank_0_and_stops_every_rank(tmp_path):
    run = tmp_path / "run"
    proc = torchrun(2, ["train", *tiny_overrides(run, **{"dist.timeout_s": 60})], timeout=180,
                    **hooked_env("usage_error_on_rank=1:engine.data.sources:load_raw"))
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "error: engine.data.sources.load_raw failed on rank 1 only" in out, out[-4000:]
    assert out.count("failed on rank 1 only") == 1  # one message for the job, printed by rank 0
    assert "exitcode: 2" in out, out[-4000:]  # a usage error, not a collective timeout (the default is 30 minutes)
    assert not run.exists()
