"""DeepSpeed ZeRO (stages 0-3, optional CPU offload) behind the same small interface as DDP.

The loop's protocol and DeepSpeed's, side by side:

    loop                                   this backend
    accumulate(last)                       engine.set_gradient_accumulation_boundary(last): DeepSpeed reduces
                                           (stage 0/1) or finalizes its partitions (stage 2/3) on the last one
    backward(loss * world / global count)  engine.backward(loss, scale_wrt_gas=False): the loss already is this
                                           rank's share of the global mean, so DeepSpeed must not divide it by
                                           gradient_accumulation_steps again; its ranks AVERAGE like DDP's
    step(lr, clip)                         lr into every param group, then ONE engine.step() per optimizer step
                                           (clip + update + zero grads at the boundary set above); the pre-clip
                                           global norm comes from the ZeRO optimizer (stage 0: computed here)

So one global batch gives the same update for any world x micro x accum split, as with DDP.

Construction. Stages 0-2 build the model normally and let DeepSpeed wrap it. Stage 3 builds it inside
`deepspeed.zero.Init`, so each module's parameters are partitioned as soon as that module exists and no
rank ever holds the full model. The weights must still equal what one process builds from the same
seed, so transformers' own initialization runs unchanged, in the same order, on each module's gathered
parameters (`_gathered_init`): the random stream is consumed exactly as in a single process. A
pretrained model goes through transformers' ZeRO-3 integration instead (`HfDeepSpeedConfig`), which
loads the checkpoint module by module into the partitions.

Checkpoint layout, inside the directory `engine/checkpoint.py` gives each save:

    <ckpt>/deepspeed/layout.json            {"zero_stage", "world_size", "tag", "offload", "dtype", "ds_config"}
    <ckpt>/deepspeed/latest                 DeepSpeed's pointer to the tag below
    <ckpt>/deepspeed/global_stepN/mp_rank_00_model_states.pt            (stages 0-2)
    <ckpt>/deepspeed/global_stepN/zero_pp_rank_R_mp_rank_00_model_states.pt   (stage 3, one per rank R)
          the module's state dict ("hf." + transformers names; at stage 3 empty placeholders), the
          parameter shapes per optimizer group, the tied names (shared_params), DeepSpeed's counters and
          config; at stage 0 also the whole optimizer state
    <ckpt>/deepspeed/global_stepN/zero_pp_rank_R_mp_rank_00_optim_states.pt   (stages 1-3, one per rank R)
          rank R's partition of the fp32 master weights (single_partition_of_fp32_groups at 1-2,
          fp32_flat_groups at 3) and of the Adam moments
    <ckpt>/deepspeed/zero_to_fp32.py        DeepSpeed's own recovery scripts (written by DeepSpeed)

Stages 1-3 shard the optimizer files by rank, so `load` reads them at the world size that wrote them, and
`load_resharded` (which the checkpointer calls when the world size changed) converts them first into
DeepSpeed's universal checkpoint (one file per parameter) and loads each rank's new slice from that.
`full_state_from_checkpoint` rebuilds the full fp32 weights from these files offline, in one process, for
`ftl export`. Every file is read with `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import shutil
import sys
import warnings
from pathlib import Path

import torch
from torch import nn

from engine import dist, fastpath, fault, integrity, model as model_lib, optim
from engine.backends import ds_config
from engine.backends.base import Backend, set_lr, tensor_bytes
from engine.errors import UsageError

# zero.Init (ZeRO-3) swaps torch.nn.functional.linear for DeepSpeed's autograd wrapper and, in DeepSpeed 0.19,
# does not always put it back: anything the process runs afterwards (an export traced to TorchScript, another
# engine) would go through ZeRO-3's linear. close() restores the function this module saw at import.
_TORCH_LINEAR = torch.nn.functional.linear

CKPT_SUBDIR = "deepspeed"
LAYOUT = "layout.json"


def _import_deepspeed(device: torch.device):
    """deepspeed, with the accelerator matching the engine's device."""
    if "deepspeed" not in sys.modules:  # DeepSpeed picks its accelerator once, at import
        os.environ["DS_ACCELERATOR"] = "cuda" if device.type == "cuda" else "cpu"
    # DeepSpeed still calls torch's deprecated collective names, dozens of warnings per step with torch >= 2.10.
    warnings.filterwarnings("ignore", category=FutureWarning, message=r"`torch\.distributed\.\w+` is deprecated")
    import deepspeed
    from deepspeed.accelerator import get_accelerator, set_accelerator

    if get_accelerator().device_name() != device.type:  # imported earlier by someone else
        if device.type == "cuda":
            from deepspeed.accelerator.cuda_accelerator import CUDA_Accelerator as Accelerator
        else:
            from deepspeed.accelerator.cpu_accelerator import CPU_Accelerator as Accelerator
        set_accelerator(Accelerator())
    if device.type == "cpu":
        # DeepSpeed compiles a shared-memory all-reduce for CPU inference on first use (40 s, and it needs a
        # C++ compiler); training never calls it and uses the gloo group. DeepSpeed keeps this dict editable.
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    return deepspeed


