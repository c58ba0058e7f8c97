"""Regularization keys reach the model: dropout per site, label smoothing only while training."""

import pytest
import torch

from engine import model as model_lib
from engine.config import load_config


def test_dropout_per_site_defaults_to_model_dropout():
    cfg = load_config(None, ["model.dropout=0.1", "model.attn_dropout=0.25", "model.resid_dropout=0"]).model
    assert model_lib._dropout_kwargs(cfg) == {"attn_pdrop": 0.25, "resid_pdrop": 0.0, "embd_pdrop": 0.1}
    with pytest.raises(Exception, match="model.embd_dropout must be within"):
        load_config(None, ["model.embd_dropout=1.5"])


def test_label_smoothing_applies_in_training_mode_only():
    class Fake(torch.nn.Module):
        def forward(self, input_ids, attention_mask=None):
            return type("Out", (), {"logits": self.logits})()

    fake = Fake()
    fake.logits = torch.tensor([[2.0, 0.0, -1.0], [0.5, 0.1, 0.0]])
    module = model_lib.TrainModule(fake, "cls", label_smoothing=0.2)
    labels = torch.tensor([0, 2])
    ids = torch.zeros(2, 3, dtype=torch.long)
    smoothed = torch.nn.functional.cross_entropy(fake.logits, labels, reduction="sum", label_smoothing=0.2)
    plain = torch.nn.functional.cross_entropy(fake.logits, labels, reduction="sum")
    assert module.train()(ids, labels).item() == pytest.approx(smoothed.item())
    assert module.eval()(ids, labels).item() == pytest.approx(plain.item())
