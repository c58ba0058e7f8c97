"""Run by test_zero3_lm_head.py in its own process: the engine's LM fast path under real DeepSpeed ZeRO-3
(one gloo rank; nothing persistent, so every parameter is an empty shard outside its module's forward).

The model is built the way a ZeRO-3 run builds it: a partitioned skeleton (transformers' ZeRO-3
integration), the vocabulary padded by `fastpath.install_lm_head` while that integration is active,
then the reference weights copied in. Prints one JSON line comparing loss and gradients with the same
module trained without DeepSpeed."""

import json
import os
import sys

import torch


def main(port: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port, RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    import deepspeed
    import deepspeed.ops
    import torch.distributed as dist
    from deepspeed.utils import safe_get_full_grad
    from transformers import GPT2Config, GPT2LMHeadModel
    from transformers.integrations.deepspeed import HfDeepSpeedConfig, unset_hf_deepspeed_config

    from engine import fastpath
    from engine.backends.deepspeed import skip_backward_gather
    from engine.config import PerfConfig
    from engine.model import TrainModule

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False  # skips a 20 s JIT build nobody uses here
    dist.init_process_group("gloo", rank=0, world_size=1)
    cfg = GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=500, n_positions=64, bos_token_id=0,
                     eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    perf = PerfConfig(ce_chunk_tokens=24)
    torch.manual_seed(0)
    ref = TrainModule(GPT2LMHeadModel._from_config(cfg, attn_implementation="sdpa"), "lm", perf, packed=True)

    ds = {"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 1, "zero_allow_untested_optimizer": True,
          "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}}
    hf_ds = HfDeepSpeedConfig(ds)  # noqa: F841  (transformers' ZeRO-3 switch lives as long as this object)
    hf = GPT2LMHeadModel._from_config(cfg, attn_implementation="sdpa")  # partitioned as it is built
    fastpath.install_lm_head(hf, perf)  # resize under ZeRO-3: transformers gathers, pads, re-ties
    with torch.no_grad():
        refs = dict(ref.hf.named_parameters())
        for name, p in hf.named_parameters():
            with deepspeed.zero.GatheredParameters([p], modifier_rank=0):
                p.copy_(refs[name])
    del hf_ds
    unset_hf_deepspeed_config()
    module = TrainModule(hf, "lm", perf, packed=True)  # the causal body too

    ids = torch.randint(0, 500, (4, 32))
    labels = ids.roll(-1, 1)
    labels[:, :5] = -100
    ref_loss = ref(ids, labels)
    (ref_loss * 0.5).backward()
    engine, *_ = deepspeed.initialize(model=module, optimizer=torch.optim.AdamW(module.parameters(), lr=1e-3), config=ds)
    skipped = skip_backward_gather(module) if "--no-skip" not in sys.argv else False
    head = module.hf.lm_head
    shard_outside = head.weight.numel()
    fetches = []  # (module class, forward?) for every parameter fetch ZeRO-3's coordinator is asked for
    from deepspeed.runtime.zero.partitioned_param_coordinator import PartitionedParameterCoordinator

    fetch = PartitionedParameterCoordinator.fetch_sub_module

    def recording(self, sub_module, forward):
        fetches.append((type(sub_module).__name__, bool(forward)))
        return fetch(self, sub_module, forward)

    PartitionedParameterCoordinator.fetch_sub_module = recording
    loss = engine(ids, labels)
    engine.backward(loss * 0.5)
    PartitionedParameterCoordinator.fetch_sub_module = fetch
    names = ["hf.transformer.wte.weight", "hf.transformer.h.0.attn.c_attn.weight", "hf.transformer.ln_f.weight"]
    params = dict(module.named_parameters())
    refs = dict(ref.named_parameters())
    grad_diff = {n: float((safe_get_full_grad(params[n]) - refs[n].grad).abs().max()) for n in names}
    out = {"shard_numel_outside_forward": shard_outside, "padded_rows": int(head.weight.ds_shape[0]),
           "tied": head.weight is module.hf.transformer.wte.weight, "vocab_size": module.hf.config.vocab_size,
           "padding_parameters": fastpath.padding_parameters(module.hf),
           "loss": float(loss.detach()), "ref_loss": float(ref_loss.detach()), "grad_diff": grad_diff,
           "grad_scale": float(refs[names[0]].grad.abs().max()), "skipped": skipped,
           "head_fetches": [f for f in fetches if f[0] == "LMHead"]}
    engine.destroy()
    dist.destroy_process_group()
    print(json.dumps(out))


if __name__ == "__main__":
    main(sys.argv[1])
