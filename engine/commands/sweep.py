"""Hyperparameter sweeps: a plan of trials, each an ordinary run in its own directory, and a summary.

    ftl sweep CONFIG --grid optim.lr=1e-4,3e-4 --grid train.micro_batch=8,16
    ftl sweep CONFIG --random 8 --grid optim.lr=loguniform:1e-5:1e-3 --grid model.dropout=uniform:0:0.2

A parameter is `KEY=SPEC`, SPEC one of
    v1,v2,...          values (grid: every combination; random: one drawn uniformly)
    uniform:LO:HI      a float drawn uniformly            (random search only)
    loguniform:LO:HI   a float whose log is uniform       (random search only; LO > 0)
    int:LO:HI          an integer in [LO, HI], inclusive   (random search only)
Random draws come from `random.Random(seed)` in trial order, floats rounded to 4 significant
digits (kept inside their range), so the same command gives the same trials.

Layout of a sweep directory (`--out`, default sweeps/<run.name>):
    sweep.json        the plan (parameters, trials and their overrides, metric, rungs)
    trials.txt        one line per trial: the `ftl train` arguments that train it (to rerun one by hand)
    grid-step*.txt    --slurm: the GRID_FILE of each array job (one trial's overrides per line)
    slurm/            --slurm: the array tasks' logs
    trial-NNN/        each trial's run directory (config.yaml, metrics.jsonl, tb/, checkpoints/, final/)
    summary.csv, summary.md, best.yaml, tb/<trial>/ (TensorBoard HParams)

Successive halving (`--rungs 20,40 --eta 2`): every trial trains to the first rung (train.stop_at_step,
so the LR schedule still spans train.max_steps) and is evaluated there; the best 1/eta of them (rounded
up, at least one) continue from their checkpoint to the next rung, and so on until the survivors reach
train.max_steps. A trial's metric at a rung is the eval logged at exactly that step. Failed trials
never continue.

Trials run one after another in this process (the real `Trainer`), or each under `ftl launch
--nproc-per-node N`, or as a SLURM array job (`--slurm`, through launch/slurm/sweep.sbatch; with rungs,
one array job per rung, the driver waiting in between). Re-running the
same command continues an interrupted sweep: finished trials are complete run directories and are not
trained again.
"""

from __future__ import annotations

import contextlib
import csv
import io
import itertools
import json
import math
import random
import re
import shlex
import shutil
import subprocess
import sys
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path

import yaml

from engine.errors import UsageError

DISTRIBUTIONS = ("uniform", "loguniform", "int")


# ------------------------------------------------------------------------------------------ the plan

@dataclass
class Param:
    key: str
    kind: str  # values | uniform | loguniform | int
    values: list = field(default_factory=list)
    lo: float = 0.0
    hi: float = 0.0

    def sample(self, rng: random.Random):
        if self.kind == "values":
            return self.values[rng.randrange(len(self.values))]
        if self.kind == "int":
            return rng.randint(int(self.lo), int(self.hi))
        if self.kind == "uniform":
            x = rng.uniform(self.lo, self.hi)
        else:
            x = math.exp(rng.uniform(math.log(self.lo), math.log(self.hi)))
        return min(max(float(f"{x:.4g}"), self.lo), self.hi)

    def describe(self) -> str:
        if self.kind == "values":
            return ",".join(map(str, self.values))
        return f"{self.kind}:{self.lo:g}:{self.hi:g}"


def parse_param(text: str) -> tuple[Param | None, list[str]]:
    """`KEY=SPEC` -> (Param, problems)."""
    key, eq, spec = text.partition("=")
    key, spec = key.strip(), spec.strip()
    if not eq or "." not in key or not spec:
        return None, [f"--grid {text!r} must look like section.key=v1,v2 or section.key=loguniform:1e-5:1e-3"]
    head, _, rest = spec.partition(":")
    if head in DISTRIBUTIONS:
        parts = rest.split(":")
        try:
            lo, hi = (float(p) for p in parts) if len(parts) == 2 else (None, None)
        except ValueError:
            lo = hi = None
        if lo is None:
            return None, [f"--grid {text!r}: {head} needs two numbers, {head}:LOW:HIGH"]
        problems = []
        if lo > hi:
            problems.append(f"--grid {text!r}: the low end {lo:g} is above the high end {hi:g}")
        if head == "loguniform" and lo <= 0:
            problems.append(f"--grid {text!r}: loguniform needs a positive low end (got {lo:g})")
        if head == "int" and not (lo.is_integer() and hi.is_integer()):
            problems.append(f"--grid {text!r}: int needs integer ends")
        return Param(key, head, lo=lo, hi=hi), problems
    return Param(key, "values", values=[_scalar(v) for v in spec.split(",")]), []


