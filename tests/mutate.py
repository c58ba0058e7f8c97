"""Mutation testing of the engine's core: does a test fail when the code is broken on purpose?

    python tests/mutate.py                      # every target below, its fast tests against each mutant
    python tests/mutate.py --only losses checkpoint --list      # the mutants, without running anything
    python tests/mutate.py --only data --json out.json          # one target, a machine-readable report too
    python tests/mutate.py --only backends --tests tests/distributed/test_communication.py   # other tests

Each mutant is ONE small change to a copy of the repository (an operator flipped, a comparison turned, a constant
moved, a condition negated, a call statement removed, a call argument replaced by None) inside a function listed
in TARGETS. The target's tests then run against the copy (`pytest -x`, one mutant at a time); a failure or a
timeout kills the mutant, a pass lets it survive. Survivors are printed with their place and change, and the
score of each target (killed / (all - known equivalent)). A survivor is either a missing test (write it) or an
equivalent mutant, one that changes no behaviour; the latter are listed, one line each with the reason, in
tests/README.md under "Equivalent mutants" (their ids, as printed here), and are reported as EQUIVALENT.

The working tree is never touched: mutants live in a scratch copy (--workdir, default a temporary directory),
with bytecode caching off so a mutant never runs a stale .pyc. It does not run in CI (it takes tens of minutes on
2 cores); run it before and after changing a core module or its tests. docs/testing.md has the scores.
"""

from __future__ import annotations

import argparse
import ast
import copy
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
REPO = ROOT  # the repository mutated (--repo: e.g. an older commit, for a before/after comparison)

@dataclass
class Target:
    module: str
    functions: list[str]  # qualified names (Class.method); nested functions are not mutated
    tests: list[str]  # the fast tests that should notice a change there (files or node ids)
    env: dict = field(default_factory=dict)  # for those tests (e.g. a narrower scenario set)


_F = "tests/unit/test_fault_units.py::"
TARGETS: dict[str, Target] = {
    "losses": Target("engine/losses.py", ["lm_loss_sum", "cls_loss_sum", "class_weights", "target_count"],
                     ["tests/unit/test_loss_guards.py", "tests/unit/test_losses_optim.py", "tests/unit/test_imbalance.py",
                      "tests/unit/test_class_weights_model.py", "tests/unit/test_regularization.py",
                      "tests/integration/test_class_weights_train.py"]),
    "checkpoint": Target("engine/checkpoint.py", ["is_complete", "list_complete", "find_latest", "_write_atomic",
                                                  "_fsync_tree", "_delete", "Checkpointer.save", "Checkpointer._retain",
                                                  "Checkpointer.load"],
                         ["tests/unit/test_commit_order.py", "tests/unit/test_checkpoint_guards.py",
                          _F + "test_save_is_complete_atomic_and_retained",
                          _F + "test_retention_after_a_rollback_keeps_the_new_saves",
                          _F + "test_a_failed_delete_is_a_warning_not_a_crash", _F + "test_resume_target_resolution",
                          _F + "test_world_size_change_goes_through_load_resharded",
                          _F + "test_checkpoints_never_execute_pickles", _F + "test_rng_round_trip_through_a_file",
                          "tests/distributed/test_checkpoint_barrier.py"]),
    "sampler": Target("engine/data/sources.py", ["GlobalSampler._permutation", "GlobalSampler.indices",
                                         "BalancedSampler.indices", "Layout.global_batch", "Layout.positions",
                                         "TrainBatches.micro_batches", "TrainBatches.next"],
                      ["tests/unit/test_data.py", "tests/unit/test_prefetch_guards.py",
                       _F + "test_data_order_after_resume_is_the_uninterrupted_order_on_any_layout",
                       "tests/unit/test_imbalance.py", "tests/integration/test_class_weights_train.py"]),
    "config": Target("engine/config.py", ["positive", "within", "TrainConfig.problems", "CheckpointConfig.problems",
                                          "LossConfig.problems", "Config.validate", "load_config"],
                     ["tests/unit/test_config.py", "tests/unit/test_config_guards.py",
                      "tests/unit/test_imbalance.py::test_fine_tuning_config_problems_are_reported_together",
                      "tests/integration/test_bad_input.py"]),
    "ddp": Target("engine/backends/ddp.py", ["DDPBackend.accumulate", "DDPBackend.backward", "DDPBackend.step"],
                  ["tests/unit/test_backend_guards.py", _F + "test_a_nonfinite_step_leaves_weights_and_optimizer_state_untouched",
                   _F + "test_fp16_loss_scale_backs_off_and_recovers", "tests/distributed/test_communication.py",
                   "tests/distributed/test_grad_accum_equivalence.py"],
                  {"FTL_COMM_BACKENDS": "ddp"}),
    "deepspeed": Target("engine/backends/deepspeed.py", ["DeepSpeedBackend.accumulate", "DeepSpeedBackend.backward",
                                                         "DeepSpeedBackend.step"],
                        ["tests/distributed/test_deepspeed_step.py", "tests/distributed/test_communication.py",
                         "tests/distributed/test_deepspeed.py::test_a_nan_step_is_skipped_at_every_stage[0]"],
                        {"FTL_COMM_BACKENDS": "zero1,zero2"}),
    "fsdp": Target("engine/backends/fsdp.py", ["FSDPBackend.accumulate", "FSDPBackend.backward", "FSDPBackend.step",
                                               "FSDPBackend._global_norm"],
                   ["tests/distributed/test_communication.py",
                    "tests/integration/test_fsdp_cli.py::test_non_finite_steps_are_skipped_and_saving_before_the_first_update_changes_nothing"],
                   {"FTL_COMM_BACKENDS": "fsdp,fsdp_step"}),
}
OPERATORS = ("operator", "comparison", "boolean", "not", "constant", "condition", "statement", "argument")
DEFAULT_OPERATORS = tuple(o for o in OPERATORS if o != "argument")  # argument -> None: mostly crashes, slow to run

