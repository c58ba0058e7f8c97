"""Throughput benchmark: the engine's training step against baselines, side by side (`ftl bench`).

A grid over preset x backend (ddp, zeroN, zeroN-offload, fsdp, fsdp-offload) x micro-batch x sequence length x compile.
At each point, in this process and on this device, with the same model, token data, batch and precision:

  ours         the engine's own loop: `Trainer.train_step` fed by its prefetching `TrainBatches`
  ours-plain   (--ablate) the same with every fast-path switch off (engine/fastpath.py)
  torch        a plain hand-written PyTorch loop: HF GPT-2 -> logits -> mean CE / accum -> backward,
               clip, AdamW (fused on CUDA), zero_grad(set_to_none=True); torch.compile when compile=on
  hf           Hugging Face `Trainer` (with DeepSpeed for the ZeRO rows; not run for the fsdp rows)

Each is warmed up (`--warmup` steps, which includes compilation), then `--steps` optimizer steps are timed.
On CUDA the step boundaries are CUDA events (no sync inside the timed window); on CPU, wall time. `ours`
is timed as the training loop runs it (`_loop_step`: the step's guard, whose status read is the loop's one
host sync per step on CUDA, and the log-step read-back every train.log_every steps), not `train_step` alone.

Every implementation runs with its own settings: the process-wide switches one sets (TF32, cuDNN
autotuning, dynamo's caches) are restored after it (`isolated_settings`), so `ours-plain`'s TF32-off does
not leak into the baselines measured after it. A point where one implementation fails (a DeepSpeed op that
does not build, an error in a baseline) records that implementation as failed with its error and the grid
goes on; out-of-memory is recorded the same way.
Reported per implementation: median step time, tokens/s (= world x micro_batch x grad_accum x seq_len
per step / median step time), MFU (`engine.metrics`: 6N + 12*L*H*Q*T FLOPs per token over the device's
peak dense bf16 FLOP/s; null on CPU), peak GPU memory (max_memory_allocated), host RSS; and the ratio
of ours to each baseline. Output: a table on stdout, `throughput.json`, `throughput.md`, `throughput.png`.

The data is random token ids of GPT-2's vocabulary (`--vocab`), written once as a JSONL corpus and
tokenized by a word-level tokenizer, so the engine runs its normal data path.
"""

from __future__ import annotations

import contextlib
import datetime
import gc
import importlib.metadata
import json
import math
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from engine.errors import UsageError

EOS = "<|endoftext|>"
IMPLS = ("ours", "ours-plain", "torch", "hf")
# every fast-path switch off: what --ablate compares against
PLAIN_OVERRIDES = {"perf.pad_vocab_to": 1, "perf.chunked_ce": False, "perf.causal_body": False,
                   "perf.fused_gelu": False, "perf.tf32": False, "optim.fused": False}


@dataclass(frozen=True)
class Point:
    preset: str
    backend: str  # ddp | zero0..zero3 | zeroN-offload | fsdp | fsdp-offload
    micro_batch: int
    seq_len: int
    compile: bool
    grad_accum: int = 1

    @property
    def label(self) -> str:
        c = "+compile" if self.compile else ""
        return f"{self.preset} {self.backend}{c} mb{self.micro_batch}x{self.grad_accum} T{self.seq_len}"


@dataclass
class Options:
    steps: int = 10
    warmup: int = 3
    precision: str = "auto"
    baselines: tuple[str, ...] = ("torch", "hf")
    ablate: bool = False
    vocab: int = 50257
    out: Path = Path("benchmarks/out")
    overrides: tuple[str, ...] = ()
    gradient_checkpointing: str = "auto"  # auto: on for gpt2-large / gpt2-xl
    profile: bool = False
    command: str = ""
    extra: dict = field(default_factory=dict)


QUICK = dict(presets=["gpt2-tiny"], backends=["ddp"], micro_batches=[4], seq_lens=[32], compiles=[False],
             grad_accum=2, steps=5, warmup=2, vocab=512, ablate=True)
CHECKPOINTED_PRESETS = {"gpt2-large", "gpt2-xl"}


def parse_backend(name: str) -> dict:
    """`ddp`, `zero0`..`zero3`, `zero2-offload`, `zero3-offload`, `fsdp`, `fsdp-offload` -> config overrides."""
    if name == "ddp":
        return {"dist.backend": "ddp"}
    if name in ("fsdp", "fsdp-offload"):
        return {"dist.backend": "fsdp", **({"dist.offload": "cpu"} if name == "fsdp-offload" else {})}
    base, _, offload = name.partition("-")
    if base.startswith("zero") and base[4:].isdigit() and int(base[4:]) in (0, 1, 2, 3) and offload in ("", "offload"):
        out = {"dist.backend": "deepspeed", "dist.zero_stage": int(base[4:])}
        if offload:
            out["dist.offload"] = "cpu"
        return out
    raise UsageError(f"unknown backend {name!r}: use ddp, zero0, zero1, zero2, zero3, zero2-offload, zero3-offload, "
                     f"fsdp or fsdp-offload")


