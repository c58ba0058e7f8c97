"""The results part of a gpu_check.sh run: reads what the sections left in the output folder (complete or cut
short) and appends the numbers to summary.md, and writes them to results.json.

    python benchmarks/gpu_check_report.py OUT_DIR

Missing pieces are reported as missing, never guessed."""

from __future__ import annotations

import json
import sys
from pathlib import Path

MFU_FORMULA = ("MFU = tokens/s x FLOPs per token / peak dense bf16 FLOP/s of the GPU; FLOPs per token = 6 N + "
               "12 L H Q T (N parameters without position embeddings and vocabulary padding, L layers, H heads, Q "
               "head dim, T sequence length; GPT-2 124M at T=1024: 855.2 MFLOP); peaks in engine/metrics.py "
               "(H100/H200 SXM: 989 TFLOP/s)")


def _grid(path: Path) -> dict | None:
    for name in ("throughput.json", "throughput.partial.json"):
        if (path / name).is_file():
            report = json.loads((path / name).read_text())
            report["complete"] = name == "throughput.json"
            return report
    return None


def _fmt(v, spec: str, unit: str = "") -> str:
    return "-" if v is None else format(v, spec) + unit


def summarize(out: Path) -> dict:
    result: dict = {"environment": None, "sections": [], "points": [], "profiles": {}, "max_micro_batch": None,
                    "jit_builds": [], "mfu_formula": MFU_FORMULA}
    if (out / "environment.json").is_file():
        result["environment"] = json.loads((out / "environment.json").read_text())
    if (out / "sections.jsonl").is_file():
        result["sections"] = [json.loads(line) for line in (out / "sections.jsonl").read_text().splitlines() if line]
    for name in ("point124m", "eager124m", "zero2"):
        grid = _grid(out / name)
        if grid is None:
            continue
        for row in grid["points"]:
            for impl, r in row["results"].items():
                result["points"].append({
                    "section": name, "point": row["label"], "impl": impl, "tokens_per_s": r["tokens_per_s"],
                    "mfu": r["mfu"], "peak_gpu_mib": r["peak_gpu_mib"], "step_time_ms": r["step_time_ms"],
                    "ratio_ours_to_this": row.get("ratio", {}).get(impl), "compiled": r.get("compiled"),
                    "complete": grid["complete"]})
            for impl, why in row.get("failed", {}).items():
                result["points"].append({"section": name, "point": row["label"], "impl": impl, "failed": why})
        if grid.get("profile"):
            result["profiles"][name] = grid["profile"]
    if (out / "maxbatch" / "max_micro_batch.json").is_file():
        result["max_micro_batch"] = json.loads((out / "maxbatch" / "max_micro_batch.json").read_text())
    log = out / "tests.log"
    if log.is_file():  # pytest -v: one line per test as it finishes (a run cut short still shows its part)
        text = log.read_text(errors="replace")
        import re

        outcomes = re.findall(r"^(tests/gpu/\S+) (PASSED|FAILED|SKIPPED|ERROR)", text, re.M)
        result["tests"] = {"passed": sum(o == "PASSED" for _, o in outcomes),
                           "failed": [t for t, o in outcomes if o in ("FAILED", "ERROR")],
                           "skipped": sum(o == "SKIPPED" for _, o in outcomes),
                           "collected": len(re.findall(r"^tests/gpu/\S+::\S+$", text, re.M))}
    ext = out / "torch_extensions"
    if ext.is_dir():  # one folder per op DeepSpeed (or torch) compiled at run time
        result["jit_builds"] = sorted(p.name for p in ext.rglob("*") if p.is_dir() and any(p.glob("*.so")))
    return result


def markdown(result: dict) -> str:
    env = result["environment"] or {}
    lines = ["", "## Results", "",
             f"Machine: {env.get('gpu') or 'no GPU (dry run on the CPU)'}; torch {env.get('torch')} (CUDA "
             f"{env.get('cuda')}), transformers {env.get('transformers')}, deepspeed {env.get('deepspeed')}, "
             f"triton {env.get('triton')}, Python {env.get('python')}.", "", MFU_FORMULA + ".", "",
             "| section | point | impl | tokens/s | MFU | step ms | peak GPU MiB | ours / impl |",
             "|---|---|---|---|---|---|---|---|"]
    for p in result["points"]:
        if "failed" in p:
            lines.append(f"| {p['section']} | {p['point']} | {p['impl']} | FAILED: {p['failed']} | | | | |")
            continue
        mfu = None if p["mfu"] is None else 100 * p["mfu"]
        note = "" if p["complete"] else " (partial)"
        lines.append(f"| {p['section']}{note} | {p['point']} | {p['impl']} | {_fmt(p['tokens_per_s'], ',.0f')} | "
                     f"{_fmt(mfu, '.1f', '%')} | {_fmt(p['step_time_ms'], '.1f')} | {_fmt(p['peak_gpu_mib'], ',.0f')} | "
                     f"{'1.00' if p['impl'] == 'ours' else _fmt(p['ratio_ours_to_this'], '.2f')} |")
    if not result["points"]:
        lines.append("| (no benchmark section finished) | | | | | | | |")
    lines.append("")
    for name, prof in result["profiles"].items():
        lines.append(f"Profile ({name}, {prof['point']}): host syncs per step {prof.get('host_syncs_per_step')} "
                     f"({prof.get('host_syncs')}), table in {name}/profile.txt.")
    if not result["profiles"]:
        lines.append("Profile: none finished.")
    mmb = result["max_micro_batch"]
    if mmb:
        for row in mmb:
            lines.append(f"Largest micro-batch ({row['preset']}, {row['backend']}, T={row['seq_len']}): "
                         f"{row['micro_batch']} (peak {_fmt(row.get('peak_gpu_mib'), ',.0f')} MiB; search stopped: "
                         f"{row.get('stopped')}).")
    else:
        lines.append("Largest micro-batch: not measured.")
    tests = result.get("tests")
    if tests and (tests["passed"] or tests["failed"] or tests["skipped"]):
        lines.append(f"tests/gpu (not gpu_heavy): {tests['passed']} passed, {len(tests['failed'])} failed"
                     + (f" ({', '.join(tests['failed'])})" if tests["failed"] else "")
                     + f", {tests['skipped']} skipped.")
    elif tests:
        lines.append(f"tests/gpu: {tests['collected']} collected, none run (dry run: collection only).")
    builds = result["jit_builds"]
    lines.append(f"JIT-built ops (DeepSpeed/torch extensions, time included in the sections): {len(builds)}"
                 + (f" ({', '.join(builds)})" if builds else "") + ".")
    not_ok = [s for s in result["sections"] if s["status"] != "ok"]
    lines.append("Not measured: " + ("; ".join(f"{s['section']} ({s['status']})" for s in not_ok) if not_ok
                                     else "nothing, every section finished") + ".")
    return "\n".join(lines) + "\n"


def main(out_dir: str) -> None:
    out = Path(out_dir)
    result = summarize(out)
    (out / "results.json").write_text(json.dumps(result, indent=1), encoding="utf-8")
    with open(out / "summary.md", "a", encoding="utf-8") as f:
        f.write(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main(sys.argv[1])
