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

builtin:stdlib_qa
    Instruction tuning (data.format=prompt_completion or chat): a question about a public function or method
    of the standard library, answered with the first paragraph of its docstring. Read from the source with
    `ast` (nothing is imported). Columns: prompt ("Q: What does json.dumps(obj, ...) do?\nA:"), completion
    (" Serialize ``obj`` to a JSON formatted ``str``."), messages (a system message, the question, the answer),
    text (prompt + completion), path. Every QA_VAL_EVERY-th question is held out as the validation split.

The text comes from the running Python, so the task is fixed for one interpreter version and needs no
network. Any CSV/JSONL/parquet file or hub dataset with text and label columns is used the same way.
"""

from __future__ import annotations

import ast
import sysconfig
from collections import defaultdict
from pathlib import Path

# The builtin:<task> sources defined here: name -> (generator, gen_kwargs, splits). engine/data/sources.py imports
# this module and registers them; nothing here imports sources back (the registry is filled from this side only).
TASKS: dict[str, tuple] = {}


def register_task(name: str, generator, gen_kwargs=lambda: {}, splits: tuple[str, ...] = ()) -> None:
    """Add a `builtin:<name>` source (a generator of row dicts); with `splits` (e.g. ("train", "validation")) the
    generator is called once per split with `split=` added."""
    TASKS[name] = (generator, gen_kwargs, tuple(splits))


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


register_task("stdlib_packages", _stdlib_packages, lambda: {"stdlib": sysconfig.get_paths()["stdlib"]},
              splits=("train", "validation"))


QA_VAL_EVERY = 10
QA_SYSTEM = "You answer questions about the Python standard library in one or two sentences."
QA_EXCLUDED = EXCLUDED | {"ensurepip", "venv", "tkinter"}


def _summary(doc: str | None) -> str | None:
    """The first paragraph of a docstring on one line, when it reads as a summary (not a doctest or a stub)."""
    if not doc:
        return None
    para = " ".join(doc.split("\n\n")[0].split())
    if not 20 <= len(para) <= 300 or para.startswith((">>>", "(", "Deprecated")) or para.endswith(":"):
        return None
    return para


def _signature(args: ast.arguments, method: bool) -> str:
    sig = ast.unparse(args)
    if method:
        sig = sig.split(", ", 1)[1] if ", " in sig else ""  # self / cls
    return sig if len(sig) <= 60 else sig[:57].rsplit(",", 1)[0] + ", ..."


def stdlib_questions(stdlib: str) -> list[dict]:
    """Every documented public function and method of the standard library's public modules, in a fixed order."""
    root = Path(stdlib)
    rows, seen = [], set()
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if (QA_EXCLUDED & set(rel.parts) or rel.parts[0].startswith("config-")
                or any(part.startswith("_") and part != "__init__.py" for part in rel.parts)):
            continue
        module = ".".join(rel.with_suffix("").parts).removesuffix(".__init__")
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, OSError):
            continue
        found = [(n.name, n, False) for n in tree.body if isinstance(n, ast.FunctionDef)]
        for cls in (n for n in tree.body if isinstance(n, ast.ClassDef) and not n.name.startswith("_")):
            found += [(f"{cls.name}.{n.name}", n, True) for n in cls.body if isinstance(n, ast.FunctionDef)]
        for name, node, method in found:
            summary = _summary(ast.get_docstring(node))
            if name.split(".")[-1].startswith("_") or summary is None or (module, name) in seen:
                continue
            seen.add((module, name))
            call = f"{module}.{name}({_signature(node.args, method)})"
            question = f"What does {call} do?"
            rows.append({"prompt": f"Q: {question}\nA:", "completion": f" {summary}",
                         "messages": [{"role": "system", "content": QA_SYSTEM}, {"role": "user", "content": question},
                                      {"role": "assistant", "content": summary}],
                         "text": f"Q: {question}\nA: {summary}", "path": f"{rel}:{node.lineno}"})
    return rows


def _stdlib_qa(stdlib: str, split: str):
    for i, row in enumerate(stdlib_questions(stdlib)):
        if (i % QA_VAL_EVERY == QA_VAL_EVERY // 2) == (split == "validation"):
            yield row


register_task("stdlib_qa", _stdlib_qa, lambda: {"stdlib": sysconfig.get_paths()["stdlib"]},
              splits=("train", "validation"))
