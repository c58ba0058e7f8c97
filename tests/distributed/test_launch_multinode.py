"""Multi-node launching for real on one machine, and the launcher's signal handling.

Two "nodes" are two `ftl launch` processes with --nnodes 2 meeting on loopback (torchrun agents with a
c10d rendezvous; deepspeed launchers each taking its line of a generated hostfile, no ssh). Their
losses and final weights must equal a single process trained on the same global batch.
The signal tests use a stand-in rank (a script that saves on SIGUSR1 and exits 75, as the engine's
ranks do) to check what the launchers add: the signal reaches the ranks, the launcher waits for them,
exit 75 comes out, and torchrun does not restart ranks that asked to stop (but still restarts crashes).
"""

import signal
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import pytest
from safetensors.torch import load_file

from tests.conftest import check, env_for_subprocess, free_port, tiny_config, tiny_overrides, train_losses

LOSS_RTOL = 1e-5  # fp32 on CPU: world 2 x micro 2 and world 1 x micro 4 differ only in summation order
WEIGHT_ATOL = 1e-6
# optim.eps=1e-6 as in the grad-accumulation test: with 1e-8 Adam turns the ~1e-10 summation noise of
# mathematically-zero gradients (the attention key bias) into full +-lr updates.
COMMON = {"train.sample_tokens": 0, "optim.eps": 1e-6}


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """One process, micro batch 4: the same global batch as 2 nodes x 1 rank x micro 2."""
    from engine.trainer import Trainer

    run_dir = tmp_path_factory.mktemp("launch") / "single"
    trainer = Trainer(tiny_config(run_dir, **{"train.micro_batch": 4, **COMMON}), progress=False)
    try:
        trainer.train()
    finally:
        trainer.close()
    return run_dir


def two_nodes(run_dir: Path, launcher: str, **extra) -> list[subprocess.CompletedProcess]:
    endpoint = f"127.0.0.1:{free_port()}"
    # a unique rendezvous id: should another job grab the port first, these agents must not join its rendezvous
    rdzv_id = ["--rdzv-id", uuid.uuid4().hex]
    procs = []
    for node in range(2):
        node_args = ["--node-rank", str(node)] if launcher == "deepspeed" else rdzv_id
        cmd = [sys.executable, "-m", "engine.cli", "launch", "--launcher", launcher, "--nnodes", "2",
               "--nproc-per-node", "1", "--rdzv-endpoint", endpoint, *node_args,
               *tiny_overrides(run_dir, **{"train.micro_batch": 2, **COMMON, **extra})]
        procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                      env=env_for_subprocess()))
    out = []
    try:
        for p in procs:
            stdout, _ = p.communicate(timeout=240)
            out.append(subprocess.CompletedProcess(p.args, p.returncode, stdout, ""))
    except subprocess.TimeoutExpired:
        for p in procs:
            _kill_tree(p)
        logs = [p.communicate()[0][-3000:] for p in procs]
        raise AssertionError("two-node run did not finish in 240 s:\n" + "\n----\n".join(logs)) from None
    return out


def _kill_tree(proc: subprocess.Popen) -> None:
    import psutil

    try:
        for child in psutil.Process(proc.pid).children(recursive=True):
            child.kill()
    except psutil.Error:
        pass
    proc.kill()


def assert_same_training(run_dir: Path, reference: Path) -> None:
    ref = train_losses(reference)
    assert len(ref) == 6
    assert train_losses(run_dir) == pytest.approx(ref, rel=LOSS_RTOL)
    w, ref_w = load_file(str(run_dir / "final" / "model.safetensors")), load_file(str(reference / "final" / "model.safetensors"))
    assert w.keys() == ref_w.keys()
    worst = max(float((w[k] - ref_w[k]).abs().max()) for k in w)
    assert worst < WEIGHT_ATOL, f"max weight difference {worst:.3g}"


# The deepspeed launcher runs the DeepSpeed backend here (ZeRO-2: gradients and optimizer state sharded
# across the two "nodes"); torchrun runs DDP. Both must train what one process trains.
BACKENDS = {"torchrun": ("ddp", {}), "deepspeed": ("deepspeed", {"dist.backend": "deepspeed", "dist.zero_stage": 2})}


@pytest.mark.parametrize("launcher", ["torchrun", "deepspeed"])
def test_two_nodes_on_loopback_match_one_process(tmp_path, reference, launcher):
    run_dir = tmp_path / launcher
    backend, extra = BACKENDS[launcher]
    nodes = two_nodes(run_dir, launcher, **extra)
    for p in nodes:
        check(p)
    log0 = nodes[0].stdout
    assert f"backend {backend}" in log0 and "x2 on cpu" in log0 and "global batch 4 = 2 ranks x 2 x 1 accum" in log0
    if launcher == "deepspeed":
        assert "--no_ssh --node_rank=0" in log0 and "--no_ssh --node_rank=1" in nodes[1].stdout
        assert "node0 slots=1" in log0  # the generated hostfile
    else:
        assert "--nnodes=2 --rdzv-backend=c10d" in log0
    assert_same_training(run_dir, reference)


# ------------------------------------------------------------------------------------ signals

