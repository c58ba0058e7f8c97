"""Fault tolerance while a run is going: preemption signals, the per-step guard, the hang watchdog,
collective timeouts, and fault injection for tests.

Preemption. SIGTERM and SIGUSR1 (what SLURM sends with `--signal`, what torchrun forwards) only set a
flag. Every step already all-reduces its global target count before the first backward; the flag
rides in that same all-reduce as a second element, so every rank learns at the same step whether ANY
rank was signalled, without an extra collective. The run then saves a checkpoint at that step's end
and stops with exit code 75 (errors.EXIT_PREEMPTED). A second signal only sets the flag again: the
save is never interrupted.

The count all-reduce is asynchronous: it is issued before the first micro-batch's forward and waited for
just before the first backward, which is the first use of the count, so the forward never waits for it.

Ctrl-C. The first SIGINT is handled the same way (its own element of the all-reduce), but the run stops
with exit code 130 and no requeue marker, printing the command that resumes it; a second SIGINT ends the
process at once (a thread watching the signal wake-up pipe, so even a rank blocked in a collective or a
long write goes), exit 130. Before the first step (data preparation, the first evaluation) there is
nothing to save: SIGTERM/SIGUSR1 end the process at once with 75, SIGINT with 130.

Timed saves. checkpoint.every_minutes: rank 0 alone reads its clock at the start of each step, and its
decision is a fourth element of the same all-reduce, so every rank saves at the end of the same step.

Reading a device value back is a host sync. On CPU it costs nothing (the work has already run), so the
guard reads the step's status at its end. On CUDA it reads the PREVIOUS step's status, copied to pinned
memory without blocking and finished long before: a preemption or a non-finite streak is acted on one
step later, and the device never waits for the host. Every rank reads the same step's value at the same
boundary, so they still agree. The last step of a run has no next step: its status is read at once
(`step_ends(..., final=True)`), so a NaN or a signal in the last step is never dropped.

Non-finite guard. A step whose loss or gradient norm is NaN/inf on any rank is skipped on every rank: a
non-finite local loss is turned into NaN gradients (`nan_if_nonfinite`), the backend's own gradient
all-reduce carries them to every rank, so the global gradient norm (identical everywhere) is non-finite
everywhere, and the backend's step leaves weights and optimizer state untouched (`step_unless_nonfinite`).
After `train.max_bad_steps` consecutive skips the run stops with exit code 3.

Hangs. A watchdog thread gives each step `dist.watchdog_s` (the first one, evaluation and checkpoint saves
`dist.timeout_s`); past it, the rank writes every thread's stack to `<run dir>/hang-rank<R>.txt` and exits
with code 4. Collective timeouts are the backstop and must fire AFTER the watchdog, or a stuck NCCL
collective aborts the process with no stack dump and no exit 4: with the watchdog on, every collective
timeout is the watchdog deadline of the same phase plus `WATCHDOG_MARGIN_S` (for steps at least
`dist.step_timeout_s`), and it is set on every process group, DeepSpeed's own included. Without the
watchdog (dist.watchdog_s=0) the timeouts are `dist.timeout_s` until the first step has completed, then
`dist.step_timeout_s`, and `dist.timeout_s` again inside evaluation and checkpoint saves.

Fault injection, for tests and drills only, inert unless the environment variable is set:

    FTL_FAULT_INJECT="kind@step=N,rank=R[,attempt=A][,seconds=S];kind@..."

    crash            the rank kills itself (SIGKILL) as step N starts: a lost process or node
    nan              the rank's loss of step N is NaN
    skip_collective  the rank never enters step N's first collective (it stalls there, ignoring
                     signals), so its peers wait in it: what a rank that skips a collective looks like
                     to the others (gloo would abort on the mismatched NEXT collective; NCCL hangs)
    hang_save        the rank stops inside the save of step N, after writing its files and before the
                     checkpoint is complete (until killed)
    slow_save        the same, but it goes on after S seconds (default 3)
    bad_export       the export check (final/, best/) sees a reloaded model whose logits are off by 1.0 at one
                     position: what a broken export looks like to it
    compile_fail     model.compile's compiler backend raises at the first compiled call (a broken toolchain)

`rank` and `step` default to every rank / step; `attempt` (default 0) is torchrun's restart count, so an
injected crash does not repeat after an elastic restart. Each injection prints `FTL_FAULT <kind> ...`
to stderr as it fires, which tests wait for.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shlex
import signal
import sys
import threading
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import torch

from engine import dist
from engine.errors import (EXIT_HUNG, EXIT_INTERRUPTED, EXIT_PREEMPTED, Diverged, Interrupted, Preempted,
                           StoppedEarly, UsageError)

PREEMPT_SIGNALS = ("SIGTERM", "SIGUSR1")
PREEMPTED_MARKER = "PREEMPTED"  # in the run directory while the latest stop was a preemption (for `ftl launch`)
WATCHDOG_MARGIN_S = 60.0  # a collective times out this long after the watchdog's deadline of the same phase


def collective_timeout(cfg, phase_limit_s: float, step_phase: bool = False) -> float:
    """The collective timeout for a phase whose watchdog deadline is `phase_limit_s` (see the module
    docstring): past the watchdog's deadline, so the watchdog writes the stacks and exits 4 first."""
    d = cfg.dist
    configured = d.step_timeout_s if step_phase else d.timeout_s
    if not d.watchdog_s:
        return float(configured)
    return max(float(configured), float(phase_limit_s) + WATCHDOG_MARGIN_S)


