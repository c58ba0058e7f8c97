"""Data: sources -> tokenizer -> packed/padded samples -> deterministic per-step micro-batches.

Sources (`data.source`), all read through Hugging Face `datasets`:
  builtin:pydoc   the English text of Python's own documentation topics (pydoc_data.topics; ~0.5 MB)
  builtin:stdlib  the source of the Python standard library (~30 MB)
  builtin:stdlib_packages  standard-library snippets labelled with their package (classification; engine/data/tasks.py)
  local files     .txt (paragraphs) / .jsonl / .json / .csv / .parquet, globs allowed
  hub datasets    `name` or `name:config` (downloaded by datasets; never in tests or the default job)

data.format=prompt_completion / chat (and data.mix) read examples instead of a text stream: engine/data/sft.py
checks and normalizes the rows, marks the target tokens and packs whole examples into rows; a sample is
then one such row, sampled like any other.

Sampling is addressed by GLOBAL SAMPLE INDEX: step s of a run with global batch B covers indices
[s*B, (s+1)*B) of an endless stream, epoch e being a seeded permutation of the training samples.
Which rank and micro-batch gets which index only splits that set, so every world x micro x accum split
of a global batch sees the same samples, and a run resumed at step s (on any world size) continues
the same stream.
"""

from __future__ import annotations

import glob
import os
import sysconfig
import threading
import queue
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from engine import dist
from engine.config import DataConfig, looks_like_path
from engine.errors import UsageError
from engine.losses import IGNORE
from engine.data.windows import WindowSpec, cls_eval_batch, cls_windows, lm_windows

EOS = "<|endoftext|>"
FILE_LOADERS = {".txt": "text", ".text": "text", ".md": "text", ".jsonl": "json", ".json": "json",
                ".csv": "csv", ".tsv": "csv", ".parquet": "parquet"}


# --------------------------------------------------------------------------------------------- sources

def _pydoc_topics():
    import pydoc_data.topics

    for name in sorted(pydoc_data.topics.topics):
        yield {"text": pydoc_data.topics.topics[name]}


def _stdlib_sources(stdlib: str):
    root = Path(stdlib)
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if rel.parts[0] in ("site-packages", "test", "idlelib") or "tests" in rel.parts:
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        if text.strip():
            yield {"text": text, "path": str(rel)}


BUILTINS = {
    "pydoc": (_pydoc_topics, lambda: {}),
    "stdlib": (_stdlib_sources, lambda: {"stdlib": sysconfig.get_paths()["stdlib"]}),
}


# Builtins that come with their own splits: their generator takes `split=<name>` (see engine/data/tasks.py).
BUILTIN_SPLITS: dict[str, tuple[str, ...]] = {}


def register_builtin(name: str, generator, gen_kwargs=lambda: {}, splits: tuple[str, ...] = ()) -> None:
    """Add a `builtin:<name>` source (a generator of row dicts); used by task modules. With `splits`
    (e.g. ("train", "validation")) the generator is called once per split with `split=` added."""
    BUILTINS[name] = (generator, gen_kwargs)
    if splits:
        BUILTIN_SPLITS[name] = tuple(splits)


def _silence_datasets() -> None:
    import datasets

    datasets.logging.set_verbosity_error()
    datasets.disable_progress_bars()


def load_raw(cfg: DataConfig, seed: int, need_label: bool = False):
    """The source as a DatasetDict with `train` and `validation`, columns checked.

    Raises UsageError for a missing file, an unknown builtin, a missing column (listing the columns
    that exist) or an empty split.
    """
    _silence_datasets()
    if cfg.sft:  # prompt/completion, chat or a mix: rows checked and normalized (engine/data/sft.py)
        from engine.data import sft

        return sft.load_normalized(cfg, seed, lambda src: load_source(src),
                                   lambda dd, s: _train_validation(dd, cfg, s))
    dd = _train_validation(load_source(cfg.source.strip()), cfg, seed)
    _check_columns(dd, cfg, need_label)
    return dd


