"""Long inputs end to end: training beyond 1,024 positions (reloaded by plain transformers), strided
windows for LM and classification (documents pooled at eval), and the activation-memory bound."""

import importlib.util
import json
import random

import pytest
import torch

from engine import dist
from engine.data import sources as data
from engine.trainer import Trainer
from tests.conftest import ROOT, read_metrics, tiny_config


def _train(cfg):
    trainer = Trainer(cfg, progress=False)
    try:
        return trainer, trainer.train()
    finally:
        trainer.close()
        dist.shutdown()


def test_training_beyond_1024_positions_exports_a_plain_transformers_model(tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM

    run = tmp_path / "long"
    cfg = tiny_config(run, **{"model.max_positions": 1160, "data.seq_len": 1100, "train.micro_batch": 1,
                              "train.max_steps": 2, "train.eval_batches": 1, "model.gradient_checkpointing": True,
                              "train.sample_tokens": 0})
    _, summary = _train(cfg)  # the trainer itself checks final/ against its logits on a 1,100-token batch
    assert AutoConfig.from_pretrained(run / "final").n_positions == 1160
    hf = AutoModelForCausalLM.from_pretrained(run / "final").eval()
    assert hf.transformer.wpe.weight.shape == (1160, 64)
    ids = torch.randint(0, hf.config.vocab_size, (1, 1150))
    with torch.no_grad():
        out = hf(input_ids=ids).logits
    assert out.shape[1] == 1150 and torch.isfinite(out).all()
    losses = [r["loss"] for r in read_metrics(run) if "loss" in r]
    assert len(losses) == 2 and all(l == l for l in losses)

    # fine-tuning that model further: its 1,160 positions are kept, and more can be added by copying
    tuned = tmp_path / "longer"
    cfg2 = tiny_config(tuned, **{"model.name": run / "final", "model.max_positions": 1200, "data.seq_len": 1180,
                                 "train.micro_batch": 1, "train.max_steps": 1, "train.eval_batches": 1,
                                 "train.sample_tokens": 0, "model.position_init": "copy"})
    _train(cfg2)
    assert AutoConfig.from_pretrained(tuned / "final").n_positions == 1200


def _long_docs(path, n=120, seed=0, filler_words=(20, 28), signal_words=6):
    """Documents whose label is decided by words at their END, after 20-28 neutral words."""
    rng = random.Random(seed)
    filler = "alpha beta gamma delta epsilon zeta theta iota kappa lambda".split()
    good, bad = "bright calm happy kind warm".split(), "awful cold grim nasty sad".split()
    with open(path, "w") as f:
        for i in range(n):
            label = "pos" if i % 2 else "neg"
            words = (rng.choices(filler, k=rng.randint(*filler_words))
                     + rng.choices(good if label == "pos" else bad, k=signal_words))
            f.write(json.dumps({"text": " ".join(words), "label": label}) + "\n")
    return path


@pytest.fixture(scope="module")
def long_docs(tmp_path_factory):
    return _long_docs(tmp_path_factory.mktemp("docs") / "docs.jsonl")


def _cls_cfg(run, docs, **extra):
    return tiny_config(run, **{"model.head": "cls", "data.source": docs, "data.seq_len": 16, "data.val_fraction": 0.25,
                               "data.tokenizer_vocab": 300, "train.micro_batch": 8, "train.max_steps": 40,
                               "optim.lr": 3e-3, "train.eval_batches": 0, "train.log_every": 20, **extra})


def test_classification_windows_see_the_whole_document(long_docs, tmp_path):
    from engine.commands import models as tools

    # truncation keeps the first 16 tokens: only neutral words, so the label is a coin toss
    trunc, _ = _train(_cls_cfg(tmp_path / "trunc", long_docs))
    acc_trunc = [r for r in read_metrics(tmp_path / "trunc") if "eval_accuracy" in r][-1]["eval_accuracy"]
    # windows: every window trains with the document's label; eval pools a document's windows into one answer
    win_dir = tmp_path / "win"
    win, _ = _train(_cls_cfg(win_dir, long_docs, **{"data.overflow": "window", "data.stride": 8}))
    acc_win = [r for r in read_metrics(win_dir) if "eval_accuracy" in r][-1]["eval_accuracy"]
    assert acc_trunc <= 0.7 and acc_win >= 0.9, (acc_trunc, acc_win)

    # metrics count documents: 30 validation documents, far more training windows than documents
    assert len(win.data.validation) == len(trunc.data.validation) == 30
    assert len(win.data.train) > 4 * len(trunc.data.train)
    # `ftl eval` on the run uses its windows too, and reproduces the logged numbers
    res = tools.evaluate_model(win_dir, str(long_docs), "validation", None, 8, None, None, 0)
    assert res["samples"] == 30 and res["eval_accuracy"] == pytest.approx(acc_win)


def test_lm_windows_train_every_token_once(variable_length_corpus, tmp_path):
    cfg = tiny_config(tmp_path / "lmwin", **{"data.source": variable_length_corpus, "data.pack": False,
                                            "data.overflow": "window", "data.seq_len": 16, "data.stride": 8,
                                            "train.max_steps": 3, "train.sample_tokens": 0})
    trainer, summary = _train(cfg)
    prepared = trainer.data
    assert "skip" in prepared.train.column_names
    targets = sum(len(r) - 1 - s for r, s in zip(prepared.train["input_ids"], prepared.train["skip"]))
    raw = data.load_raw(cfg.data, cfg.run.seed)
    ids = prepared.tokenizer([t for t in raw["train"]["text"]], add_special_tokens=False)["input_ids"]
    assert targets == sum(len(x) - 1 for x in ids if len(x) >= 2)
    assert summary["eval_loss"] > 0


def test_checkpointing_keeps_long_sequence_activations_within_the_benchmark_bound():
    spec = importlib.util.spec_from_file_location("long_context", ROOT / "benchmarks" / "long_context.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    rows = {}
    for ckpt in (False, True):
        module = bench.train_module("gpt2-tiny", 2048, ckpt, "cpu", vocab=512)
        ids = torch.randint(0, 512, (1, 2049))
        rows[ckpt] = bench.saved_activation_bytes(module, {"input_ids": ids[:, :-1], "labels": ids[:, 1:]})
    bound = bench.checkpointed_bound(module, 2048)
    assert rows[True] <= bound < rows[False], (rows, bound)


def test_long_context_benchmark_runs_on_meta_for_real_gpt2_shapes(tmp_path):
    """The benchmark itself (sizes of the real gpt2 on the meta device, seconds): it stays runnable, and
    the checkpointed row keeps under the bound it prints while the uncheckpointed one does not."""
    spec = importlib.util.spec_from_file_location("long_context", ROOT / "benchmarks" / "long_context.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "rows.json"
    bench.main(["--model", "gpt2", "--seq", "2048", "--json", str(out)])
    off, on = json.loads(out.read_text())
    assert (off["checkpointing"], on["checkpointing"]) == (False, True)
    assert on["saved_MiB"] <= on["bound_MiB"] < off["saved_MiB"], (off, on)
