"""What `ftl launch` runs (and prints with --dry-run), and how it runs it.

One `LaunchPlan` describes the processes of one node: the launcher (torchrun or the deepspeed
launcher), ranks per node, and for several nodes how they meet. `plan.command()` is the launcher's
command line; `run(plan)` starts it with two things cluster jobs need and the stock launchers lack:

* A preemption signal (SIGUSR1, as SLURM sends with `--signal`, or SIGTERM) reaches every rank, and
  the launcher waits while the ranks save a checkpoint instead of dying first. Plain torchrun is
  killed by SIGUSR1, and on SIGTERM gives its ranks 30 s before SIGKILL; the deepspeed launcher is
  killed by SIGUSR1. Under `srun` SLURM signals every process of the step, launchers included.
* The ranks' EXIT_PREEMPTED (75: "checkpoint saved, requeue me") becomes the launcher's exit code, so
  job scripts can requeue. Plain torchrun turns any rank failure into 1, and with --max-restarts would
  restart ranks that asked to stop.
* Ctrl-C (torchrun): torchrun starts its ranks in sessions of their own, so a terminal's SIGINT reaches
  only the launcher, which passes each one on: the first makes the ranks save and exit 130, which
  becomes the launcher's exit code; the second makes them stop at once.

torchrun: its own argument parser and elastic agent run inside this process (`torch.distributed.run`
with exactly the printed arguments). deepspeed: `python -m deepspeed.launcher.runner` runs as a child
with SIGUSR1 ignored (inherited by its own launcher process; the ranks install their own handler).
"""

from __future__ import annotations

import hashlib
import os
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from engine.errors import EXIT_INTERRUPTED, EXIT_PREEMPTED

LAUNCHERS = ("torchrun", "deepspeed")
# Signals that mean "save a checkpoint and stop" to the engine's ranks (and to SLURM job scripts).
FORWARDED = (signal.SIGUSR1, signal.SIGTERM)
# In the printed torchrun command, so that a copy run as plain torchrun also passes SIGUSR1 on and gives
# the ranks 300 s to save before SIGKILL (torch >= 2.8). `ftl launch` itself handles SIGTERM/SIGUSR1
# without shutting down (run_torchrun); the timeout still bounds its stop after Ctrl-C or a failure.
FORWARDED_SIGNALS = "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1"
SHUTDOWN_TIMEOUT_S = 300


def default_nproc() -> int:
    """All local GPUs, or one process on a CPU machine."""
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 1