def load_source(src: str):
    """The DatasetDict of a builtin, local files or a hub dataset, as the source provides its splits."""
    import datasets

    if src.startswith("builtin:"):
        name = src.split(":", 1)[1]
        if name not in BUILTINS:
            raise UsageError(f"data.source {src!r}: unknown builtin; available: {', '.join('builtin:' + b for b in BUILTINS)}")
        gen, kwargs = BUILTINS[name]
        dd = datasets.DatasetDict({split: datasets.Dataset.from_generator(gen, gen_kwargs={**kwargs(), "split": split})
                                   for split in BUILTIN_SPLITS[name]} if name in BUILTIN_SPLITS else
                                  {"train": datasets.Dataset.from_generator(gen, gen_kwargs=kwargs())})
    elif _looks_like_files(src):
        files = sorted(glob.glob(os.path.expanduser(src))) if any(c in src for c in "*?[") else [os.path.expanduser(src)]
        missing = [f for f in files if not os.path.isfile(f)]
        if not files or missing:
            raise UsageError(f"data.source {src!r}: no such file{'s' if len(missing) > 1 else ''} "
                             f"{', '.join(missing) if missing else '(the glob matched nothing)'}")
        kinds = {FILE_LOADERS.get(Path(f).suffix.lower()) for f in files}
        if None in kinds or len(kinds) != 1:
            raise UsageError(f"data.source {src!r}: files must all be one of {', '.join(sorted(FILE_LOADERS))}")
        kind = kinds.pop()
        kw = {"sample_by": "paragraph"} if kind == "text" else {}
        if kind == "csv" and any(f.endswith(".tsv") for f in files):
            kw["sep"] = "\t"
        problems = [p for f in files for p in file_problems(Path(f), kind)]  # empty, binary, not UTF-8: before reading
        if problems:
            raise UsageError([f"data.source {src!r}: {p}" for p in problems])
        try:
            # Its own log of a parse error (a traceback) is replaced by the message below, which says where.
            datasets.logging.set_verbosity(datasets.logging.CRITICAL)
            dd = datasets.load_dataset(kind, data_files={"train": files}, **kw)
        except Exception as e:  # datasets raises many types for unreadable files
            if "corresponds to no data" in str(e):
                raise UsageError(f"data.source {src!r}: the training split is empty") from None
            raise UsageError(f"data.source {src!r}: cannot read it as {kind}: "
                             f"{explain_read_error(files, kind, e)}") from None
        finally:
            datasets.logging.set_verbosity_error()
    else:
        name, _, config = src.partition(":")
        try:
            dd = datasets.load_dataset(name, config or None)
        except Exception as e:
            raise UsageError(f"data.source {src!r}: not a builtin, not an existing file, and not a loadable hub "
                             f"dataset ({type(e).__name__}: {e})") from None
    return dd


TEXT_KINDS = ("text", "json", "csv")
_SNIFF = 1 << 16


def file_problems(path: Path, kind: str, whole: bool = False) -> list[str]:
    """What makes a local data file unusable, found cheaply before `datasets` reads it: empty, binary (NUL
    bytes in its first 64 KiB), not UTF-8 in its first 64 KiB. whole=True decodes all of it (1 MiB at a
    time), which is done only after `datasets` failed, to say where."""
    size = path.stat().st_size
    if size == 0:
        return [f"{path} is empty (0 bytes)"]
    if kind not in TEXT_KINDS:
        return []
    import codecs

    decoder = codecs.getincrementaldecoder("utf-8")()
    offset, line = 0, 1
    with open(path, "rb") as f:
        block = f.read(_SNIFF)
        if b"\0" in block:
            return [f"{path} is a binary file (it holds NUL bytes), not text"]
        if kind == "text" and len(block) == size and not block.strip():
            return [f"{path} holds no text (only whitespace)"]
        while block:
            try:
                decoder.decode(block, final=False)
            except UnicodeDecodeError as e:
                line += block[: e.start].count(b"\n")
                return [f"{path} is not UTF-8 text: byte 0x{block[e.start]:02x} at offset {offset + e.start} "
                        f"(line {line}) cannot be decoded; convert the file to UTF-8 (e.g. iconv -f latin1 -t utf-8)"]
            if not whole:
                return []
            line += block.count(b"\n")
            offset += len(block)
            block = f.read(1 << 20)
    try:
        decoder.decode(b"", final=True)
    except UnicodeDecodeError:
        return [f"{path} is not UTF-8 text: it ends in the middle of a character (truncated?)"]
    return []


def explain_read_error(files: list[str], kind: str, error: Exception) -> str:
    """What went wrong inside `datasets`, as the user can fix it: the underlying cause (not the wrapper
    `DatasetGenerationError`) and, for JSON lines and CSV, the file and line it is on."""
    cause = error
    while (cause.__cause__ or cause.__context__) is not None and type(cause).__name__ == "DatasetGenerationError":
        cause = cause.__cause__ or cause.__context__
    why = f"{type(cause).__name__}: {cause}".strip()
    for f in files:
        where = "; ".join(file_problems(Path(f), kind, whole=True)) or _locate(Path(f), kind, str(cause))
        if where:
            return f"{where} ({why})"
    return why