class DeepSpeedBackend(Backend):
    name = "deepspeed"

    def __init__(self, cfg, env):
        super().__init__(cfg, env)
        resolved, problems = ds_config.resolve(cfg, env.world_size)
        self.deepspeed = _import_deepspeed(env.device)
        from deepspeed.accelerator import get_accelerator

        if cfg.train.precision == "fp16" and not get_accelerator().is_fp16_supported():
            problems.append(f"train.precision=fp16: DeepSpeed has no fp16 support on {env.device.type}; use bf16 or fp32")
        if problems:
            raise UsageError(problems, hint="DeepSpeed JSON values the engine owns may be \"auto\"; see docs/distributed.md, DeepSpeed ZeRO.")
        self.resolved = resolved
        self.stage = resolved.stage
        # The resolved config (config.yaml, checkpoints) records what actually runs.
        cfg.dist.zero_stage = resolved.stage
        if resolved.offload in ("none", "cpu"):
            cfg.dist.offload = resolved.offload
        self.source = model_lib.resolve(cfg.model)
        self._ds: dict | None = None
        self._hf_ds = None
        self.engine = None
        self._call = None  # the engine behind a compile guard once compiled
        self._first_step_grads: int | None = None
        self._own_group = not torch.distributed.is_initialized()
        if self._own_group:
            dist.init_single_process_group(env.device)  # DeepSpeed needs a process group, even of one
        self.deepspeed.init_distributed(dist_backend="nccl" if env.device.type == "cuda" else "gloo",
                                        dist_init_required=False)

    # --- configuration --------------------------------------------------------------------------------
    def ds_config(self) -> dict:
        """The final JSON DeepSpeed gets (the model-derived "auto" sizes need the model's config)."""
        if self._ds is None:
            hidden, params = self._model_size()
            resolved, problems = ds_config.resolve(self.cfg, self.env.world_size, hidden, params)
            if problems:  # cannot happen after __init__ passed; kept so a bug cannot go unnoticed
                raise UsageError(problems)
            if self._offload and not self._use_deepspeed_cpu_adam() and not self.resolved.has_optimizer_section:
                resolved.ds.setdefault("zero_force_ds_cpu_optimizer", False)
            self._ds = resolved.ds
            if self.env.is_main:
                print(f"deepspeed config ({resolved.source}): {json.dumps(self._ds, sort_keys=True)}", file=sys.stderr,
                      flush=True)
                for note in resolved.notes:
                    print(f"warning: {note}", file=sys.stderr, flush=True)
        return self._ds

    def _model_size(self) -> tuple[int | None, int | None]:
        """(width, parameter count) of the model to be built, from its config alone (no weights yet)."""
        conf = self.source.config
        if conf is None:  # a hub id: its config.json only (the weights come later, with the model)
            from transformers import AutoConfig

            try:
                conf = AutoConfig.from_pretrained(self.source.name)
            except OSError:
                return None, None  # unreachable: the model build reports it; sizes fall back to DeepSpeed's defaults
        h, layers = int(conf.n_embd), int(conf.n_layer)
        vocab = fastpath.padded_size(int(conf.vocab_size), self.cfg.perf.pad_vocab_to)
        positions = max(int(conf.n_positions), self.cfg.model.max_positions)
        return h, layers * (12 * h * h + 13 * h) + (vocab + positions) * h + 2 * h

    @property
    def _offload(self) -> bool:
        return self.resolved.offload != "none"

    def _use_deepspeed_cpu_adam(self) -> bool:
        # On a GPU machine the offloaded Adam step runs on the CPU, where DeepSpeed's vectorized CPUAdam is
        # several times faster than torch's. On a CPU-only machine torch's AdamW already runs there (and is
        # exact against DDP); DeepSpeedCPUAdam would only add a C++ build.
        return self._offload and self.env.device.type == "cuda"

    # --- construction ---------------------------------------------------------------------------------
    def construct(self):
        if self.stage != 3:
            return contextlib.nullcontext()
        return self._zero3_construction()

    @contextlib.contextmanager
    def _zero3_construction(self):
        from transformers.integrations.deepspeed import HfDeepSpeedConfig, unset_hf_deepspeed_config
        import transformers.modeling_utils as modeling_utils

        ds = self.ds_config()
        # transformers consults this (through a weak reference) for from_pretrained, resize_token_embeddings
        # and init; it must be gone afterwards, or rank 0's plain reload of the export would try ZeRO-3 alone.
        self._hf_ds = HfDeepSpeedConfig(ds)
        try:
            if self.source.pretrained:
                yield  # transformers: zero.Init + loading the checkpoint module by module
            else:
                with self.deepspeed.zero.Init(config_dict_or_path=ds), \
                        modeling_utils.set_zero3_state(), _gathered_init(self.deepspeed):
                    yield
        finally:
            self._hf_ds = None
            unset_hf_deepspeed_config()

    @property
    def param_dtype(self) -> torch.dtype:
        return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.cfg.train.precision, torch.float32)

    def setup(self, module: nn.Module, param_groups: list[dict]) -> None:
        ds = self.ds_config()
        # Before initialize: ZeRO swaps each group's "params" for its flat fp32 partition, in place.
        self._params = [p for g in param_groups for p in g["params"]]
        client = None if self.resolved.has_optimizer_section else self._client_optimizer(param_groups)
        self.engine, _, _, _ = self.deepspeed.initialize(
            model=module, optimizer=client, model_parameters=param_groups if client is None else None,
            config=ds, dist_init_required=False)
        self._module = module
        if self.stage == 3:
            skip_backward_gather(module)
        self._clip = float(ds.get("gradient_clipping", 0.0))
        # ZeRO and DeepSpeed's 16-bit optimizers (BF16_Optimizer, FP16_Optimizer: DeepSpeedOptimizer subclasses)
        # compute the global norm over the gradients they accumulated; with stage 0 in fp32 the torch optimizer
        # steps directly and nobody does, so it is computed here. (Asking whether the optimizer has a
        # `_global_grad_norm` yet is not the same question: BF16_Optimizer sets it at its first step.)
        from deepspeed.runtime.base_optimizer import DeepSpeedOptimizer

        self._norm_here = not isinstance(self.engine.optimizer, DeepSpeedOptimizer)
        if self.env.is_main:
            print(self.describe(), file=sys.stderr, flush=True)

    def describe(self) -> str:
        """What DeepSpeed really built: its optimizer wrapper, the optimizer under it, and the dtypes gradients
        are accumulated and reduced in (printed at start: the resolved JSON says what was asked for)."""
        opt = self.engine.optimizer
        base = getattr(self.engine, "basic_optimizer", None) or getattr(opt, "optimizer", None)
        accum = (getattr(opt, "gradient_accumulation_dtype", None) or getattr(opt, "grad_acc_dtype", None)
                 or self.param_dtype)
        reduce = self.engine.communication_data_type
        name = lambda dt: str(dt).removeprefix("torch.")  # noqa: E731
        return (f"deepspeed: ZeRO stage {self.stage}, {type(opt).__name__} over {type(base).__name__}, parameters "
                f"{name(self.param_dtype)}, gradients accumulated in {name(accum)} and reduced in {name(reduce)}")

    def _client_optimizer(self, param_groups: list[dict]) -> torch.optim.Optimizer:
        o = self.cfg.optim
        if self._use_deepspeed_cpu_adam():
            try:
                from deepspeed.ops.adam import DeepSpeedCPUAdam

                return DeepSpeedCPUAdam(param_groups, lr=o.lr, betas=tuple(o.betas), eps=o.eps,
                                        weight_decay=o.weight_decay, adamw_mode=True)
            except Exception as e:  # no compiler / headers: slower but correct
                warnings.warn(f"DeepSpeedCPUAdam unavailable ({e}); the offloaded step uses torch AdamW")
                self.ds_config()["zero_force_ds_cpu_optimizer"] = False
        # ZeRO keeps the master weights on the device unless offloaded; AdamW is fused there when it can be.
        state_device = torch.device("cpu") if self._offload else self.env.device
        return optim.adamw(param_groups, o, state_device)

    def compile(self) -> None:
        # Same backend/mode as DDP (perf.compile_backend/compile_mode), so runs compare across backends.
        # DeepSpeed compiles engine.module in place (nn.Module.compile); undoing that restores eager.
        backend, kwargs = fastpath.compile_options(self.cfg.perf)
        self.engine.compile(backend=backend, compile_kwargs=kwargs)

        def undo():
            self.engine.module._compiled_call_impl = None
            self.engine._is_compiled = False

        log = (lambda line: print(line, file=sys.stderr, flush=True)) if self.env.is_main else (lambda line: None)
        self._call = fastpath.CompiledOrEager(self.engine, self.engine, undo, log)

    # --- the step -----------------------------------------------------------------------------------------
    @property
    def model(self) -> nn.Module:
        return self._call or self.engine

    @property
    def module(self) -> nn.Module:
        return self._module

    @contextlib.contextmanager
    def accumulate(self, last: bool):
        self.engine.set_gradient_accumulation_boundary(last)
        yield

    def autocast(self):
        # DeepSpeed's bf16/fp16 modes keep 16-bit parameters themselves: no autocast on top.
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor, last: bool) -> None:
        self.engine.backward(loss, scale_wrt_gas=False)

    def forward_extras(self, local_count: torch.Tensor) -> dict:
        if self.cfg.train.precision != "fp16" or self.cfg.model.head != "lm":
            return {}
        scale = getattr(self.engine.optimizer, "cur_scale", None) or getattr(self.engine.optimizer, "loss_scale", 1.0)
        return {"grad_scale": float(scale) / local_count.clamp(min=1.0)}

    def step(self, lr: float, clip: float) -> torch.Tensor:
        set_lr(self.engine.optimizer, lr)  # ZeRO keeps each group's keys, lr_scale included
        if clip != self._clip:
            self._set_clip(clip)
        norm = None
        if self._norm_here:  # gradients are already averaged over ranks at the boundary
            grads = [p.grad for p in self._params if p.grad is not None]
            norm = torch.nn.utils.get_total_norm(grads, norm_type=2.0, foreach=True) if grads else None
        if self._first_step_grads is None:
            self._first_step_grads = self._gradient_bytes()
        if self._norm_here and norm is not None:
            # Stage 0 in fp32 steps the torch optimizer whatever the norm; ZeRO and DeepSpeed's 16-bit
            # optimizers skip a step with a non-finite norm themselves (and keep weights and moments).
            with fault.updates_only_if_finite(self.engine.optimizer, norm):
                self.engine.step()
        else:
            self.engine.step()
        if norm is None:
            norm = self.engine.get_global_grad_norm()
        if norm is None:
            norm = torch.full((), float("nan"))
        return torch.as_tensor(norm, dtype=torch.float32).to(self.env.device, non_blocking=True)

    def loss_scale(self) -> float | None:
        if self.cfg.train.precision != "fp16":
            return None
        scale = getattr(self.engine.optimizer, "loss_scale", None)
        return float(scale) if scale is not None else None

    def _set_clip(self, clip: float) -> None:
        self._clip = clip
        self.engine._config.gradient_clipping = clip
        if hasattr(self.engine.optimizer, "clip_grad"):
            self.engine.optimizer.clip_grad = clip

    # --- state -------------------------------------------------------------------------------------------
    def save(self, path: Path) -> None:
        root = path / CKPT_SUBDIR
        tag = f"global_step{self.engine.global_steps}"
        # A LoRA run leaves its frozen base out (rebuilt from model.name on resume): adapter-sized checkpoints.
        with _recording_writes(self.engine):
            self.engine.save_checkpoint(str(root), tag=tag, client_state={}, save_latest=True,
                                        exclude_frozen_parameters=not self.saves_frozen)
        if self.env.is_main:
            layout = {"zero_stage": self.stage, "world_size": self.env.world_size, "tag": tag,
                      "offload": self.resolved.offload, "dtype": str(self.param_dtype).removeprefix("torch."),
                      "ds_config": self.ds_config()}
            integrity.write_bytes(root / LAYOUT, json.dumps(layout, indent=1).encode("utf-8"))

    def load(self, path: Path) -> None:
        root = path / CKPT_SUBDIR
        layout = self._layout(path)
        if layout["world_size"] != self.env.world_size and self.stage > 0:  # the checkpointer calls load_resharded
            raise UsageError(f"checkpoint {path} holds ZeRO stage {self.stage} partitions of {layout['world_size']} "
                             f"ranks; this run has {self.env.world_size}")
        with _weights_only_loading(self.engine):
            loaded, _ = self.engine.load_checkpoint(str(root), tag=layout["tag"], load_module_strict=self.saves_frozen,
                                                    load_optimizer_states=True, load_lr_scheduler_states=False)
        if loaded is None:
            raise RuntimeError(f"DeepSpeed could not load the checkpoint under {root}")

    def load_resharded(self, path: Path, saved_world_size: int) -> None:
        """A checkpoint written by another number of ranks. Stage 0 holds no partitions and loads as it is.
        Stages 1-3 go through DeepSpeed's universal checkpoint: rank 0 converts this checkpoint's per-rank
        partitions into one file per parameter (fp32 weights, both Adam moments) in a scratch directory of
        this run (a dot-name: resume never picks it), and every rank loads its new slice from there. Every read,
        DeepSpeed's own included, is weights-only."""
        if self.stage == 0:
            return self.load(path)
        layout = self._layout(path)
        scratch = self.cfg.run_dir / "checkpoints" / f".universal-{path.name}"  # ours, even if `path` is not
        if self.env.is_main:
            from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal

            shutil.rmtree(scratch, ignore_errors=True)
            scratch.mkdir(parents=True)
            with _weights_only_torch_load():
                ds_to_universal(argparse.Namespace(
                    input_folder=str(path / CKPT_SUBDIR / layout["tag"]), output_folder=str(scratch / "universal"),
                    num_extract_workers=1, num_merge_workers=1,  # more would fork a process pool inside a rank
                    keep_temp_folder=False, strict=True,
                    inject_missing_state=True))  # stages 1-2 lack universal_checkpoint_info without it
        dist.barrier()
        hyper = [{k: v for k, v in g.items() if k != "params"} for g in self.engine.optimizer.param_groups]
        config = self.engine._config
        config.load_universal_checkpoint = True
        try:
            with _weights_only_loading(self.engine), _weights_only_torch_load():
                loaded, _ = self.engine.load_checkpoint(str(scratch), tag="universal",
                                                        load_module_strict=self.saves_frozen,
                                                        load_optimizer_states=True, load_lr_scheduler_states=False)
        finally:
            config.load_universal_checkpoint = False
        # Two repairs of DeepSpeed 0.19's stage-3 universal loader. It gives every param group the FIRST group's
        # hyperparameters, so the no-decay group (biases, LayerNorms, embeddings) would start decaying; and it
        # hands every sub-group the SAME step tensor, which each sub-group's update then advances (Adam's bias
        # correction runs ahead). Measured without them: 5.6e-4 relative loss error two steps after a resume.
        for group, own in zip(self.engine.optimizer.param_groups, hyper):
            group.update(own)
        base = getattr(self.engine.optimizer, "optimizer", self.engine.optimizer)
        for state in base.state.values():
            if torch.is_tensor(state.get("step")):
                state["step"] = state["step"].clone()
        dist.barrier()
        if self.env.is_main:
            shutil.rmtree(scratch, ignore_errors=True)
        if loaded is None:
            raise RuntimeError(f"DeepSpeed could not load the universal checkpoint converted from {path}")

    def _layout(self, path: Path) -> dict:
        """The checkpoint's deepspeed/layout.json, checked against this run's ZeRO stage."""
        root = path / CKPT_SUBDIR
        if not (root / LAYOUT).is_file():
            raise UsageError(f"{path} was not written by the deepspeed backend (no {CKPT_SUBDIR}/{LAYOUT}); "
                             f"resume it with the backend that wrote it")
        layout = json.loads((root / LAYOUT).read_text(encoding="utf-8"))
        if layout["zero_stage"] != self.stage:
            raise UsageError(f"checkpoint {path} was written at ZeRO stage {layout['zero_stage']}, this run is stage "
                             f"{self.stage}; set dist.zero_stage={layout['zero_stage']}")
        return layout

    def full_state_dict(self) -> dict[str, torch.Tensor] | None:
        """fp32 weights of the transformers model on rank 0: the optimizer's master copy where DeepSpeed keeps
        one (ZeRO 1-3, bf16/fp16), else the parameters. A collective: every rank gathers each parameter."""
        from deepspeed.utils import safe_get_full_fp32_param

        hf = self._module.hf
        out: dict[str, torch.Tensor] = {}
        for name, p in hf.named_parameters():
            full = safe_get_full_fp32_param(p)  # ZeRO 1-3 and 16-bit optimizers (a collective)
            if full is None and hasattr(p, "ds_id"):
                # ZeRO-3 without optimizer state, i.e. frozen (LoRA's base, model.freeze): gather the partitions.
                with self.deepspeed.zero.GatheredParameters([p]):
                    if self.env.is_main:
                        out[name] = p.detach().float().cpu().clone()
                continue
            if self.env.is_main:
                out[name] = (p.detach() if full is None else full).float().cpu().clone()
        if not self.env.is_main:
            return None
        params = {n for n, _ in hf.named_parameters(remove_duplicate=False)}
        for name, buf in hf.state_dict().items():
            if name not in params and name not in out:
                out[name] = buf.detach().float().cpu().clone()
        return out

    # --- memory ------------------------------------------------------------------------------------------
    def memory_report(self) -> dict:
        """Planned bytes per rank for this stage (DeepSpeed's ZeRO paper accounting, Adam): parameters,
        gradients, optimizer state (fp32 master copy + two moments)."""
        n = sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel() for p in self._params)
        world, stage = self.env.world_size, self.stage
        b = 2 if self.param_dtype != torch.float32 else 4
        shard = lambda x: -(-x // world)  # noqa: E731
        # A separate fp32 master copy: ZeRO 1-3 always keep one (even of fp32 parameters: measured, DeepSpeed
        # 0.19); stage 0 only for 16-bit parameters (in fp32 the torch optimizer updates them in place).
        master = 4 * n if (stage >= 1 or b == 2) else 0
        # fp32 gradient accumulation (bf16, stages 1-3): an fp32 buffer beside the 16-bit gradients, whole at
        # stage 1 (BF16_Optimizer), partitioned at 2-3
        accum32 = 4 * (shard(n) if stage >= 2 else n) if (
            b == 2 and self.ds_config().get("data_types", {}).get("grad_accum_dtype") == "fp32") else 0
        report = {
            "params": b * (shard(n) if stage == 3 else n),
            "grads": b * (shard(n) if stage >= 2 else n) + accum32,
            "optimizer": shard(8 * n + master) if stage >= 1 else 8 * n + master,
            "zero_stage": stage, "world_size": world,
            "offloaded": (["optimizer"] + (["params"] if self.resolved.offload_params else [])) if self._offload else [],
        }
        return report

    def measured_memory(self) -> dict:
        """What this rank holds now, counted from live tensors: resident parameter storage (at stage 3 the
        partitions plus whatever is gathered or persistent), optimizer state (fp32 master partitions where
        they are a separate copy, and the Adam moments, wherever they live), and the gradient storage seen at
        the first update."""
        resident = []
        for p in self._module.parameters():
            resident.append(p.data)
            if hasattr(p, "ds_tensor"):
                resident.append(p.ds_tensor)
        shared = {t.untyped_storage().data_ptr() for t in resident if t.numel()}
        base = getattr(self.engine.optimizer, "optimizer", self.engine.optimizer)
        state = [t for s in base.state.values() for t in s.values() if torch.is_tensor(t)]
        masters = [t for t in self._masters() if t.numel() and t.untyped_storage().data_ptr() not in shared]
        out = {"params": tensor_bytes(resident), "optimizer": tensor_bytes(state + masters),
               "grads": self._first_step_grads or 0}
        out.update(device_peaks(self.env.device))
        return out

    def _masters(self) -> list[torch.Tensor]:
        """The fp32 master partitions (ZeRO 1/2 and 3 name them differently; stage 3 lends them to the
        torch optimizer only while it steps)."""
        opt = self.engine.optimizer
        found = _tensors_in(opt, ("single_partition_of_fp32_groups", "fp32_partitioned_groups_flat",
                                  "fp32_groups_flat_partition"))
        base = getattr(opt, "optimizer", opt)
        return found + [p for g in base.param_groups for p in g["params"]]

    def _gradient_bytes(self) -> int:
        """Gradient storage at the first update: the module's .grad, ZeRO's reduced partitions and buffers."""
        tensors = [p.grad for p in self._module.parameters() if p.grad is not None]
        tensors += [t.grad for t in self._masters() if t.grad is not None]
        tensors += _tensors_in(self.engine.optimizer, ("averaged_gradients", "accumulated_grads_in_cpu",
                                                       "grads_in_partition", "grad_partitions_flat_buffer",
                                                       "fp32_groups_gradients_flat"))  # the last: BF16_Optimizer
        return tensor_bytes(tensors)

    def close(self) -> None:
        if self.engine is not None:
            self.engine.destroy()
        self.engine = None
        self._module = None
        if torch.nn.functional.linear is not _TORCH_LINEAR:
            torch.nn.functional.linear = _TORCH_LINEAR
        # Collect DeepSpeed's finished communication handles now: freed later, during interpreter shutdown,
        # a gloo worker thread can be torn down mid-callback and abort the process.
        gc.collect()
        if self._own_group:  # the single-process group this backend made; a launcher's group is the CLI's
            dist.shutdown()
            self._own_group = False


class _NoGatherBeforeBackward:
    """Stands in for the autograd function ZeRO-3 wraps around a module's outputs to gather the module's
    parameters before its backward: applied to a tensor, it returns the tensor unchanged."""

    @staticmethod
    def apply(tensor):
        return tensor


def skip_backward_gather(module: nn.Module) -> bool:
    """ZeRO-3 gathers every module's parameters again before the module's backward. The chunked LM head
    computes its gradients during its forward (fastpath.LMHead) and its backward only scales them, so the
    re-gather of the tied [vocab x width] embedding (77 MB in bf16 for GPT-2 124M, every micro-batch) would be
    wasted; DeepSpeed looks the function up on the module at every forward, so replacing it turns the
    re-gather off. The release after the backward then finds the weight already partitioned. True when done."""
    head = getattr(getattr(module, "hf", None), "lm_head", None)
    if isinstance(head, fastpath.LMHead) and head.chunked and "pre_bwd_fn" in head.__dict__:
        head.pre_bwd_fn = _NoGatherBeforeBackward
        return True
    return False


@contextlib.contextmanager
def _recording_writes(engine):
    """Each file DeepSpeed's checkpoint engine writes on this rank (its model and optimizer partitions) is
    hashed by this rank right after it is written, while the page cache holds it (the checkpoint's
    manifest). Files it writes another way (`latest`, the recovery script) are hashed after the barrier."""
    ckpt_engine = engine.checkpoint_engine
    real = ckpt_engine.save

    def save_and_record(state_dict, path, *args, **kwargs):
        out = real(state_dict, path, *args, **kwargs)
        if os.path.isfile(path):  # an asynchronous engine writes later: then the files are hashed after the barrier
            integrity.record(Path(path))
        return out

    ckpt_engine.save = save_and_record  # an instance attribute shadowing the method
    try:
        yield
    finally:
        del ckpt_engine.save


def _tensors_in(obj, attrs) -> list[torch.Tensor]:
    found: list[torch.Tensor] = []

    def walk(v):
        if torch.is_tensor(v):
            found.append(v)
        elif isinstance(v, dict):
            for x in v.values():
                walk(x)
        elif isinstance(v, (list, tuple)):
            for x in v:
                walk(x)

    for attr in attrs:
        walk(getattr(obj, attr, None))
    return found


def device_peaks(device: torch.device) -> dict:
    if device.type == "cuda":
        return {"cuda_max_allocated": int(torch.cuda.max_memory_allocated(device))}
    import resource

    return {"host_max_rss": int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024}


@contextlib.contextmanager
def _gathered_init(deepspeed):
    """Run transformers' per-module weight init on gathered (full) parameters, on every rank.

    Under zero.Init a module's parameters are empty partitions once the module exists, so the init that
    `post_init` runs would touch nothing and draw nothing from the random stream. Gathering each module's
    parameters around its init restores both: same values, same order of draws as in one process. Rank 0's
    values are kept (modifier_rank=0); every rank draws the same numbers anyway."""
    import transformers.modeling_utils as modeling_utils

    original = modeling_utils.PreTrainedModel._initialize_weights

    def initialize(self, module, *args, **kwargs):
        if getattr(module, "_is_hf_initialized", False):
            return original(self, module, *args, **kwargs)
        # transformers' _init_weights may also touch direct children's parameters.
        params = list(module.parameters(recurse=False))
        params += [p for child in module.children() for p in child.parameters(recurse=False)]
        gathered = [p for p in params if hasattr(p, "ds_id")]
        with deepspeed.zero.GatheredParameters(gathered, modifier_rank=0, enabled=bool(gathered)):
            with init_on_cpu_fp32(params):
                return original(self, module, *args, **kwargs)

    modeling_utils.PreTrainedModel._initialize_weights = initialize
    try:
        yield
    finally:
        modeling_utils.PreTrainedModel._initialize_weights = original


@contextlib.contextmanager
def init_on_cpu_fp32(params: list[torch.Tensor]):
    """Run a weight initialization on fp32 CPU copies of `params`, then copy the values back.

    zero.Init allocates on the accelerator and in the training dtype (bf16 under DeepSpeed bf16). Drawn there,
    `normal_` would consume the CUDA generator, and a bf16 draw produces other numbers than an fp32 one, so a
    ZeRO-3 model would start from other weights than the same seed gives DDP or ZeRO 0-2 (which build on the
    CPU in fp32 and cast afterwards). Drawn here, every backend on every device starts from the same fp32
    weights, rounded to the parameter dtype (what ZeRO 0-2 do when they cast the built model)."""
    moved = [(p, p.data) for p in params if p.data.numel() and (p.device.type != "cpu" or p.dtype != torch.float32)]
    for p, data in moved:
        p.data = data.detach().to("cpu", torch.float32)
    try:
        yield
    finally:
        with torch.no_grad():
            for p, data in moved:
                data.copy_(p.data)
                p.data = data


# --------------------------------------------------------------------------------------- safe loading

def _safe_globals() -> list:
    """The only non-tensor, non-container classes DeepSpeed pickles into its checkpoints."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address  # a (numel, start) record

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


def safe_load(path, map_location="cpu"):
    """torch.load that unpickles tensors, containers and the few DeepSpeed classes above, nothing else."""
    with torch.serialization.safe_globals(_safe_globals()):
        return torch.load(path, map_location=map_location, weights_only=True)


@contextlib.contextmanager
def _weights_only_loading(engine):
    """DeepSpeed's checkpoint engine loads with weights_only=False; route its reads through safe_load."""
    ce = engine.checkpoint_engine
    original = ce.load

    def load(path, map_location=None, *args, **kwargs):
        return safe_load(path, map_location=map_location)

    ce.load = load
    try:
        yield
    finally:
        ce.load = original


@contextlib.contextmanager
def _weights_only_torch_load():
    """DeepSpeed's universal-checkpoint code calls torch.load(weights_only=False) directly: inside this block
    every torch.load is weights-only (with the few DeepSpeed classes its files hold)."""
    original = torch.load

    def load(f, map_location=None, *args, weights_only=None, **kwargs):
        with torch.serialization.safe_globals(_safe_globals()):
            return original(f, map_location, *args, weights_only=True, **kwargs)

    torch.load = load
    try:
        yield
    finally:
        torch.load = original


# ------------------------------------------------------------------------------------- offline export

def full_state_from_checkpoint(ckpt: Path) -> dict[str, torch.Tensor]:
    """The complete fp32 transformers weights of a checkpoint this backend wrote, rebuilt offline in one
    process from the per-rank partitions (stages 1-3: the fp32 master copies; stage 0: the module)."""
    root = Path(ckpt) / CKPT_SUBDIR
    layout_file = root / LAYOUT
    if not layout_file.is_file():
        raise UsageError(f"{ckpt}: no {CKPT_SUBDIR}/{LAYOUT}; not a checkpoint of the deepspeed backend")
    layout = json.loads(layout_file.read_text(encoding="utf-8"))
    tag_dir = root / layout["tag"]
    stage, world = int(layout["zero_stage"]), int(layout["world_size"])
    if stage == 3:
        model_states = [safe_load(tag_dir / f"zero_pp_rank_{r}_mp_rank_00_model_states.pt") for r in range(world)]
    else:
        model_states = [safe_load(tag_dir / "mp_rank_00_model_states.pt")]
    first = model_states[0]
    if stage == 0:
        full = {k: v.float() for k, v in first["module"].items()}
    else:
        optim = [safe_load(_optim_file(tag_dir, r))["optimizer_state_dict"] for r in range(world)]
        shapes = first["param_shapes"]
        if stage == 3:
            full = _merge_stage3([o["fp32_flat_groups"] for o in optim], shapes, world)
            full.update(_merge_frozen_stage3(model_states, world))
        else:
            full = _merge_stage12([o["single_partition_of_fp32_groups"] for o in optim], shapes,
                                  optim[0].get("param_alignment_paddings"))
        trainable = {name for group in shapes for name in group} | set(first.get("shared_params") or {})
        buffers = set(first.get("buffer_names") or [])
        for k, v in first["module"].items():  # buffers, and at stages 1-2 frozen parameters, are whole
            if k not in full and k not in trainable and (stage < 3 or k in buffers):
                full[k] = v.float()
    for alias, target in (first.get("shared_params") or {}).items():
        if target in full:
            full.setdefault(alias, full[target])
    prefix = "hf."
    return {k[len(prefix):]: v for k, v in full.items() if k.startswith(prefix)}


def _optim_file(tag_dir: Path, rank: int) -> Path:
    """Rank `rank`'s optimizer partition: ZeRO's file, or BF16_Optimizer's (stage 1 with bf16 and fp32 gradient
    accumulation), which has a `bf16_` prefix and the same flat fp32 partitions (padding only at each group's end)."""
    name = f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt"
    return tag_dir / name if (tag_dir / name).is_file() else tag_dir / f"bf16_{name}"


def _merge_stage12(flat_groups: list[list[torch.Tensor]], shapes: list[dict], alignment_paddings) -> dict:
    """Stages 1/2: each param group is one flat fp32 vector, cut into equal contiguous slices, one per rank
    (rank order); parameters follow each other in it, each followed by its alignment padding if any."""
    out = {}
    for g, group_shapes in enumerate(shapes):
        flat = torch.cat([ranks[g].float() for ranks in flat_groups])
        paddings = alignment_paddings[g] if alignment_paddings is not None else [0] * len(group_shapes)
        offset = 0
        for (name, shape), pad in zip(group_shapes.items(), paddings):
            numel = int(torch.Size(shape).numel())
            out[name] = flat[offset:offset + numel].view(shape).clone()
            offset += numel + int(pad)
    return out


def _merge_stage3(flat_groups: list[list[torch.Tensor]], shapes: list[dict], world: int) -> dict:
    """Stage 3 partitions every parameter on its own: rank r holds elements [r*k, (r+1)*k) of it, with
    k = ceil(numel / world) (the last rank zero-padded), and a rank's flat groups, back to back, hold those
    slices in parameter order."""
    flats = [torch.cat([t.float() for t in ranks]) for ranks in flat_groups]
    out, offset = {}, 0
    for name, shape in ((n, s) for group in shapes for n, s in group.items()):
        numel = int(torch.Size(shape).numel())
        k = -(-numel // world)
        out[name] = torch.cat([f[offset:offset + k] for f in flats])[:numel].view(shape).clone()
        offset += k
    if offset != flats[0].numel():
        raise RuntimeError(f"stage-3 checkpoint: parameters account for {offset} of {flats[0].numel()} elements "
                           f"per rank; the partitions do not match the recorded shapes")
    return out


def _merge_frozen_stage3(model_states: list[dict], world: int) -> dict:
    """Frozen (requires_grad=False) parameters are not in the optimizer; at stage 3 each rank saved its slice."""
    shapes = model_states[0].get("frozen_param_shapes") or {}
    out = {}
    for name, shape in shapes.items():
        numel = int(torch.Size(shape).numel())
        pieces = [ms["frozen_param_fragments"][name].float().flatten() for ms in model_states]
        out[name] = torch.cat(pieces)[:numel].view(shape).clone()
    return out
