"""`ftl launch --dry-run` and `ftl slurm` output, asserted exactly; SLURM variables as srun sets them;
bad launcher/SLURM options; shellcheck on every script. No process is launched here."""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from engine import dist
from engine.commands import slurm
from engine.cli import main
from engine.commands.launch import LaunchPlan, preempted_exit_code

ROOT = Path(__file__).resolve().parents[2]
PY = sys.executable
FLAGS = "--signals-to-handle=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1 --shutdown-timeout=300"  # for a copy run as plain torchrun
SCRIPTS = sorted([*(ROOT / "launch").rglob("*.sh"), *(ROOT / "launch").rglob("*.sbatch"),
                  ROOT / ".ci" / "run", *(ROOT / ".ci").glob("*.sh")])


def ftl(capsys, *args) -> str:
    main([str(a) for a in args])
    return capsys.readouterr().out


def ftl_fails(capsys, *args) -> str:
    with pytest.raises(SystemExit) as e:
        main([str(a) for a in args])
    err = capsys.readouterr().err
    assert e.value.code == 2, err
    assert "Traceback" not in err
    return err


# ------------------------------------------------------------------------------------ ftl launch

def test_dry_run_one_node(capsys):
    out = ftl(capsys, "launch", "--nproc-per-node", 4, "--dry-run", "--set", "train.max_steps=5")
    assert out == (f"{PY} -m torch.distributed.run --nproc-per-node=4 --standalone {FLAGS} "
                   "-m engine.cli train --set train.max_steps=5\n")
    # default: all local GPUs, 1 process on a CPU machine; --max-restarts passes through, with the
    # store workaround for restarts (pytorch#135712)
    out = ftl(capsys, "launch", "--dry-run", "--max-restarts", 2)
    n = torch.cuda.device_count() if torch.cuda.is_available() else 1
    assert out == (f"TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 {PY} -m torch.distributed.run --nproc-per-node={n} "
                   f"--standalone --max-restarts=2 {FLAGS} -m engine.cli train\n")


def test_dry_run_nodes_with_rendezvous(capsys, tmp_path):
    cfg = tmp_path / "my.yaml"
    cfg.write_text("train: {max_steps: 7}\n")
    out = ftl(capsys, "launch", cfg, "--nnodes", 2, "--nproc-per-node", 8, "--rdzv-endpoint", "node001:29400",
              "--rdzv-id", "job42", "--dry-run", "--set", "optim.lr=1e-4")
    assert out == (f"{PY} -m torch.distributed.run --nproc-per-node=8 --nnodes=2 --rdzv-backend=c10d "
                   f"--rdzv-endpoint=node001:29400 --rdzv-id=job42 {FLAGS} -m engine.cli train {cfg} --set optim.lr=1e-4\n")


def test_dry_run_deepspeed_one_node(capsys):
    out = ftl(capsys, "launch", "--launcher", "deepspeed", "--nproc-per-node", 2, "--rdzv-endpoint", "127.0.0.1:29611",
              "--dry-run")
    assert out == (f"{PY} -m deepspeed.launcher.runner --num_gpus=2 --master_port=29611 --no_local_rank "
                   "--module engine.cli train\n")
    # without an endpoint a free port is picked, so concurrent jobs on one node do not collide
    out = ftl(capsys, "launch", "--launcher", "deepspeed", "--dry-run")
    n = torch.cuda.device_count() if torch.cuda.is_available() else 1
    assert re.fullmatch(re.escape(f"{PY} -m deepspeed.launcher.runner --num_gpus={n} --master_port=") + r"\d+"
                        + re.escape(" --no_local_rank --module engine.cli train") + "\n", out)


def test_deepspeed_keeps_the_gpus_slurm_gave(monkeypatch):
    # deepspeed --num_gpus N would take GPUs 0..N-1; without it, it keeps CUDA_VISIBLE_DEVICES
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5,6,7")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    plan = LaunchPlan([], 2, "deepspeed", rdzv_endpoint="127.0.0.1:29500")
    assert plan.render() == (f"CUDA_VISIBLE_DEVICES=4,5 {PY} -m deepspeed.launcher.runner --master_port=29500 "
                             "--no_local_rank --module engine.cli train")
    assert "CUDA_VISIBLE_DEVICES" not in LaunchPlan([], 4, "deepspeed").env()
    assert LaunchPlan([], 8, "deepspeed").problems() == ["--nproc-per-node 8 but CUDA_VISIBLE_DEVICES lists 4 GPUs"]


