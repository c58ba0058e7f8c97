"""Instruction and chat data: prompt/completion and chat examples, completion-only targets, packing.

`data.format` (or each entry of `data.mix`) says what a row is:
  prompt_completion  columns data.prompt_column / data.completion_column. The example is the prompt's tokens,
                     then the completion's, each tokenized on its own with no special tokens, then EOS. Targets:
                     the completion and the EOS (every token with data.train_on_prompt=true).
  chat               column data.messages_column: a list of {"role", "content"} messages, or ShareGPT's
                     {"from", "value"} with role names mapped by data.role_map. The conversation is rendered with
                     the chat template and tokenized once, as `tokenizer.apply_chat_template` would; targets are
                     the tokens of each assistant turn and the end-of-turn marker after it.
  text               (inside a mix) a document: its tokens then EOS, every token a target.

Which tokens are targets in a chat is found by rendering prefixes: assistant turn i spans from the end of
the rendering of messages[:i] with the generation prompt to the end of messages[:i+1] (trailing whitespace
left out), so any template whose renderings extend each other works, and what the engine trains on is,
token for token, what transformers' `apply_chat_template(messages)` produces.

Every row is checked before anything is tokenized; every problem (missing column, unknown role,
non-string content, empty completion, no assistant turn, a template that fails to render) is reported
at once with the rows it occurs in, and the run stops with exit code 2 before writing anything.

An example is a row of model inputs (its tokens but the last) and labels (the next token where it is a
target, IGNORE elsewhere). Examples longer than data.seq_len + 1 tokens follow data.overflow (truncate: the
first tokens; truncate_prompt: the prompt, or the oldest turns, cut from the left, the last completion kept
whole; drop), and an example left without a target is dropped; both are counted and reported.

Packing (data.pack=true) puts whole examples into rows of data.seq_len positions, best-fit decreasing over
groups of PACK_GROUP examples. Each example restarts its positions at 0 and carries its own document id;
the model attends only within a document (engine/fastpath.py: `document_mask`), so a packed row computes
exactly what its examples would alone (invariant 6, tests/unit/test_sft_packing.py).
"""

from __future__ import annotations

import bisect
import json
import os
import random
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from engine import dist
from engine.config import MESSAGE_ROLES, DataConfig
from engine.errors import UsageError
from engine.losses import IGNORE

IM_START, IM_END = "<|im_start|>", "<|im_end|>"
# ChatML. The markers become special tokens of the tokenizer (kept whole, never split or merged with text);
# the end-of-turn marker <|im_end|> is what generation stops at.
BUILTIN_CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
PACK_GROUP = 2000  # examples packed together (best-fit decreasing within each group)
LISTED_ROWS = 5  # rows named per kind of problem
NORMALIZED_COLUMNS = ("_row", "_format", "_train_on_prompt", "prompt", "completion", "roles", "contents")
PROBE = "\u2063ftl-probe\u2063"  # content no template prints by itself


# ------------------------------------------------------------------------------------------ the datasets

@dataclass(frozen=True)
class Part:
    """One dataset of the training data: data.source, or one entry of data.mix."""

    source: str
    format: str
    weight: float = 1.0
    text_column: str = "text"
    prompt_column: str = "prompt"
    completion_column: str = "completion"
    messages_column: str = "messages"
    train_on_prompt: bool = False

    @property
    def columns(self) -> dict[str, str]:
        """config key -> column this format reads."""
        if self.format == "prompt_completion":
            return {"prompt_column": self.prompt_column, "completion_column": self.completion_column}
        if self.format == "chat":
            return {"messages_column": self.messages_column}
        return {"text_column": self.text_column}


def parts(cfg: DataConfig) -> list[Part]:
    keys = ("text_column", "prompt_column", "completion_column", "messages_column", "train_on_prompt")
    base = {k: getattr(cfg, k) for k in keys}
    if not cfg.mix:
        return [Part(cfg.source.strip(), cfg.format, 1.0, **base)]
    return [Part(str(e["source"]).strip(), str(e.get("format", cfg.format)), float(e.get("weight", 1.0)),
                 **{k: e.get(k, base[k]) for k in keys}) for e in cfg.mix]


