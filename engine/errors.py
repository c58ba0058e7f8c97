"""Errors the CLI turns into exit codes.

A `UsageError` is the user's to fix (bad config, missing file, bad column, a refused target, a damaged
checkpoint the user named): the CLI prints every problem it carries in one message and exits 2, without a
traceback, and nothing has been written. Everything else is a runtime failure (1), except the stops below.

    0    done
    1    a runtime failure: a check that fails on what the engine just wrote; a full disk (DiskFull)
    2    a user mistake, found before anything is written (UsageError)
    3    train.max_bad_steps non-finite steps in a row (Diverged)
    4    the hang watchdog fired
    75   preempted (SIGTERM/SIGUSR1): checkpoint saved, requeue to resume (Preempted)
    130  Ctrl-C: checkpoint saved, not requeued (Interrupted); a second Ctrl-C aborts at once, also 130
"""

from __future__ import annotations


# Exit codes of `ftl train` (job scripts branch on them).
EXIT_OK = 0
EXIT_USAGE = 2
EXIT_PREEMPTED = 75  # sysexits EX_TEMPFAIL: stopped on a signal after saving a checkpoint; requeue and resume
EXIT_DIVERGED = 3  # train.max_bad_steps consecutive non-finite steps: requeueing would not help
EXIT_HUNG = 4  # the watchdog found a step past its deadline; every thread's stack is in <run dir>/hang-rank<R>.txt
EXIT_INTERRUPTED = 130  # 128 + SIGINT, what shells report for Ctrl-C; a person's Ctrl-C must not requeue the job
EXIT_FAILURE = 1


class UsageError(Exception):
    """One or more problems with what the user asked for; each names the thing to fix."""

    exit_code = EXIT_USAGE

    def __init__(self, problems: str | list[str], hint: str | None = None):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        self.hint = hint
        super().__init__(self.render())

    def render(self) -> str:
        if len(self.problems) == 1:
            text = f"error: {self.problems[0]}"
        else:
            text = f"error: {len(self.problems)} problems:\n" + "\n".join(f"  - {p}" for p in self.problems)
        if self.hint:
            text += f"\n{self.hint}"
        return text


def collect(*checks: list[str]) -> list[str]:
    out: list[str] = []
    for c in checks:
        out.extend(c)
    return out


class RunStopped(Exception):
    """The run stopped on purpose at a step boundary; the message says why and what to do.
    The CLI prints it (rank 0) without a traceback and exits with `exit_code`."""

    exit_code = 1


class Preempted(RunStopped):
    """A preemption signal: a checkpoint was saved; the job should be requeued (it resumes by itself)."""

    exit_code = EXIT_PREEMPTED


class Diverged(RunStopped):
    """Too many consecutive steps with a non-finite loss or gradient norm."""

    exit_code = EXIT_DIVERGED


class Interrupted(RunStopped):
    """Ctrl-C: a checkpoint was saved (or there was nothing to save yet); the message says how to resume."""

    exit_code = EXIT_INTERRUPTED


class DiskFull(Exception):
    """No space left on device while the engine wrote something; the message says where and what was kept."""

    exit_code = EXIT_FAILURE


class StoppedEarly(BaseException):
    """A signal before the first step (nothing to save): raised from the signal handler wherever the main
    thread is, so it derives from BaseException like KeyboardInterrupt: a library's `except Exception`
    (datasets wraps errors of a generator) must not turn it into a failure."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


class ExportMismatch(RunStopped, RuntimeError):
    """The exported model, reloaded by plain transformers, does not reproduce the engine's logits. The run's
    checkpoint is complete and kept; the message says what differed (exit code 1, a runtime failure)."""

    exit_code = EXIT_FAILURE