def startup_collective_timeout(cfg) -> float:
    """What the process group is created with (start-up and the first step run under dist.timeout_s)."""
    return collective_timeout(cfg, cfg.dist.timeout_s)


# ------------------------------------------------------------------------------------------- signals

class PreemptionSignals:
    """SIGTERM/SIGUSR1/SIGINT set flags instead of killing the process; `restore()` puts the old handlers back.

    Until `deferred()` is called (the training loop starts) a signal ends the process at once by raising
    StoppedEarly (75, or 130 for SIGINT) where the main thread is: there is nothing to save yet. After
    it, the first signal only sets a flag; a second SIGINT ends the process at once."""

    def __init__(self):
        self.received: str | None = None  # name of the first SIGTERM/SIGUSR1
        self.count = 0
        self.interrupts = 0  # SIGINTs seen by the handler
        self.immediate = True
        self._previous: dict = {}
        self._pipe: tuple[int, int] | None = None
        self._old_wakeup = -1

    def install(self) -> "PreemptionSignals":
        if threading.current_thread() is threading.main_thread():  # Python only delivers signals there
            for name in (*PREEMPT_SIGNALS, "SIGINT"):
                sig = getattr(signal, name, None)
                if sig is not None:
                    self._previous[sig] = signal.signal(sig, self._handle)
            self._watch_second_interrupt()
        return self

    def deferred(self) -> None:
        self.immediate = False

    def _handle(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        self.count += 1
        if name == "SIGINT":
            self.interrupts += 1
            if self.immediate:
                raise StoppedEarly("interrupted (Ctrl-C) before the first step: nothing to save yet", EXIT_INTERRUPTED)
            if self.interrupts == 1:
                os.write(2, b"\nCtrl-C: saving a checkpoint at the end of this step, then exiting "
                            b"(press Ctrl-C again to abort at once, without saving)\n")
            return
        # Nothing else happens here: the save runs at the next step boundary, and a second signal
        # arriving during that save changes nothing.
        self.received = self.received or name
        if self.immediate:
            raise StoppedEarly(f"{name} received before the first step: nothing new to save; exiting with code "
                               f"{EXIT_PREEMPTED} so the job can be requeued", EXIT_PREEMPTED)

    @property
    def interrupted(self) -> bool:
        return self.interrupts > 0

    def _watch_second_interrupt(self) -> None:
        """A second Ctrl-C must work even while the main thread sits in a collective or a long write, where
        Python handlers wait: the C-level handler writes every signal's number to the wake-up pipe at once,
        and this thread ends the process on the second SIGINT it reads there."""
        try:
            r, w = os.pipe()
            os.set_blocking(w, False)
            self._old_wakeup = signal.set_wakeup_fd(w, warn_on_full_buffer=False)
        except (ValueError, OSError):
            return
        self._pipe = (r, w)

        def watch():
            seen = 0
            while True:
                try:
                    data = os.read(r, 64)
                except OSError:
                    data = b""
                if not data:
                    os.close(r)
                    return
                if self.immediate:
                    continue  # before the loop the handler itself ends the process
                seen += data.count(bytes([signal.SIGINT]))
                if seen >= 2:
                    os.write(2, b"aborted: second Ctrl-C, exiting at once without saving\n")
                    os._exit(EXIT_INTERRUPTED)

        threading.Thread(target=watch, name="ftl-ctrl-c", daemon=True).start()
        _WAKEUP_SET[0] = True

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
        if self._pipe is not None:
            try:
                signal.set_wakeup_fd(self._old_wakeup)
            except ValueError:
                pass
            r, w = self._pipe
            self._pipe = None
            _WAKEUP_SET[0] = False
            os.close(w)  # the watcher reads EOF and ends


_WAKEUP_SET = [False]


def _forget_wakeup_in_child() -> None:
    # A process forked from a rank (a data worker) inherits the wake-up pipe: its Ctrl-C would count as ours.
    if _WAKEUP_SET[0]:
        try:
            signal.set_wakeup_fd(-1)
        except ValueError:  # forked from another thread: it runs no Python signal handlers of its own
            pass


os.register_at_fork(after_in_child=_forget_wakeup_in_child)


# ----------------------------------------------------------------------------------- non-finite guard

def nan_if_nonfinite(loss: torch.Tensor) -> torch.Tensor:
    """`loss` unchanged (times exactly 1.0) when finite, else NaN, so that its backward fills the
    gradients with NaN and the backend's gradient all-reduce tells every rank. No host sync."""
    return loss * torch.where(torch.isfinite(loss), 1.0, math.nan)


def step_unless_nonfinite(optimizer: torch.optim.Optimizer, grad_norm: torch.Tensor) -> None:
    """optimizer.step(), unless the global gradient norm is non-finite: then weights and optimizer
    state (moments, step count) stay exactly as they were."""
    with updates_only_if_finite(optimizer, grad_norm):
        optimizer.step()


@contextlib.contextmanager
def updates_only_if_finite(optimizer: torch.optim.Optimizer, grad_norm: torch.Tensor):
    """Inside this block, `optimizer.step()` leaves everything untouched when `grad_norm` is non-finite
    (for steps a library drives, e.g. DeepSpeed's engine.step()).

    Fused Adam/AdamW decide on the device (their `found_inf` input, what GradScaler uses), so the step
    adds no host sync. Other optimizers read the flag back: free on CPU, one sync per step on GPU."""
    bad = (~torch.isfinite(torch.as_tensor(grad_norm))).to(torch.float32)
    if all(g.get("fused") for g in optimizer.param_groups):
        optimizer.found_inf = bad
        try:
            yield
        finally:
            del optimizer.found_inf
    elif bool(bad):
        optimizer.step = lambda *args, **kwargs: None  # an instance attribute shadowing the method
        try:
            yield
        finally:
            del optimizer.step
    else:
        yield


# ------------------------------------------------------------------------------------------ watchdog

def format_stacks(note: str = "") -> str:
    """Every thread's Python stack, named, for a hang report."""
    names = {t.ident: t.name for t in threading.enumerate()}
    me = threading.get_ident()
    parts = [note] if note else []
    for ident, frame in sys._current_frames().items():
        who = "this watchdog" if ident == me else names.get(ident, "unknown")
        parts.append(f"--- thread {who!r} (ident {ident})\n" + "".join(traceback.format_stack(frame)))
    return "\n".join(parts)


class Watchdog:
    """A daemon thread that ends this rank when a step runs past its deadline, after writing every
    thread's stack to `<run dir>/hang-rank<R>.txt`. The loop only assigns a number per step."""

    def __init__(self, run_dir: Path, rank: int, world: int, poll_s: float):
        self.path = Path(run_dir) / f"hang-rank{rank}.txt"
        self.rank, self.world, self.poll_s = rank, world, poll_s
        self._deadline: float | None = None
        self._step, self._limit, self._started = 0, 0.0, 0.0
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._run, name="ftl-watchdog", daemon=True)
        self._thread.start()

    def arm(self, step: int, seconds: float) -> None:
        now = time.monotonic()
        self._step, self._limit, self._started = step, seconds, now
        self._deadline = now + seconds

    def disarm(self) -> None:
        self._deadline = None

    @property
    def armed(self) -> bool:
        return self._deadline is not None

    def close(self) -> None:
        self._deadline = None
        self._closed.set()

    def _run(self) -> None:
        while not self._closed.wait(self.poll_s):
            deadline = self._deadline
            if deadline is not None and time.monotonic() > deadline:
                self._fire()

    def _fire(self) -> None:
        ran = time.monotonic() - self._started
        note = (f"ftl watchdog: rank {self.rank} of {self.world}, step {self._step} ran {ran:.1f} s, past its "
                f"deadline of {self._limit:g} s (dist.watchdog_s / dist.timeout_s).\n"
                f"time: {time.strftime('%Y-%m-%d %H:%M:%S')}, pid {os.getpid()}\n")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)  # a node that does not share the run directory
            self.path.write_text(format_stacks(note), encoding="utf-8")
            where = str(self.path)
        except OSError as e:
            where = f"(could not write {self.path}: {e})"
        print(f"error: rank {self.rank}: step {self._step} exceeded its deadline of {self._limit:g} s; every "
              f"thread's stack is in {where}; exiting with code {EXIT_HUNG}", file=sys.stderr, flush=True)
        os._exit(EXIT_HUNG)  # the main thread is stuck: only a hard exit ends the process