def test_dry_run_deepspeed_hostfile_per_node(capsys):
    out = ftl(capsys, "launch", "--launcher", "deepspeed", "--nnodes", 2, "--node-rank", 1, "--nproc-per-node", 4,
              "--rdzv-endpoint", "10.0.0.1:29400", "--hosts", "gpu01,gpu02", "--dry-run", "--set", "train.max_steps=3")
    text = "gpu01 slots=4\ngpu02 slots=4\n"
    path = LaunchPlan([], 4, "deepspeed", 2, 1, "10.0.0.1:29400", hosts=["gpu01", "gpu02"]).hostfile_path()
    assert path == LaunchPlan([], 4, "deepspeed", hosts=["gpu01", "gpu02"], node_rank=0).hostfile_path()  # by content
    assert out == (f"# hostfile {path}:\n#   gpu01 slots=4\n#   gpu02 slots=4\n"
                   f"{PY} -m deepspeed.launcher.runner --hostfile={path} --no_ssh --node_rank=1 "
                   "--master_addr=10.0.0.1 --master_port=29400 --no_local_rank --module engine.cli train "
                   "--set train.max_steps=3\n")
    assert LaunchPlan([], 4, "deepspeed", hosts=["gpu01", "gpu02"]).hostfile_text() == text
    # without --hosts the lines are only labels (each node launches itself)
    plan = LaunchPlan([], 2, "deepspeed", nnodes=3, node_rank=0, rdzv_endpoint="h:1")
    assert plan.hostfile_text() == "node0 slots=2\nnode1 slots=2\nnode2 slots=2\n"


def test_dry_run_deepspeed_users_hostfile_over_ssh(capsys, tmp_path):
    hf = tmp_path / "hostfile"
    hf.write_text("# two nodes\nworker-1 slots=8\nworker-2 slots=8\n")
    out = ftl(capsys, "launch", "--launcher", "deepspeed", "--hostfile", hf, "--dry-run")
    assert out == (f"{PY} -m deepspeed.launcher.runner --hostfile={hf} --master_addr=worker-1 --master_port=29500 "
                   "--no_local_rank --module engine.cli train\n")


def test_launch_adds_omp_threads_only_when_unset(monkeypatch):
    plan = LaunchPlan([], 2)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr("engine.commands.launch.available_cpus", lambda: 16)
    assert plan.env()["OMP_NUM_THREADS"] == "8"
    assert plan.render().startswith("OMP_NUM_THREADS=8 ")
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert "OMP_NUM_THREADS" not in plan.env()


BAD_LAUNCH = [
    (["--nnodes", "2"], ["--nnodes > 1 needs --rdzv-endpoint HOST:PORT"]),
    (["--rdzv-endpoint", "node001"], ["--rdzv-endpoint must look like HOST:PORT"]),
    (["--hosts", "a,b"], ["--hosts/--hostfile are for --launcher deepspeed"]),
    (["--launcher", "deepspeed", "--nnodes", "2"], ["needs --node-rank on each node", "or --hosts/--hostfile"]),
    (["--launcher", "deepspeed", "--nnodes", "2", "--node-rank", "2", "--max-restarts", "1"],
     ["3 problems", "--node-rank 2 is outside 0..1", "needs --rdzv-endpoint", "--max-restarts is a torchrun feature"]),
    (["--launcher", "deepspeed", "--hostfile", "/nonexistent/hostfile"], ["--hostfile /nonexistent/hostfile"]),
    (["--set", "train.max_stpes=3", "--nnodes", "2"], ["2 problems", "unknown config key 'train.max_stpes'",
                                                       "--nnodes > 1 needs --rdzv-endpoint"]),
]


@pytest.mark.parametrize("args,expected", BAD_LAUNCH, ids=[" ".join(a) for a, _ in BAD_LAUNCH])
def test_bad_launch_options_exit_2_naming_every_problem(capsys, args, expected):
    err = ftl_fails(capsys, "launch", "--dry-run", *args)
    for fragment in expected:
        assert fragment in err, err


def test_preempted_exit_code():
    assert preempted_exit_code([75, 75]) == 75
    assert preempted_exit_code([75, -15]) == 75  # the launcher stopped the other rank
    assert preempted_exit_code([75, 1]) is None  # a rank failed on its own
    assert preempted_exit_code([1, -15]) is None


