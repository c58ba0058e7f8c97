"""dist.backend=fsdp in one process (a process group of one, a mesh of one): what it refuses (exit 2, one
message, nothing written), and the features that must behave exactly as under DDP: LoRA (adapter-only DCP
checkpoints), per-block compile, activation checkpointing, freezing, a pretrained directory loaded lazily
into the shards, and mixed precision (bf16 compute, fp32 reduction, fp32 master weights and moments)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import assert_train_refused, read_metrics, tiny_config, train_losses

CASES = [
    ("hsdp-shape", ["dist.backend=fsdp", "dist.fsdp_replicate=2"],
     ["dist.fsdp_replicate=2 does not divide the 1 ranks of this job"]),
    ("deepspeed-keys", ["dist.backend=fsdp", "dist.zero_stage=3", "dist.fsdp_replicate=0"],
     ["2 problems", "dist.zero_stage / dist.ds_config need dist.backend=deepspeed",
      "dist.fsdp_replicate must be >= 1 (got 0)"]),
    ("fsdp-keys-without-fsdp", ["dist.reshard_after_forward=false", "dist.offload=cpu"],
     ["2 problems", "dist.reshard_after_forward / dist.fsdp_replicate / dist.fsdp_grad_sync need dist.backend=fsdp",
      "dist.offload needs dist.backend=deepspeed or fsdp"]),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_settings_fsdp_cannot_honour_exit_2(case, tmp_path, capsys):
    _, overrides, expected = case
    assert_train_refused(tmp_path, overrides, expected, capsys)


def test_every_rank_finds_the_same_hsdp_problem_without_a_process_group(tmp_path):
    from engine.backends.fsdp import problems

    cfg = tiny_config(tmp_path / "run", **{"dist.backend": "fsdp", "dist.fsdp_replicate": 3})
    assert problems(cfg, 8) == problems(cfg, 8) and "dist.fsdp_replicate=3 does not divide the 8 ranks" in problems(cfg, 8)[0]
    assert problems(cfg, 6) == []


def _train(run_dir: Path, **overrides):
    """Train in this process; returns the run directory and the trainer's backend facts read before closing."""
    from engine.trainer import Trainer

    trainer = Trainer(tiny_config(run_dir, **{"train.max_steps": 4, "train.sample_tokens": 0, **overrides}),
                      progress=False)
    facts = {}
    try:
        trainer.train()
        backend = trainer.backend
        if backend.name == "fsdp":
            blocks = list(backend.module.hf.transformer.h)
            facts["compiled"] = [getattr(b, "_compiled_call_impl", None) is not None for b in blocks]
            facts["param_dtypes"] = {p.to_local().dtype for p in backend.module.parameters()}
            state = [t for s in backend.optimizer.state.values() for k, t in s.items() if k != "step"]
            facts["state_dtypes"] = {t.to_local().dtype for t in state}
            from torch.distributed.fsdp import fully_shard

            policy = fully_shard.state(blocks[0])._fsdp_param_group.mp_policy
            facts["mp"] = (policy.param_dtype, policy.reduce_dtype)
    finally:
        trainer.close()
    return run_dir, facts


def _same(a: Path, b: Path) -> None:
    assert train_losses(a) == pytest.approx(train_losses(b), rel=1e-6)
    wa, wb = load_file(str(a / "final" / "model.safetensors")), load_file(str(b / "final" / "model.safetensors"))
    assert wa.keys() == wb.keys() and max(float((wa[k] - wb[k]).abs().max()) for k in wa) < 1e-6