class RowProblems:
    """Problems in the rows of the data, grouped by kind; each kind names its first rows and counts the rest."""

    def __init__(self):
        self.kinds: dict[str, list[str]] = {}

    def add(self, kind: str, where: str) -> None:
        self.kinds.setdefault(kind, []).append(where)

    def __bool__(self) -> bool:
        return bool(self.kinds)

    def messages(self) -> list[str]:
        out = []
        for kind, wheres in self.kinds.items():
            more = len(wheres) - LISTED_ROWS
            out.append(f"{kind}: {', '.join(wheres[:LISTED_ROWS])}" + (f" and {more} more" if more > 0 else ""))
        return out


# ------------------------------------------------------------------------------------------ normalizing

def _json_rows(path: str) -> tuple[list[tuple[str, object]], list[str]]:
    """(line label, parsed value) of a .jsonl file (one value a line) or a .json file (a list of rows), read
    with the json module: a row whose field changes type (a number where others have text) is a problem
    named by its line, not an unreadable file."""
    name = os.path.basename(path)
    text = Path(path).read_text(encoding="utf-8")
    if path.endswith(".json"):
        try:
            value = json.loads(text)
        except json.JSONDecodeError as e:
            return [], [f"{name}: not JSON ({e.msg} at line {e.lineno})"]
        if isinstance(value, dict):  # {"data": [...]} or {"train": [...]}: the first list inside
            value = next((v for v in value.values() if isinstance(v, list)), [value])
        if not isinstance(value, list):
            return [], [f"{name}: a .json file must hold a list of rows"]
        return [(f"{name} row {i}", v) for i, v in enumerate(value, 1)], []
    rows, problems = [], []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append((f"{name} line {n}", json.loads(line)))
        except json.JSONDecodeError as e:
            problems.append(f"{name} line {n}: not JSON ({e.msg})")
    return rows, problems


def source_rows(part: Part, load_source) -> tuple[dict[str, list[tuple[str, dict]]], list[str], list[str]]:
    """{source split: [(row label, row)]}, the columns that exist, and unreadable-file problems.

    JSON/JSONL files are read here row by row; everything else through `load_source(source)` (datasets)."""
    src = part.source
    path = os.path.expanduser(src)
    if os.path.isfile(path) and path.endswith((".jsonl", ".json")):
        rows, problems = _json_rows(path)
        bad = [label for label, r in rows if not isinstance(r, dict)]
        if bad:
            problems.append(f"rows must be JSON objects (mappings of column to value): {', '.join(bad[:LISTED_ROWS])}"
                            + (f" and {len(bad) - LISTED_ROWS} more" if len(bad) > LISTED_ROWS else ""))
        rows = [(label, r) for label, r in rows if isinstance(r, dict)]
        columns = sorted({k for _, r in rows for k in r})
        return {"train": rows}, columns, problems
    dd = load_source(src)
    splits = list(dd)
    out = {}
    for split in splits:
        ds = dd[split]
        where = f"{src} {split} row" if len(splits) > 1 else f"{src} row"
        out[split] = [(f"{where} {i}", r) for i, r in enumerate(ds.to_list(), 1)]
    columns = dd[splits[0]].column_names if splits else []
    return out, columns, []


def _message_problem(m, roles: dict[str, str]) -> tuple[str | None, str | None, str | None]:
    """(role, content, problem) of one message; role names mapped through `roles`."""
    if not isinstance(m, dict):
        return None, None, f"a message is not a mapping with role and content (got {type(m).__name__})"
    role = m.get("role") if m.get("role") is not None else m.get("from")
    content = m.get("content") if m.get("content") is not None else m.get("value")
    if role is None:
        return None, None, "a message has no role (a `role` or ShareGPT `from` field)"
    mapped = roles.get(str(role), str(role))
    if mapped not in MESSAGE_ROLES:
        return None, None, (f"unknown role {role!r} (known: {', '.join(MESSAGE_ROLES)}; map other names with "
                            f"data.role_map, e.g. {role}=assistant)")
    if not isinstance(content, str):
        return None, None, (f"{mapped} message content is {type(content).__name__}, not a string"
                            if content is not None else f"a {mapped} message has no content")
    return mapped, content, None


