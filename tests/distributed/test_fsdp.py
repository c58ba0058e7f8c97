"""FSDP2 (dist.backend=fsdp) on gloo CPU ranks: real torchrun, real DCP checkpoints, real transformers reloads.

One global batch of unpacked documents of very different lengths (uneven target counts per micro-batch and
rank), split world=2 x micro=2 x accum=2, must give the losses, gradient norms and final weights of one
process with micro=8 and of DeepSpeed ZeRO-3 with the same split (invariant 1), for every way FSDP can run.
Each launch carries several properties, to keep the suite short:

    fsdp          defaults (every group reshards after forward, reduce-scatter every micro-batch): parity from
                  the first step, initial weights, memory ~1/world with params_at_build 0, final/ and the
                  offline DCP reader, `ftl export` of the step-2 checkpoint, which also resumes on 1 rank
    one_process   fsdp without a launcher (a process group of one): parity; it saves at step 2
    fsdp_zero2    reshard_after_forward=false + dist.offload=cpu + fsdp_grad_sync=step + activation
                  checkpointing on 2 ranks, resuming one_process's step-2 checkpoint (1 -> 2 ranks):
                  parity of steps 3-4, and where the optimizer state lives
    hsdp          4 ranks on a 2 x 2 mesh (dist.fsdp_replicate=2): parity and initial weights, the mesh; its
                  step-2 checkpoint resumes in one process (mesh 2 x 2 -> 1)
    killed        SIGKILL to every process in the middle of the step-3 save: no usable-looking checkpoint is
                  left; the same run directory then resumes on 2 ranks (checkpoint.resume=auto) from step 2
                  and must repeat fsdp's steps 3-4 bit for bit
"""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import pytest
import torch

from tests.conftest import check, read_metrics, run_ftl, tiny_config, tiny_overrides, torchrun, train_losses
from tests.fault_helpers import Watched, final_weights, grad_norms, memory_row, torchrun_cmd

# fp32 on CPU: the splits differ only in summation order. Measured on this model (2026-12-02): losses agree to
# 2e-7 relative, gradient norms to 3e-7, weights to 3e-7 absolute. optim.eps=1e-6 as in the other parity tests:
# with 1e-8 Adam turns the ~1e-10 noise of mathematically-zero gradients (the attention key bias) into full steps.
LOSS_RTOL = 1e-6
NORM_RTOL = 1e-5
WEIGHT_ATOL = 1e-6
STEPS = 4

SCENARIOS = {
    # name: (ranks, overrides)
    "fsdp": (2, {"checkpoint.every": 2}),
    "hsdp": (4, {"dist.fsdp_replicate": 2, "train.micro_batch": 1, "checkpoint.every": 2}),
}
ZERO2_LIKE = {"dist.reshard_after_forward": False, "dist.offload": "cpu", "dist.fsdp_grad_sync": "step",
              "model.gradient_checkpointing": True}


def split_overrides(corpus: Path, micro: int, accum: int, **extra) -> dict:
    return {"data.source": str(corpus), "data.pack": "false", "data.seq_len": 48, "data.val_fraction": 0.1,
            "train.micro_batch": micro, "train.grad_accum": accum, "train.max_steps": STEPS, "train.sample_tokens": 0,
            "optim.lr": 3e-3, "optim.eps": 1e-6, "train.clip_grad": 0.5, **extra}


def fsdp_args(run_dir: Path, corpus: Path, micro: int = 2, accum: int = 2, **extra) -> list[str]:
    return ["train", "--no-progress", *tiny_overrides(run_dir, **split_overrides(
        corpus, micro, accum, **{"dist.backend": "fsdp", **extra}))]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    import pydoc_data.topics

    texts = list(pydoc_data.topics.topics.values())
    path = tmp_path_factory.mktemp("fsdp_corpus") / "docs.jsonl"
    with open(path, "w") as f:
        for i, t in enumerate(texts[:64]):
            f.write(json.dumps({"text": t[: 20 + (i * 37) % 400]}) + "\n")
    return path


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fsdp_runs")


def _train_in_process(run_dir: Path, **overrides) -> Path:
    from engine.trainer import Trainer

    trainer = Trainer(tiny_config(run_dir, **overrides), progress=False)
    try:
        trainer.train()
    finally:
        trainer.close()
    return run_dir


@pytest.fixture(scope="module")
def single(root, corpus) -> Path:
    """The reference: one process, micro=8, the DDP code path."""
    return _train_in_process(root / "single", **split_overrides(corpus, 8, 1))


@pytest.fixture(scope="module")
def zero3(root, corpus) -> Path:
    run_dir = root / "zero3"
    check(torchrun(2, ["train", "--no-progress", *tiny_overrides(run_dir, **split_overrides(
        corpus, 2, 2, **{"dist.backend": "deepspeed", "dist.zero_stage": 3}))]))
    return run_dir


