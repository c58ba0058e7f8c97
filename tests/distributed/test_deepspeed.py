"""DeepSpeed ZeRO on 2 CPU ranks (gloo, real DeepSpeed, real torchrun and deepspeed launchers).

One global batch, split world=2 x micro=2 x accum=2, must give the loss trajectory and final weights of DDP with
the same split and of one process with micro=8, at every ZeRO stage and with CPU offload (invariant 1). Unpacked
documents of very different lengths make the target counts uneven across micro-batches and ranks, so DeepSpeed's
own 1/gradient_accumulation_steps scaling, or any per-micro-batch averaging, would show.

Each training run is a subprocess shared by the tests below (module-scoped, started on first use): the stage-1
and stage-3 runs also save at step 2 for the resume tests, the stage-3 run carries the memory and export checks,
and the stage-3 offload run is started by the `deepspeed` launcher instead of torchrun.
"""

from __future__ import annotations

import json
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import (check, env_for_subprocess, free_port, read_metrics, run_ftl, tiny_config, tiny_overrides,
                            torchrun, train_losses)
from tests.fault_helpers import final_weights, grad_norms, memory_row

# fp32 on CPU: the splits differ only in summation order (per-micro-batch reduce-scatter at stages 2-3, gloo
# all-reduce, accumulation order). Measured on this model: losses agree to 2.4e-7 relative, weights to 2.3e-7,
# grad norms to 1.6e-7, for every stage. optim.eps=1e-6 as in test_grad_accum_equivalence: with 1e-8 Adam turns
# the ~1e-10 noise of mathematically-zero gradients (the attention key bias) into full-size updates.
LOSS_RTOL = 1e-5
NORM_RTOL = 1e-5
WEIGHT_ATOL = 1e-6
STEPS = 4

SCENARIOS = {
    # name: (zero_stage, offload, launcher, extra overrides)
    "zero0": (0, "none", "torchrun", {}),
    "zero1": (1, "none", "torchrun", {"checkpoint.every": 2}),
    "zero2": (2, "none", "torchrun", {}),
    "zero3": (3, "none", "torchrun", {"checkpoint.every": 2}),
    "zero2_offload": (2, "cpu", "torchrun", {}),
    "zero3_offload": (3, "cpu", "deepspeed", {}),
}


def split_overrides(corpus: Path, micro: int, accum: int, **extra) -> dict:
    return {"data.source": str(corpus), "data.pack": "false", "data.seq_len": 48, "data.val_fraction": 0.1,
            "train.micro_batch": micro, "train.grad_accum": accum, "train.max_steps": STEPS, "train.sample_tokens": 0,
            "optim.lr": 3e-3, "optim.eps": 1e-6, "train.clip_grad": 0.5, **extra}


def deepspeed_launch(nproc: int, args: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
    """`deepspeed --num_gpus N $(which ftl) train ...` (the module form when no `ftl` script is installed)."""
    ftl = Path(sys.executable).parent / "ftl"
    target = [str(ftl)] if ftl.is_file() else ["--module", "engine.cli"]
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(nproc), "--master_port",
           str(free_port()), *target, *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env_for_subprocess())


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """tests/conftest.py's variable_length_corpus, once for the module."""
    import pydoc_data.topics

    texts = list(pydoc_data.topics.topics.values())
    path = tmp_path_factory.mktemp("ds_corpus") / "docs.jsonl"
    with open(path, "w") as f:
        for i, t in enumerate(texts[:64]):
            f.write(json.dumps({"text": t[: 20 + (i * 37) % 400]}) + "\n")
    return path


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("ds_runs")


@pytest.fixture(scope="module")
def single(root, corpus) -> Path:
    """The reference: one process, micro=8, the DDP code path (in this process)."""
    from engine.trainer import Trainer

    run_dir = root / "single"
    trainer = Trainer(tiny_config(run_dir, **split_overrides(corpus, 8, 1)), progress=False)
    try:
        trainer.train()
    finally:
        trainer.close()
    return run_dir


@pytest.fixture(scope="module")
def ddp(root, corpus) -> Path:
    run_dir = root / "ddp"
    check(torchrun(2, ["train", "--no-progress", *tiny_overrides(run_dir, **split_overrides(corpus, 2, 2))]))
    return run_dir


