"""The fast path's pieces against the plain computation: chunked linear cross-entropy (loss and both
gradients, fp32 tight, bf16 within a stated tolerance), padded vocabulary rows that take no probability
mass, and the direct causal body against transformers' own GPT2Model.forward."""

import copy

import pytest
import torch
import torch.nn.functional as F

from engine import fastpath, losses, model as model_lib
from engine.data import sources as data
from engine.config import ModelConfig, PerfConfig

IGNORE = losses.IGNORE


def plain_loss(hidden, weight, labels, vocab, smoothing=0.0):
    logits = F.linear(hidden, weight)[..., :vocab]
    return F.cross_entropy(logits.flatten(0, -2).float(), labels.flatten(), ignore_index=IGNORE, reduction="sum",
                           label_smoothing=smoothing)


def problem(n=53, dim=32, vocab=100, padded=128, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, dim, generator=g).requires_grad_()
    weight = (0.3 * torch.randn(padded, dim, generator=g)).requires_grad_()
    labels = torch.randint(0, vocab, (n,), generator=g)
    labels[::4] = IGNORE  # targets that do not count
    return hidden, weight, labels


def grads(loss_fn, hidden, weight, scale=2.5):
    hidden.grad = weight.grad = None
    loss = loss_fn()
    (loss * scale).backward()  # a non-unit incoming gradient, as the trainer's 1/global-count scale
    return loss.detach(), hidden.grad.clone(), weight.grad.clone()


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
@pytest.mark.parametrize("chunk", [7, 53, 1000])  # uneven chunks, exactly one, larger than the input
def test_chunked_ce_equals_plain_fp32(smoothing, chunk):
    h, w, y = problem()
    ref = grads(lambda: plain_loss(h, w, y, 100, smoothing), h, w)
    got = grads(lambda: losses.linear_cross_entropy_sum(h, w, y, 100, chunk, smoothing), h, w)
    assert torch.allclose(got[0], ref[0], rtol=1e-6, atol=1e-5)
    assert torch.allclose(got[1], ref[1], rtol=1e-5, atol=1e-6)
    assert torch.allclose(got[2], ref[2], rtol=1e-5, atol=1e-6)
    assert ref[1].abs().max() > 1e-2 and ref[2].abs().max() > 1e-2  # the gradients are not trivially zero


def test_chunked_ce_bf16_within_tolerance():
    """bf16 autocast: the chunked path is as close to the fp32 result as the plain bf16 path is.
    Stated tolerance: loss within 1% relative, each gradient within 3% relative (Frobenius norm)."""
    h, w, y = problem(n=96, dim=64, vocab=200, padded=256)
    ref = grads(lambda: plain_loss(h, w, y, 200), h, w)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        plain = grads(lambda: plain_loss(h, w, y, 200), h, w)
        chunked = grads(lambda: losses.linear_cross_entropy_sum(h, w, y, 200, 17), h, w)

    def rel(a, b):
        return float((a.float() - b).norm() / b.norm())

    for k, name in enumerate(("loss", "grad hidden", "grad weight")):
        err, plain_err = rel(chunked[k], ref[k]), rel(plain[k], ref[k])
        assert err < (1e-2 if k == 0 else 3e-2), f"{name}: relative error {err:.3g}"
        assert err <= 2 * plain_err + 1e-3, f"{name}: chunked {err:.3g} vs plain bf16 {plain_err:.3g}"
    assert chunked[2].dtype == torch.float32  # gradients land in the parameter's dtype


def test_padded_vocabulary_rows_take_no_probability_mass():
    h, w, y = problem()
    with torch.no_grad():
        w[100:] = 50.0  # padded rows that would dominate any softmax they were part of
    head = fastpath.LMHead(torch.nn.Parameter(w.detach().clone()), vocab_size=100, chunked=True, chunk_tokens=8)
    ref = plain_loss(h, w[:100], y, 100)
    loss = head(h, y)
    loss.backward()
    assert torch.allclose(loss, ref, rtol=1e-6)
    assert torch.count_nonzero(head.weight.grad[100:]) == 0  # padding never learns
    assert head(h).shape == (53, 100)  # logits: the real vocabulary only
    plain_head = fastpath.LMHead(head.weight, 100, chunked=False)
    assert torch.allclose(plain_head(h, y), ref, rtol=1e-6)
    with torch.no_grad():  # evaluation takes the gradient-free branch
        assert torch.allclose(head(h, y), ref, rtol=1e-6)


@pytest.fixture(scope="module")
def tokenizer():
    import pydoc_data.topics

    tok = data.train_bpe(list(pydoc_data.topics.topics.values())[:40], 300)
    assert len(tok) % 64 != 0  # padding has something to do
    return tok


def build(tokenizer, dropout=0.0):
    cfg = ModelConfig(name="gpt2-tiny", dropout=dropout)
    torch.manual_seed(0)
    return model_lib.build(cfg, model_lib.resolve(cfg), tokenizer)