def _scalar(text: str):
    """A YAML scalar, with numbers YAML 1.1 leaves as strings (1e-4, 3e-3) read as numbers."""
    v = yaml.safe_load(text) if text.strip() else ""
    if isinstance(v, str):
        for kind in (int, float):
            try:
                return kind(v)
            except ValueError:
                pass
    return v


@dataclass
class Trial:
    name: str
    params: dict

    def overrides(self) -> list[str]:
        return [f"{k}={_yaml_scalar(v)}" for k, v in self.params.items()]


def _yaml_scalar(v) -> str:
    return v if isinstance(v, str) else yaml.safe_dump(v, default_flow_style=True).strip().removesuffix("\n...")


def make_trials(params: list[Param], n_random: int = 0, seed: int = 0) -> list[Trial]:
    """Grid (every combination, the first parameter varying slowest) or `n_random` seeded draws."""
    if n_random:
        rng = random.Random(seed)
        return [Trial(f"trial-{i:03d}", {p.key: p.sample(rng) for p in params}) for i in range(n_random)]
    combos = itertools.product(*[p.values for p in params]) if params else [()]
    return [Trial(f"trial-{i:03d}", dict(zip([p.key for p in params], c))) for i, c in enumerate(combos)]


@dataclass
class Plan:
    config: str | None
    overrides: list[str]
    params: list[str]
    random: int
    seed: int
    metric: str
    mode: str
    rungs: list[int]
    eta: int
    max_steps: int
    trials: list[dict]

    def trial_list(self) -> list[Trial]:
        return [Trial(t["name"], t["params"]) for t in self.trials]


def metric_mode(metric: str, mode: str) -> str:
    if mode != "auto":
        return mode
    return "max" if any(w in metric for w in ("accuracy", "f1", "precision", "recall")) else "min"


def build_plan(config: str | None, overrides: list[str], grid: list[str], n_random: int, seed: int, metric: str,
               mode: str, rungs: list[int], eta: int, out: Path | None) -> tuple[Plan, Path]:
    """Parse and check everything (every trial's full config) before anything is written."""
    from engine.config import load_config

    problems: list[str] = []
    params: list[Param] = []
    for g in grid:
        p, more = parse_param(g)
        problems += more
        if p is not None:
            if any(q.key == p.key for q in params):
                problems.append(f"--grid names {p.key} twice")
            params.append(p)
    if not n_random:
        for p in params:
            if p.kind != "values":
                problems.append(f"--grid {p.key}={p.describe()} is a range: add --random N to draw N trials from it "
                                f"(a grid needs explicit values)")
    if not metric.startswith("eval_"):
        problems.append(f"--metric {metric!r} must be an eval metric (eval_loss, eval_ppl, eval_accuracy, ...)")
    if eta < 2:
        problems.append(f"--eta must be at least 2 (got {eta})")
    if problems:
        raise UsageError(problems)
    base = load_config(config, overrides)
    for k in ("run.dir", "run.name", "train.stop_at_step"):
        if any(p.key == k for p in params):
            problems.append(f"--grid {k}: the sweep sets it for each trial")
    if rungs and base.train.epochs:
        problems.append("--rungs are steps, and train.epochs resolves to steps only when a trial starts; set "
                        "train.max_steps instead of train.epochs for successive halving")
    if rungs:
        if sorted(set(rungs)) != list(rungs):
            problems.append(f"--rungs must be increasing steps (got {','.join(map(str, rungs))})")
        if rungs[-1] >= base.train.max_steps or rungs[0] <= 0:
            problems.append(f"--rungs must lie between 0 and train.max_steps={base.train.max_steps}, exclusive "
                            f"(got {','.join(map(str, rungs))})")
    trials = make_trials(params, n_random, seed)
    out = Path(out) if out else Path("sweeps") / base.run.name
    seen = set()
    for t in trials:
        try:
            cfg = load_config(config, [*overrides, *t.overrides(), f"run.dir={out / t.name}"])
            if rungs and cfg.train.max_steps != base.train.max_steps:
                problems.append(f"{t.name}: train.max_steps differs between trials; successive halving compares "
                                f"trials at the same steps")
        except UsageError as e:
            for p in e.problems:
                if p not in seen:
                    seen.add(p)
                    problems.append(f"{t.name} ({' '.join(t.overrides())}): {p}")
    if problems:
        raise UsageError(problems, hint="See `ftl config keys` for every key, its type and default.")
    plan = Plan(config=str(Path(config).resolve()) if config else None, overrides=list(overrides), params=list(grid),
                random=n_random, seed=seed, metric=metric, mode=metric_mode(metric, mode), rungs=list(rungs), eta=eta,
                max_steps=base.train.max_steps, trials=[asdict(t) for t in trials])
    return plan, out


