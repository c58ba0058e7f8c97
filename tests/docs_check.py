"""Checks that keep the docs honest: links and anchors resolve, and every `ftl ...` command shown in
README.md and docs/*.md is a real subcommand with real options, real option values and real config keys.

Plain Markdown and the click command tree; no site generator. Used by tests/unit/test_docs.py (and on
the commands `benchmarks/docs_numbers.sh --list` prints).
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path

import click

ROOT = Path(__file__).resolve().parents[1]

# Pages other work adds (the layout move: architecture). Until
# they land, a link to one of them is allowed to dangle; once the file exists it is checked like any other.
# Empty this set when all of them are on main.
PENDING_PAGES: set[str] = set()

FENCE = re.compile(r"^(\s*)(```+|~~~+)\s*([\w+-]*)")
LINK = re.compile(r"(?<!!)\[([^\]]*)\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
INLINE_CODE = re.compile(r"`[^`\n]+`")
SHELL_LANGS = {"bash", "sh", "shell", "console", "sh-session", ""}


def doc_files() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def rel(path: Path) -> str:
    return path.resolve().relative_to(ROOT).as_posix()


# ------------------------------------------------------------------------------------------ blocks

@dataclass
class Block:
    path: Path
    line: int  # 1-based line of the opening fence
    lang: str
    lines: list[str]


def split_blocks(path: Path) -> tuple[list[Block], list[tuple[int, str]]]:
    """(fenced code blocks, prose lines with their numbers) of a Markdown file."""
    blocks, prose = [], []
    current: Block | None = None
    fence = ""
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        m = FENCE.match(line)
        if current is None and m:
            current, fence = Block(path, n, m.group(3).lower(), []), m.group(2)
        elif current is not None and line.strip().startswith(fence) and not line.strip().strip(fence[0]):
            blocks.append(current)
            current = None
        elif current is not None:
            current.lines.append(line)
        else:
            prose.append((n, line))
    return blocks, prose


# ------------------------------------------------------------------------------------- links, anchors

def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped (word characters, '-' and spaces
    kept), spaces to '-'."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip())  # a link in a heading: its text
    text = text.lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    _, prose = split_blocks(path)
    seen: dict[str, int] = {}
    out = set()
    for _, line in prose:
        m = re.match(r"^(#{1,6})\s+(.*?)\s*#*\s*$", line)
        if not m:
            continue
        s = slug(m.group(2))
        k = seen.get(s, 0)
        out.add(s if k == 0 else f"{s}-{k}")
        seen[s] = k + 1
    return out


def link_problems(path: Path) -> list[str]:
    """Every relative link of a Markdown file must name an existing file or directory, and an #anchor
    an existing heading of that page."""
    problems = []
    _, prose = split_blocks(path)
    for n, line in prose:
        for m in LINK.finditer(INLINE_CODE.sub("", line)):
            target = m.group(2)
            if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
                continue
            file_part, _, anchor = target.partition("#")
            dest = (path.parent / file_part).resolve() if file_part else path.resolve()
            where = f"{rel(path)}:{n}: [{m.group(1)}]({target})"
            try:
                dest_rel = dest.relative_to(ROOT).as_posix()
            except ValueError:
                problems.append(f"{where}: points outside the repository")
                continue
            if not dest.exists():
                if dest_rel not in PENDING_PAGES:
                    problems.append(f"{where}: no such file {dest_rel}")
                continue
            if anchor:
                if dest.suffix != ".md" or dest.is_dir():
                    problems.append(f"{where}: an anchor into a file that is not Markdown")
                elif anchor not in anchors(dest):
                    problems.append(f"{where}: {dest_rel} has no heading with anchor #{anchor} "
                                    f"(it has: {', '.join(sorted(anchors(dest)))})")
    return problems


# ------------------------------------------------------------------------------------------ commands

@dataclass
class Command:
    where: str  # file:line
    args: list[str]  # after `ftl`
    expect_error: bool = False  # a console example whose output starts with "error:" (bad input shown on purpose)
    lenient: bool = False  # from prose (inline code): placeholders allowed, only names checked
    text: str = ""


def _logical_lines(lines: list[str], start: int) -> list[tuple[int, str]]:
    """Join backslash continuations; (line number, text)."""
    out, buf, first = [], "", None
    for i, line in enumerate(lines):
        if first is None:
            first = start + i
        if line.rstrip().endswith("\\"):
            buf += line.rstrip()[:-1] + " "
            continue
        out.append((first, buf + line))
        buf, first = "", None
    if buf:
        out.append((first, buf))
    return out


def _invocations(text: str) -> list[list[str]]:
    """The argument lists of every ftl / engine.cli invocation in one shell line."""
    text = text.replace("$(which ftl)", "ftl")
    # redirections and their targets are the shell's, not arguments: 2>&1, > file, 2> file, < file
    text = re.sub(r"\d*>&\d+|\d*>>?\s*\S+|\s<\s*\S+", " ", text)
    try:
        lex = shlex.shlex(text, posix=True, punctuation_chars=True)
        lex.whitespace_split = True
        lex.commenters = "#"
        tokens = list(lex)
    except ValueError:
        return []
    pieces, cur = [], []
    for t in tokens:
        if t in ("&&", "||", ";", "|", "&", "(", ")", ";;"):
            pieces.append(cur)
            cur = []
        else:
            cur.append(t)
    pieces.append(cur)
    found = []
    for p in pieces:
        for i, t in enumerate(p):
            if t == "ftl" and all(re.match(r"^\w+=", x) or x in ("deepspeed", "srun", "exec", "time") or x.endswith("/time")
                                  or x.startswith("-") or x.isdigit() for x in p[:i]):
                found.append(p[i + 1:])
                break
            if t == "engine.cli" and i > 0 and p[i - 1] in ("-m", "--module"):
                found.append(p[i + 1:])
                break
    return found


def commands_in_block(block: Block) -> list[Command]:
    cmds: list[Command] = []
    if block.lang not in SHELL_LANGS:
        return cmds
    console = block.lang in ("console", "sh-session") or any(l.startswith("$ ") for l in block.lines)
    start = block.line + 1
    if console:
        lines = block.lines
        i = 0
        while i < len(lines):
            if lines[i].startswith("$ "):
                j, text = i, lines[i][2:]
                while text.rstrip().endswith("\\") and j + 1 < len(lines):
                    j += 1
                    text = text.rstrip()[:-1] + " " + lines[j].strip()
                output = lines[j + 1] if j + 1 < len(lines) else ""
                for args in _invocations(text):
                    cmds.append(Command(f"{rel(block.path)}:{start + i}", args, output.startswith("error:"),
                                        text=text))
                i = j + 1
            else:
                i += 1
    else:
        for n, text in _logical_lines(block.lines, start):
            for args in _invocations(text):
                cmds.append(Command(f"{rel(block.path)}:{n}", args, text=text))
    return cmds


def commands_in_prose(path: Path) -> list[Command]:
    """`ftl ...` in inline code: checked leniently (SOURCE, [--split ...] placeholders are fine)."""
    _, prose = split_blocks(path)
    out = []
    for n, line in prose:
        for m in INLINE_CODE.finditer(line):
            code = m.group(0).strip("`")
            if code.startswith("ftl ") and len(code.split()) > 1:
                args = [a.strip("[]") for a in code.split()[1:]]
                out.append(Command(f"{rel(path)}:{n}", args, lenient=True, text=code))
    return out


def all_commands() -> list[Command]:
    cmds = []
    for path in doc_files():
        blocks, _ = split_blocks(path)
        for b in blocks:
            cmds += commands_in_block(b)
        cmds += commands_in_prose(path)
    return cmds


# ----------------------------------------------------------------------------------------- validation

def config_keys() -> set[str]:
    from engine.config import describe

    return {row[0] for row in describe()}


def _resolve(args: list[str]) -> tuple[click.Command | None, list[str], str, list[str]]:
    """Walk the click tree: (command, remaining args, its name, problems)."""
    from engine.cli import cli

    cmd: click.Command = cli
    name = "ftl"
    rest = list(args)
    while isinstance(cmd, click.Group):
        while rest and rest[0].startswith("--local_rank"):  # the deepspeed launcher's extra argument
            rest.pop(0)
        if not rest or rest[0] in ("-h", "--help", "--version"):
            return None, [], name, []
        sub = cmd.commands.get(rest[0])
        if sub is None:
            return None, [], name, [f"`{name} {rest[0]}` is not a command (commands: {', '.join(sorted(cmd.commands))})"]
        name, cmd, rest = f"{name} {rest[0]}", sub, rest[1:]
    return cmd, rest, name, []


def parse_command(cmd: click.Command, args: list[str], lenient: bool) -> tuple[dict, list[str], list[str]]:
    """Our own small parse of ARGS against the command's declared options: {param name: [values]},
    positional arguments, problems. No callbacks run and no files are opened."""
    by_opt: dict[str, click.Parameter] = {}
    for p in cmd.params:
        if isinstance(p, click.Option):
            for o in [*p.opts, *p.secondary_opts]:
                by_opt[o] = p
    values: dict[str, list] = {}
    positional: list[str] = []
    problems: list[str] = []
    i = 0
    while i < len(args):
        tok = args[i]
        if tok in ("-h", "--help"):
            return values, positional, problems
        if tok.startswith("-") and len(tok) > 1 and not re.match(r"^-\d", tok):
            opt, eq, val = tok.partition("=")
            p = by_opt.get(opt)
            if p is None:
                problems.append(f"no option {opt}")
                i += 1
                continue
            if p.is_flag or p.count:
                if eq:
                    problems.append(f"{opt} is a flag and takes no value")
                values.setdefault(p.name, []).append(True)
            else:
                if not eq:
                    i += 1
                    if i >= len(args):
                        if not lenient:
                            problems.append(f"{opt} needs a value")
                        break
                    val = args[i]
                values.setdefault(p.name, []).append(val)
        else:
            positional.append(tok)
        i += 1
    n_arguments = sum(1 for p in cmd.params if isinstance(p, click.Argument))
    if len(positional) > n_arguments and not lenient:
        problems.append(f"takes {n_arguments} argument(s), got {len(positional)}: {positional}")
    return values, positional, problems


def command_problems(c: Command, keys: set[str] | None = None) -> list[str]:
    keys = config_keys() if keys is None else keys
    cmd, rest, name, problems = _resolve(c.args)
    if cmd is None:
        return [f"{c.where}: {p}  [{c.text}]" for p in problems]
    values, positional, more = parse_command(cmd, rest, c.lenient)
    problems += [f"`{name}`: {p}" for p in more]
    ctx = click.Context(cmd, info_name=name)
    for p in cmd.params:
        if p.name not in values or c.lenient:
            continue
        if isinstance(p.type, (click.Choice, click.types.IntParamType, click.types.FloatParamType,
                               click.types.BoolParamType)) and not p.callback:
            for v in values[p.name]:
                if v is True:
                    continue
                try:
                    p.type.convert(v, p, ctx)
                except click.BadParameter as e:
                    problems.append(f"`{name}` {p.opts[0]} {v}: {e.message}")
    sets = [v for v in values.get("overrides", []) if v is not True]
    grids = [v for v in values.get("grid", []) if v is not True]
    for s in sets + grids:
        key = s.partition("=")[0]
        placeholder = c.lenient and not re.fullmatch(r"[a-z_]+\.[a-z_]+", key)  # `--set ...`, `KEY=V1,V2`
        if key not in keys and not c.expect_error and not placeholder:
            problems.append(f"`{name}`: {'--set' if s in sets else '--grid'} {key}: not a config key")
    # paths the docs read must exist; what a command writes (--out, --output) need not
    written = {"out", "output", "output_dir"}
    for tok in [*positional, *[v for k, vs in values.items() if k not in written for v in vs if isinstance(v, str)]]:
        for path in re.findall(r"(?:^|=)((?:examples|ds_configs|launch|benchmarks)/[\w./-]+)", tok):
            if not (ROOT / path).exists():
                problems.append(f"`{name}`: {path} does not exist")
    # A documented command that takes a config must resolve, unless its output shows the error on purpose.
    takes_config = any(isinstance(p, click.Argument) and p.name in ("config", "config_file") for p in cmd.params)
    if takes_config and not c.expect_error and not c.lenient and not problems:
        problems += _config_resolves(positional[:1], sets)
    return [f"{c.where}: {p}  [{c.text}]" for p in problems]


def _config_resolves(config: list[str], sets: list[str]) -> list[str]:
    import os

    from engine.config import load_config
    from engine.errors import UsageError

    path = config[0] if config else None
    if path and not path.startswith(("examples/", "/")):
        return []  # a file the example itself writes (sweeps/lr/best.yaml, runs/x/config.yaml)
    old = os.getcwd()
    os.chdir(ROOT)  # the docs run from the repository root
    try:
        load_config(path, sets)
    except UsageError as e:
        # Paths that exist only after an earlier documented command (a checkpoint, runs/default/final) are
        # fine here; test_docs checks that some documented command makes every runs/NAME the docs read.
        real = [p for p in e.problems if "checkpoint.resume: no checkpoint" not in p
                and not re.search(r"the directory '(\./)?runs/[^']*' does not exist", p)]
        return [f"config does not resolve: {p}" for p in real]
    finally:
        os.chdir(old)
    return []