# ------------------------------------------------------------------------------------ fault injection

@dataclass(frozen=True)
class Fault:
    kind: str
    step: int | None = None
    rank: int | None = None
    attempt: int = 0
    seconds: float = 3.0


FAULT_KINDS = ("crash", "nan", "skip_collective", "hang_save", "slow_save", "bad_export", "compile_fail")


def parse_faults(spec: str) -> list[Fault]:
    faults, problems = [], []
    for item in filter(None, (p.strip() for p in spec.split(";"))):
        kind, _, args = item.partition("@")
        if kind not in FAULT_KINDS:
            problems.append(f"FTL_FAULT_INJECT: unknown fault {kind!r} (known: {', '.join(FAULT_KINDS)})")
            continue
        kw: dict = {}
        for arg in filter(None, (a.strip() for a in args.split(","))):
            key, eq, value = arg.partition("=")
            try:
                if not eq or key not in ("step", "rank", "attempt", "seconds"):
                    raise ValueError
                kw[key] = float(value) if key == "seconds" else int(value)
            except ValueError:
                problems.append(f"FTL_FAULT_INJECT: {arg!r} in {item!r} must be step=N, rank=R, attempt=A or seconds=S")
        faults.append(Fault(kind, **kw))
    if problems:
        raise UsageError(problems)
    return faults