def preflight(plan: Plan) -> None:
    """Check what every trial shares before trial 0 starts (and before anything is written): the data source,
    its columns and the tokenizer, when no --grid parameter changes them. Each trial's own config was checked
    by `build_plan`; this catches the problems only reading the data finds (a missing column, an empty split,
    a tokenizer directory that does not load), once, instead of in trial 0."""
    from engine.data import sources as data
    from engine.config import load_config

    if any(p.split("=", 1)[0].strip().startswith(("data.", "model.")) for p in plan.params):
        return  # trials differ in data or model: each checks its own as it starts
    t = plan.trial_list()[0]
    cfg = load_config(plan.config, [*plan.overrides, *t.overrides()])
    data.load_raw(cfg.data, cfg.run.seed, need_label=cfg.model.head == "cls")
    if cfg.data.tokenizer:
        data.load_tokenizer(cfg.data.tokenizer)


def write_plan(plan: Plan, out: Path) -> None:
    """sweep.json + trials.txt; a directory holding a DIFFERENT plan is refused (continuing is fine)."""
    path = out / "sweep.json"
    mine = asdict(plan)
    if path.is_file():
        theirs = json.loads(path.read_text(encoding="utf-8"))
        if theirs != mine:
            raise UsageError(f"{out} already holds a different sweep (its sweep.json differs); "
                             f"pass --out for a new directory, or delete it")
    out.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(mine, indent=1) + "\n", encoding="utf-8")
    (out / "trials.txt").write_text("".join(shlex.join(train_args(plan, t, out)) + "\n" for t in plan.trial_list()),
                                    encoding="utf-8")  # `ftl train` arguments of each trial, for reruns by hand


def train_args(plan: Plan, trial: Trial, out: Path, stop_at: int = 0) -> list[str]:
    """The `ftl train` arguments of one trial (config file, then --set overrides)."""
    sets = [*plan.overrides, *trial.overrides(), f"run.dir={out / trial.name}", f"run.name={trial.name}",
            f"train.stop_at_step={stop_at}"]
    return ([plan.config] if plan.config else []) + [a for s in sets for a in ("--set", s)]


def load_plan(out: Path) -> Plan:
    path = out / "sweep.json"
    if not path.is_file():
        raise UsageError(f"{out} is not a sweep directory (no sweep.json)")
    return Plan(**json.loads(path.read_text(encoding="utf-8")))


# ------------------------------------------------------------------------------------------ running

def run_in_process(args: list[str]) -> str:
    """Train one trial segment with the real Trainer in this process. Returns 'ok' or 'failed: ...'."""
    from engine import dist
    from engine.config import load_config
    from engine.trainer import Trainer

    config = args[0] if args and args[0] != "--set" else None
    sets = [args[i + 1] for i in range(len(args)) if args[i] == "--set"]
    cfg = load_config(config, sets)
    trainer = None
    try:
        with contextlib.redirect_stdout(sys.stderr):  # stdout is the sweep's summary; a trial's chatter is not
            trainer = Trainer(cfg, progress=False)
            trainer.train()
        return "ok"
    except UsageError:
        raise
    except Exception as e:  # one bad trial (NaN, OOM, ...) must not end the sweep
        cfg.run_dir.mkdir(parents=True, exist_ok=True)
        (cfg.run_dir / "error.txt").write_text(traceback.format_exc(), encoding="utf-8")
        return f"failed: {type(e).__name__}: {e}"
    finally:
        if trainer is not None:
            trainer.close()
        dist.shutdown()


