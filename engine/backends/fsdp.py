"""PyTorch FSDP2 (`torch.distributed.fsdp.fully_shard`) behind the same small interface as DDP and DeepSpeed.

Layout. Each GPT-2 block is one FSDP group, the root (embeddings, final LayerNorm, the tied LM head or the
classifier) another, all on one DeviceMesh: 1-D `(shard,)` of every rank, or with `dist.fsdp_replicate=R`
the 2-D HSDP mesh `(replicate=R, shard=world/R)`: parameters, gradients and optimizer state are sharded
within a replica group (a node) and replicated across them. A sharded parameter is an fp32 DTensor
holding 1/shard of every tensor; the optimizer steps those shards, so its master weights are fp32.

    dist.reshard_after_forward=true    every group frees its gathered weights after its forward and gathers
                                       them again in backward (ZeRO-3-like); false keeps them until its
                                       backward (ZeRO-2-like)
    train.precision=bf16               MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32): bf16
                                       compute, fp32 gradient reduction, fp32 sharded master weights
    train.precision=fp16               the same in fp16, with torch's ShardedGradScaler (its inf/NaN check is
                                       reduced over the ranks, so every rank skips the same steps)
    dist.offload=cpu                   CPUOffloadPolicy: sharded parameters, gradients and the optimizer step
                                       live on the CPU; only the gathered weights of the running group are on
                                       the device

The loop's protocol, as this backend implements it:

    accumulate(last)                   dist.fsdp_grad_sync=micro_batch (default): every micro-batch's backward
                                       reduce-scatters its gradients into the fp32 shards, where they add up
                                       (a reduce-scatter of sums is the sum of reduce-scatters: exact, and
                                       gradients stay 1/shard). Under HSDP the all-reduce across replicas
                                       waits for the last micro-batch. fsdp_grad_sync=step: no gradient
                                       communication before the last micro-batch (set_requires_gradient_sync
                                       (False)): full-size gradients accumulate, one reduce-scatter per step
    backward(loss * world / count)     loss.backward(); FSDP's reduce-scatter averages over ranks like DDP
    step(lr, clip)                     global norm of the sharded gradients (one all-reduce of the squared
                                       shard norms), clip, AdamW on the shards unless the norm is non-finite

Collectives per optimizer step with L blocks (L + 1 FSDP groups with the root) and A micro-batches, counted
on 2 gloo ranks with L = A = 2 (tests/distributed/test_communication.py asserts the default and
fsdp_grad_sync=step rows):

    default (reshard_after_forward=true, fsdp_grad_sync=micro_batch)
        all-gathers      2 A (L + 1)   each group gathered for its forward and again for its backward
        reduce-scatters  A (L + 1)     each group's gradients, after every micro-batch's backward
        all-reduces      2             the trainer's target count (+ preemption flag), the gradient norm
    reshard_after_forward=false        all-gathers A (L + 1): kept from forward to backward
    fsdp_grad_sync=step                reduce-scatters L + 1: only the last micro-batch's backward
    HSDP (fsdp_replicate > 1)          + (L + 1) all-reduces across the replica groups, after the last
                                       micro-batch only (the shards add up locally before)

Construction never holds the whole model: the trainer builds it inside `construct()`/`adapting()`, where
engine/backends/deferred_init.py records it on the meta device (random init, transformers' from_pretrained
with the weights read lazily from their files, vocabulary padding, LoRA, ...). `setup()` shards the meta
model, allocates only this rank's shards and replays the record one tensor at a time into them: the weights
are exactly one process's (same seed, same random stream), a rank holds its shards plus one full tensor
at a time (`init_peak_bytes` in the memory report).

Checkpoints are torch.distributed.checkpoint (DCP) directories inside the engine's atomic checkpoint:

    <ckpt>/fsdp/layout.json           {"world_size", "mesh", "dtype", "saves_frozen", "optimizer_state",
                                       "grad_sync"}
    <ckpt>/fsdp/.metadata             DCP's index: every tensor's global shape and which file holds which chunk
    <ckpt>/fsdp/__R_0.distcp          rank R's chunks: "model.<name>" (fp32 shards) and "optim.state.<name>.*"
                                      (Adam moments and step), "optim.param_groups.*" (hyperparameters)
    <ckpt>/fsdp/scaler.pt             fp16 only: the loss scaler's state (identical on every rank)

Every file above has its digest in the checkpoint's MANIFEST.json (engine/integrity.py): each rank hashes the
chunk files it wrote right after DCP writes them, rank 0 also the index; they are checked before resume/export.

DCP re-shards on load, so a checkpoint resumes on any world size and mesh shape, optimizer state included.
`full_state_from_checkpoint` reads the full weights offline, without a process group, for `ftl export`.
Reading never unpickles arbitrary objects: DCP's index is read by an unpickler that allows only DCP's own
metadata classes, and its non-tensor entries with torch.load(weights_only=True).
"""

