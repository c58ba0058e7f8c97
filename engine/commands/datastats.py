"""`ftl data stats`: what the tokenizer makes of a run's data, before any training.

Reports, for one split: documents, UTF-8 bytes and tokens (tokens per byte: how well the tokenizer fits the
text; a poorly fitting one spends many tokens per word), document lengths against data.seq_len (how much
truncation or padding to expect), how much of the vocabulary the data uses, the rarest tokens it does use
(candidates for data.add_tokens when they are pieces of a domain word), how the added tokens fire, and the
label distribution with its imbalance and the majority-class baseline (head=cls).

The tokenizer is the one `ftl train` would use: data.tokenizer, else the model's own, else a byte-level BPE
trained on the training split exactly as training would train it; data.add_tokens are added to it.
"""

from __future__ import annotations

from collections import Counter

import numpy as np

from engine import model as model_lib, transfer
from engine.data import sources as data
from engine.config import Config


def tokenizer_for(cfg: Config, raw) -> tuple[object, str]:
    """(tokenizer, where it came from), chosen as Trainer._tokenizer chooses."""
    if cfg.data.tokenizer:
        tok, origin = data.load_tokenizer(cfg.data.tokenizer), f"data.tokenizer {cfg.data.tokenizer}"
    else:
        source = model_lib.resolve(cfg.model)
        if source.has_tokenizer:
            tok, origin = data.load_tokenizer(str(source.local_dir or source.name)), f"the model's ({cfg.model.name})"
        else:
            tok = data.train_bpe(data.text_iterator(raw["train"], cfg.data.text_column), cfg.data.tokenizer_vocab)
            origin = f"byte-level BPE of {cfg.data.tokenizer_vocab} trained on the training split (as `ftl train` would)"
    added = transfer.add_tokens(tok, cfg.data.add_tokens)
    if cfg.data.add_tokens:
        origin += f"; {added} of data.add_tokens new"
    return tok, origin


def stats(cfg: Config, split: str = "train", top: int = 20) -> dict:
    raw = data.load_raw(cfg.data, cfg.run.seed, need_label=cfg.model.head == "cls")
    tok, origin = tokenizer_for(cfg, raw)
    ds = raw[split]
    vocab = len(tok)
    counts = np.zeros(vocab, dtype=np.int64)
    lengths, n_bytes = [], 0
    for texts in data.text_iterator(ds, cfg.data.text_column):
        n_bytes += sum(len(t.encode("utf-8")) for t in texts)
        for ids in tok(texts, add_special_tokens=False)["input_ids"]:
            lengths.append(len(ids))
            if ids:
                counts += np.bincount(np.asarray(ids), minlength=vocab)[:vocab]
    lengths_a = np.asarray(lengths or [0])
    n_tokens = int(counts.sum())
    used = np.flatnonzero(counts)
    rare = used[np.argsort(counts[used], kind="stable")][:top]
    out = {
        "source": cfg.data.source, "split": split, "tokenizer": origin, "documents": len(ds), "bytes": n_bytes,
        "tokens": n_tokens, "tokens_per_byte": n_tokens / max(n_bytes, 1),
        "doc_tokens": {q: int(np.percentile(lengths_a, p)) for q, p in (("min", 0), ("median", 50), ("p90", 90),
                                                                      ("p99", 99), ("max", 100))},
        "seq_len": cfg.data.seq_len, "docs_longer_than_seq_len": float((lengths_a > cfg.data.seq_len).mean()),
        "vocab_size": vocab, "vocab_used": int(len(used)), "tokens_seen_once": int((counts == 1).sum()),
        "rarest_tokens": [{"id": int(i), "token": tok.convert_ids_to_tokens(int(i)), "text": tok.decode([int(i)]),
                           "count": int(counts[i])} for i in rare],
    }
    if cfg.data.add_tokens:
        out["added_tokens"] = {t: int(counts[tok.convert_tokens_to_ids(t)]) for t in cfg.data.add_tokens}
    if cfg.model.head == "cls":
        out["labels"] = label_distribution(ds[cfg.data.label_column])
    return out


def label_distribution(values) -> dict:
    """Counts per label (most common first), imbalance ratio and the majority-class baseline's accuracy and
    macro-F1 (always predicting the most common label; F1 averaged over the labels present)."""
    counts = Counter(str(v) for v in values)
    total = sum(counts.values())
    ranked = counts.most_common()
    p = ranked[0][1] / total if total else 0.0
    return {
        "classes": len(counts),
        "counts": dict(ranked),
        "imbalance_ratio": ranked[0][1] / ranked[-1][1] if ranked else 0.0,
        "majority_label": ranked[0][0] if ranked else None,
        "majority_accuracy": p,
        "majority_macro_f1": (2 * p / (1 + p)) / len(counts) if counts else 0.0,
    }


def render(s: dict) -> str:
    lines = [
        f"source: {s['source']} ({s['split']} split)",
        f"tokenizer: {s['tokenizer']}",
        f"documents: {s['documents']:,}   bytes: {s['bytes']:,}   tokens: {s['tokens']:,}",
        f"tokens per byte: {s['tokens_per_byte']:.3f}   ({1 / max(s['tokens_per_byte'], 1e-12):.2f} bytes per token)",
        "tokens per document: " + ", ".join(f"{k} {v}" for k, v in s["doc_tokens"].items())
        + f"   ({100 * s['docs_longer_than_seq_len']:.1f}% longer than data.seq_len={s['seq_len']})",
        f"vocabulary: {s['vocab_used']:,} of {s['vocab_size']:,} tokens used; {s['tokens_seen_once']:,} seen exactly once",
        "",
        f"rarest tokens used ({len(s['rarest_tokens'])}):",
        "       id  count  text (byte-level symbol where the text is a partial UTF-8 character)",
    ]
    for r in s["rarest_tokens"]:
        shown = repr(r["text"]) if "\ufffd" not in r["text"] else f"<{r['token']}>"
        lines.append(f"  {r['id']:7d}  {r['count']:5d}  {shown}")
    if "added_tokens" in s:
        lines += ["", "added tokens (data.add_tokens): " + ", ".join(f"{t!r} x{n}" for t, n in s["added_tokens"].items())]
    if "labels" in s:
        lab = s["labels"]
        total = sum(lab["counts"].values())
        w = max([5, *(len(k) for k in lab["counts"])])
        lines += ["", f"labels: {lab['classes']} classes, imbalance {lab['imbalance_ratio']:.1f}:1 (most / least common)",
                  f"  {'label':<{w}}  count      %"]
        for k, v in lab["counts"].items():
            lines.append(f"  {k:<{w}}  {v:5d}  {100 * v / total:5.1f}")
        lines.append(f"majority-class baseline (always {lab['majority_label']!r}): accuracy "
                     f"{lab['majority_accuracy']:.4f}, macro-F1 {lab['majority_macro_f1']:.4f}")
    return "\n".join(lines)