def _locate(path: Path, kind: str, message: str) -> str | None:
    """The first line of `path` that explains a parse failure, by reading it the way the format is defined."""
    import csv
    import json
    import re

    try:
        if kind == "json" and path.suffix.lower() == ".jsonl":
            with open(path, encoding="utf-8") as f:
                types: dict[str, tuple[str, int]] = {}
                for n, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    try:
                        row = json.loads(line)
                    except ValueError as e:
                        return f"{path} line {n} is not valid JSON ({e}): {line.strip()[:80]!r}"
                    if not isinstance(row, dict):
                        return f"{path} line {n} is not a JSON object: {line.strip()[:80]!r}"
                    for k, v in row.items():
                        t = _json_kind(v)
                        if t != "null" and types.setdefault(k, (t, n))[0] != t:
                            first_t, first_n = types[k]
                            return (f"{path} line {n}: column {k!r} holds a {t} ({v!r:.40}) but line {first_n} has a "
                                    f"{first_t}; make the column one type")
        elif kind == "json":
            with open(path, encoding="utf-8") as f:
                json.load(f)
        elif kind == "csv":
            m = re.search(r"Failed to parse string: '(.*)' as a scalar of type (\w+)", message)
            with open(path, newline="", encoding="utf-8") as f:
                reader = csv.reader(f, delimiter="\t" if path.suffix.lower() == ".tsv" else ",")
                header = next(reader, [])
                for n, row in enumerate(reader, 2):
                    if len(row) != len(header):
                        return f"{path} line {n} has {len(row)} fields, the header has {len(header)}"
                    if m and m.group(1) in row:
                        col = header[row.index(m.group(1))]
                        return (f"{path} line {n}: column {col!r} holds {m.group(1)!r}, but its earlier rows were "
                                f"read as {m.group(2)}; make the column one type (e.g. all text)")
    except ValueError as e:
        return f"{path} is not valid JSON ({e})"
    except OSError:
        return None
    return None


def _json_kind(v) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "boolean"
    if isinstance(v, (int, float)):
        return "number"
    return {str: "string", list: "list", dict: "object"}.get(type(v), type(v).__name__)


def _looks_like_files(src: str) -> bool:
    return os.path.exists(os.path.expanduser(src)) or Path(src).suffix.lower() in FILE_LOADERS or any(c in src for c in "*?[/")


def _train_validation(dd, cfg: DataConfig, seed: int):
    import datasets

    val_name = next((s for s in ("validation", "valid", "val", "test") if s in dd), None)
    train = dd["train"] if "train" in dd else dd[next(iter(dd))]
    if val_name is not None:
        return datasets.DatasetDict({"train": train, "validation": dd[val_name]})
    if cfg.val_fraction == 0 or len(train) == 0:
        return datasets.DatasetDict({"train": train, "validation": train.select([])})
    if len(train) == 1 and cfg.text_column not in train.column_names:
        return datasets.DatasetDict({"train": train, "validation": train.select([])})  # _check_columns says why
    if len(train) == 1 and cfg.text_column in train.column_names:
        # One document: hold out its tail rather than nothing.
        row = train[0]  # once: a single document can be a 50 MB line
        text = row[cfg.text_column]
        cut = int(len(text) * (1 - cfg.val_fraction))
        one = {k: [v] for k, v in row.items()}
        head, tail = dict(one, **{cfg.text_column: [text[:cut]]}), dict(one, **{cfg.text_column: [text[cut:]]})
        return datasets.DatasetDict({"train": datasets.Dataset.from_dict(head), "validation": datasets.Dataset.from_dict(tail)})
    n_val = max(1, int(round(len(train) * cfg.val_fraction)))
    split = train.train_test_split(test_size=n_val, seed=seed, shuffle=True)
    return datasets.DatasetDict({"train": split["train"], "validation": split["test"]})


def _check_columns(dd, cfg: DataConfig, need_label: bool) -> None:
    problems = []
    cols = dd["train"].column_names
    if cfg.text_column not in cols:
        problems.append(f"data.text_column {cfg.text_column!r} is not in the data; columns: {', '.join(cols)}")
    if need_label and cfg.label_column not in cols:
        problems.append(f"data.label_column {cfg.label_column!r} is not in the data; columns: {', '.join(cols)}")
    if len(dd["train"]) == 0:
        problems.append(f"data.source {cfg.source!r}: the training split is empty")
    if problems:
        raise UsageError(problems)


# ------------------------------------------------------------------------------------------ tokenizer

def load_tokenizer(path_or_id: str):
    from transformers import AutoTokenizer

    local = os.path.isdir(os.path.expanduser(path_or_id))
    if looks_like_path(path_or_id) and not local:
        raise UsageError(f"tokenizer directory {path_or_id!r} does not exist")
    try:
        tok = AutoTokenizer.from_pretrained(path_or_id)
    except (OSError, ValueError) as e:
        where = "" if local else "there is no directory of that name, and as a hub id: "
        raise UsageError(f"tokenizer {path_or_id!r} cannot be loaded: {where}{e}".strip()) from None
    return ensure_pad(tok)


def ensure_pad(tok):
    """GPT-2 tokenizers have no pad token; pad with EOS (attention masks and -100 labels keep it inert)."""
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def train_bpe(texts, vocab_size: int):
    """A byte-level BPE trained here, so runs without a pretrained tokenizer stay offline. `texts` yields
    batches of documents; long ones are fed in pieces (`pieces`), which bounds the trainer's memory and
    counts the same words."""
    from tokenizers import ByteLevelBPETokenizer

    def in_pieces():
        for batch in texts:
            if any(len(t) > PIECE_CHARS for t in batch):
                yield [p for t in batch for p in pieces(t)]
            else:
                yield batch

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(in_pieces(), vocab_size=vocab_size, min_frequency=2, special_tokens=[EOS],
                            show_progress=False)
    return tokenizer_from_json(bpe._tokenizer.to_str())


