"""Attributions: integrated gradients are complete (they sum to f(x) - f(baseline)); the report files."""

import json

import pytest
import torch

from engine.data import sources as data
from engine.commands import explain


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    """A tiny random LM and a tiny random 3-class classifier saved as ordinary HF directories."""
    from transformers import GPT2Config, GPT2ForSequenceClassification, GPT2LMHeadModel

    tok = data.train_bpe(["the cat sat on the mat", "a dog ran in the park", "def f(x): return x"] * 30, 300)
    dirs = {}
    for head, cls in (("lm", GPT2LMHeadModel), ("cls", GPT2ForSequenceClassification)):
        torch.manual_seed(0)
        cfg = GPT2Config(n_layer=2, n_embd=32, n_head=4, n_positions=64, vocab_size=len(tok),
                         pad_token_id=tok.pad_token_id, bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id)
        if head == "cls":
            cfg.num_labels, cfg.id2label = 3, {0: "neg", 1: "neu", 2: "pos"}
            cfg.label2id = {v: k for k, v in cfg.id2label.items()}
        model = cls(cfg)
        with torch.no_grad():  # larger weights than the init: a less linear function, a real test of the quadrature
            for p in model.parameters():
                p.mul_(3.0)
        path = tmp_path_factory.mktemp(head)
        model.save_pretrained(path)
        tok.save_pretrained(path)
        dirs[head] = path
    return dirs


@pytest.mark.parametrize("head", ["cls", "lm"])
@pytest.mark.parametrize("baseline", ["pad", "zero"])
def test_integrated_gradients_are_complete(model_dirs, head, baseline):
    e = explain.explain(model_dirs[head], "the cat sat on the mat in the park", "ig", steps=64, baseline=baseline)
    c = e.completeness
    assert len(e.attributions) == len(e.tokens) > 3
    assert sum(e.attributions) == pytest.approx(c["sum_attributions"], abs=1e-5)
    # completeness: attributions add up to the change of the target logit from the baseline to the input
    assert abs(c["sum_attributions"] - c["difference"]) <= 1e-3 * max(1.0, abs(c["difference"])), c
    assert abs(c["difference"]) > 0.05  # not a vacuous 0 == 0
    # and f(input) is really the model's logit of the explained target
    from engine.commands import models as tools

    hf, tok, _ = tools.load_model(model_dirs[head], torch.device("cpu"))
    ids = tok("the cat sat on the mat in the park", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        logits = hf(input_ids=ids).logits
    last = logits[0] if head == "cls" else logits[0, -1]
    assert c["f_input"] == pytest.approx(float(last[e.target_index]), abs=1e-4)
    assert e.target_index == int(last.argmax())


def test_few_steps_are_not_complete_and_grad_x_input_differs(model_dirs):
    # the tolerance above is meaningful: a crude 2-node quadrature misses it on this model
    rough = explain.explain(model_dirs["cls"], "the cat sat on the mat in the park", "ig", steps=2)
    assert rough.completeness["error"] > 1e-3 * max(1.0, abs(rough.completeness["difference"]))
    gxi = explain.explain(model_dirs["cls"], "the cat sat on the mat in the park", "grad_input")
    assert gxi.completeness == {} and len(gxi.attributions) == len(rough.attributions)


def test_lm_top_k_and_a_chosen_target(model_dirs):
    e = explain.explain(model_dirs["lm"], "the cat sat", "ig", steps=16, top_k=3, target=" on")
    assert len(e.top_next) == len(e.tokens) and all(len(row) == 3 for row in e.top_next)
    for row in e.top_next:
        probs = [p for _, p in row]
        assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1.0 + 1e-6
    assert e.target == " on"


def test_report_files(model_dirs, tmp_path):
    e = explain.explain(model_dirs["cls"], "a dog ran", "ig", steps=8, attention=(1, None))
    assert len(e.attention) == len(e.tokens) and all(abs(sum(r) - 1) < 1e-4 for r in e.attention)  # softmax rows
    files = explain.write(e, tmp_path, "m", "a dog ran")
    for name in ("attributions", "attention"):
        assert files[name].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    page = files["html"].read_text()
    assert page.count("data:image/png;base64,") == 2 and "<script" not in page and "http" not in page
    assert page.count('class="tok"') == len(e.tokens) and "Prediction: " + e.target in page
    saved = json.loads(files["json"].read_text())
    assert saved["attributions"] == e.attributions and saved["target"] == e.target
    text = explain.summary(e)
    assert text.startswith(f"prediction: {e.target}") and "top tokens by |attribution|" in text
