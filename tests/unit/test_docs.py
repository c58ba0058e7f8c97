"""The docs cannot rot silently: README.md stays a front page, every relative link and #anchor in README.md
and docs/*.md resolves, every `ftl ...` command they show is a real command with real options, values and
config keys (and its config resolves), every example config resolves, the exit-code table is the engine's,
and benchmarks/docs_numbers.sh names only commands that parse. (tests/integration/test_examples.py runs the
examples.)"""

import re
import subprocess

import pytest

from tests import docs_check
from tests.docs_check import ROOT

EXAMPLES = sorted((ROOT / "examples").glob("*.yaml"))


def test_readme_is_a_front_page():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 200, "README.md is the front page; details go to docs/<topic>.md"
    # the map names every page in docs/
    for page in sorted((ROOT / "docs").glob("*.md")):
        assert f"(docs/{page.name})" in readme, f"README's map of the docs lacks docs/{page.name}"


def test_every_doc_page_starts_with_a_working_example():
    for page in sorted((ROOT / "docs").glob("*.md")):
        lines = [l for l in page.read_text().splitlines() if l.strip()]
        assert lines[0].startswith("# "), page
        assert lines[1].startswith("```"), f"{page.name}: a page starts with an example, right under its title"


def test_links_and_anchors_resolve():
    problems = [p for f in docs_check.doc_files() for p in docs_check.link_problems(f)]
    assert not problems, "\n".join(problems)


def test_link_checker_catches_a_broken_link_and_anchor(tmp_path, monkeypatch):
    page = ROOT / "docs" / "training.md"
    text = page.read_text()
    broken = tmp_path / "docs" / "x.md"
    broken.parent.mkdir()
    broken.write_text(text + "\n[a](run-directory.md#no-such-heading) [b](nope.md) [c](#bad-resumingx)\n")
    monkeypatch.setattr(docs_check, "ROOT", tmp_path)
    for name in ("run-directory.md", "training.md"):
        (tmp_path / "docs" / name).write_text((ROOT / "docs" / name).read_text())
    problems = docs_check.link_problems(broken)
    assert any("#no-such-heading" in p for p in problems)
    assert any("no such file docs/nope.md" in p for p in problems)
    assert any("#bad-resumingx" in p for p in problems)
    assert docs_check.slug("More than 1,024 positions") == "more-than-1024-positions"
    assert docs_check.slug('ds_configs/ and "auto"') == "ds_configs-and-auto"
    assert docs_check.slug("`ftl eval`") == "ftl-eval"


def test_every_ftl_command_in_the_docs_is_real():
    cmds = docs_check.all_commands()
    assert len(cmds) > 50  # the extractor found the blocks
    keys = docs_check.config_keys()
    problems = [p for c in cmds for p in docs_check.command_problems(c, keys)]
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("line, fragment", [
    ("ftl trian examples/default.yaml", "`ftl trian` is not a command"),
    ("ftl train examples/default.yaml --max-steps 5", "no option --max-steps"),
    ("ftl train examples/default.yaml --set train.max_step=5", "train.max_step: not a config key"),
    ("ftl train examples/default.yaml --set train.max_steps=0", "config does not resolve: train.max_steps must be positive"),
    ("ftl export runs/default --format onnx2 --out x", "--format onnx2"),
    ("ftl train examples/nope.yaml", "examples/nope.yaml does not exist"),
    ("ftl eval runs/x --data examples/data/nope.jsonl", "examples/data/nope.jsonl does not exist"),
    ("ftl sweep examples/sweep.yaml --grid optim.lrr=1,2", "--grid optim.lrr: not a config key"),
    ("torchrun --nproc-per-node 2 -m engine.cli train examples/default.yaml --set optim.lrr=1", "optim.lrr"),
    ("deepspeed --num_gpus 2 $(which ftl) train examples/default.yaml --sett a.b=1", "no option --sett"),
    ("ftl config show examples/default.yaml extra", "takes 1 argument(s), got 2"),
])
def test_command_checker_catches(line, fragment):
    block = docs_check.Block(ROOT / "README.md", 1, "bash", [line])
    cmds = docs_check.commands_in_block(block)
    assert len(cmds) == 1
    problems = docs_check.command_problems(cmds[0])
    assert any(fragment in p for p in problems), problems


def test_a_directory_a_command_writes_need_not_exist():
    block = docs_check.Block(ROOT / "README.md", 1, "bash", ["ftl bench --preset gpt2-tiny --out benchmarks/out/new-dir"])
    (cmd,) = docs_check.commands_in_block(block)
    assert not docs_check.command_problems(cmd)


def test_console_examples_of_bad_input_are_allowed_their_error():
    block = docs_check.Block(ROOT / "README.md", 1, "console",
                             ["$ ftl train --set train.max_step=50", "error: unknown config key ..."])
    (cmd,) = docs_check.commands_in_block(block)
    assert cmd.expect_error and not docs_check.command_problems(cmd)