def normalize(part: Part, rows: list[tuple[str, dict]], roles: dict[str, str], problems: RowProblems) -> dict:
    """Rows of one split of one dataset -> the engine's columns (NORMALIZED_COLUMNS), checking each row."""
    out = {k: [] for k in NORMALIZED_COLUMNS}
    for label, row in rows:
        prompt, completion, msg_roles, contents = "", "", [], []
        if part.format == "prompt_completion":
            prompt, completion = row.get(part.prompt_column), row.get(part.completion_column)
            bad = False
            for key, value, what in ((part.prompt_column, prompt, "prompt"), (part.completion_column, completion,
                                                                                 "completion")):
                if not isinstance(value, str):
                    problems.add(f"{what} (column {key!r}) is {'missing' if value is None else type(value).__name__}, "
                                 f"not a string", label)
                    bad = True
            if not bad and not completion.strip():
                problems.add(f"empty completion (column {part.completion_column!r}): nothing to learn", label)
                bad = True
            if bad:
                continue
        elif part.format == "chat":
            messages = row.get(part.messages_column)
            if isinstance(messages, str):  # CSV/parquet columns often hold the conversation as JSON text
                try:
                    messages = json.loads(messages)
                except json.JSONDecodeError:
                    pass
            if not isinstance(messages, list) or not messages:
                problems.add(f"column {part.messages_column!r} must hold a non-empty list of messages (got "
                             f"{'nothing' if messages is None else type(messages).__name__})", label)
                continue
            bad = False
            for i, m in enumerate(messages, 1):
                role, content, problem = _message_problem(m, roles)
                if problem:
                    problems.add(problem, f"{label} message {i}")
                    bad = True
                    continue
                if role == "assistant" and not content.strip():
                    problems.add("empty assistant message: nothing to learn", f"{label} message {i}")
                    bad = True
                msg_roles.append(role)
                contents.append(content)
            if not bad and "assistant" not in msg_roles:
                problems.add("a conversation with no assistant turn: nothing to learn", label)
                bad = True
            if bad:
                continue
        else:
            text = row.get(part.text_column)
            if not isinstance(text, str):
                problems.add(f"text (column {part.text_column!r}) is "
                             f"{'missing' if text is None else type(text).__name__}, not a string", label)
                continue
            completion = text
        for k, v in zip(NORMALIZED_COLUMNS, (label, part.format, part.train_on_prompt, prompt, completion,
                                             msg_roles, contents)):
            out[k].append(v)
    return out


def load_normalized(cfg: DataConfig, seed: int, load_source, split_train_validation):
    """Every dataset of the config read, checked and normalized: a DatasetDict with `train` (weighted by each
    dataset's data.mix weight) and `validation`, columns NORMALIZED_COLUMNS. Raises one UsageError naming
    every problem of every dataset."""
    import datasets

    roles, _ = cfg.role_names()
    problems, row_problems = [], RowProblems()
    trains, vals = [], []
    features = datasets.Features({"_row": datasets.Value("string"), "_format": datasets.Value("string"),
                                  "_train_on_prompt": datasets.Value("bool"), "prompt": datasets.Value("string"),
                                  "completion": datasets.Value("string"),
                                  "roles": datasets.List(datasets.Value("string")),
                                  "contents": datasets.List(datasets.Value("string"))})
    for part in parts(cfg):
        try:
            splits, columns, unreadable = source_rows(part, load_source)
        except UsageError as e:
            problems += e.problems
            continue
        problems += unreadable
        missing = [f"data.{key} {col!r}" for key, col in part.columns.items() if col not in columns]
        if missing:
            problems.append(f"{part.source}: {' and '.join(missing)} {'is' if len(missing) == 1 else 'are'} not in "
                            f"the data (data.format={part.format}); columns: {', '.join(columns) or 'none'}")
            continue
        if not any(splits.values()):
            problems.append(f"data.source {part.source!r}: the training split is empty")
            continue
        normalized = {s: datasets.Dataset.from_dict(normalize(part, rows, roles, row_problems), features=features)
                      for s, rows in splits.items()}
        dd = split_train_validation(datasets.DatasetDict(normalized), seed)
        trains.append(weighted(dd["train"], part.weight, seed))
        vals.append(dd["validation"])
    problems += row_problems.messages()
    if problems:
        raise UsageError(problems, hint="docs/sft.md describes the data formats.")
    train = datasets.concatenate_datasets(trains) if len(trains) > 1 else trains[0]
    val = datasets.concatenate_datasets(vals) if len(vals) > 1 else vals[0]
    if len(train) == 0:
        raise UsageError(f"data.source {cfg.source!r}: the training split is empty")
    return datasets.DatasetDict({"train": train, "validation": val})


