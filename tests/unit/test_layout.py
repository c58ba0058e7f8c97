"""The layout (docs/architecture.md): the training core apart from the commands built on it, and no import cycles.

Imports are read with `ast`, function-level (lazy) imports INCLUDED: a lazy import only moves the failure from
import time to call time; the importing module still cannot work without the imported one, so a cycle through a
lazy import is still a cycle, and a core module that lazily imports a command still needs that command. Imports
under `if TYPE_CHECKING:` would count too (there are none). A package's __init__ is not counted as imported by its
own submodules (Python runs it first, but nothing in it depends on them).

engine/cli.py is the one module outside engine/commands/ allowed to import them: it is the command line that runs
them (it parses and dispatches, nothing imports cli.py back).
"""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CLI = "engine.cli"


def _module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph(root: Path = ROOT) -> dict[str, dict[str, list[str]]]:
    """module -> {imported engine module -> ["file:line", ...]} for every .py under root/engine, lazy imports too."""
    files = {_module_name(p, root): p for p in sorted((root / "engine").rglob("*.py"))}
    graph: dict[str, dict[str, list[str]]] = {}
    for mod, path in files.items():
        is_pkg = path.name == "__init__.py"
        package = mod if is_pkg else mod.rpartition(".")[0]
        deps: dict[str, list[str]] = {}

        def known(name: str) -> str | None:  # the module a dotted name lives in (engine.x.y -> engine.x if y is not one)
            while name and name not in files:
                name = name.rpartition(".")[0]
            return name or None

        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            targets = []
            if isinstance(node, ast.Import):
                targets = [known(a.name) for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(up + ([node.module] if node.module else []))
                # `from engine.data import sources` imports the module engine.data.sources; `from engine.x import f` engine.x
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in files else known(base) for a in node.names]
            for t in targets:
                if t and t.split(".")[0] == "engine" and t not in (mod, "engine"):
                    deps.setdefault(t, []).append(f"{path.relative_to(root).as_posix()}:{node.lineno}")
        graph[mod] = deps
    return graph


def cycles(graph: dict[str, dict]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def core_imports_of_commands(graph: dict[str, dict[str, list[str]]]) -> list[str]:
    return [f"{where} {mod} imports {dep}" for mod, deps in sorted(graph.items())
            if not mod.startswith("engine.commands") and mod != CLI
            for dep, wheres in sorted(deps.items()) if dep == "engine.commands" or dep.startswith("engine.commands.")
            for where in wheres]


def test_the_core_never_imports_a_command():
    """engine/commands/ is built on the core; nothing in the core (engine/ outside commands/, cli.py aside) imports it."""
    graph = import_graph()
    assert any(m.startswith("engine.commands.") for m in graph), "engine/commands/ is missing"
    offenders = core_imports_of_commands(graph)
    assert not offenders, "the core imports a command (move the shared part into the core):\n" + "\n".join(offenders)


def test_no_import_cycles_among_engine_modules():
    graph = import_graph()
    found = cycles(graph)
    detail = ["  " + " | ".join(f"{m} -> {d} ({', '.join(graph[m][d])})" for m in comp for d in graph[m] if d in comp)
              for comp in found]
    assert not found, "import cycles (lazy imports count):\n" + "\n".join(detail)


def test_the_layout_checks_can_fail(tmp_path):
    """The two checks above on a made-up package: a cycle through a lazy import and a core module importing a
    command are both caught (a check that cannot fail proves nothing)."""
    pkg = tmp_path / "engine"
    (pkg / "commands").mkdir(parents=True)
    (pkg / "data").mkdir()
    for init in (pkg / "__init__.py", pkg / "commands" / "__init__.py", pkg / "data" / "__init__.py"):
        init.write_text("")
    (pkg / "data" / "sources.py").write_text("from engine.data import tasks\n")
    (pkg / "data" / "tasks.py").write_text("def f():\n    from engine.data import sources\n")
    (pkg / "trainer.py").write_text("def g():\n    from engine.commands import models\n")
    (pkg / "commands" / "models.py").write_text("from engine import trainer\n")
    (pkg / "cli.py").write_text("from engine.commands import models\n")
    graph = import_graph(tmp_path)
    assert ["engine.data.sources", "engine.data.tasks"] in cycles(graph)
    assert ["engine.commands.models", "engine.trainer"] in cycles(graph)
    offenders = core_imports_of_commands(graph)
    assert len(offenders) == 1 and "engine.trainer imports engine.commands.models" in offenders[0], offenders