def test_lora_with_per_block_compile_and_checkpointing_matches_ddp(tmp_path):
    lora = {"model.lora_rank": 4, "optim.lr": 3e-3}
    ddp, _ = _train(tmp_path / "ddp", **lora)
    fsdp, facts = _train(tmp_path / "fsdp", **lora, **{
        "dist.backend": "fsdp", "model.compile": True, "perf.compile_backend": "aot_eager",
        "model.gradient_checkpointing": True})
    _same(fsdp, ddp)
    assert facts["compiled"] == [True, True]  # each block compiled on its own, FSDP's hooks outside
    # a LoRA checkpoint leaves the frozen base out (rebuilt from model.name on resume)
    from engine.backends.fsdp import SafeReader

    keys = SafeReader(str(fsdp / "checkpoints" / "step-000004" / "fsdp")).read_metadata().state_dict_metadata
    model_keys = [k for k in keys if k.startswith("model.")]
    assert model_keys and all(".lora_" in k for k in model_keys), model_keys
    # exported offline from those adapters (base rebuilt from model.name, adapters merged), checked by logits
    from engine.commands import models as tools

    report = tools.export_checkpoint_checked(fsdp / "checkpoints" / "step-000004", tmp_path / "export")
    exported = load_file(str(tmp_path / "export" / "model.safetensors"))
    final = load_file(str(fsdp / "final" / "model.safetensors"))
    assert report["max_abs_diff"] < 1e-4 and all(torch.equal(exported[k], final[k]) for k in final)


def test_frozen_cls_from_a_pretrained_directory_matches_ddp(tmp_path):
    from engine import model as model_lib
    from engine.data import sources as data
    from engine.config import ModelConfig

    reviews = tmp_path / "reviews.jsonl"
    good, bad = "bright calm kind lovely warm".split(), "awful cold grim harsh sad".split()
    reviews.write_text("".join(json.dumps({"text": " ".join((good if i % 2 else bad)[j % 5] for j in range(i % 7 + 2)),
                                           "label": "pos" if i % 2 else "neg"}) + "\n" for i in range(48)))
    import pydoc_data.topics

    tok = data.train_bpe(iter(list(pydoc_data.topics.topics.values())[:200]), 512)
    torch.manual_seed(5)
    cfg = ModelConfig(name="gpt2-tiny")
    base = tmp_path / "base"
    model_lib.build(cfg, model_lib.resolve(cfg), tok).save_pretrained(base / "final")
    tok.save_pretrained(base / "final")
    cls = {"model.name": str(base / "final"), "model.head": "cls", "data.source": str(reviews),
           "data.val_fraction": 0.25, "model.freeze": ["embeddings", "blocks:1"], "optim.lr": 3e-3,
           "optim.eps": 1e-6}  # as in the other parity tests: Adam must not blow up ~1e-10 noise of zero gradients
    ddp, _ = _train(tmp_path / "ddp", **cls)
    fsdp, _ = _train(tmp_path / "fsdp", **cls, **{"dist.backend": "fsdp"})
    _same(fsdp, ddp)
    # read from the directory into the shards: nothing whole was built, the first evaluation is DDP's
    measured = [r["memory"]["measured"][0] for r in read_metrics(fsdp) if "memory" in r][0]
    assert measured["params_at_build"] == 0
    first = [r for r in read_metrics(fsdp) if r["step"] == 0 and "eval_loss" in r]
    assert first[0]["eval_loss"] == pytest.approx([r for r in read_metrics(ddp) if r["step"] == 0
                                                   and "eval_loss" in r][0]["eval_loss"], rel=1e-6)


def test_bf16_computes_in_bf16_and_keeps_fp32_master_weights(tmp_path):
    # stop_at_step: no final/ export (its bf16 logit check belongs to the like-with-like export work)
    run, facts = _train(tmp_path / "bf16", **{"dist.backend": "fsdp", "train.precision": "bf16",
                                             "train.max_steps": 6, "train.stop_at_step": 3})
    assert facts["mp"] == (torch.bfloat16, torch.float32)  # gathered weights bf16, gradients reduced in fp32
    assert facts["param_dtypes"] == {torch.float32} and facts["state_dtypes"] == {torch.float32}
    layout = json.loads((run / "checkpoints" / "step-000003" / "fsdp" / "layout.json").read_text())
    assert layout["dtype"] == "bfloat16"
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    from engine.backends.fsdp import SafeReader

    saved = SafeReader(str(run / "checkpoints" / "step-000003" / "fsdp")).read_metadata().state_dict_metadata
    dtypes = {m.properties.dtype for k, m in saved.items() if isinstance(m, TensorStorageMetadata)
              and (k.startswith("model.") or k.endswith(("exp_avg", "exp_avg_sq")))}
    assert dtypes == {torch.float32}  # the checkpoint holds the fp32 master weights and moments
    losses = train_losses(run)
    assert len(losses) == 3 and all(map(lambda x: 0 < x < 20, losses))