def deepspeed_backend_available() -> bool:
    try:
        import engine.backends.deepspeed  # noqa: F401
    except ImportError:
        return False
    return True


# ----------------------------------------------------------------------------------------------- data

def make_tokenizer(vocab: int, directory: Path):
    """A word-level tokenizer over `t0 .. t{vocab-2}` plus EOS at id vocab-1 (GPT-2's layout)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    if (directory / "tokenizer.json").is_file():
        return directory
    words = {f"t{i}": i for i in range(vocab - 1)}
    words[EOS] = vocab - 1
    tok = Tokenizer(models.WordLevel(words, unk_token=EOS))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, bos_token=EOS, unk_token=EOS, pad_token=EOS)
    fast.save_pretrained(directory)
    return directory


def make_corpus(path: Path, vocab: int, tokens: int, seed: int = 0) -> Path:
    """Random-token documents (4096 tokens each) as JSONL; reused when already large enough."""
    marker = path.with_suffix(".tokens")
    if path.is_file() and marker.is_file() and int(marker.read_text()) >= tokens:
        return path
    rng = np.random.default_rng(seed)
    doc = 4096
    with open(path, "w", encoding="utf-8") as f:
        for _ in range(-(-tokens // doc)):
            ids = rng.integers(0, vocab - 1, size=doc)
            f.write(json.dumps({"text": " ".join(f"t{i}" for i in ids)}) + "\n")
    marker.write_text(str(tokens))
    return path


# --------------------------------------------------------------------------------------------- timing

class StepClock:
    """Step boundaries: CUDA events on GPU (read after one sync at the end), perf_counter on CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.marks: list = []

    def mark(self) -> None:
        if self.cuda:
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            self.marks.append(e)
        else:
            self.marks.append(time.perf_counter())

    def durations(self) -> list[float]:
        if self.cuda:
            torch.cuda.synchronize()
            return [a.elapsed_time(b) / 1e3 for a, b in zip(self.marks, self.marks[1:])]
        return [b - a for a, b in zip(self.marks, self.marks[1:])]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _reset_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _rss_mib() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


class RssPeak:
    """Peak resident set size of this process while the block runs, sampled every few ms on a thread
    (the CPU counterpart of max_memory_allocated: large buffers are returned to the OS when freed, so
    the RSS after a step says little about the step's peak)."""

    def __init__(self, interval_s: float = 0.005):
        import threading

        self.interval, self.peak = interval_s, 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="ftl-bench-rss")

    def _run(self) -> None:
        import psutil

        proc = psutil.Process()
        while not self._stop.is_set():
            self.peak = max(self.peak, proc.memory_info().rss / 2**20)
            self._stop.wait(self.interval)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss_mib())


def _summary(durations: list[float], tokens_per_step: int, fpt: float, peak: float | None, world: int,
             device: torch.device, loss: float | None = None, rss_peak: float | None = None) -> dict:
    step = statistics.median(durations)
    tps = tokens_per_step / step
    return {
        "step_time_ms": step * 1e3,
        "step_time_ms_min": min(durations) * 1e3,
        "step_time_ms_max": max(durations) * 1e3,
        "tokens_per_s": tps,
        "mfu": tps * fpt / (peak * world) if peak else None,
        "peak_gpu_mib": torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None,
        "rss_mib": _rss_mib(),
        "rss_peak_mib": rss_peak,
        "timed_steps": len(durations),
        "loss": loss,
    }


# ----------------------------------------------------------------------------------- settings isolation

def settings_snapshot() -> dict:
    """The process-wide switches that change a measurement, as they are now."""
    from engine import fastpath

    matmul, conv = fastpath.tf32_state()
    return {"float32_matmul_precision": matmul, "cudnn_tf32": conv, "cudnn_benchmark": torch.backends.cudnn.benchmark}


@contextlib.contextmanager
def isolated_settings():
    """Run one implementation's measurement and put the process-wide switches back afterwards."""
    from engine import fastpath

    tf32 = fastpath.tf32_state()
    benchmark = torch.backends.cudnn.benchmark
    try:
        yield
    finally:
        fastpath.restore_tf32(tf32)
        torch.backends.cudnn.benchmark = benchmark
        _dynamo_reset()


# ------------------------------------------------------------------------------------------ our loop

