"""LoRA's trainable parameters and adapter bytes at rank 8, against the whole model (docs/fine-tuning.md).

    python benchmarks/lora_sizes.py [RUN_DIR ...]

Counts on the meta device (nothing is downloaded or allocated) for GPT-2 (124M) with an LM head and
gpt2-tiny with the classification walkthrough's shapes (vocabulary 1,024, 26 classes). Given run
directories (a LoRA run and a full fine-tune), also prints the size of their newest checkpoint's weights.
"""

import sys
import warnings
from pathlib import Path

import peft
import torch
from transformers import GPT2Config, GPT2ForSequenceClassification, GPT2LMHeadModel

from engine.model import PRESETS


def count(model_cls, cfg) -> tuple[int, int]:
    with torch.device("meta"):
        m = model_cls(cfg)
    full = sum(p.numel() for p in m.parameters())
    peft.inject_adapter_in_model(peft.LoraConfig(r=8, lora_alpha=16, target_modules=["c_attn", "c_proj", "c_fc"]), m)
    lora = sum(p.numel() for n, p in m.named_parameters() if "lora_" in n)
    return full, lora


if __name__ == "__main__":
    warnings.filterwarnings("ignore", message="fan_in_fan_out")  # peft notes GPT-2's Conv1D layout
    n_layer, n_embd, n_head = PRESETS["gpt2-tiny"]
    tiny = GPT2Config(n_layer=n_layer, n_embd=n_embd, n_head=n_head, vocab_size=1024, num_labels=26,
                      pad_token_id=1023, bos_token_id=1023, eos_token_id=1023)
    for name, cls, cfg, head in (("gpt2 (lm)", GPT2LMHeadModel, GPT2Config(), 0),
                                 ("gpt2-tiny (cls, 26 classes)", GPT2ForSequenceClassification, tiny, n_embd * 26)):
        full, lora = count(cls, cfg)
        print(f"{name}: {lora:,} LoRA parameters at rank 8 (+{head:,} classifier), "
              f"{(lora + head) * 4 / 1e6:.3g} MB in fp32, against {full:,} parameters, {full * 4 / 1e6:.3g} MB")
    for run in sys.argv[1:]:
        ckpts = sorted(Path(run, "checkpoints").glob("step-*"))
        if ckpts:
            files = [f for f in ckpts[-1].rglob("*") if f.is_file() and f.suffix in (".safetensors", ".pt", ".bin")
                     and not f.name.startswith(("optimizer", "rng-"))]
            print(f"{run}: {ckpts[-1].name} weights {sum(f.stat().st_size for f in files) / 1e3:,.0f} KB "
                  f"({', '.join(f.name for f in files)})")
