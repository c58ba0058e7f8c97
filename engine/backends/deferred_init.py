"""Build a model on the meta device while recording what one process would have computed; replay it later,
one parameter at a time, into whatever shards a sharding backend keeps.

Why. A sharded run must start from the weights that one process builds from the same seed (so every
backend trains the same model), yet no rank may hold the whole model. One process builds the model with
real CPU tensors: the constructors draw from the global RNG (GPT-2's Conv1D and nn.Embedding initialize
themselves), transformers' `post_init` draws again module by module, padding the vocabulary draws a new
embedding and copies the old rows into it, LoRA draws its A matrices, and so on. Rewriting that sequence
for the sharded case would copy transformers' logic and silently drift from it.

How. `Recorder` is a TorchDispatchMode under which the very same construction code runs unchanged, with the
process's default device still CPU (so transformers does NOT skip its initialization, as it would under
`torch.device("meta")`). Every factory op that would allocate on the CPU allocates on the meta device
instead, and every op that touches a meta tensor is appended to an event log:

- a tensor is named by its storage (views and Parameters share their base's storage) plus its
  dtype/size/stride/offset, so in-place writes through views (`weight.data[:n] = old[:n]`) replay right;
- a random op (normal_, uniform_, ...) snapshots the generator first, then advances the REAL generator
  by running the same op on a throw-away CPU tensor of the same layout: the random stream after the
  build is exactly one process's, and the draws made later (dropout, data order) are too.

`materialize(ref)` then recomputes one tensor: it walks the log backwards to find the events its storage
depends on (its own writes, and transitively the storages they read), replays only those on real CPU
storage (restoring each random op's generator state first) and returns the full tensor. The backend cuts
its local shard from it and drops it, so a rank holds its shards plus one full tensor (and whatever that
tensor was computed from) at a time.

`external(tensor_loader)` lets a caller write a meta parameter from outside the log (a pretrained weight
read from a file at replay time).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable

import torch
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten
META = torch.device("meta")
CPU = torch.device("cpu")

# Ops that draw from a generator. Anything else that touches a meta tensor is deterministic.
RANDOM_OPS = {
    aten.normal_, aten.uniform_, aten.bernoulli_, aten.random_, aten.exponential_, aten.cauchy_,
    aten.log_normal_, aten.geometric_, aten.normal, aten.bernoulli, aten.randn, aten.rand, aten.randint,
    aten.randperm, aten.randn_like, aten.rand_like, aten.randint_like, aten.multinomial,
}


@dataclasses.dataclass(frozen=True)
class Ref:
    """A recorded tensor: its storage, and the view of that storage it is."""

    key: int
    dtype: torch.dtype
    size: tuple[int, ...]
    stride: tuple[int, ...]
    offset: int
    nbytes: int  # of the whole storage

    def view(self, storage: torch.UntypedStorage) -> torch.Tensor:
        return torch.empty(0, dtype=self.dtype).set_(storage, self.offset, self.size, self.stride)


@dataclasses.dataclass
class Event:
    func: Any  # an OpOverload, or a callable for external writes
    args: Any  # pytree with Refs in place of meta tensors
    kwargs: dict
    out: Any  # pytree of Refs / None, parallel to the op's output
    reads: frozenset
    writes: frozenset  # storages this event creates or writes
    rng: tuple | None  # (generator, state) before a random op


def _storage_key(t: torch.Tensor) -> int:
    return t.untyped_storage()._cdata


class Recorder(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.events: list[Event] = []
        self._alive: list[torch.Tensor] = []  # keep every meta tensor, so storage addresses are never reused
        self._known: set[int] = set()
        self._virtual: set[int] = set()  # storages one process has on the CPU (the rest are really meta)
        self._meta_context = 0  # > 0 while an op runs under `with torch.device("meta")`
        self.end_rng: torch.Tensor | None = None
        self.last_peak_bytes = 0  # bytes of full storages the last materialize() held at once

    # --- recording -----------------------------------------------------------------------------------
    def ref(self, t: torch.Tensor) -> Ref:
        s = t.untyped_storage()
        return Ref(s._cdata, t.dtype, tuple(t.shape), tuple(t.stride()), t.storage_offset(), s.nbytes())

    def _is_meta(self, x) -> bool:
        return isinstance(x, torch.Tensor) and x.device.type == "meta"

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        leaves = pytree.tree_leaves((args, kwargs))
        metas = [x for x in leaves if self._is_meta(x)]
        device = None if kwargs.get("device") is None else torch.device(kwargs["device"])
        if not metas and ("device" not in kwargs or not _is_factory(func) or device not in (None, CPU, META)):
            return func(*args, **kwargs)  # a real op on real tensors (or another device): not ours
        # Where one process has this op's result: on the CPU ("virtual": recorded here, replayed later), or
        # really on the meta device (the code asked for meta, e.g. from_pretrained's skeleton: no values, and
        # random ops on it draw nothing).
        if device == META and self._meta_context:
            virtual = False
        elif device in (CPU, META) or not metas:  # meta outside a meta context: a recorded tensor's device
            virtual = True
            kwargs["device"] = META
        else:
            virtual = any(_storage_key(x) in self._virtual for x in metas)
        random = func.overloadpacket in RANDOM_OPS
        rng = None
        if random and virtual:
            gen = kwargs.get("generator") or torch.default_generator
            if gen is not torch.default_generator:
                raise RuntimeError(f"deferred init: {func} draws from its own generator; only the default CPU "
                                   f"generator's draws are replayed")
            rng = (gen, gen.get_state())
            self._advance(func, args, kwargs)
        out = func(*args, **kwargs)
        if random and not virtual:
            return out  # one process draws nothing for a meta tensor, and its values mean nothing
        values = list(args) + [kwargs.get(a.name) for a in func._schema.arguments[len(args):]]
        written = {_storage_key(v) for a, v in zip(func._schema.arguments, values)
                   if a.alias_info is not None and a.alias_info.is_write and self._is_meta(v)}
        created = set()
        for t in pytree.tree_leaves(out):
            if self._is_meta(t):
                self._alive.append(t)
                k = _storage_key(t)
                if k not in self._known:
                    created.add(k)
                    self._known.add(k)
                    if virtual:
                        self._virtual.add(k)
        if func.is_view and not written:
            return out  # a view: named through its storage, nothing to replay
        for t in metas:
            self._alive.append(t)
            self._known.add(_storage_key(t))
        to_ref = lambda x: self.ref(x) if self._is_meta(x) else x  # noqa: E731
        # replayed on the CPU (what one process does, or garbage for real meta tensors that nothing reads)
        replay_kwargs = {k: (CPU if k == "device" and v is not None else v) for k, v in kwargs.items()}
        self.events.append(Event(
            func=func, args=pytree.tree_map(to_ref, args), kwargs=pytree.tree_map(to_ref, replay_kwargs),
            out=pytree.tree_map(lambda x: self.ref(x) if self._is_meta(x) else None, out),
            reads=frozenset(_storage_key(x) for x in metas), writes=frozenset(written | created), rng=rng))
        return out

    def _advance(self, func, args, kwargs) -> None:
        """Run a random op on scratch CPU tensors of the same layout: the generator moves as in one process."""
        def scratch(x):
            if self._is_meta(x):
                return torch.empty_strided(x.shape, x.stride(), dtype=x.dtype, device=CPU)
            return x

        kw = {k: (CPU if k == "device" else scratch(v)) for k, v in kwargs.items()}
        func(*pytree.tree_map(scratch, args), **kw)

    def external(self, target: torch.Tensor, loader: Callable[[], torch.Tensor]) -> None:
        """Record a full overwrite of the meta tensor `target` by `loader()` (called at replay time)."""
        self._alive.append(target)
        key = _storage_key(target)
        self._known.add(key)
        self._virtual.add(key)
        self.events.append(Event(func=_ExternalWrite(loader), args=(self.ref(target),), kwargs={}, out=None,
                                 reads=frozenset(), writes=frozenset({key}), rng=None))

    def __enter__(self):
        # A dispatch mode is thread-local: transformers' loader must run its copies on this thread.
        self._async_load = os.environ.get("HF_DEACTIVATE_ASYNC_LOAD")
        os.environ["HF_DEACTIVATE_ASYNC_LOAD"] = "1"
        # `with torch.device("meta")` (transformers builds from_pretrained's skeleton in it) gives factory ops
        # device=meta, just like code that passes a recorded tensor's device; only the context means "meta in
        # one process too". Its mode is invisible from inside dispatch, so its handler raises a flag.
        from torch.utils._device import DeviceContext

        self._device_context_handler = DeviceContext.__torch_function__
        recorder, handler = self, self._device_context_handler

        def watched(mode, func, types, args=(), kwargs=None):
            if mode.device.type != "meta":
                return handler(mode, func, types, args, kwargs)
            recorder._meta_context += 1
            try:
                return handler(mode, func, types, args, kwargs)
            finally:
                recorder._meta_context -= 1

        DeviceContext.__torch_function__ = watched
        return super().__enter__()

    def __exit__(self, *exc):
        from torch.utils._device import DeviceContext

        DeviceContext.__torch_function__ = self._device_context_handler
        self.end_rng = torch.get_rng_state()
        if self._async_load is None:
            os.environ.pop("HF_DEACTIVATE_ASYNC_LOAD", None)
        else:
            os.environ["HF_DEACTIVATE_ASYNC_LOAD"] = self._async_load
        return super().__exit__(*exc)

    # --- replay --------------------------------------------------------------------------------------
    def materialize(self, refs: list[Ref]) -> list[torch.Tensor]:
        """The full CPU values of `refs` (views of one or more recorded storages), computed by replaying
        only the events they depend on; each intermediate storage is freed after its last use, and
        `last_peak_bytes` says how much was alive at once. The global generator is left as it was."""
        need = {r.key for r in refs}
        chosen: list[Event] = []
        for e in reversed(self.events):
            if e.writes & need:
                chosen.append(e)
                need |= e.reads
        chosen.reverse()
        targets = {r.key for r in refs}
        last_use = {}
        for i, e in enumerate(chosen):
            for key in e.reads | e.writes:
                last_use[key] = i
        storages: dict[int, torch.UntypedStorage] = {}
        saved = torch.get_rng_state()
        peak = 0

        def real(x):
            if isinstance(x, Ref):
                if x.key not in storages:  # written before it was ever created in the log: cannot happen
                    raise RuntimeError(f"deferred init: storage {x.key} is used before it is created")
                return x.view(storages[x.key])
            return x

        try:
            for i, e in enumerate(chosen):
                if isinstance(e.func, _ExternalWrite):
                    (target,) = e.args
                    storages.setdefault(target.key, torch.UntypedStorage(target.nbytes))
                    value = e.func.loader()
                    dest = target.view(storages[target.key])
                    if tuple(value.shape) != tuple(dest.shape):
                        raise RuntimeError(f"deferred init: loaded shape {tuple(value.shape)} != {tuple(dest.shape)}")
                    dest.copy_(value)
                    transient = value.untyped_storage().nbytes()
                    del value
                else:
                    if e.rng is not None:
                        gen, state = e.rng
                        gen.set_state(state)
                    out = e.func(*pytree.tree_map(real, e.args), **pytree.tree_map(real, e.kwargs))
                    for ref, value in zip(pytree.tree_leaves(e.out), pytree.tree_leaves(out)):
                        if isinstance(ref, Ref) and ref.key not in storages and isinstance(value, torch.Tensor):
                            storages[ref.key] = value.untyped_storage()
                    transient = 0
                    del out
                peak = max(peak, transient + sum(s.nbytes() for s in storages.values()))
                for key in [k for k in storages if last_use.get(k, -1) <= i and k not in targets]:
                    del storages[key]
        finally:
            torch.set_rng_state(saved)
        self.last_peak_bytes = peak
        return [r.view(storages[r.key]) if r.key in storages else _missing(r) for r in refs]


def _missing(ref: Ref) -> torch.Tensor:
    raise RuntimeError(f"deferred init: nothing in the log writes a tensor of shape {ref.size}")


class _ExternalWrite:
    def __init__(self, loader: Callable[[], torch.Tensor]):
        self.loader = loader


def _is_factory(func) -> bool:
    """An op that creates a tensor from nothing but sizes/values (it takes a `device` and no tensor input)."""
    schema = func._schema
    return any(a.name == "device" for a in schema.arguments) and not any(
        isinstance(a.type, torch.TensorType) for a in schema.arguments)


# ------------------------------------------------------------------------------ pretrained weights, lazily

_SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                       "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
                       "BOOL": torch.bool}


def pretrained_tensors(name: str) -> dict[str, tuple[tuple, torch.dtype, Callable[[], torch.Tensor]]]:
    """Every tensor of a Hugging Face model's weight files (a local directory or a hub id, through the hub
    cache): name -> (shape, dtype, a function reading that one tensor). Only the files' headers are read
    here; safetensors, sharded with an index or not, or pytorch_model.bin (weights-only, memory-mapped)."""
    import functools

    out = {}
    for path in weight_files(name):
        if path.endswith(".safetensors"):
            from safetensors import safe_open

            with safe_open(path, framework="pt") as f:
                for key in f.keys():
                    part = f.get_slice(key)
                    out[key] = (tuple(part.get_shape()), _SAFETENSORS_DTYPES[part.get_dtype()],
                                functools.partial(_read_safetensors, path, key))
        else:
            for key, t in torch.load(path, map_location="cpu", weights_only=True, mmap=True).items():
                out[key] = (tuple(t.shape), t.dtype, functools.partial(_read_torch, path, key))
    return out


def _read_safetensors(path: str, key: str) -> torch.Tensor:
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        return f.get_tensor(key)


def _read_torch(path: str, key: str) -> torch.Tensor:
    return torch.load(path, map_location="cpu", weights_only=True, mmap=True)[key].clone()


def weight_files(name: str) -> list[str]:
    """The weight files of a model directory or hub id, in the order transformers prefers them."""
    import json
    import os

    def find(filename: str) -> str | None:
        if os.path.isdir(name):
            path = os.path.join(name, filename)
            return path if os.path.isfile(path) else None
        from transformers.utils import cached_file

        return cached_file(name, filename, _raise_exceptions_for_missing_entries=False,
                           _raise_exceptions_for_connection_errors=False)

    for single, index in (("model.safetensors", "model.safetensors.index.json"),
                          ("pytorch_model.bin", "pytorch_model.bin.index.json")):
        path = find(single)
        if path:
            return [path]
        path = find(index)
        if path:
            with open(path, encoding="utf-8") as f:
                shards = sorted(set(json.load(f)["weight_map"].values()))
            found = [find(s) for s in shards]
            if all(found):
                return found
    raise FileNotFoundError(f"{name}: no model.safetensors, pytorch_model.bin or their sharded index")