def engine_config(point: Point, opts: Options, run_dir: Path, corpus: Path, tokenizer_dir: Path, extra: dict):
    from engine.config import load_config

    checkpointing = (point.preset in CHECKPOINTED_PRESETS if opts.gradient_checkpointing == "auto"
                     else opts.gradient_checkpointing == "on")
    values = {
        "run.dir": str(run_dir), "run.seed": 1234,
        "model.name": point.preset, "model.init": "random", "model.compile": point.compile,
        "model.gradient_checkpointing": checkpointing,
        "data.source": str(corpus), "data.tokenizer": str(tokenizer_dir), "data.seq_len": point.seq_len,
        "data.val_fraction": 0.0,
        "train.micro_batch": point.micro_batch, "train.grad_accum": point.grad_accum,
        "train.max_steps": opts.warmup + opts.steps, "train.precision": opts.precision, "train.eval_every": 0,
        "train.sample_tokens": 0, "optim.warmup_steps": 1, "checkpoint.resume": "none",
        **parse_backend(point.backend), **extra,
    }
    sets = [f"{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in values.items()] + list(opts.overrides)
    return load_config(None, sets)


class LoopWindow:
    """The loop's per-step bookkeeping between log steps (Trainer.train): summed loss and targets on the device."""

    def __init__(self, device: torch.device):
        self.loss = torch.zeros(2, device=device)


def _loop_step(trainer, window: LoopWindow, last: bool):
    """One step exactly as `Trainer.train` runs it, minus evaluation and checkpoints: the guard's begin, the
    step, the guard's end (on CUDA it reads the previous step's status back: the loop's per-step host sync)
    and, every train.log_every steps, the window's read-back. Returns the step's (loss sum, target count)."""
    from engine import dist

    trainer.fault.step_begins(trainer.step + 1)
    loss_sum, count, _, grad_norm, _ = trainer.train_step(trainer.batches.next())
    trainer.step += 1
    window.loss += torch.stack([loss_sum, count])
    trainer.fault.step_ends(trainer.step, grad_norm, final=last)
    if trainer.step % trainer.cfg.train.log_every == 0 or last:
        dist.all_reduce_sum(window.loss)
        window.loss.tolist()
        window.loss.zero_()
    return loss_sum, count


def measure_ours(point: Point, opts: Options, env, corpus: Path, tokenizer_dir: Path, extra: dict | None = None):
    """(result, trainer facts) for the engine's loop; the trainer is closed before returning."""
    from engine import dist
    from engine.trainer import Trainer

    run_dir = _run_dir(opts, env)
    cfg = engine_config(point, opts, run_dir, corpus, tokenizer_dir, extra or {})
    _reset_memory(env.device)
    trainer = Trainer(cfg, env=env, progress=False)
    try:
        clock, rss = StepClock(env.device), RssPeak()
        window = LoopWindow(env.device)
        total = opts.warmup + opts.steps
        for i in range(total):
            if i == opts.warmup:
                _sync(env.device)
                rss.__enter__()
                clock.mark()
            loss_sum, count = _loop_step(trainer, window, last=i == total - 1)
            if i >= opts.warmup:
                clock.mark()
        rss.__exit__()
        loss = loss_sum / count.clamp(min=1)
        durations = clock.durations()
        _sync(env.device)
        from engine import metrics

        fpt = trainer.flops_per_token
        facts = {"fpt": fpt, "n_params": trainer.n_params, "hf_config": trainer.hf_config, "data": trainer.data,
                 "layout": trainer.layout, "precision": cfg.train.precision, "cfg": cfg}
        tokens = env.world_size * point.micro_batch * point.grad_accum * point.seq_len
        result = _summary(durations, tokens, fpt, metrics.peak_flops(env.device), env.world_size, env.device,
                          float(loss), rss.peak)
        result["skipped_steps"] = trainer.fault.log_fields().get("skipped_steps", 0)
        result["compiled"] = bool(cfg.model.compile)
        result["settings"] = settings_snapshot()
    finally:
        trainer.close()
        dist.barrier()
        del trainer
        _dynamo_reset()
        if env.is_main:
            shutil.rmtree(run_dir, ignore_errors=True)
    return result, facts


def _run_dir(opts: Options, env) -> Path:
    """A scratch run directory for one measurement (the same path on every rank)."""
    from engine import dist

    path = None
    if env.is_main:
        (opts.out / "_runs").mkdir(parents=True, exist_ok=True)
        path = tempfile.mkdtemp(prefix="run-", dir=opts.out / "_runs")
    return Path(dist.broadcast_object(path))


def _dynamo_reset() -> None:
    with contextlib.suppress(Exception):
        torch._dynamo.reset()


# ------------------------------------------------------------------------------------------ baselines

def _baseline_model(facts: dict, env):
    """The same transformers GPT-2 (shape, vocabulary, init seed) the engine built, unpadded."""
    from engine import model as model_lib
    from engine.trainer import seed_everything

    cfg = facts["cfg"]
    seed_everything(cfg.run.seed)
    hf = model_lib.build(cfg.model, model_lib.resolve(cfg.model), facts["data"].tokenizer)
    return hf.to(env.device)


def _batches_for(facts: dict, steps: int, device: torch.device) -> list[list[dict]]:
    """This rank's micro-batches of the first `steps` steps: the same token ids the engine trained on."""
    from engine.data import sources as data

    batches = data.TrainBatches(facts["data"], facts["layout"], facts["cfg"].run.seed, torch.device("cpu"))
    step = facts["layout"].global_batch
    return [[{k: v.to(device) for k, v in mb.items()} for mb in batches.micro_batches(s * step)] for s in range(steps)]


def _autocast(precision: str, device: torch.device):
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


def measure_torch(point: Point, opts: Options, env, facts: dict) -> dict:
    """A plain hand-written loop, as a careful user would write it without this engine."""
    import torch.nn.functional as F

    _reset_memory(env.device)
    torch.set_float32_matmul_precision("high")  # what a careful user sets (restored after: isolated_settings)
    steps = opts.warmup + opts.steps
    batches = _batches_for(facts, steps, env.device)
    model = _baseline_model(facts, env)
    model.train()
    wrapped = model
    if env.world_size > 1:
        wrapped = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[env.device] if env.device.type == "cuda" else None)
    if point.compile:  # the compiler backend ours uses (perf.compile_backend), so the two compare like with like
        wrapped = torch.compile(wrapped, backend=facts["cfg"].perf.compile_backend)
    cuda = env.device.type == "cuda"
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1, betas=(0.9, 0.95),
                            fused=True if cuda else None)
    precision = facts["precision"]
    scaler = torch.amp.GradScaler(env.device.type) if precision == "fp16" else None
    clock, rss = StepClock(env.device), RssPeak()
    try:
        for i in range(steps):
            if i == opts.warmup:
                _sync(env.device)
                rss.__enter__()
                clock.mark()
            for j, mb in enumerate(batches[i]):
                sync_ctx = wrapped.no_sync() if env.world_size > 1 and j < len(batches[i]) - 1 else contextlib.nullcontext()
                with sync_ctx:
                    with _autocast(precision, env.device):
                        logits = wrapped(input_ids=mb["input_ids"]).logits
                        loss = F.cross_entropy(logits.flatten(0, 1).float(), mb["labels"].flatten(), ignore_index=-100)
                    loss = loss / len(batches[i])
                    (scaler.scale(loss) if scaler else loss).backward()
            if scaler:
                scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(model.parameters(), facts["cfg"].train.clip_grad)
            if scaler:
                scaler.step(opt)
                scaler.update()
            else:
                opt.step()
            opt.zero_grad(set_to_none=True)
            if i >= opts.warmup:
                clock.mark()
        rss.__exit__()
        durations = clock.durations()
        tokens = env.world_size * point.micro_batch * point.grad_accum * point.seq_len
        from engine import metrics

        result = _summary(durations, tokens, facts["fpt"], metrics.peak_flops(env.device), env.world_size,
                          env.device, float(loss.detach()) * len(batches[-1]), rss.peak)
        result["settings"] = settings_snapshot()
        return result
    finally:
        del wrapped, model, opt
        _dynamo_reset()