def tokenizer_from_json(blob: str):
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(blob), bos_token=EOS, eos_token=EOS,
                                  unk_token=EOS, pad_token=EOS, model_max_length=1 << 30)
    return tok


def text_iterator(ds, column: str, batch: int = 1000) -> Iterator[list[str]]:
    if "contents" in ds.column_names and column not in ds.column_names:  # normalized SFT rows (engine/data/sft.py)
        from engine.data import sft

        yield from sft.training_texts(ds, batch)
        return
    for start in range(0, len(ds), batch):
        yield [t or "" for t in ds[start:start + batch][column]]


# ----------------------------------------------------------------------------------------- processing

# A document longer than this many characters is tokenized a piece at a time. A fast tokenizer given one
# 50 MB line holds offsets and token strings for all of it at once (7.6 GB peak RSS measured); in pieces
# the memory is that of one piece plus the ids.
PIECE_CHARS = 1 << 20


def pieces(text: str, size: int | None = None) -> list[str]:
    """`text` cut into pieces of at most `size` characters, each cut just before a space that follows a
    non-space. GPT-2's byte-level pre-tokenizer splits there too (a pre-token holds a space only as its
    first character, or in a run of whitespace), so the pieces' tokens are exactly the whole text's. A
    stretch of `size` characters without such a space is cut where it ends."""
    size = size or PIECE_CHARS
    out, start, n = [], 0, len(text)
    while n - start > size:
        cut = start + size
        while True:
            cut = text.rfind(" ", start + 1, cut)
            if cut <= start:
                cut = start + size
                break
            if not text[cut - 1].isspace():
                break
        out.append(text[start:cut])
        start = cut
    out.append(text[start:])
    return out


def token_ids(tokenizer, texts: list[str]) -> list:
    """Token ids of each text (no special tokens added); long texts are tokenized in `pieces`."""
    ids: list = [None] * len(texts)
    short = [i for i, t in enumerate(texts) if len(t) <= PIECE_CHARS]
    if short:
        for i, x in zip(short, tokenizer([texts[i] for i in short], add_special_tokens=False)["input_ids"]):
            ids[i] = x
    for i, t in enumerate(texts):
        if ids[i] is None:
            ids[i] = np.concatenate([np.asarray(tokenizer(p, add_special_tokens=False)["input_ids"], dtype=np.int64)
                                     for p in pieces(t)])
    return ids


def _tokenize_lm(tokenizer, column: str, seq_len: int, pack: bool, window: WindowSpec | None = None):
    eos = tokenizer.eos_token_id

    def fn(batch):
        ids = token_ids(tokenizer, [t or "" for t in batch[column]])
        if not pack and window is not None:  # every token a target once; `skip` masks the overlap's targets
            rows = [w for x in ids for w in lm_windows(list(x), seq_len, window.stride, window.max_windows)]
            return {"input_ids": [r for r, _ in rows], "skip": [k for _, k in rows]}
        if not pack:
            return {"input_ids": [list(x[: seq_len + 1]) for x in ids if len(x) >= 2]}
        # Pack: documents joined with EOS, cut into blocks of seq_len+1 (inputs and shifted targets), in
        # numpy: a Python list of every token of a 50 MB document would take gigabytes.
        flat = np.concatenate([np.append(np.asarray(x, dtype=np.int64), eos) for x in ids]) if ids else \
            np.zeros(0, dtype=np.int64)
        n = len(flat) // (seq_len + 1) * (seq_len + 1)
        return {"input_ids": flat[:n].reshape(-1, seq_len + 1)}

    return fn


def _tokenize_cls(tokenizer, column: str, label_column: str, seq_len: int, label_to_id: dict,
                  window: WindowSpec | None = None, whole_documents: bool = False):
    """Truncated samples; with `window`: one sample per window (training), or with `whole_documents`
    the document's tokens that its windows reach (evaluation pools the windows per document)."""
    cap = None if window is None else (window.max_tokens or None) if whole_documents else None

    def fn(batch):
        texts = [t or "" for t in batch[column]]
        if window is None:
            enc = tokenizer(texts, add_special_tokens=False, truncation=True, max_length=seq_len)["input_ids"]
        else:
            enc = tokenizer(texts, add_special_tokens=False, truncation=cap is not None, max_length=cap)["input_ids"]
        keep = [i for i, x in enumerate(enc) if len(x) > 0]
        labels = [label_to_id[batch[label_column][i]] for i in keep]
        if window is None or whole_documents:
            return {"input_ids": [enc[i] for i in keep], "labels": labels}
        rows = [(w, y) for i, y in zip(keep, labels) for w in cls_windows(enc[i], seq_len, window.stride, window.max_windows)]
        return {"input_ids": [w for w, _ in rows], "labels": [y for _, y in rows]}

    return fn


