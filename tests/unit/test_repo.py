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