def subprocess_runner(nproc: int):
    """Each trial segment as `ftl launch --nproc-per-node N ...` (its own torchrun job)."""

    def run(args: list[str]) -> str:
        cmd = [sys.executable, "-m", "engine.cli", "launch", "--nproc-per-node", str(nproc), *args]
        rc = subprocess.call(cmd)
        if rc == 2:
            raise UsageError(f"a trial was refused as bad input: {shlex.join(cmd)}")
        return "ok" if rc == 0 else f"failed: exit {rc}"

    return run


def run_local(plan: Plan, out: Path, runner=run_in_process, log=print) -> None:
    """Every trial, one after another; with rungs, successive halving between them."""
    alive = plan.trial_list()
    stages = [*plan.rungs, plan.max_steps]
    for i, stage in enumerate(stages):
        final = stage == plan.max_steps
        log(f"sweep: {len(alive)} trial(s) to step {stage}" + ("" if final else f" (rung {i + 1}/{len(plan.rungs)})"))
        for t in alive:
            if not still_to_run(out / t.name, plan.max_steps, stage):
                continue
            log(f"sweep: {t.name} {' '.join(t.overrides())} -> step {stage}")
            result = runner(train_args(plan, t, out, 0 if final else stage))
            if result != "ok":
                (out / t.name).mkdir(parents=True, exist_ok=True)
                (out / t.name / "FAILED").write_text(result + "\n", encoding="utf-8")
                log(f"sweep: {t.name} {result} (delete {out / t.name / 'FAILED'} to retry it)")
            else:
                check_metric(plan, out / t.name)
        if not final:
            alive = promote(plan, out, alive, stage)


def check_metric(plan: Plan, run_dir: Path) -> None:
    """A metric the runs never log (a typo, or accuracy on an LM) would rank nothing: stop at the first trial."""
    rows = _eval_rows(run_dir)
    if rows and metric_at(run_dir, plan.metric) is None:
        logged = sorted({k for r in rows for k in r if k.startswith("eval_")})
        raise UsageError(f"--metric {plan.metric!r} is not logged by these runs; they log {', '.join(logged)}")


def promote(plan: Plan, out: Path, trials: list[Trial], rung: int) -> list[Trial]:
    """The best ceil(n / eta) trials at `rung` (failed or unmeasured ones never continue)."""
    scored = [(metric_at(out / t.name, plan.metric, rung), t) for t in trials]
    # NaN (a diverged trial) is unmeasured too: it would land anywhere in a sort
    ok = [(v, t) for v, t in scored if _rankable(v) and not (out / t.name / "FAILED").exists()]
    ok.sort(key=lambda vt: vt[0], reverse=plan.mode == "max")
    keep = max(1, math.ceil(len(trials) / plan.eta))
    return [t for _, t in ok[:keep]]


# ------------------------------------------------------------------------------------------ reading