@pytest.fixture(scope="module")
def runs(root, corpus):
    """name -> run directory of that DeepSpeed scenario, trained on first request."""
    done: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in done:
            stage, offload, launcher, extra = SCENARIOS[name]
            run_dir = root / name
            args = ["train", "--no-progress", *tiny_overrides(run_dir, **split_overrides(
                corpus, 2, 2, **{"dist.backend": "deepspeed", "dist.zero_stage": stage, "dist.offload": offload},
                **extra))]
            proc = deepspeed_launch(2, args) if launcher == "deepspeed" else torchrun(2, args)
            check(proc)
            assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
            done[name] = run_dir
        return done[name]

    return get


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_zero_matches_ddp_and_a_single_process(name, runs, single, ddp):
    run_dir = runs(name)
    ref_losses = train_losses(single)
    assert len(ref_losses) == STEPS and ref_losses[-1] < ref_losses[0]  # it trained
    assert (run_dir / "tokenizer/tokenizer.json").read_text() == (single / "tokenizer/tokenizer.json").read_text()
    for ref in (single, ddp):
        assert train_losses(run_dir) == pytest.approx(train_losses(ref), rel=LOSS_RTOL), ref.name
        assert grad_norms(run_dir) == pytest.approx(grad_norms(ref), rel=NORM_RTOL), ref.name
        w, rw = final_weights(run_dir), final_weights(ref)
        assert w.keys() == rw.keys()
        worst = max(float((rw[k] - w[k]).abs().max()) for k in rw)
        assert worst < WEIGHT_ATOL, f"{name} vs {ref.name}: max weight difference {worst:.3g}"
    # the checkpoint written at the end holds the same weights, rebuilt offline from the per-rank partitions
    from engine.backends.deepspeed import full_state_from_checkpoint

    offline = full_state_from_checkpoint(run_dir / "checkpoints" / f"step-{STEPS:06d}")
    w = final_weights(run_dir)
    assert set(w) <= set(offline) <= set(w) | {"lm_head.weight"}  # the tied head may be named too
    assert all(torch.equal(offline[k], w[k]) for k in w)
    assert torch.equal(offline.get("lm_head.weight", w["transformer.wte.weight"]), w["transformer.wte.weight"])


@pytest.fixture(scope="module")
def one_process(root, corpus) -> Path:
    """ZeRO-2 + CPU offload in one process without a launcher; it also saves at step 2 (the 1 -> 2 test)."""
    run_dir = root / "one_process_zero2_offload"
    check(run_ftl(["train", "--no-progress", *tiny_overrides(run_dir, **split_overrides(
        corpus, 8, 1, **{"dist.backend": "deepspeed", "dist.zero_stage": 2, "dist.offload": "cpu",
                         "checkpoint.every": 2}))]))
    return run_dir


def test_deepspeed_in_one_process_without_a_launcher(single, one_process):
    """`ftl train --set dist.backend=deepspeed` alone (ZeRO-Offload on one GPU is the common case): the backend
    makes a process group of one, and the run matches the DDP-path single process."""
    run_dir = one_process
    assert train_losses(run_dir) == pytest.approx(train_losses(single), rel=LOSS_RTOL)
    w, rw = final_weights(run_dir), final_weights(single)
    assert max(float((rw[k] - w[k]).abs().max()) for k in rw) < WEIGHT_ATOL


def test_memory_report_and_zero3_shards_parameters(runs, single):
    full = 4 * sum(v.numel() for v in final_weights(single).values())  # fp32 bytes of the whole model
    for name in ("zero1", "zero3"):
        row = memory_row(runs(name))
        assert row["backend"] == "deepspeed" and len(row["measured"]) == 2  # one entry per rank
        planned, measured = row["planned"], row["measured"]
        assert {"params", "grads", "optimizer"} <= planned.keys() and planned["zero_stage"] == int(name[-1])
        for rank in measured:
            if name == "zero3":
                # built under zero.Init: every module partitioned as it was made, no whole weight left behind
                assert rank["params_at_build"] == 0, rank
                # about 1/world of the model: the partitions, plus the few small vectors ZeRO-3 keeps whole
                # (stage3_param_persistence_threshold = 10 x hidden)
                assert 0.45 * full <= rank["params"] <= 0.55 * full, (rank, full)
                assert 0.45 * full <= planned["params"] <= 0.55 * full
            else:  # stage 1 shards only optimizer state: every rank holds the whole model
                assert rank["params"] == full == planned["params"] == rank["params_at_build"]
            # Adam moments and the fp32 master copy are sharded at both stages: 12 bytes/param / world
            assert rank["optimizer"] <= 0.55 * 3 * full
            # the planned figures are what the ranks really hold
            for key in ("params", "optimizer"):
                assert rank[key] == pytest.approx(planned[key], rel=0.03), (key, rank, planned)


