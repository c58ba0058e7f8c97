"""The batch-prefetching thread (what `TrainBatches` runs on CUDA) exercised on the CPU, where tests/mutate.py found it
untested: it yields exactly the stream the direct path yields, and it stops on close(). Pinning is CUDA-only and
skipped here; everything else is the same code."""

import threading
import time

import pytest
import torch

from engine.data import sources as data


class Tok:
    pad_token_id = 0


def batches(prefetch: int) -> data.TrainBatches:
    import datasets

    ds = datasets.Dataset.from_dict({"input_ids": [[i + 1] * 3 for i in range(37)]}).with_format("numpy")
    tb = data.TrainBatches(data.Prepared(ds, ds, Tok(), "lm", 2), data.Layout(1, 0, 4, 2), seed=5,
                           device=torch.device("cpu"))
    tb._prefetch = prefetch  # the CUDA path on the CPU (the attribute the constructor sets from the device)
    return tb


def _prefetch_threads():
    return [t for t in threading.enumerate() if t.name == "ftl-prefetch" and t.is_alive()]


@pytest.mark.timeout(120)
def test_the_prefetching_thread_yields_the_direct_stream_and_stops_on_close():
    direct, ahead = batches(0), batches(2)
    try:
        for step in range(7):  # past an epoch boundary (37 samples, 8 a step)
            a, b = direct.next(), ahead.next()
            assert len(a) == len(b) == 2
            for x, y in zip(a, b):
                assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x), step
        assert _prefetch_threads(), "no prefetching thread ran"
    finally:
        ahead.close()
        direct.close()
    deadline = time.monotonic() + 10
    while _prefetch_threads() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _prefetch_threads(), "the prefetching thread outlived close()"
