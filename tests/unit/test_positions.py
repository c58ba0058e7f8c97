"""model.max_positions: the position table grows by copy or interpolation, from a real saved model."""

import pytest
import torch

from engine import model as model_lib, positions
from engine.data import sources as data
from engine.config import ModelConfig


def test_copy_tiles_the_table_and_keeps_the_trained_rows():
    old = torch.randn(6, 3)
    new = positions.extended_table(old, 14, "copy")
    assert new.shape == (14, 3)
    assert torch.equal(new[:6], old) and torch.equal(new[6:12], old) and torch.equal(new[12:], old[:2])


def test_interpolate_stretches_the_table_linearly():
    old = torch.arange(5.0).unsqueeze(1) * torch.tensor([[1.0, -2.0]])  # a linear table
    new = positions.extended_table(old, 9, "interpolate")
    assert torch.equal(new[0], old[0]) and torch.equal(new[-1], old[-1])
    assert torch.allclose(new[:, 0], torch.linspace(0, 4, 9))  # linear stays linear, at half steps
    assert torch.allclose(new[::2], old)
    with pytest.raises(ValueError):
        positions.extended_table(old, 3, "copy")


@pytest.fixture(scope="module")
def saved_lm(tmp_path_factory):
    from transformers import GPT2Config, GPT2LMHeadModel

    tok = data.train_bpe(["def f(x): return x + 1", "class A: pass"] * 20, 300)
    path = tmp_path_factory.mktemp("pretrained")
    cfg = GPT2Config(n_layer=1, n_embd=16, n_head=2, n_positions=64, vocab_size=len(tok),
                     bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    GPT2LMHeadModel(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path, tok


@pytest.mark.parametrize("mode", ["copy", "interpolate"])
def test_build_extends_a_pretrained_model(saved_lm, mode):
    from transformers import AutoModelForCausalLM

    path, tok = saved_lm
    mcfg = ModelConfig(name=str(path), max_positions=100, position_init=mode)
    hf = model_lib.build(mcfg, model_lib.resolve(mcfg), tok)
    original = AutoModelForCausalLM.from_pretrained(path).transformer.wpe.weight.detach()
    wpe = hf.transformer.wpe.weight.detach()
    assert wpe.shape == (100, 16) and hf.config.n_positions == 100
    assert torch.equal(wpe, positions.extended_table(original, 100, mode))
    ids = torch.randint(0, len(tok), (1, 90))  # longer than the original 64 positions
    assert hf(input_ids=ids).logits.shape == (1, 90, len(tok))
    if mode == "copy":  # short inputs: exactly the original model
        ref = AutoModelForCausalLM.from_pretrained(path).eval()
        with torch.no_grad():
            assert torch.equal(hf.eval()(input_ids=ids[:, :20]).logits, ref(input_ids=ids[:, :20]).logits)


def test_random_init_is_built_with_the_positions(saved_lm):
    _, tok = saved_lm
    mcfg = ModelConfig(name="gpt2-tiny", max_positions=2048)
    hf = model_lib.build(mcfg, model_lib.resolve(mcfg), tok)
    assert hf.transformer.wpe.weight.shape[0] == 2048 == hf.config.n_positions
