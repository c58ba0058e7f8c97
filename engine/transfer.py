"""Transfer learning: what trains and how fast. Freezing, discriminative learning rates, LoRA, added tokens.

All of it acts on the freshly built transformers model (or its parameter groups) before a backend wraps
it, so DDP and every ZeRO stage see an ordinary module whose frozen parameters have
`requires_grad=False` and therefore no gradient and no optimizer state.

LoRA comes from `peft` (`inject_adapter_in_model`, so the model stays the stock transformers class and
its parameter names stay recognisable). Export never asks peft to merge a live, possibly sharded model:
`merge_lora` folds the adapters into a full state dict, W + (B @ A)^T * alpha / r for GPT-2's Conv1D
layers, so `final/` is a plain transformers model whatever the backend.
"""

from __future__ import annotations

import hashlib
import re

import torch
from torch import nn

from engine import optim
from engine.config import Config, ModelConfig
from engine.errors import UsageError

ADAPTER = "default"  # peft's adapter name
_BLOCK = re.compile(r"\.h\.(\d+)\.")


# ----------------------------------------------------------------------------------------- added tokens

def add_tokens(tokenizer, tokens: list[str]) -> int:
    """Add `tokens` (kept whole by the tokenizer) that it does not know yet; returns how many were new."""
    new = [t for t in tokens if t not in tokenizer.get_vocab()]
    return tokenizer.add_tokens(new) if new else 0


@torch.no_grad()
def grow_embeddings(model: nn.Module, size: int) -> None:
    """Resize the token embedding to `size` rows, the new ones at the mean of the old ones.

    A mean row keeps a new token's logit near the average one (random rows can dominate the softmax and
    derail the first steps of fine-tuning). transformers re-ties an LM head to the resized embedding."""
    weight = model.get_input_embeddings().weight
    old = getattr(weight, "ds_shape", weight.shape)[0]
    if size <= old:
        return
    if hasattr(weight, "ds_id"):
        raise UsageError("data.add_tokens cannot grow a pretrained model's embedding under ZeRO-3 (its rows are "
                         "partitioned as it is built): add the tokens in a run with dist.zero_stage <= 2, then "
                         "fine-tune that export with ZeRO-3")
    model.resize_token_embeddings(size, mean_resizing=False)
    weight = model.get_input_embeddings().weight
    weight[old:] = weight[:old].mean(0, keepdim=True).to(weight.dtype)


# ------------------------------------------------------------------------------------ freeze and LoRA

def adapt(hf: nn.Module, cfg: ModelConfig) -> nn.Module:
    """Apply model.freeze or LoRA to the built model (in place); raises UsageError for impossible asks."""
    if cfg.lora_rank:
        inject_lora(hf, cfg)
    elif cfg.freeze:
        freeze(hf, cfg)
    if not any(p.requires_grad for p in hf.parameters()):
        raise UsageError("nothing left to train: model.freeze covers every parameter")
    return hf


def freeze(hf: nn.Module, cfg: ModelConfig) -> list[str]:
    """Set requires_grad=False on what model.freeze names; returns the frozen parameter names."""
    embeddings, blocks, problems = cfg.freeze_spec()
    if problems:
        raise UsageError(problems)
    body = hf.transformer
    n_layer = len(body.h)
    if blocks is not None and blocks > n_layer:
        raise UsageError(f"model.freeze asks for blocks:{blocks} but the model has {n_layer} blocks")
    modules: list[nn.Module] = list(body.h[: n_layer if blocks is None else blocks])
    if embeddings:
        modules += [body.wte, body.wpe]
    if "body" in cfg.freeze:
        modules.append(body.ln_f)
    frozen_ids = set()
    for m in modules:
        for p in m.parameters():
            p.requires_grad_(False)
            frozen_ids.add(id(p))
    return [n for n, p in hf.named_parameters() if id(p) in frozen_ids]


def _peft():
    try:
        import peft
    except ImportError:
        raise UsageError("model.lora_rank needs the peft package: pip install 'ftl-engine[lora]' (or pip install peft)") from None
    return peft


def lora_config(cfg: ModelConfig):
    peft = _peft()
    # GPT-2's projections are transformers Conv1D layers, whose weight is [in, out]: fan_in_fan_out.
    return peft.LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                           target_modules=list(cfg.lora_targets), fan_in_fan_out=True, bias="none")


def inject_lora(hf: nn.Module, cfg: ModelConfig) -> nn.Module:
    """Adapters on the targeted projections; every base weight frozen, the classifier (head=cls) trained."""
    peft = _peft()
    peft.inject_adapter_in_model(lora_config(cfg), hf, adapter_name=ADAPTER)
    for name, p in hf.named_parameters():
        p.requires_grad_(".lora_" in name)
    if cfg.head == "cls":
        hf.score.weight.requires_grad_(True)  # a new head has nothing to adapt from: train it fully
    return hf


