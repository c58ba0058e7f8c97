"""Per-rank memory: what the backend's layout should take (planned, printed at start) and what each rank
measurably holds after the first optimizer step (printed, and logged once to metrics.jsonl as `memory`)."""

from __future__ import annotations

from engine import dist


def fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def _parts(report: dict) -> str:
    keys = [k for k in ("params", "grads", "optimizer", "params_at_build") if k in report]
    text = " | ".join(f"{k.replace('_', ' ')} {fmt_bytes(report[k])}" for k in keys)
    for k in ("cuda_max_allocated", "host_max_rss"):
        if k in report:
            text += f" | {k.replace('_', ' ')} {fmt_bytes(report[k])}"
    if report.get("offloaded"):
        text += f" (offloaded to cpu: {', '.join(report['offloaded'])})"
    return text


def planned_line(backend) -> str:
    report = backend.memory_report()
    return f"memory per rank, planned for {backend.name}: " + (_parts(report) if report else "n/a")


def log_measured(backend, metrics, step: int, built_param_bytes: int | None = None) -> dict:
    """Every rank calls this once (it gathers); rank 0 prints and logs one metrics row. `built_param_bytes`:
    the parameter bytes this rank held as whole tensors right after the model was built (`params_at_build`)."""
    mine = backend.measured_memory()
    if built_param_bytes is not None:
        mine["params_at_build"] = built_param_bytes
    everyone = dist.all_gather_object(mine)
    row = {"memory": {"backend": backend.name, "planned": backend.memory_report(), "measured": everyone}}
    metrics.log(step, row)
    for rank, report in enumerate(everyone):
        metrics.print(f"memory rank {rank}, measured after step {step}: {_parts(report)}")
    return row