def available_cpus() -> int:
    """CPUs this process may run on (the SLURM/cgroup allocation where the OS exposes it)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def split_endpoint(endpoint: str) -> tuple[str, int]:
    host, sep, port = endpoint.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(endpoint)
    return host.strip("[]"), int(port)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def read_hostfile(path: str) -> list[tuple[str, int]]:
    """(host, slots) per line of a DeepSpeed hostfile (`host slots=N`, `#` comments)."""
    hosts = []
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split()
        if len(parts) != 2 or not parts[1].startswith("slots=") or not parts[1][6:].isdigit() or int(parts[1][6:]) < 1:
            raise ValueError(f"{path}:{n}: expected 'hostname slots=N', got {line!r}")
        hosts.append((parts[0], int(parts[1][6:])))
    if not hosts:
        raise ValueError(f"{path}: no hosts")
    return hosts


@dataclass
class LaunchPlan:
    """The processes of one node. `train_args` are the arguments of `ftl train` (CONFIG, --set ...)."""

    train_args: list[str]
    nproc_per_node: int | None = None  # None: all local GPUs or 1 (deepspeed with --hostfile: its slots)
    launcher: str = "torchrun"
    nnodes: int | None = None  # None: 1, or the number of hosts in --hosts/--hostfile
    node_rank: int | None = None  # deepspeed: this node's line in the hostfile (torchrun's c10d numbers nodes itself)
    rdzv_endpoint: str | None = None  # HOST:PORT on the first node; deepspeed: MASTER_ADDR:MASTER_PORT
    rdzv_id: str | None = None
    max_restarts: int = 0
    hosts: list[str] = field(default_factory=list)  # deepspeed: node names for a generated hostfile
    hostfile: str | None = None  # deepspeed: an existing hostfile
    python: str = sys.executable

    # ------------------------------------------------------------------------------------ checks
    def problems(self) -> list[str]:
        p: list[str] = []
        if self.launcher not in LAUNCHERS:
            p.append(f"--launcher must be one of {', '.join(LAUNCHERS)} (got {self.launcher!r})")
        if self.rdzv_endpoint is not None:
            try:
                split_endpoint(self.rdzv_endpoint)
            except ValueError:
                p.append(f"--rdzv-endpoint must look like HOST:PORT, e.g. node001:29500 (got {self.rdzv_endpoint!r})")
        if self.launcher == "torchrun":
            if self.hosts or self.hostfile:
                p.append("--hosts/--hostfile are for --launcher deepspeed; torchrun needs --nnodes and --rdzv-endpoint")
            if (self.nnodes or 1) > 1 and not self.rdzv_endpoint:
                p.append("--nnodes > 1 needs --rdzv-endpoint HOST:PORT (an address of the first node, the same on every node)")
            return p
        if self.max_restarts:
            p.append("--max-restarts is a torchrun feature; the deepspeed launcher does not restart ranks")
        if self.rdzv_id:
            p.append("--rdzv-id is a torchrun option (deepspeed needs only --rdzv-endpoint)")
        visible = _visible_gpus()
        if self.mode == "local" and visible and self.nproc_per_node and self.nproc_per_node > len(visible):
            p.append(f"--nproc-per-node {self.nproc} but CUDA_VISIBLE_DEVICES lists {len(visible)} GPUs")
        if self.hosts and self.hostfile:
            p.append("give either --hosts or --hostfile, not both")
        if self.hostfile:
            try:
                lines = read_hostfile(self.hostfile)
            except OSError as e:
                p.append(f"--hostfile {self.hostfile}: {e.strerror or e}")
                return p
            except ValueError as e:
                p.append(f"--hostfile {e}")
                return p
            if self.nproc_per_node is not None:
                p.append("--nproc-per-node and --hostfile: the hostfile's slots= set the processes per node; drop one")
            n_hosts = len(lines)
        else:
            n_hosts = len(self.hosts) or (self.nnodes or 1)
        if self.nnodes is not None and n_hosts != self.nnodes and (self.hosts or self.hostfile):
            p.append(f"--nnodes {self.nnodes} but {n_hosts} hosts were given")
        if self.node_rank is not None and not 0 <= self.node_rank < n_hosts:
            p.append(f"--node-rank {self.node_rank} is outside 0..{n_hosts - 1}")
        if self.per_node and not self.rdzv_endpoint:
            p.append("deepspeed on several nodes without ssh needs --rdzv-endpoint HOST:PORT "
                     "(MASTER_ADDR:MASTER_PORT: the first node's address, the same on every node)")
        if self.mode == "ssh" and not (self.hosts or self.hostfile):
            p.append("deepspeed on several nodes needs --node-rank on each node (launch on every node, no ssh), "
                     "or --hosts/--hostfile (this node starts the others over ssh)")
        return p

    # ------------------------------------------------------------------------------------ shape
    @property
    def mode(self) -> str:
        """torchrun | local (deepspeed, one node) | per-node (deepspeed --no_ssh) | ssh (deepspeed starts all nodes)."""
        if self.launcher == "torchrun":
            return "torchrun"
        if not (self.hosts or self.hostfile) and (self.nnodes or 1) == 1:
            return "local"
        return "per-node" if self.node_rank is not None else "ssh"

    @property
    def per_node(self) -> bool:
        return self.mode == "per-node"

    @property
    def nproc(self) -> int:
        return self.nproc_per_node if self.nproc_per_node is not None else default_nproc()

    def hostfile_text(self) -> str | None:
        """The hostfile to generate (None when the user gave one, or one node needs none)."""
        if self.launcher != "deepspeed" or self.hostfile or self.mode == "local":
            return None
        hosts = self.hosts or [f"node{i}" for i in range(self.nnodes or 1)]  # names only label lines without ssh
        return "".join(f"{h} slots={self.nproc}\n" for h in hosts)

    def hostfile_path(self) -> str | None:
        if self.hostfile:
            return self.hostfile
        text = self.hostfile_text()
        if text is None:
            return None
        # Named by content: every node (and every dry run) derives the same path, nothing to clean up.
        digest = hashlib.sha256(text.encode()).hexdigest()[:12]
        return os.path.join(tempfile.gettempdir(), f"ftl-hostfile-{digest}")

    def command(self, master_port: int | None = None) -> list[str]:
        if self.launcher == "torchrun":
            return [self.python, "-m", "torch.distributed.run", *self.torchrun_args()]
        return [self.python, "-m", "deepspeed.launcher.runner", *self.deepspeed_args(master_port)]

    def torchrun_args(self) -> list[str]:
        args = [f"--nproc-per-node={self.nproc}"]
        if (self.nnodes or 1) > 1 or self.rdzv_endpoint:
            args += [f"--nnodes={self.nnodes or 1}", "--rdzv-backend=c10d", f"--rdzv-endpoint={self.rdzv_endpoint}"]
            if self.rdzv_id:
                args.append(f"--rdzv-id={self.rdzv_id}")
        else:
            args.append("--standalone")  # a free port: jobs sharing a node cannot collide
        if self.max_restarts:
            args.append(f"--max-restarts={self.max_restarts}")
        return args + preemption_flags() + ["-m", "engine.cli", "train", *self.train_args]

    def deepspeed_args(self, master_port: int | None = None) -> list[str]:
        mode = self.mode
        if self.rdzv_endpoint:
            host, port = split_endpoint(self.rdzv_endpoint)
        elif mode == "local":
            host, port = None, master_port or free_port()  # this node only: any free port
        else:
            host, port = None, 29500  # ssh mode: a port on the first host, deepspeed's default
        if mode == "local":
            # With CUDA_VISIBLE_DEVICES set (SLURM sets it to the job's GPUs) deepspeed uses exactly those,
            # unless --num_gpus is given: then it takes GPUs 0..N-1, on a shared node maybe another job's.
            # So no --num_gpus there; env() narrows the variable to the first N when fewer ranks are asked.
            args = ([] if _visible_gpus() else [f"--num_gpus={self.nproc}"]) + [f"--master_port={port}"]
        else:
            args = [f"--hostfile={self.hostfile_path()}"]
            if mode == "per-node":
                args += ["--no_ssh", f"--node_rank={self.node_rank}"]
            args += [f"--master_addr={host or (self.hosts[0] if self.hosts else read_hostfile(self.hostfile)[0][0])}",
                     f"--master_port={port}"]
        return args + ["--no_local_rank", "--module", "engine.cli", "train", *self.train_args]

    def env(self) -> dict[str, str]:
        """Variables to add to the launcher's environment (never overriding the user's)."""
        add: dict[str, str] = {}
        if "OMP_NUM_THREADS" not in os.environ:
            # Share this node's CPUs between its ranks (torchrun would say 1; the deepspeed launcher nothing).
            add["OMP_NUM_THREADS"] = str(max(1, available_cpus() // max(1, self.nproc)))
        if self.launcher == "torchrun" and self.max_restarts and "TORCH_DISABLE_SHARE_RDZV_TCP_STORE" not in os.environ:
            # With restarts, a rendezvous store shared with the ranks hands restarted ranks the previous
            # attempt's keys, and process-group init hangs or fails (pytorch#135712).
            add["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] = "1"
        if self.launcher == "deepspeed" and "DS_ACCELERATOR" not in os.environ and not _cuda():
            add["DS_ACCELERATOR"] = "cpu"  # else the launcher warns while it counts devices
        visible = _visible_gpus()
        if self.launcher == "deepspeed" and self.mode == "local" and len(visible) > self.nproc:
            add["CUDA_VISIBLE_DEVICES"] = ",".join(visible[:self.nproc])
        return add

    def render(self, master_port: int | None = None) -> str:
        """The dry-run text: a generated hostfile (as a comment) and the command with its added variables."""
        lines = []
        text = self.hostfile_text()
        if text is not None:
            lines.append(f"# hostfile {self.hostfile_path()}:")
            lines += [f"#   {line}" for line in text.splitlines()]
        env = " ".join(f"{k}={shlex.quote(v)}" for k, v in self.env().items())
        lines.append((env + " " if env else "") + shlex.join(self.command(master_port)))
        return "\n".join(lines)


def preemption_flags() -> list[str]:
    """--signals-to-handle/--shutdown-timeout where this torch's torchrun has them."""
    try:
        from torch.distributed.launcher.api import LaunchConfig
    except ImportError:
        return []
    fields = getattr(LaunchConfig, "__dataclass_fields__", {})
    flags = [f"--signals-to-handle={FORWARDED_SIGNALS}"] if "signals_to_handle" in fields else []
    return flags + ([f"--shutdown-timeout={SHUTDOWN_TIMEOUT_S}"] if "shutdown_timeout" in fields else [])


