"""Exports load with every transformers of the export range (engine/compat.py): the newest (this venv's 5.x)
in-process, the oldest (4.57, installed beside the venv by .ci/run) in a subprocess that sees only it.

What must hold in both: tokenizer_config.json names a class the version knows, the tokenizer gives the ids
the engine trained with (byte-level BPE, an added token, the EOS text), the model gives the engine's logits,
and pipeline("text-classification", truncation=True) reads a 1,400-token input (model_max_length is the
model's 1,024 positions, not 2**30)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from engine import compat, dist
from engine.data import sources as data
from engine.trainer import Trainer
from tests.conftest import OFFLINE, ROOT, tiny_config

TEXTS = ["The with statement is used to wrap the execution of a block", "def f(x):\n    return x  # ünïcode ✓",
         "  leading spaces and\ttabs", "a <|sep|> b", "end of text <|endoftext|> and more", "x"]


def _long_text(tok) -> str:
    import pydoc_data.topics

    text = " ".join(pydoc_data.topics.topics[k] for k in sorted(pydoc_data.topics.topics))
    return tok.decode(tok(text)["input_ids"][:1400])


@pytest.fixture(scope="module")
def cls_export(tmp_path_factory):
    """A 3-class classifier trained 2 steps (locally trained BPE plus an added token): its final/."""
    import pydoc_data.topics

    tmp = tmp_path_factory.mktemp("compat")
    topics = sorted(pydoc_data.topics.topics)
    with open(tmp / "cls.jsonl", "w") as f:
        for i, name in enumerate(topics):
            f.write(json.dumps({"text": pydoc_data.topics.topics[name][:400], "label": ["a", "b", "c"][i % 3]}) + "\n")
    run = tmp / "run"
    trainer = Trainer(tiny_config(run, **{"model.head": "cls", "data.source": str(tmp / "cls.jsonl"),
                                          "train.max_steps": 2, "train.eval_batches": 1, "data.add_tokens": "[<|sep|>]",
                                          "optim.warmup_steps": 1}), progress=False)
    try:
        trainer.train()
    finally:
        trainer.close()
        dist.shutdown()
    final = run / "final"
    engine_tok = data.load_tokenizer(str(run / "tokenizer"))  # the tokenizer as the run trained with it
    long_text = _long_text(engine_tok)
    expected = {"ids": [engine_tok(t, add_special_tokens=False)["input_ids"] for t in TEXTS],
                "long_tokens": len(engine_tok(long_text)["input_ids"]), "long_text": long_text,
                "labels": ["a", "b", "c"], "positions": 1024}
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(final).eval()
    with torch.no_grad():
        enc = engine_tok(TEXTS[:3], return_tensors="pt", padding=True)
        expected["logits"] = model(**enc).logits.tolist()
    assert expected["long_tokens"] >= 1400 > expected["positions"]
    return final, expected


CHECK = r'''
import json, sys
import torch, transformers
from transformers import AutoModelForSequenceClassification, AutoTokenizer, pipeline

final, expected = sys.argv[1], json.load(open(sys.argv[2]))
tok = AutoTokenizer.from_pretrained(final)
model = AutoModelForSequenceClassification.from_pretrained(final).eval()
with torch.no_grad():
    enc = tok(expected["texts"][:3], return_tensors="pt", padding=True)
    logits = model(**enc).logits.tolist()
clf = pipeline("text-classification", model=final)
print(json.dumps({
    "version": transformers.__version__, "file": transformers.__file__, "class": type(tok).__name__,
    "model_max_length": tok.model_max_length,
    "ids": [tok(t, add_special_tokens=False)["input_ids"] for t in expected["texts"]],
    "decoded": tok.decode(tok(expected["texts"][1])["input_ids"]),
    "logits": logits,
    "long": clf(expected["long_text"], truncation=True),
}))
'''


def _check(result: dict, expected: dict) -> None:
    assert result["model_max_length"] == expected["positions"]
    assert result["ids"] == expected["ids"]  # the very ids the model was trained on
    assert result["decoded"] == TEXTS[1]
    assert torch.allclose(torch.tensor(result["logits"]), torch.tensor(expected["logits"]), atol=1e-5)
    (pred,) = result["long"]
    assert pred["label"] in expected["labels"] and 0 < pred["score"] <= 1


def test_export_names_a_class_both_versions_know(cls_export):
    final, _ = cls_export
    cfg = json.loads((final / "tokenizer_config.json").read_text())
    assert cfg["tokenizer_class"] == "GPT2TokenizerFast" and cfg["model_max_length"] == 1024
    assert not {"is_local", "local_files_only"} & cfg.keys()


def test_export_loads_with_this_transformers(cls_export):
    """5.x (the venv), in this process."""
    import transformers

    final, expected = cls_export
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, pipeline

    tok = AutoTokenizer.from_pretrained(final)
    model = AutoModelForSequenceClassification.from_pretrained(final).eval()
    with torch.no_grad():
        logits = model(**tok(TEXTS[:3], return_tensors="pt", padding=True)).logits.tolist()
    clf = pipeline("text-classification", model=str(final))
    result = {"model_max_length": tok.model_max_length, "logits": logits,
              "ids": [tok(t, add_special_tokens=False)["input_ids"] for t in TEXTS],
              "decoded": tok.decode(tok(TEXTS[1])["input_ids"]), "long": clf(expected["long_text"], truncation=True)}
    assert int(transformers.__version__.split(".")[0]) >= 5
    _check(result, expected)


def _transformers4() -> Path:
    path = Path(os.environ.get(compat.TRANSFORMERS4_ENV) or ROOT / compat.TRANSFORMERS4_DIR)
    if not (path / "transformers").is_dir():
        how = f"pip install --no-deps --target {compat.TRANSFORMERS4_DIR} $(python engine/compat.py pins)"
        if os.environ.get(compat.TRANSFORMERS4_ENV):  # CI prepared it: its absence is a failure, not a skip
            pytest.fail(f"{compat.TRANSFORMERS4_ENV}={path} holds no transformers; {how}")
        pytest.skip(f"the oldest transformers of the export range is not installed beside the venv; {how}")
    return path


def test_export_loads_with_the_oldest_transformers(cls_export, tmp_path):
    """transformers 4.57 in a subprocess whose path puts it first (and never the engine)."""
    final, expected = cls_export
    site = _transformers4()
    (tmp_path / "expected.json").write_text(json.dumps({**expected, "texts": TEXTS}))
    env = {**os.environ, **OFFLINE, "PYTHONPATH": str(site)}
    proc = subprocess.run([sys.executable, "-c", CHECK, str(final), str(tmp_path / "expected.json")], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    oldest = compat.EXPORT_CHECK_OLDEST[0].split("==")[1]
    assert result["version"] == oldest and result["file"].startswith(str(site)), result["file"]
    assert result["class"] == "GPT2TokenizerFast"
    _check(result, expected)


def test_tokenizers_that_are_not_gpt2_bpe_keep_a_generic_class(tmp_path):
    """A tokenizer.json of another kind (here a word-level BPE) is written as PreTrainedTokenizerFast, which
    both versions load, never as transformers 5's TokenizersBackend."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    bpe = Tokenizer(models.BPE(unk_token="[UNK]"))
    bpe.pre_tokenizer = pre_tokenizers.Whitespace()
    bpe.train_from_iterator(["a class definition", "the with statement"] * 10,
                            trainers.BpeTrainer(vocab_size=60, special_tokens=["[UNK]", "[PAD]"]))
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, unk_token="[UNK]", pad_token="[PAD]")
    assert not compat.is_gpt2_bpe(tok)
    compat.save_tokenizer(tok, tmp_path, 64)
    cfg = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert cfg["tokenizer_class"] == "PreTrainedTokenizerFast" and cfg["model_max_length"] == 64
