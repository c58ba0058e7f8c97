"""The cls head end to end, and fine-tuning from a saved model directory (real from_pretrained path)."""

import json

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import check, read_metrics, run_ftl, tiny_overrides


@pytest.fixture(scope="module")
def sentiment(tmp_path_factory):
    """A small two-class task the tiny model can learn: which of two word lists a text is drawn from."""
    import random

    rng = random.Random(0)
    good = "bright calm clean fresh gentle happy kind lovely nice warm".split()
    bad = "awful broken cold dirty grim harsh nasty rotten sad ugly".split()
    path = tmp_path_factory.mktemp("cls") / "reviews.jsonl"
    with open(path, "w") as f:
        for i in range(160):
            label = "pos" if i % 2 else "neg"
            words = rng.choices(good if label == "pos" else bad, k=rng.randint(3, 12))
            f.write(json.dumps({"review": " ".join(words), "sentiment": label}) + "\n")
    return path


def test_cls_head_trains_and_exports_labels(sentiment, tmp_path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from engine import model as model_lib

    run_dir = tmp_path / "cls"
    check(run_ftl(["train", *tiny_overrides(run_dir, **{
        "model.head": "cls", "data.source": sentiment, "data.text_column": "review", "data.label_column": "sentiment",
        "data.val_fraction": 0.2, "data.tokenizer_vocab": 300, "train.max_steps": 30, "train.micro_batch": 8,
        "optim.lr": 3e-3, "train.eval_batches": 0, "train.log_every": 10})]))
    evals = [r for r in read_metrics(run_dir) if "eval_accuracy" in r]
    assert {"eval_loss", "eval_accuracy", "eval_macro_f1"} <= evals[-1].keys()
    assert evals[-1]["eval_accuracy"] >= 0.9, evals  # the word lists are disjoint: easy to learn
    hf = AutoModelForSequenceClassification.from_pretrained(run_dir / "final").eval()
    assert hf.config.id2label == {0: "neg", 1: "pos"} and hf.config.label2id == {"neg": 0, "pos": 1}
    tok = AutoTokenizer.from_pretrained(run_dir / "final")
    batch = tok(["happy kind warm", "awful cold rotten grim"], return_tensors="pt", padding=True)
    module = model_lib.TrainModule(AutoModelForSequenceClassification.from_pretrained(run_dir / "final"), "cls").eval()
    module.load_state_dict(load_file(str(run_dir / "checkpoints/step-000030/model.safetensors")), strict=False)
    with torch.no_grad():
        theirs = hf(**batch).logits
        assert torch.allclose(module.logits(batch["input_ids"], batch["attention_mask"]), theirs, atol=1e-5)
    assert theirs.argmax(-1).tolist() == [1, 0]


def test_fine_tune_from_a_saved_model_directory(tmp_path):
    base = tmp_path / "base"
    check(run_ftl(["train", *tiny_overrides(base, **{"train.max_steps": 4, "train.eval_batches": 3})]))
    tuned = tmp_path / "tuned"
    check(run_ftl(["train", *tiny_overrides(tuned, **{"model.name": base / "final", "train.max_steps": 2,
                                                       "train.eval_batches": 3})]))
    # the model's own tokenizer is used (no new BPE), and training starts from the saved weights:
    def spec(path):  # transformers 5 rebuilds a GPT2TokenizerFast from vocab + merges, writing "" for null affixes
        tree = json.loads(path.read_text())
        for key in ("continuing_subword_prefix", "end_of_word_suffix"):
            tree["model"][key] = tree["model"][key] or ""
        return tree

    assert spec(tuned / "tokenizer/tokenizer.json") == spec(base / "final/tokenizer.json")
    before = [r for r in read_metrics(tuned) if "eval_loss" in r][0]
    after_base = [r for r in read_metrics(base) if "eval_loss" in r][-1]
    assert before["step"] == 0 and before["eval_loss"] == pytest.approx(after_base["eval_loss"], rel=1e-5)