def test_no_placeholder_files_in_the_docs():
    """Configs and data the docs use are files in the repository, and every run directory they read
    (runs/NAME) is one that a documented command or an example makes."""
    import yaml

    texts = {docs_check.rel(p): p.read_text() for p in docs_check.doc_files()}
    for where, text in texts.items():
        for placeholder in ("my.yaml", "my_corpus", "notes.jsonl", "mine.json"):
            assert placeholder not in text, f"{where} uses {placeholder}: name a file in examples/"
    script = (ROOT / "benchmarks/docs_numbers.sh").read_text()
    made = {"default"} | set(re.findall(r"run\.name=([\w.-]+)", "\n".join(texts.values()) + script))
    made |= {yaml.safe_load(e.read_text())["run"]["name"] for e in EXAMPLES}
    for where, text in texts.items():
        for name in re.findall(r"\bruns/([\w.-]*[\w.])(?![\w-]*<)", text):
            assert name in made, f"{where} reads runs/{name}, which no documented command or example makes"


def test_every_example_is_used_by_the_docs():
    text = "\n".join(p.read_text() for p in docs_check.doc_files())
    for ex in EXAMPLES:
        assert f"examples/{ex.name}" in text, f"examples/{ex.name} is not used by any page"


@pytest.mark.parametrize("example", EXAMPLES, ids=[e.name for e in EXAMPLES])
def test_every_example_resolves(example, capsys, monkeypatch, tmp_path):
    """`ftl config show examples/X.yaml` from a repository root in which the default job has run (some
    examples build on runs/default; tests/integration/test_examples.py runs that chain for real)."""
    from engine.cli import main

    for name in ("examples", "ds_configs"):
        (tmp_path / name).symlink_to(ROOT / name)
    for made in ("runs/default/final", "runs/default/tokenizer"):
        (tmp_path / made).mkdir(parents=True)
    monkeypatch.chdir(tmp_path)  # examples name paths relative to the repository root
    main(["config", "show", f"examples/{example.name}"])
    shown = capsys.readouterr().out
    assert shown.startswith("run:\n")


def test_the_default_example_is_the_default_job():
    import yaml

    from engine.config import Config, load_config

    spelled = yaml.safe_load((ROOT / "examples/default.yaml").read_text())
    defaults = Config().to_dict()
    for section, values in spelled.items():
        for key, value in values.items():
            assert defaults[section][key] == value, f"examples/default.yaml {section}.{key}={value!r} but the " \
                                                     f"default job has {defaults[section][key]!r}"
    assert load_config("examples/default.yaml" if False else str(ROOT / "examples/default.yaml")).to_dict() == defaults


def test_every_builtin_data_source_is_documented():
    from engine.data import sources as data

    page = (ROOT / "docs/training.md").read_text()
    for name in data.BUILTINS:
        assert f"`builtin:{name}`" in page, f"builtin:{name} is missing from docs/training.md's data sources"


def test_the_exit_code_table_is_the_engines():
    from engine import errors

    page = (ROOT / "docs/fault-tolerance.md").read_text()  # the one table; the other pages link to it
    table = page.split("## Exit codes", 1)[1].split("\n## ", 1)[0]
    documented = {int(m) for m in re.findall(r"^\| (\d+) \|", table, re.M)}
    engine_codes = {v for k, v in vars(errors).items() if k.startswith("EXIT_")}
    assert documented == engine_codes | {1, 130}, (documented, engine_codes)


def test_long_docs_example_data_is_what_its_script_writes():
    import importlib.util

    spec = importlib.util.spec_from_file_location("make_long_docs", ROOT / "examples/data/make_long_docs.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert (ROOT / "examples/data/long_docs.jsonl").read_text() == mod.render(mod.long_docs())


def test_docs_numbers_script_lists_real_commands():
    """The script that re-measures every documented number is not run in CI (it takes long), but its
    commands are: --list prints them, and each must parse like the docs' own."""
    out = subprocess.run(["bash", str(ROOT / "benchmarks/docs_numbers.sh"), "--list"], capture_output=True,
                         text=True, timeout=60, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    lines = [l for l in out.stdout.splitlines() if l.strip() and not l.startswith("#")]
    assert len(lines) >= 10
    block = docs_check.Block(ROOT / "benchmarks/docs_numbers.sh", 0, "bash", lines)
    cmds = docs_check.commands_in_block(block)
    assert len(cmds) >= 10
    keys = docs_check.config_keys()
    problems = [p for c in cmds for p in docs_check.command_problems(c, keys)]
    assert not problems, "\n".join(problems)
    # every section the docs point to exists
    sections = subprocess.run(["bash", str(ROOT / "benchmarks/docs_numbers.sh"), "--sections"], capture_output=True,
                              text=True, timeout=60, cwd=ROOT).stdout.split()
    text = "\n".join(p.read_text() for p in docs_check.doc_files())
    for name in re.findall(r"benchmarks/docs_numbers\.sh (\w+)", text):
        assert name in sections, f"the docs cite `docs_numbers.sh {name}`, which has no such section"