def _eval_rows(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut short by a killed process
        if any(k.startswith("eval_") for k in row):
            rows.append(row)
    return rows


def metric_at(run_dir: Path, metric: str, step: int | None = None):
    """The last logged value of `metric` (at exactly `step` when given), or None."""
    rows = [r for r in _eval_rows(run_dir) if metric in r and (step is None or r["step"] == step)]
    return float(rows[-1][metric]) if rows else None


def _rankable(v) -> bool:
    return v is not None and math.isfinite(v)


def still_to_run(run_dir: Path, max_steps: int, stage: int) -> bool:
    """Whether a trial has yet to reach `stage` (not failed, not finished or early-stopped, not past it)."""
    st = trial_status(run_dir, max_steps)
    return not (st["failed"] or st["done"] or st["step"] >= stage)


def trial_status(run_dir: Path, max_steps: int) -> dict:
    """How far a trial got: {'step', 'done', 'early', 'failed', 'reason'}. A trial that stopped itself
    (eval.patience ran out) is done too, at fewer steps than max_steps."""
    from engine import checkpoint

    failed = (run_dir / "FAILED").read_text(encoding="utf-8").strip() if (run_dir / "FAILED").is_file() else ""
    latest = checkpoint.find_latest(run_dir / "checkpoints")
    state = checkpoint.read_state(latest) if latest else {}
    step = int(state.get("step", 0))
    if state.get("epochs"):  # train.epochs: the trial's own length, resolved when it started
        max_steps = int(state["epochs"]["max_steps"])
    early = bool((state.get("best") or {}).get("stopped")) and step < max_steps
    done = (step >= max_steps or early) and (run_dir / "final").is_dir()
    return {"step": step, "done": done, "early": early and done, "failed": bool(failed), "reason": failed}


@dataclass
class Row:
    trial: str
    status: str
    params: dict
    metric: float | None
    step: int
    run_dir: str

    @property
    def finished(self) -> bool:
        """Trained to max_steps, or stopped by its own eval.patience: either way it will not continue."""
        return self.status == "done" or self.status.startswith("early-stopped")


def collect(plan: Plan, out: Path) -> list[Row]:
    """One row per trial, best first: finished trials by their final metric, then trials stopped at a
    rung (later rungs first, each by its metric), then failed or never-run trials."""
    rows = []
    for t in plan.trial_list():
        d = out / t.name
        st = trial_status(d, plan.max_steps)
        value = metric_at(d, plan.metric, st["step"]) if st["step"] else None
        if st["failed"]:
            status = "failed"
        elif st["done"]:
            status = f"early-stopped@{st['step']}" if st["early"] else "done"
        elif st["step"]:
            status = f"stopped@{st['step']}"
        else:
            status = "not run"
        rows.append(Row(t.name, status, t.params, value, st["step"], str(d)))
    sign = -1.0 if plan.mode == "max" else 1.0

    def key(r: Row):
        # finished trials (early-stopped ones included) compete on their metric alone; rung-stopped
        # ones by how far they got; a NaN metric sorts last in its group
        group = 0 if r.finished else 1 if r.status.startswith("stopped") else 2
        value = sign * r.metric if _rankable(r.metric) and group < 2 else math.inf
        return (group, 0 if group == 0 else -r.step, value, r.trial)

    return sorted(rows, key=key)


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def table(plan: Plan, rows: list[Row]) -> tuple[list[str], list[list[str]]]:
    keys = list(dict.fromkeys(k for r in rows for k in r.params))
    header = ["rank", "trial", "status", *keys, plan.metric, "step"]
    body = [[str(i + 1), r.trial, r.status, *[_fmt(r.params.get(k)) for k in keys], _fmt(r.metric), str(r.step)]
            for i, r in enumerate(rows)]
    return header, body


def render_text(header, body) -> str:
    widths = [max(len(x) for x in col) for col in zip(header, *body)]
    line = lambda cells: "  ".join(c.rjust(w) if i == 0 else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths)))
    return "\n".join([line(header), line(["-" * w for w in widths]), *map(line, body)]).rstrip() + "\n"


def render_markdown(header, body) -> str:
    rows = [header, ["---"] * len(header), *body]
    return "".join("| " + " | ".join(c.replace("|", "\\|") for c in r) + " |\n" for r in rows)


def render_csv(plan: Plan, rows: list[Row]) -> str:
    keys = list(dict.fromkeys(k for r in rows for k in r.params))
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["rank", "trial", "status", *keys, plan.metric, "step", "run_dir"])
    for i, r in enumerate(rows):
        w.writerow([i + 1, r.trial, r.status, *[r.params.get(k, "") for k in keys],
                    "" if r.metric is None else r.metric, r.step, r.run_dir])
    return buf.getvalue()


def write_hparams(plan: Plan, out: Path, rows: list[Row]) -> None:
    """TensorBoard HParams: one session per trial under tb/<trial>/ (params, status, the metric)."""
    from torch.utils.tensorboard import SummaryWriter
    from torch.utils.tensorboard.summary import hparams

    root = out / "tb"
    shutil.rmtree(root, ignore_errors=True)  # rewritten whole, so a re-summary does not duplicate sessions
    tag = f"sweep/{plan.metric}"
    for r in rows:
        if r.metric is None:
            continue
        hp = {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in r.params.items()}
        hp["status"] = r.status
        exp, ssi, sei = hparams(hp, {tag: r.metric})
        with SummaryWriter(str(root / r.trial)) as w:
            for summary in (exp, ssi, sei):
                w.file_writer.add_summary(summary)
            w.add_scalar(tag, r.metric, r.step)


