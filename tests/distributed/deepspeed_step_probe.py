"""Run by test_deepspeed_step.py in its own process (DeepSpeed makes a process group of one, which must not leak
into the test session): the DeepSpeed backend's step at ZeRO stages 0 and 2, observed where the torch optimizer
is handed the gradients. Prints one JSON line per stage."""

import json
import sys

import torch


def probe(stage: int) -> dict:
    from engine.backends.deepspeed import DeepSpeedBackend
    from engine.config import load_config
    from engine.dist import DistEnv

    torch.manual_seed(0)
    cfg = load_config(None, ["dist.backend=deepspeed", f"dist.zero_stage={stage}", "optim.weight_decay=0.0",
                             "train.precision=fp32", "model.name=gpt2-tiny", "train.grad_accum=2"])
    backend = DeepSpeedBackend(cfg, DistEnv())
    module = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Linear(5, 1))
    x = torch.linspace(-1, 1, 24).reshape(4, 6)
    grads = torch.autograd.grad(module(x).pow(2).sum(), list(module.parameters()))
    true_norm = float(torch.nn.utils.get_total_norm(list(grads)))
    groups = [{"params": list(module[0].parameters()), "weight_decay": 0.0, "lr_scale": 0.5},
              {"params": list(module[1].parameters()), "weight_decay": 0.0, "lr_scale": 0.0}]
    backend.setup(module, groups)
    inner = backend.engine.optimizer
    inner = getattr(inner, "optimizer", inner)  # ZeRO wraps the torch AdamW; stage 0 hands it over as it is
    seen = {"lr": [], "grad_sq": 0.0}
    real = inner.step

    def step(*args, **kwargs):  # ZeRO-1/2 step one parameter group at a time: every call counts
        seen["lr"] += [g["lr"] for g in inner.param_groups]
        seen["grad_sq"] += sum(float(p.grad.double().pow(2).sum()) for g in inner.param_groups for p in g["params"]
                               if p.grad is not None)
        return real(*args, **kwargs)

    inner.step = step
    before = [p.detach().clone() for p in module.parameters()]
    out = {"true_norm": true_norm}
    for micro, last in ((0, False), (1, True)):  # two micro-batches of the same data: the gradient doubles
        with backend.accumulate(last):
            loss = backend.model(x).pow(2).sum() * 0.5
            backend.backward(loss, last)
    out["norm"] = float(backend.step(0.2, true_norm / 4))
    out.update(lr=seen["lr"], grad_norm=seen["grad_sq"] ** 0.5)
    after = [p.detach().clone() for p in module.parameters()]
    out["moved"] = [not torch.equal(b, a) for b, a in zip(before, after)]
    out["grad_bytes"] = backend.measured_memory()["grads"]  # the memory report's gradients, seen at the first step
    return out, backend


if __name__ == "__main__":
    results, backends = {}, []
    for s in sys.argv[1:]:  # one process group for all (DeepSpeed caches its groups): closed at the end
        results[int(s)], backend = probe(int(s))
        backends.append(backend)
    for backend in reversed(backends):
        backend.close()
    print(json.dumps(results))