class _TokenRows(torch.utils.data.Dataset):
    """The engine's packed training rows as HF Trainer samples (HF shifts the labels itself)."""

    def __init__(self, train, seq_len: int):
        self.train, self.seq_len = train, seq_len

    def __len__(self):
        return len(self.train)

    def __getitem__(self, i):
        ids = torch.as_tensor(np.asarray(self.train[int(i)]["input_ids"][: self.seq_len]), dtype=torch.long)
        return {"input_ids": ids, "labels": ids}


def hf_deepspeed_config(point: Point, precision: str) -> dict | None:
    b = parse_backend(point.backend)
    if b["dist.backend"] != "deepspeed":
        return None
    zero = {"stage": b["dist.zero_stage"]}
    if b.get("dist.offload") == "cpu":
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
        if zero["stage"] == 3:
            zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    return {"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
            "gradient_clipping": "auto", "zero_optimization": zero,
            "bf16": {"enabled": precision == "bf16"}, "fp16": {"enabled": precision == "fp16"},
            "optimizer": {"type": "AdamW", "params": {"lr": "auto", "betas": "auto", "eps": "auto",
                                                       "weight_decay": "auto"}}}


def _checkpointing_argument(on: bool) -> dict:
    """TrainingArguments' activation checkpointing switch (renamed in transformers 5.x)."""
    import dataclasses

    from transformers import TrainingArguments

    names = {f.name for f in dataclasses.fields(TrainingArguments)}
    return {"activation_checkpointing" if "activation_checkpointing" in names else "gradient_checkpointing": on}