def write_best(plan: Plan, out: Path, best: Row) -> Path:
    """The best trial's resolved config, made ready to train again from scratch: best.yaml."""
    cfg = yaml.safe_load((Path(best.run_dir) / "config.yaml").read_text(encoding="utf-8"))
    cfg["run"]["name"] = f"{out.name}-best"
    cfg["run"]["dir"] = ""
    cfg["train"]["stop_at_step"] = 0
    head = (f"# best trial of sweep {out}: {best.trial} ({plan.metric} {_fmt(best.metric)} at step {best.step})\n"
            f"# its overrides: {' '.join(Trial(best.trial, best.params).overrides()) or '(none)'}\n"
            f"# train it again: ftl train {out / 'best.yaml'}\n")
    path = out / "best.yaml"
    path.write_text(head + yaml.safe_dump(cfg, sort_keys=False), encoding="utf-8")
    return path


def summarize(out: Path, log=print) -> dict:
    """Table to stdout, summary.csv, summary.md, TensorBoard hparams, best.yaml."""
    plan = load_plan(out)
    rows = collect(plan, out)
    header, body = table(plan, rows)
    text = render_text(header, body)
    (out / "summary.csv").write_text(render_csv(plan, rows), encoding="utf-8")
    (out / "summary.md").write_text(f"Sweep `{out}`: {len(rows)} trials, sorted by `{plan.metric}` "
                                    f"({'lower' if plan.mode == 'min' else 'higher'} is better).\n\n"
                                    + render_markdown(header, body), encoding="utf-8")
    write_hparams(plan, out, rows)
    log(text.rstrip())
    result = {"rows": rows, "best": None}
    best = rows[0] if rows and rows[0].finished and _rankable(rows[0].metric) else None
    if best is not None:
        result["best"] = write_best(plan, out, best)
        log(f"best: {best.trial} {plan.metric} {_fmt(best.metric)} -> {result['best']} "
            f"(ftl train {result['best']})")
    else:
        log("best: none (no trial finished with a metric)")
    log(f"summary: {out / 'summary.csv'}, {out / 'summary.md'}; TensorBoard HParams: tensorboard --logdir {out / 'tb'}")
    return result


# ------------------------------------------------------------------------------------------ SLURM
# Submitted through launch/slurm/sweep.sbatch (the launch tooling's array script). Its interface:
#   sbatch --array=0-<N-1> launch/slurm/sweep.sbatch GRID_FILE [CONFIG] [--set key=value ...]
# array task i trains line i of GRID_FILE (whitespace-separated key=value overrides, applied after the
# shared CONFIG and --set) under `ftl launch`, checkpointing and requeueing itself when preempted.
# The script names run directories by task index; every line here sets run.dir itself, so a later
# stage of successive halving (a subset of the trials) still writes into each trial's own directory.



def sweep_script() -> Path:
    """The array script: the source checkout's, else the copy a non-editable install ships."""
    from engine.commands import slurm

    return slurm.template_path("sweep")


def _sbatch_option(args: list[str], long: str, short: str | None = None) -> str | None:
    """The value of an sbatch option among --sbatch-arg values (`--time=1:00`, `--time 1:00`, `-t1:00`)."""
    value = None
    for i, a in enumerate(args):
        if a.startswith(long + "="):
            value = a.split("=", 1)[1]
        elif a == long or (short and a == short):
            value = args[i + 1] if i + 1 < len(args) else None
        elif short and a.startswith(short) and len(a) > len(short):
            value = a[len(short):]
    return value


def time_limit_problem(script: Path, sbatch_args: list[str]) -> str | None:
    """A --time at or under the script's checkpoint signal (`--signal=B:USR1@N`) makes every task get the
    signal before it trains: it saves, exits 75 and requeues, forever."""
    from engine.commands import slurm

    limit = _sbatch_option(sbatch_args, "--time", "-t")
    signal = _sbatch_option(sbatch_args, "--signal")
    if signal is None:
        m = re.search(r"^#SBATCH\s+--signal=(\S+)", script.read_text(encoding="utf-8"), flags=re.M)
        signal = m.group(1) if m else None
    if limit is None or signal is None or "@" not in signal:
        return None
    try:
        seconds = slurm.parse_time(limit)
    except ValueError:
        return f"--sbatch-arg --time {limit!r} is not a SLURM time (M, M:S, H:M:S, D-H, D-H:M, D-H:M:S)"
    before = int(signal.rsplit("@", 1)[1])
    if seconds is not None and seconds <= before:
        return (f"--time {limit} ({seconds} s) is not longer than the array script's checkpoint signal, sent "
                f"{before} s before the limit ({signal}): every task would checkpoint and requeue before it "
                f"trains; ask for more time, or pass --sbatch-arg=--signal=B:USR1@<fewer seconds>")
    return None