def weighted(ds, weight: float, seed: int):
    """The dataset `weight` times over: whole copies, then a seeded subset for the fraction."""
    if weight == 1.0 or len(ds) == 0:
        return ds
    whole, frac = int(weight), weight - int(weight)
    idx = list(range(len(ds))) * whole
    if frac:
        rng = random.Random(seed * 1_000_003 + len(ds))
        idx += sorted(rng.sample(range(len(ds)), max(1, int(round(frac * len(ds))))))
    return ds.select(idx)


def training_texts(ds, batch: int = 1000):
    """The text of normalized rows (for training a BPE tokenizer on chat or prompt/completion data)."""
    for start in range(0, len(ds), batch):
        got = ds[start:start + batch]
        yield [p + "\n" + c + "\n" + "\n".join(m) for p, c, m in zip(got["prompt"], got["completion"], got["contents"])]


# ------------------------------------------------------------------------------------------ chat template

@dataclass
class ChatSpec:
    """The chat template in use, where it came from, and the token ids generation stops at."""

    template: str | None
    origin: str
    stop_ids: list[int] = field(default_factory=list)


def resolve_template(cfg: DataConfig, tokenizer) -> tuple[str | None, str]:
    """(template, origin): data.chat_template (a string or a file), else the tokenizer's, else the built-in."""
    t = cfg.chat_template
    if t:
        if "{" not in t:
            return Path(t).expanduser().read_text(encoding="utf-8"), f"data.chat_template file {t}"
        return t, "data.chat_template"
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.chat_template, "the tokenizer's own template"
    return BUILTIN_CHAT_TEMPLATE, "the built-in ChatML template"


def install_template(cfg: DataConfig, tokenizer) -> ChatSpec:
    """Put the chat template on the tokenizer (so save_pretrained writes it into every export); the
    built-in one adds its markers as special tokens. Raises UsageError when it cannot render a chat."""
    template, origin = resolve_template(cfg, tokenizer)
    if template == BUILTIN_CHAT_TEMPLATE:
        from tokenizers import AddedToken

        missing = [t for t in (IM_START, IM_END) if t not in tokenizer.get_vocab()]
        if missing:  # special: kept whole, never merged with text, skipped when decoding for display
            tokenizer.add_tokens([AddedToken(t, special=True, normalized=False) for t in missing], special_tokens=True)
    tokenizer.chat_template = template
    try:
        render(tokenizer, [{"role": "user", "content": PROBE}, {"role": "assistant", "content": PROBE}])
    except Exception as e:  # Jinja syntax errors, undefined names, raise_exception(...)
        raise UsageError(f"the chat template ({origin}) cannot render a simple user/assistant conversation: "
                         f"{type(e).__name__}: {e}") from None
    return ChatSpec(template, origin, end_of_turn_ids(tokenizer))


def render(tokenizer, messages: list[dict], add_generation_prompt: bool = False) -> str:
    """The conversation as text, exactly as transformers' apply_chat_template renders it."""
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def end_of_turn_ids(tokenizer) -> list[int]:
    """EOS plus the token that ends an assistant turn in the tokenizer's chat template (when it is one
    token, e.g. <|im_end|>): the ids generation stops at, listed in every export's generation_config.json."""
    ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    if not getattr(tokenizer, "chat_template", None):
        return ids
    try:
        msgs = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": PROBE}]
        turn = render(tokenizer, msgs)[len(render(tokenizer, msgs[:1], True)):]
    except Exception:
        return ids
    tail = turn[turn.find(PROBE) + len(PROBE):].strip() if PROBE in turn else ""
    if tail:
        enc = tokenizer(tail, add_special_tokens=False)["input_ids"]
        if len(enc) == 1 and enc[0] not in ids:
            ids.append(enc[0])
    return ids


# ------------------------------------------------------------------------------------------ encoding

class RowError(Exception):
    """A row that cannot be turned into an example (a user mistake named with its row)."""