def measure_hf(point: Point, opts: Options, env, facts: dict) -> dict:
    """Hugging Face Trainer on the same model, tokens, batch and precision (+ DeepSpeed for ZeRO rows)."""
    from transformers import Trainer as HFTrainer, TrainerCallback, TrainingArguments
    from transformers.trainer_callback import PrinterCallback

    _reset_memory(env.device)
    steps = opts.warmup + opts.steps
    clock, rss = StepClock(env.device), RssPeak()

    class Timing(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            if state.global_step == opts.warmup:
                _sync(env.device)
                rss.__enter__()
            if state.global_step >= opts.warmup:
                clock.mark()

        def on_step_end(self, args, state, control, **kw):
            if state.global_step == steps:
                clock.mark()
                rss.__exit__()

    precision = facts["precision"]
    cuda = env.device.type == "cuda"
    out_dir = _run_dir(opts, env)
    args = TrainingArguments(
        output_dir=out_dir, per_device_train_batch_size=point.micro_batch,
        gradient_accumulation_steps=point.grad_accum, max_steps=steps, learning_rate=1e-4, weight_decay=0.1,
        adam_beta1=0.9, adam_beta2=0.95, max_grad_norm=facts["cfg"].train.clip_grad, warmup_steps=1,
        bf16=precision == "bf16", fp16=precision == "fp16", tf32=True if cuda else None,
        optim="adamw_torch_fused" if cuda else "adamw_torch", torch_compile=point.compile,
        logging_strategy="no", save_strategy="no", eval_strategy="no", report_to=[],
        dataloader_pin_memory=cuda, dataloader_num_workers=0, use_cpu=not cuda, seed=facts["cfg"].run.seed,
        disable_tqdm=True, deepspeed=hf_deepspeed_config(point, precision), ddp_find_unused_parameters=False,
        **_checkpointing_argument(facts["cfg"].model.gradient_checkpointing),
    )
    model = _baseline_model(facts, env)
    trainer = HFTrainer(model=model, args=args, train_dataset=_TokenRows(facts["data"].train, point.seq_len),
                        callbacks=[Timing()])
    # With disable_tqdm the Trainer prints every log dict (its end-of-training summary included) through
    # PrinterCallback: not part of the benchmark's report.
    trainer.remove_callback(PrinterCallback)
    try:
        with contextlib.redirect_stdout(sys.stderr):  # anything else it prints stays off the table's stream
            out = trainer.train()
        durations = clock.durations()
        tokens = env.world_size * point.micro_batch * point.grad_accum * point.seq_len
        from engine import metrics

        result = _summary(durations, tokens, facts["fpt"], metrics.peak_flops(env.device), env.world_size,
                          env.device, float(out.training_loss), rss.peak)
        result["settings"] = settings_snapshot()
        return result
    finally:
        with contextlib.suppress(Exception):
            trainer.accelerator.free_memory()
        del trainer, model
        _dynamo_reset()
        if env.is_main:
            shutil.rmtree(out_dir, ignore_errors=True)


# ----------------------------------------------------------------------------------------------- grid

def needed_tokens(points: list[Point], opts: Options, world: int) -> int:
    per_point = [(opts.warmup + opts.steps) * world * p.micro_batch * p.grad_accum * (p.seq_len + 1) for p in points]
    return int(max(per_point) * 1.3) + 8192


def environment(env) -> dict:
    import transformers

    info = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
        "platform": platform.platform(), "cpu_count": os.cpu_count(), "world_size": env.world_size,
        "device": env.device.type,
    }
    with contextlib.suppress(importlib.metadata.PackageNotFoundError):  # no import: deepspeed stays in backends/
        info["deepspeed"] = importlib.metadata.version("deepspeed")
    if env.device.type == "cuda":
        info.update(gpu=torch.cuda.get_device_name(env.device), cuda=torch.version.cuda,
                    gpu_memory_gib=round(torch.cuda.get_device_properties(env.device).total_memory / 2**30, 1))
    else:
        info["cpu"] = platform.processor() or platform.machine()
        with contextlib.suppress(OSError):
            info["load_average_1m"] = os.getloadavg()[0]
    return info


def run_grid(points: list[Point], opts: Options) -> dict:
    """Measure every point (ours, then each baseline); rank 0 writes the outputs. Returns the report."""
    from engine import dist

    env = dist.init("auto")
    if any(p.backend != "ddp" for p in points):
        # DeepSpeed keeps its groups cached across engines: one group of one for every ZeRO row of the grid
        dist.init_single_process_group(env.device)
    opts.out.mkdir(parents=True, exist_ok=True)
    cache = opts.out / "_data"
    if env.is_main:
        cache.mkdir(exist_ok=True)
        make_tokenizer(opts.vocab, cache / f"tokenizer-{opts.vocab}")
        make_corpus(cache / f"random-{opts.vocab}.jsonl", opts.vocab, needed_tokens(points, opts, env.world_size))
    dist.barrier()
    corpus, tok_dir = cache / f"random-{opts.vocab}.jsonl", cache / f"tokenizer-{opts.vocab}"
    report = {"environment": environment(env), "command": opts.command, "options": _jsonable(asdict(opts)),
              "points": []}
    ds_ok = deepspeed_backend_available()
    for point in points:
        row: dict = {"point": asdict(point), "label": point.label, "results": {}, "skipped": {}, "failed": {}}
        report["points"].append(row)
        log = print if env.is_main else (lambda *a, **k: None)
        log(f"[bench] {point.label}", file=sys.stderr, flush=True)
        if parse_backend(point.backend)["dist.backend"] == "deepspeed" and not ds_ok:
            row["skipped"]["ours"] = "the DeepSpeed backend (engine/backends/deepspeed.py) is not available"
            continue
        outcome = _attempt(row, "ours", env, lambda: measure_ours(point, opts, env, corpus, tok_dir))
        if outcome is None:
            continue
        ours, facts = outcome
        row["results"]["ours"] = ours
        row["n_params"], row["flops_per_token"], row["precision"] = facts["n_params"], facts["fpt"], facts["precision"]
        impls = (["ours-plain"] if opts.ablate else []) + list(opts.baselines)
        for impl in impls:
            if impl == "torch" and point.backend != "ddp":
                row["skipped"][impl] = "the plain loop has no ZeRO; compare with the ddp row"
                continue
            if impl == "hf" and point.backend.startswith("fsdp"):
                row["skipped"][impl] = "HF Trainer's FSDP (through accelerate) is not wired up here; " \
                                       "compare with the ddp and zero rows"
                continue
            run = {"ours-plain": lambda: measure_ours(point, opts, env, corpus, tok_dir, PLAIN_OVERRIDES)[0],
                   "torch": lambda: measure_torch(point, opts, env, facts),
                   "hf": lambda: measure_hf(point, opts, env, facts)}[impl]
            result = _attempt(row, impl, env, run)
            if result is not None:
                row["results"][impl] = result
            dist.barrier()
        row["ratio"] = {impl: ours["tokens_per_s"] / r["tokens_per_s"] for impl, r in row["results"].items()
                        if impl != "ours" and r.get("tokens_per_s")}
        if env.is_main:  # results as they come: a grid cut short (a time limit, a crash) still reports
            with contextlib.suppress(OSError):
                (opts.out / "throughput.partial.json").write_text(json.dumps(_jsonable(report), indent=1))
    if opts.profile:  # every rank steps (collectives); rank 0 writes
        report["profile"] = profile_best(report, opts, env, corpus, tok_dir)
    if env.is_main:
        with contextlib.suppress(OSError):
            (opts.out / "_runs").rmdir()  # empty by now: every measurement removed its own
        write_outputs(report, opts.out)
    dist.shutdown()
    return report


