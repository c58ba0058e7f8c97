"""`ftl bench --quick`: the benchmark code runs end to end on CPU and writes what it promises. Its
numbers are not checked against any speed (this is not a timed test), only for being real measurements."""

import json
import math
import re

import pytest

from tests.conftest import check, run_ftl


def test_quick_benchmark_writes_table_json_and_plot(tmp_path):
    out = tmp_path / "bench"
    proc = check(run_ftl(["bench", "--quick", "--out", out], timeout=400))
    # the stdout table: our loop, the fast-path-off ablation, and both baselines, with ratios
    for impl in ("ours", "ours-plain", "torch", "hf"):
        assert f" {impl} " in proc.stdout, proc.stdout
    assert "ours / impl" in proc.stdout
    # the spread of step times is shown, and nothing but the benchmark's own lines (no Trainer log dict)
    assert "step ms min/median/max" in proc.stdout
    assert re.search(r" \d+\.\d/\d+\.\d/\d+\.\d ", proc.stdout), proc.stdout
    assert "train_runtime" not in proc.stdout + proc.stderr, proc.stderr[-2000:]

    report = json.loads((out / "throughput.json").read_text())
    env = report["environment"]
    assert env["device"] == "cpu" and env["torch"] and env["date"]
    assert report["command"].startswith("ftl bench --quick")
    (point,) = report["points"]
    assert point["point"]["preset"] == "gpt2-tiny" and point["skipped"] == {}
    assert set(point["results"]) == {"ours", "ours-plain", "torch", "hf"}
    for impl, r in point["results"].items():
        assert r["timed_steps"] == 5, impl
        for key in ("tokens_per_s", "step_time_ms", "rss_mib", "rss_peak_mib"):
            assert math.isfinite(r[key]) and r[key] > 0, (impl, key, r[key])
        assert r["mfu"] is None and r["peak_gpu_mib"] is None  # CPU: no peak FLOP/s, no GPU memory
        assert math.isfinite(r["loss"]) and 0 < r["loss"] < 20, (impl, r["loss"])
        # tokens/s is the step's tokens over the median step time
        assert r["tokens_per_s"] * r["step_time_ms"] / 1e3 == pytest.approx(4 * 2 * 32, rel=1e-6)
    assert set(point["ratio"]) == {"ours-plain", "torch", "hf"}
    assert all(math.isfinite(v) and v > 0 for v in point["ratio"].values())
    # MFU's FLOPs per token: 6N + 12*L*H*Q*T, N without the position embeddings (gpt2-tiny: 2 x 4 heads x 16)
    assert point["flops_per_token"] == 6 * (point["n_params"] - 1024 * 64) + 12 * 2 * 4 * 16 * 32

    png = (out / "throughput.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    assert "| gpt2-tiny ddp" in (out / "throughput.md").read_text()
    assert not (out / "_runs").exists()  # scratch run directories are cleaned up


def test_memory_table_and_bad_input(tmp_path, capsys):
    from engine.cli import main

    main(["bench", "--memory-table", "--preset", "gpt2,gpt2-xl", "--world", "8"])
    table = capsys.readouterr().out
    assert "| gpt2-xl | 1,558M |" in table and "zero3-offload" in table
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", "--quick", "--backend", "zero9", "--out", str(tmp_path / "x")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "unknown backend 'zero9'" in err and "Traceback" not in err
    assert not (tmp_path / "x").exists()
