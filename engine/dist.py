"""Where this process sits in the job, and the process group.

This is the only module that reads launcher variables: torchrun and the deepspeed launcher set
RANK/LOCAL_RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT (torchrun adds LOCAL_WORLD_SIZE, the deepspeed
launcher LOCAL_SIZE and CROSS_RANK/CROSS_SIZE); `srun` without torchrun sets SLURM_PROCID,
SLURM_LOCALID, SLURM_NTASKS and the node list, from which the rendezvous address is derived.
Everything else asks `DistEnv` (or the small helpers below) instead of the environment.
"""

from __future__ import annotations

import datetime
import gc
import os
import re
import subprocess
from dataclasses import dataclass

import torch
import torch.distributed as torch_dist


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    local_world_size: int = 1
    device: torch.device = torch.device("cpu")
    backend: str = "none"  # nccl | gloo | none (a single process without a process group)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.backend != "none"


def launcher_env() -> dict[str, int | str]:
    """Rank layout from the launcher's variables; a plain `python`/`ftl train` is rank 0 of 1."""
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        deepspeed_launcher = "LOCAL_SIZE" in env and "LOCAL_WORLD_SIZE" not in env
        return {
            "rank": int(env["RANK"]),
            "world_size": int(env["WORLD_SIZE"]),
            "local_rank": int(env.get("LOCAL_RANK", 0)),
            "local_world_size": int(env.get("LOCAL_WORLD_SIZE") or env.get("LOCAL_SIZE") or env["WORLD_SIZE"]),
            "launcher": "deepspeed" if deepspeed_launcher else "torchrun",
        }
    layout = slurm_step_layout(env)
    if layout is not None:
        # srun started every rank itself (no torchrun agent): the rendezvous is the step's first node.
        env.setdefault("MASTER_ADDR", layout.pop("master_addr"))
        env.setdefault("MASTER_PORT", str(slurm_port(env.get("SLURM_JOB_ID", "0"))))
        return layout
    return {"rank": 0, "world_size": 1, "local_rank": 0, "local_world_size": 1, "launcher": "none"}


