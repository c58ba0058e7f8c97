"""Plain PyTorch data parallelism: one full replica per rank, DDP all-reduces gradients.

A single process (world=1) uses the same class without the DDP wrapper, so there is one code path.
"""

from __future__ import annotations

import contextlib
import gc
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, load_model
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from engine import fastpath, fault, integrity, optim
from engine.backends.base import Backend, set_lr, tensor_bytes


class DDPBackend(Backend):
    name = "ddp"

    def setup(self, module: nn.Module, param_groups: list[dict]) -> None:
        self._module = module.to(self.env.device)
        if self.env.distributed:
            self._wrapped: nn.Module = DistributedDataParallel(
                self._module, device_ids=[self.env.device] if self.env.device.type == "cuda" else None,
                gradient_as_bucket_view=True,
            )
        else:
            self._wrapped = self._module
        self.optimizer = optim.adamw(param_groups, self.cfg.optim, self.env.device)
        self._params = [p for g in param_groups for p in g["params"]]
        # fp16 overflows without loss scaling; bf16 has fp32's range and needs none.
        self.scaler = (torch.amp.GradScaler(self.env.device.type, growth_interval=self.cfg.train.loss_scale_window)
                       if self.cfg.train.precision == "fp16" else None)
        self._first_step_grads: int | None = None

    def compile(self) -> None:
        # The module inside the DDP wrapper is compiled, not the wrapper: DDP's own forward (its logging, its
        # bucket bookkeeping) would be a graph break each step, and dynamo's DDPOptimizer still splits the
        # module's graph at DDP's bucket boundaries (it sees the active DDP module), so gradient all-reduces
        # still overlap the backward. Evaluation keeps calling the eager module (backend.module).
        backend, kwargs = fastpath.compile_options(self.cfg.perf)
        compiled = torch.compile(self._module, backend=backend, **kwargs)
        log = (lambda line: print(line, file=sys.stderr, flush=True)) if self.env.is_main else (lambda line: None)
        if self.env.distributed:
            ddp = self._wrapped
            ddp.module = compiled  # same parameters: the reducer built in setup() stays valid

            def undo():
                ddp.module = self._module

            self._wrapped = fastpath.CompiledOrEager(ddp, ddp, undo, log)
        else:
            self._wrapped = fastpath.CompiledOrEager(compiled, self._module, log=log)

    @property
    def model(self) -> nn.Module:
        return self._wrapped

    @property
    def module(self) -> nn.Module:
        return self._module

    def accumulate(self, last: bool):
        if self.env.distributed and not last:
            return self._wrapped.no_sync()
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor, last: bool) -> None:
        (self.scaler.scale(loss) if self.scaler else loss).backward()

    def forward_extras(self, local_count: torch.Tensor) -> dict:
        if self.scaler is None or self.cfg.model.head != "lm":
            return {}
        # the scaler's current scale as a device tensor (get_scale() would read it back: a host sync)
        scale = self.scaler._scale if self.scaler._scale is not None else self.scaler._init_scale
        return {"grad_scale": scale / local_count.clamp(min=1.0)}

    def step(self, lr: float, clip: float) -> torch.Tensor:
        set_lr(self.optimizer, lr)
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        grads = [p.grad for p in self._params if p.grad is not None]
        norm = torch.nn.utils.get_total_norm(grads, norm_type=2.0, foreach=True)
        if self._first_step_grads is None:  # for measured_memory()
            self._first_step_grads = tensor_bytes(grads)
        if clip > 0:
            torch.nn.utils.clip_grads_with_norm_(self._params, clip, norm, foreach=True)
        if self.scaler:  # it skips a step with inf/NaN gradients by itself and halves the scale
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            fault.step_unless_nonfinite(self.optimizer, norm)
        self.optimizer.zero_grad(set_to_none=True)
        return norm

    # Replicas are identical, so rank 0 writes the state and every rank reads it. Both files are hashed as
    # they are written (the checkpoint's manifest).
    def save(self, path: Path) -> None:
        if self.env.is_main:
            tensors = self._module.state_dict() if self.saves_frozen else self._saved_tensors()
            kept, removed = integrity.dedupe_shared(tensors)  # a tied embedding is stored once
            integrity.save_safetensors(kept, path / "model.safetensors", removed)
            state = {"optimizer": self.optimizer.state_dict()}
            if self.scaler:
                state["scaler"] = self.scaler.state_dict()
            integrity.save_torch(state, path / "optimizer.pt")

    def load(self, path: Path) -> None:
        if self.saves_frozen:
            load_model(self._module, str(path / "model.safetensors"), strict=True, device=str(self.env.device))
        else:
            saved = load_file(str(path / "model.safetensors"), device=str(self.env.device))
            expected = self._saved_tensors().keys()
            if saved.keys() != expected:
                raise RuntimeError(f"{path} does not hold this model's trainable parameters "
                                   f"(missing {sorted(expected - saved.keys())[:3]}, "
                                   f"unexpected {sorted(saved.keys() - expected)[:3]})")
            self._module.load_state_dict(saved, strict=False)
        state = torch.load(path / "optimizer.pt", map_location=self.env.device, weights_only=True)
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scaler and "scaler" in state:
            self.scaler.load_state_dict(state["scaler"])

    def _saved_tensors(self) -> dict[str, torch.Tensor]:
        """What a checkpoint holds when frozen parameters are left out: trainable parameters and buffers."""
        state = self._module.state_dict()
        frozen = {n for n, p in self._module.named_parameters(remove_duplicate=False) if not p.requires_grad}
        return {k: v.detach().contiguous() for k, v in state.items() if k not in frozen}

    def load_resharded(self, path: Path, saved_world_size: int) -> None:
        self.load(path)  # every rank holds the whole model and optimizer: nothing is sharded

    def loss_scale(self) -> float | None:
        return float(self.scaler.get_scale()) if self.scaler else None

    def full_state_dict(self):
        if not self.env.is_main:
            return None
        return {k: v.detach().float().cpu() for k, v in self._module.hf.state_dict().items()}

    def close(self) -> None:
        # The DDP wrapper's reducer holds the process group. Dropped here, before dist.shutdown(), the group
        # is destroyed (its gloo worker threads joined) while Python is alive; left to interpreter exit, a
        # worker releasing its last tensor of a finished all-reduce needs the GIL, gets pthread_exit instead,
        # and the whole process aborts ("terminate called without an active exception") after a good run.
        self._wrapped = None
        gc.collect()

    def memory_report(self) -> dict[str, int]:
        params = sum(p.numel() * p.element_size() for p in {id(p): p for p in self._module.parameters()}.values())
        trainable = sum(p.numel() * p.element_size() for p in self._params)
        return {"params": params, "grads": trainable, "optimizer": 2 * trainable}