def label_vocab(train, label_column: str, num_labels: int) -> tuple[list[str], dict, list[str]]:
    """(names, value -> id, problems). Integer labels keep their ids; other labels are sorted names."""
    values = train.unique(label_column)
    problems = []
    if values and all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in values):
        n = num_labels or (max(values) + 1)
        bad = sorted(v for v in values if v < 0 or v >= n)
        if bad:
            problems.append(f"labels {bad[:10]} in column {label_column!r} are outside 0..{n - 1}; "
                            f"set model.num_labels to at least {max(values) + 1} or fix the data")
        return [str(i) for i in range(n)], {v: int(v) for v in values}, problems
    names = sorted(str(v) for v in values if v is not None)
    if None in values:
        problems.append(f"column {label_column!r} has empty labels; drop those rows")
    if num_labels and len(names) > num_labels:
        problems.append(f"the data has {len(names)} distinct labels but model.num_labels={num_labels}")
    return names, {v: names.index(str(v)) for v in values if v is not None}, problems


@dataclass
class Prepared:
    """Tokenized splits ready for sampling, plus what the model needs to know about them."""

    train: object
    validation: object
    tokenizer: object
    head: str
    seq_len: int
    label_names: list[str] = field(default_factory=list)
    windows: WindowSpec | None = None  # data.overflow=window (cls validation rows are whole documents)
    class_weights: torch.Tensor | None = None  # head=cls: per-class loss weights (loss.class_weights)
    balanced: bool = False  # head=cls: draw training samples class-balanced (data.balanced_sampling)
    sft: bool = False  # prompt_completion/chat/mix: rows of inputs + labels (engine/data/sft.py)
    packed: bool = False  # sft: rows hold several examples (position_ids/document_ids in each batch)
    isolate_eos: int | None = None  # text, data.isolate_documents: the EOS that separates documents
    stats: dict = field(default_factory=dict)  # sft: split -> sft.Stats
    prompts: list = field(default_factory=list)  # sft: held-out generation prompts (sft.eval_prompts)
    chat: object = None  # sft: sft.ChatSpec when the data has chats

    def collate(self, ds, idx: np.ndarray) -> dict[str, torch.Tensor]:
        """The samples `idx` of split `ds` as one micro-batch of tensors."""
        if self.sft:
            from engine.data import sft

            got = ds[idx.tolist()]
            return sft.collate(list(got["input_ids"]), list(got["labels"]), list(got["lengths"]),
                               self.tokenizer.pad_token_id, self.seq_len if self.packed else None)
        rows, labels = _rows(ds, idx)
        batch = _mask_skipped(collate(rows, self.head, self.tokenizer.pad_token_id, labels), ds, idx)
        if self.isolate_eos is not None:
            from engine.data import sft

            batch = sft.isolate_documents(batch, self.isolate_eos)
        return batch

    @property
    def num_labels(self) -> int:
        return len(self.label_names)

    def label_counts(self, split: str = "train") -> list[int]:
        ds = getattr(self, split)
        if not len(ds):
            return [0] * self.num_labels
        return np.bincount(np.asarray(ds["labels"]), minlength=self.num_labels).tolist()


def prepare(dd, tokenizer, cfg: DataConfig, head: str, num_labels: int = 0,
            label_names: list[str] | None = None, prompts: int = 3) -> Prepared:
    """Tokenize (cached by datasets) and pack/label both splits; rank 0 fills the cache first.

    `label_names` fixes the label vocabulary (a trained model's id2label) instead of inferring it.
    Long documents follow data.overflow (engine/data/windows.py). prompt_completion/chat data: `prepare_sft`,
    keeping `prompts` held-out prompts for the greedy generations of evaluation."""
    if cfg.sft:
        return prepare_sft(dd, tokenizer, cfg, prompts)
    window = WindowSpec.from_config(cfg)
    if head == "cls" and label_names:
        label_to_id = {**{n: i for i, n in enumerate(label_names)}, **{i: i for i in range(len(label_names))}}
        values = set(dd["train"].unique(cfg.label_column)) | (set(dd["validation"].unique(cfg.label_column))
                                                               if len(dd["validation"]) else set())
        unknown = sorted(str(v) for v in values if v not in label_to_id)
        if unknown:
            raise UsageError(f"labels {unknown[:10]} are not among the model's labels ({', '.join(label_names)})")
        label_to_id.update({v: label_to_id[v] for v in values})
        fn = _tokenize_cls(tokenizer, cfg.text_column, cfg.label_column, cfg.seq_len, label_to_id, window)
    elif head == "cls":
        label_names, label_to_id, problems = label_vocab(dd["train"], cfg.label_column, num_labels)
        val_values = set(dd["validation"].unique(cfg.label_column)) if len(dd["validation"]) else set()
        unseen = sorted(str(v) for v in val_values - set(label_to_id))
        if unseen:
            problems.append(f"validation labels {unseen[:10]} never occur in the training split")
        if problems:
            raise UsageError(problems)
        fn = _tokenize_cls(tokenizer, cfg.text_column, cfg.label_column, cfg.seq_len, label_to_id, window)
    else:
        fn = _tokenize_lm(tokenizer, cfg.text_column, cfg.seq_len, cfg.pack, window)
    fns = {"train": fn, "validation": fn}
    if head == "cls" and window is not None:
        fns["validation"] = _tokenize_cls(tokenizer, cfg.text_column, cfg.label_column, cfg.seq_len, label_to_id,
                                          window, whole_documents=True)
    out = {}
    for split in ("train", "validation"):
        ds = dd[split]
        for turn in (0, 1):  # rank 0 writes the cache; the others then read it
            if (turn == 0) == dist.is_main():
                ds = dd[split].map(fns[split], batched=True, batch_size=1000, remove_columns=dd[split].column_names,
                                   desc=f"tokenizing {split}")
            dist.barrier()
        out[split] = ds.with_format("numpy")
    if len(out["train"]) == 0:
        raise UsageError(f"data.source {cfg.source!r}: no training sample of data.seq_len={cfg.seq_len} tokens fits in "
                         f"the training split; lower data.seq_len or add data")
    return Prepared(out["train"], out["validation"], tokenizer, head, cfg.seq_len, list(label_names or []), window,
                    balanced=cfg.balanced_sampling and head == "cls",
                    isolate_eos=tokenizer.eos_token_id if cfg.isolate_documents and cfg.pack and head == "lm" else None)


