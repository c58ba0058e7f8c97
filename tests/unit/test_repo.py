"""Repository contract: the README's commands are what CI runs."""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TEST_COMMAND = ('(python -c "import torch" 2>/dev/null || pip install torch==2.13.0) && pip install -e ".[test]" '
                '&& python -m pytest -q tests')
DEFAULT_JOB = '(python -c "import torch" 2>/dev/null || pip install torch==2.13.0) && pip install -e . && ftl train'


def test_readme_commands_are_what_ci_runs():
    readme = (ROOT / "README.md").read_text()
    assert TEST_COMMAND in readme and DEFAULT_JOB in readme
    assert TEST_COMMAND in (ROOT / ".ci/run").read_text()


def test_setup_keeps_only_a_lower_bound_on_torch():
    setup = (ROOT / "setup.py").read_text()
    assert '"torch>=' in setup and '"torch==' not in setup


def _engine_modules():
    import ast

    for path in sorted((ROOT / "engine").rglob("*.py")):
        yield path.relative_to(ROOT).as_posix(), ast.parse(path.read_text(), str(path))


def test_deepspeed_is_imported_only_in_backends():
    """DESIGN.md: nothing outside engine/backends/ imports deepspeed (the loop never branches on it)."""
    import ast

    offenders = []
    for rel, tree in _engine_modules():
        if rel.startswith("engine/backends/"):
            continue
        for node in ast.walk(tree):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            offenders += [f"{rel}:{node.lineno} {n}" for n in names if n.split(".")[0] == "deepspeed"]
    assert not offenders, offenders


def test_launcher_variables_are_read_only_in_dist():
    """DESIGN.md: dist.py is the only reader of RANK/LOCAL_RANK/WORLD_SIZE/SLURM_* (launchers may SET them for
    the processes they start: engine/commands/launch.py and engine/commands/slurm.py build those environments)."""
    import ast
    import re

    launcher_var = re.compile(r"^(RANK|LOCAL_RANK|WORLD_SIZE|LOCAL_WORLD_SIZE|SLURM_\w+)$")
    offenders = []
    for rel, tree in _engine_modules():
        if rel == "engine/dist.py":
            continue
        for node in ast.walk(tree):
            # os.environ["X"] / os.environ.get("X") / os.getenv("X") in a load (read) context
            key = None
            if isinstance(node, ast.Subscript) and isinstance(node.ctx, ast.Load) and "environ" in ast.unparse(node.value):
                key = node.slice
            elif isinstance(node, ast.Call) and ast.unparse(node.func) in ("os.environ.get", "os.getenv", "environ.get"):
                key = node.args[0] if node.args else None
            if isinstance(key, ast.Constant) and isinstance(key.value, str) and launcher_var.match(key.value):
                offenders.append(f"{rel}:{node.lineno} {key.value}")
    assert not offenders, offenders