def merge_lora(state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """A LoRA model's full state dict -> the plain model's, adapters folded into the base weights."""
    if not cfg.lora_rank:
        return state
    scaling = cfg.lora_alpha / cfg.lora_rank
    out = {}
    for key, value in state.items():
        if f".lora_A.{ADAPTER}." in key or f".lora_B.{ADAPTER}." in key:
            continue
        if ".base_layer." not in key:
            out[key] = value
            continue
        prefix, _, leaf = key.partition(".base_layer.")
        if leaf == "weight":
            a = state[f"{prefix}.lora_A.{ADAPTER}.weight"].float()
            b = state[f"{prefix}.lora_B.{ADAPTER}.weight"].float()
            value = (value.float() + (b @ a).T * scaling).to(value.dtype)
        out[f"{prefix}.{leaf}"] = value
    return out


def save_adapter(state: dict[str, torch.Tensor], cfg: ModelConfig, head: str, out, tokenizer=None) -> None:
    """The LoRA adapters alone in PEFT's format (adapter_config.json + adapter_model.safetensors), for
    `PeftModel.from_pretrained(base, out)` with base = model.name's weights (cls: the trained classifier is
    saved too, as PEFT's modules_to_save). Written beside the merged model, as its adapter/ directory.

    Tokens the run added to the vocabulary (data.add_tokens, the built-in chat template's markers) live in the
    embedding, which LoRA does not train: their rows (the mean of the old ones) are only in the merged model."""
    from pathlib import Path

    from safetensors.torch import save_file

    out = Path(out)
    lc = lora_config(cfg)
    lc.task_type = "SEQ_CLS" if head == "cls" else "CAUSAL_LM"
    lc.base_model_name_or_path = cfg.name
    if head == "cls":
        lc.modules_to_save = ["score"]
    weights = {}
    for key, value in state.items():
        if f".lora_A.{ADAPTER}." in key or f".lora_B.{ADAPTER}." in key:
            weights["base_model.model." + key.replace(f".{ADAPTER}.", ".")] = value.detach().float().contiguous()
        elif head == "cls" and key.startswith("score."):
            weights["base_model.model." + key] = value.detach().float().contiguous()
    out.mkdir(parents=True, exist_ok=True)
    lc.save_pretrained(str(out))
    save_file(weights, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    if tokenizer is not None:
        from engine import compat

        compat.save_tokenizer(tokenizer, str(out), None)  # loadable by every transformers >= 4.57


def lora_param_names(names) -> list[str]:
    return [n for n in names if ".lora_" in n]


def base_fingerprint(module: nn.Module) -> str | None:
    """A cheap fingerprint of the frozen weights (a strided sample of every frozen tensor), so a LoRA run
    resumed from an adapter-only checkpoint can tell that model.name still gives the same base.
    None when the weights are not materialized here (ZeRO-3 partitions)."""
    h = hashlib.sha256()
    for name, p in module.named_parameters():
        if p.requires_grad:
            continue
        if p.numel() == 0 or hasattr(p, "ds_id"):
            return None
        flat = p.detach().reshape(-1)
        sample = flat[:: max(1, flat.numel() // 4096)].double().cpu()
        h.update(f"{name}:{tuple(p.shape)}:{sample.sum().item():.12e}:{sample.abs().sum().item():.12e}".encode())
    return h.hexdigest()[:16]


# ------------------------------------------------------------------------------- parameter groups

def depth_scales(names: list[str], n_layer: int, cfg: Config) -> dict[str, tuple[str, float]]:
    """Parameter name -> (part, lr multiplier) for discriminative learning rates.

    The top block and ln_f learn at lr; each block below at layer_lr_decay times the one above; the
    embeddings (position and token; with head=lm also the tied output layer) one step below block 0; the
    classifier at optim.head_lr."""
    decay = cfg.optim.layer_lr_decay
    head_scale = cfg.optim.head_lr / cfg.optim.lr if cfg.optim.head_lr else 1.0
    out = {}
    for name in names:
        m = _BLOCK.search(name)
        if m:
            i = int(m.group(1))
            out[name] = (f"block{i}", decay ** (n_layer - 1 - i))
        elif ".wte." in name or ".wpe." in name:
            out[name] = ("embeddings", decay ** n_layer)
        elif ".score." in name or name.startswith("score."):
            out[name] = ("head", head_scale)
        else:
            out[name] = ("top", 1.0)
    return out


def param_groups(module: nn.Module, cfg: Config) -> list[dict]:
    """AdamW groups over the TRAINABLE parameters: optim.param_groups' decay rule, and with discriminative
    learning rates one group per (layer, decay) carrying `lr_scale` (backends set lr * lr_scale)."""
    if cfg.optim.layer_lr_decay == 1.0 and not cfg.optim.head_lr:
        return optim.param_groups(module, cfg.optim.weight_decay)
    n_layer = int(getattr(getattr(module, "hf", module), "config").n_layer)
    embeddings = {id(m.weight) for m in module.modules() if isinstance(m, nn.Embedding)}
    named = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
    scales = depth_scales([n for n, _ in named], n_layer, cfg)
    groups: dict[tuple[str, bool], dict] = {}
    for name, p in named:
        part, scale = scales[name]
        decays = optim.decays(name, p, embeddings)
        g = groups.setdefault((part, decays), {
            "params": [], "weight_decay": cfg.optim.weight_decay if decays else 0.0, "lr_scale": scale,
            "name": f"{part}/{'decay' if decays else 'no_decay'}"})
        g["params"].append(p)
    return list(groups.values())


def trainable_summary(module: nn.Module) -> str:
    params = {id(p): p for p in module.parameters()}.values()
    numel = {id(p): getattr(p, "ds_numel", p.numel()) for p in params}  # ZeRO-3 partitions keep their full size
    total = sum(numel[id(p)] for p in params)
    train = sum(numel[id(p)] for p in params if p.requires_grad)
    return f"training {train:,} of {total:,} parameters ({100.0 * train / max(total, 1):.2f}%)"
