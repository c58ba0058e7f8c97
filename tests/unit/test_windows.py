"""Long inputs: window/stride arithmetic, the samples built from it, and pooling windows per document."""

import math

import numpy as np
import pytest
import torch

from engine.data import sources as data, windows
from engine.config import DataConfig, load_config
from engine.errors import UsageError
from engine.losses import IGNORE


class WordTok:
    """One id per word, honouring truncation like a real tokenizer."""

    eos_token_id = pad_token_id = 0

    def __call__(self, texts, add_special_tokens=False, truncation=False, max_length=None, **kw):
        ids = [[int(w) for w in t.split()] for t in texts]
        return {"input_ids": [x[:max_length] if truncation and max_length else x for x in ids]}


@pytest.mark.parametrize("n,seq,stride,expected", [
    (0, 4, 2, 0), (1, 4, 2, 1), (4, 4, 2, 1), (5, 4, 2, 2), (6, 4, 2, 2), (7, 4, 2, 3), (10, 4, 4, 3), (10, 4, 1, 7),
])
def test_num_windows(n, seq, stride, expected):
    assert windows.num_windows(n, seq, stride) == expected
    if n > seq:  # the formula: enough strides for the last window to reach the end
        assert expected == 1 + math.ceil((n - seq) / stride)


def test_lm_windows_predict_every_token_once_with_overlap_as_context():
    ids = list(range(100, 111))  # 11 tokens -> 10 targets
    rows = windows.lm_windows(ids, seq_len=4, stride=2)
    assert rows == [([100, 101, 102, 103, 104], 0),   # targets 101..104
                    ([102, 103, 104, 105, 106], 2),   # 103, 104 already targets: skipped
                    ([104, 105, 106, 107, 108], 2),
                    ([106, 107, 108, 109, 110], 2)]
    targets = [t for row, skip in rows for t in row[1 + skip:]]
    assert targets == ids[1:]  # each token after the first exactly once, in order
    # no overlap: stride == seq_len gives plain consecutive blocks sharing one boundary token
    plain = windows.lm_windows(ids, seq_len=5, stride=5)
    assert [r for r, _ in plain] == [ids[0:6], ids[5:11]] and [s for _, s in plain] == [0, 0]
    assert windows.lm_windows(ids, 4, 2, max_windows=2) == rows[:2]
    assert windows.lm_windows([7], 4, 2) == []


@pytest.mark.parametrize("n,seq,stride", [(3, 8, 4), (8, 8, 4), (9, 8, 4), (20, 8, 3), (33, 8, 8), (50, 16, 5)])
def test_lm_windows_cover_any_length(n, seq, stride):
    ids = list(range(n))
    rows = windows.lm_windows(ids, seq, stride)
    assert [t for r, s in rows for t in r[1 + s:]] == ids[1:]
    assert all(len(r) <= seq + 1 for r, _ in rows)
    # after the first window, the overlap is context only: its first new target sees seq - stride + 1 tokens
    assert all(s == seq - stride for _, s in rows[1:])


def test_cls_windows_overlap_and_align_the_last_window_to_the_end():
    ids = list(range(10))
    assert windows.cls_windows(ids, 4, 3) == [[0, 1, 2, 3], [3, 4, 5, 6], [6, 7, 8, 9]]
    assert windows.cls_windows(ids, 4, 4) == [[0, 1, 2, 3], [4, 5, 6, 7], [6, 7, 8, 9]]  # last: full, at the end
    assert windows.cls_windows(ids[:3], 4, 2) == [[0, 1, 2]]
    assert windows.cls_windows(ids, 4, 2, max_windows=2) == [[0, 1, 2, 3], [2, 3, 4, 5]]  # capped: a prefix


