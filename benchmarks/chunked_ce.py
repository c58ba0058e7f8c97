"""The LM head + loss alone: plain (full logits) against the engine's chunked linear cross-entropy.

    python benchmarks/chunked_ce.py                               # CPU: 1024 tokens, GPT-2 vocabulary
    python benchmarks/chunked_ce.py --tokens 16384 --dim 768 --dtype bf16   # one GPT-2 124M micro-batch on a GPU

Forward + backward of `sum CE(hidden @ W.T, labels)` over a padded vocabulary, median of --steps after
one warm-up; peak memory is max_memory_allocated on CUDA and the sampled peak RSS on CPU (both minus
what was allocated before the call). Also checks that the two give the same loss and gradients.
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine import losses  # noqa: E402
from engine.commands.bench import RssPeak, _rss_mib  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--vocab", type=int, default=50257)
    ap.add_argument("--pad-to", type=int, default=64)
    ap.add_argument("--chunk", type=int, default=0, help="tokens per chunk (0: the engine's auto rule)")
    ap.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="bf16: autocast, as in training")
    ap.add_argument("--steps", type=int, default=5)
    a = ap.parse_args()
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    padded = -(-a.vocab // a.pad_to) * a.pad_to
    chunk = a.chunk or max(1, (1 << 26) // padded)
    g = torch.Generator(device=dev).manual_seed(0)
    h = torch.randn(a.tokens, a.dim, device=dev, generator=g).requires_grad_()
    w = (0.02 * torch.randn(padded, a.dim, device=dev, generator=g)).requires_grad_()
    y = torch.randint(0, a.vocab, (a.tokens,), device=dev, generator=g)

    def plain():
        return torch.nn.functional.cross_entropy((h @ w.T)[:, :a.vocab].float(), y, reduction="sum")

    def chunked():
        return losses.linear_cross_entropy_sum(h, w, y, a.vocab, chunk)

    results = {}
    for name, fn in (("plain", plain), ("chunked", chunked)):
        times, peak = [], 0.0
        for i in range(a.steps + 1):
            h.grad = w.grad = None
            if dev.type == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
            else:
                base = _rss_mib()
            t = time.perf_counter()
            with RssPeak() as rss, torch.autocast(dev.type, dtype=torch.bfloat16, enabled=a.dtype == "bf16"):
                loss = fn()
                loss.backward()
                if dev.type == "cuda":
                    torch.cuda.synchronize()
            if i:
                times.append(time.perf_counter() - t)
                used = (torch.cuda.max_memory_allocated() - base) / 2**20 if dev.type == "cuda" else rss.peak - base
                peak = max(peak, used)
        results[name] = (statistics.median(times), peak, loss.detach().float(), h.grad.clone(), w.grad.clone())
        print(f"{name:8s} {results[name][0] * 1e3:9.1f} ms  peak {peak:8.1f} MiB  loss {float(loss.detach()):.6g}")
    p, c = results["plain"], results["chunked"]
    rel = lambda x, r: float((x.float() - r.float()).norm() / r.float().norm())  # noqa: E731
    print(f"chunk {chunk} tokens | speed-up {p[0] / c[0]:.2f}x | memory {p[1] / max(c[1], 1e-9):.1f}x less | "
          f"relative difference: loss {rel(c[2], p[2]):.2e}, grad hidden {rel(c[3], p[3]):.2e}, "
          f"grad weight {rel(c[4], p[4]):.2e} | {dev.type}, {a.dtype}, {a.tokens} tokens x {a.vocab} vocab x {a.dim}")


if __name__ == "__main__":
    main()
