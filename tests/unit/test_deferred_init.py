"""The meta-device build that FSDP replays into its shards (engine/backends/deferred_init.py) must give exactly
what one process builds from the same seed, and leave the random stream where one process leaves it: random
init, the padded vocabulary, LoRA, added tokens, longer positions, and pretrained weights read lazily from
their files (lm and cls)."""

from __future__ import annotations

import io
import pickle

import pytest
import torch

from engine import fastpath, model as model_lib, transfer
from engine.backends.deferred_init import Recorder, pretrained_tensors
from engine.config import ModelConfig, PerfConfig


class Tokenizer:
    """What model.build reads from a tokenizer."""

    def __init__(self, size: int = 500):
        self.size = size
        self.pad_token_id = self.eos_token_id = 499

    def __len__(self) -> int:
        return self.size


def build(cfg: ModelConfig, tokenizer: Tokenizer):
    """The trainer's build sequence (model, padded LM head, freeze/LoRA)."""
    hf = model_lib.build(cfg, model_lib.resolve(cfg), tokenizer, 3 if cfg.head == "cls" else 0)
    if cfg.head == "lm":
        fastpath.install_lm_head(hf, PerfConfig())
    transfer.adapt(hf, cfg)
    return hf


def recorded_build(cfg: ModelConfig, tokenizer: Tokenizer):
    rec = Recorder()

    def provider(name: str) -> dict:
        state = {}
        for key, (shape, dtype, load) in pretrained_tensors(name).items():
            t = torch.empty(shape, dtype=dtype)
            rec.external(t, load)
            state[key] = t
        return state

    with rec, model_lib.pretrained_state_dict(provider):
        hf = build(cfg, tokenizer)
    return rec, hf


@pytest.fixture(scope="module")
def pretrained_dir(tmp_path_factory):
    torch.manual_seed(5)
    cfg = ModelConfig(name="gpt2-tiny")
    path = tmp_path_factory.mktemp("pretrained")
    model_lib.build(cfg, model_lib.resolve(cfg), Tokenizer()).save_pretrained(path)
    return path


CASES = {
    "random-lm": (dict(name="gpt2-tiny"), 500),
    "random-lm-lora": (dict(name="gpt2-tiny", lora_rank=4), 500),
    "random-cls-freeze": (dict(name="gpt2-tiny", head="cls", freeze=["embeddings", "blocks:1"]), 500),
    "pretrained-lm-added-tokens-longer-positions": (dict(max_positions=1100), 520),
    "pretrained-cls-lora": (dict(head="cls", lora_rank=2), 500),
}


@pytest.mark.parametrize("case", list(CASES))
def test_replay_gives_one_process_weights_and_random_stream(case, pretrained_dir):
    fields, vocab = CASES[case]
    cfg = ModelConfig(**{"name": str(pretrained_dir), **fields})
    torch.manual_seed(0)
    reference = build(cfg, Tokenizer(vocab)).state_dict()
    after_reference = torch.rand(4)

    torch.manual_seed(0)
    rec, hf = recorded_build(cfg, Tokenizer(vocab))
    assert torch.equal(torch.rand(4), after_reference)  # the stream continues as in one process
    tensors = list(hf.state_dict(keep_vars=True).items())
    assert tensors and all(t.is_meta for _, t in tensors)  # nothing was allocated
    assert [n for n, _ in tensors] == list(reference)
    state = torch.get_rng_state()
    largest = max(t.numel() * t.element_size() for _, t in tensors)
    for name, t in tensors:  # one at a time, as FSDP does
        (value,) = rec.materialize([rec.ref(t)])
        assert value.dtype == reference[name].dtype and torch.equal(value, reference[name]), name
        # a tensor plus what it is computed from, freed as soon as used (the longer position table: the loaded
        # one, its tiled copy and the new one), never the model
        assert rec.last_peak_bytes <= 4 * largest, (name, rec.last_peak_bytes, largest)
    assert torch.equal(torch.get_rng_state(), state)  # replaying leaves the stream alone


def test_a_pretrained_tensor_is_read_from_its_file_only_when_replayed(pretrained_dir):
    reads = []
    rec = Recorder()
    with rec:
        t = torch.empty(3, 4)
        rec.external(t, lambda: reads.append(1) or torch.arange(12.0).view(3, 4))
        view = t[1:]
        view.mul_(2)  # an in-place write through a view, recorded against the storage
    assert reads == []
    (value,) = rec.materialize([rec.ref(t)])
    assert reads == [1]
    assert torch.equal(value, torch.cat([torch.arange(4.0).view(1, 4), 2 * torch.arange(4.0, 12.0).view(2, 4)]))
    keys = pretrained_tensors(str(pretrained_dir))
    shape, dtype, load = keys["transformer.wpe.weight"]
    assert (shape, dtype) == ((1024, 64), torch.float32) and load().shape == shape


def test_dcp_index_reader_refuses_anything_but_dcp_metadata(tmp_path):
    """DCP's own reader unpickles its index with pickle.load; ours allows only DCP's metadata classes."""
    from engine.backends.fsdp import _IndexUnpickler

    marker = tmp_path / "ran"

    class Exploit:
        def __reduce__(self):
            import os

            return os.system, (f"touch {marker}",)

    with pytest.raises(pickle.UnpicklingError, match="posix.system|os.system"):
        _IndexUnpickler(io.BytesIO(pickle.dumps(Exploit()))).load()
    assert not marker.exists()
    from torch.distributed.checkpoint.metadata import Metadata, TensorProperties, TensorStorageMetadata

    md = Metadata({"w": TensorStorageMetadata(TensorProperties(dtype=torch.bfloat16), torch.Size([2, 3]), [])})
    back = _IndexUnpickler(io.BytesIO(pickle.dumps(md))).load()
    assert back.state_dict_metadata["w"].size == torch.Size([2, 3])
    assert back.state_dict_metadata["w"].properties.dtype == torch.bfloat16