_parsed: tuple[str, list[Fault]] = ("", [])


def planned(kind: str, step: int, rank: int) -> Fault | None:
    """The injected fault of `kind` for this step and rank, if FTL_FAULT_INJECT asks for one."""
    global _parsed
    spec = os.environ.get("FTL_FAULT_INJECT", "")
    if not spec:
        return None
    if _parsed[0] != spec:
        _parsed = (spec, parse_faults(spec))
    for f in _parsed[1]:
        if (f.kind == kind and f.step in (None, step) and f.rank in (None, rank)
                and f.attempt == dist.restart_count()):
            return f
    return None


def _announce(kind: str, step: int, rank: int) -> None:
    print(f"FTL_FAULT {kind} rank {rank} step {step}", file=sys.stderr, flush=True)


def _stall() -> None:
    while True:  # a stuck rank: signals only set flags, only the watchdog or SIGKILL ends this
        time.sleep(0.2)


def inject_in_save(step: int, rank: int) -> None:
    """Called by every rank inside a checkpoint save, after its files are written, before COMPLETE."""
    for kind in ("hang_save", "slow_save"):
        f = planned(kind, step, rank)
        if f is not None:
            _announce(kind, step, rank)
            if kind == "hang_save":
                _stall()
            time.sleep(f.seconds)


# ------------------------------------------------------------------------------- the per-run object