@pytest.fixture(scope="module")
def runs(root, corpus):
    done: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in done:
            ranks, extra = SCENARIOS[name]
            micro = extra.pop("train.micro_batch", 2)
            run_dir = root / name
            proc = check(torchrun(ranks, fsdp_args(run_dir, corpus, micro, 8 // (ranks * micro), **extra),
                                  timeout=600))
            assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
            done[name] = run_dir
        return done[name]

    return get


def assert_same_run(run_dir: Path, ref: Path, loss_rtol: float = LOSS_RTOL) -> None:
    assert train_losses(run_dir) == pytest.approx(train_losses(ref), rel=loss_rtol), ref.name
    assert grad_norms(run_dir) == pytest.approx(grad_norms(ref), rel=NORM_RTOL), ref.name
    w, rw = final_weights(run_dir), final_weights(ref)
    assert w.keys() == rw.keys()
    worst = max(float((rw[k] - w[k]).abs().max()) for k in rw)
    assert worst < WEIGHT_ATOL, f"{run_dir.name} vs {ref.name}: max weight difference {worst:.3g}"


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_fsdp_matches_one_process_and_zero3(name, runs, single, zero3):
    run_dir = runs(name)
    ref_losses = train_losses(single)
    assert len(ref_losses) == STEPS and ref_losses[-1] < ref_losses[0]  # it trained
    for ref in (single, zero3):
        assert_same_run(run_dir, ref)
    # the model it started from is one process's: the evaluation before the first step agrees
    before = [r["eval_loss"] for r in read_metrics(run_dir) if r["step"] == 0 and "eval_loss" in r]
    ref_before = [r["eval_loss"] for r in read_metrics(single) if r["step"] == 0 and "eval_loss" in r]
    assert before == pytest.approx(ref_before, rel=1e-6)


def test_memory_is_sharded_and_nothing_whole_is_built(runs, single):
    """Parameters, gradients and optimizer state per rank are half of what the DDP process holds (2 ranks,
    reshard after forward, the default sync); no rank held a whole weight after construction."""
    ddp = memory_row(single)["measured"][0]
    row = memory_row(runs("fsdp"))
    assert row["backend"] == "fsdp" and len(row["measured"]) == 2
    full = 4 * sum(v.numel() for v in final_weights(single).values())
    largest = 4 * max(v.numel() for v in final_weights(single).values())
    assert ddp["params"] == ddp["params_at_build"] >= full  # DDP: the whole (padded-vocabulary) model, as built
    for rank in row["measured"]:
        assert rank["params_at_build"] == 0, rank
        for key in ("params", "grads", "optimizer"):
            assert 0.49 <= rank[key] / ddp[key] <= 0.51, (key, rank[key], ddp[key])
            assert rank[key] == pytest.approx(row["planned"][key], rel=0.01), (key, rank, row["planned"])
        # construction replayed one tensor (and what it was computed from) at a time, never the model
        assert 0 < rank["init_peak_bytes"] <= 3 * largest < full, (rank["init_peak_bytes"], largest, full)
        assert rank["optimizer_device"] == rank["params_device"] == "cpu"


def test_checkpoint_is_dcp_and_final_is_its_full_model(runs, single, tmp_path):
    """The last checkpoint is a DCP directory written by both ranks; read back offline in this process (no
    process group) it is exactly final/; `ftl export` of the step-2 checkpoint gives a verified HF model."""
    from transformers import AutoModelForCausalLM

    from engine.backends.fsdp import full_state_from_checkpoint

    run_dir = runs("fsdp")
    ckpt = run_dir / "checkpoints" / f"step-{STEPS:06d}"
    files = sorted(p.name for p in (ckpt / "fsdp").iterdir())
    assert {".metadata", "__0_0.distcp", "__1_0.distcp", "layout.json"} <= set(files), files
    layout = json.loads((ckpt / "fsdp" / "layout.json").read_text())
    assert (layout["world_size"], layout["mesh"], layout["dtype"], layout["optimizer_state"]) == (2, [2], "float32", True)
    offline = full_state_from_checkpoint(ckpt)
    w = final_weights(run_dir)
    assert set(w) <= set(offline) <= set(w) | {"lm_head.weight"}
    assert all(torch.equal(offline[k][: w[k].shape[0]], w[k]) for k in w)  # the vocabulary padding is cut off
    out = tmp_path / "exported"
    proc = check(run_ftl(["export", run_dir / "checkpoints" / "step-000002", "--out", out]))
    assert "Traceback" not in proc.stderr
    exported = AutoModelForCausalLM.from_pretrained(out).eval()
    at_step_2 = full_state_from_checkpoint(run_dir / "checkpoints" / "step-000002")
    got = exported.state_dict()
    for k, v in got.items():
        assert torch.equal(v, at_step_2[k][: v.shape[0]]), k
    ids = torch.randint(0, exported.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    final = AutoModelForCausalLM.from_pretrained(run_dir / "final").eval()
    with torch.no_grad():
        assert not torch.allclose(exported(input_ids=ids).logits, final(input_ids=ids).logits)  # step 2, not 4


def test_hsdp_mesh_is_recorded(runs):
    run_dir = runs("hsdp")
    layout = json.loads((run_dir / "checkpoints" / f"step-{STEPS:06d}" / "fsdp" / "layout.json").read_text())
    assert (layout["world_size"], layout["mesh"]) == (4, [2, 2])
    row = memory_row(run_dir)
    assert row["planned"]["mesh"] == [2, 2] and len(row["measured"]) == 4
    fsdp_params = memory_row(runs("fsdp"))["measured"][0]["params"]
    assert all(r["params"] == fsdp_params for r in row["measured"])  # sharded over 2, replicated twice


def _resumed_matches(resumed: Path, reference: Path, first: int) -> None:
    got = {r["step"]: r["loss"] for r in read_metrics(resumed) if "loss" in r}
    ref = {r["step"]: r["loss"] for r in read_metrics(reference) if "loss" in r}
    assert sorted(got) == list(range(first, STEPS + 1))
    assert [got[s] for s in got] == pytest.approx([ref[s] for s in got], rel=LOSS_RTOL)
    w, rw = final_weights(resumed), final_weights(reference)
    worst = max(float((rw[k] - w[k]).abs().max()) for k in rw)
    assert worst < WEIGHT_ATOL, f"{resumed.name}: max weight difference {worst:.3g}"
    state = json.loads((resumed / "checkpoints" / f"step-{STEPS:06d}" / "trainer_state.json").read_text())
    assert state["sample_index"] == STEPS * 8


def test_two_ranks_resume_on_one(runs, single, root, corpus):
    """World 2 -> 1: DCP maps the two ranks' chunks onto one process's shards, Adam moments included."""
    resumed = _train_in_process(root / "fsdp_two_to_one", **split_overrides(corpus, 2, 4, **{
        "dist.backend": "fsdp", "checkpoint.resume": str(runs("fsdp") / "checkpoints" / "step-000002")}))
    _resumed_matches(resumed, runs("fsdp"), first=3)
    _resumed_matches(resumed, single, first=3)


def test_hsdp_checkpoint_resumes_in_one_process(runs, single, root, corpus):
    """Mesh 2 x 2 (4 ranks, each shard held by two replicas) -> one process: DCP reads each chunk once and maps
    it onto the new shards, Adam moments included."""
    resumed = _train_in_process(root / "hsdp_to_one", **split_overrides(corpus, 2, 4, **{
        "dist.backend": "fsdp", "checkpoint.resume": str(runs("hsdp") / "checkpoints" / "step-000002")}))
    _resumed_matches(resumed, runs("hsdp"), first=3)
    _resumed_matches(resumed, single, first=3)


@pytest.fixture(scope="module")
def one_process(root, corpus) -> Path:
    """fsdp in one process without a launcher (a process group of one); it saves at step 2."""
    return _train_in_process(root / "fsdp_one_process", **split_overrides(
        corpus, 2, 4, **{"dist.backend": "fsdp", "checkpoint.every": 2}))


@pytest.fixture(scope="module")
def zero2_like(root, corpus, one_process) -> Path:
    run_dir = root / "fsdp_zero2"
    proc = check(torchrun(2, fsdp_args(run_dir, corpus, **ZERO2_LIKE, **{
        "checkpoint.resume": one_process / "checkpoints" / "step-000002"}), timeout=600))
    assert "resuming a checkpoint written by 1 rank(s) on 2" in proc.stdout + proc.stderr
    return run_dir


def test_one_process_and_reshard_false_offload_step_sync_on_two_ranks_after_it(one_process, zero2_like, single, zero3):
    """One process matches from the first step; its step-2 checkpoint resumes on 2 ranks that keep the gathered
    weights to backward, offload everything to the CPU, reduce-scatter once per step and recompute each block,
    and steps 3-4 still match one process and ZeRO-3."""
    assert_same_run(one_process, single)
    for ref in (single, zero3, one_process):
        _resumed_matches(zero2_like, ref, first=3)
    assert grad_norms(zero2_like) == pytest.approx(grad_norms(single)[2:], rel=NORM_RTOL)


def test_offload_keeps_the_optimizer_state_on_the_cpu(zero2_like):
    """dist.offload=cpu: FSDP's CPUOffloadPolicy keeps parameter shards, gradients and the Adam moments in host
    memory (on a GPU machine the device then holds only the gathered weights of the running block; this
    CPU-only test checks the bookkeeping and the device of every state tensor; tests/gpu checks cuda vs cpu)."""
    row = memory_row(zero2_like)
    assert row["planned"]["offloaded"] == ["params", "grads", "optimizer"]
    for rank in row["measured"]:
        assert rank["optimizer_device"] == rank["params_device"] == "cpu"
        assert rank["grads"] == pytest.approx(row["planned"]["grads"], rel=0.01)  # the shards, at the update
    # fsdp_grad_sync=step: full-size gradients accumulate until the step's one reduce-scatter
    assert row["planned"]["grads_during_accumulation"] == pytest.approx(2 * row["planned"]["grads"], rel=0.01)


def test_kill_9_mid_save_leaves_no_usable_checkpoint_and_resume_is_bitwise(runs, root, corpus, tmp_path):
    """Step 3's save is stopped after the ranks wrote their DCP files and before COMPLETE, and every process
    gets SIGKILL. What is left must never be taken for a checkpoint; the run then resumes from step 2 on the
    same 2 ranks and repeats the uninterrupted run's steps 3-4 bit for bit (same shards, same optimizer state,
    same data position)."""
    from engine import checkpoint

    run_dir = root / "fsdp_killed"
    job = Watched(torchrun_cmd(2, fsdp_args(run_dir, corpus, **{"checkpoint.every": 1, "checkpoint.keep": 5})),
                  FTL_FAULT_INJECT="hang_save@step=3,rank=0")
    try:
        job.wait_for(r"FTL_FAULT hang_save rank 0 step 3", timeout=400)
        time.sleep(1)  # rank 1 reaches the barrier that waits for rank 0
        for p in job.descendants("engine.cli train"):
            p.send_signal(signal.SIGKILL)
        job.kill_tree()
    finally:
        job.wait(60)
    ckpts = run_dir / "checkpoints"
    torn = ckpts / ".tmp-step-000003"
    assert {".metadata", "__0_0.distcp", "__1_0.distcp"} <= {p.name for p in (torn / "fsdp").iterdir()}
    assert not checkpoint.is_complete(torn) and not (ckpts / "step-000003").exists()
    assert checkpoint.find_latest(ckpts) == ckpts / "step-000002"
    proc = run_ftl(["export", torn, "--out", tmp_path / "out"])
    assert proc.returncode == 2 and "not a complete checkpoint" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "out").exists()

    proc = check(torchrun(2, fsdp_args(run_dir, corpus)))  # checkpoint.resume=auto
    assert f"resumed from {ckpts / 'step-000002'} at step 2" in proc.stdout + proc.stderr
    assert not torn.exists()  # the next save cleared the torn directory
    uninterrupted = runs("fsdp")
    later = [(r["step"], r["loss"], r["grad_norm"]) for r in read_metrics(run_dir) if "loss" in r and r["step"] > 2]
    reference = [(r["step"], r["loss"], r["grad_norm"]) for r in read_metrics(uninterrupted) if "loss" in r and r["step"] > 2]
    assert later == reference
    w, rw = final_weights(run_dir), final_weights(uninterrupted)
    assert all(torch.equal(w[k], rw[k]) for k in rw)


def test_dcp_files_have_digests_and_a_corrupted_chunk_file_is_refused(runs, tmp_path):
    """Issue 12's digests cover the DCP files: each rank hashed the chunk file it wrote, rank 0 DCP's index and
    the layout; one flipped byte in rank 1's chunk file makes `ftl export` refuse the checkpoint (exit 2, the
    damaged file named, nothing written)."""
    import shutil

    ckpt = tmp_path / "step-000002"
    shutil.copytree(runs("fsdp") / "checkpoints" / "step-000002", ckpt)
    files = json.loads((ckpt / "MANIFEST.json").read_text())["files"]
    hashed_by = {name: files[f"fsdp/{name}"]["hashed_by"]
                 for name in ("__0_0.distcp", "__1_0.distcp", ".metadata", "layout.json")}
    assert hashed_by == {"__0_0.distcp": 0, "__1_0.distcp": 1, ".metadata": 0, "layout.json": 0}, hashed_by
    assert {f.relative_to(ckpt).as_posix() for f in (ckpt / "fsdp").iterdir()} <= set(files)
    shard = ckpt / "fsdp" / "__1_0.distcp"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    proc = run_ftl(["export", ckpt, "--out", tmp_path / "out"])
    assert proc.returncode == 2 and "damaged" in proc.stderr and "__1_0.distcp" in proc.stderr, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and not (tmp_path / "out").exists()
