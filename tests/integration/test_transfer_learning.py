"""Transfer learning end to end, in process: freezing, discriminative learning rates, LoRA (adapter-only
checkpoints, exact resume, merged export), added tokens, early stopping with best/."""

import json
import random

import pytest
import torch
from safetensors.torch import load_file

from engine import model as model_lib, transfer
from tests.conftest import read_metrics, tiny_config, train_losses


@pytest.fixture(scope="module")
def reviews(tmp_path_factory):
    """Three classes of short texts drawn from disjoint word lists."""
    rng = random.Random(0)
    words = {"pos": "bright calm clean fresh gentle happy kind lovely nice warm".split(),
             "neg": "awful broken cold dirty grim harsh nasty rotten sad ugly".split(),
             "meh": "average fine okay plain so-so usual middling normal fair standard".split()}
    path = tmp_path_factory.mktemp("reviews") / "reviews.jsonl"
    with open(path, "w") as f:
        for i in range(150):
            label = ("pos", "neg", "meh")[i % 3]
            f.write(json.dumps({"text": " ".join(rng.choices(words[label], k=rng.randint(3, 10))), "label": label}) + "\n")
    return path


def cls_config(run_dir, corpus, **extra):
    base = {"model.head": "cls", "data.source": corpus, "data.val_fraction": 0.2, "data.tokenizer_vocab": 300,
            "train.micro_batch": 8, "train.max_steps": 8, "train.log_every": 1, "train.eval_batches": 0,
            "optim.lr": 3e-3, "optim.warmup_steps": 0, "optim.schedule": "constant"}
    return tiny_config(run_dir, **{**base, **extra})


def run(cfg, before=None):
    """Train in this process; `before(trainer)` sees the trainer after setup, before training."""
    from engine.trainer import Trainer

    trainer = Trainer(cfg, progress=False)
    try:
        if before:
            before(trainer)
        trainer.train()
    finally:
        trainer.close()
    return trainer


def snapshot(module):
    return {n: p.detach().clone() for n, p in module.named_parameters()}


def test_freezing_and_discriminative_learning_rates(reviews, tmp_path):
    cfg = cls_config(tmp_path / "frozen", reviews, **{"model.freeze": "blocks:1", "optim.layer_lr_decay": 0.5,
                                                      "optim.head_lr": 1e-2, "optim.weight_decay": 0.1})
    seen = {}
    trainer = run(cfg, lambda t: seen.update(snapshot(t.backend.module)))
    module = trainer.backend.module
    after = dict(module.named_parameters())
    frozen = [n for n in after if ".h.0." in n]
    assert frozen and all(not after[n].requires_grad for n in frozen)
    for n in frozen:  # bitwise, despite weight decay 0.1 on every trained matrix
        assert torch.equal(after[n], seen[n]), n
    assert all(not torch.equal(after[n], seen[n]) for n in after if ".h.1." in n and n.endswith("c_attn.weight"))
    # frozen parameters have no optimizer state; every trained one has
    opt = trainer.backend.optimizer
    with_state = {id(p) for p in opt.state}
    assert with_state == {id(p) for p in module.parameters() if p.requires_grad}
    # each group's lr is the step's lr times its depth scale: top block 1, block below 0.5, embeddings 0.25
    lrs = {g["name"]: g["lr"] for g in opt.param_groups}
    assert lrs == pytest.approx({"embeddings/no_decay": 3e-3 * 0.25, "block1/decay": 3e-3, "block1/no_decay": 3e-3,
                                 "top/no_decay": 3e-3, "head/decay": 1e-2})
    final = load_file(str(tmp_path / "frozen/final/model.safetensors"))
    for n in frozen:
        assert torch.equal(final[n.removeprefix("hf.")], seen[n])