def grid_line(plan: Plan, trial: Trial, out: Path, stop_at: int = 0) -> str:
    """One GRID_FILE line: the trial's overrides plus its run directory and stopping step."""
    items = [*trial.overrides(), f"run.dir={out.resolve() / trial.name}", f"run.name={trial.name}",
             f"train.stop_at_step={stop_at}"]
    spaced = [i for i in items if any(c.isspace() for c in i)]
    if spaced:
        raise UsageError(f"--slurm: the array script splits trials on whitespace, so {', '.join(map(repr, spaced))} "
                         f"cannot be swept there; put such values in the config (or run without --slurm)")
    return " ".join(items)


def slurm_submit(plan: Plan, out: Path, stage_trials: list[Trial], stop_at: int, sbatch_args: list[str],
                 nproc: int | None = None) -> str:
    """Submit one array job (task i: the i-th of `stage_trials`, trained to `stop_at`); its job id."""
    import os

    grid = out / f"grid-step{stop_at or plan.max_steps}.txt"
    grid.write_text("".join(grid_line(plan, t, out, stop_at) + "\n" for t in stage_trials), encoding="utf-8")
    (out / "slurm").mkdir(exist_ok=True)
    shared = ([plan.config] if plan.config else []) + [a for o in plan.overrides for a in ("--set", o)]
    cmd = ["sbatch", "--parsable", f"--array=0-{len(stage_trials) - 1}", f"--job-name=ftl-sweep-{out.name}",
           f"--output={out.resolve() / 'slurm' / '%x-%A_%a.out'}", *sbatch_args, str(sweep_script()), str(grid.resolve()),
           *shared]
    env = dict(os.environ, FTL_PYTHON=sys.executable, FTL_SWEEP_DIR=str(out.resolve()))
    if nproc:
        env["FTL_NPROC_PER_NODE"] = str(nproc)
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise UsageError(f"sbatch refused the sweep ({proc.returncode}): {proc.stderr.strip()}\n"
                         f"  command: {shlex.join(cmd)}")
    return proc.stdout.strip().split(";")[0]


def slurm_wait(job_id: str, poll_s: float = 5.0) -> None:
    """Until no task of the array job is pending or running (squeue lists only those; a requeued
    task is pending again, so this follows requeues)."""
    while True:
        q = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%i"], capture_output=True, text=True)
        if q.returncode != 0 or not q.stdout.strip():
            return
        time.sleep(poll_s)


def slurm_preflight(plan: Plan, out: Path, sbatch_args: list[str] = ()) -> None:
    """Everything --slurm needs, checked before the sweep directory is written."""
    problems = []
    try:
        problems += filter(None, [time_limit_problem(sweep_script(), list(sbatch_args))])
    except UsageError as e:
        problems += e.problems
    if shutil.which("sbatch") is None:
        problems.append("--slurm: sbatch is not on PATH; run on a SLURM login node, or drop --slurm to run locally")
    for t in plan.trial_list():
        try:
            grid_line(plan, t, out)
        except UsageError as e:
            problems += [p for p in e.problems if p not in problems]
    if problems:
        raise UsageError(problems)


def run_slurm(plan: Plan, out: Path, sbatch_args: list[str], wait: bool, nproc: int | None = None, log=print,
              poll_s: float = 5.0) -> list[str]:
    """One array job per stage; with rungs the driver waits for each and promotes in between."""
    alive = plan.trial_list()
    jobs = []
    for stage in [*plan.rungs, plan.max_steps]:
        final = stage == plan.max_steps
        todo = [t for t in alive if still_to_run(out / t.name, plan.max_steps, stage)]
        if todo:
            job = slurm_submit(plan, out, todo, 0 if final else stage, sbatch_args, nproc)
            jobs.append(job)
            log(f"sweep: submitted array job {job} ({len(todo)} task(s) to step {stage}); logs in {out / 'slurm'}")
            if not wait:
                return jobs
            slurm_wait(job, poll_s)
        if not final:
            alive = promote(plan, out, alive, stage)
    return jobs
