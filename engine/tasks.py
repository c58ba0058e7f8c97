"""Built-in, offline classification tasks (registered as `builtin:<name>` data sources).

builtin:stdlib_packages
    Which standard-library package a snippet of Python source comes from. Every .py file inside a
    package of this interpreter's standard library (tests, idlelib, lib2to3, distutils, turtledemo and
    site-packages left out) is cut into snippets of a few consecutive non-blank lines, up to
    CHUNKS_PER_FILE of them spread evenly over the file; the label is the top-level package. Package
    sizes make it genuinely long-tailed: encodings alone is about a third of the snippets, the smallest
    packages a handful each (`ftl data stats --set data.source=builtin:stdlib_packages` prints the table).
    The validation split holds every VAL_EVERY-th snippet of each class (classes with fewer than
    VAL_EVERY snippets stay in training only), so every class it contains is also trained on. Columns:
    text, label, path.

The text comes from the running Python, so the task is fixed for one interpreter version and needs no
network. Any CSV/JSONL/parquet file or hub dataset with text and label columns is used the same way.
"""

from __future__ import annotations

import sysconfig
from collections import defaultdict
from pathlib import Path

from engine import data

LINES_PER_CHUNK = 8
CHUNKS_PER_FILE = 8
VAL_EVERY = 6
EXCLUDED = {"site-packages", "test", "tests", "idlelib", "lib2to3", "distutils", "turtledemo", "pydoc_data",
            "__phello__", "__pycache__"}


def stdlib_package_snippets(stdlib: str) -> dict[str, list[dict]]:
    """label -> snippets ({text, label, path}) in a fixed order."""
    root = Path(stdlib)
    by_label: dict[str, list[dict]] = defaultdict(list)
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if len(rel.parts) < 2 or EXCLUDED & set(rel.parts) or rel.parts[0].startswith("config-"):
            continue
        try:
            lines = [ln.rstrip() for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
        except (UnicodeDecodeError, OSError):
            continue
        blocks = [lines[i:i + LINES_PER_CHUNK] for i in range(0, len(lines), LINES_PER_CHUNK)]
        blocks = [b for b in blocks if len(b) >= 3]
        if not blocks:
            continue
        k = min(CHUNKS_PER_FILE, len(blocks))
        picks = sorted({round(j * (len(blocks) - 1) / max(1, k - 1)) for j in range(k)})
        for j in picks:
            by_label[rel.parts[0]].append({"text": "\n".join(blocks[j]), "label": rel.parts[0], "path": f"{rel}#{j}"})
    return by_label


def _stdlib_packages(stdlib: str, split: str):
    for label, rows in sorted(stdlib_package_snippets(stdlib).items()):
        for i, row in enumerate(rows):
            held_out = len(rows) >= VAL_EVERY and i % VAL_EVERY == VAL_EVERY // 2
            if held_out == (split == "validation"):
                yield row


data.register_builtin("stdlib_packages", _stdlib_packages, lambda: {"stdlib": sysconfig.get_paths()["stdlib"]},
                      splits=("train", "validation"))