SWAP_BINOP = {ast.Add: ast.Sub, ast.Sub: ast.Add, ast.Mult: ast.Div, ast.Div: ast.Mult, ast.FloorDiv: ast.Mult,
              ast.Mod: ast.FloorDiv, ast.Pow: ast.Mult}
SWAP_CMP = {ast.Eq: ast.NotEq, ast.NotEq: ast.Eq, ast.Lt: ast.LtE, ast.LtE: ast.Lt, ast.Gt: ast.GtE, ast.GtE: ast.Gt,
            ast.In: ast.NotIn, ast.NotIn: ast.In, ast.Is: ast.IsNot, ast.IsNot: ast.Is}


@dataclass
class Mutant:
    target: str
    path: str
    function: str
    line: int
    kind: str
    before: str
    after: str
    start: int  # character offsets of the replaced source in the file
    end: int
    occurrence: int = 0  # among mutants of this function with the same (kind, before, after)

    @property
    def id(self) -> str:
        return f"{self.path}:{self.function}:{self.kind}:{_one_line(self.before)} -> {_one_line(self.after)}#{self.occurrence}"

    def apply(self, source: str) -> str:
        return source[:self.start] + self.after + source[self.end:]


# ------------------------------------------------------------------------------------------- mutants

def _offsets(source: str) -> list[int]:
    starts, pos = [], 0
    for line in source.splitlines(keepends=True):
        starts.append(pos)
        pos += len(line)
    return starts


def _functions(tree: ast.Module):
    """(qualified name, node) of every function and method, properties included."""
    def walk(node, prefix):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                yield prefix + child.name, child
                yield from walk(child, prefix + child.name + ".")
            elif isinstance(child, ast.ClassDef):
                yield from walk(child, prefix + child.name + ".")
    yield from walk(tree, "")


def _stringish(node: ast.AST) -> bool:
    return (isinstance(node, ast.JoinedStr) or (isinstance(node, ast.Constant) and isinstance(node.value, str))
            or (isinstance(node, ast.Name) and node.id.isupper()))


