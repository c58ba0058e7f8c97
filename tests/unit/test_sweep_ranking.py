"""Sweep bookkeeping on hand-made trial directories: an early-stopped trial is finished (ranked by its
metric, never re-run, eligible as best), and a NaN metric is never promoted nor ranked first."""

import json
import math

from engine import checkpoint
from engine.commands import sweep


def _plan(names, metric="eval_loss", max_steps=8, rungs=()):
    return sweep.Plan(config=None, overrides=[], params=[], random=0, seed=0, metric=metric,
                      mode=sweep.metric_mode(metric, "auto"), rungs=list(rungs), eta=2, max_steps=max_steps,
                      trials=[{"name": n, "params": {"optim.lr": i}} for i, n in enumerate(names)])


def _trial(out, name, step, evals, early=False, final=True):
    """A run directory as the trainer leaves it: metrics.jsonl, a complete checkpoint at `step`, final/."""
    d = out / name
    (d / "checkpoints" / checkpoint.step_dir_name(step)).mkdir(parents=True)
    ck = d / "checkpoints" / checkpoint.step_dir_name(step)
    (ck / checkpoint.STATE).write_text(json.dumps({"step": step, "best": {"stopped": early}}))
    (ck / checkpoint.COMPLETE).write_text("ok\n")
    (d / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "eval_loss": v}) + "\n" for s, v in evals))
    (d / "config.yaml").write_text(f"run: {{name: {name}, dir: {d}}}\ntrain: {{stop_at_step: 0}}\n")
    if final:
        (d / "final").mkdir()
    return d


def test_an_early_stopped_trial_is_finished_and_can_be_best(tmp_path):
    plan = _plan(["trial-000", "trial-001", "trial-002"])
    _trial(tmp_path, "trial-000", 8, [(4, 3.0), (8, 2.5)])
    _trial(tmp_path, "trial-001", 4, [(2, 2.2), (4, 2.0)], early=True)  # patience ran out at step 4
    _trial(tmp_path, "trial-002", 4, [(4, 1.0)], final=False)  # stopped at a rung: never ahead of finished ones
    rows = sweep.collect(plan, tmp_path)
    assert [(r.trial, r.status) for r in rows] == [("trial-001", "early-stopped@4"), ("trial-000", "done"),
                                                   ("trial-002", "stopped@4")]
    assert not sweep.still_to_run(tmp_path / "trial-001", plan.max_steps, plan.max_steps)  # not re-run
    assert sweep.still_to_run(tmp_path / "trial-002", plan.max_steps, plan.max_steps)
    sweep.write_plan(plan, tmp_path)
    assert sweep.summarize(tmp_path, log=lambda *_: None)["best"] == tmp_path / "best.yaml"
    assert "# best trial of sweep" in (tmp_path / "best.yaml").read_text()
    assert "trial-001 (eval_loss 2 at step 4)" in (tmp_path / "best.yaml").read_text()


def test_a_nan_metric_is_never_promoted_nor_ranked_first(tmp_path):
    names = ["trial-000", "trial-001", "trial-002", "trial-003"]
    plan = _plan(names, rungs=[2])
    for name, v in zip(names, [float("nan"), 2.0, 1.5, 3.0]):
        _trial(tmp_path, name, 2, [(2, v)], final=False)
    promoted = sweep.promote(plan, tmp_path, plan.trial_list(), 2)
    assert [t.name for t in promoted] == ["trial-002", "trial-001"]
    rows = sweep.collect(plan, tmp_path)
    assert [r.trial for r in rows] == ["trial-002", "trial-001", "trial-003", "trial-000"]
    assert math.isnan(rows[-1].metric)