# ------------------------------------------------------------------------- SLURM variables (dist)

# As srun sets them for `sbatch -n 2` + `srun` (slurm 22.05 on the CI cluster): no SLURM_NTASKS_PER_NODE.
SRUN_TASK_1 = {"SLURM_JOB_ID": "4242", "SLURM_PROCID": "1", "SLURM_LOCALID": "1", "SLURM_NODEID": "0",
               "SLURM_NTASKS": "2", "SLURM_NPROCS": "2", "SLURM_STEP_ID": "0", "SLURM_STEP_NUM_TASKS": "2",
               "SLURM_STEP_NUM_NODES": "1", "SLURM_JOB_NODELIST": "localhost", "SLURM_STEP_NODELIST": "localhost",
               "SLURM_TASKS_PER_NODE": "2", "SLURM_STEP_TASKS_PER_NODE": "2", "SLURM_NNODES": "1"}


def test_srun_without_torchrun_gives_the_rank_layout():
    assert dist.slurm_step_layout(SRUN_TASK_1) == {
        "rank": 1, "world_size": 2, "local_rank": 1, "local_world_size": 2, "launcher": "srun",
        "master_addr": "localhost"}
    # 3 nodes, uneven tasks: node 2 of `2(x2),1`
    multi = dict(SRUN_TASK_1, SLURM_PROCID="4", SLURM_LOCALID="0", SLURM_NODEID="2", SLURM_STEP_NUM_TASKS="5",
                 SLURM_NTASKS="5", SLURM_STEP_NODELIST="gpu[07-08],gpu11", SLURM_STEP_TASKS_PER_NODE="2(x2),1")
    layout = dist.slurm_step_layout(multi)
    assert (layout["rank"], layout["world_size"], layout["local_world_size"]) == (4, 5, 1)
    assert layout["master_addr"] == "gpu07"
    # the batch script itself (no step), and one-task steps, are a single process
    assert dist.slurm_step_layout({k: v for k, v in SRUN_TASK_1.items() if not k.startswith("SLURM_STEP")}) is None
    assert dist.slurm_step_layout(dict(SRUN_TASK_1, SLURM_STEP_NUM_TASKS="1", SLURM_NTASKS="1")) is None


def test_launcher_env_prefers_torchrun_and_fills_master_from_slurm(monkeypatch):
    for k in [k for k in os.environ if k.startswith("SLURM_") or k in ("RANK", "WORLD_SIZE", "MASTER_ADDR",
                                                                       "MASTER_PORT", "LOCAL_WORLD_SIZE")]:
        monkeypatch.delenv(k)
    for k, v in SRUN_TASK_1.items():
        monkeypatch.setenv(k, v)
    layout = dist.launcher_env()
    assert (layout["rank"], layout["world_size"], layout["launcher"]) == (1, 2, "srun")
    assert os.environ["MASTER_ADDR"] == "localhost" and os.environ["MASTER_PORT"] == str(dist.slurm_port("4242"))
    # a torchrun/deepspeed worker inside a SLURM job: the launcher's variables win (deepspeed: LOCAL_SIZE)
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "8")
    monkeypatch.setenv("LOCAL_SIZE", "4")
    assert dist.launcher_env() == {"rank": 3, "world_size": 8, "local_rank": 0, "local_world_size": 4,
                                   "launcher": "deepspeed"}


def test_slurm_helpers():
    assert dist.tasks_per_node("2(x3),1") == [2, 2, 2, 1]
    assert dist.tasks_per_node("4") == [4]
    assert dist.slurm_hostnames("localhost") == ["localhost"]
    ports = {dist.slurm_port(j) for j in range(1000, 1100)}
    assert len(ports) == 100 and all(20000 <= p < 32768 for p in ports)  # distinct, below ephemeral ports
    assert dist.slurm_port("12345") == dist.slurm_port(12345) == 20000 + 12345 % 12000


def test_scripts_compute_the_same_port_as_dist():
    for name in ("train.sbatch", "train_deepspeed.sbatch"):
        text = (ROOT / "launch" / "slurm" / name).read_text()
        (formula,) = set(re.findall(r"\$\(\((20000 \+ SLURM_JOB_ID % 12000)\)\)", text))
        for job_id in (7, 12345, 987654):
            assert eval(formula.replace("SLURM_JOB_ID", str(job_id))) == dist.slurm_port(job_id)