def _obvious_type_error(node: ast.BinOp) -> bool:
    """Swaps that only raise TypeError (list/str concatenation, Path / name): killed by any test reaching them,
    so not worth a test run each."""
    concat = (ast.List, ast.ListComp, ast.JoinedStr)
    if isinstance(node.op, ast.Add):
        sides = (node.left, node.right)
        return any(isinstance(x, concat) or _stringish(x) or (isinstance(x, ast.Call) and isinstance(x.func, ast.Name)
                   and x.func.id in ("positive", "within")) for x in sides) or any(
                   isinstance(x, ast.BinOp) and _obvious_type_error(x) for x in sides)
    return isinstance(node.op, ast.Div) and (_stringish(node.right) or isinstance(node.right, ast.Call))


# keyword arguments whose value only changes presentation, not behaviour
COSMETIC_KEYWORDS = {"indent", "stacklevel", "desc"}


def _changes(node: ast.AST):
    """(kind, replacement node or source text) for one node."""
    if isinstance(node, ast.BinOp) and type(node.op) in SWAP_BINOP and not _obvious_type_error(node):
        new = copy.deepcopy(node)
        new.op = SWAP_BINOP[type(node.op)]()
        yield "operator", new
    elif isinstance(node, ast.Compare) and len(node.ops) == 1 and type(node.ops[0]) in SWAP_CMP:
        new = copy.deepcopy(node)
        new.ops = [SWAP_CMP[type(node.ops[0])]()]
        yield "comparison", new
    elif isinstance(node, ast.BoolOp):
        new = copy.deepcopy(node)
        new.op = ast.Or() if isinstance(node.op, ast.And) else ast.And()
        yield "boolean", new
    elif isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not):
        yield "not", node.operand
    elif isinstance(node, ast.Constant) and not isinstance(node.value, (str, bytes)) and node.value is not None:
        v = node.value
        if isinstance(v, bool):
            yield "constant", ast.Constant(not v)
        elif isinstance(v, int):
            yield "constant", ast.Constant(1 if v == 0 else 0 if v == 1 else v + 1)
        elif isinstance(v, float):
            yield "constant", ast.Constant(1.0 if v == 0.0 else v * 2)
    elif isinstance(node, (ast.If, ast.While, ast.IfExp)) and not isinstance(node.test, (ast.Compare, ast.UnaryOp)):
        yield "condition", ("test", ast.UnaryOp(ast.Not(), copy.deepcopy(node.test)))
    elif isinstance(node, ast.Expr) and isinstance(node.value, ast.Call):
        yield "statement", "pass"
    elif isinstance(node, ast.Call):
        for i, arg in enumerate(node.args):
            if isinstance(arg, (ast.Name, ast.Attribute)):
                yield "argument", ("arg", i)
        for kw in node.keywords:
            if kw.arg and isinstance(kw.value, (ast.Name, ast.Attribute)):
                yield "argument", ("kw", kw.arg)


def _one_line(text: str) -> str:
    return " ".join(text.split())


def mutants(target: str, operators=DEFAULT_OPERATORS) -> list[Mutant]:
    path, functions = TARGETS[target].module, TARGETS[target].functions
    source = (REPO / path).read_text(encoding="utf-8")
    tree = ast.parse(source)
    starts = _offsets(source)

    def off(line, col):
        return starts[line - 1] + len(source.splitlines(keepends=True)[line - 1].encode()[:col].decode())

    found = {name: fn for name, fn in _functions(tree)}
    missing = [f for f in functions if f not in found]
    if missing:
        raise SystemExit(f"tests/mutate.py: {path} has no function {', '.join(missing)} (update TARGETS)")
    out: list[Mutant] = []
    for name in functions:
        fn = found[name]
        body_nodes = [n for stmt in fn.body for n in ast.walk(stmt)]
        nested = {id(n) for inner in body_nodes if isinstance(inner, (ast.FunctionDef, ast.AsyncFunctionDef))
                  for n in ast.walk(inner) if n is not inner}  # nested functions belong to themselves, if listed
        nested |= {id(kw.value) for kw in body_nodes if isinstance(kw, ast.keyword) and kw.arg in COSMETIC_KEYWORDS}
        for node in body_nodes:
            if id(node) in nested or not hasattr(node, "lineno") or _is_docstring(node, fn):
                continue
            segment = ast.get_source_segment(source, node)
            start, end = off(node.lineno, node.col_offset), off(node.end_lineno, node.end_col_offset)
            for kind, change in _changes(node):
                if kind not in operators:
                    continue
                if kind == "condition":
                    test = node.test
                    seg = ast.get_source_segment(source, test)
                    s, e = off(test.lineno, test.col_offset), off(test.end_lineno, test.end_col_offset)
                    out.append(Mutant(target, path, name, test.lineno, kind, seg, f"not ({seg})", s, e))
                elif kind == "argument":
                    where, which = change
                    arg = node.args[which] if where == "arg" else next(k.value for k in node.keywords if k.arg == which)
                    seg = ast.get_source_segment(source, arg)
                    s, e = off(arg.lineno, arg.col_offset), off(arg.end_lineno, arg.end_col_offset)
                    out.append(Mutant(target, path, name, arg.lineno, kind, seg, "None", s, e))
                elif isinstance(change, str):
                    out.append(Mutant(target, path, name, node.lineno, kind, segment.split("\n")[0], change, start, end))
                else:
                    after = ast.unparse(change)
                    if isinstance(change, (ast.BinOp, ast.Compare, ast.BoolOp)):
                        after = f"({after})"
                    out.append(Mutant(target, path, name, node.lineno, kind, segment, after, start, end))
    seen: dict[tuple, int] = {}
    for m in out:
        key = (m.function, m.kind, m.before, m.after)
        m.occurrence = seen.get(key, 0)
        seen[key] = m.occurrence + 1
    return out