def _attempt(row: dict, impl: str, env, run):
    """run() with this implementation's settings isolated; a failure (out of memory, a DeepSpeed op that does
    not build, any error) is recorded in row["failed"][impl] and returns None, so the grid goes on."""
    try:
        with isolated_settings():
            return run()
    except UsageError:  # a mistake in the command (--set ...): exit 2, as for any ftl command
        raise
    except Exception as e:  # noqa: BLE001  (a failed point is reported as failed, not the grid)
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        oom = isinstance(e, torch.cuda.OutOfMemoryError)
        row["failed"][impl] = f"{'CUDA out of memory' if oom else type(e).__name__}: {first}"[:500]
        print(f"[bench] {row['label']} / {impl} FAILED: {row['failed'][impl]}", file=sys.stderr, flush=True)
        _reset_memory(env.device)
        return None


def _jsonable(obj):
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


# -------------------------------------------------------------------------------------------- outputs

def _fmt(v, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def table(report: dict, markdown: bool = False) -> str:
    head = ["point", "impl", "tokens/s", "MFU", "step ms min/median/max", "peak GPU MiB", "peak RSS MiB", "ours / impl"]
    rows, notes = [], []
    for row in report["points"]:
        for impl in IMPLS:
            r = row["results"].get(impl)
            if r is None:
                for kind in ("failed", "skipped"):
                    if impl in row.get(kind, {}):
                        notes.append(f"{row['label']} / {impl} {kind}: {row[kind][impl]}")
                        rows.append([row["label"], impl, f"{kind.upper() if kind == 'failed' else kind} ({len(notes)})",
                                     "", "", "", "", ""])
                continue
            ratio = row.get("ratio", {}).get(impl)
            rows.append([row["label"], impl, _fmt(r["tokens_per_s"], ",.0f"),
                         _fmt(None if r["mfu"] is None else 100 * r["mfu"], ".1f") + ("%" if r["mfu"] else ""),
                         "/".join(_fmt(r.get(k), ".1f") for k in ("step_time_ms_min", "step_time_ms", "step_time_ms_max")),
                         _fmt(r["peak_gpu_mib"], ",.0f"),
                         _fmt(r.get("rss_peak_mib") or r["rss_mib"], ",.0f"),
                         "1.00" if impl == "ours" else _fmt(ratio, ".2f")])
    notes = [f"({i}) {n}" for i, n in enumerate(notes, 1)]
    if markdown:
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        lines += ["| " + " | ".join(map(str, r)) + " |" for r in rows]
        return "\n".join(lines + ([""] + notes if notes else []))
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows)] if rows else [len(h) for h in head]
    fmt = lambda r: "  ".join(str(x).ljust(w) if i < 2 else str(x).rjust(w) for i, (x, w) in enumerate(zip(r, widths)))
    return "\n".join([fmt(head), fmt(["-" * w for w in widths]), *map(fmt, rows), *notes])


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = [r for r in report["points"] if r["results"]]
    impls = [i for i in IMPLS if any(i in r["results"] for r in points)]
    has_mfu = any(v.get("mfu") for r in points for v in r["results"].values())
    fig, axes = plt.subplots(2, 1, figsize=(max(6.0, 1.6 * len(points) + 3), 7), squeeze=False)
    width = 0.8 / max(1, len(impls))
    x = np.arange(len(points))
    for k, impl in enumerate(impls):
        tps = [r["results"].get(impl, {}).get("tokens_per_s") or 0.0 for r in points]
        second = [((r["results"].get(impl, {}).get("mfu") or 0.0) * 100) if has_mfu
                  else (r["results"].get(impl, {}).get("step_time_ms") or 0.0) for r in points]
        axes[0][0].bar(x + k * width, tps, width, label=impl)
        axes[1][0].bar(x + k * width, second, width, label=impl)
    for ax, ylabel in ((axes[0][0], "tokens/s"), (axes[1][0], "MFU %" if has_mfu else "step time (ms)")):
        ax.set_xticks(x + width * (len(impls) - 1) / 2)
        ax.set_xticklabels([r["label"] for r in points], rotation=15, ha="right", fontsize=8)
        ax.set_ylabel(ylabel)
        ax.legend(fontsize=8)
        ax.grid(axis="y", alpha=0.3)
    e = report["environment"]
    where = e.get("gpu") or f"CPU ({e.get('cpu_count')} cores)"
    axes[0][0].set_title(f"ftl bench on {where}, torch {e['torch']}, {e['date'][:10]}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_outputs(report: dict, out: Path) -> None:
    text = table(report)
    print(text)
    (out / "throughput.json").write_text(json.dumps(_jsonable(report), indent=1), encoding="utf-8")
    (out / "throughput.partial.json").unlink(missing_ok=True)  # complete now
    (out / "throughput.md").write_text(table(report, markdown=True) + "\n", encoding="utf-8")
    plot(report, out / "throughput.png")
    print(f"\nwrote {out / 'throughput.json'}, {out / 'throughput.md'}, {out / 'throughput.png'}", file=sys.stderr)


# -------------------------------------------------------------------------------------------- profile

# CUDA runtime calls that make the host wait for the device, as torch.profiler names them. torch's sync debug
# mode sees only torch's own (.item(), nonzero, blocking copies); these also catch event and stream waits in
# libraries (DeepSpeed's optimizers) and the loop's own deferred status read.
HOST_SYNC_CALLS = ("cudaDeviceSynchronize", "cudaStreamSynchronize", "cudaEventSynchronize", "cudaMemcpy")


def host_syncs(prof) -> dict[str, int]:
    """Host-device synchronizations in a finished torch.profiler profile, by CUDA runtime call."""
    out: dict[str, int] = {}
    for event in prof.events():
        name = event.name
        if name in HOST_SYNC_CALLS:
            out[name] = out.get(name, 0) + 1
    return out


def profile_best(report: dict, opts: Options, env, corpus: Path, tok_dir: Path, steps: int = 3) -> dict | None:
    """torch.profiler over a few steps of the fastest `ours` point, timed as the loop runs them (`_loop_step`);
    writes profile.txt and a Chrome trace, and counts the host syncs per step (CUDA runtime calls).

    The choice of point must agree on every rank: it is rank 0's, broadcast."""
    from torch.profiler import ProfilerActivity, profile

    from engine.trainer import Trainer

    done = [r for r in report["points"] if "ours" in r["results"]]
    if not done:
        return None
    from engine import dist

    best = max(done, key=lambda r: r["results"]["ours"]["tokens_per_s"])
    point = Point(**dist.broadcast_object(best["point"]))
    run_dir = _run_dir(opts, env)
    cfg = engine_config(point, opts, run_dir, corpus, tok_dir, {"train.max_steps": max(1, opts.warmup) + steps + 1})
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if env.device.type == "cuda" else [])
    with isolated_settings():
        trainer = Trainer(cfg, env=env, progress=False)
        window = LoopWindow(env.device)
        try:
            for _ in range(max(1, opts.warmup)):  # compilation and allocator warm-up stay out of the profile
                _loop_step(trainer, window, last=False)
            _sync(env.device)
            with profile(activities=activities, record_shapes=False) as prof:
                for _ in range(steps):
                    _loop_step(trainer, window, last=False)
                _sync(env.device)
        finally:
            trainer.close()
            if env.is_main:
                shutil.rmtree(run_dir, ignore_errors=True)
    if not env.is_main:
        return None
    key = "cuda_time_total" if env.device.type == "cuda" else "cpu_time_total"
    text = prof.key_averages().table(sort_by=key, row_limit=40)
    syncs = host_syncs(prof)
    per_step = (sum(syncs.values()) - (1 if env.device.type == "cuda" else 0)) / steps  # minus the final _sync
    (opts.out / "profile.txt").write_text(f"{point.label}\nhost syncs in {steps} steps: {syncs}\n{text}\n",
                                          encoding="utf-8")
    prof.export_chrome_trace(str(opts.out / "profile-trace.json"))
    return {"point": point.label, "table": str(opts.out / "profile.txt"), "trace": str(opts.out / "profile-trace.json"),
            "host_syncs": syncs, "host_syncs_per_step": per_step, "steps": steps}