def prepare_sft(dd, tokenizer, cfg: DataConfig, prompts: int = 3, prompt_tokens: int | None = None) -> Prepared:
    """prompt_completion/chat/mix: the chat template installed on the tokenizer (when the data has chats),
    every example encoded and checked, data.overflow applied, packed into rows (engine/data/sft.py)."""
    from engine.data import sft

    chat = sft.install_template(cfg, tokenizer) if "chat" in cfg.formats else None
    problems = sft.RowProblems()
    out, stats = {}, {}
    for split in ("train", "validation"):
        out[split], stats[split] = sft.prepare_split(dd[split], tokenizer, cfg, split, problems)
    if problems:
        raise UsageError(problems.messages(), hint="docs/sft.md describes the data formats and chat templates.")
    if len(out["train"]) == 0:
        raise UsageError(f"no training example is left: {stats['train'].line('train', cfg.overflow, cfg.seq_len)}; "
                         f"raise data.seq_len or use data.overflow=truncate_prompt")
    held_out = sft.eval_prompts(dd["validation"], tokenizer, prompts, prompt_tokens or cfg.seq_len)
    return Prepared(out["train"], out["validation"], tokenizer, "lm", cfg.seq_len, sft=True, packed=cfg.pack,
                    stats=stats, prompts=held_out, chat=chat)


# --------------------------------------------------------------------------------------------- batches