def encode_chat(tokenizer, roles: list[str], contents: list[str], train_on_prompt: bool
                ) -> tuple[list[int], list[bool], int]:
    """(token ids, is-target per token, token index where the last assistant turn starts)."""
    messages = [{"role": r, "content": c} for r, c in zip(roles, contents)]
    try:
        full = render(tokenizer, messages)
        spans = []
        for i, role in enumerate(roles):
            if role != "assistant":
                continue
            before = render(tokenizer, messages[:i], add_generation_prompt=True)
            upto = render(tokenizer, messages[:i + 1])
            if not (upto.startswith(before) and full.startswith(upto)):
                raise RowError(f"the chat template renders assistant turn {i + 1} differently inside the whole "
                               f"conversation than after its prefix, so its tokens cannot be located")
            spans.append((len(before), len(upto.rstrip())))
    except RowError:
        raise
    except Exception as e:
        raise RowError(f"the chat template fails to render it ({type(e).__name__}: {e})") from None
    enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    starts = [o[0] for o in offsets]
    target = [train_on_prompt] * len(ids)
    for a, b in spans:
        lo, hi = bisect.bisect_left(starts, a), bisect.bisect_left(starts, b)
        for j in range(lo, hi):
            target[j] = True
    last = bisect.bisect_left(starts, spans[-1][0]) if spans else len(ids)
    return ids, target, last


def encode(tokenizer, fmt: str, prompt: str, completion: str, roles, contents, train_on_prompt: bool
           ) -> tuple[list[int], list[bool], int]:
    """One normalized row -> (token ids, is-target per token, start of the last completion)."""
    eos = tokenizer.eos_token_id
    if fmt == "chat":
        return encode_chat(tokenizer, roles, contents, train_on_prompt)
    c = tokenizer(completion, add_special_tokens=False)["input_ids"] + [eos]
    if fmt == "text":
        return c, [True] * len(c), 0
    p = tokenizer(prompt, add_special_tokens=False)["input_ids"] if prompt else []
    return p + c, [train_on_prompt] * len(p) + [True] * len(c), len(p)


def fit(ids: list[int], target: list[bool], last: int, limit: int, overflow: str):
    """(ids, target, fate) after data.overflow; fate is kept | truncated | too_long | no_target."""
    fate = "kept"
    if len(ids) > limit:
        if overflow == "drop":
            return None, None, "too_long"
        if overflow == "truncate_prompt":
            cut = len(ids) - limit
            if cut >= last:  # at least one prompt token stays, so the completion's first token is predicted
                return None, None, "too_long"
            ids, target = ids[cut:], target[cut:]
        else:
            ids, target = ids[:limit], target[:limit]
        fate = "truncated"
    if not any(target[1:]):  # token 0 is never predicted
        return None, None, "no_target"
    return ids, target, fate


def example_columns(ids: list[int], target: list[bool]) -> tuple[list[int], list[int]]:
    """Model inputs (all tokens but the last) and labels (the next token where it is a target)."""
    return ids[:-1], [t if is_target else IGNORE for t, is_target in zip(ids[1:], target[1:])]


def _encoder(tokenizer, cfg: DataConfig):
    limit = cfg.seq_len + 1

    def fn(batch):
        out = {"input_ids": [], "labels": [], "fate": [], "problem": []}
        for i in range(len(batch["_row"])):
            ids, labels, fate, problem = [], [], "problem", ""
            try:
                full, target, last = encode(tokenizer, batch["_format"][i], batch["prompt"][i], batch["completion"][i],
                                            batch["roles"][i], batch["contents"][i], batch["_train_on_prompt"][i])
                full, target, fate = fit(full, target, last, limit, cfg.overflow)
                if full is not None:
                    ids, labels = example_columns(full, target)
            except RowError as e:
                problem = f"{e}\t{batch['_row'][i]}"
            out["input_ids"].append(ids)
            out["labels"].append(labels)
            out["fate"].append(fate)
            out["problem"].append(problem)
        return out

    return fn


# ------------------------------------------------------------------------------------------ packing

