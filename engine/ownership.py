"""What the engine owns, and therefore may replace or delete: the run-directory lock, readers' locks on
checkpoints, and the directories it writes in place (final/, best/, `ftl export --out`).

Run lock. Rank 0 holds an exclusive `fcntl.flock` on `<run dir>/LOCK` for the life of the run; the file
says who holds it (host, pid, since when). A second run on the same directory stops with exit 2 naming
the holder. The OS releases the lock when the holder's process ends however it ends (SIGKILL, a crashed
node whose NFS lease expires), so a lock never outlives its run: a SLURM requeue and `torchrun
--max-restarts` start new processes that take it again. The file itself is never deleted (deleting a lock
file while another process has it open is how two holders happen). Caveat: where flock is unreliable the
lock is only advisory or node-local: NFSv3 without lockd, Lustre mounted with `localflock`; on a file
system that refuses flock (Lustre `noflock`) the run warns and goes on unlocked.

Readers. `ftl export RUN` holds a shared lock on a checkpoint's COMPLETE marker while it reads the files;
retention takes the exclusive lock without waiting before it deletes a checkpoint, and when a reader
holds it, leaves that checkpoint for a later save to delete. A reader that arrives after retention
has started finds the marker gone and picks the newest checkpoint again.

Targets. A directory the engine writes in place is written under a temporary sibling name and renamed
into place. An existing target is replaced only when the engine wrote it (its export.json, listing the
files it wrote, says so) and only with what it lists; anything else there stops the export with exit 2
before anything is written. The source, the current directory and their parents are never a target.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import shutil
import socket
import sys
import tempfile
import time
from pathlib import Path

from engine.errors import UsageError

LOCK = "LOCK"
EXPORT_MARKER = "export.json"
_UNSUPPORTED = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL}


# ------------------------------------------------------------------------------------------ run lock

_HELD: set[int] = set()  # descriptors of the run locks this process holds


def _close_held_in_child() -> None:
    # A process forked from the holder (a data worker) shares the lock's open file description and would
    # keep the lock alive after the holder dies; closing (not unlocking) its copies leaves the lock to the holder.
    for fd in list(_HELD):
        try:
            os.close(fd)
        except OSError:
            pass
    _HELD.clear()


os.register_at_fork(after_in_child=_close_held_in_child)


class RunLock:
    """The exclusive lock on a run directory (rank 0)."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / LOCK
        self.fd: int | None = None
        self.held = False

    def acquire(self) -> "RunLock":
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
        except OSError as e:
            raise UsageError(f"run.dir {self.path.parent}: cannot create {LOCK} there ({e.strerror or e})") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                holder = _read_holder(fd)
                os.close(fd)
                raise UsageError(
                    f"run.dir {self.path.parent} is in use by another run: {holder}",
                    hint="Wait for that run to finish or stop it; to train beside it, set run.dir to another "
                         "directory. (A run that was killed releases the lock by itself.)") from None
            if e.errno in _UNSUPPORTED:
                os.close(fd)
                print(f"warning: the file system of {self.path.parent} refuses file locks ({e.strerror}); "
                      f"running without the run-directory lock: make sure no other run uses this directory",
                      file=sys.stderr, flush=True)
                return self
            os.close(fd)
            raise
        self.fd, self.held = fd, True
        _HELD.add(fd)
        info = {"host": socket.gethostname(), "pid": os.getpid(), "since": time.strftime("%Y-%m-%d %H:%M:%S %z"),
                "since_unix": time.time()}
        from engine import dist

        info.update(dist.job_ids())
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
        except OSError:  # the lock is what matters; the note about its holder is a courtesy
            pass
        return self

    def release(self) -> None:
        if self.fd is not None:
            _HELD.discard(self.fd)
            try:
                fcntl.flock(self.fd, fcntl.LOCK_UN)
            finally:
                os.close(self.fd)
            self.fd, self.held = None, False


def _read_holder(fd: int) -> str:
    try:
        info = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
    except (OSError, ValueError):
        info = {}
    if not info:
        return "a process that has not written its name yet (it is starting)"
    extra = f", SLURM job {info['slurm_job_id']}" if info.get("slurm_job_id") else ""
    return f"host {info.get('host', '?')}, pid {info.get('pid', '?')}, since {info.get('since', '?')}{extra}"


# ------------------------------------------------------------------------------------------ readers

class Vanished(Exception):
    """The checkpoint a reader chose was deleted before it could lock it: choose again."""


class SharedLock:
    """A reader's shared lock on `marker` (a checkpoint's COMPLETE), held until `release()`."""

    def __init__(self, marker: Path):
        try:
            self.fd = os.open(marker, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            raise Vanished(str(marker)) from None
        try:
            fcntl.flock(self.fd, fcntl.LOCK_SH)  # waits only while retention is deleting it
        except OSError as e:
            if e.errno not in _UNSUPPORTED:
                os.close(self.fd)
                raise
        if os.fstat(self.fd).st_nlink == 0 or not marker.exists():  # deleted while we waited
            self.release()
            raise Vanished(str(marker))

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()


def try_exclusive(marker: Path) -> int | None | bool:
    """Retention: the exclusive lock on `marker` without waiting. An fd (close it after the delete), None
    when a reader holds it, True when there is no marker or locks are unsupported (delete as before)."""
    try:
        fd = os.open(marker, os.O_RDWR | os.O_CLOEXEC)  # NFS needs write access for an exclusive lock
    except OSError:
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        os.close(fd)
        return None if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES) else True
    return fd


# ------------------------------------------------------------------------------------------ targets

