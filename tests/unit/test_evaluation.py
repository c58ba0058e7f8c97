"""Streaming classification metrics, sliding-window perplexity, reports, and the best/early-stopping tracker."""

import math

import numpy as np
import pytest
import torch

from engine import dist, evaluation, metrics, model as model_lib
from engine.data import sources as data
from engine.config import EvalConfig, ModelConfig, PerfConfig


def reference_scores(y_true: list[int], y_pred: list[int], k: int) -> dict:
    """scikit-learn's definitions, computed directly from the label lists: per-class precision, recall, F1,
    support; macro averages over the labels that occur in y_true or y_pred; weighted F1 by support;
    micro-F1; balanced accuracy (mean recall over labels in y_true)."""
    labels = sorted(set(y_true) | set(y_pred))
    per = {}
    for c in range(k):
        tp = sum(1 for t, p in zip(y_true, y_pred) if t == c and p == c)
        pred = sum(1 for p in y_pred if p == c)
        sup = sum(1 for t in y_true if t == c)
        prec = tp / pred if pred else 0.0
        rec = tp / sup if sup else 0.0
        f1 = 2 * prec * rec / (prec + rec) if prec + rec else 0.0
        per[c] = (prec, rec, f1, sup)
    n = len(y_true)
    correct = sum(t == p for t, p in zip(y_true, y_pred))
    return {
        "accuracy": correct / n,
        "macro_f1": sum(per[c][2] for c in labels) / len(labels),
        "macro_precision": sum(per[c][0] for c in labels) / len(labels),
        "micro_f1": correct / n,  # micro precision = micro recall = accuracy for single-label data
        "weighted_f1": sum(per[c][2] * per[c][3] for c in range(k)) / n,
        "balanced_accuracy": sum(per[c][1] for c in set(y_true)) / len(set(y_true)),
        "per": per,
    }


def _predictions(seed=0, n=203, k=6):
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, k - 2, (n,), generator=g)  # class k-2 never true, class k-1 neither true nor predicted
    logits = torch.randn(n, k, generator=g)
    logits[:, k - 1] -= 100.0
    logits[torch.arange(n), labels] += 1.2  # better than chance, far from perfect
    logits[::17, k - 2] += 50.0  # some predictions of a class that never occurs
    return logits, labels


def _check(report: evaluation.EvalReport, logits, labels):
    ref = reference_scores(labels.tolist(), logits.argmax(-1).tolist(), logits.shape[1])
    s = report.scalars
    assert s["eval_accuracy"] == pytest.approx(ref["accuracy"], abs=1e-12)
    assert s["eval_macro_f1"] == pytest.approx(ref["macro_f1"], abs=1e-12)
    assert s["eval_micro_f1"] == pytest.approx(ref["micro_f1"], abs=1e-12)
    assert s["eval_weighted_f1"] == pytest.approx(ref["weighted_f1"], abs=1e-12)
    assert s["eval_balanced_accuracy"] == pytest.approx(ref["balanced_accuracy"], abs=1e-12)
    assert s["eval_loss"] == pytest.approx(torch.nn.functional.cross_entropy(logits, labels).item(), rel=1e-6)
    for c, (prec, rec, f1, sup) in ref["per"].items():
        assert report.per_class["precision"][c] == pytest.approx(prec, abs=1e-12)
        assert report.per_class["recall"][c] == pytest.approx(rec, abs=1e-12)
        assert report.per_class["f1"][c] == pytest.approx(f1, abs=1e-12)
        assert report.per_class["support"][c] == sup
    assert metrics.cls_scores(torch.tensor(report.confusion))["macro_precision"] == pytest.approx(ref["macro_precision"])


def test_streaming_metrics_equal_direct_computation():
    logits, labels = _predictions()
    stream = evaluation.ClsStream(6, torch.device("cpu"))
    for start in range(0, len(labels), 16):  # batch by batch; the last one padded with masked rows
        lg, lb = logits[start:start + 16], labels[start:start + 16]
        valid = torch.ones(16, dtype=torch.bool)
        valid[len(lb):] = False
        pad = 16 - len(lb)
        stream.update(torch.cat([lg, lg[:1].repeat(pad, 1)]), torch.cat([lb, lb[:1].repeat(pad)]), valid)
    report = evaluation.cls_report(stream.reduce(), [f"c{i}" for i in range(6)])
    _check(report, logits, labels)
    assert report.per_class["predicted"][4] > 0 and report.per_class["support"][4] == 0
    assert sum(map(sum, report.confusion)) == len(labels) == report.scalars["eval_samples"]


