"""DeepSpeed JSON from the engine's config: fill every "auto", reject every contradiction.

No deepspeed import here: `DistConfig.problems()` calls `resolve()` while validating the config, before any
process group exists, and `DeepSpeedBackend` calls it again once the world size (and the model's width) is
known. Both see the same rules, so a bad JSON fails in `ftl launch` as well as on every rank alike.

The engine owns these keys; in a JSON each may be "auto" (or absent) and is then filled, or hold the very
value the engine would use. Anything else is a contradiction reported with both values (exit 2):

    train_micro_batch_size_per_gpu   train.micro_batch
    gradient_accumulation_steps      train.grad_accum
    train_batch_size                 train.micro_batch x train.grad_accum x world size
    gradient_clipping                train.clip_grad
    bf16.enabled / fp16.enabled      train.precision
    fp16.loss_scale_window           train.loss_scale_window
    optimizer.params.{lr,betas,eps,weight_decay}   optim.*   (the section is optional)

`zero_optimization.stage` and the offload devices are shared: "auto" takes `dist.zero_stage` /
`dist.offload`; a value in the JSON is used as it is while those keys are left at their defaults (0 / none),
so `dist.ds_config=my_zero3.json` alone runs stage 3; both set and different is a contradiction.

Bucket sizes, when "auto", follow the model (P = its parameter count, hidden = n_embd), sized for throughput:
    reduce_bucket_size           min(5e7, P)      elements per gradient reduction (stages 1-3)
    stage3_prefetch_bucket_size  min(5e7, P), at least 2 x 4 hidden^2 (two MLP weights ahead)
    stage3_param_persistence_threshold  10 hidden (biases and LayerNorms stay whole, as in the HF integration)
The Hugging Face integration's reduce_bucket_size = hidden^2 (590k elements for GPT-2 124M) cuts one backward
into ~210 reductions, each paying NCCL's launch latency, and its 0.9 hidden^2 prefetch bucket is smaller than
one c_fc weight (4 hidden^2), so ZeRO-3 could never fetch ahead. 5e7 elements (DeepSpeed's own default
prefetch size; a tenth of its 5e8 reduce default) gives 3 reductions per backward for 124M and 32 for 1.5B,
large enough to run at bus bandwidth, small enough that the two overlap_comm buffers cost 0.4 GB in fp32. Capping
at P keeps tiny models from allocating buffers larger than themselves. Any other "auto" is dropped, leaving
DeepSpeed's default.

Precision of the gradients (bf16). DeepSpeed's default accumulates and reduces the gradients of bf16
parameters in bf16, so DDP (fp32 gradients under autocast) and ZeRO diverge, and so do different
world x accumulation splits of one global batch (invariant 1). The engine asks for
`data_types.grad_accum_dtype = "fp32"` and `communication_data_type = "fp32"` unless the JSON sets them:

    stage 0   DeepSpeed 0.19 refuses fp32 accumulation without ZeRO; gradients accumulate in bf16 (a warning
              says so), the all-reduce runs in fp32. For fp32 accumulation use stage 1 (the same memory on one
              GPU) or dist.backend=ddp.
    stage 1   BF16_Optimizer: fp32 gradient buffer for the whole model (4 bytes/parameter), fp32 all-reduce
              (with CPU offload: the ZeRO optimizer's fp32 grad_accum tensors)
    stage 2   fp32 gradient partitions (4/world bytes/parameter), fp32 reduce-scatter per bucket
    stage 3   fp32 gradient partitions, fp32 reduce-scatter
    fp16      left to DeepSpeed (fp16 accumulation and reduction, dynamic loss scaling)

Each micro-batch's gradient is still computed in bf16 (the parameters are bf16); only its sum over
micro-batches and ranks is fp32, so the splits agree to bf16 rounding of one micro-batch's gradient instead of
drifting with the number of accumulation steps.

The engine sets the learning rate every step (optim.schedule); a "scheduler" section is accepted only with
all its params "auto" and is then dropped. `ds_configs/*.json` are exactly `builtin(stage, offload)`.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch

from engine import fastpath

AUTO = "auto"
_MISSING = object()

# Values the engine always sets unless the JSON says otherwise: DeepSpeed's per-step console report is
# replaced by the engine's own; a torch AdamW passed by the engine is the "untested" optimizer ZeRO warns about.
ENGINE_DEFAULTS = {"steps_per_print": 2**31 - 1, "wall_clock_breakdown": False, "zero_allow_untested_optimizer": True}


def builtin(stage: int, offload: str = "none") -> dict:
    """The configuration `dist.zero_stage` / `dist.offload` stand for (what ds_configs/ ships)."""
    zero: dict = {"stage": stage}
    if stage >= 1:
        zero.update(contiguous_gradients=True, reduce_scatter=True, reduce_bucket_size=AUTO, overlap_comm=stage >= 2)
    if stage == 3:
        zero.update(stage3_prefetch_bucket_size=AUTO, stage3_param_persistence_threshold=AUTO,
                    stage3_max_live_parameters=int(1e9), stage3_max_reuse_distance=int(1e9))
    if offload == "cpu" and stage >= 1:  # stage 0 has no partitioned optimizer state to offload
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
        if stage == 3:
            zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    return {
        "train_batch_size": AUTO,
        "train_micro_batch_size_per_gpu": AUTO,
        "gradient_accumulation_steps": AUTO,
        "gradient_clipping": AUTO,
        "communication_data_type": AUTO,
        "data_types": {"grad_accum_dtype": AUTO},
        "bf16": {"enabled": AUTO},
        "fp16": {"enabled": AUTO, "loss_scale": 0, "initial_scale_power": 16, "loss_scale_window": AUTO,
                 "hysteresis": 2, "min_loss_scale": 1},
        "zero_optimization": zero,
    }


def shipped_name(stage: int, offload: str) -> str:
    return f"zero{stage}{'_offload' if offload == 'cpu' else ''}.json"


class Resolved:
    """The JSON DeepSpeed gets, the stage/offload it amounts to, and warnings about what it cannot do."""

    def __init__(self, ds: dict, stage: int, offload: str, source: str, notes: list[str] | None = None):
        self.ds, self.stage, self.offload, self.source = ds, stage, offload, source
        self.notes = notes or []

    @property
    def offload_params(self) -> bool:
        return _get(self.ds, "zero_optimization.offload_param.device") not in (_MISSING, None, "none")

    @property
    def has_optimizer_section(self) -> bool:
        return "optimizer" in self.ds


def _get(d: dict, path: str):
    for part in path.split("."):
        if not isinstance(d, dict) or part not in d:
            return _MISSING
        d = d[part]
    return d


def _set(d: dict, path: str, value) -> None:
    *parents, last = path.split(".")
    for part in parents:
        if not isinstance(d.get(part), dict):
            d[part] = {}
        d = d[part]
    d[last] = value


def _show(v) -> str:
    return json.dumps(v) if isinstance(v, (bool, list, dict)) or v is None else str(v)


def _same(a, b) -> bool:
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return float(a) == float(b)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


def read_json(path: str) -> tuple[dict | None, list[str]]:
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as e:
        return None, [f"dist.ds_config: cannot read {path!r} ({e.strerror})"]
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        return None, [f"dist.ds_config {path!r} is not valid JSON ({e})"]
    if not isinstance(data, dict):
        return None, [f"dist.ds_config {path!r} must hold a JSON object (got {type(data).__name__})"]
    return data, []


def resolve(cfg, world: int | None, hidden: int | None = None,
            params: int | None = None) -> tuple[Resolved | None, list[str]]:
    """Fill `cfg.dist.ds_config` (or the built-in config of dist.zero_stage/offload) from `cfg`.

    `world=None` (config validation) checks everything that does not depend on the world size and leaves
    "auto" values in place; with the world size the result is final, and without `hidden` / `params` (the
    model's width and parameter count) the model-derived sizes fall back to DeepSpeed's defaults."""
    d = cfg.dist
    if d.ds_config:
        user, problems = read_json(d.ds_config)
        if user is None:
            return None, problems
        ds, label = copy.deepcopy(user), f"dist.ds_config {d.ds_config}"
    else:
        ds, label, problems = builtin(d.zero_stage, d.offload), "the built-in DeepSpeed config", []

    def own(path: str, value, key: str, why: str = "", shown=None, fix: str = "") -> None:
        cur = _get(ds, path)
        if cur is _MISSING or cur == AUTO:
            _set(ds, path, value)
        elif not _same(cur, value):
            problems.append(f"{label}: {path}={_show(cur)} contradicts {key}={_show(value if shown is None else shown)}"
                            f"{why}; set it to \"auto\" or change {fix or key}")

    t = cfg.train
    own("train_micro_batch_size_per_gpu", t.micro_batch, "train.micro_batch")
    own("gradient_accumulation_steps", t.grad_accum, "train.grad_accum")
    if world is not None:
        own("train_batch_size", t.micro_batch * t.grad_accum * world, "train.micro_batch x train.grad_accum x world",
            f" ({t.micro_batch} x {t.grad_accum} x {world} ranks)",
            fix="train.micro_batch, train.grad_accum or the number of ranks")
    else:
        tbs = _get(ds, "train_batch_size")
        per_rank = t.micro_batch * t.grad_accum
        if tbs not in (_MISSING, AUTO) and (not isinstance(tbs, int) or isinstance(tbs, bool) or tbs % per_rank):
            problems.append(f"{label}: train_batch_size={_show(tbs)} contradicts train.micro_batch x train.grad_accum "
                            f"= {per_rank} for every world size (it must be a multiple); set it to \"auto\"")
    own("gradient_clipping", t.clip_grad, "train.clip_grad")
    # train.precision=auto decides here as it will at run time (bf16 on a capable GPU, else fp32).
    precision = fastpath.resolve_precision(t.precision, torch.device("cpu") if t.device == "cpu" else None)
    own("bf16.enabled", precision == "bf16", "train.precision", shown=precision)
    own("fp16.enabled", precision == "fp16", "train.precision", shown=precision)
    if _get(ds, "fp16") is not _MISSING:
        own("fp16.loss_scale_window", t.loss_scale_window, "train.loss_scale_window")

    stage = _stage(ds, d, label, problems)
    offload = _offload(ds, d, stage, label, problems)
    _optimizer(ds, cfg.optim, label, problems, own)
    _scheduler(ds, label, problems)
    notes = _gradient_precision(ds, precision, stage)
    _sizes(ds, hidden, params, final=world is not None)
    for k, v in ENGINE_DEFAULTS.items():
        ds.setdefault(k, v)
    return Resolved(ds, stage, offload, label, notes), problems


STAGE0_BF16_NOTE = ("ZeRO stage 0 with bf16: DeepSpeed accumulates gradients in bf16 at stage 0 (it supports fp32 "
                    "accumulation only with ZeRO); the all-reduce runs in fp32. For fp32 accumulation use "
                    "dist.zero_stage=1 (the same memory on one GPU) or dist.backend=ddp")


def _gradient_precision(ds: dict, precision: str, stage: int) -> list[str]:
    """bf16: fp32 gradient accumulation and reduction where DeepSpeed supports it (see the module docstring)."""
    if precision != "bf16":
        return []
    notes = []
    if ds.get("communication_data_type", AUTO) == AUTO:
        ds["communication_data_type"] = "fp32"
    accum = _get(ds, "data_types.grad_accum_dtype")
    if stage == 0:
        if accum in (_MISSING, AUTO):
            if accum == AUTO:
                del ds["data_types"]["grad_accum_dtype"]
            notes.append(STAGE0_BF16_NOTE)
    elif accum in (_MISSING, AUTO):
        _set(ds, "data_types.grad_accum_dtype", "fp32")
    return notes


def _stage(ds: dict, d, label: str, problems: list[str]) -> int:
    js = _get(ds, "zero_optimization.stage")
    if js is _MISSING or js == AUTO:
        _set(ds, "zero_optimization.stage", d.zero_stage)
        return d.zero_stage
    if isinstance(js, bool) or js not in (0, 1, 2, 3):
        problems.append(f"{label}: zero_optimization.stage must be 0, 1, 2 or 3 (got {_show(js)})")
        return d.zero_stage
    if d.zero_stage not in (0, js):
        problems.append(f"{label}: zero_optimization.stage={js} contradicts dist.zero_stage={d.zero_stage}; "
                        f"set it to \"auto\" or change dist.zero_stage")
    return int(js)


def _offload(ds: dict, d, stage: int, label: str, problems: list[str]) -> str:
    effective = "none"
    for section, applies in (("offload_optimizer", stage >= 1), ("offload_param", stage == 3)):
        path = f"zero_optimization.{section}.device"
        engine = d.offload if applies else "none"
        cur = _get(ds, path)
        if cur is _MISSING or cur == AUTO:
            if engine != "none":
                _set(ds, path, engine)
            elif cur == AUTO:
                _set(ds, path, "none")
            cur = engine
        elif cur not in ("none", "cpu", "nvme"):
            problems.append(f"{label}: {path} must be none, cpu or nvme (got {_show(cur)})")
            continue
        elif d.offload != "none" and cur != engine:
            problems.append(f"{label}: {path}={cur} contradicts dist.offload={d.offload}; "
                            f"set it to \"auto\" or change dist.offload")
        if cur != "none":
            if not applies:
                need = "dist.zero_stage=3" if section == "offload_param" else "dist.zero_stage 1, 2 or 3"
                problems.append(f"{label}: {section} to {cur} needs {need} (the stage is {stage})")
            elif section == "offload_optimizer":
                effective = cur
    if d.offload != "none" and stage == 0:
        problems.append(f"dist.offload={d.offload} needs ZeRO stage 1, 2 or 3 (the optimizer state must be "
                        f"partitioned to be offloaded); set dist.zero_stage")
    return effective


def _optimizer(ds: dict, o, label: str, problems: list[str], own) -> None:
    section = ds.get("optimizer")
    if section is None:
        return
    if not isinstance(section, dict):
        problems.append(f"{label}: optimizer must be an object with type and params")
        return
    kind = section.get("type", AUTO)
    if kind == AUTO:
        section["type"] = "AdamW"
    elif str(kind).lower() not in ("adam", "adamw"):
        problems.append(f"{label}: optimizer.type={kind} is not supported: the engine's parameter groups and schedule "
                        f"are AdamW's; use Adam/AdamW or remove the optimizer section")
    if _get(ds, "optimizer.params.adam_w_mode") is False:
        problems.append(f"{label}: optimizer.params.adam_w_mode=false (L2-regularized Adam) contradicts the engine's "
                        f"AdamW (decoupled weight decay, optim.weight_decay); remove it")
    own("optimizer.params.lr", o.lr, "optim.lr")
    own("optimizer.params.betas", list(o.betas), "optim.betas")
    own("optimizer.params.eps", o.eps, "optim.eps")
    own("optimizer.params.weight_decay", o.weight_decay, "optim.weight_decay")


def _scheduler(ds: dict, label: str, problems: list[str]) -> None:
    section = ds.pop("scheduler", None)
    if section is None:
        return
    params = section.get("params", {}) if isinstance(section, dict) else None
    fixed = [k for k, v in params.items() if v != AUTO] if isinstance(params, dict) else ["<not an object>"]
    if fixed:
        problems.append(f"{label}: scheduler sets {', '.join(fixed)}, but the engine sets the learning rate every step "
                        f"(optim.lr, optim.schedule, optim.warmup_steps); remove the scheduler section or leave its "
                        f"params \"auto\"")


BUCKET_ELEMENTS = int(5e7)


def bucket_sizes(hidden: int, params: int) -> dict[str, int]:
    """The "auto" sizes for a model of width `hidden` with `params` parameters (see the module docstring)."""
    bucket = min(BUCKET_ELEMENTS, params)
    return {"reduce_bucket_size": bucket,
            "stage3_prefetch_bucket_size": max(bucket, min(params, 2 * 4 * hidden * hidden)),
            "stage3_param_persistence_threshold": 10 * hidden}


def _sizes(ds: dict, hidden: int | None, params: int | None, final: bool) -> None:
    """Model-derived sizes; once final (the world size is known), any "auto" left is dropped."""
    zero = ds.get("zero_optimization")
    if isinstance(zero, dict) and hidden is not None and params is not None:
        for key, value in bucket_sizes(hidden, params).items():
            if zero.get(key) == AUTO:
                zero[key] = value
    if final:
        _drop_auto(ds)


def _drop_auto(d: dict) -> None:
    for k in list(d):
        if d[k] == AUTO:
            del d[k]
        elif isinstance(d[k], dict) and d[k]:
            _drop_auto(d[k])
            if not d[k]:  # held only "auto" values (data_types in an fp32 run)
                del d[k]


def problems(cfg) -> list[str]:
    """Config-time check (no world size yet) for DistConfig.problems."""
    return resolve(cfg, world=None)[1]