def _is_within(a: Path, b: Path) -> bool:
    """a is b or inside b."""
    try:
        a.relative_to(b)
        return True
    except ValueError:
        return False


def written_by_us(directory: Path) -> tuple[bool, list[str]]:
    """(the engine wrote `directory`, files in it that it did not write). A directory counts as ours when
    its export.json is a JSON object; when that lists `files`, anything else in it is someone else's."""
    marker = directory / EXPORT_MARKER
    try:
        doc = json.loads(marker.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False, []
    if not isinstance(doc, dict):
        return False, []
    listed = doc.get("files")
    if not isinstance(listed, list):
        return True, []
    present = {p.relative_to(directory).as_posix() for p in directory.rglob("*") if not p.is_dir()}
    return True, sorted(present - set(listed) - {EXPORT_MARKER})


def target_problems(out: Path, force: bool, sources: list[Path] = (), what: str = "--out") -> list[str]:
    """Why `out` must not be written (empty when it may): see the module docstring."""
    out_abs = Path(os.path.abspath(out))
    protected = [(Path(os.path.abspath(s)), "the source you export from") for s in sources]
    protected.append((Path(os.getcwd()).resolve(), "the current directory"))
    for p, name in protected:
        resolved = out_abs.resolve() if out_abs.exists() else out_abs
        if _is_within(p, out_abs) or _is_within(p.resolve(), resolved):
            rel = "is" if p == out_abs or p.resolve() == resolved else "contains"
            return [f"{what} {out} {rel} {name} ({p}); choose a new directory"]
    if out_abs.is_symlink():
        return [f"{what} {out} is a symbolic link; give the directory itself, or a new name"]
    if not out_abs.exists():
        return []
    if not out_abs.is_dir():
        return [f"{what} {out} is an existing file; choose a new directory"]
    if not any(out_abs.iterdir()):
        return []
    ours, foreign = written_by_us(out_abs)
    if not ours:
        return [f"{what} {out} exists and is not an earlier export (no {EXPORT_MARKER}); it is left alone: "
                f"choose a new directory, or empty it yourself"]
    if foreign:
        shown = ", ".join(foreign[:5]) + (" ..." if len(foreign) > 5 else "")
        return [f"{what} {out} is an earlier export but also holds files it did not write ({shown}); "
                f"move them out, or choose a new directory"]
    if not force:
        return [f"{what} {out} holds an earlier export; pass --force to replace it, or choose a new directory"]
    return []


def list_files(directory: Path) -> list[str]:
    return sorted(p.relative_to(directory).as_posix() for p in Path(directory).rglob("*") if not p.is_dir())


def stamp(directory: Path, info: dict) -> None:
    """Write export.json into a directory the engine has just written, listing every file in it, and give
    every file the same permissions (0666 minus the umask: some writers leave 0600)."""
    mode = 0o666 & ~_umask()
    for p in Path(directory).rglob("*"):
        if p.is_file():
            os.chmod(p, mode)
    doc = dict(info, files=list_files(directory) + [EXPORT_MARKER])
    (Path(directory) / EXPORT_MARKER).write_text(json.dumps(doc, indent=1) + "\n", encoding="utf-8")
    os.chmod(Path(directory) / EXPORT_MARKER, mode)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def temp_sibling(out: Path) -> Path:
    """A new, empty temporary directory next to `out` (same file system, so the final rename is atomic)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp's 0700 would make final/ private unlike the rest of the run
    return tmp


def replace_dir(new: Path, out: Path, what: str = "target") -> None:
    """Move the finished directory `new` to `out`. An existing `out` is replaced only if it is empty or
    the engine wrote it (checked again here: something may have appeared since the start)."""
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        raise UsageError(f"{what} {out} is not a directory the engine wrote; the new one is kept at {new}")
    if out.exists() and any(out.iterdir()):
        ours, foreign = written_by_us(out)
        if not ours or foreign:
            raise UsageError(f"{what} {out} holds files the engine did not write ("
                             f"{', '.join(foreign[:5]) if foreign else 'no ' + EXPORT_MARKER}); it is left alone and "
                             f"the new one is kept at {new}")
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(out, old)
        os.replace(new, out)
        shutil.rmtree(old, ignore_errors=True)
        return
    if out.exists():
        out.rmdir()  # empty: nothing of anyone's is lost
    os.replace(new, out)


# --------------------------------------------------------------------------------------- run.dir

def run_dir_problems(run_dir: Path) -> list[str]:
    """Why the run directory cannot be used, found before anything is written: it is a file, a parent is
    a file, or the nearest existing parent cannot be written (read-only file system, permissions)."""
    p = Path(os.path.abspath(run_dir))
    if p.exists():
        if not p.is_dir():
            return [f"run.dir {run_dir} is an existing file, not a directory; set run.dir to a directory"]
        if not os.access(p, os.W_OK | os.X_OK):
            return [f"run.dir {run_dir} is not writable ({_why_not_writable(p)}); set run.dir to a writable directory"]
        return []
    parent = p.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        return [f"run.dir {run_dir} cannot be created: {parent} is a file; set run.dir elsewhere"]
    if not os.access(parent, os.W_OK | os.X_OK):
        return [f"run.dir {run_dir} cannot be created: {parent} is not writable ({_why_not_writable(parent)}); "
                f"set run.dir to a writable place"]
    return []


def _why_not_writable(p: Path) -> str:
    try:
        st = os.statvfs(p)
        if st.f_flag & os.ST_RDONLY:
            return "read-only file system"
    except OSError:
        pass
    return "permission denied"