def test_streaming_metrics_reduced_over_two_ranks():
    """Two gloo ranks each stream half of the predictions (uneven halves); the all-reduced report equals the
    direct computation over all of them."""
    import torch.multiprocessing as mp

    logits, labels = _predictions(seed=3)
    port = _free_port()
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    procs = [ctx.Process(target=_rank_worker, args=(r, 2, port, logits, labels, queue)) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    results = [queue.get() for _ in procs]
    assert all(p.exitcode == 0 for p in procs), results
    for report in results:
        _check(report, logits, labels)


def _free_port():
    from tests.conftest import free_port

    return free_port()


def _rank_worker(rank, world, port, logits, labels, queue):
    import torch.distributed as td

    td.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        cut = 77  # rank 0 gets 77 samples, rank 1 the rest
        mine = slice(0, cut) if rank == 0 else slice(cut, None)
        stream = evaluation.ClsStream(logits.shape[1], torch.device("cpu"))
        stream.update(logits[mine], labels[mine])
        queue.put(evaluation.cls_report(stream.reduce(), []))
    finally:
        td.destroy_process_group()


def test_sliding_windows_score_every_token_once_with_enough_context():
    ids = list(range(100, 150))  # 50 tokens: targets are positions 1..49
    for seq_len, stride in ((16, 16), (16, 4), (16, 1), (64, 8)):
        scored = []
        for row, skip in evaluation.sliding_windows(ids, seq_len, stride):
            start = ids.index(row[0])
            assert len(row) <= seq_len + 1
            for j in range(skip + 1, len(row)):  # target row[j], predicted from row[:j]
                scored.append(start + j)
                assert j >= min(start + j, seq_len - stride)  # context: all of it, or at least seq_len - stride
        assert sorted(scored) == list(range(1, 50)) == scored  # each once, in order
    assert evaluation.sliding_windows(ids[:1], 16, 4) == []
    assert evaluation.sliding_windows(ids[:10], 16, 4) == [(ids[:10], 0)]  # fits: one window, no overlap


@pytest.fixture(scope="module")
def tiny_lm():
    """A small LM shared by the tests below. They wrap it with perf.pad_vocab_to=1: TrainModule pads the
    vocabulary of the model it is given in place, and one test saves this model as it is."""
    import pydoc_data.topics

    texts = list(pydoc_data.topics.topics.values())
    tok = data.train_bpe(texts[:40], 400)
    cfg = ModelConfig(name="gpt2-tiny")
    torch.manual_seed(0)
    hf = model_lib.build(cfg, model_lib.resolve(cfg), tok).eval()
    return hf, tok, texts


def _prepared(tok, docs, seq_len):
    import datasets

    raw = datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": docs}),
                                "validation": datasets.Dataset.from_dict({"text": docs})})
    return raw, data.prepare(raw, tok, _dcfg(seq_len), "lm")


def _dcfg(seq_len):
    from engine.config import DataConfig

    return DataConfig(seq_len=seq_len, pack=False)


def _direct_loss(hf, tok, docs):
    """Mean next-token loss over whole documents, one plain forward each (labels=input_ids)."""
    total, count = 0.0, 0
    for d in docs:
        ids = torch.tensor([tok(d, add_special_tokens=False)["input_ids"]])
        with torch.no_grad():
            loss = hf(input_ids=ids, labels=ids).loss.item()
        total, count = total + loss * (ids.shape[1] - 1), count + ids.shape[1] - 1
    return total / count


def test_sliding_window_perplexity_equals_direct_when_the_window_covers_the_text(tiny_lm):
    hf, tok, texts = tiny_lm
    docs = [t[:200] for t in texts[50:60]]
    longest = max(len(tok(d, add_special_tokens=False)["input_ids"]) for d in docs)
    seq_len = longest + 3
    raw, prep = _prepared(tok, docs, seq_len)
    windows = evaluation.window_dataset(raw["validation"], tok, "text", seq_len, stride=8)
    assert len(windows) == len(docs)  # each document fits one window
    env = dist.DistEnv()
    out = evaluation.evaluate(model_lib.TrainModule(hf, "lm", perf=PerfConfig(pad_vocab_to=1)), prep, env, micro_batch=3, windows=windows)
    direct = _direct_loss(hf, tok, docs)
    assert out["eval_sliding_loss"] == pytest.approx(direct, rel=1e-5)
    assert out["eval_sliding_ppl"] == pytest.approx(math.exp(direct), rel=1e-5)