class GlobalSampler:
    """Global sample index -> training sample index: epoch e is a seeded permutation of the samples."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed = n, seed
        self._epoch, self._perm = -1, None

    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch != self._epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perm, self._epoch = torch.randperm(self.n, generator=g).numpy(), epoch
        return self._perm

    def indices(self, start: int, count: int) -> np.ndarray:
        g = np.arange(start, start + count)
        out = np.empty(count, dtype=np.int64)
        for epoch in np.unique(g // self.n):
            sel = (g // self.n) == epoch
            out[sel] = self._permutation(int(epoch))[g[sel] % self.n]
        return out


class BalancedSampler:
    """Global sample index -> training sample index with every class drawn equally often.

    Epoch e (as long as one pass over the data) is a seeded shuffle of a class sequence holding each of
    the K classes n/K times (the first n mod K classes once more). The j-th time class c occurs in the
    stream, counted from the start of training, takes member j mod n_c of class c's j // n_c-th seeded
    permutation, so rare classes cycle through their samples and common ones are drawn without
    replacement. Everything is a function of the global index: deterministic and resumable on any world
    size, like GlobalSampler."""

    def __init__(self, labels: np.ndarray, seed: int):
        labels = np.asarray(labels, dtype=np.int64)
        self.n, self.seed = len(labels), seed
        self.classes = np.unique(labels)
        self.members = [np.flatnonzero(labels == c) for c in self.classes]
        k = len(self.classes)
        self.per_epoch = np.full(k, self.n // k) + (np.arange(k) < self.n % k)  # occurrences of each class per epoch
        self._epoch, self._seq, self._rank = -1, None, None
        self._perms: dict[tuple[int, int], np.ndarray] = {}

    def _epoch_sequence(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """(class position per stream slot, how many earlier slots of this epoch hold the same class)."""
        if epoch != self._epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            base = np.repeat(np.arange(len(self.classes)), self.per_epoch)
            seq = base[torch.randperm(self.n, generator=g).numpy()]
            order = np.argsort(seq, kind="stable")
            starts = np.searchsorted(seq[order], np.arange(len(self.classes)))
            rank = np.empty(self.n, dtype=np.int64)
            rank[order] = np.arange(self.n) - starts[seq[order]]
            self._epoch, self._seq, self._rank = epoch, seq, rank
        return self._seq, self._rank

    def _member(self, c: int, occurrence: int) -> int:
        members = self.members[c]
        cycle, pos = divmod(occurrence, len(members))
        key = (c, cycle)
        if key not in self._perms:
            if len(self._perms) > 4096:
                self._perms.clear()
            g = torch.Generator().manual_seed((self.seed * 1_000_003 + 7_919 * (c + 1)) * 1_000_033 + cycle)
            self._perms[key] = members[torch.randperm(len(members), generator=g).numpy()]
        return int(self._perms[key][pos])

    def indices(self, start: int, count: int) -> np.ndarray:
        out = np.empty(count, dtype=np.int64)
        for i, g in enumerate(range(start, start + count)):
            epoch, slot = divmod(g, self.n)
            seq, rank = self._epoch_sequence(epoch)
            c = int(seq[slot])
            out[i] = self._member(c, epoch * int(self.per_epoch[c]) + int(rank[slot]))
        return out


@dataclass(frozen=True)
class Layout:
    """How one global batch splits: world x grad_accum micro-batches of micro_batch samples."""

    world: int
    rank: int
    micro_batch: int
    grad_accum: int

    @property
    def global_batch(self) -> int:
        return self.world * self.micro_batch * self.grad_accum

    def positions(self, micro: int) -> slice:
        """Offsets inside the step's global batch that this rank's micro-batch `micro` takes."""
        start = (micro * self.world + self.rank) * self.micro_batch
        return slice(start, start + self.micro_batch)


def collate(rows: list[np.ndarray] | np.ndarray, head: str, pad_id: int, labels=None) -> dict[str, torch.Tensor]:
    """Samples -> tensors. LM rows hold seq_len+1 tokens (inputs + shifted targets); cls rows are inputs."""
    if head == "lm":
        lengths = [len(r) for r in rows]
        width = max(lengths)
        ids = np.full((len(rows), width), pad_id, dtype=np.int64)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = r
        ids_t = torch.from_numpy(ids)
        tgt = ids_t[:, 1:].clone()
        mask = torch.arange(width - 1)[None, :] < (torch.tensor(lengths)[:, None] - 1)
        tgt[~mask] = IGNORE
        batch = {"input_ids": ids_t[:, :-1].contiguous(), "labels": tgt}
        if min(lengths) != width:
            batch["attention_mask"] = mask.long()
        return batch
    lengths = [len(r) for r in rows]
    width = max(lengths)
    ids = np.full((len(rows), width), pad_id, dtype=np.int64)
    mask = np.zeros((len(rows), width), dtype=np.int64)
    for i, r in enumerate(rows):
        ids[i, : len(r)], mask[i, : len(r)] = r, 1
    return {"input_ids": torch.from_numpy(ids), "attention_mask": torch.from_numpy(mask),
            "labels": torch.as_tensor(np.asarray(labels), dtype=torch.long)}


def _rows(ds, idx: np.ndarray):
    got = ds[idx.tolist()]
    return list(got["input_ids"]), (got["labels"] if "labels" in got else None)


def _mask_skipped(batch: dict[str, torch.Tensor], ds, idx: np.ndarray) -> dict[str, torch.Tensor]:
    """LM windows: mask each row's first `skip` targets (an earlier window of its document has them)."""
    if "skip" in ds.column_names:
        skip = torch.as_tensor(np.asarray(ds[idx.tolist()]["skip"]))
        batch["labels"][torch.arange(batch["labels"].shape[1])[None, :] < skip[:, None]] = IGNORE
    return batch


