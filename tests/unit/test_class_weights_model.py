"""The model's own loss honours per-sample weights (what class weights become): `TrainModule.forward` with
`loss_weights` equals the weighted sum computed by hand from its logits, for cross-entropy and for focal loss, and
differs from the unweighted sum. (The loss functions alone are tested in test_imbalance.py; this is the module the
backends train, so a weight dropped between the batch and the loss shows here.)"""

import pytest
import torch
import torch.nn.functional as F

from engine.model import TrainModule


@pytest.fixture(scope="module")
def module():
    from transformers import GPT2Config, GPT2ForSequenceClassification

    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50, n_positions=16, num_labels=3, pad_token_id=0)
    return TrainModule(GPT2ForSequenceClassification(cfg), "cls").eval()


def _batch():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 50, (6, 9), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0  # padded rows pool at their last real token
    mask[4, 3:] = 0
    ids = ids * mask
    labels = torch.tensor([0, 2, 1, 2, 0, 1])
    return ids, mask, labels


@pytest.mark.parametrize("gamma", [0.0, 2.0], ids=["cross-entropy", "focal"])
def test_the_model_loss_is_the_weighted_sum_of_per_sample_losses(module, gamma):
    ids, mask, labels = _batch()
    weights = torch.tensor([1.0, 9.0, 0.5])[labels]
    module.focal_gamma = gamma
    with torch.no_grad():
        got = module(ids, labels, attention_mask=mask, loss_weights=weights)
        plain = module(ids, labels, attention_mask=mask)
        logp = F.log_softmax(module.logits(ids, mask).float(), -1)[torch.arange(6), labels]
    per_sample = -((1 - logp.exp()) ** gamma) * logp
    assert got.item() == pytest.approx((weights * per_sample).sum().item(), rel=1e-5)
    assert plain.item() == pytest.approx(per_sample.sum().item(), rel=1e-5)
    assert abs(got.item() - plain.item()) > 1e-2 * plain.item()  # the weights change the loss