def _is_docstring(node: ast.AST, fn: ast.AST) -> bool:
    first = fn.body[0] if fn.body else None
    return (isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str)
            and (node is first or node is first.value))


def equivalents() -> dict[str, str]:
    """Known equivalent mutants from tests/README.md: lines `- `ID`: reason` under "## Equivalent mutants"."""
    readme = ROOT / "tests" / "README.md"
    if not readme.is_file():
        return {}
    text = readme.read_text(encoding="utf-8")
    section = text.split("## Equivalent mutants", 1)[1] if "## Equivalent mutants" in text else ""
    section = section.split("\n## ", 1)[0]
    return {m.group(1): m.group(2).strip() for m in re.finditer(r"^- `(.+?)`:\s*(.+)$", section, re.M)}


# -------------------------------------------------------------------------------------------- running

def scratch_copy(workdir: Path, source: Path) -> Path:
    """A copy of the repository to mutate: the engine, the tests and what they read (not runs, caches, venvs)."""
    dest = workdir / "repo"
    if dest.exists():
        shutil.rmtree(dest)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", ".venv", "runs", ".git", "*.egg-info", "sweeps")
    dest.mkdir(parents=True)
    for item in source.iterdir():
        if item.name in (".git", ".venv", "runs", "sweeps", "__pycache__") or item.name.endswith(".egg-info"):
            continue
        if item.is_dir():
            shutil.copytree(item, dest / item.name, ignore=ignore, symlinks=True)
        else:
            shutil.copy2(item, dest / item.name)
    return dest


