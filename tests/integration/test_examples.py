"""Every file in examples/ works as the docs use it, so an example that stops working fails CI.

The examples run from a scratch directory laid out like the repository root (examples/ and ds_configs/
linked in, runs/ written there), with the docs' own commands plus a few `--set`s that make them seconds
long (2 steps, one eval batch, no sample). They chain as in the docs: the default job's model and tokenizer
are the base of the LoRA, long-context and sweep examples. The cheap ones train in this process; DeepSpeed
in a subprocess; the multi-node and SLURM examples are checked as the commands they print or write (their
real launches are tests/distributed/test_launch_multinode.py and tests/integration/test_slurm.py).
"""

import json
import os
import subprocess
from pathlib import Path

import pytest

from engine.cli import main
from tests.conftest import ROOT, check, read_metrics, run_ftl

FEW_STEPS = ["--set", "train.max_steps=2", "--set", "train.log_every=1", "--set", "train.eval_batches=1",
             "--set", "train.sample_tokens=0", "--no-progress"]
# how each example is exercised below (a new example must be added here, and to a test)
COVERED = {"default.yaml", "classification.yaml", "lora.yaml", "deepspeed_zero3_offload.yaml", "torchrun_2node.yaml",
           "slurm.yaml", "sweep.yaml", "long_context.yaml", "long_inputs.yaml", "sft.yaml"}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A scratch 'repository root' the examples run in, as the current directory."""
    wd = tmp_path_factory.mktemp("examples")
    for name in ("examples", "ds_configs"):
        (wd / name).symlink_to(ROOT / name)
    old = os.getcwd()
    os.chdir(wd)
    yield wd
    os.chdir(old)


def ftl(*args):
    """`ftl ARGS` in this process; returns normally or fails the test with the exit code."""
    try:
        main(list(args))
    except SystemExit as e:
        assert e.code in (0, None), f"ftl {' '.join(args)} exited {e.code}"


def last(run_dir: Path, key: str):
    return [r for r in read_metrics(run_dir) if key in r][-1]


def test_every_example_is_exercised():
    assert {p.name for p in (ROOT / "examples").glob("*.yaml")} == COVERED


@pytest.fixture(scope="module")
def default_run(workdir):
    ftl("train", "examples/default.yaml", *FEW_STEPS)
    run = workdir / "runs/default"
    assert last(run, "loss")["step"] == 2 and (run / "final/config.json").is_file()
    assert (run / "tokenizer/tokenizer.json").is_file()
    return run


def test_default(default_run):
    assert "eval_ppl" in last(default_run, "eval_ppl")


def test_lora_on_the_default_jobs_model(default_run, workdir):
    pytest.importorskip("peft")
    ftl("train", "examples/lora.yaml", *FEW_STEPS)
    run = workdir / "runs/lora-packages"
    assert "eval_macro_f1" in last(run, "eval_macro_f1")
    cfg = json.loads((run / "final/config.json").read_text())
    assert len(cfg["id2label"]) == 26 and "encodings" in cfg["id2label"].values()


def test_long_context_grows_the_default_jobs_positions(default_run, workdir):
    ftl("train", "examples/long_context.yaml", *FEW_STEPS, "--set", "train.micro_batch=1")
    cfg = json.loads((workdir / "runs/long-context/final/config.json").read_text())
    assert cfg["n_positions"] == 2048


def test_sweep_with_the_default_jobs_tokenizer(default_run, workdir):
    ftl("sweep", "examples/sweep.yaml", "--grid", "optim.lr=1e-3,3e-3", "--set", "train.max_steps=2",
        "--set", "train.eval_batches=1", "--out", "sweeps/lr")
    rows = (workdir / "sweeps/lr/summary.csv").read_text().splitlines()[1:]
    assert len(rows) == 2 and all(",done," in r for r in rows), rows
    assert (workdir / "sweeps/lr/best.yaml").is_file()


def test_classification(workdir):
    ftl("train", "examples/classification.yaml", *FEW_STEPS)
    run = workdir / "runs/stdlib-packages"
    row = last(run, "eval_macro_f1")
    assert row["step"] == 2 and 0 <= row["eval_macro_f1"] <= 1
    assert (run / "best/config.json").is_file()  # eval.metric keeps best/


def test_sft_then_the_readmes_openai_client(workdir, capsys):
    """The README's path to a chat model and a served one: examples/sft.yaml trains (2 steps, one short
    eval generation), `ftl generate --chat` answers, and the README's own `openai` snippet runs against
    `ftl serve`'s server (in a thread here, on a free port) and gets a reply from the model 'sft-chat'."""
    import re
    import threading

    from engine.commands import serve

    ftl("train", "examples/sft.yaml", *FEW_STEPS, "--set", "train.micro_batch=2", "--set", "eval.generations=1",
        "--set", "eval.generation_tokens=4")
    run = workdir / "runs/sft-chat"
    assert last(run, "loss")["step"] == 2 and (run / "final/chat_template.jinja").is_file()
    capsys.readouterr()
    ftl("generate", "runs/sft-chat", "--chat", '[{"role": "user", "content": "What does os.getcwd() do?"}]',
        "--temperature", "0", "--max-new-tokens", "4")
    capsys.readouterr()

    pytest.importorskip("openai")
    readme = (ROOT / "README.md").read_text()
    snippet = re.search(r'ftl serve runs/sft-chat --port (\d+) &.*?python -c "(.*?)"\n', readme, re.S)
    assert snippet, "README's SFT block (ftl serve runs/sft-chat ... python -c \"...openai...\") not found"
    httpd = serve.make_server(serve.ModelService(Path("runs/sft-chat"), max_new_tokens=8, max_batch=1), "127.0.0.1", 0,
                              65536, quiet=True)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        code = snippet.group(2).replace(f":{snippet.group(1)}/", f":{httpd.server_address[1]}/")
        printed = []
        exec(compile(code, "README.md (openai snippet)", "exec"), {"print": lambda *a: printed.append(a)})
    finally:
        httpd.shutdown()
        httpd.server_close()
    # the reply's text (after 2 steps often only newlines, as docs/sft.md's step 0 shows)
    assert len(printed) == 1 and isinstance(printed[0][0], str) and printed[0][0], printed


