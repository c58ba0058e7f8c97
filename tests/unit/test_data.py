"""Packing, collation, and sampling addressed by global sample index."""

import numpy as np
import pytest
import torch

from engine.data import sources as data
from engine.config import DataConfig
from engine.errors import UsageError
from engine.losses import IGNORE


class WordTok:
    """A stand-in with the tokenizer interface packing uses: one id per word."""

    eos_token_id = 0
    pad_token_id = 0

    def __call__(self, texts, add_special_tokens=False, **kw):
        return {"input_ids": [[int(w) for w in t.split()] for t in texts]}


def test_packing_joins_documents_with_eos_and_cuts_full_blocks():
    fn = data._tokenize_lm(WordTok(), "text", seq_len=3, pack=True)
    out = fn({"text": ["1 2 3", "4 5", "6 7 8 9 10"]})
    # stream: 1 2 3 E 4 5 E 6 7 8 9 10 E  -> blocks of seq_len+1 = 4, remainder dropped
    assert np.asarray(out["input_ids"]).tolist() == [[1, 2, 3, 0], [4, 5, 0, 6], [7, 8, 9, 10]]  # a numpy block array


def test_unpacked_samples_are_truncated_documents():
    fn = data._tokenize_lm(WordTok(), "text", seq_len=3, pack=False)
    assert fn({"text": ["1 2 3 4 5 6", "7", "8 9"]})["input_ids"] == [[1, 2, 3, 4], [8, 9]]


def test_collate_shifts_targets_and_masks_padding():
    b = data.collate([np.array([1, 2, 3, 4]), np.array([5, 6])], "lm", pad_id=0)
    assert b["input_ids"].tolist() == [[1, 2, 3], [5, 6, 0]]  # a last token is input to nothing
    assert b["labels"].tolist() == [[2, 3, 4], [6, IGNORE, IGNORE]]
    assert b["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    full = data.collate([np.array([1, 2, 3]), np.array([4, 5, 6])], "lm", pad_id=0)
    assert "attention_mask" not in full  # packed blocks need no mask
    c = data.collate([np.array([7, 8, 9]), np.array([1])], "cls", pad_id=0, labels=[2, 0])
    assert c["labels"].tolist() == [2, 0] and c["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]


def test_sampler_is_a_seeded_endless_stream():
    s = data.GlobalSampler(10, seed=3)
    first = s.indices(0, 25)
    assert sorted(first[:10]) == list(range(10)) and sorted(first[10:20]) == list(range(10))
    assert not np.array_equal(first[:10], first[10:20])  # each epoch its own order
    # addressed by index: any window equals the same slice of the stream, from a fresh sampler too
    assert np.array_equal(data.GlobalSampler(10, seed=3).indices(7, 11), first[7:18])
    assert not np.array_equal(data.GlobalSampler(10, seed=4).indices(0, 10), first[:10])


@pytest.mark.parametrize("world, micro, accum", [(1, 8, 1), (1, 4, 2), (2, 2, 2), (4, 1, 2), (2, 4, 1)])
def test_every_split_of_a_global_batch_covers_the_same_samples(world, micro, accum):
    positions = []
    for rank in range(world):
        lay = data.Layout(world, rank, micro, accum)
        assert lay.global_batch == 8
        for m in range(accum):
            sl = lay.positions(m)
            positions += list(range(sl.start, sl.stop))
    assert sorted(positions) == list(range(8))


def test_split_and_column_errors(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text('{"body": "hello there", "y": 1}\n{"body": "general kenobi", "y": 0}\n')
    with pytest.raises(UsageError) as e:
        data.load_raw(DataConfig(source=str(f)), seed=0, need_label=True)
    msg = str(e.value)
    assert "data.text_column 'text' is not in the data; columns: body, y" in msg
    assert "data.label_column 'label' is not in the data" in msg
    with pytest.raises(UsageError, match="no such file"):
        data.load_raw(DataConfig(source=str(tmp_path / "missing.jsonl")), seed=0)
    with pytest.raises(UsageError, match="glob matched nothing"):
        data.load_raw(DataConfig(source=str(tmp_path / "*.parquet")), seed=0)
    with pytest.raises(UsageError, match="unknown builtin"):
        data.load_raw(DataConfig(source="builtin:nope"), seed=0)
    empty = tmp_path / "empty.csv"
    empty.write_text("text\n")
    with pytest.raises(UsageError, match="training split is empty"):
        data.load_raw(DataConfig(source=str(empty)), seed=0)


def test_local_formats_load(tmp_path):
    import pandas as pd

    rows = [{"text": f"document number {i} " * (i + 1), "label": ["a", "b"][i % 2]} for i in range(20)]
    pd.DataFrame(rows).to_csv(tmp_path / "d.csv", index=False)
    pd.DataFrame(rows).to_parquet(tmp_path / "d.parquet")
    (tmp_path / "d.txt").write_text("\n\n".join(r["text"] for r in rows))
    for name in ("d.csv", "d.parquet", "d.txt", "d.*"):
        if name == "d.*":
            with pytest.raises(UsageError, match="must all be one of"):
                data.load_raw(DataConfig(source=str(tmp_path / name)), seed=0)
            continue
        dd = data.load_raw(DataConfig(source=str(tmp_path / name), val_fraction=0.25), seed=0)
        assert len(dd["train"]) == 15 and len(dd["validation"]) == 5


def test_labels_outside_num_labels_are_named(tmp_path):
    import datasets

    ds = datasets.Dataset.from_dict({"text": ["a", "b", "c"], "label": [0, 1, 5]})
    names, _, problems = data.label_vocab(ds, "label", num_labels=3)
    assert problems and "labels [5] in column 'label' are outside 0..2" in problems[0]
    names, mapping, problems = data.label_vocab(datasets.Dataset.from_dict({"text": ["a", "b"], "label": ["neg", "pos"]}),
                                                "label", 0)
    assert names == ["neg", "pos"] and mapping == {"neg": 0, "pos": 1} and not problems


def test_eval_batches_are_equal_in_number_on_every_rank():
    import datasets

    ds = datasets.Dataset.from_dict({"input_ids": [[i, i + 1, i + 2] for i in range(7)]}).with_format("numpy")
    prep = data.Prepared(ds, ds, WordTok(), "lm", 2)
    counts, targets = [], 0
    for rank in range(2):
        bs = list(data.eval_batches(prep, 2, rank, 2, torch.device("cpu")))
        counts.append(len(bs))
        targets += sum(int((b["labels"] != IGNORE).sum()) for b in bs)
    assert counts == [2, 2]          # 7 samples, 2 ranks x 2 per batch -> 2 rounds each
    assert targets == 7 * 2          # padding positions carry no targets