def run_tests(repo: Path, tests: list[str], timeout: float, basetemp: Path, extra_env: dict) -> tuple[str, float]:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(repo), os.environ.get("PYTHONPATH", "")]),
               PYTHONDONTWRITEBYTECODE="1", OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"), **extra_env)
    shutil.rmtree(basetemp, ignore_errors=True)
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", f"--basetemp={basetemp}", *tests]
    start = time.monotonic()
    try:
        proc = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, timeout=timeout,
                              start_new_session=True)
    except subprocess.TimeoutExpired:
        return "timeout", time.monotonic() - start
    took = time.monotonic() - start
    if proc.returncode == 0:
        return "passed", took
    if proc.returncode in (1,):
        return "failed", took
    return f"error (pytest exit {proc.returncode}): {proc.stdout[-300:]}{proc.stderr[-300:]}", took


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", nargs="+", choices=list(TARGETS), help="targets to mutate (default: all)")
    ap.add_argument("--tests", nargs="+", help="test files/ids to run instead of each target's own")
    ap.add_argument("--list", action="store_true", help="print the mutants and exit")
    ap.add_argument("--match", help="only mutants whose id contains this text")
    ap.add_argument("--operators", nargs="+", choices=OPERATORS, default=list(DEFAULT_OPERATORS),
                    help="kinds of change (default: all but argument)")
    ap.add_argument("--timeout-factor", type=float, default=3.0, help="a mutant times out (killed) after this many "
                    "times the unmutated run (at least 60 s)")
    ap.add_argument("--repo", type=Path, default=ROOT, help="repository to mutate (default: this checkout); "
                    "its own tests run, this checkout's TARGETS and equivalent list apply")
    ap.add_argument("--workdir", type=Path, help="scratch directory (default: a temporary one, removed afterwards)")
    ap.add_argument("--json", type=Path, help="write the results here too")
    args = ap.parse_args(argv)
    global REPO
    REPO = args.repo.resolve()

    targets = args.only or list(TARGETS)
    known = equivalents()
    plan = {t: [m for m in mutants(t, args.operators) if not args.match or args.match in m.id] for t in targets}
    if args.list:
        for t, ms in plan.items():
            for m in ms:
                print(f"{t:10s} {m.path}:{m.line:<4d} {m.id}" + ("   [equivalent]" if m.id in known else ""))
        print(f"{sum(map(len, plan.values()))} mutants")
        return 0

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="ftl-mutate-"))
    repo = scratch_copy(workdir, REPO)
    results, summary = [], {}
    try:
        for t, ms in plan.items():
            target = TARGETS[t]
            path, env = target.module, target.env
            tests = args.tests or [x for x in target.tests if (REPO / x.split("::")[0]).exists()]
            original = (repo / path).read_text(encoding="utf-8")
            if not tests:  # nothing to run (e.g. an older checkout without the target's tests): all survive
                print(f"== {t}: {len(ms)} mutants of {path}, NO tests in this checkout", flush=True)
                summary[t] = dict(killed=0, survived=len(ms), equivalent=0, total=len(ms), score=0.0)
                results += [{"target": t, "id": m.id, "line": m.line, "outcome": "survived", "seconds": 0.0} for m in ms]
                continue
            status, base = run_tests(repo, tests, 3600, workdir / "pt", env)
            if status != "passed":
                print(f"{t}: the tests fail WITHOUT a mutant ({status}); fix that first", flush=True)
                return 2
            timeout = max(60.0, args.timeout_factor * base)
            print(f"== {t}: {len(ms)} mutants of {path}, tests {' '.join(tests)} (unmutated {base:.0f} s)", flush=True)
            counts = {"killed": 0, "survived": 0, "equivalent": 0}
            for m in ms:
                if m.id in known:
                    outcome, took = "equivalent", 0.0
                else:
                    (repo / path).write_text(m.apply(original), encoding="utf-8")
                    try:
                        status, took = run_tests(repo, tests, timeout, workdir / "pt", env)
                    finally:
                        (repo / path).write_text(original, encoding="utf-8")
                    outcome = "survived" if status == "passed" else "killed"
                    if status.startswith("error"):
                        print(f"   note: {status}", flush=True)
                counts[outcome] += 1
                results.append({"target": t, "id": m.id, "line": m.line, "outcome": outcome, "seconds": round(took, 1)})
                print(f"   {outcome.upper():10s} {path}:{m.line} {m.id} ({took:.0f} s)", flush=True)
            scored = len(ms) - counts["equivalent"]
            summary[t] = dict(counts, total=len(ms), score=round(counts["killed"] / scored, 3) if scored else 1.0)
    finally:
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)

    print("\nscore per target (killed / non-equivalent mutants):")
    for t, s in summary.items():
        print(f"  {t:10s} {s['killed']:3d} / {s['total'] - s['equivalent']:3d} = {100 * s['score']:5.1f}%"
              f"   ({s['equivalent']} equivalent)")
    survivors = [r for r in results if r["outcome"] == "survived"]
    if survivors:
        print("\nsurvivors (write a test that kills each, or list it as equivalent in tests/README.md):")
        for r in survivors:
            print(f"  - `{r['id']}`  (line {r['line']})")
    if args.json:
        args.json.write_text(json.dumps({"summary": summary, "results": results}, indent=1), encoding="utf-8")
    return 1 if survivors else 0


if __name__ == "__main__":
    sys.exit(main())
