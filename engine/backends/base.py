"""The small interface between the training loop and a parallelism backend.

One optimizer step, as `Trainer.train_step` drives it:

    for i, micro_batch in enumerate(micro_batches):
        last = i == len(micro_batches) - 1
        with backend.accumulate(last), backend.autocast():
            loss = backend.model(**micro_batch)            # summed loss of this micro-batch
            backend.backward(loss * scale, last)           # scale = world / global target count
    grad_norm = backend.step(lr, clip)                     # clip, update, zero grads

`scale` makes every rank's gradient a share of the global mean, and the backends' data-parallel
reductions AVERAGE over ranks, hence the factor `world`. A backend that scales the loss on its own
(DeepSpeed divides by gradient_accumulation_steps) undoes that inside `backward`.
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from pathlib import Path

import torch
from torch import nn

from engine.config import Config
from engine.dist import DistEnv


def tensor_bytes(tensors) -> int:
    """Bytes of the distinct storages behind `tensors` (views and shared tensors count once)."""
    seen: dict[int, int] = {}
    for t in tensors:
        if t is None or t.numel() == 0:
            continue
        storage = t.untyped_storage()
        seen[storage.data_ptr() or id(storage)] = storage.nbytes()
    return sum(seen.values())


class Backend(ABC):
    name: str = "base"

    def __init__(self, cfg: Config, env: DistEnv):
        self.cfg, self.env = cfg, env

    # --- construction ------------------------------------------------------------------------------
    def construct(self) -> contextlib.AbstractContextManager:
        """Context to build the model in (ZeRO-3 partitions parameters as they are created)."""
        return contextlib.nullcontext()

    def adapting(self) -> contextlib.AbstractContextManager:
        """Context for model.freeze / LoRA, applied to the built model after `construct()` (ZeRO-3 must not
        partition the new adapters; FSDP records them like the rest of the build)."""
        return contextlib.nullcontext()

    @abstractmethod
    def setup(self, module: nn.Module, param_groups: list[dict]) -> None:
        """Move/shard `module`, wrap it for data parallelism and create the optimizer."""

    def compile(self) -> None:
        """torch.compile the training forward (model.compile=true)."""
        raise NotImplementedError(f"model.compile is not supported by the {self.name} backend yet")

    @property
    def param_dtype(self) -> torch.dtype:
        """dtype the trained module's parameters live (and compute) in: float32, unless the backend keeps
        16-bit parameters itself (DeepSpeed bf16/fp16); the export check reloads the export in it."""
        return torch.float32

    # --- the step ------------------------------------------------------------------------------------
    @property
    @abstractmethod
    def model(self) -> nn.Module:
        """What the loop calls for a training forward (the DDP/DeepSpeed wrapper)."""

    @property
    @abstractmethod
    def module(self) -> nn.Module:
        """The unwrapped TrainModule, for evaluation (every rank calls it the same number of times)."""

    def accumulate(self, last: bool) -> contextlib.AbstractContextManager:
        """Context for one micro-batch's forward+backward; gradients are synchronized only when `last`."""
        return contextlib.nullcontext()

    def autocast(self) -> contextlib.AbstractContextManager:
        p = self.cfg.train.precision
        if p == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(self.env.device.type, dtype=torch.bfloat16 if p == "bf16" else torch.float16)

    @abstractmethod
    def backward(self, loss: torch.Tensor, last: bool) -> None:
        """Accumulate gradients of `loss` (already scaled to the global mean)."""

    def forward_extras(self, local_count: torch.Tensor) -> dict:
        """Extra keyword arguments of this step's training forwards. fp16: `grad_scale`, the gradient the
        backward will bring to the summed loss (loss scale / this rank's target count, which approximates
        loss scale x world / global count), for the chunked LM loss that computes gradients in its forward."""
        return {}

    @abstractmethod
    def step(self, lr: float, clip: float) -> torch.Tensor:
        """Set the lr (`set_lr`: each param group's `lr_scale` applies), clip to `clip` (0: off), update,
        clear grads; returns the pre-clip global grad norm as a device tensor (reading it is the caller's
        sync point).

        When that norm is non-finite (NaN/inf anywhere, on any rank: the norm is global) the update is
        skipped and weights and optimizer state stay exactly as they were (fault.step_unless_nonfinite);
        fp16 loss scaling backs off instead. The trainer counts the skips from the returned norm."""

    # --- state ---------------------------------------------------------------------------------------
    @property
    def saves_frozen(self) -> bool:
        """Whether `save` writes frozen parameters. A LoRA run's checkpoints leave its frozen base out (it is
        rebuilt from model.name on resume): they hold the adapters, the classifier and their optimizer state,
        a few MB instead of the whole model. `load` then restores only what was saved."""
        return not self.cfg.model.lora_rank

    @abstractmethod
    def save(self, path: Path) -> None:
        """Write model + optimizer state under `path` (frozen parameters only if `saves_frozen`); every
        rank calls it.

        Digests (engine/integrity.py): write your own files with `integrity.save_torch` /
        `save_safetensors` / `write_bytes` (hashed as they are written), and call `integrity.record(path)`
        for each file a library wrote on this rank (hashed by this rank right away). Files nobody
        recorded are still found and hashed, by all ranks after the save's barrier."""

    @abstractmethod
    def load(self, path: Path) -> None:
        """Restore what `save` wrote; every rank calls it."""

    def load_resharded(self, path: Path, saved_world_size: int) -> None:
        """Restore a checkpoint that `saved_world_size` ranks wrote into this job of another size.
        Backends that keep full replicas read it as usual; sharded ones convert or re-partition."""
        from engine.errors import UsageError

        raise UsageError(f"the {self.name} backend cannot resume a checkpoint written by {saved_world_size} ranks "
                         f"on {self.env.world_size}; resume with {saved_world_size} ranks")

    def loss_scale(self) -> float | None:
        """The current dynamic loss scale (fp16), read at log steps; None without loss scaling."""
        return None

    @abstractmethod
    def full_state_dict(self) -> dict[str, torch.Tensor] | None:
        """The complete, unsharded fp32 weights of the transformers model on rank 0 (None elsewhere);
        every rank calls it (ZeRO-3 gathers)."""

    def memory_report(self) -> dict:
        """Planned bytes per rank of parameters, gradients and optimizer state for this backend's layout."""
        return {}

    def measured_memory(self) -> dict:
        """Bytes this rank holds now, counted from live tensors (called once, after the first step):
        parameters, optimizer state, and the gradients seen at that step; plus the device's peak."""
        module = self.module
        params = list({id(p): p for p in module.parameters()}.values())
        optimizer = getattr(self, "optimizer", None)
        state = [t for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t)] if optimizer else []
        out = {"params": tensor_bytes([p.data for p in params]), "optimizer": tensor_bytes(state),
               "grads": getattr(self, "_first_step_grads", None) or 0}
        if self.env.device.type == "cuda":
            out["cuda_max_allocated"] = int(torch.cuda.max_memory_allocated(self.env.device))
        return out

    def close(self) -> None:
        pass


def device_peaks(device: torch.device) -> dict:
    """The process's peak memory: the device allocator's on CUDA, the host's resident set elsewhere."""
    if device.type == "cuda":
        return {"cuda_max_allocated": int(torch.cuda.max_memory_allocated(device))}
    import resource

    return {"host_max_rss": int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024}


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """This step's learning rate on every param group, times the group's `lr_scale` when it has one
    (discriminative learning rates, a classifier's own lr: see engine/transfer.py)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
