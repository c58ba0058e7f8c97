"""A real SLURM cluster (`.ci/slurm_up.sh`: slurmctld + slurmd + munged on localhost, 2 CPUs).

All jobs are submitted at once by `ftl slurm ... --submit` (one module fixture) and run side by side,
one CPU and one rank each:
  A  train.sbatch, uninterrupted, through its multi-node branch (c10d rendezvous on the first node, here
     the only one): runs to COMPLETED and exports final/.
  B  the same job, sent the preemption signal mid-run (`scancel --batch --signal=USR1`, what
     `--signal=B:USR1@N` and preemption deliver): checkpoints, exits 75, is requeued under the same
     job id, resumes, completes with A's losses.
  C  the same job, cancelled mid-run (`scancel`: SIGTERM to every process): the ranks save a checkpoint,
     the script does not requeue, the job ends CANCELLED.
  R  train.sbatch with a stand-in rank (FTL_PYTHON runs a script that saves on USR1 and exits 75): the
     script's own part of preemption (pass USR1 to the step, requeue on 75, append to the log).
  S  sweep.sbatch, an array of 2 trials (micro batch 2 and 4): 2 run directories.
  D  train_deepspeed.sbatch (hostfile from the node list, --no_ssh, --node-rank): the losses of S's
     trial 1, trained the same way through torchrun.
  E  `srun` starting 2 ranks itself, no torchrun (engine.dist reads SLURM_PROCID etc.) on micro batch 2:
     the losses of S's trial 1, the same global batch in one process.
"""

import json
import re
import shlex
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.conftest import check, env_for_subprocess, read_metrics, run_ftl, tiny_overrides, train_losses