# --------------------------------------------------------------------------------------- memory table

def model_state_bytes(n_params: int, mode: str, world: int) -> tuple[float, float]:
    """(GPU, CPU) bytes per rank of parameters + gradients + AdamW state, mixed precision.

    ddp: this engine's DDP backend (torch autocast: fp32 weights 4, fp32 grads 4, AdamW m and v 8 bytes per
    parameter). zeroN: DeepSpeed bf16 (ZeRO paper accounting: bf16 weights 2, bf16 grads 2, fp32 master +
    m + v 12 bytes per parameter), stage 1 shards the 12, stage 2 also the grads, stage 3 everything;
    -offload moves the optimizer state (and fp32 grads) to CPU; zero3-offload also the parameters.
    fsdp: FSDP2 with bf16 mixed precision keeps fp32 parameter shards (4), fp32 gradient shards (4) and the
    fp32 moments (8) per parameter / world (its fp32 shards are the master weights: no separate copy), plus the
    bf16 gathered weights of the running block; fsdp-offload keeps all of it in CPU memory."""
    n, w = float(n_params), float(world)
    table_ = {
        "ddp": (16 * n, 0.0),
        "zero0": (16 * n, 0.0),
        "zero1": (4 * n + 12 * n / w, 0.0),
        "zero2": (2 * n + 14 * n / w, 0.0),
        "zero3": (16 * n / w, 0.0),
        "zero2-offload": (2 * n + 2 * n / w, 16 * n / w),
        "zero3-offload": (0.0, 18 * n / w),
        "fsdp": (16 * n / w, 0.0),
        "fsdp-offload": (0.0, 16 * n / w),
    }
    return table_[mode]


