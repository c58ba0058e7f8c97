"""Experiment trackers beside metrics.jsonl: MLflow and Weights & Biases (`run.report_to`).

`metrics.Metrics` (rank 0 only) hands every row it writes to metrics.jsonl to `Trackers.log`, so a
tracker holds the same names at the same steps. TensorBoard stays in metrics.py (it is the default and
always installed); this module owns the optional ones, each an extra of the package:

    pip install 'ftl-engine[mlflow]'      # mlflow-skinny + the SQLite backend it needs
    pip install 'ftl-engine[wandb]'

MLflow, by its own conventions:
- the tracking URI is MLFLOW_TRACKING_URI when set, else a SQLite store in the run directory,
  sqlite:///<run dir>/mlruns/mlflow.db (MLflow's default backend since the file store went into
  maintenance mode), with artifacts under <run dir>/mlruns/artifacts; `mlflow ui --backend-store-uri
  sqlite:///<run dir>/mlruns/mlflow.db` shows it. The experiment is MLFLOW_EXPERIMENT_NAME, else "ftl-engine".
- one MLflow run per engine run: its id is kept in <run dir>/mlflow.json and every later attempt (a resume
  after preemption, a crash, a raised max_steps) continues it. Each attempt after the first tags the step it
  started from (ftl.resumed_from_step, and ftl.resume_steps listing every one).
- params are the resolved config, flattened (`optim.lr`). MLflow params cannot change, so a value that
  differs in a later attempt is recorded as the tag `ftl.changed.<key>` ("<value> from step N").
- metrics keep metrics.jsonl's names and steps. MLflow cannot delete history: a failed attempt's values past
  the checkpoint stay, and the resumed attempt logs those steps again, later, so the last value logged for a
  step is the one metrics.jsonl holds (MLflow's UI and `MlflowClient.get_metric_history` order by time).
- the run ends FINISHED after a complete run, KILLED when the attempt stops early (preemption, Ctrl-C,
  a failure); the next attempt sets it RUNNING again.

Weights & Biases: `wandb.init` with the run directory as `dir`, the resolved config, and an id kept in
<run dir>/wandb.json with resume="allow", so attempts continue one W&B run. W&B needs steps that only grow,
which a resume from an earlier checkpoint breaks; the engine's step is therefore logged as the metric
`step` and declared every metric's x-axis (`define_metric`), as W&B recommends for resumed runs. WANDB_MODE,
WANDB_PROJECT (default "ftl-engine"), WANDB_ENTITY etc. are W&B's own; `WANDB_MODE=offline` writes everything
under <run dir>/wandb/ for a later `wandb sync`.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import secrets
import time
from pathlib import Path

TRACKERS = ("tensorboard", "mlflow", "wandb")
# report_to entry -> (modules it imports, the pip command that installs them)
EXTRAS = {
    "mlflow": (("mlflow", "sqlalchemy", "alembic"), "pip install 'ftl-engine[mlflow]'"),
    "wandb": (("wandb",), "pip install 'ftl-engine[wandb]'"),
}
EXPERIMENT = "ftl-engine"


def problems(report_to: list[str]) -> list[str]:
    """Unknown tracker names and trackers whose packages are not installed, with the command that installs them."""
    out = []
    unknown = [t for t in report_to if t not in TRACKERS]
    if unknown:
        out.append(f"run.report_to: unknown tracker(s) {', '.join(map(repr, unknown))}; choose from {', '.join(TRACKERS)}")
    if len(set(report_to)) != len(report_to):
        out.append(f"run.report_to lists a tracker twice ({report_to})")
    for name in report_to:
        if name not in EXTRAS:
            continue
        modules, pip = EXTRAS[name]
        if name == "mlflow" and not _default_mlflow_store(os.environ.get("MLFLOW_TRACKING_URI", "")):
            modules = ("mlflow",)  # a server or another store: the SQLite backend is not needed
        missing = [m for m in modules if not _installed(m)]
        if missing:
            out.append(f"run.report_to includes {name} but {', '.join(missing)} {'is' if len(missing) == 1 else 'are'} "
                       f"not installed: {pip}")
    return out


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def _default_mlflow_store(uri: str) -> bool:
    return not uri or uri.startswith("sqlite:")


def flatten(tree: dict, prefix: str = "") -> dict[str, str]:
    """The resolved config as MLflow/W&B params: "section.key" -> its value as text."""
    out: dict[str, str] = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = json.dumps(v) if isinstance(v, (list, dict)) else str(v)
    return out


def numeric(values: dict) -> dict[str, float]:
    """The scalar metrics of a metrics.jsonl row (numbers, not flags, not lists; non-finite ones left out)."""
    return {k: float(v) for k, v in values.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}


class Trackers:
    """The optional trackers of one attempt on rank 0; `log` and `close` fan out to each."""

    def __init__(self, sinks: list):
        self.sinks = sinks

    @classmethod
    def open(cls, report_to, run_dir: Path, config: dict | None, start_step: int) -> "Trackers":
        sinks = []
        try:
            if "mlflow" in report_to:
                sinks.append(MlflowSink(run_dir, config or {}, start_step))
            if "wandb" in report_to:
                sinks.append(WandbSink(run_dir, config or {}, start_step))
        except BaseException:
            for s in sinks:
                s.close(finished=False)
            raise
        return cls(sinks)

    def log(self, step: int, values: dict) -> None:
        scalars = numeric(values)
        if scalars:
            for s in self.sinks:
                s.log(step, scalars)

    def close(self, finished: bool) -> None:
        for s in self.sinks:
            s.close(finished)
        self.sinks = []


# ---------------------------------------------------------------------------------------------- MLflow

class MlflowSink:
    STATE = "mlflow.json"  # in the run directory: which MLflow run this engine run is

    def __init__(self, run_dir: Path, config: dict, start_step: int):
        from mlflow.tracking import MlflowClient

        run_dir = Path(run_dir).resolve()
        env_uri = os.environ.get("MLFLOW_TRACKING_URI", "")
        store = run_dir / "mlruns"
        if env_uri:
            uri, artifacts = env_uri, None
        else:
            store.mkdir(parents=True, exist_ok=True)
            uri, artifacts = f"sqlite:///{store / 'mlflow.db'}", (store / "artifacts").as_uri()
        self.client = MlflowClient(tracking_uri=uri)
        self.state_file = run_dir / self.STATE
        saved = json.loads(self.state_file.read_text(encoding="utf-8")) if self.state_file.is_file() else {}
        params = flatten(config)
        run = None
        if saved.get("tracking_uri") == uri:
            try:
                run = self.client.get_run(saved["run_id"])
            except Exception:  # deleted, or a store that no longer has it: start a new one below
                run = None
        if run is None:
            name = os.environ.get("MLFLOW_EXPERIMENT_NAME") or EXPERIMENT
            exp = self.client.get_experiment_by_name(name)
            exp_id = exp.experiment_id if exp is not None else self.client.create_experiment(name, artifacts)
            run = self.client.create_run(exp_id, run_name=run_dir.name,
                                         tags={"ftl.run_dir": str(run_dir), "mlflow.source.name": "ftl train"})
            self._log_params(run.info.run_id, params)
            tmp = self.state_file.with_name(self.STATE + ".tmp")
            tmp.write_text(json.dumps({"tracking_uri": uri, "run_id": run.info.run_id,
                                       "experiment_id": run.info.experiment_id}) + "\n", encoding="utf-8")
            os.replace(tmp, self.state_file)
            if start_step:  # a run directory that predates report_to=mlflow: say where MLflow's history begins
                self.client.set_tag(run.info.run_id, "ftl.first_step", str(start_step))
        else:
            rid = run.info.run_id
            self.client.update_run(rid, status="RUNNING")
            steps = [s for s in run.data.tags.get("ftl.resume_steps", "").split(",") if s] + [str(start_step)]
            self.client.set_tag(rid, "ftl.resumed_from_step", str(start_step))
            self.client.set_tag(rid, "ftl.resume_steps", ",".join(steps))
            logged = run.data.params
            self._log_params(rid, {k: v for k, v in params.items() if k not in logged})
            for k, v in params.items():  # a change is tagged once, at the step it took effect
                known = run.data.tags.get(f"ftl.changed.{k}", "").rsplit(" from step ", 1)[0]
                if k in logged and logged[k] != v and known != v:
                    self.client.set_tag(rid, f"ftl.changed.{k}", f"{v} from step {start_step}"[:5000])
        self.run_id = run.info.run_id

    def _log_params(self, run_id: str, params: dict[str, str]) -> None:
        from mlflow.entities import Param

        items = [Param(k, v[:6000]) for k, v in params.items()]
        for i in range(0, len(items), 100):  # MLflow takes at most 100 params per batch
            self.client.log_batch(run_id, params=items[i:i + 100])

    def log(self, step: int, scalars: dict[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, step) for k, v in scalars.items()])

    def close(self, finished: bool) -> None:
        self.client.set_terminated(self.run_id, "FINISHED" if finished else "KILLED")


# ---------------------------------------------------------------------------------------------- W&B

class WandbSink:
    STATE = "wandb.json"

    def __init__(self, run_dir: Path, config: dict, start_step: int):
        import wandb

        run_dir = Path(run_dir).resolve()
        self.state_file = run_dir / self.STATE
        saved = json.loads(self.state_file.read_text(encoding="utf-8")) if self.state_file.is_file() else {}
        run_id = saved.get("run_id") or secrets.token_hex(4)  # W&B ids: [a-z0-9]
        if not saved:
            self.state_file.write_text(json.dumps({"run_id": run_id}) + "\n", encoding="utf-8")
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT") or EXPERIMENT, name=run_dir.name, id=run_id,
                              resume="allow", dir=str(run_dir), config=config,
                              settings=wandb.Settings(console="off", quiet=True))
        # the engine's step as every metric's x-axis: W&B's own step must only grow, which a resume breaks
        self.run.define_metric("step")
        self.run.define_metric("*", step_metric="step")
        if start_step:
            self.run.summary["ftl.resumed_from_step"] = start_step

    def log(self, step: int, scalars: dict[str, float]) -> None:
        self.run.log({**scalars, "step": step})

    def close(self, finished: bool) -> None:
        self.run.finish(exit_code=0 if finished else 1)