def test_long_inputs_with_windows_and_eval(workdir, capsys):
    ftl("train", "examples/long_inputs.yaml", "--set", "run.name=long-window", "--set", "data.overflow=window",
        "--set", "data.stride=8", *FEW_STEPS)
    capsys.readouterr()
    ftl("eval", "runs/long-window", "--data", "examples/data/long_docs.jsonl", "--json")
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["eval_samples"] == 40  # documents, not windows


def test_deepspeed_zero3_offload(default_run, workdir):
    # a subprocess: DeepSpeed's process-wide state stays out of this one. The default job's tokenizer
    # saves training a new one (the example's own data and model otherwise).
    check(run_ftl(["train", "examples/deepspeed_zero3_offload.yaml", *FEW_STEPS,
                   "--set", f"data.tokenizer={default_run / 'tokenizer'}"], cwd=workdir, timeout=600))
    run = workdir / "runs/zero3-offload"
    planned = [r for r in read_metrics(run) if "memory" in r][0]["memory"]["planned"]
    assert planned["zero_stage"] == 3 and set(planned["offloaded"]) == {"optimizer", "params"}, planned
    assert (run / "final/model.safetensors").is_file()


def test_torchrun_2node_command(workdir, capsys):
    ftl("launch", "--nnodes", "2", "--nproc-per-node", "8", "--rdzv-endpoint", "node001:29400", "--rdzv-id",
        "lm-2node", "examples/torchrun_2node.yaml", "--dry-run")
    out = capsys.readouterr().out
    for part in ("--nnodes=2", "--nproc-per-node=8", "--rdzv-endpoint=node001:29400", "--rdzv-id=lm-2node",
                 "examples/torchrun_2node.yaml"):
        assert part in out, out


def test_slurm_script(workdir, capsys):
    ftl("slurm", "examples/slurm.yaml", "--gpus-per-node", "0", "--time", "30", "-o", "job.sbatch")
    script = (workdir / "job.sbatch").read_text()
    assert str((workdir / "examples/slurm.yaml").resolve()) in script and "#SBATCH --requeue" in script
    assert f"run.dir={workdir / 'runs/slurm-lm'}" in script
    assert subprocess.run(["bash", "-n", "job.sbatch"], cwd=workdir).returncode == 0