def test_zero3_export_is_complete_and_reloads_with_plain_transformers(runs, single, tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM

    run_dir = runs("zero3")
    final = run_dir / "final"
    model = AutoModelForCausalLM.from_pretrained(final).eval()
    config = AutoConfig.from_pretrained(final)
    with torch.device("meta"):
        expected = {k: v.shape for k, v in AutoModelForCausalLM.from_config(config).state_dict().items()}
    got = model.state_dict()
    assert got.keys() == expected.keys()
    for k, shape in expected.items():  # never the empty placeholders of a ZeRO-3 partition
        assert got[k].shape == shape and got[k].numel() > 0 and float(got[k].abs().sum()) > 0, k
    reference = AutoModelForCausalLM.from_pretrained(single / "final").eval()
    ids = torch.randint(0, config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(model(input_ids=ids).logits, reference(input_ids=ids).logits, atol=1e-4)
    # `ftl export` of the mid-run checkpoint: one offline process, no DeepSpeed engine, a verified HF directory
    out = tmp_path / "exported"
    check(run_ftl(["export", run_dir / "checkpoints" / "step-000002", "--out", out]))
    exported = AutoModelForCausalLM.from_pretrained(out).eval()
    assert exported.state_dict().keys() == expected.keys()
    with torch.no_grad():
        assert not torch.allclose(exported(input_ids=ids).logits, model(input_ids=ids).logits)  # step 2, not 4


@pytest.mark.parametrize("name", ["zero1", "zero3"])
def test_resume_continues_exactly(name, runs, root, corpus):
    uninterrupted = runs(name)
    stage = SCENARIOS[name][0]
    resumed = root / f"{name}_resumed"
    ckpt = uninterrupted / "checkpoints" / "step-000002"
    check(torchrun(2, ["train", "--no-progress", *tiny_overrides(resumed, **split_overrides(
        corpus, 2, 2, **{"dist.backend": "deepspeed", "dist.zero_stage": stage, "checkpoint.resume": ckpt}))]))
    later = [(r["step"], r["loss"]) for r in read_metrics(resumed) if "loss" in r]
    reference = [(r["step"], r["loss"]) for r in read_metrics(uninterrupted) if "loss" in r and r["step"] > 2]
    assert later == reference  # bitwise: same partitions, same optimizer state, same data position
    w, rw = final_weights(resumed), final_weights(uninterrupted)
    assert all(torch.equal(w[k], rw[k]) for k in rw)


def _resumed_matches(resumed: Path, reference: Path, first: int) -> None:
    got = {r["step"]: r["loss"] for r in read_metrics(resumed) if "loss" in r}
    ref = {r["step"]: r["loss"] for r in read_metrics(reference) if "loss" in r}
    assert sorted(got) == list(range(first, STEPS + 1))
    assert [got[s] for s in got] == pytest.approx([ref[s] for s in got], rel=LOSS_RTOL)
    w, rw = final_weights(resumed), final_weights(reference)
    worst = max(float((rw[k] - w[k]).abs().max()) for k in rw)
    assert worst < WEIGHT_ATOL, f"{resumed.name}: max weight difference {worst:.3g}"
    state = json.loads((resumed / "checkpoints" / f"step-{STEPS:06d}" / "trainer_state.json").read_text())
    assert state["sample_index"] == STEPS * 8  # the data continued from the saved global sample
    assert not list((resumed / "checkpoints").glob(".universal-*"))  # the conversion's scratch is gone


def test_zero3_checkpoint_of_two_ranks_resumes_on_one(runs, single, root, corpus):
    """World size 2 -> 1 at ZeRO-3: the per-rank partitions go through DeepSpeed's universal checkpoint."""
    resumed = root / "zero3_two_to_one"
    proc = check(run_ftl(["train", "--no-progress", *tiny_overrides(resumed, **split_overrides(
        corpus, 2, 4, **{"dist.backend": "deepspeed", "dist.zero_stage": 3,
                         "checkpoint.resume": runs("zero3") / "checkpoints" / "step-000002"}))]))
    assert "resuming a checkpoint written by 2 rank(s) on 1" in proc.stdout + proc.stderr
    _resumed_matches(resumed, runs("zero3"), first=3)
    _resumed_matches(resumed, single, first=3)


def test_one_process_zero2_checkpoint_resumes_on_two_ranks(one_process, single, root, corpus):
    """World size 1 -> 2 at ZeRO-2 with CPU offload."""
    resumed = root / "zero2_offload_one_to_two"
    proc = check(torchrun(2, ["train", "--no-progress", *tiny_overrides(resumed, **split_overrides(
        corpus, 2, 2, **{"dist.backend": "deepspeed", "dist.zero_stage": 2, "dist.offload": "cpu",
                         "checkpoint.resume": one_process / "checkpoints" / "step-000002"}))]))
    assert "resuming a checkpoint written by 1 rank(s) on 2" in proc.stdout + proc.stderr
    _resumed_matches(resumed, one_process, first=3)


@pytest.mark.parametrize("stage", [0, 2, 3])
def test_a_nan_step_is_skipped_at_every_stage(root, corpus, stage):
    """Stage 0 steps a plain torch optimizer that DeepSpeed does not guard: the engine skips the step. At
    stages 1-3 DeepSpeed's own overflow check skips it and the engine counts it. Either way the weights
    (and at stage 0 the Adam moments) of step 2 are those of step 1."""
    from engine.backends.deepspeed import full_state_from_checkpoint, safe_load

    run_dir = root / f"zero{stage}_nan"
    check(torchrun(2, ["train", "--no-progress", *tiny_overrides(run_dir, **split_overrides(
        corpus, 2, 2, **{"dist.backend": "deepspeed", "dist.zero_stage": stage, "checkpoint.every": 1,
                         "checkpoint.keep": 5}))], FTL_FAULT_INJECT="nan@step=2,rank=1"))
    ckpt = {s: run_dir / "checkpoints" / f"step-{s:06d}" for s in (1, 2, 3)}
    weights = {s: full_state_from_checkpoint(p) for s, p in ckpt.items()}
    assert all(torch.equal(weights[1][k], weights[2][k]) for k in weights[1])  # skipped: untouched
    assert not any(torch.equal(weights[2][k], weights[3][k]) for k in ("transformer.wte.weight",))  # trains on
    rows = {r["step"]: r for r in read_metrics(run_dir) if "loss" in r}
    assert rows[2]["skipped_steps"] == 1 and "skipped_steps" not in rows[3]
    if stage:
        return
    moments = {}
    for s in (1, 2):
        tag = json.loads((ckpt[s] / "deepspeed" / "layout.json").read_text())["tag"]
        opt = safe_load(ckpt[s] / "deepspeed" / tag / "mp_rank_00_model_states.pt")["optimizer"]["state"]
        moments[s] = [t for st in opt.values() for t in st.values()]
    assert len(moments[1]) > 0 and all(torch.equal(a, b) for a, b in zip(moments[1], moments[2]))


@pytest.fixture(scope="module")
def sentiment(tmp_path_factory) -> Path:
    rng = random.Random(0)
    good = "bright calm clean fresh gentle happy kind lovely nice warm".split()
    bad = "awful broken cold dirty grim harsh nasty rotten sad ugly".split()
    path = tmp_path_factory.mktemp("ds_cls") / "reviews.jsonl"
    with open(path, "w") as f:
        for i in range(64):
            label = "pos" if i % 2 else "neg"
            f.write(json.dumps({"text": " ".join(rng.choices(good if label == "pos" else bad, k=rng.randint(3, 12))),
                                "label": label}) + "\n")
    return path


def test_zero3_cls_head_from_a_pretrained_directory(single, sentiment, root):
    """ZeRO-3 loads a saved model module by module (transformers' integration), adds a cls head, and its
    export reloads as a sequence classifier that gives the checkpoint's logits."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from engine.backends.deepspeed import full_state_from_checkpoint

    run_dir = root / "zero3_cls"
    proc = check(torchrun(2, ["train", "--no-progress", *tiny_overrides(run_dir, **{
        "model.name": single / "final", "model.head": "cls", "data.source": sentiment, "data.val_fraction": 0.25,
        "train.micro_batch": 4, "train.max_steps": 3, "optim.lr": 3e-3, "dist.backend": "deepspeed",
        "dist.zero_stage": 3})]))
    # the run's own check: the sharded engine model (gathered on every rank) against final/ reloaded
    checked = re.search(r"export check: final/ reloaded by plain transformers gives the engine's logits "
                        r"\(max \|diff\| (\S+)\)", proc.stdout + proc.stderr)
    assert checked and float(checked.group(1)) <= 1e-4, proc.stderr[-3000:]
    # from_pretrained under ZeRO-3 (transformers' zero.Init path): no rank kept a whole weight when built
    assert [r["params_at_build"] for r in memory_row(run_dir)["measured"]] == [0, 0]
    final = run_dir / "final"
    model = AutoModelForSequenceClassification.from_pretrained(final).eval()
    assert model.config.id2label == {0: "neg", 1: "pos"}
    assert model.score.weight.shape == (2, model.config.n_embd) and float(model.score.weight.detach().abs().sum()) > 0
    # the body is the pretrained one, moved by 3 small steps, not a fresh initialization
    base = load_file(str(single / "final" / "model.safetensors"))["transformer.wpe.weight"]
    assert float((model.transformer.wpe.weight.detach() - base).abs().max()) < 0.02
    # the checkpoint, rebuilt offline, is exactly the export
    state = full_state_from_checkpoint(run_dir / "checkpoints" / "step-000003")
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    tok = AutoTokenizer.from_pretrained(final)
    batch = tok(["happy kind warm", "awful cold rotten grim"], return_tensors="pt", padding=True)
    assert [r for r in read_metrics(run_dir) if "eval_accuracy" in r]
    with torch.no_grad():
        logits = model(**batch).logits
    assert logits.shape == (2, 2) and torch.isfinite(logits).all()


def test_a_world_size_contradiction_stops_every_rank_with_exit_2(root, corpus, tmp_path):
    ds_json = tmp_path / "mine.json"
    ds_json.write_text(json.dumps({"train_batch_size": 24, "zero_optimization": {"stage": 2}}))  # 2 x 2 x 2 = 8
    run_dir = root / "contradiction"
    proc = torchrun(2, ["train", "--no-progress", *tiny_overrides(run_dir, **split_overrides(
        corpus, 2, 2, **{"dist.backend": "deepspeed", "dist.ds_config": ds_json}))])
    assert "exitcode: 2" in proc.stderr, proc.stderr[-3000:]
    assert proc.stderr.count("train_batch_size=24 contradicts train.micro_batch x train.grad_accum x world=8 "
                             "(2 x 2 x 2 ranks)") == 1  # one message for the job, not one per rank
    assert "Traceback (most recent call last)" not in proc.stderr.split("torch/distributed/elastic")[0]
    assert not run_dir.exists()


def test_every_rank_rejects_the_same_json_before_any_collective(tmp_path):
    from engine.backends.deepspeed import DeepSpeedBackend
    from engine.dist import DistEnv
    from engine.errors import UsageError

    ds_json = tmp_path / "mine.json"
    ds_json.write_text(json.dumps({"train_batch_size": 24}))
    cfg = tiny_config(tmp_path / "run", **{"dist.backend": "deepspeed", "dist.ds_config": ds_json,
                                           "train.micro_batch": 2, "train.grad_accum": 2})
    messages = []
    for rank in (0, 1):  # no process group exists here: the check needs none, so no rank can wait on another
        with pytest.raises(UsageError) as e:
            DeepSpeedBackend(cfg, DistEnv(rank=rank, local_rank=rank, world_size=2, local_world_size=2))
        messages.append(e.value.render())
    assert messages[0] == messages[1] and "train_batch_size=24 contradicts" in messages[0]
