"""Heads, tied weights, presets, and loading through the real from_pretrained path."""

import pytest
import torch

from engine import model as model_lib
from engine.data import sources as data
from engine.config import ModelConfig
from engine.errors import UsageError


@pytest.fixture(scope="module")
def tokenizer():
    import pydoc_data.topics

    return data.train_bpe(list(pydoc_data.topics.topics.values())[:20], 300)


def build(tokenizer, head="lm", num_labels=0, **kw):
    cfg = ModelConfig(name="gpt2-tiny", head=head, **kw)
    torch.manual_seed(0)
    return model_lib.build(cfg, model_lib.resolve(cfg), tokenizer, num_labels)


def test_lm_head_is_tied_to_the_token_embedding(tokenizer):
    hf = build(tokenizer)
    assert hf.lm_head.weight is hf.transformer.wte.weight
    assert hf.config.vocab_size == len(tokenizer)
    assert hf.config._attn_implementation == "sdpa"
    # the training forward returns the summed token loss the plain HF loss averages
    ids = torch.randint(0, len(tokenizer), (2, 9))
    module = model_lib.TrainModule(hf, "lm")
    summed = module(ids[:, :-1], ids[:, 1:])
    mean = hf(input_ids=ids, labels=ids).loss  # HF shifts internally; causal: the last input changes nothing
    ref = torch.nn.functional.cross_entropy(hf(input_ids=ids[:, :-1]).logits.flatten(0, 1), ids[:, 1:].flatten(),
                                            reduction="sum")
    assert torch.allclose(summed, ref, rtol=1e-5)
    assert torch.allclose(summed / ids[:, 1:].numel(), mean, rtol=1e-5)  # HF's mean, times the target count


def test_cls_head_pools_the_last_non_pad_token(tokenizer):
    hf = build(tokenizer, head="cls", num_labels=3).eval()
    pad = tokenizer.pad_token_id
    ids = torch.tensor([[5, 6, 7, pad, pad], [8, 9, 10, 11, 12]])
    mask = (torch.arange(5) < torch.tensor([[3], [5]])).long()
    logits = model_lib.TrainModule(hf, "cls").logits(ids, mask)
    body = hf.transformer(input_ids=ids, attention_mask=mask).last_hidden_state
    expected = hf.score(torch.stack([body[0, 2], body[1, 4]]))
    assert torch.allclose(logits, expected, atol=1e-6)
    assert hf.config.pad_token_id == pad


def test_dropout_reaches_every_site(tokenizer):
    hf = build(tokenizer, dropout=0.2)
    assert hf.config.resid_pdrop == hf.config.embd_pdrop == hf.config.attn_pdrop == 0.2


def test_preset_shapes_match_gpt2():
    # the 124M GPT-2 count, on the meta device (no memory)
    from transformers import GPT2LMHeadModel

    with torch.device("meta"):
        n = model_lib.num_parameters(GPT2LMHeadModel(model_lib.preset_config("gpt2")))
    assert n == 124_439_808
    with torch.device("meta"):
        n_xl = model_lib.num_parameters(GPT2LMHeadModel(model_lib.preset_config("gpt2-xl")))
    assert 1.55e9 < n_xl < 1.56e9


def test_from_pretrained_directory_round_trip(tmp_path, tokenizer):
    hf = build(tokenizer)
    hf.save_pretrained(tmp_path / "m")
    tokenizer.save_pretrained(tmp_path / "m")
    cfg = ModelConfig(name=str(tmp_path / "m"))
    src = model_lib.resolve(cfg)
    assert src.pretrained and src.has_tokenizer and src.local_dir == tmp_path / "m"
    loaded = model_lib.build(cfg, src, data.load_tokenizer(str(tmp_path / "m")))
    ours, theirs = hf.state_dict(), loaded.state_dict()
    assert list(ours) == list(theirs) and all(torch.equal(ours[k], theirs[k]) for k in ours)
    # the same directory as a cls model: body loads, score is new
    cls = model_lib.build(ModelConfig(name=str(tmp_path / "m"), head="cls"), src, tokenizer, 4)
    assert torch.equal(cls.transformer.wte.weight, hf.transformer.wte.weight)
    assert cls.score.out_features == 4
    # transformers >= 5.25 swaps layers for Hub kernels on from_pretrained unless told not to (a download, other
    # numerics, a crash on the meta device): every load the engine makes keeps them off
    exported = model_lib.load_exported(tmp_path / "m", "lm")
    assert not any(getattr(m, "use_kernels", False) for m in (loaded, cls, exported))


def test_model_name_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(UsageError, match="without config.json"):
        model_lib.resolve(ModelConfig(name=str(tmp_path / "empty")))
    with pytest.raises(UsageError, match="no pretrained weights"):
        model_lib.resolve(ModelConfig(name="gpt2-tiny", init="pretrained"))
    with pytest.raises(UsageError, match="needs a preset"):
        model_lib.resolve(ModelConfig(name="someone/model", init="random"))
    # hub ids resolve lazily (nothing is downloaded at resolve time); random init of a hub shape is offline
    assert model_lib.resolve(ModelConfig(name="gpt2")).pretrained
    assert not model_lib.resolve(ModelConfig(name="gpt2", init="random")).pretrained