from __future__ import annotations

import contextlib
import gc
import io
import json
import pickle
import warnings
from pathlib import Path

import torch
from torch import nn

from engine import dist, fault, fastpath, integrity, model as model_lib, optim
from engine.backends.base import Backend, device_peaks, set_lr, tensor_bytes
from engine.backends.deferred_init import Recorder, pretrained_tensors
from engine.errors import UsageError

CKPT_SUBDIR = "fsdp"
LAYOUT = "layout.json"
SCALER = "scaler.pt"


def _fsdp_api():
    from torch.distributed.fsdp import (CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard,
                                        register_fsdp_forward_method)

    return CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard, register_fsdp_forward_method


def problems(cfg, world_size: int) -> list[str]:
    """What dist.backend=fsdp cannot honour for this config and world size (every rank finds the same)."""
    out = []
    r = cfg.dist.fsdp_replicate
    if r >= 1 and world_size % r:  # (< 1 is a config error, reported by validation)
        out.append(f"dist.fsdp_replicate={r} does not divide the {world_size} ranks of this job: HSDP needs "
                   f"replica groups of equal size (use a divisor of {world_size}, e.g. the number of nodes)")
    if cfg.train.precision == "fp16" and not _sharded_scaler_available():
        out.append("train.precision=fp16 under dist.backend=fsdp needs torch's ShardedGradScaler, which this torch "
                   "lacks; use train.precision=bf16 (or fp32)")
    return out


def _sharded_scaler_available() -> bool:
    try:
        from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler  # noqa: F401
    except ImportError:
        return False
    return True


