"""Shared fixtures: an offline environment, tiny configs, and helpers that run the real CLI / torchrun."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Offline everywhere: no hub lookups for models or datasets, in this process and in subprocesses.
OFFLINE = {
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "OMP_NUM_THREADS": "1",
    "DS_ACCELERATOR": "cpu",
    "PYTHONUNBUFFERED": "1",
}
os.environ.update(OFFLINE)

# The suite outside tests/gpu states exact CPU numbers (fp32, gloo): on a GPU machine it must not drift onto
# CUDA and bf16. Configs pin train.device=cpu (tiny_overrides) and subprocesses see no GPU unless a test asks
# for one with GPU_ENV; tests/gpu ask explicitly.
VISIBLE_GPUS = os.environ.get("CUDA_VISIBLE_DEVICES")
GPU_ENV = {"CUDA_VISIBLE_DEVICES": VISIBLE_GPUS, "DS_ACCELERATOR": "cuda"}


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu_heavy: a GPU test whose measurement benchmarks/gpu_check.sh makes in "
                                       "its own sections (or that builds DeepSpeed ops): deselected there")


# Extended tests: further points of a matrix whose other points run in every CI run (the promise each guards is
# also guarded by a test that runs by default), left out so that the whole suite stays under 25 minutes on the
# 2-core CI machine. `FTL_SLOW_TESTS=1 python -m pytest -q tests` runs them too; run that before changing the
# code they cover (backends, launchers, checkpoints). Listed here, in one place, by node id.
EXTENDED = {
    # ZeRO parity: zero1, zero2 and zero3 run by default (zero1/zero3 runs also feed the memory and resume tests)
    "tests/distributed/test_deepspeed.py::test_zero_matches_ddp_and_a_single_process[zero0]",
    "tests/distributed/test_deepspeed.py::test_zero_matches_ddp_and_a_single_process[zero2_offload]",
    "tests/distributed/test_deepspeed.py::test_zero_matches_ddp_and_a_single_process[zero3_offload]",
    "tests/distributed/test_deepspeed.py::test_resume_continues_exactly[zero1]",  # zero3's resume runs
    "tests/distributed/test_deepspeed.py::test_a_nan_step_is_skipped_at_every_stage[2]",  # 0 and 3 run
    # weighted LoRA fine-tuning on 2 ranks: DDP and ZeRO-3 run
    "tests/distributed/test_finetune_distributed.py::test_weighted_lora_fine_tune_zero_two_ranks[0]",
    "tests/distributed/test_finetune_distributed.py::test_weighted_lora_fine_tune_zero_two_ranks[1]",
    "tests/distributed/test_finetune_distributed.py::test_weighted_lora_fine_tune_zero_two_ranks[2]",
    # the launcher's multi-node and signal paths: the torchrun variants run
    "tests/distributed/test_launch_multinode.py::test_two_nodes_on_loopback_match_one_process[deepspeed]",
    "tests/distributed/test_launch_multinode.py::test_sigusr1_reaches_the_ranks_and_exit_75_comes_out[deepspeed]",
    # compile under ZeRO: stage 2 runs (stages 0 and 1 take the same compiled module; DDP's compile runs too)
    "tests/integration/test_fastpath_runs.py::test_compile_under_zero_gives_eager_losses[0]",
    "tests/integration/test_fastpath_runs.py::test_compile_under_zero_gives_eager_losses[1]",
    # kill -9 mid-save: guarded for DDP (integration/test_fault_recovery.py) and by the commit-order tests
    "tests/distributed/test_fsdp.py::test_kill_9_mid_save_leaves_no_usable_checkpoint_and_resume_is_bitwise",
}


def pytest_collection_modifyitems(config, items):
    by_id = {item.nodeid: item for item in items}
    collected_files = {item.nodeid.split("::")[0] for item in items}
    # only a whole-file run can tell a missing id from one the user did not select (node ids, -k, -m)
    whole_files = not (any("::" in a for a in config.args) or config.option.keyword or config.option.markexpr)
    stale = sorted(i for i in EXTENDED if whole_files and i.split("::")[0] in collected_files and i not in by_id)
    if stale:  # a renamed test or parameter would otherwise silently come back into (or stay out of) CI
        raise pytest.UsageError("tests/conftest.py EXTENDED names tests that do not exist: " + ", ".join(stale))
    if os.environ.get("FTL_SLOW_TESTS") == "1":
        return
    skip = pytest.mark.skip(reason="extended test (tests/conftest.py EXTENDED): FTL_SLOW_TESTS=1 runs it")
    for node_id in EXTENDED & by_id.keys():
        by_id[node_id].add_marker(skip)


@pytest.fixture(scope="session", autouse=True)
def _datasets_cache(tmp_path_factory):
    """One datasets cache for the session (tokenization is cached across tests), not the user's."""
    cache = tmp_path_factory.mktemp("hf_datasets_cache")
    os.environ["HF_DATASETS_CACHE"] = str(cache)
    yield cache


