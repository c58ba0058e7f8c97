"""The training fast path with the oldest transformers of the training range (engine/compat.py: 4.57, whose
GPT2Block returns a tuple and leaves activation checkpointing to GPT2Model.forward, which the fast path
skips). .ci/run installs it beside the venv; the fast-path tests then run in a subprocess that sees it first.
(A whole `ftl train` cannot run there: this venv's datasets needs huggingface_hub 1.x, 4.57 needs 0.x.)"""

import os
import subprocess
import sys

from tests.conftest import ROOT, env_for_subprocess
from tests.integration.test_compat import _transformers4

# the causal body against GPT2Model.forward (with and without activation checkpointing), the padded chunked
# head, the fused GELU, and a packed SFT row (block-diagonal mask through the blocks) against its examples alone:
# without fastpath.run_block's tuple handling all but the GELU test fail on 4.57 (a tuple into the LayerNorm)
TESTS = ["tests/unit/test_fastpath.py::test_causal_body_equals_transformers_forward",
         "tests/unit/test_fastpath.py::test_train_module_pads_the_vocabulary_without_changing_the_math",
         "tests/unit/test_fastpath.py::test_fused_gelu_is_gpt2s_gelu_in_one_kernel",
         "tests/unit/test_sft.py::test_a_packed_row_equals_its_examples_alone"]


def test_the_fast_path_runs_on_transformers_4(tmp_path):
    site = _transformers4()
    env = env_for_subprocess(PYTHONPATH=f"{site}{os.pathsep}{ROOT}")
    version = subprocess.run([sys.executable, "-c", "import transformers; print(transformers.__version__)"],
                             capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)
    assert version.stdout.strip().startswith("4."), version.stdout + version.stderr[-2000:]
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--basetemp",
                           str(tmp_path / "pt"), *TESTS], capture_output=True, text=True, env=env, cwd=ROOT,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert "7 passed" in proc.stdout and "failed" not in proc.stdout, proc.stdout[-4000:]