# ------------------------------------------------------------------------------------- ftl slurm

def _sbatch_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("#SBATCH")]


def _setting(text: str, name: str) -> str:
    (line,) = [line for line in text.splitlines() if line.startswith(name + "=")]
    return line


def test_slurm_script_for_a_multi_node_gpu_job(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = tmp_path / "my.yaml"
    cfg.write_text("run: {name: big}\n")
    out = ftl(capsys, "slurm", "my.yaml", "--nodes", 4, "--gpus-per-node", 8, "--partition", "gpu",
              "--time", "2-00:00:00", "--account", "proj7", "--set", "optim.lr=1e-4", "--sbatch=--qos=high")
    run_dir = tmp_path / "runs" / "big"
    assert _sbatch_lines(out) == [
        "#SBATCH --job-name=ftl-big", "#SBATCH --nodes=4", "#SBATCH --ntasks-per-node=1",
        "#SBATCH --gpus-per-node=8", "#SBATCH --exclusive", "#SBATCH --time=2-00:00:00",
        "#SBATCH --partition=gpu", "#SBATCH --account=proj7", "#SBATCH --signal=B:USR1@300", "#SBATCH --requeue",
        "#SBATCH --open-mode=append", f"#SBATCH --output={run_dir}/slurm/%x-%j.out", f"#SBATCH --chdir={tmp_path}",
        "#SBATCH --qos=high"]
    assert _setting(out, "FTL_PYTHON") == f"FTL_PYTHON=${{FTL_PYTHON:-{PY}}}  # a Python that has ftl-engine installed"
    assert _setting(out, "FTL_TRAIN_ARGS") == (f'FTL_TRAIN_ARGS=({cfg} --set optim.lr=1e-4 --set run.dir={run_dir} '
                                               '"$@")  # CONFIG [--set key=value ...]')
    assert "engine.cli launch)" in out and "--rdzv-endpoint" in out  # the torchrun template's body
    assert (run_dir / "slurm").is_dir()  # sbatch needs the log directory to exist


def test_slurm_script_deepspeed_and_cpu(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = ftl(capsys, "slurm", "--launcher", "deepspeed", "--gpus-per-node", 0, "--nproc-per-node", 2,
              "--set", f"run.dir={tmp_path}/r", "--no-requeue", "--signal-before", 60, "--time", "30")
    assert _sbatch_lines(out)[:5] == ["#SBATCH --job-name=ftl-r", "#SBATCH --nodes=1", "#SBATCH --ntasks-per-node=1",
                                      "#SBATCH --cpus-per-task=2", "#SBATCH --time=30"]
    assert "#SBATCH --signal=B:USR1@60" in out and "#SBATCH --no-requeue" in out
    assert not any("--gpus-per-node" in line for line in _sbatch_lines(out))
    assert _setting(out, "FTL_NPROC_PER_NODE").startswith("FTL_NPROC_PER_NODE=${FTL_NPROC_PER_NODE:-2}")
    assert "--launcher deepspeed" in out and "--node-rank" in out  # the deepspeed template's body


def test_deepspeed_launcher_with_a_ddp_config_warns(capsys, tmp_path, monkeypatch):
    """It trains DDP (the launcher only starts processes): allowed, since DDP under DeepSpeed's launcher works,
    but said, since it is rarely what was meant."""
    monkeypatch.chdir(tmp_path)
    warning = "warning: --launcher deepspeed only starts the ranks; dist.backend=ddp trains with DDP, not DeepSpeed ZeRO"
    slurm = ["slurm", "--launcher", "deepspeed", "--gpus-per-node", "0", "--set", f"run.dir={tmp_path}/r"]
    for args in (slurm, ["launch", "--launcher", "deepspeed", "--dry-run"]):
        main(args)
        captured = capsys.readouterr()
        assert warning in captured.err and "dist.backend=deepspeed" in captured.err and warning not in captured.out
    for args in ([*slurm, "--set", "dist.backend=deepspeed"], ["launch", "--dry-run"]):
        main(args)
        assert "warning" not in capsys.readouterr().err


def test_slurm_sweep_writes_the_grid(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = ftl(capsys, "slurm", "--gpus-per-node", 1, "--grid", "optim.lr=1e-4,3e-4", "--grid", "train.micro_batch=8,16",
              "--max-parallel", 2, "--set", "run.name=sw", "-o", "sweep.sbatch")
    run_dir = tmp_path / "runs" / "sw"
    assert out == f"wrote sweep.sbatch and {run_dir}/grid.txt (4 trials)\n"
    text = (tmp_path / "sweep.sbatch").read_text()
    assert "#SBATCH --array=0-3%2" in text and f"#SBATCH --output={run_dir}/slurm/%x-%A_%a.out" in text
    assert _setting(text, "FTL_SWEEP_DIR") == f"FTL_SWEEP_DIR=${{FTL_SWEEP_DIR:-{run_dir}}}"
    assert _setting(text, "FTL_TRAIN_ARGS").startswith(f'FTL_TRAIN_ARGS=({run_dir}/grid.txt --set run.name=sw "$@")')
    assert (run_dir / "grid.txt").read_text() == ("optim.lr=1e-4 train.micro_batch=8\noptim.lr=1e-4 train.micro_batch=16\n"
                                                  "optim.lr=3e-4 train.micro_batch=8\noptim.lr=3e-4 train.micro_batch=16\n")


BAD_SLURM = [
    (["--gpus-per-node", "1", "--time", "soon"], ["--time 'soon': use minutes, H:MM:SS"]),
    (["--gpus-per-node", "1", "--time", "4"], ["--time 4 (240 s) leaves no time before the checkpoint signal"]),
    (["--gpus-per-node", "1", "--job-name", "my job", "--partition", "gpu;rm"],
     ["2 problems", "--job-name 'my job'", "--partition 'gpu;rm'"]),
    (["--gpus-per-node", "1", "--grid", "optim.lr", "--nodes", "2"], ["--grid 'optim.lr' must look like section.key=v1,v2"]),
    (["--gpus-per-node", "1", "--grid", "train.micro_batch=4,zero", "--nodes", "2"],
     ["each trial runs on one node", "trial 1 (train.micro_batch=zero): train.micro_batch must be an integer"]),
    (["--gpus-per-node", "1", "--sbatch", "qos=high", "--max-parallel", "2"],
     ["--sbatch 'qos=high': give one sbatch option", "--max-parallel is for sweeps"]),
    (["--nodes", "2"], ["Missing option '--gpus-per-node'"]),
]


@pytest.mark.parametrize("args,expected", BAD_SLURM, ids=[" ".join(a) for a, _ in BAD_SLURM])
def test_bad_slurm_options_exit_2_and_write_nothing(capsys, tmp_path, monkeypatch, args, expected):
    monkeypatch.chdir(tmp_path)
    err = ftl_fails(capsys, "slurm", "--set", "run.name=x", "-o", "job.sbatch", *args)
    for fragment in expected:
        assert fragment in err, err
    assert list(tmp_path.iterdir()) == [], "nothing may be written for bad input"


def test_slurm_time_parsing():
    assert [slurm.parse_time(t) for t in ("90", "1:30", "4:00:00", "2-00", "1-02:03", "1-0:0:5", "UNLIMITED")] == [
        5400, 90, 14400, 172800, 93780, 86405, None]


# --------------------------------------------------------------------------------------- scripts

def test_every_slurm_template_shares_one_signal_block():
    blocks = {re.search(r"# ---- signals and requeue.*?\n# -{20,}\n", p.read_text(), re.S).group(0)
              for p in (ROOT / "launch" / "slurm").glob("*.sbatch")}
    assert len(blocks) == 1, "launch/slurm/*.sbatch: keep the signals-and-requeue block identical"


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck not installed (CI installs it via .ci/slurm_up.sh)")
def test_shellcheck_clean(tmp_path, capsys, monkeypatch):
    rendered = []
    monkeypatch.chdir(tmp_path)
    for extra in ([], ["--launcher", "deepspeed"], ["--grid", "optim.lr=1e-3,2e-3"]):
        out = ftl(capsys, "slurm", "--gpus-per-node", 2, "--set", "run.name=sc", *extra)
        rendered.append(tmp_path / f"rendered-{len(rendered)}.sbatch")
        rendered[-1].write_text(out)
    assert len(SCRIPTS) >= 6, SCRIPTS
    proc = subprocess.run(["shellcheck", "--shell=bash", *map(str, SCRIPTS), *map(str, rendered)],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