def assert_train_refused(tmp_path: Path, overrides: list[str], expected: list[str], capsys) -> None:
    """`ftl train` of the tiny job with these overrides (`{tmp}` = tmp_path) exits 2 in-process, its message
    holds every expected fragment, no traceback, and the run directory was never created."""
    from engine.cli import main

    run_dir = tmp_path / "run"
    args = tiny_overrides(run_dir)
    for o in overrides:
        args += ["--set", o.format(tmp=tmp_path)]
    with pytest.raises(SystemExit) as e:
        main(["train", *args])
    err = capsys.readouterr().err
    assert e.value.code == 2, err
    for fragment in expected:
        assert fragment in err, err
    assert "Traceback" not in err
    assert not run_dir.exists(), "nothing may be written for bad input"


def tiny_overrides(run_dir: Path, **extra) -> list[str]:
    """--set arguments for a seconds-long run of the tiny model on the pydoc corpus."""
    base = {
        "run.dir": str(run_dir),
        "model.name": "gpt2-tiny",
        "data.seq_len": 32,
        "data.tokenizer_vocab": 512,
        "train.micro_batch": 4,
        "train.max_steps": 6,
        "train.log_every": 1,
        "train.eval_every": 0,
        "train.eval_batches": 2,
        "train.sample_tokens": 8,
        "optim.warmup_steps": 2,
        "train.device": "cpu",  # tests/gpu override it with cuda
    }
    base.update(extra)
    out = []
    for k, v in base.items():
        out += ["--set", f"{k}={v}"]
    return out


def gpu_overrides(run_dir: Path, **extra) -> list[str]:
    """tiny_overrides on the GPU (tests/gpu): pass GPU_ENV to the subprocess as well."""
    return tiny_overrides(run_dir, **{"train.device": "cuda", **extra})


def gpu_config(run_dir: Path, **extra):
    return tiny_config(run_dir, **{"train.device": "cuda", **extra})


def tiny_config(run_dir: Path, **extra):
    from engine.config import load_config

    args = tiny_overrides(run_dir, **extra)
    return load_config(None, [args[i + 1] for i in range(0, len(args), 2)])


def env_for_subprocess(**extra) -> dict:
    env = dict(os.environ)
    env.update(OFFLINE)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    env["CUDA_VISIBLE_DEVICES"] = ""  # no GPU unless asked for (GPU_ENV)
    env.update(extra)
    if env.get("CUDA_VISIBLE_DEVICES") is None:  # GPU_ENV on a machine that never restricted its GPUs
        env.pop("CUDA_VISIBLE_DEVICES")
    return env


def run_ftl(args: list[str], cwd: Path | None = None, timeout: int = 300, **env) -> subprocess.CompletedProcess:
    """`ftl ARGS` as a real subprocess (python -m engine.cli, same interpreter)."""
    return subprocess.run([sys.executable, "-m", "engine.cli", *map(str, args)], cwd=cwd, capture_output=True,
                          text=True, timeout=timeout, env=env_for_subprocess(**env))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(nproc: int, args: list[str], timeout: int = 300, extra_torchrun: list[str] | None = None,
             **env) -> subprocess.CompletedProcess:
    """`torchrun --nproc-per-node N -m engine.cli ARGS` on loopback with a free port."""
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
           "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{free_port()}", *(extra_torchrun or []),
           "-m", "engine.cli", *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env_for_subprocess(**env))


def check(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, f"exit {proc.returncode}\n--- stdout\n{proc.stdout[-4000:]}\n--- stderr\n{proc.stderr[-6000:]}"
    return proc


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines() if line.strip()]


def train_losses(run_dir: Path) -> list[float]:
    return [r["loss"] for r in read_metrics(run_dir) if "loss" in r]


@pytest.fixture
def variable_length_corpus(tmp_path) -> Path:
    """A JSONL corpus whose documents have very different lengths, so unpacked micro-batches carry
    different numbers of target tokens (what exposes per-micro-batch averaging)."""
    import pydoc_data.topics

    texts = list(pydoc_data.topics.topics.values())
    path = tmp_path / "docs.jsonl"
    with open(path, "w") as f:
        for i, t in enumerate(texts[:64]):
            f.write(json.dumps({"text": t[: 20 + (i * 37) % 400]}) + "\n")
    return path