class PendingCount:
    """A step's count all-reduce in flight (see the module docstring)."""

    def __init__(self, owner: "FaultTolerance", packed: torch.Tensor, work):
        self._owner, self._packed, self._work = owner, packed, work

    def wait(self) -> torch.Tensor:
        """The global count (on NCCL the compute stream waits for the reduction, not the host)."""
        if self._work is not None:
            self._work.wait()
            self._work = None
        self._owner._agreed = self._packed[1:]
        self._owner._stop = self._packed[1] + self._packed[2]  # preemption signals + Ctrl-Cs
        return self._packed[0]


class FaultTolerance:
    """What the training loop calls at each step boundary (see the module docstring)."""

    def __init__(self, cfg, env: dist.DistEnv, run_dir: Path, backend, print_fn=print,
                 signals: PreemptionSignals | None = None, defer: bool | None = None):
        self.cfg, self.env, self.run_dir = cfg, env, Path(run_dir)
        self.print = print_fn
        self.loss_scale = backend.loss_scale
        self.step = 0
        self.signals = signals or PreemptionSignals().install()
        dev = env.device
        # This rank's requests, as sent: [preempted (TERM/USR1), interrupted (INT), save now (rank 0's clock)].
        self._flags = torch.zeros(3, device=dev)
        self._stop = torch.zeros((), device=dev)  # ranks that requested a stop, as agreed
        self._agreed = torch.zeros(3, device=dev)  # the requests, summed over ranks
        self.save_due = False  # checkpoint.every_minutes: save at the end of this step (agreed by all)
        self._interrupt_agreed = False  # some rank's stop was a Ctrl-C and none a preemption signal
        self._last_save = time.monotonic()
        self._streak = torch.zeros((), device=dev)  # consecutive non-finite steps
        self._skipped = torch.zeros((), device=dev)  # skipped steps since the last log
        # defer: read each step's status one step late (the default on CUDA); tests pass True on CPU
        self._deferred = dev.type == "cuda" if defer is None else defer
        if self._deferred:
            self._events = dev.type == "cuda"  # a copy to pinned memory, finished by an event
            self._host = [torch.zeros(5, pin_memory=self._events) for _ in range(2)]
            self._pending: tuple | None = None
        self._tight = False  # the first step has completed: step-sized timeouts from now on
        self._slow_depth = 0
        self.watchdog = None
        if cfg.dist.watchdog_s:
            self.watchdog = Watchdog(self.run_dir, env.rank, env.world_size,
                                     poll_s=min(1.0, max(0.05, cfg.dist.watchdog_s / 10)))
        if env.is_main:
            (self.run_dir / PREEMPTED_MARKER).unlink(missing_ok=True)
            if dist.elastic_store_problem() and dist.restart_count() == 0:
                print(f"warning: {dist.elastic_store_problem()}", file=sys.stderr, flush=True)
        if os.environ.get("FTL_FAULT_INJECT"):
            parse_faults(os.environ["FTL_FAULT_INJECT"])  # a typo fails now, not at step N
            backend.module.register_forward_hook(self._inject_nan)

    # --- the step ----------------------------------------------------------------------------------
    def step_begins(self, step: int) -> None:
        self.step = step
        if planned("crash", step, self.env.rank):
            _announce("crash", step, self.env.rank)
            os.kill(os.getpid(), signal.SIGKILL)
        if self.watchdog:
            self.watchdog.arm(step, self._step_limit())

    def loop_starts(self) -> None:
        """The training loop begins: from now on a signal stops the run at a step boundary, after a checkpoint."""
        self.signals.deferred()
        self._last_save = time.monotonic()

    def saved(self) -> None:
        self._last_save = time.monotonic()

    def _save_due_here(self) -> bool:
        minutes = getattr(self.cfg.checkpoint, "every_minutes", 0)
        return bool(self.env.is_main and minutes and time.monotonic() - self._last_save >= minutes * 60)

    def all_reduce_count(self, count: torch.Tensor) -> "PendingCount":
        """Start the all-reduce of the step's global target count without waiting for it (`.wait()` on the
        result gives the count); every rank's stop request (and rank 0's decision to save now) travels in the
        same all-reduce."""
        sig = self.signals
        # Host values become kernel arguments (fill_): no host sync.
        for i, on in enumerate((sig.received, sig.interrupted, self._save_due_here())):
            self._flags[i].fill_(1.0 if on else 0.0)
        packed = torch.cat([count.reshape(1), self._flags.to(count.dtype)])
        if planned("skip_collective", self.step, self.env.rank):
            _announce("skip_collective", self.step, self.env.rank)
            _stall()
        return PendingCount(self, packed, dist.all_reduce_sum_async(packed))

    def step_ends(self, step: int, grad_norm: torch.Tensor, final: bool = False) -> bool:
        """Book-keeping after the optimizer step; True when every rank must save and stop now.
        Raises Diverged after train.max_bad_steps consecutive non-finite steps. `final`: the run's last
        step, whose status is read now (deferred, it would never be read)."""
        bad = (~torch.isfinite(torch.as_tensor(grad_norm, device=self._streak.device))).to(self._streak.dtype)
        self._streak.add_(1.0).mul_(bad)
        self._skipped.add_(bad)
        status = torch.stack([self._stop, bad, self._streak, self._agreed[0], self._agreed[2]])
        if not self._tight:
            self._tight = True
            if self._slow_depth == 0:
                dist.set_timeout(self._step_collective_timeout())
        if not self._deferred:
            return self._act(step, *status.tolist())
        buf = self._host[step % 2]
        buf.copy_(status, non_blocking=True)
        event = torch.cuda.Event() if self._events else None
        if event is not None:
            event.record()
        ready, self._pending = self._pending, (step, buf, event)
        stop = False
        for item in ([ready] if ready is not None else []) + ([self._pending] if final else []):
            at, buf, event = item
            if event is not None:
                event.synchronize()  # the previous step's copy: long done (the final one: this step's)
            stop = self._act(at, *buf.tolist()) or stop
        if final:
            self._pending = None
        return stop

    def _act(self, at: int, stop: float, was_bad: float, streak: float, preempts: float, save: float) -> bool:
        """React to step `at`'s status (read back); True when a stop was requested."""
        # Ctrl-C on some rank and no preemption signal on any: every rank ends with 130, not 75.
        self._interrupt_agreed = stop > 0 and preempts == 0
        self.save_due = save > 0
        if was_bad:
            self.print(f"step {at}: non-finite loss or gradient norm on at least one rank; update skipped "
                       f"({int(streak)} in a row, train.max_bad_steps={self.cfg.train.max_bad_steps})")
            if streak >= self.cfg.train.max_bad_steps:
                first = at - int(streak) + 1
                raise Diverged(
                    f"steps {first}-{at}: {int(streak)} consecutive steps had a non-finite loss or gradient norm "
                    f"(train.max_bad_steps={self.cfg.train.max_bad_steps}); each was skipped, so the weights are "
                    f"those after step {first - 1}. Lower optim.lr or train.clip_grad, check the data around "
                    f"step {first}, or raise train.max_bad_steps")
        return stop > 0

    def log_fields(self) -> dict:
        """Extra metrics for a log row (read at log steps only)."""
        out: dict = {}
        skipped = int(self._skipped.item())
        if skipped:
            out["skipped_steps"] = skipped
            self._skipped.zero_()
        scale = self.loss_scale()
        if scale is not None:
            out["loss_scale"] = scale
        return out

    # --- slow sections and the end ----------------------------------------------------------------
    def _step_limit(self) -> float:
        return self.cfg.dist.watchdog_s if self._tight else self.cfg.dist.timeout_s

    def _step_collective_timeout(self) -> float:
        return collective_timeout(self.cfg, self.cfg.dist.watchdog_s, step_phase=True)

    def _slow_collective_timeout(self) -> float:
        return collective_timeout(self.cfg, self.cfg.dist.timeout_s)

    @contextlib.contextmanager
    def slow_section(self):
        """Evaluation and checkpoint saves: ranks may wait long on each other (disk, a big gather), so
        they get the start-up timeout and deadline."""
        self._slow_depth += 1
        watched = bool(self.watchdog and self.watchdog.armed)  # only inside the loop: never outside it
        if self._slow_depth == 1:
            if self._tight:
                dist.set_timeout(self._slow_collective_timeout())
            if watched:
                self.watchdog.arm(self.step, self.cfg.dist.timeout_s)
        try:
            yield
        finally:
            self._slow_depth -= 1
            if self._slow_depth == 0:
                if self._tight:
                    dist.set_timeout(self._step_collective_timeout())
                if watched:
                    self.watchdog.arm(self.step, self._step_limit())

    def loop_done(self) -> None:
        """After the last step: the final save, export and evaluation get start-up-sized limits."""
        self._slow_depth += 1
        if self.watchdog:
            self.watchdog.disarm()
        if self._tight:
            dist.set_timeout(self._slow_collective_timeout())

    def preempted(self, step: int, checkpoint: Path) -> Preempted | Interrupted:
        """The exception that ends a preempted run, after its checkpoint is saved (rank 0 leaves a
        marker that `ftl launch` turns into exit code 75 when torchrun cannot pass it through). A Ctrl-C
        (on any rank, with no preemption signal on any) ends it with 130, no marker, and the command
        that resumes."""
        if self._interrupt_agreed:
            return Interrupted(f"interrupted (Ctrl-C): checkpoint {checkpoint} saved at step {step}; to resume: "
                               f"{resume_command(self.cfg)}")
        why = f"{self.signals.received} received" if self.signals.received else "a signal on another rank"
        if self.env.is_main:
            marker = {"step": step, "checkpoint": str(checkpoint), "signal": self.signals.received,
                      "time": time.time()}
            (self.run_dir / PREEMPTED_MARKER).write_text(json.dumps(marker) + "\n", encoding="utf-8")
        return Preempted(f"preempted ({why}): checkpoint {checkpoint} saved at step {step}; exiting with code "
                         f"{Preempted.exit_code} so the job can be requeued (it resumes from there by itself)")

    def close(self) -> None:
        self.signals.restore()
        if self.watchdog:
            self.watchdog.close()

    # --- injection ---------------------------------------------------------------------------------
    def _inject_nan(self, module, args, output):
        if module.training and planned("nan", self.step, self.env.rank):
            _announce("nan", self.step, self.env.rank)
            return output * math.nan
        return output