class FSDPBackend(Backend):
    name = "fsdp"

    def __init__(self, cfg, env):
        super().__init__(cfg, env)
        found = problems(cfg, env.world_size)
        if found:
            raise UsageError(found, hint="See docs/distributed.md, FSDP.")
        self._own_group = not torch.distributed.is_initialized()
        if self._own_group:
            dist.init_single_process_group(env.device)  # fully_shard needs a process group, even of one
        from torch.distributed.device_mesh import init_device_mesh

        r = cfg.dist.fsdp_replicate
        shape, names = ((r, env.world_size // r), ("replicate", "shard")) if r > 1 else ((env.world_size,), ("shard",))
        self.mesh = init_device_mesh(env.device.type, shape, mesh_dim_names=names)
        self.shard_group = self.mesh.get_group("shard")
        self.shard_world = shape[-1]
        self.offload = cfg.dist.offload == "cpu"
        # where sharded parameters, gradients and optimizer state live
        self.state_device = torch.device("cpu") if self.offload else env.device
        self.recorder: Recorder | None = None
        self._module: nn.Module | None = None
        self.optimizer = None
        self.scaler = None
        self._first_step_grads: int | None = None
        self.init_peak_bytes = 0

    # --- construction ---------------------------------------------------------------------------------
    @property
    def param_dtype(self) -> torch.dtype:
        return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.cfg.train.precision, torch.float32)

    def construct(self):
        return self._recording()

    def adapting(self):
        return self._recording()

    @contextlib.contextmanager
    def _recording(self):
        if self.recorder is None:
            self.recorder = Recorder()
        with self.recorder, model_lib.pretrained_state_dict(self._lazy_pretrained):
            yield

    def _lazy_pretrained(self, name: str) -> dict[str, torch.Tensor]:
        """A pretrained checkpoint's tensors as meta placeholders whose values are read from the files at
        replay time, one tensor at a time (transformers' from_pretrained runs unchanged on them)."""
        state = {}
        for key, (shape, dtype, load) in pretrained_tensors(name).items():
            t = torch.empty(shape, dtype=dtype)  # recorded: a meta tensor
            self.recorder.external(t, load)
            state[key] = t
        return state

    def setup(self, module: nn.Module, param_groups: list[dict]) -> None:
        CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard, register_forward = _fsdp_api()
        names = {id(p): n for n, p in module.named_parameters()}
        groups = [dict(g, params=[names[id(p)] for p in g["params"]]) for g in param_groups]
        deferred = self._deferred_targets(module)

        low = self.param_dtype if self.param_dtype != torch.float32 else None
        common = dict(mesh=self.mesh,
                      offload_policy=(CPUOffloadPolicy(pin_memory=self.env.device.type == "cuda") if self.offload
                                      else OffloadPolicy()))
        reshard = bool(self.cfg.dist.reshard_after_forward)
        for block in module.hf.transformer.h:
            fully_shard(block, reshard_after_forward=reshard,
                        mp_policy=MixedPrecisionPolicy(param_dtype=low, reduce_dtype=torch.float32), **common)
        # The root: embeddings, final LayerNorm, LM head / classifier. Its inputs are never cast (cls sample
        # weights stay fp32). It follows the same setting: the tied embedding is GPT-2's largest tensor, and an
        # evaluation forward (no backward) must not leave it gathered.
        fully_shard(module, reshard_after_forward=reshard,
                    mp_policy=MixedPrecisionPolicy(param_dtype=low, reduce_dtype=torch.float32,
                                                   cast_forward_inputs=False), **common)
        register_forward(module, "logits")  # evaluation and the export check call it outside forward()
        if deferred is not None:
            module.to_empty(device=self.state_device)
            self._fill(module, deferred)
        self._module = module
        params = dict(module.named_parameters())
        self._params = [params[n] for g in groups for n in g["params"]]
        self.optimizer = optim.adamw([dict(g, params=[params[n] for n in g["params"]]) for g in groups],
                                     self.cfg.optim, self.state_device)
        if self.cfg.train.precision == "fp16":
            from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

            self.scaler = ShardedGradScaler(self.env.device.type, growth_interval=self.cfg.train.loss_scale_window,
                                            process_group=self.shard_group)

    def _deferred_targets(self, module: nn.Module):
        """Every parameter and buffer of the recorded (meta) model: storage -> (its Ref, its names); real
        tensors (built outside the record) are kept by value. None when the module is real already."""
        tensors = list(module.named_parameters(remove_duplicate=False)) + list(module.named_buffers(remove_duplicate=False))
        if not any(t.is_meta for _, t in tensors):
            return None
        if self.recorder is None:
            raise RuntimeError("the model is on the meta device but was not built inside the backend's construct()")
        by_storage: dict[int, tuple] = {}
        real: dict[str, torch.Tensor] = {}
        for name, t in tensors:
            if t.is_meta:
                ref = self.recorder.ref(t)
                by_storage.setdefault((ref.key, ref.offset, ref.size, ref.stride), (ref, []))[1].append(name)
            else:
                real[name] = t.detach().clone()
        return list(by_storage.values()), real

    @torch.no_grad()
    def _fill(self, module: nn.Module, deferred) -> None:
        """Replay each recorded tensor in full, keep this rank's shard of it, drop the rest."""
        recorded, real = deferred
        for ref, names in recorded:
            (full,), peak = self.recorder.materialize([ref]), self.recorder.last_peak_bytes
            self.init_peak_bytes = max(self.init_peak_bytes, peak)
            for name in names:
                self._write(module, name, full)
            del full
        for name, value in real.items():
            self._write(module, name, value)
        self.recorder = None  # the record and its meta tensors are no longer needed
        gc.collect()

    def _write(self, module: nn.Module, name: str, full: torch.Tensor) -> None:
        """Copy this rank's slice of `full` (a CPU tensor) into the parameter or buffer `name`: only the slice
        travels to the device, no communication."""
        from torch.distributed.tensor import DTensor
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

        owner, _, leaf = name.rpartition(".")
        target = getattr(module.get_submodule(owner) if owner else module, leaf)
        if isinstance(target, DTensor):
            shape, offset = compute_local_shape_and_global_offset(full.shape, target.device_mesh, target.placements)
            piece = full[tuple(slice(o, o + n) for o, n in zip(offset, shape))]
            target.to_local().copy_(piece)
        else:
            target.copy_(full)

    def _reshard(self) -> None:
        """Every group back to its shards (after an evaluation forward with reshard_after_forward=false the
        gathered weights are still registered), before anything reads or writes the sharded state."""
        from torch.distributed.fsdp import FSDPModule

        for m in self._module.modules():
            if isinstance(m, FSDPModule):
                m.reshard()

    def compile(self) -> None:
        # One compiled graph per block, FSDP's gather/reduce hooks outside it (dynamo skips FSDP hooks): the
        # communication stays where FSDP schedules it.
        backend, kwargs = fastpath.compile_options(self.cfg.perf)
        for block in self._module.hf.transformer.h:
            block.compile(backend=backend, **kwargs)

    # --- the step -----------------------------------------------------------------------------------
    @property
    def model(self) -> nn.Module:
        return self._module

    @property
    def module(self) -> nn.Module:
        return self._module

    def autocast(self):
        # FSDP's mixed precision already casts the gathered weights: no autocast on top.
        return contextlib.nullcontext()

    @contextlib.contextmanager
    def accumulate(self, last: bool):
        if self.cfg.dist.fsdp_grad_sync == "step":
            self._module.set_requires_gradient_sync(last)
        elif self.cfg.dist.fsdp_replicate > 1:
            self._module.set_requires_all_reduce(last)  # reduce-scatter now, all-reduce across replicas once
        yield

    def backward(self, loss: torch.Tensor, last: bool) -> None:
        (self.scaler.scale(loss) if self.scaler else loss).backward()

    def step(self, lr: float, clip: float) -> torch.Tensor:
        set_lr(self.optimizer, lr)
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        grads = [p.grad.to_local() for p in self._params if p.grad is not None]
        if self._first_step_grads is None:  # for measured_memory()
            self._first_step_grads = tensor_bytes(grads)
        norm = self._global_norm(grads)
        if clip > 0 and grads:  # as torch.nn.utils.clip_grads_with_norm_ does for DDP
            coef = torch.clamp(clip / (norm + 1e-6), max=1.0)
            torch._foreach_mul_(grads, coef.to(grads[0].device))
        if self.scaler:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            fault.step_unless_nonfinite(self.optimizer, norm.to(self.state_device))
        self.optimizer.zero_grad(set_to_none=True)
        return norm

    def _global_norm(self, local_grads: list[torch.Tensor]) -> torch.Tensor:
        """L2 norm of the whole gradient: squared norms of this rank's shards, summed over the shard group (the
        replicas of HSDP hold the same shards), one all-reduce on the training device."""
        if local_grads:
            squares = torch.stack([n.float() for n in torch._foreach_norm(local_grads)]).pow(2).sum()
        else:
            squares = torch.zeros((), dtype=torch.float32)
        squares = squares.to(self.env.device)
        if torch.distributed.is_initialized() and self.shard_world > 1:
            torch.distributed.all_reduce(squares, group=self.shard_group)
        return squares.sqrt()

    def loss_scale(self) -> float | None:
        return float(self.scaler.get_scale()) if self.scaler else None

    # --- state -------------------------------------------------------------------------------------------
    def _state_dicts(self, with_optimizer: bool) -> dict:
        from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                             get_optimizer_state_dict)

        options = StateDictOptions(ignore_frozen_params=not self.saves_frozen)
        model = get_model_state_dict(self._module, options=options)
        if not self.saves_frozen:  # also the tied alias of a frozen embedding (lm_head.weight), which DSD keeps
            frozen = {n for n, p in self._module.named_parameters(remove_duplicate=False) if not p.requires_grad}
            model = {k: v for k, v in model.items() if k not in frozen}
        state = {"model": model}
        if with_optimizer:
            state["optim"] = get_optimizer_state_dict(self._module, self.optimizer, options=options)
        return state

    def save(self, path: Path) -> None:
        import torch.distributed.checkpoint as dcp

        root = path / CKPT_SUBDIR
        # An optimizer that has not updated yet (every step so far skipped as non-finite) has no state; asking
        # DCP for it would create some (a zero-lr step: step count 1), and Adam's bias correction would differ
        # from the run that never saved. Such a checkpoint holds no optimizer state, as DDP's holds an empty one.
        started = bool(self.optimizer.state)
        self._reshard()
        dcp.save(self._state_dicts(started), storage_writer=dcp.FileSystemWriter(str(root), sync_files=True))
        # Digests (the checkpoint's manifest): each rank hashes the chunk files it wrote, now, while the page
        # cache holds them; rank 0 also DCP's index, which the coordinator writes once every rank is done.
        # DCP names a rank's files __<rank>_<n>.distcp (n: one per writer thread).
        for written in sorted(root.glob(f"__{self.env.rank}_*.distcp")):
            integrity.record(written)
        if self.env.is_main:
            integrity.record(root / ".metadata")
            if self.scaler:
                integrity.save_torch(self.scaler.state_dict(), root / SCALER)
            layout = {"world_size": self.env.world_size, "mesh": list(self.mesh.shape),
                      "dtype": str(self.param_dtype).removeprefix("torch."), "saves_frozen": self.saves_frozen,
                      "optimizer_state": started, "grad_sync": self.cfg.dist.fsdp_grad_sync}
            integrity.write_bytes(root / LAYOUT, json.dumps(layout, indent=1).encode("utf-8"))

    def load(self, path: Path) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                             set_optimizer_state_dict)

        root = _layout_dir(path)
        layout = json.loads((root / LAYOUT).read_text(encoding="utf-8"))
        started = bool(layout.get("optimizer_state", True))
        self._reshard()
        state = self._state_dicts(started)  # templates: this job's shards, which DCP fills from the saved chunks
        dcp.load(state, storage_reader=SafeReader(str(root)), planner=SafeLoadPlanner())
        options = StateDictOptions(strict=self.saves_frozen)
        set_model_state_dict(self._module, state["model"], options=options)
        if started:  # (DCP loaded the moments in place already; this also restores each group's hyperparameters)
            set_optimizer_state_dict(self._module, self.optimizer, state["optim"], options=options)
        if self.scaler and (root / SCALER).is_file():
            self.scaler.load_state_dict(torch.load(root / SCALER, weights_only=True))

    def load_resharded(self, path: Path, saved_world_size: int) -> None:
        self.load(path)  # DCP maps the saved chunks onto this job's shards, whatever the mesh

    def full_state_dict(self) -> dict[str, torch.Tensor] | None:
        """Gathered fp32 weights on rank 0 (a collective: one all-gather per tensor, each moved to the CPU)."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        self._reshard()
        state = get_model_state_dict(self._module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if not self.env.is_main:
            return None
        prefix = "hf."
        return {k[len(prefix):]: v.detach().float() for k, v in state.items() if k.startswith(prefix)}

    # --- memory ------------------------------------------------------------------------------------------
    def memory_report(self) -> dict:
        """Planned bytes per rank: fp32 parameter shards, fp32 gradient shards (with fsdp_grad_sync=step also
        the full-size gradients of the micro-batches before the last), AdamW's two fp32 moments of the trainable
        shards. The gathered weights of the running block(s) come and go within forward/backward."""
        n_all = sum(p.numel() for p in {id(p): p for p in self._module.parameters()}.values())
        n_train = sum(p.numel() for p in self._params)
        shard = lambda x: -(-x // self.shard_world)  # noqa: E731
        report = {"params": 4 * shard(n_all), "grads": 4 * shard(n_train), "optimizer": 8 * shard(n_train),
                  "world_size": self.env.world_size, "mesh": list(self.mesh.shape),
                  "offloaded": ["params", "grads", "optimizer"] if self.offload else []}
        if self.cfg.dist.fsdp_grad_sync == "step" and self.cfg.train.grad_accum > 1:
            report["grads_during_accumulation"] = 4 * n_train  # full size until the last micro-batch's backward
        return report

    def measured_memory(self) -> dict:
        """What this rank holds now, from live tensors: its parameter shards (with FSDP's padding), the
        optimizer state (and the device it lives on), the gradient shards seen at the first update, and the
        largest full tensor set replayed at construction."""
        self._reshard()
        params = [p.to_local() for p in {id(p): p for p in self._module.parameters()}.values()]
        state = [t.to_local() if hasattr(t, "to_local") else t
                 for s in self.optimizer.state.values() for t in s.values() if torch.is_tensor(t)]
        out = {"params": tensor_bytes(params), "optimizer": tensor_bytes(state),
               "grads": self._first_step_grads or 0, "init_peak_bytes": self.init_peak_bytes,
               "params_device": str(params[0].device) if params else "",
               "optimizer_device": str(state[0].device) if state else ""}
        out.update(device_peaks(self.env.device))
        return out

    def close(self) -> None:
        self._module = None
        self.optimizer = None
        gc.collect()
        if self._own_group:
            dist.shutdown()
            self._own_group = False


# ------------------------------------------------------------------------------------------- safe reading

# Everything a DCP index (.metadata) refers to, as written by torch 2.13: DCP's own metadata records, torch.Size,
# dtypes/layouts/memory formats, and the path the checkpoint was saved to.
_DCP_INDEX_GLOBALS = {
    ("torch.distributed.checkpoint.metadata", name) for name in (
        "Metadata", "TensorStorageMetadata", "BytesStorageMetadata", "ChunkStorageMetadata", "TensorProperties",
        "MetadataIndex", "StorageMeta", "_MEM_FORMAT_ENCODING")
} | {("torch.distributed.checkpoint.filesystem", "_StorageInfo"), ("torch", "Size"),
     ("torch.serialization", "_get_layout"), ("pathlib", "PosixPath"), ("pathlib", "WindowsPath"),
     ("pathlib", "PurePosixPath"), ("pathlib", "PureWindowsPath"), ("collections", "OrderedDict")}


class _IndexUnpickler(pickle.Unpickler):
    """DCP writes its index with pickle and reads it with pickle.load; this reads it allowing only the
    classes above (plain containers need no lookup), so a crafted index cannot run code."""

    def find_class(self, module: str, name: str):
        if (module, name) in _DCP_INDEX_GLOBALS:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), (torch.dtype, torch.layout, torch.memory_format)):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"the checkpoint index refers to {module}.{name}, which a DCP index never "
                                     f"holds; refusing to load it")


def _safe_reader_base():
    import torch.distributed.checkpoint as dcp

    return dcp.FileSystemReader


class SafeReader(_safe_reader_base()):
    """FileSystemReader whose index is read by `_IndexUnpickler` instead of pickle.load."""

    def read_metadata(self, *args, **kwargs):
        from torch.distributed.checkpoint.metadata import StorageMeta

        path = self._get_metadata_path(kwargs.get("rank"))
        with self.fs.create_stream(path, "rb") as f:
            metadata = _IndexUnpickler(io.BytesIO(f.read())).load()
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


def _safe_planner_base():
    from torch.distributed.checkpoint import DefaultLoadPlanner

    return DefaultLoadPlanner


class SafeLoadPlanner(_safe_planner_base()):
    """DefaultLoadPlanner that reads DCP's non-tensor entries (optimizer hyperparameters) weights-only."""

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        obj = torch.load(value, weights_only=True)
        if self.flatten_state_dict:
            from torch.distributed.checkpoint._traverse import set_element

            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
        else:
            self.state_dict[read_item.dest_index.fqn] = obj


def _layout_dir(path: Path) -> Path:
    root = Path(path) / CKPT_SUBDIR
    if not (root / LAYOUT).is_file() or not (root / ".metadata").is_file():
        raise UsageError(f"{path} was not written by the fsdp backend (no {CKPT_SUBDIR}/{LAYOUT} and "
                         f"{CKPT_SUBDIR}/.metadata); resume it with the backend that wrote it")
    return root


# ------------------------------------------------------------------------------------- offline export

def full_state_from_checkpoint(ckpt: Path) -> dict[str, torch.Tensor]:
    """The complete fp32 transformers weights of an fsdp checkpoint, read in this process without a process
    group: DCP assembles every tensor from the chunks the ranks wrote, whatever the mesh."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    root = _layout_dir(ckpt)
    reader = SafeReader(str(root))
    metadata = reader.read_metadata()
    prefix = "model.hf."
    state = {k: torch.empty(tuple(md.size), dtype=md.properties.dtype)
             for k, md in metadata.state_dict_metadata.items()
             if k.startswith(prefix) and isinstance(md, TensorStorageMetadata)}
    if not state:
        raise UsageError(f"{ckpt}: the fsdp checkpoint holds no model weights")
    with warnings.catch_warnings():  # "torch.distributed is disabled ... load in a single process": yes, on purpose
        warnings.simplefilter("ignore", UserWarning)
        dcp.load(state, storage_reader=reader, planner=SafeLoadPlanner(allow_partial_load=True), no_dist=True)
    return {k[len(prefix):]: v.float() for k, v in state.items()}
