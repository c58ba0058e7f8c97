"""Activation memory of long sequences, with and without activation checkpointing.

    python benchmarks/long_context.py                         # gpt2 shapes, T = 1024..8192, meta device
    python benchmarks/long_context.py --model gpt2-medium --seq 2048,4096 --device cuda

What it measures, per sequence of T tokens (batch 1), for the engine's own training module
(`model.max_positions=T`, the LM loss of engine/losses.py):

- saved: bytes of the tensors autograd keeps from the forward for the backward (parameters excluded),
  counted with `torch.autograd.graph.saved_tensors_hooks`. On the `meta` device nothing is computed:
  the numbers are the exact sizes for the real model, in seconds, on any machine.
- bound: the limit the engine promises WITH checkpointing (model.gradient_checkpointing=true) and its
  default chunked linear cross-entropy (perf.chunked_ce=true):
      T * ((L + 4) * d * b + 64)  +  V_pad * d * 4  bytes
  per token the input of each of the L blocks, the embeddings, the final LayerNorm's input and output,
  and the loss's gradient with respect to the hidden state (d values each, b bytes per value), plus
  the token ids; once per sequence the fp32 gradient of the (padded, V_pad rows) LM-head weight, which
  the chunked loss computes during the forward. No [T x V] logits are kept (with perf.chunked_ce=false
  add T * V * 4 for their fp32 log-softmax). Checkpointing recomputes one block at a time in the
  backward, so on top of this the backward holds one block's activations (the `block` column: saved / L
  without checkpointing).
- On CUDA (`--device cuda`) also the real peak allocated memory of one forward+backward minus the
  weights and gradients (`peak`).

tests/integration/test_long_inputs.py checks the bound on the tiny model at T = 2048 through the same
function; RESULTS are in benchmarks/LONG_CONTEXT.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def saved_activation_bytes(module: torch.nn.Module, batch: dict) -> int:
    """Bytes of the distinct non-parameter storages saved for backward by one training forward."""
    params = {p.untyped_storage().data_ptr() for p in module.parameters() if p.device.type != "meta"}
    meta_params = {id(p) for p in module.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor):
        base = t if t._base is None else t._base
        if id(t) in meta_params or id(base) in meta_params:  # a weight, or a view of one (W.T)
            return t
        if t.device.type == "meta":  # no storage addresses on meta: a view counts as its base tensor
            seen[id(base)] = base.numel() * base.element_size()
        else:
            ptr = t.untyped_storage().data_ptr()
            if ptr not in params:
                seen[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = module(**batch)
    del loss
    return sum(seen.values())


def checkpointed_bound(module: torch.nn.Module, seq_len: int, bytes_per_value: int = 4) -> int:
    """The bound above for a TrainModule (`lm` head, chunked loss)."""
    cfg = module.hf.config
    L, d, v_pad = cfg.n_layer, cfg.n_embd, module.hf.lm_head.weight.shape[0]
    return seq_len * ((L + 4) * d * bytes_per_value + 64) + v_pad * d * 4


def train_module(name: str, seq_len: int, checkpointing: bool, device: str, vocab: int = 50257):
    from engine import model as model_lib
    from engine.config import ModelConfig

    class Tok:  # build() only needs the vocabulary size and the special ids
        eos_token_id = pad_token_id = vocab - 1

        def __len__(self):
            return vocab

    mcfg = ModelConfig(name=name, init="random", max_positions=max(seq_len, 1024), gradient_checkpointing=checkpointing)
    with torch.device(device):
        hf = model_lib.build(mcfg, model_lib.resolve(mcfg), Tok())
    return model_lib.TrainModule(hf, "lm").train()


def measure(name: str, seq_len: int, checkpointing: bool, device: str) -> dict:
    import transformers.masking_utils as mu

    module = train_module(name, seq_len, checkpointing, device)
    ids = torch.randint(0, module.hf.config.vocab_size, (1, seq_len + 1), device=device)
    batch = {"input_ids": ids[:, :-1], "labels": ids[:, 1:]}
    packed_check = mu.find_packed_sequence_indices
    if device == "meta":
        # transformers reads two values back in a forward (a padding warning and a packed-sequence check on
        # position ids); on meta there are no values. Neither changes a shape, so skip both here.
        module.hf.config.pad_token_id = None
        mu.find_packed_sequence_indices = lambda position_ids: None
    try:
        saved = saved_activation_bytes(module, batch)
    finally:
        mu.find_packed_sequence_indices = packed_check
    row = {"model": name, "seq_len": seq_len, "checkpointing": checkpointing, "saved_MiB": saved / 2**20,
           "bound_MiB": checkpointed_bound(module, seq_len) / 2**20}
    if device == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        t = time.perf_counter()
        module(**batch).backward()
        torch.cuda.synchronize()
        row["step_s"] = time.perf_counter() - t
        grads = sum(p.grad.numel() * p.grad.element_size() for p in module.parameters() if p.grad is not None)
        row["peak_MiB"] = (torch.cuda.max_memory_allocated() - base - grads) / 2**20
    return row


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="gpt2")
    ap.add_argument("--seq", default="1024,2048,4096,8192")
    ap.add_argument("--device", default="meta", choices=["meta", "cpu", "cuda"])
    ap.add_argument("--json", type=Path, default=None, help="Also write the rows here.")
    args = ap.parse_args(argv)
    import transformers

    transformers.logging.set_verbosity_error()
    rows = []
    print("| model | seq | checkpointing | saved MiB | bound MiB (ckpt) | block MiB |" +
          (" peak MiB | step s |" if args.device == "cuda" else ""))
    print("|---|---|---|---|---|---|" + ("---|---|" if args.device == "cuda" else ""))
    for t in [int(s) for s in args.seq.split(",")]:
        off, on = measure(args.model, t, False, args.device), measure(args.model, t, True, args.device)
        n_layer = train_module(args.model, 1024, False, "meta").hf.config.n_layer
        for r in (off, on):
            r["block_MiB"] = off["saved_MiB"] / n_layer
            rows.append(r)
            extra = f" {r['peak_MiB']:.0f} | {r['step_s']:.3f} |" if "peak_MiB" in r else ""
            print(f"| {r['model']} | {t} | {'on' if r['checkpointing'] else 'off'} | {r['saved_MiB']:.1f} | "
                  f"{r['bound_MiB']:.1f} | {r['block_MiB']:.1f} |{extra}")
        if on["saved_MiB"] > on["bound_MiB"]:
            print(f"WARNING: checkpointed activations {on['saved_MiB']:.1f} MiB exceed the bound "
                  f"{on['bound_MiB']:.1f} MiB at T={t}", file=sys.stderr)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