# ------------------------------------------------------------------------------------ resume command

def resume_command(cfg) -> str:
    """The command that continues this run: the outermost process of this job that the user started
    (`ftl launch`, torchrun, the deepspeed launcher, or this `ftl train`), as typed, from the directory it
    ran in. With checkpoint.resume set to a path or none it adds checkpoint.resume=auto, which picks the
    checkpoint just saved (the newest that verifies)."""
    argv = _user_command()
    if cfg.checkpoint.resume != "auto":
        argv = [*argv, "--set", "checkpoint.resume=auto"]
    text = f"cd {shlex.quote(os.getcwd())} && {shlex.join(argv)}"
    job = dist.job_ids().get("slurm_job_id")
    if job:
        text += f"   (or resubmit SLURM job {job}'s script: it resumes by itself)"
    return text


def _launched_by_us(cmd: list[str]) -> bool:
    words = " ".join(cmd)
    names = {os.path.basename(c) for c in cmd[:2]}
    return bool(names & {"ftl", "torchrun", "deepspeed"}) or any(
        m in words for m in ("engine.cli", "torch.distributed.run", "deepspeed.launcher"))


def _user_command() -> list[str]:
    try:
        import psutil

        proc = psutil.Process()
        chosen = proc.cmdline()
        parent = proc.parent()
        while parent is not None and _launched_by_us(parent.cmdline()):
            chosen, parent = parent.cmdline(), parent.parent()
    except Exception:  # noqa: BLE001 - no process table: this process's own arguments
        chosen = [sys.executable, *sys.argv]
    # `python /venv/bin/ftl ...` (a console script) reads better as `ftl ...` when that is what PATH finds.
    if len(chosen) > 1 and os.path.basename(chosen[1]) in ("ftl", "torchrun", "deepspeed"):
        import shutil

        name = os.path.basename(chosen[1])
        found = shutil.which(name)
        head = name if found and os.path.realpath(found) == os.path.realpath(chosen[1]) else chosen[1]
        chosen = [head, *chosen[2:]]
    return chosen