STAND_IN_RANK = textwrap.dedent("""
    import os, signal, sys, time
    out, mode = sys.argv[1], sys.argv[2]
    rank, world = os.environ["RANK"], int(os.environ["WORLD_SIZE"])
    got = []
    SIGNALS = {signal.SIGUSR1, signal.SIGTERM, signal.SIGINT}
    for s in SIGNALS:
        signal.signal(s, lambda n, f: got.append(n))
    open(os.path.join(out, f"start-{rank}-{os.getpid()}"), "w").close()
    if mode == "crash":
        sys.exit(3)
    if rank == "1":
        # A rank a busy machine schedules late: signals reach it 1.5 s after they reach rank 0. (Before this,
        # rank 0 could finish and exit while rank 1 had not seen the USR1 yet; torchrun then SIGTERMed rank 1,
        # which recorded that too: the flaky failure of this test on a loaded machine.)
        signal.pthread_sigmask(signal.SIG_BLOCK, SIGNALS)
        time.sleep(1.5)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, SIGNALS)
    end = time.time() + 60
    while not got and time.time() < end:
        time.sleep(0.02)
    if not got:
        sys.exit(0)
    first = got[0]

    def barrier(name):
        # What the engine's ranks have: the stop is agreed in a collective and the save ends in a barrier,
        # so no rank exits (and makes the launcher stop the others) before every rank has saved.
        open(os.path.join(out, f"{name}-{rank}"), "w").close()
        while len([f for f in os.listdir(out) if f.startswith(name + "-")]) < world and time.time() < end:
            time.sleep(0.02)

    barrier("agreed")
    time.sleep(1.0)  # "saving a checkpoint": the launcher must wait for it
    with open(os.path.join(out, f"saved-{rank}-{os.getpid()}"), "w") as f:
        f.write(signal.Signals(first).name)
    barrier("done")
    sys.exit(130 if first == signal.SIGINT else 75)
""")


def start_launcher(tmp_path: Path, code: str, mode: str = "wait") -> subprocess.Popen:
    (tmp_path / "rank.py").write_text(STAND_IN_RANK)
    env = {k: v for k, v in env_for_subprocess().items() if not k.startswith("SLURM_")}  # not inside an srun step
    return subprocess.Popen([sys.executable, "-c", code, str(tmp_path / "rank.py"), str(tmp_path), mode],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)


def wait_for(tmp_path: Path, prefix: str, n: int, proc: subprocess.Popen, timeout: float = 120) -> list[Path]:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        found = sorted(tmp_path.glob(prefix + "-*"))
        if len(found) >= n:
            return found
        assert proc.poll() is None, proc.communicate()[0]
        time.sleep(0.05)
    proc.kill()
    raise AssertionError(f"no {n} {prefix} markers: {proc.communicate()[0]}")


TORCHRUN = ("import sys; from engine.commands.launch import run_torchrun; "
            "sys.exit(run_torchrun(['--nproc-per-node=2', '--standalone', '--max-restarts=1', *sys.argv[1:]]))")
DEEPSPEED = ("import signal, sys; from engine.commands.launch import supervise, free_port; "
             "sys.exit(supervise([sys.executable, '-m', 'deepspeed.launcher.runner', '--num_gpus=2', "
             "f'--master_port={free_port()}', '--no_local_rank', *sys.argv[1:]], shield=(signal.SIGUSR1,)))")


@pytest.mark.parametrize("launcher", ["torchrun", "deepspeed"])
def test_sigusr1_reaches_the_ranks_and_exit_75_comes_out(tmp_path, launcher):
    proc = start_launcher(tmp_path, TORCHRUN if launcher == "torchrun" else DEEPSPEED)
    wait_for(tmp_path, "start", 2, proc)
    proc.send_signal(signal.SIGUSR1)  # to the launcher only: it must pass it on and outlive it
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 75, out
    saved = sorted(tmp_path.glob("saved-*"))
    # both saved, and the first signal each saw was the USR1 (rank 1 saw it late, and still first)
    assert len(saved) == 2 and all(p.read_text() == "SIGUSR1" for p in saved), out
    assert len(list(tmp_path.glob("start-*"))) == 2, "a rank that exits 75 must not be restarted"


def test_ctrl_c_to_ftl_launch_reaches_the_ranks_once_and_exit_130_comes_out(tmp_path):
    """torchrun puts its ranks in sessions of their own, so a terminal's Ctrl-C reaches only the launcher:
    it passes the SIGINT on (once), the ranks save and exit 130, the launcher exits 130, nothing restarts."""
    proc = start_launcher(tmp_path, TORCHRUN)
    wait_for(tmp_path, "start", 2, proc)
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130, out
    saved = sorted(tmp_path.glob("saved-*"))
    assert len(saved) == 2 and all(p.read_text() == "SIGINT" for p in saved), out
    assert len(list(tmp_path.glob("start-*"))) == 2 and "Ctrl-C: not requeued" in out


def test_torchrun_still_restarts_a_crash(tmp_path):
    proc = start_launcher(tmp_path, TORCHRUN, mode="crash")
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 1, out
    assert len(list(tmp_path.glob("start-*"))) == 4, out  # 2 ranks x (first run + 1 restart)
    assert "exitcode  : 3" in out