class TrainBatches:
    """This rank's micro-batches of consecutive global batches, starting at global sample index
    `start_sample` (the data position a checkpoint stores), produced ahead on a thread on CUDA
    (pinned, non-blocking copies). Addressing by sample rather than by step is what lets a run
    resumed with another world size or global batch continue the same stream."""

    def __init__(self, data: Prepared, layout: Layout, seed: int, device: torch.device, start_sample: int = 0,
                 prefetch: int = 2):
        self.data, self.layout, self.device = data, layout, device
        self.sampler = BalancedSampler(data.train["labels"], seed) if data.balanced else GlobalSampler(len(data.train), seed)
        self.pad_id = data.tokenizer.pad_token_id
        self.sample = start_sample
        self._q: queue.Queue | None = None
        self._prefetch = prefetch if device.type == "cuda" else 0
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()

    def micro_batches(self, start_sample: int) -> list[dict[str, torch.Tensor]]:
        """The global batch [start_sample, start_sample + global_batch): this rank's micro-batches."""
        lay = self.layout
        idx = self.sampler.indices(start_sample, lay.global_batch)
        out = []
        for m in range(lay.grad_accum):
            out.append(self.data.collate(self.data.train, idx[lay.positions(m)]))
            if self.data.class_weights is not None:  # the trainer normalizes by their global sum
                out[-1]["loss_weights"] = self.data.class_weights[out[-1]["labels"]]
        return out

    def _to_device(self, mbs):
        if self.device.type != "cuda":
            return mbs
        return [{k: v.pin_memory().to(self.device, non_blocking=True) for k, v in mb.items()} for mb in mbs]

    def _worker(self):
        # Any error here (a bad row, pinning without a GPU, ...) is handed to the loop as the next item: a
        # thread that died silently would leave next() waiting on an empty queue for ever (a "hang").
        sample = self.sample
        try:
            while not self._stop.is_set():
                item = self.micro_batches(sample)
                if self.device.type == "cuda":
                    item = [{k: v.pin_memory() for k, v in mb.items()} for mb in item]
                if not self._put(item):
                    return
                sample += self.layout.global_batch
        except BaseException as e:  # noqa: BLE001  (re-raised in the loop's thread)
            self._put(_WorkerFailed(e))

    def _put(self, item) -> bool:
        while not self._stop.is_set():
            try:
                self._q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def next(self) -> list[dict[str, torch.Tensor]]:
        """The current global batch's micro-batches, then advance by one global batch."""
        if self._prefetch:
            if self._thread is None:
                self._q = queue.Queue(maxsize=self._prefetch)
                self._thread = threading.Thread(target=self._worker, daemon=True, name="ftl-prefetch")
                self._thread.start()
            item = self._q.get()
            if isinstance(item, _WorkerFailed):
                self._q.put_nowait(item)  # every later call fails the same way (the worker has stopped)
                raise RuntimeError(f"the batch prefetching thread failed: {item.error!r}") from item.error
            mbs = [{k: v.to(self.device, non_blocking=True) for k, v in mb.items()} for mb in item]
        else:
            mbs = self._to_device(self.micro_batches(self.sample))
        self.sample += self.layout.global_batch
        return mbs

    def close(self) -> None:
        """Stop and join the prefetching thread (it sees the flag within 0.1 s, or after its current batch)."""
        self._stop.set()
        thread, self._thread = self._thread, None
        if thread is not None:
            thread.join(timeout=60)


class _WorkerFailed:
    """What the prefetching thread puts in the queue instead of a batch when it fails."""

    def __init__(self, error: BaseException):
        self.error = error


def real_tokens(batch: dict[str, torch.Tensor]):
    """Tokens of a micro-batch that are not padding (what tokens and tokens/s count)."""
    if "attention_mask" in batch:
        return batch["attention_mask"].sum()
    if "document_ids" in batch:  # packed rows: padding is document -1
        return (batch["document_ids"] >= 0).sum()
    return batch["input_ids"].numel()


def probe_batch(data: Prepared, n: int = 2) -> dict[str, torch.Tensor]:
    """A fixed small batch (the first validation samples, else training ones) for logit checks."""
    ds = data.validation if len(data.validation) else data.train
    if data.sft:  # one example a row, as plain transformers sees them (no packing metadata)
        got = ds[list(range(min(n, len(ds))))]
        rows = [np.asarray(x)[: data.seq_len] for x in got["input_ids"]]
        return collate([np.append(r, data.tokenizer.pad_token_id) for r in rows], "lm", data.tokenizer.pad_token_id)
    rows, labels = _rows(ds, np.arange(min(n, len(ds))))
    rows = [r[: data.seq_len + (data.head == "lm")] for r in rows]  # whole-document cls rows may be longer
    return collate(rows, data.head, data.tokenizer.pad_token_id, labels)


def eval_batches(data: Prepared, world: int, rank: int, micro_batch: int, device: torch.device, max_batches: int = 0,
                 dataset=None):
    """Validation micro-batches for this rank. Every rank yields the SAME number of batches (ZeRO-3
    forwards are collectives); positions past the end repeat sample 0 with their targets masked.

    `dataset` replaces the validation split (LM sliding windows: rows with a `skip` column, the number of
    leading targets an earlier window already scored, which are masked here)."""
    ds = data.validation if dataset is None else dataset
    n = len(ds)
    if n == 0:
        return
    per_round = world * micro_batch
    rounds = -(-n // per_round)
    if max_batches:
        rounds = min(rounds, max_batches)
    for b in range(rounds):
        pos = np.arange((b * world + rank) * micro_batch, (b * world + rank + 1) * micro_batch)
        valid = pos < n
        if data.head == "cls" and data.windows is not None:
            rows, labels = _rows(ds, np.where(valid, pos, 0))
            batch = cls_eval_batch(rows, labels, data.windows, data.tokenizer.pad_token_id)
        else:
            batch = data.collate(ds, np.where(valid, pos, 0))
        if not valid.all():
            v = torch.from_numpy(valid)
            if data.head == "lm":
                batch["labels"][~v] = IGNORE
            else:
                batch["valid"] = v
        yield {k: t.to(device) for k, t in batch.items()}


from engine.data import tasks as builtin_tasks  # noqa: E402  (engine/data/tasks.py never imports this module)

for _name, (_generator, _gen_kwargs, _splits) in builtin_tasks.TASKS.items():
    register_builtin(_name, _generator, _gen_kwargs, _splits)
