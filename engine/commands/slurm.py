"""`ftl slurm`: a filled copy of a launch/slurm/*.sbatch template for one config, and its submission.

The templates are complete job scripts (users also submit them directly). Filling one replaces its
`#SBATCH` block with the requested resources and bakes in what makes a requeued job find its run:
absolute paths for the config and the run directory (on shared storage), the working directory, the
Python to use, and a log file per job id inside the run directory. A sweep (`--grid`) also writes the
grid file, one trial per line, that launch/slurm/sweep.sbatch reads.
"""

from __future__ import annotations

import itertools
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from engine.errors import UsageError

TEMPLATES = {"torchrun": "train.sbatch", "deepspeed": "train_deepspeed.sbatch", "sweep": "sweep.sbatch"}
# Where the templates live: the source checkout (pip install -e), else the copy setup.py installs.
TEMPLATE_DIRS = (Path(__file__).resolve().parents[2] / "launch" / "slurm",
                 Path(sys.prefix) / "share" / "ftl-engine" / "launch" / "slurm")
NAME_RE = re.compile(r"^[A-Za-z0-9._-]+$")
LIST_RE = re.compile(r"^[A-Za-z0-9._,-]+$")
SETTING_RE = re.compile(r"^(FTL_[A-Z_]+)=\$\{\1:-")  # a template's settings lines: NAME=${NAME:-default}  # comment
ARGS_LINE = 'FTL_TRAIN_ARGS=("$@")'


def _with_comment(code: str, rest: str) -> str:
    return f"{code}  {rest.strip()}" if rest.strip() else code


def template_path(kind: str) -> Path:
    for d in TEMPLATE_DIRS:
        if (d / TEMPLATES[kind]).is_file():
            return d / TEMPLATES[kind]
    raise UsageError(f"SLURM template {TEMPLATES[kind]} not found in {' or '.join(map(str, TEMPLATE_DIRS))}",
                     hint="Reinstall ftl-engine (pip install -e .) or run from its source checkout.")


def parse_time(text: str) -> int | None:
    """SLURM --time (`M`, `M:S`, `H:M:S`, `D-H`, `D-H:M`, `D-H:M:S`) in seconds; None for UNLIMITED."""
    if text.strip().lower() in ("unlimited", "infinite"):
        return None
    m = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", text.strip())
    if not m:
        raise ValueError(text)
    days, a, b, c = m.groups()
    if days is not None:  # D-H[:M[:S]]
        return ((int(days) * 24 + int(a)) * 60 + int(b or 0)) * 60 + int(c or 0)
    if c is not None:  # H:M:S
        return (int(a) * 60 + int(b)) * 60 + int(c)
    if b is not None:  # M:S
        return int(a) * 60 + int(b)
    return int(a) * 60  # M


def parse_grid(items: list[str] | tuple[str, ...]) -> tuple[list[list[str]], list[str]]:
    """`key=v1,v2` options -> every combination as a list of `key=value` (first key outermost)."""
    axes: list[list[str]] = []
    problems: list[str] = []
    for item in items:
        key, eq, values = item.partition("=")
        key = key.strip()
        vals = [v.strip() for v in values.split(",")]
        if not eq or "." not in key or not all(vals):
            problems.append(f"--grid {item!r} must look like section.key=v1,v2 (e.g. optim.lr=1e-4,3e-4)")
        elif any(any(ch.isspace() for ch in v) for v in vals):
            problems.append(f"--grid {item!r}: values cannot contain spaces (set such keys in the config)")
        else:
            axes.append([f"{key}={v}" for v in vals])
    return [list(c) for c in itertools.product(*axes)] if axes and not problems else [], problems