def test_train_module_pads_the_vocabulary_without_changing_the_math(tokenizer):
    hf = build(tokenizer)
    plain = copy.deepcopy(hf)
    vocab = len(tokenizer)
    module = model_lib.TrainModule(hf, "lm", PerfConfig(ce_chunk_tokens=5), packed=True)
    assert module.causal_body
    assert hf.transformer.wte.num_embeddings == fastpath.padded_size(vocab, 64) > vocab
    assert hf.lm_head.weight is hf.transformer.wte.weight  # still tied
    assert hf.config.vocab_size == vocab  # exports and generation see the real size
    assert fastpath.padding_parameters(hf) == (hf.transformer.wte.num_embeddings - vocab) * 64

    ids = torch.randint(0, vocab, (3, 17))
    labels = ids.roll(-1, 1)
    labels[:, -3:] = IGNORE
    loss = module(ids, labels)
    loss.backward()
    ref = F.cross_entropy(plain(input_ids=ids).logits.flatten(0, 1), labels.flatten(), reduction="sum")
    ref.backward()
    assert torch.allclose(loss, ref, rtol=1e-6)
    assert module.logits(ids).shape == (3, 17, vocab)
    assert torch.allclose(module.logits(ids), plain(input_ids=ids).logits, atol=1e-5)
    assert torch.allclose(hf.transformer.wte.weight.grad[:vocab], plain.transformer.wte.weight.grad, atol=1e-6)
    assert torch.allclose(hf.transformer.h[0].attn.c_attn.weight.grad, plain.transformer.h[0].attn.c_attn.weight.grad,
                          atol=1e-6)
    exported = fastpath.unpad_state_dict(hf.state_dict(), vocab)
    assert exported["transformer.wte.weight"].shape[0] == exported["lm_head.weight"].shape[0] == vocab


@pytest.mark.parametrize("checkpointing", [False, True])
def test_causal_body_equals_transformers_forward(tokenizer, checkpointing):
    hf = build(tokenizer, dropout=0.1)  # dropout on: the RNG draws must happen in the same order
    if checkpointing:
        hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    hf.train()
    assert fastpath.can_use_causal_body(hf, PerfConfig())
    ids = torch.randint(0, len(tokenizer), (2, 19))
    torch.manual_seed(5)
    ours = fastpath.causal_body(hf.transformer, ids)
    ours.sum().backward()
    g_ours = hf.transformer.h[1].mlp.c_fc.weight.grad.clone()
    hf.zero_grad()
    torch.manual_seed(5)
    theirs = hf.transformer(input_ids=ids).last_hidden_state
    theirs.sum().backward()
    assert torch.equal(ours, theirs)
    assert torch.allclose(g_ours, hf.transformer.h[1].mlp.c_fc.weight.grad, atol=1e-6)


def test_causal_body_needs_sdpa(tokenizer):
    cfg = ModelConfig(name="gpt2-tiny", attn_implementation="eager")
    hf = model_lib.build(cfg, model_lib.resolve(cfg), tokenizer)
    assert not fastpath.can_use_causal_body(hf, PerfConfig())  # eager attention needs the causal mask
    assert not model_lib.TrainModule(hf, "lm", packed=True).causal_body
    assert not fastpath.can_use_causal_body(build(tokenizer), PerfConfig(causal_body=False))


def test_unpacked_data_takes_one_path_for_every_batch(tokenizer):
    """Unpacked batches carry an attention mask on one rank and none on another. ZeRO-3 needs every rank
    to run the same modules in the same order, so the path is chosen per run: transformers' forward for
    every batch, mask or not."""
    hf = build(tokenizer)
    module = model_lib.TrainModule(hf, "lm", packed=False)
    calls = []
    hf.transformer.register_forward_hook(lambda *a: calls.append(1))
    ids = torch.randint(0, len(tokenizer), (2, 9))
    module(ids, ids)
    module(ids, ids, attention_mask=torch.ones_like(ids))
    assert len(calls) == 2
    packed = model_lib.TrainModule(build(tokenizer), "lm", packed=True)
    assert packed.causal_body


def test_fused_gelu_is_gpt2s_gelu_in_one_kernel(tokenizer):
    from transformers.activations import NewGELUActivation

    x = torch.randn(64, 256, requires_grad=True)
    ref = NewGELUActivation()(x)
    (g_ref,) = torch.autograd.grad(ref.sum(), x)
    got = fastpath.TanhGELU()(x)
    (g_got,) = torch.autograd.grad(got.sum(), x)
    assert torch.allclose(got, ref, atol=1e-6) and torch.allclose(g_got, g_ref, atol=1e-6)

    hf = build(tokenizer)
    plain = copy.deepcopy(hf)
    module = model_lib.TrainModule(hf, "lm", PerfConfig(pad_vocab_to=1), packed=True)
    assert [type(b.mlp.act) for b in hf.transformer.h] == [fastpath.TanhGELU] * 2
    assert hf.state_dict().keys() == plain.state_dict().keys()  # nothing to export differently
    ids = torch.randint(0, len(tokenizer), (2, 11))
    assert torch.allclose(module.logits(ids), plain(input_ids=ids).logits, atol=1e-5)
    untouched = model_lib.TrainModule(build(tokenizer), "lm", PerfConfig(fused_gelu=False))
    assert type(untouched.hf.transformer.h[0].mlp.act) is NewGELUActivation


def test_mfu_peak_by_device_name():
    """989 TFLOP/s for the SXM H100/H200 the MFU goal names; the slower PCIe/NVL boards get their own."""
    from engine import metrics

    assert metrics.peak_flops_of("NVIDIA H100 80GB HBM3") == 989e12
    assert metrics.peak_flops_of("NVIDIA H200") == 989e12
    assert metrics.peak_flops_of("NVIDIA H100 PCIe") == 756e12
    assert metrics.peak_flops_of("NVIDIA H100 NVL") == 835e12
    assert metrics.peak_flops_of("NVIDIA A100-SXM4-80GB") == 312e12
    assert metrics.peak_flops_of("Some Future GPU") is None  # no MFU rather than a wrong one
    assert metrics.peak_flops(torch.device("cpu")) is None