def test_window_samples_from_the_data_pipeline():
    tok = WordTok()
    spec = windows.WindowSpec(seq_len=3, stride=2)
    lm = data._tokenize_lm(tok, "text", 3, pack=False, window=spec)({"text": ["1 2 3 4 5 6", "7", "8 9"]})
    assert lm == {"input_ids": [[1, 2, 3, 4], [3, 4, 5, 6], [8, 9]], "skip": [0, 1, 0]}
    # truncation (the default) is unchanged
    assert data._tokenize_lm(tok, "text", 3, pack=False)({"text": ["1 2 3 4 5 6"]})["input_ids"] == [[1, 2, 3, 4]]
    batch = {"text": ["1 2 3 4 5 6 7", "8 9"], "label": ["a", "b"]}
    train = data._tokenize_cls(tok, "text", "label", 3, {"a": 0, "b": 1}, spec)(batch)
    assert train == {"input_ids": [[1, 2, 3], [3, 4, 5], [5, 6, 7], [8, 9]], "labels": [0, 0, 0, 1]}
    whole = data._tokenize_cls(tok, "text", "label", 3, {"a": 0, "b": 1}, spec, whole_documents=True)(batch)
    assert whole == {"input_ids": [[1, 2, 3, 4, 5, 6, 7], [8, 9]], "labels": [0, 1]}
    truncated = data._tokenize_cls(tok, "text", "label", 3, {"a": 0, "b": 1})(batch)
    assert truncated == {"input_ids": [[1, 2, 3], [8, 9]], "labels": [0, 1]}


def test_skipped_targets_are_masked_in_training_batches():
    import datasets

    ds = datasets.Dataset.from_dict({"input_ids": [[1, 2, 3, 4], [3, 4, 5, 6]], "skip": [0, 2]}).with_format("numpy")
    rows, _ = data._rows(ds, np.array([0, 1]))
    batch = data._mask_skipped(data.collate(rows, "lm", 0), ds, np.array([0, 1]))
    assert batch["labels"].tolist() == [[2, 3, 4], [IGNORE, IGNORE, 6]]


def test_pool_gives_one_prediction_per_document():
    logits = torch.tensor([[2.0, 0.0], [0.0, 2.0], [0.0, 0.0], [3.0, 1.0]])
    owner = torch.tensor([0, 0, 0, 1])
    p = windows.pool(logits, owner, 2, "mean").exp()
    probs = logits.softmax(-1)
    assert torch.allclose(p[0], probs[:3].mean(0)) and torch.allclose(p[1], probs[3])
    assert torch.allclose(p.sum(-1), torch.ones(2))
    m = windows.pool(logits, owner, 2, "max").exp()
    top = probs[:3].max(0).values
    assert torch.allclose(m[0], top / top.sum()) and torch.allclose(m.sum(-1), torch.ones(2))
    # log-probabilities behave as logits: cross-entropy of the pooled distribution
    lp = windows.pool(logits, owner, 2, "mean")
    ce = torch.nn.functional.cross_entropy(lp, torch.tensor([1, 0]), reduction="none")
    assert torch.allclose(ce, -torch.log(torch.stack([p[0, 1], p[1, 0]])))


def test_cls_eval_batch_maps_windows_to_documents():
    spec = windows.WindowSpec(seq_len=4, stride=2)
    b = windows.cls_eval_batch([np.arange(1, 9), np.array([5, 6])], [1, 0], spec, pad_id=0)
    assert b["window_doc"].tolist() == [0, 0, 0, 1]
    assert b["input_ids"].tolist() == [[1, 2, 3, 4], [3, 4, 5, 6], [5, 6, 7, 8], [5, 6, 0, 0]]
    assert b["attention_mask"].sum(1).tolist() == [4, 4, 4, 2] and b["labels"].tolist() == [1, 0]


def test_window_config_checks():
    with pytest.raises(UsageError) as e:
        load_config(None, ["data.overflow=window", "data.seq_len=64", "data.stride=65", "data.max_windows=-1",
                           "model.max_positions=32"])
    msg = str(e.value)
    for part in ("data.stride=65 exceeds data.seq_len=64", "data.max_windows must be >= 0",
                 "needs data.pack=false", "data.seq_len=64 exceeds model.max_positions=32"):
        assert part in msg, msg
    cfg = load_config(None, ["data.overflow=window", "data.pack=false"])
    assert windows.WindowSpec.from_config(cfg.data) == windows.WindowSpec(cfg.data.seq_len, cfg.data.seq_len)
    assert windows.WindowSpec.from_config(DataConfig()) is None
