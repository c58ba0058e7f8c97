"""Fine-tuning on 2 real torchrun ranks (gloo): a LoRA classifier with auto class weights and discriminative
learning rates, under DDP and under DeepSpeed ZeRO-2 and ZeRO-3.

- Class-weighted loss normalization is exact: 2 ranks x 2 x 2 accumulation gives the losses and the
  weights of 1 process x 8 (the normalizer is the global sum of sample weights), whatever the backend.
- The streaming eval, reduced over the 2 ranks (the last round padded and masked), gives the confusion
  matrix that a direct computation on the exported model's predictions gives.
- DeepSpeed checkpoints hold the adapters only (exclude_frozen_parameters) and resume exactly; `ftl export`
  of one rebuilds the base and reproduces final/.
"""

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import check, tiny_config, tiny_overrides, torchrun, train_losses

SETUP = {
    "model.head": "cls", "data.source": "builtin:stdlib_packages", "data.seq_len": 32, "data.tokenizer_vocab": 512,
    "model.lora_rank": 4, "loss.class_weights": "auto", "train.max_steps": 4, "train.eval_batches": 0,
    "optim.lr": 3e-3, "optim.eps": 1e-6, "train.clip_grad": 0.5, "optim.layer_lr_decay": 0.7,
}


def in_process(run_dir: Path, micro: int, accum: int) -> Path:
    from engine.trainer import Trainer

    trainer = Trainer(tiny_config(run_dir, **SETUP, **{"train.micro_batch": micro, "train.grad_accum": accum}),
                      progress=False)
    try:
        trainer.train()
    finally:
        trainer.close()
    return run_dir


def direct_confusion(model_dir: Path, seq_len: int) -> torch.Tensor:
    """Predict every validation snippet with plain transformers and count [true, predicted] by hand."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from engine.data import tasks  # noqa: F401  (the builtin source)
    from engine.config import DataConfig
    from engine.data.sources import load_raw

    hf = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
    tok = AutoTokenizer.from_pretrained(model_dir)
    val = load_raw(DataConfig(source="builtin:stdlib_packages"), seed=0, need_label=True)["validation"]
    enc = tok(list(val["text"]), add_special_tokens=False, truncation=True, max_length=seq_len, padding=True,
              return_tensors="pt")
    with torch.no_grad():
        pred = hf(**enc).logits.argmax(-1).tolist()
    k = hf.config.num_labels
    confusion = torch.zeros(k, k, dtype=torch.long)
    for label, p in zip(list(val["label"]), pred):
        confusion[hf.config.label2id[label], p] += 1
    return confusion


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """One process, micro-batch 8, no accumulation: the run every 2-rank split must reproduce."""
    return in_process(tmp_path_factory.mktemp("ft_reference") / "w1_m8", 8, 1)


def check_against_reference(run: Path, reference: Path) -> None:
    import json

    assert len(train_losses(reference)) == 4
    assert train_losses(run) == pytest.approx(train_losses(reference), rel=1e-5)
    ref_w, w = load_file(str(reference / "final/model.safetensors")), load_file(str(run / "final/model.safetensors"))
    assert ref_w.keys() == w.keys()
    worst = max(float((ref_w[k] - w[k]).abs().max()) for k in ref_w)
    assert worst < 1e-6, worst
    report = json.loads((run / "eval/step-000004.json").read_text())
    assert report["eval_samples"] == 402 and 402 % (2 * 2) != 0  # the last eval round is padded
    confusion = torch.tensor(report["confusion"])
    assert torch.equal(confusion, torch.tensor(json.loads((reference / "eval/step-000004.json").read_text())["confusion"]))
    assert torch.equal(confusion, direct_confusion(run / "final", SETUP["data.seq_len"]))


def test_weighted_lora_fine_tune_ddp_two_ranks(tmp_path, reference):
    two = tmp_path / "ddp_w2_m2_a2"
    check(torchrun(2, ["train", *tiny_overrides(two, **SETUP, **{"train.micro_batch": 2, "train.grad_accum": 2})]))
    check_against_reference(two, reference)


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_weighted_lora_fine_tune_zero_two_ranks(stage, tmp_path, reference):
    from engine.commands import models as tools

    run = tmp_path / f"zero{stage}_w2_m2_a2"
    zero = {"train.micro_batch": 2, "train.grad_accum": 2, "dist.backend": "deepspeed", "dist.zero_stage": stage,
            "checkpoint.every": 2}
    check(torchrun(2, ["train", *tiny_overrides(run, **SETUP, **zero)]))
    check_against_reference(run, reference)
    # adapter-only: DeepSpeed's module and optimizer files together are a fraction of the model
    files = list((run / "checkpoints/step-000004/deepspeed").rglob("*.pt"))
    full_bytes = sum(v.numel() * 4 for v in load_file(str(run / "final/model.safetensors")).values())
    assert files and sum(f.stat().st_size for f in files) < 0.35 * full_bytes, [(f.name, f.stat().st_size) for f in files]
    out = tools.export_checkpoint(run / "checkpoints/step-000004", tmp_path / "exported")
    ref, got = load_file(str(run / "final/model.safetensors")), load_file(str(out / "model.safetensors"))
    assert all(torch.equal(ref[k], got[k]) for k in ref)
    if stage == 2:  # resuming from the step-2 adapter checkpoint reproduces steps 3 and 4
        resumed = tmp_path / "zero2_resumed"
        check(torchrun(2, ["train", *tiny_overrides(resumed, **SETUP, **zero, **{
            "checkpoint.resume": run / "checkpoints/step-000002"})]))
        assert train_losses(resumed) == pytest.approx(train_losses(run)[2:], rel=1e-6)