def test_non_finite_steps_are_skipped_and_saving_before_the_first_update_changes_nothing(tmp_path, monkeypatch):
    """Steps 1 and 3 have a NaN loss. Each is skipped: no update, weights and Adam state exactly as before
    (steps 2 and 3 saved the same), counted in the log. Step 1 comes before any update, so the optimizer has
    no state when step 1's checkpoint is saved; saving must not create any (DCP would run a zero-lr step:
    Adam's step count 1 before the first real update), so the run that saved every step continues exactly
    like one that did not save, and step 1's checkpoint says it holds no optimizer state."""
    from engine.backends.fsdp import full_state_from_checkpoint

    monkeypatch.setenv("FTL_FAULT_INJECT", "nan@step=1;nan@step=3")
    common = {"dist.backend": "fsdp", "optim.warmup_steps": 0}
    saving, _ = _train(tmp_path / "saving", **common, **{"checkpoint.every": 1, "checkpoint.keep": 5})
    plain, _ = _train(tmp_path / "plain", **common)
    assert train_losses(saving)[1:] == train_losses(plain)[1:]
    ckpt = {s: saving / "checkpoints" / f"step-00000{s}" for s in (1, 2, 3, 4)}
    layout = {s: json.loads((p / "fsdp" / "layout.json").read_text()) for s, p in ckpt.items()}
    assert [layout[s]["optimizer_state"] for s in (1, 2, 3, 4)] == [False, True, True, True]
    w = {s: full_state_from_checkpoint(p) for s, p in ckpt.items()}
    assert all(torch.equal(w[2][k], w[3][k]) for k in w[2])
    assert not torch.equal(w[3]["transformer.wte.weight"], w[4]["transformer.wte.weight"])  # trains on
    o2, o3 = _optimizer_state(ckpt[2]), _optimizer_state(ckpt[3])
    assert o2.keys() == o3.keys() and len(o2) > 0 and all(torch.equal(o2[k], o3[k]) for k in o2)
    rows = {r["step"]: r for r in read_metrics(saving) if "loss" in r}
    assert [rows[s].get("skipped_steps") for s in (1, 2, 3, 4)] == [1, None, 1, None]


def test_large_exports_are_sharded_safetensors_with_an_index(tmp_path, monkeypatch):
    """export_hf splits an export above checkpoint.EXPORT_SHARD_SIZE (2 GB: gpt2-large/xl in fp32) into several
    files and an index; shown here with a 100 kB limit on the tiny model, reloaded by plain transformers."""
    from transformers import AutoModelForCausalLM

    from engine import checkpoint, model as model_lib
    from engine.data import sources as data
    from engine.config import ModelConfig

    monkeypatch.setattr(checkpoint, "EXPORT_SHARD_SIZE", "100KB")
    tok = data.train_bpe(iter(["some text for a tokenizer"] * 50), 300)
    cfg = ModelConfig(name="gpt2-tiny")
    hf = model_lib.build(cfg, model_lib.resolve(cfg), tok)
    out = tmp_path / "export"
    checkpoint.export_hf(hf.config, "lm", hf.state_dict(), tok, out)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    reloaded = AutoModelForCausalLM.from_pretrained(out).state_dict()
    assert all(torch.equal(reloaded[k], v) for k, v in hf.state_dict().items())


def _optimizer_state(ckpt: Path) -> dict[str, torch.Tensor]:
    """The Adam moments and step counts of an fsdp checkpoint, read offline."""
    import warnings

    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    from engine.backends.fsdp import SafeLoadPlanner, SafeReader

    reader = SafeReader(str(ckpt / "fsdp"))
    md = reader.read_metadata().state_dict_metadata
    state = {k: torch.empty(tuple(m.size), dtype=m.properties.dtype) for k, m in md.items()
             if k.startswith("optim.state.") and isinstance(m, TensorStorageMetadata)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "torch.distributed is disabled": one process, on purpose
        dcp.load(state, storage_reader=reader, planner=SafeLoadPlanner(allow_partial_load=True), no_dist=True)
    return state
