"""Observation hooks for tests that run the engine as a subprocess, installed from the test side: a test puts
this directory first on the child's PYTHONPATH and names the hooks in FTL_TEST_HOOKS (comma-separated). Nothing
here is imported by the engine, and with FTL_TEST_HOOKS unset this file does nothing.

  trace_collectives     print `FTL_TEST collective NAME rank=R n=K` to stderr as a rank ENTERS its K-th call of a
                        torch.distributed collective (barrier, all_reduce, gather_object, ...), so a test knows
                        where a rank waits without sleeping
  perturb_export=SPEC   after transformers' `save_pretrained` writes a model directory, change one tensor of
                        its model.safetensors on disk, then print `FTL_TEST perturbed NAME in DIR`:
                        SPEC = NAME:scale=F (multiply by F) or NAME:ulp (one element moved by one float step,
                        far below any logit tolerance: only an exact weight comparison can see it)
  usage_error_on_rank=R:MODULE:FUNCTION
                        on rank R only (the RANK variable), calling MODULE.FUNCTION raises the engine's UsageError,
                        as a file one node cannot read would: the other ranks must learn of it, not wait
"""

import os
import sys

_HOOKS = [h.strip() for h in os.environ.get("FTL_TEST_HOOKS", "").split(",") if h.strip()]


COLLECTIVES = ("barrier", "all_reduce", "all_gather", "all_gather_object", "all_gather_into_tensor", "broadcast",
               "broadcast_object_list", "gather", "gather_object", "scatter", "scatter_object_list", "reduce",
               "reduce_scatter", "reduce_scatter_tensor", "all_to_all", "all_to_all_single", "monitored_barrier")


def _trace_collectives() -> None:
    import torch.distributed as dist

    entered = [0]

    def traced(name, real):
        def collective(*args, **kwargs):
            entered[0] += 1
            rank = dist.get_rank() if dist.is_initialized() else 0
            print(f"FTL_TEST collective {name} rank={rank} n={entered[0]}", file=sys.stderr, flush=True)
            return real(*args, **kwargs)
        return collective

    for name in COLLECTIVES:
        if hasattr(dist, name):
            setattr(dist, name, traced(name, getattr(dist, name)))


def perturb_file(path, name: str, how: str) -> None:
    """Change tensor `name` of the safetensors file `path` in place (see the module docstring)."""
    import torch
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(path))
    t = tensors[name].clone()
    if how == "ulp":
        flat = t.view(-1)
        flat[0] = torch.nextafter(flat[0], torch.tensor(float("inf"), dtype=t.dtype))
    elif how.startswith("scale="):
        t = t * float(how.split("=", 1)[1])
    else:
        raise ValueError(f"perturb_export: unknown change {how!r}")
    tensors[name] = t.contiguous()
    save_file(tensors, str(path), metadata={"format": "pt"})


def _perturb_export(spec: str) -> None:
    from transformers import PreTrainedModel

    name, how = spec.rsplit(":", 1)
    real = PreTrainedModel.save_pretrained

    def save_pretrained(self, save_directory, *args, **kwargs):
        out = real(self, save_directory, *args, **kwargs)
        path = os.path.join(str(save_directory), "model.safetensors")
        perturb_file(path, name, how)
        print(f"FTL_TEST perturbed {name} in {save_directory}", file=sys.stderr, flush=True)
        return out

    PreTrainedModel.save_pretrained = save_pretrained


def _usage_error_on_rank(spec: str) -> None:
    rank, module_name, function = spec.split(":")
    if os.environ.get("RANK", "0") != rank:
        return
    import importlib

    from engine.errors import UsageError

    module = importlib.import_module(module_name)

    def fail(*args, **kwargs):
        raise UsageError(f"{module_name}.{function} failed on rank {rank} only (injected by the test)")

    setattr(module, function, fail)


for _hook in _HOOKS:
    if _hook == "trace_collectives":
        _trace_collectives()
    elif _hook.startswith("usage_error_on_rank="):
        _usage_error_on_rank(_hook.split("=", 1)[1])
    elif _hook.startswith("perturb_export="):
        _perturb_export(_hook.split("=", 1)[1])
    else:
        raise SystemExit(f"tests/hooks/sitecustomize.py: unknown FTL_TEST_HOOKS entry {_hook!r}")