def memory_table(presets: list[str], world: int, gpu_gib: float, vocab: int = 50257, pad_to: int = 64) -> str:
    """Markdown: model-state memory per rank for each preset and backend/ZeRO stage (analytic)."""
    from transformers import GPT2LMHeadModel

    from engine import fastpath, model as model_lib

    modes = ["ddp", "zero1", "zero2", "zero3", "zero2-offload", "zero3-offload", "fsdp", "fsdp-offload"]
    lines = ["| preset | params | " + " | ".join(modes) + " |", "|---|---|" + "---|" * len(modes)]
    for preset in presets:
        cfg = model_lib.preset_config(preset, fastpath.padded_size(vocab, pad_to))
        with torch.device("meta"):
            n = model_lib.num_parameters(GPT2LMHeadModel(cfg))
        cells = []
        for mode in modes:
            gpu, cpu = model_state_bytes(n, mode, world)
            cell = f"{gpu / 2**30:.1f}" + (f" (+{cpu / 2**30:.1f} CPU)" if cpu else "")
            cells.append(cell + ("" if gpu <= gpu_gib * 2**30 else " **>GPU**"))
        lines.append(f"| {preset} | {n / 1e6:,.0f}M | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def find_max_micro_batch(presets: list[str], backends: list[str], seq_len: int, opts: Options,
                         limit: int = 1024, start: int = 1) -> list[dict]:
    """The largest power-of-two micro-batch (from `start` up to `limit`) that trains 3 eager steps, per preset
    and backend: on CUDA the first out-of-memory ends the search (the previous size is the answer, with its
    peak memory). On the CPU nothing runs out of memory and the search stops at `limit` (gpu_check.sh's
    --dry-run). Any other failure is recorded with the size it happened at."""
    from engine import dist

    env = dist.init("auto")
    opts.out.mkdir(parents=True, exist_ok=True)
    cache = opts.out / "_data"
    make_tokenizer(opts.vocab, cache / f"tokenizer-{opts.vocab}")
    probe = Options(**{**asdict(opts), "steps": 2, "warmup": 1, "baselines": (), "ablate": False})
    # one corpus, large enough for the largest size, tokenized once (every trial reads the same cached data)
    corpus = make_corpus(cache / f"random-{opts.vocab}.jsonl", opts.vocab,
                         needed_tokens([Point(presets[0], backends[0], limit, seq_len, False)], probe, env.world_size))
    rows = []
    for preset in presets:
        for backend in backends:
            best, mb, stopped = None, max(1, start), "limit"
            while mb <= limit:
                point = Point(preset, backend, mb, seq_len, False)
                try:
                    with isolated_settings():
                        result, _ = measure_ours(point, probe, env, corpus, cache / f"tokenizer-{opts.vocab}")
                except torch.cuda.OutOfMemoryError:
                    _reset_memory(env.device)
                    stopped = f"out of memory at {mb}"
                    break
                except UsageError:
                    raise
                except Exception as e:  # noqa: BLE001
                    _reset_memory(env.device)
                    stopped = f"{type(e).__name__} at {mb}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
                    break
                best = {"preset": preset, "backend": backend, "seq_len": seq_len, "micro_batch": mb,
                        "peak_gpu_mib": result["peak_gpu_mib"], "tokens_per_s": result["tokens_per_s"]}
                mb *= 2
            row = best or {"preset": preset, "backend": backend, "seq_len": seq_len, "micro_batch": 0}
            row["stopped"] = stopped
            rows.append(row)
            print(json.dumps(rows[-1]), flush=True)
            (opts.out / "max_micro_batch.json").write_text(json.dumps(rows, indent=1), encoding="utf-8")
    dist.shutdown()
    return rows