def _cluster_problem() -> str | None:
    if shutil.which("sbatch") is None:
        return "sbatch not installed (CI installs SLURM and starts a local cluster with .ci/slurm_up.sh)"
    try:
        ping = subprocess.run(["scontrol", "ping"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"scontrol ping failed ({e}); start the local cluster with .ci/slurm_up.sh"
    if "UP" not in ping.stdout:
        return f"no SLURM controller answers ({ping.stdout.strip() or ping.stderr.strip()}); run .ci/slurm_up.sh"
    return None


PROBLEM = _cluster_problem()
pytestmark = pytest.mark.skipif(PROBLEM is not None, reason=PROBLEM or "")

# Long enough (a few seconds of steps) to be signalled mid-run, small enough for CI.
PREEMPTIBLE = {"model.name": "gpt2-mini", "data.seq_len": 64, "train.micro_batch": 8, "train.max_steps": 60,
               "train.sample_tokens": 0}
TINY = {"train.sample_tokens": 0}  # 6 steps of gpt2-tiny
FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "PREEMPTED", "NODE_FAIL", "OUT_OF_MEMORY", "DEADLINE",
                "BOOT_FAIL"}


def _jobcomp_file() -> Path | None:
    conf = subprocess.run(["scontrol", "show", "config"], capture_output=True, text=True, timeout=30).stdout
    kind = re.search(r"^JobCompType\s*=\s*(\S+)", conf, re.M)
    loc = re.search(r"^JobCompLoc\s*=\s*(\S+)", conf, re.M)
    if kind and kind.group(1) == "jobcomp/filetxt" and loc:
        return Path(loc.group(1))
    return None


JOBCOMP = _jobcomp_file() if PROBLEM is None else None


def finished_runs(**match) -> list[dict]:
    """One dict per finished run (a requeued job has several), oldest first, from the job completion log."""
    if JOBCOMP is None or not JOBCOMP.exists():
        return []
    runs = []
    for line in JOBCOMP.read_text(errors="replace").splitlines():
        rec = dict(kv.split("=", 1) for kv in line.split() if "=" in kv)
        if all(rec.get(k) == str(v) for k, v in match.items()):
            runs.append(rec)
    return runs


def live_states(job_id: str) -> list[str] | None:
    """States of a job (or an array's tasks) while pending/running; [] once gone; None if unknown."""
    p = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%T"], capture_output=True, text=True, timeout=30)
    if p.returncode != 0:
        return [] if "Invalid job id" in p.stderr else None
    return p.stdout.split()


def wait_final(job_id: str, n_finished: int = 1, timeout: float = 300, **match) -> list[dict]:
    """Runs of the job once it has left the queue with `n_finished` terminal records."""
    match = match or {"JobId": job_id}
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if live_states(job_id) == []:
            runs = finished_runs(**match)
            if sum(r.get("JobState") in FINAL_STATES for r in runs) >= n_finished:
                return runs
        time.sleep(0.25)
    show = subprocess.run(["scontrol", "show", "job", job_id], capture_output=True, text=True).stdout
    raise AssertionError(f"job {job_id} not finished after {timeout} s: squeue={live_states(job_id)} "
                         f"runs={finished_runs(**match)}\n{show}")


def submit(tmp_path: Path, name: str, overrides: dict, *options: str, **env) -> tuple[str, Path]:
    run_dir = tmp_path / name
    args = ["slurm", "--gpus-per-node", "0", "--time", "10", "--job-name", f"ftl-test-{name}-{tmp_path.name[-6:]}",
            *options, *tiny_overrides(run_dir, **overrides), "--submit"]
    out = check(run_ftl(args, **env)).stdout
    job_id = re.search(r"submitted job (\d+)", out).group(1)
    return job_id, run_dir


STAND_IN_RANK = """
import os, signal, sys, time
run_dir = [a.split("=", 1)[1] for a in sys.argv if a.startswith("run.dir=")][-1]
restart = os.environ.get("SLURM_RESTART_COUNT", "0")
if restart != "0":
    open(os.path.join(run_dir, "resumed"), "w").write(restart)
    sys.exit(0)
got = []
signal.signal(signal.SIGUSR1, lambda n, f: got.append(n))
open(os.path.join(run_dir, "ready"), "w").close()
end = time.time() + 120
while not got and time.time() < end:
    time.sleep(0.05)
time.sleep(0.5)  # "saving"
open(os.path.join(run_dir, "saved"), "w").write(str(len(got)))
sys.exit(75 if got else 3)
"""


def stand_in_python(tmp_path: Path) -> Path:
    """An FTL_PYTHON for the job script that runs a stand-in rank instead of `-m engine.cli launch ...`."""
    (tmp_path / "rank.py").write_text(STAND_IN_RANK)
    fake = tmp_path / "python-stand-in"
    fake.write_text(f"#!/bin/sh\nexec {shlex.quote(sys.executable)} {shlex.quote(str(tmp_path / 'rank.py'))} \"$@\"\n")
    fake.chmod(0o755)
    return fake


class Preemptor(threading.Thread):
    """Sends `scancel --batch --signal=USR1` (what --signal=B:USR1@N and preemption deliver; or another
    `scancel` signal) once the job is RUNNING and `ready()` (its ranks train, with their signal handlers
    installed)."""

    def __init__(self, job_id: str, ready, timeout: float = 240, scancel=("--batch", "--signal=USR1")):
        super().__init__(daemon=True)
        self.job_id, self.ready, self.timeout, self.scancel = job_id, ready, timeout, list(scancel)
        self.error: str | None = "not signalled yet"
        self.start()

    def run(self) -> None:
        end = time.monotonic() + self.timeout
        while time.monotonic() < end:
            if self.ready() and live_states(self.job_id) == ["RUNNING"]:
                p = subprocess.run(["scancel", *self.scancel, self.job_id], capture_output=True, text=True,
                                   timeout=30)
                self.error = None if p.returncode == 0 else f"scancel failed: {p.stderr}"
                return
            time.sleep(0.1)
        self.error = f"job {self.job_id} was not ready within {self.timeout} s"

    def outcome(self) -> str | None:
        self.join(self.timeout + 60)
        return self.error


def submit_srun(tmp_path: Path, name: str, overrides: dict) -> tuple[str, Path]:
    """2 tasks on the node, `srun` starting each rank (`ftl train`) itself."""
    run_dir = tmp_path / name
    (run_dir / "slurm").mkdir(parents=True)
    train = [sys.executable, "-m", "engine.cli", "train", "--no-progress", *tiny_overrides(run_dir, **overrides)]
    proc = subprocess.run(["sbatch", "--parsable", "-J", f"ftl-test-{name}-{tmp_path.name[-6:]}", "-n", "2",
                           "--cpus-per-task=1", "--time=10", "-o", str(run_dir / "slurm" / "%x-%j.out"),
                           "--wrap", "srun --kill-on-bad-exit=1 " + shlex.join(train)],
                          capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=60, env=env_for_subprocess())
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip().split(";")[0], run_dir


def log_text(run_dir: Path) -> str:
    return "\n".join(p.read_text(errors="replace") for p in sorted((run_dir / "slurm").glob("*.out")))


@pytest.fixture(scope="module")
def jobs(tmp_path_factory):
    if JOBCOMP is None:
        pytest.skip("this test reads finished jobs from the JobCompType=jobcomp/filetxt log (.ci/slurm_up.sh sets it)")
    tmp = tmp_path_factory.mktemp("slurm")
    submitted = {}
    try:
        submitted["B"] = submit(tmp, "preempted", PREEMPTIBLE)
        # FTL_RDZV_HOST: A takes the script's multi-node torchrun branch (c10d rendezvous, --rdzv-id = job id)
        submitted["A"] = submit(tmp, "uninterrupted", PREEMPTIBLE, FTL_RDZV_HOST="localhost")
        submitted["C"] = submit(tmp, "cancelled", PREEMPTIBLE)
        submitted["R"] = submit(tmp, "standin", TINY, FTL_PYTHON=str(stand_in_python(tmp)))
        submitted["S"] = submit(tmp, "sweep", TINY, "--grid", "train.micro_batch=2,4")
        # FTL_RDZV_HOST: take the multi-node code path (hostfile, --no_ssh, --node-rank) on this one node
        submitted["D"] = submit(tmp, "deepspeed", {**TINY, "train.micro_batch": 4}, "--launcher", "deepspeed",
                                FTL_RDZV_HOST="localhost")
        submitted["E"] = submit_srun(tmp, "srun", {**TINY, "train.micro_batch": 2})
        # Signal B and R as soon as they are ready, whatever order the tests run in.
        b_dir, c_dir, r_dir = submitted["B"][1], submitted["C"][1], submitted["R"][1]
        submitted["preempt"] = {"B": Preemptor(submitted["B"][0], lambda: _training(b_dir, min_step=2)),
                                "C": Preemptor(submitted["C"][0], lambda: _training(c_dir, min_step=2), scancel=()),
                                "R": Preemptor(submitted["R"][0], lambda: (r_dir / "ready").exists())}
        yield submitted
    finally:
        ids = [v[0] for k, v in submitted.items() if k != "preempt"]
        if ids:
            subprocess.run(["scancel", *ids], capture_output=True, timeout=60)


def test_preempted_job_checkpoints_requeues_and_matches_the_uninterrupted_one(jobs):
    job_id, run_dir = jobs["B"]
    assert jobs["preempt"]["B"].outcome() is None, (jobs["preempt"]["B"].outcome(), log_text(run_dir))
    runs = wait_final(job_id)
    log = log_text(run_dir)
    states = [r["JobState"] for r in runs]
    # first run: requeued by the job script itself (the cluster sets no RequeueExit); then COMPLETED
    assert len(runs) == 2 and states[0] in ("PENDING", "FAILED") and states[1] == "COMPLETED", (states, log)
    assert "step exit 75: requeueing" in log and "(restart 1)" in log, log
    assert "scontrol requeue failed" not in log, log
    resumed = re.search(r"resumed from \S+ at step (\d+)", log)
    assert resumed and 2 <= int(resumed.group(1)) < PREEMPTIBLE["train.max_steps"], log
    assert (run_dir / "final" / "model.safetensors").is_file()

    _, reference = jobs["A"]
    wait_final(jobs["A"][0])
    assert _losses_by_step(run_dir) == pytest.approx(_losses_by_step(reference), rel=1e-6)


def test_job_script_passes_usr1_to_the_step_and_requeues_on_exit_75(jobs):
    job_id, run_dir = jobs["R"]
    assert jobs["preempt"]["R"].outcome() is None, (jobs["preempt"]["R"].outcome(), log_text(run_dir))
    runs = wait_final(job_id)
    log = log_text(run_dir)
    assert [r["JobState"] for r in runs][1:] == ["COMPLETED"] and runs[0]["JobState"] in ("PENDING", "FAILED"), log
    assert (run_dir / "saved").read_text() == "1"  # the rank got USR1 exactly once
    assert (run_dir / "resumed").read_text() == "1"  # the requeued run: same job id, SLURM_RESTART_COUNT=1
    assert "scontrol requeue failed" not in log, log
    first, second = log.index("SIGUSR1: the ranks save"), log.index("start (restart 1)")
    assert first < log.index("step exit 75: requeueing") < second  # one log, appended across runs
    assert log.rstrip().endswith("step exit 0")


def test_cancelled_job_saves_a_checkpoint_and_is_not_requeued(jobs):
    from engine import checkpoint

    job_id, run_dir = jobs["C"]
    assert jobs["preempt"]["C"].outcome() is None, (jobs["preempt"]["C"].outcome(), log_text(run_dir))
    runs = wait_final(job_id)
    log = log_text(run_dir)
    assert [r["JobState"] for r in runs] == ["CANCELLED"], log
    assert "after SIGTERM (scancel, time limit or SLURM's requeue): not requeueing" in log, log
    assert "requeueing to resume" not in log and "(restart" not in log, log
    saved = checkpoint.find_latest(run_dir / "checkpoints")  # the ranks saved within KillWait
    assert saved is not None and 2 <= checkpoint.read_state(saved)["step"] < PREEMPTIBLE["train.max_steps"], log
    assert not (run_dir / "final").exists()


def test_job_runs_to_completed_and_exports_final(jobs):
    job_id, run_dir = jobs["A"]
    runs = wait_final(job_id)
    log = log_text(run_dir)
    assert [r["JobState"] for r in runs] == ["COMPLETED"], log
    assert (run_dir / "slurm" / f"{runs[0]['Name']}-{job_id}.out").is_file()  # log per job id, in the run
    assert "(restart" not in log and "step exit 0" in log
    port = 20000 + int(job_id) % 12000  # the script's port rule (= engine.dist.slurm_port)
    assert f"--nnodes=1 --rdzv-backend=c10d --rdzv-endpoint=localhost:{port} --rdzv-id={job_id}" in log, log
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(run_dir / "final")
    assert model.config.n_layer == 4  # gpt2-mini, trained and exported by the job
    assert len(train_losses(run_dir)) == PREEMPTIBLE["train.max_steps"]


def test_deepspeed_template_trains_the_same(jobs):
    job_id, run_dir = jobs["D"]
    runs = wait_final(job_id)
    log = log_text(run_dir)
    assert [r["JobState"] for r in runs] == ["COMPLETED"], log
    assert "deepspeed.launcher.runner --hostfile=" in log and "--no_ssh --node_rank=0" in log, log
    assert "localhost slots=1" in log  # hostfile generated from the job's node list
    assert train_losses(run_dir) == train_losses(_trial_1(jobs))  # one process, same config: bitwise


def test_array_job_trains_each_trial_in_its_own_run_directory(jobs):
    array_id, sweep_dir = jobs["S"]
    runs = wait_final(array_id, n_finished=2, ArrayJobId=array_id)
    assert sorted((r["ArrayTaskId"], r["JobState"]) for r in runs) == [("0", "COMPLETED"), ("1", "COMPLETED")], \
        log_text(sweep_dir)
    for task, micro in ((0, 2), (1, 4)):
        trial = sweep_dir / f"trial-{task:03d}"
        assert (trial / "final" / "model.safetensors").is_file(), log_text(sweep_dir)
        assert f"micro_batch: {micro}" in (trial / "config.yaml").read_text()
        assert len(train_losses(trial)) == 6
        assert (sweep_dir / "slurm" / f"{runs[0]['Name']}-{array_id}_{task}.out").is_file()
    assert (sweep_dir / "grid.txt").read_text() == "train.micro_batch=2\ntrain.micro_batch=4\n"


def test_srun_without_torchrun_trains_two_ranks(jobs):
    job_id, run_dir = jobs["E"]
    runs = wait_final(job_id)
    log = log_text(run_dir)
    assert [r["JobState"] for r in runs] == ["COMPLETED"], log
    assert "backend ddp x2" in log and "global batch 4 = 2 ranks x 2 x 1 accum" in log, log
    # 2 ranks x micro batch 2 vs one process x micro batch 4: the same global batch
    assert train_losses(run_dir) == pytest.approx(train_losses(_trial_1(jobs)), rel=1e-5)


def _trial_1(jobs) -> Path:
    array_id, sweep_dir = jobs["S"]
    runs = wait_final(array_id, n_finished=2, ArrayJobId=array_id)
    assert all(r["JobState"] == "COMPLETED" for r in runs), log_text(sweep_dir)
    return sweep_dir / "trial-001"


def _training(run_dir: Path, min_step: int) -> bool:
    try:
        return any(r.get("step", 0) >= min_step and "loss" in r for r in read_metrics(run_dir))
    except (FileNotFoundError, json.JSONDecodeError):
        return False


def _losses_by_step(run_dir: Path) -> list[float]:
    by_step = {r["step"]: r["loss"] for r in read_metrics(run_dir) if "loss" in r}  # a resumed step: the last
    return [by_step[s] for s in sorted(by_step)]