def test_lora_trains_only_adapters_checkpoints_are_small_and_export_merges(reviews, tmp_path):
    from transformers import AutoModelForSequenceClassification

    from engine.commands import models as tools
    from engine.data.sources import probe_batch

    over = {"model.lora_rank": 4, "model.lora_alpha": 8, "train.max_steps": 8, "checkpoint.every": 4}
    seen = {}
    trainer = run(cls_config(tmp_path / "lora", reviews, **over), lambda t: seen.update(snapshot(t.backend.module)))
    module = trainer.backend.module
    after = dict(module.named_parameters())
    trained = {n for n, p in after.items() if p.requires_grad}
    assert trained == {n for n in after if ".lora_" in n} | {"hf.score.weight"}
    for n, p in after.items():
        if n not in trained:
            assert torch.equal(p, seen[n]), n  # the base is untouched
    assert all(after[n].abs().sum() > 0 for n in trained if ".lora_B." in n)  # B starts at zero and moved

    # adapter-only checkpoints: the trainable tensors and nothing else
    ckpt = tmp_path / "lora/checkpoints/step-000008"
    saved = load_file(str(ckpt / "model.safetensors"))
    assert set(saved) == trained
    trainable_bytes = sum(after[n].numel() * 4 for n in trained)
    full_bytes = sum(p.numel() * 4 for p in after.values())
    size = (ckpt / "model.safetensors").stat().st_size
    assert size <= trainable_bytes + 16_384 and size < 0.08 * full_bytes, (size, trainable_bytes, full_bytes)

    # final/ is a plain transformers model that reproduces the adapted model's logits
    final = tmp_path / "lora/final"
    assert not any(".lora_" in k or "base_layer" in k for k in load_file(str(final / "model.safetensors")))
    hf = AutoModelForSequenceClassification.from_pretrained(final).eval()
    batch = probe_batch(trainer.data, n=6)
    module.eval()
    with torch.no_grad():
        ours = module.logits(batch["input_ids"], batch["attention_mask"])
        theirs = hf(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert torch.allclose(ours, theirs, atol=1e-5) and ours.std() > 0.1

    # our merge equals peft's own merge of the live model
    from peft.tuners.lora import LoraLayer

    merged = transfer.merge_lora({k: v.detach() for k, v in module.hf.state_dict().items()}, trainer.cfg.model)
    for name, layer in module.hf.named_modules():
        if isinstance(layer, LoraLayer):
            layer.merge()
            assert torch.allclose(layer.base_layer.weight, merged[f"{name}.weight"], atol=1e-6), name

    # `ftl export --check` of the adapter checkpoint rebuilds the base, merges, and the export reproduces the
    # rebuilt adapted model's logits; its weights are final/'s
    check = tools.export_checkpoint_checked(ckpt, tmp_path / "exported")
    assert check["max_abs_diff"] < 1e-4
    ref = load_file(str(final / "model.safetensors"))
    got = load_file(str(tmp_path / "exported/model.safetensors"))
    assert ref.keys() == got.keys() and all(torch.allclose(ref[k], got[k], atol=1e-6) for k in ref)

    # resuming from the step-4 adapter checkpoint reproduces steps 5..8 exactly
    resumed = tmp_path / "resumed"
    run(cls_config(resumed, reviews, **over, **{"checkpoint.resume": tmp_path / "lora/checkpoints/step-000004"}))
    assert train_losses(resumed) == train_losses(tmp_path / "lora")[4:]


def test_added_tokens_start_at_the_mean_and_keep_the_head_tied(tmp_path):
    import pydoc_data.topics

    from engine.data.sources import train_bpe
    from engine.config import ModelConfig

    tok = train_bpe(list(pydoc_data.topics.topics.values())[:20], 320)
    cfg = ModelConfig(name="gpt2-tiny")
    torch.manual_seed(0)
    base = model_lib.build(cfg, model_lib.resolve(cfg), tok)
    base.save_pretrained(tmp_path / "base")
    tok.save_pretrained(tmp_path / "base")

    pre = ModelConfig(name=str(tmp_path / "base"))
    tok2 = model_lib_tokenizer(tmp_path / "base")
    old = len(tok2)
    assert transfer.add_tokens(tok2, ["frobnicate", "<|sep|>"]) == 2
    assert tok2("frobnicate it", add_special_tokens=False)["input_ids"][0] == old
    grown = model_lib.build(pre, model_lib.resolve(pre), tok2)
    wte = grown.get_input_embeddings().weight
    assert wte.shape[0] == old + 2 and grown.config.vocab_size == old + 2
    mean = base.get_input_embeddings().weight.mean(0)
    assert torch.allclose(wte[old:], mean.expand(2, -1), atol=1e-7)
    assert torch.equal(wte[:old], base.get_input_embeddings().weight)
    assert grown.lm_head.weight.data_ptr() == wte.data_ptr()  # still tied

    run_dir = tmp_path / "run"
    run(tiny_config(run_dir, **{"model.name": tmp_path / "base", "data.add_tokens": "frobnicate,<|sep|>",
                                "train.max_steps": 2, "train.sample_tokens": 0}))
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(run_dir / "final")
    assert hf.get_input_embeddings().weight.shape[0] == old + 2
    assert hf.lm_head.weight.data_ptr() == hf.get_input_embeddings().weight.data_ptr()
    assert model_lib_tokenizer(run_dir / "final").convert_tokens_to_ids("frobnicate") == old


def model_lib_tokenizer(path):
    from engine.data.sources import load_tokenizer

    return load_tokenizer(str(path))


def test_early_stopping_stops_at_the_expected_step_and_keeps_best(tmp_path):
    """Evaluations at steps 0, 2, 4, ...; with min_delta too large for any later one to count, step 0 is
    the best and two evaluations without improvement (steps 2 and 4) stop the run at step 4."""
    run_dir = tmp_path / "early"
    over = {"train.max_steps": 20, "train.eval_every": 2, "eval.metric": "loss", "eval.patience": 2,
            "eval.min_delta": 1e6, "train.sample_tokens": 0}
    seen = {}
    run(tiny_config(run_dir, **over), lambda t: seen.update(snapshot(t.backend.module.hf)))
    rows = read_metrics(run_dir)
    assert max(r["step"] for r in rows if "loss" in r) == 4
    assert [r["step"] for r in rows if "eval_loss" in r] == [0, 2, 4]
    assert (run_dir / "checkpoints/step-000004").is_dir() and (run_dir / "final").is_dir()
    state = json.loads((run_dir / "checkpoints/step-000004/trainer_state.json").read_text())
    assert state["best"] == {"best": rows[0]["eval_loss"], "best_step": 0, "bad_evals": 2, "stopped": True,
                             "metric": "eval_loss"}
    best = load_file(str(run_dir / "best/model.safetensors"))  # the weights before training
    assert all(torch.equal(best[k], seen[k]) for k in best if k in seen)
    final = load_file(str(run_dir / "final/model.safetensors"))
    assert any(not torch.equal(best[k], final[k]) for k in best)
    assert json.loads((run_dir / "eval/step-000004.json").read_text())["eval_loss"] == rows[-1]["eval_loss"]
    again = run(tiny_config(run_dir, **over))  # a stopped run stays stopped
    assert again.step == 4 and max(r["step"] for r in read_metrics(run_dir) if "loss" in r) == 4


@pytest.mark.parametrize("case", ["no-peft", "no-validation-split", "too-many-blocks"])
def test_fine_tuning_usage_errors_need_the_data_or_the_model(case, tmp_path, monkeypatch, capsys):
    """Problems that show only with the data or the model: still exit 2, one message, nothing written."""
    import sys

    from engine.cli import main
    from tests.conftest import tiny_overrides

    over, expected = {
        "no-peft": ({"model.lora_rank": 4}, "model.lora_rank needs the peft package: pip install 'ftl-engine[lora]'"),
        "no-validation-split": ({"eval.metric": "loss", "data.val_fraction": 0},
                                "eval.metric=loss needs a validation split"),
        "too-many-blocks": ({"model.freeze": "blocks:3"}, "model.freeze asks for blocks:3 but the model has 2 blocks"),
    }[case]
    if case == "no-peft":
        monkeypatch.setitem(sys.modules, "peft", None)  # what `import peft` meets where it is not installed
    with pytest.raises(SystemExit) as e:
        main(["train", *tiny_overrides(tmp_path / "run", **over)])
    err = capsys.readouterr().err
    assert e.value.code == 2 and expected in err, err
    assert "Traceback" not in err and not (tmp_path / "run").exists()