def _visible_gpus() -> list[str]:
    return [d for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


# ------------------------------------------------------------------------------------------- run

def run(plan: LaunchPlan, log=None) -> int:
    """Start the plan's launcher on this node and return the exit code for the job."""
    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    port = None if plan.launcher == "torchrun" or plan.rdzv_endpoint else free_port()
    text = plan.hostfile_text()
    if text is not None:
        path = Path(plan.hostfile_path())
        tmp = path.with_name(f"{path.name}.{os.getpid()}")
        tmp.write_text(text)
        os.replace(tmp, path)
    os.environ.update(plan.env())
    log("[ftl launch] " + plan.render(port).replace("\n", "\n[ftl launch] "))
    if plan.launcher == "torchrun":
        return run_torchrun(plan.torchrun_args())
    return supervise(plan.command(port), shield=(signal.SIGUSR1,))


class _Relay:
    """Handlers that pass SIGUSR1/SIGTERM on to every process this one started, and keep this one
    alive while the ranks save and exit.

    Inside an srun step SLURM already delivers the signal to every process of the step, so it is not
    passed on again: a second copy arriving while a rank exits (Python resets its handlers at
    shutdown) would kill it by the signal and lose its exit code 75.
    """

    def __init__(self, signals: tuple[int, ...] = FORWARDED) -> None:
        from engine import dist

        self.received: list[int] = []
        self.relay = not dist.in_slurm_step()
        self.previous = {s: signal.signal(s, self._handle) for s in signals}

    def _handle(self, signum, frame) -> None:
        self.received.append(signum)
        if not self.relay:
            return
        import psutil

        try:
            children = psutil.Process().children(recursive=True)
        except psutil.Error:
            return
        for child in children:
            try:
                child.send_signal(signum)
            except psutil.Error:
                pass

    def restore(self) -> None:
        for s, h in self.previous.items():
            signal.signal(s, h)


def preempted_exit_code(exitcodes: list[int]) -> int | None:
    """75 when the ranks stopped to be requeued: some exited 75 and none failed on its own
    (the others may have been stopped by the launcher: negative codes). 130 the same way for Ctrl-C."""
    for code in (EXIT_PREEMPTED, EXIT_INTERRUPTED):
        if code in exitcodes and all(c == code or c <= 0 for c in exitcodes):
            return code
    return None


def run_torchrun(torchrun_args: list[str]) -> int:
    """`torchrun ARGS` in this process, preemption-aware (see the module docstring)."""
    import torch.distributed.launcher.api as launcher_api
    from torch.distributed import run as torch_run
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    args = torch_run.parse_args(torchrun_args)
    # SIGTERM, SIGUSR1 and SIGINT are ours: relayed (outside srun) while the agent keeps waiting, instead of
    # torch's shutdown (forward, wait, SIGKILL, exit 1, and a second signal aborting the wait). A second
    # Ctrl-C is relayed too: the ranks end at once. torch keeps SIGHUP/SIGQUIT.
    args.signals_to_handle = os.environ["TORCHELASTIC_SIGNALS_TO_HANDLE"] = "SIGHUP,SIGQUIT"  # older torch: env
    relay = _Relay((*FORWARDED, signal.SIGINT))
    stock_agent = launcher_api.LocalElasticAgent
    launcher_api.LocalElasticAgent = _preemption_aware(stock_agent)
    try:
        torch_run.run(args)
        return 0
    except ChildFailedError as e:
        code = preempted_exit_code([f.exitcode for f in e.failures.values()])
        if code is not None:
            what = "requeue to resume" if code == EXIT_PREEMPTED else "Ctrl-C: not requeued; run again to resume"
            print(f"[ftl launch] ranks stopped after saving a checkpoint (exit {code}: {what})",
                  file=sys.stderr, flush=True)
            return code
        print(e.format_msg(), file=sys.stderr, flush=True)
        return 1
    finally:
        launcher_api.LocalElasticAgent = stock_agent
        relay.restore()


def _preemption_aware(agent_cls):
    class PreemptionAwareAgent(agent_cls):
        """A rank that exits 75 saved a checkpoint because the job is going away: restarting the
        ranks here (--max-restarts) would only lose the requeue. Same for a failure after a signal, and
        for 130 (a person pressed Ctrl-C)."""

        def _monitor_workers(self, worker_group):
            result = super()._monitor_workers(worker_group)
            if result.is_failed():
                codes = [f.exitcode for f in result.failures.values()]
                if EXIT_PREEMPTED in codes or EXIT_INTERRUPTED in codes:
                    self._remaining_restarts = 0  # the way torch's own agent disables restarts
            return result

    return PreemptionAwareAgent


def supervise(cmd: list[str], shield: tuple[int, ...] = ()) -> int:
    """Run `cmd` as a child with `shield` signals ignored (inherited by everything it starts; the
    ranks install their own handlers), relay SIGUSR1/SIGTERM to all descendants, and wait for every
    descendant before returning, so a rank still saving is not cut off when its launcher dies."""
    _become_subreaper()
    relay = _Relay()
    saved = {s: signal.signal(s, signal.SIG_IGN) for s in shield}
    try:
        child = subprocess.Popen(cmd)  # an ignored signal stays ignored across fork and exec
    finally:
        for s, handler in saved.items():
            signal.signal(s, handler)
    try:
        rc = child.wait()
        _reap_orphans()
    finally:
        relay.restore()
    if rc < 0:
        return 128 - rc
    return rc


def _become_subreaper() -> None:
    """Linux: orphaned descendants are re-parented to this process instead of init, so it can wait for them."""
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER
    except (OSError, AttributeError):
        pass


def _reap_orphans() -> None:
    while True:
        try:
            os.waitpid(-1, 0)
        except ChildProcessError:
            return
        except InterruptedError:
            continue