@dataclass
class SlurmJob:
    config: str | None
    overrides: list[str]
    nodes: int = 1
    gpus_per_node: int = 0
    nproc_per_node: int | None = None
    cpus_per_task: int | None = None
    partition: str | None = None
    time: str | None = None
    account: str | None = None
    job_name: str | None = None
    launcher: str = "torchrun"
    signal_before: int = 300
    requeue: bool = True
    grid: list[str] = field(default_factory=list)
    max_parallel: int | None = None
    sbatch_options: list[str] = field(default_factory=list)
    python: str = sys.executable
    cwd: Path = field(default_factory=Path.cwd)

    def __post_init__(self) -> None:
        self.trials, self._grid_problems = parse_grid(self.grid)

    # --------------------------------------------------------------------------------------- checks
    def problems(self) -> list[str]:
        from engine.config import load_config

        p = list(self._grid_problems)
        if self.job_name is not None and not NAME_RE.match(self.job_name):
            p.append(f"--job-name {self.job_name!r}: use letters, digits, '.', '_' and '-' only")
        for flag, value in (("--partition", self.partition), ("--account", self.account)):
            if value is not None and not LIST_RE.match(value):
                p.append(f"{flag} {value!r}: use letters, digits, '.', '_', '-' (and ',' between names)")
        if self.time is not None:
            try:
                limit = parse_time(self.time)
            except ValueError:
                limit = None
                p.append(f"--time {self.time!r}: use minutes, H:MM:SS or D-HH:MM:SS (e.g. 90, 4:00:00, 2-00:00:00)")
            if limit is not None and limit <= self.signal_before:
                p.append(f"--time {self.time} ({limit} s) leaves no time before the checkpoint signal "
                         f"(--signal-before {self.signal_before} s); raise --time or lower --signal-before")
        if not 0 < self.signal_before <= 65535:
            p.append(f"--signal-before must be 1..65535 seconds (got {self.signal_before})")
        if self.trials:
            if self.nodes != 1:
                p.append("--grid: each trial runs on one node; drop --nodes or set it to 1")
            if self.launcher != "torchrun":
                p.append("--grid trials run with torchrun (launch/slurm/sweep.sbatch); drop --launcher")
            try:
                load_config(self.config, self.overrides)
                base_ok = True
            except UsageError:
                base_ok = False  # the caller reports the shared config's problems once
            for i, trial in enumerate(self.trials if base_ok else []):
                try:
                    load_config(self.config, [*self.overrides, *trial])
                except UsageError as e:
                    p += [f"trial {i} ({' '.join(trial)}): {x}" for x in e.problems]
        for opt in self.sbatch_options:
            if not opt.startswith("--") or any(ch.isspace() for ch in opt):
                p.append(f"--sbatch {opt!r}: give one sbatch option as --name=value (e.g. --sbatch=--qos=high)")
        return p

    # --------------------------------------------------------------------------------------- output
    @property
    def kind(self) -> str:
        return "sweep" if self.trials else self.launcher

    def names(self, run_dir: Path) -> dict[str, Path | str]:
        run_dir = (self.cwd / run_dir).resolve()
        job_name = self.job_name or f"ftl-{run_dir.name}"
        return {"run_dir": run_dir, "log_dir": run_dir / "slurm", "job_name": job_name,
                "grid_file": run_dir / "grid.txt",
                "log": run_dir / "slurm" / ("%x-%A_%a.out" if self.trials else "%x-%j.out")}

    def sbatch_lines(self, names: dict) -> list[str]:
        opts = [f"--job-name={names['job_name']}", f"--nodes={self.nodes}", "--ntasks-per-node=1"]
        if self.gpus_per_node:
            opts.append(f"--gpus-per-node={self.gpus_per_node}")
        if self.cpus_per_task:
            opts.append(f"--cpus-per-task={self.cpus_per_task}")
        elif self.gpus_per_node:
            opts.append("--exclusive")  # a GPU training job owns its nodes (all their CPUs)
        else:
            opts.append(f"--cpus-per-task={self.nproc_per_node or 1}")
        if self.time:
            opts.append(f"--time={self.time}")
        if self.partition:
            opts.append(f"--partition={self.partition}")
        if self.account:
            opts.append(f"--account={self.account}")
        if self.trials:
            parallel = f"%{self.max_parallel}" if self.max_parallel else ""
            opts.append(f"--array=0-{len(self.trials) - 1}{parallel}")
        opts += [f"--signal=B:USR1@{self.signal_before}", "--requeue" if self.requeue else "--no-requeue",
                 "--open-mode=append", f"--output={names['log']}", f"--chdir={self.cwd}", *self.sbatch_options]
        return [f"#SBATCH {o}" for o in opts]

    def train_args(self, names: dict) -> list[str]:
        config = [str((self.cwd / self.config).resolve())] if self.config else []
        # run.dir is replaced by its absolute path (a requeued job must find it from any directory)
        sets = [a for o in self.overrides if self.trials or not o.strip().startswith("run.dir=")
                for a in ("--set", o)]
        if self.trials:
            return [str(names["grid_file"]), *config, *sets]
        return [*config, *sets, "--set", f"run.dir={names['run_dir']}"]

    def render(self, run_dir: Path, argv: list[str] | None = None) -> str:
        """The filled script text."""
        names = self.names(run_dir)
        src = template_path(self.kind)
        settings = {"FTL_PYTHON": self.python,
                    "FTL_NPROC_PER_NODE": str(self.nproc_per_node) if self.nproc_per_node else ""}
        if self.trials:
            settings["FTL_SWEEP_DIR"] = str(names["run_dir"])
        out: list[str] = []
        header_done = False
        for line in src.read_text().splitlines():
            if line.startswith("#SBATCH"):
                if not header_done:
                    out += self.sbatch_lines(names)
                    header_done = True
                continue
            m = SETTING_RE.match(line)
            if m and m.group(1) in settings:
                name, value = m.group(1), settings[m.group(1)]
                comment = re.search(r"\s#.*$", line)
                line = _with_comment(f"{name}=${{{name}:-{shlex.quote(value) if value else ''}}}",
                                     comment.group(0) if comment else "")
            elif line.startswith(ARGS_LINE):
                baked = " ".join(shlex.quote(a) for a in self.train_args(names))
                line = _with_comment(f'FTL_TRAIN_ARGS=({baked} "$@")', line[len(ARGS_LINE):])
            out.append(line)
            if len(out) == 1:  # after the shebang
                cmd = "ftl slurm" + ("" if argv is None else " " + shlex.join(argv))
                out.append(f"# Written by `{cmd}` from {src.name}; edit freely.")
        return "\n".join(out) + "\n"

    def write(self, run_dir: Path, script: Path | None, argv: list[str] | None = None) -> tuple[str, dict]:
        """Create the log directory (sbatch needs it to exist), the grid file, and the script (if a path)."""
        names = self.names(run_dir)
        text = self.render(run_dir, argv)
        names["log_dir"].mkdir(parents=True, exist_ok=True)
        if self.trials:
            names["grid_file"].write_text("".join(" ".join(t) + "\n" for t in self.trials))
        if script is not None:
            script.parent.mkdir(parents=True, exist_ok=True)
            script.write_text(text)
            script.chmod(0o755)
        return text, names


def submit(script: Path) -> str:
    """`sbatch --parsable SCRIPT` -> the job id (the array job id for a sweep)."""
    proc = subprocess.run(["sbatch", "--parsable", str(script)], capture_output=True, text=True,
                          stdin=subprocess.DEVNULL, timeout=120)
    if proc.returncode != 0:
        raise RuntimeError(f"sbatch failed (exit {proc.returncode}): {proc.stderr.strip() or proc.stdout.strip()}")
    return proc.stdout.strip().split(";")[0]


def sbatch_available() -> bool:
    return shutil.which("sbatch") is not None