def pack_groups(lengths: list[int], capacity: int) -> list[list[int]]:
    """Best-fit decreasing: indices of `lengths` grouped into bins of at most `capacity` (each example whole)."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    room: list[tuple[int, int]] = []  # (free positions, bin) sorted
    bins: list[list[int]] = []
    for i in order:
        n = lengths[i]
        k = bisect.bisect_left(room, (n, -1))
        if k < len(room):
            free, b = room.pop(k)
        else:
            free, b = capacity, len(bins)
            bins.append([])
        bins[b].append(i)
        if free - n > 0:
            bisect.insort(room, (free - n, b))
    return bins


def _packer(seq_len: int):
    def fn(batch):
        lengths = [len(x) for x in batch["input_ids"]]
        out = {"input_ids": [], "labels": [], "lengths": []}
        for group in pack_groups(lengths, seq_len):
            out["input_ids"].append([t for i in group for t in batch["input_ids"][i]])
            out["labels"].append([t for i in group for t in batch["labels"][i]])
            out["lengths"].append([lengths[i] for i in group])
        return out

    return fn


def _single(batch):
    return {"input_ids": batch["input_ids"], "labels": batch["labels"],
            "lengths": [[len(x)] for x in batch["input_ids"]]}


def collate(input_ids, labels, lengths, pad_id: int, packed_width: int | None) -> dict[str, torch.Tensor]:
    """Rows -> tensors. Packed rows (packed_width = data.seq_len, a fixed shape) carry position_ids restarting
    at 0 per example and document_ids (-1 on padding), which the model turns into block-diagonal causal
    attention; unpadded-length rows (data.pack=false) are right-padded with an attention_mask."""
    n = len(input_ids)
    width = packed_width or max(len(r) for r in input_ids)
    ids = np.full((n, width), pad_id, dtype=np.int64)
    tgt = np.full((n, width), IGNORE, dtype=np.int64)
    for i, (x, y) in enumerate(zip(input_ids, labels)):
        ids[i, :len(x)], tgt[i, :len(y)] = x, y
    batch = {"input_ids": torch.from_numpy(ids), "labels": torch.from_numpy(tgt)}
    if packed_width is None:
        lens = torch.tensor([len(r) for r in input_ids])
        if int(lens.min()) != width:
            batch["attention_mask"] = (torch.arange(width)[None, :] < lens[:, None]).long()
        return batch
    pos = np.zeros((n, width), dtype=np.int64)
    doc = np.full((n, width), -1, dtype=np.int64)
    for i, ls in enumerate(lengths):
        at = 0
        for j, length in enumerate(ls):
            pos[i, at:at + length] = np.arange(length)
            doc[i, at:at + length] = j
            at += length
        pos[i, at:] = np.arange(width - at)  # padding: a document of its own (no target in it)
    batch["position_ids"], batch["document_ids"] = torch.from_numpy(pos), torch.from_numpy(doc)
    return batch


def isolate_documents(batch: dict[str, torch.Tensor], eos_id: int) -> dict[str, torch.Tensor]:
    """data.isolate_documents (text): inside a packed block, each document (ending at its EOS) restarts its
    positions at 0 and attends only to itself; the EOS's own target (the next document's first token,
    which it cannot see) is masked."""
    ids = batch["input_ids"]
    is_eos = ids == eos_id
    doc = torch.cumsum(is_eos.long(), dim=1) - is_eos.long()  # an EOS belongs to the document it ends
    width = ids.shape[1]
    idx = torch.arange(width).expand_as(ids)
    first = torch.zeros_like(ids, dtype=torch.bool)
    first[:, 0] = True
    first[:, 1:] = doc[:, 1:] != doc[:, :-1]
    start = torch.cummax(torch.where(first, idx, torch.zeros_like(idx)), dim=1).values
    batch["position_ids"], batch["document_ids"] = idx - start, doc
    batch["labels"] = batch["labels"].masked_fill(is_eos, IGNORE)
    return batch


# ------------------------------------------------------------------------------------------ prepare

@dataclass
class Stats:
    """What happened to the examples of a split, for the run log."""

    examples: int = 0
    truncated: int = 0
    too_long: int = 0
    no_target: int = 0
    rows: int = 0
    tokens: int = 0  # non-pad input positions
    targets: int = 0
    positions: int = 0  # rows x seq_len when packed

    @property
    def kept(self) -> int:
        return self.examples - self.too_long - self.no_target

    @property
    def efficiency(self) -> float | None:
        """Packing efficiency: the fraction of positions that hold a token (not padding)."""
        return self.tokens / self.positions if self.positions else None

    def line(self, split: str, overflow: str, seq_len: int) -> str:
        s = (f"{split}: {self.examples} examples, {self.kept} kept ({self.targets} target tokens"
             f"{f', {self.truncated} truncated by data.overflow={overflow}' if self.truncated else ''})")
        if self.too_long:
            s += f"; dropped {self.too_long} longer than data.seq_len + 1 = {seq_len + 1} tokens (data.overflow={overflow})"
        if self.no_target:
            s += f"; dropped {self.no_target} with no target token left"
        if self.efficiency is not None:
            s += (f"; packed into {self.rows} rows of {seq_len}: packing efficiency {100 * self.efficiency:.1f}% "
                  f"(non-pad tokens)")
        return s

    def to_dict(self) -> dict:
        return {"examples": self.examples, "kept": self.kept, "truncated": self.truncated, "dropped_too_long":
                self.too_long, "dropped_no_target": self.no_target, "rows": self.rows, "tokens": self.tokens,
                "targets": self.targets, "packing_efficiency": self.efficiency}


def _features(kind: str):
    import datasets

    ints = datasets.List(datasets.Value("int64"))
    if kind == "encoded":
        return datasets.Features({"input_ids": ints, "labels": ints, "fate": datasets.Value("string"),
                                  "problem": datasets.Value("string")})
    return datasets.Features({"input_ids": ints, "labels": ints, "lengths": ints})


def _map(ds, fn, desc: str, features, batch_size: int = 1000):
    """datasets.map; when the dataset lives in files, rank 0 fills the cache first and the others read it
    (the normalized data is in memory, where every rank computes its own copy at the same time)."""
    kwargs = dict(batched=True, batch_size=batch_size, remove_columns=ds.column_names, desc=desc, features=features)
    if not ds.cache_files:
        return ds.map(fn, **kwargs)
    out = ds
    for turn in (0, 1):
        if (turn == 0) == dist.is_main():
            out = ds.map(fn, **kwargs)
        dist.barrier()
    return out


def prepare_split(ds, tokenizer, cfg: DataConfig, split: str, problems: RowProblems):
    """Encode (checking every row), apply data.overflow, pack: (rows dataset, Stats)."""
    if len(ds) == 0:  # no validation split (data.val_fraction=0)
        import datasets

        return datasets.Dataset.from_dict({k: [] for k in ("input_ids", "labels", "lengths")},
                                          features=_features("rows")).with_format("numpy"), Stats()
    encoded = _map(ds, _encoder(tokenizer, cfg), f"encoding {split} examples", _features("encoded"))
    for p in encoded["problem"]:
        if p:
            kind, where = p.split("\t", 1)
            problems.add(kind, where)
    if problems:
        return None, None
    fates = encoded["fate"]
    stats = Stats(examples=len(fates), truncated=fates.count("truncated"), too_long=fates.count("too_long"),
                  no_target=fates.count("no_target"))
    kept = encoded.filter(lambda f: f in ("kept", "truncated"), input_columns="fate").remove_columns(["fate", "problem"])
    rows = _map(kept, _packer(cfg.seq_len) if cfg.pack else _single, f"packing {split}" if cfg.pack else f"rows {split}",
                _features("rows"), batch_size=PACK_GROUP)
    stats.rows = len(rows)
    if len(rows):
        lengths = [sum(ls) for ls in rows["lengths"]]
        stats.tokens = int(sum(lengths))
        stats.targets = int(sum(int(np.count_nonzero(np.asarray(y) != IGNORE)) for y in rows["labels"]))
        stats.positions = len(rows) * cfg.seq_len if cfg.pack else 0
    return rows.with_format("numpy"), stats


def eval_prompts(ds, tokenizer, count: int, max_tokens: int) -> list[dict]:
    """The first `count` validation examples as generation prompts: {prompt (text shown), ids, reference}.
    A prompt is what inference would send: the prompt text, or the conversation up to its last assistant
    turn rendered with the generation prompt."""
    out = []
    for i in range(len(ds)):
        if len(out) >= count:
            break
        row = ds[i]
        if row["_format"] == "prompt_completion":
            shown, reference = row["prompt"], row["completion"]
            ids = tokenizer(row["prompt"], add_special_tokens=False)["input_ids"]
        elif row["_format"] == "chat":
            last = max(j for j, r in enumerate(row["roles"]) if r == "assistant")
            messages = [{"role": r, "content": c} for r, c in zip(row["roles"][:last], row["contents"][:last])]
            shown, reference = row["contents"][last - 1] if last else "", row["contents"][last]
            ids = tokenizer(render(tokenizer, messages, True), add_special_tokens=False)["input_ids"]
        else:
            continue
        if 0 < len(ids) <= max_tokens:
            out.append({"prompt": shown, "ids": ids, "reference": reference})
    return out