def restart_count() -> int:
    """How many times torchrun (`--max-restarts`) has restarted this job's workers; 0 on the first attempt."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)


def job_ids() -> dict[str, str]:
    """Who this process is in its scheduler (for the run lock's note and the resume hint): the SLURM job
    id and requeue count, torchrun's restart count, where set."""
    names = {"slurm_job_id": "SLURM_JOB_ID", "slurm_restart_count": "SLURM_RESTART_COUNT",
             "torchelastic_restart_count": "TORCHELASTIC_RESTART_COUNT"}
    return {key: os.environ[var] for key, var in names.items() if os.environ.get(var)}


def elastic_store_problem() -> str | None:
    """A known torchrun trap: with `--max-restarts` and the c10d rendezvous store shared with the workers
    (the default since torch 2.5), restarted workers can read the previous attempt's keys and hang or
    fail in process-group init (pytorch#135712). The agent must be started with the variable below."""
    env = os.environ
    if env.get("TORCHELASTIC_USE_AGENT_STORE") == "True" and int(env.get("TORCHELASTIC_MAX_RESTARTS", "0") or 0) > 0:
        return ("torchrun --max-restarts shares its rendezvous store with the workers, so a restarted job can "
                "hang in process-group init (pytorch#135712); start torchrun with "
                "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 in its environment (`ftl launch` does)")
    return None


def slurm_step_layout(env) -> dict | None:
    """Ranks of an `srun` step with more than one task (None otherwise, e.g. in the batch script).

    Variables as srun sets them (slurm 22.05, measured): SLURM_STEP_ID only inside a step;
    SLURM_STEP_NUM_TASKS / SLURM_NTASKS the step's task count; SLURM_PROCID, SLURM_LOCALID, SLURM_NODEID;
    SLURM_STEP_TASKS_PER_NODE like `2(x3),1` (SLURM_NTASKS_PER_NODE only exists with --ntasks-per-node);
    SLURM_STEP_NODELIST like `node[01-04]`.
    """
    if "SLURM_PROCID" not in env or "SLURM_STEP_ID" not in env:
        return None
    ntasks = int(env.get("SLURM_STEP_NUM_TASKS") or env.get("SLURM_NTASKS") or 1)
    if ntasks <= 1:
        return None
    nodes = slurm_hostnames(env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST", "localhost"))
    per_node = tasks_per_node(env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE") or "")
    node_id = int(env.get("SLURM_NODEID", 0))
    local_world = per_node[node_id] if node_id < len(per_node) else max(1, ntasks // max(1, len(nodes)))
    return {
        "rank": int(env["SLURM_PROCID"]),
        "world_size": ntasks,
        "local_rank": int(env.get("SLURM_LOCALID", 0)),
        "local_world_size": local_world,
        "launcher": "srun",
        "master_addr": nodes[0],
    }


def in_slurm_step() -> bool:
    """Inside an `srun` step: SLURM itself signals every process of the step (scancel, --signal, srun
    forwarding), so launchers must not pass signals on a second time."""
    return "SLURM_STEP_ID" in os.environ and "SLURM_JOB_ID" in os.environ


def tasks_per_node(spec: str) -> list[int]:
    """Expand SLURM's tasks-per-node notation: `2(x3),1` -> [2, 2, 2, 1]."""
    out: list[int] = []
    for part in filter(None, spec.split(",")):
        m = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", part.strip())
        if not m:
            return []
        out += [int(m.group(1))] * int(m.group(2) or 1)
    return out


def slurm_hostnames(nodelist: str) -> list[str]:
    """Expand a SLURM node list (`node[01-03],gpu7`); scontrol when present, else a small parser."""
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, timeout=10)
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.split()
    except (OSError, subprocess.TimeoutExpired):
        pass
    hosts: list[str] = []
    for part in re.findall(r"[^,\[]+(?:\[[^\]]*\])?", nodelist):
        m = re.fullmatch(r"(.*)\[(.*)\]", part)
        if not m:
            hosts.append(part)
            continue
        prefix, ranges = m.groups()
        for r in ranges.split(","):
            lo, _, hi = r.partition("-")
            for i in range(int(lo), int(hi or lo) + 1):
                hosts.append(f"{prefix}{str(i).zfill(len(lo))}")
    return hosts or ["localhost"]


def slurm_port(job_id: str | int) -> int:
    """A rendezvous port derived from the job id: jobs sharing a node get different ports, and a
    requeued job (same id) the same one. 20000-31999 stays below Linux's ephemeral ports (32768+).
    launch/slurm/*.sbatch compute the same number in bash: $(( 20000 + SLURM_JOB_ID % 12000 ))."""
    return 20000 + int(re.sub(r"\D", "", str(job_id)) or 0) % 12000


def init(device: str = "auto", timeout_s: int = 1800) -> DistEnv:
    """Join the process group the launcher prepared (nccl on GPU, gloo on CPU) and pick the device."""
    layout = launcher_env()
    use_cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
    if use_cuda:
        dev = torch.device("cuda", cuda_device_index(layout))
        torch.cuda.set_device(dev)
    else:
        dev = torch.device("cpu")
    if layout["world_size"] == 1 and not torch_dist.is_initialized():
        return DistEnv(device=dev)
    backend = "nccl" if use_cuda else "gloo"
    if not torch_dist.is_initialized():
        torch_dist.init_process_group(
            backend=backend,
            rank=int(layout["rank"]),
            world_size=int(layout["world_size"]),
            timeout=datetime.timedelta(seconds=timeout_s),
            device_id=dev if use_cuda else None,
        )
    return DistEnv(
        rank=torch_dist.get_rank(),
        local_rank=int(layout["local_rank"]),
        world_size=torch_dist.get_world_size(),
        local_world_size=int(layout["local_world_size"]),
        device=dev,
        backend=torch_dist.get_backend(),
    )


def cuda_device_index(layout: dict) -> int:
    """This rank's GPU: its local rank among the visible GPUs.

    Two ranks on one GPU fail much later inside NCCL ("Duplicate GPU detected"), so more local ranks than
    visible GPUs is refused here (exit 2, before anything is written). torchrun and the deepspeed launcher
    show every rank of a node the same GPUs; only `srun` with one GPU bound per task (--gpus-per-task=1,
    each task seeing its own GPU as device 0) legitimately has fewer visible GPUs than local ranks."""
    from engine.errors import UsageError

    visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
    local_rank, local_world = int(layout["local_rank"]), int(layout["local_world_size"])
    shown = os.environ.get("CUDA_VISIBLE_DEVICES")
    where = f" (CUDA_VISIBLE_DEVICES={shown!r})" if shown is not None else ""
    if visible == 0:
        raise UsageError(f"train.device=cuda but this process sees no CUDA GPU{where}; use train.device=cpu "
                         f"(or auto) on a machine without one")
    if layout.get("launcher") == "srun" and visible == 1:
        return 0  # SLURM bound one GPU to this task
    if local_rank >= visible or local_world > visible:
        raise UsageError(f"{local_world} ranks on this node but only {visible} visible GPU"
                         f"{'s' if visible != 1 else ''}{where}: each rank needs a GPU of its own (two ranks on one "
                         f"GPU fail in NCCL with 'Duplicate GPU detected'); start at most {visible} per node "
                         f"(ftl launch --nproc-per-node {visible}) or use train.device=cpu")
    return local_rank


def init_single_process_group(device: torch.device) -> None:
    """A process group of one, for libraries that need one even in a single process (DeepSpeed).
    An in-memory store: no address, no port, nothing another job could collide with."""
    if torch_dist.is_initialized():
        return
    os.environ.setdefault("LOCAL_RANK", "0")  # what a launcher would have set; DeepSpeed insists on it
    torch_dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo", store=torch_dist.HashStore(),
                                  rank=0, world_size=1, device_id=device if device.type == "cuda" else None)


def set_timeout(seconds: float) -> bool:
    """Change the collective timeout of EVERY process group this rank belongs to from now on (gloo and nccl
    alike): the default group and the ones libraries create (DeepSpeed's data-parallel groups would otherwise
    keep their own 30 minutes, past the hang watchdog).

    False where this torch has no way to (the start-up timeout then stays in force)."""
    if not torch_dist.is_initialized():
        return False
    try:
        from torch.distributed.distributed_c10d import _set_pg_timeout, _world
    except ImportError:
        return False
    timeout = datetime.timedelta(seconds=seconds)
    done = False
    for group in list(_world.pg_map):
        try:
            _set_pg_timeout(timeout, group)
            done = True
        except (AttributeError, RuntimeError, ValueError, AssertionError):  # a group this rank is not in
            continue
    return done


def group_timeouts() -> list[float]:
    """The collective timeout (seconds) of every process group this rank belongs to, for tests and reports."""
    from torch.distributed.distributed_c10d import _world

    out = []
    for group in list(_world.pg_map):
        for device in (torch.device("cpu"), torch.device("cuda")):
            try:
                backend = group._get_backend(device)
            except RuntimeError:
                continue
            timeout = getattr(getattr(backend, "options", None), "_timeout", None)
            if timeout is not None:
                out.append(timeout.total_seconds())
                break
    return out


def shutdown() -> None:
    # Free finished collectives and wrappers that still hold the group while the interpreter is whole: a gloo
    # worker thread that drops the last reference to a Python-owned tensor during interpreter shutdown cannot
    # take the GIL and aborts the process ("terminate called without an active exception") after a good run.
    gc.collect()
    if torch_dist.is_initialized():
        torch_dist.destroy_process_group()
    gc.collect()


def rank() -> int:
    return torch_dist.get_rank() if torch_dist.is_initialized() else 0


def world_size() -> int:
    return torch_dist.get_world_size() if torch_dist.is_initialized() else 1


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if torch_dist.is_initialized():
        torch_dist.barrier()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """In-place sum over ranks (a no-op for one process). Stays on device: no host sync."""
    if torch_dist.is_initialized():
        torch_dist.all_reduce(t, op=torch_dist.ReduceOp.SUM)
    return t


def all_reduce_sum_async(t: torch.Tensor):
    """Start an in-place sum over ranks; returns the work handle (None for one process). Its `.wait()`
    blocks the host on gloo and only the current CUDA stream on nccl."""
    if torch_dist.is_initialized():
        return torch_dist.all_reduce(t, op=torch_dist.ReduceOp.SUM, async_op=True)
    return None


def all_reduce_max(t: torch.Tensor) -> torch.Tensor:
    if torch_dist.is_initialized():
        torch_dist.all_reduce(t, op=torch_dist.ReduceOp.MAX)
    return t


def broadcast_object(obj=None, src: int = 0):
    """Rank `src`'s Python object on every rank."""
    if not torch_dist.is_initialized():
        return obj
    box = [obj]
    torch_dist.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_object(obj) -> list:
    """Every rank's `obj`, in rank order, on every rank."""
    if not torch_dist.is_initialized():
        return [obj]
    gathered: list = [None] * world_size()
    torch_dist.all_gather_object(gathered, obj)
    return gathered


def agree_on_error(message: str | None) -> str | None:
    """Every rank learns whether any rank failed a step that all must take together (invariant 4).

    Call it after work that can fail on one rank only (reading data, building the model): each rank
    passes its error or None, and all get the first error back, so they raise together instead of
    leaving the others waiting in the next collective.
    """
    if not torch_dist.is_initialized():
        return message
    gathered: list = [None] * world_size()
    torch_dist.all_gather_object(gathered, message)
    return next((m for m in gathered if m), None)