def test_sliding_windows_on_long_documents(tiny_lm):
    """Long documents: every token is still scored once (the token count is the direct one); with
    stride == window the windows are independent chunks, each equal to its direct computation."""
    hf, tok, texts = tiny_lm
    docs = [texts[70][:1500], texts[71][:900]]
    n_targets = sum(len(tok(d, add_special_tokens=False)["input_ids"]) - 1 for d in docs)
    seq_len = 24
    raw, prep = _prepared(tok, docs, seq_len)
    env = dist.DistEnv()
    module = model_lib.TrainModule(hf, "lm", perf=PerfConfig(pad_vocab_to=1))
    chunked = evaluation.window_dataset(raw["validation"], tok, "text", seq_len, stride=seq_len)
    strided = evaluation.window_dataset(raw["validation"], tok, "text", seq_len, stride=6)
    for ds in (chunked, strided):
        batches = data.eval_batches(prep, 1, 0, 4, torch.device("cpu"), dataset=ds)
        assert sum(int((b["labels"] != -100).sum()) for b in batches) == n_targets
    by_chunks = []
    for d in docs:
        ids = tok(d, add_special_tokens=False)["input_ids"]
        for a in range(0, len(ids) - 1, seq_len):
            chunk = torch.tensor([ids[a:a + seq_len + 1]])
            with torch.no_grad():
                by_chunks.append(hf(input_ids=chunk, labels=chunk).loss.item() * (chunk.shape[1] - 1))
    out = evaluation.evaluate(module, prep, env, micro_batch=4, windows=chunked)
    assert out["eval_sliding_loss"] == pytest.approx(sum(by_chunks) / n_targets, rel=1e-5)
    strided_out = evaluation.evaluate(module, prep, env, micro_batch=4, windows=strided)
    assert strided_out["eval_sliding_loss"] != pytest.approx(out["eval_sliding_loss"], rel=1e-4)


def test_report_renderings():
    logits, labels = _predictions(seed=1, n=60, k=4)
    stream = evaluation.ClsStream(4, torch.device("cpu"))
    stream.update(logits, labels)
    report = evaluation.cls_report(stream, ["alpha", "beta", "gamma", "delta"])
    text = evaluation.render_text(report, {"model": "m"})
    assert "model: m" in text and "eval_macro_f1:" in text
    assert "precision  recall      f1  support" in text and "confusion matrix" in text
    row = next(line for line in text.splitlines() if line.startswith("beta ") and " 1 " in line)
    assert [int(x) for x in row.split()[2:]] == report.confusion[1]
    img = evaluation.confusion_image(report.confusion)
    assert img.dtype == np.uint8 and img.shape[0] == img.shape[1] and img.shape[2] == 3
    cell = img.shape[0] // 4
    # the darkest cell of each row is where that row's largest count is (rows scaled by support)
    for i, counts in enumerate(report.confusion):
        shades = [img[i * cell + cell // 2, j * cell + cell // 2].sum() for j in range(4)]
        if sum(counts):
            assert int(np.argmin(shades)) == int(np.argmax(counts))
    md = evaluation.markdown_table(report)
    assert md.count("\n") == 1 + 4 and "| gamma |" in md


def test_best_tracker_patience_and_modes():
    t = evaluation.BestTracker(EvalConfig(metric="loss", patience=2, min_delta=0.01))
    seq = [(0, 3.0), (1, 2.5), (2, 2.495), (3, 2.6), (4, 2.4), (5, 2.41), (6, 2.5)]
    improved = [t.update(step, {"eval_loss": v}) for step, v in seq]
    assert improved == [True, True, False, False, True, False, False]
    assert t.best == 2.4 and t.best_step == 4 and t.should_stop
    m = evaluation.BestTracker(EvalConfig(metric="eval_macro_f1"))
    assert [m.update(s, {"eval_macro_f1": v}) for s, v in enumerate([0.1, 0.3, 0.2, 0.31])] == [True, True, False, True]
    assert not m.should_stop  # patience 0: never
    restored = evaluation.BestTracker(EvalConfig(metric="loss", patience=2, min_delta=0.01))
    restored.load_state(t.state())
    assert restored.state() == t.state()
    assert not evaluation.BestTracker(EvalConfig()).update(0, {"eval_loss": 1.0})


def test_ftl_eval_of_a_language_model_with_stride(tiny_lm, tmp_path):
    import json as _json

    from engine.commands import models as tools

    hf, tok, texts = tiny_lm
    hf.save_pretrained(tmp_path / "lm")
    tok.save_pretrained(tmp_path / "lm")
    docs = [t[:150] for t in texts[60:66]]
    (tmp_path / "docs.jsonl").write_text("".join(_json.dumps({"text": d}) + "\n" for d in docs))
    seq_len = max(len(tok(d, add_special_tokens=False)["input_ids"]) for d in docs) + 1
    out = tools.evaluate_model(tmp_path / "lm", str(tmp_path / "docs.jsonl"), "train", seq_len, 4, None, None, 0,
                               stride=4)
    from engine.config import DataConfig

    train_docs = list(data.load_raw(DataConfig(source=str(tmp_path / "docs.jsonl")), seed=1234)["train"]["text"])
    assert 0 < len(train_docs) < len(docs)  # `--split train` is the source minus its held-out part
    assert out["stride"] == 4 and out["eval_sliding_loss"] == pytest.approx(_direct_loss(hf, tok, train_docs), rel=1e-5)
