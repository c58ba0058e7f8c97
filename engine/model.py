"""GPT-2 body (transformers) plus a head, and the module the backends train.

`model.name` is a preset, a local Hugging Face directory or a hub id. Presets give GPT-2 shapes for
random init without any download; directories and hub ids load real weights through `from_pretrained`.
The head is `lm` (GPT2LMHeadModel: the output projection is the token embedding, tied) or `cls`
(GPT2ForSequenceClassification: logits pooled at the last non-pad token). Keeping the stock
transformers classes means `final/` is exactly what plain `transformers` loads.

`TrainModule` wraps that model for training: its forward returns the SUM of the per-target losses,
never a mean, because the trainer divides by the global target count of the whole optimizer step.
"""

from __future__ import annotations

import contextlib
import contextvars
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from engine import fastpath, losses
from engine.config import ModelConfig, PerfConfig
from engine.errors import UsageError

# name -> (n_layer, n_embd, n_head). Positions are GPT-2's 1024 everywhere.
PRESETS: dict[str, tuple[int, int, int]] = {
    "gpt2-tiny": (2, 64, 4),
    "gpt2-mini": (4, 128, 4),
    "distilgpt2": (6, 768, 12),
    "gpt2": (12, 768, 12),
    "gpt2-medium": (24, 1024, 16),
    "gpt2-large": (36, 1280, 20),
    "gpt2-xl": (48, 1600, 25),
}
ENGINE_ONLY_PRESETS = {"gpt2-tiny", "gpt2-mini"}  # no hub model of that name: always random init
GPT2_VOCAB = 50257
GPT2_POSITIONS = 1024


@dataclass
class ModelSource:
    """What `model.name` refers to, resolved before anything is built or downloaded."""

    name: str
    pretrained: bool  # load weights with from_pretrained
    local_dir: Path | None
    config: object | None  # a GPT2Config when known without loading weights

    @property
    def has_tokenizer(self) -> bool:
        if self.local_dir is not None:
            return any((self.local_dir / f).exists() for f in ("tokenizer.json", "vocab.json", "tokenizer_config.json"))
        return self.pretrained  # a hub model ships its tokenizer


def preset_config(name: str, vocab_size: int = GPT2_VOCAB):
    from transformers import GPT2Config

    n_layer, n_embd, n_head = PRESETS[name]
    return GPT2Config(
        n_layer=n_layer, n_embd=n_embd, n_head=n_head, n_positions=GPT2_POSITIONS, vocab_size=vocab_size,
        bos_token_id=vocab_size - 1, eos_token_id=vocab_size - 1,
    )


def resolve(cfg: ModelConfig) -> ModelSource:
    """Decide preset / local directory / hub id and fetch its config (cheap) for validation."""
    from transformers import AutoConfig

    name = cfg.name
    local = Path(name).expanduser()
    if local.is_dir():
        if not (local / "config.json").is_file():
            raise UsageError(f"model.name {name!r} is a directory without config.json; point it at a Hugging Face model directory")
        hf_cfg = AutoConfig.from_pretrained(local)
        if hf_cfg.model_type != "gpt2":
            raise UsageError(f"model.name {name!r} is a {hf_cfg.model_type!r} model; this engine trains GPT-2-family models")
        return ModelSource(name, cfg.init != "random", local, hf_cfg)
    if name in PRESETS and (cfg.init == "random" or name in ENGINE_ONLY_PRESETS):
        if cfg.init == "pretrained":
            raise UsageError(f"model.name {name!r} is an engine preset with no pretrained weights; use model.init=auto or random")
        return ModelSource(name, False, None, preset_config(name))
    if cfg.init == "random":
        raise UsageError(f"model.init=random needs a preset ({', '.join(PRESETS)}) or a local directory, not {name!r}")
    if "/" in name and (name.startswith((".", "/", "~")) or Path(name).suffix):
        raise UsageError(f"model.name {name!r}: no such directory")
    return ModelSource(name, True, None, None)  # a hub id; its config comes with the download


# A backend that builds the model without its weights (FSDP on the meta device) supplies the pretrained
# state dict itself: name or directory -> {key: tensor} that from_pretrained then loads as usual.
_PRETRAINED_STATE: contextvars.ContextVar[Callable[[str], dict] | None] = contextvars.ContextVar(
    "ftl_pretrained_state", default=None)


@contextlib.contextmanager
def pretrained_state_dict(provider: Callable[[str], dict]):
    """Inside this block `build` hands from_pretrained `provider(name)` as its state_dict."""
    token = _PRETRAINED_STATE.set(provider)
    try:
        yield
    finally:
        _PRETRAINED_STATE.reset(token)


# transformers >= 5.25 "kernelizes" every from_pretrained model by default when the `kernels` package is
# installed (it now comes with transformers): layers are swapped for kernels fetched from the Hub. The engine
# loads with them off: a load must not download or run code nobody asked for (offline runs, the same rule as
# trust_remote_code), must compute what was tested, and kernelize() refuses a model on the meta device (the
# FSDP build). transformers 4.57-5.24 accept the keyword with the same default.
NO_HUB_KERNELS = {"use_kernels": False}


def _dropout_kwargs(cfg: ModelConfig) -> dict:
    def pick(site):
        return cfg.dropout if site is None else site

    return {"resid_pdrop": pick(cfg.resid_dropout), "embd_pdrop": pick(cfg.embd_dropout),
            "attn_pdrop": pick(cfg.attn_dropout)}


def build(cfg: ModelConfig, source: ModelSource, tokenizer, num_labels: int = 0) -> nn.Module:
    """The transformers model for `source`, with the tokenizer's vocabulary and pad token."""
    from transformers import GPT2ForSequenceClassification, GPT2LMHeadModel

    cls = GPT2ForSequenceClassification if cfg.head == "cls" else GPT2LMHeadModel
    extra = dict(_dropout_kwargs(cfg), attn_implementation=cfg.attn_implementation)
    if cfg.head == "cls":
        extra.update(num_labels=num_labels, pad_token_id=tokenizer.pad_token_id)
    if source.pretrained:
        where = str(source.local_dir or source.name)
        provider = _PRETRAINED_STATE.get()
        try:
            if provider is None:
                model = cls.from_pretrained(where, **extra, **NO_HUB_KERNELS)
            else:  # the same load from the provider's tensors (transformers takes a name or a state dict)
                from transformers import AutoConfig

                attn = extra.pop("attn_implementation")
                config = AutoConfig.from_pretrained(where, **extra)
                model = cls.from_pretrained(None, config=config, state_dict=provider(where), attn_implementation=attn,
                                            **NO_HUB_KERNELS)
        except OSError as e:
            raise UsageError(
                f"model.name {source.name!r}: not a preset, a local directory, or a reachable hub model ({e})".strip()
            ) from None
        if len(tokenizer) > model.get_input_embeddings().num_embeddings:
            from engine.transfer import grow_embeddings

            grow_embeddings(model, len(tokenizer))
    else:
        hf_cfg = source.config.__class__.from_dict(source.config.to_dict())
        hf_cfg.vocab_size = len(tokenizer)
        hf_cfg.bos_token_id = hf_cfg.eos_token_id = tokenizer.eos_token_id
        hf_cfg.n_positions = max(hf_cfg.n_positions, cfg.max_positions)
        attn = extra.pop("attn_implementation")
        for k, v in extra.items():
            setattr(hf_cfg, k, v)
        with init_from_caller_rng():
            model = cls._from_config(hf_cfg, attn_implementation=attn)
    model.config.pad_token_id = tokenizer.pad_token_id
    if cfg.max_positions:
        from engine import positions

        positions.extend(model, cfg.max_positions, cfg.position_init)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    return model


@contextlib.contextmanager
def init_from_caller_rng():
    """Random init that depends on the seed alone, not on where the model's tensors were allocated.

    Building a model draws random numbers twice: its layers' own constructors (nn.Embedding, Conv1D,
    nn.Linear), then transformers' init passes (post_init -> init_weights, once per sub-model), which
    overwrite them. Constructor draws come from the generator of the device the tensors are allocated on:
    the CPU for DDP and ZeRO 0-2, the GPU under deepspeed.zero.Init. Here every init pass starts where the
    previous pass ended (the first: the CPU state the caller seeded), skipping whatever the constructors drew
    in between, so every backend on every device gets the same weights (ZeRO-3 also runs the passes on fp32
    CPU copies: backends/deepspeed.py). Rows that vocabulary padding adds later are not covered; they are
    masked out of the softmax and never trained."""
    from transformers import PreTrainedModel

    state = [torch.random.get_rng_state()]
    original = PreTrainedModel.init_weights

    def init_weights(self, *args, **kwargs):
        torch.random.set_rng_state(state[0])
        try:
            return original(self, *args, **kwargs)
        finally:
            state[0] = torch.random.get_rng_state()

    PreTrainedModel.init_weights = init_weights
    try:
        yield
    finally:
        PreTrainedModel.init_weights = original
        torch.random.set_rng_state(state[0])


def max_positions(model_or_config) -> int:
    c = getattr(model_or_config, "config", model_or_config)
    return int(c.n_positions)


class TrainModule(nn.Module):
    """The unit a backend wraps: batch in, summed loss out (the trainer owns normalization).

    For the lm head it uses the fast path (engine/fastpath.py): an `LMHead` that returns the (chunked)
    summed loss from its own forward, over a vocabulary padded to `perf.pad_vocab_to` (installed here
    unless the trainer already did, inside the backend's construction context), and, when the data is
    `packed` (every batch full length, never an attention mask), the direct causal body. That choice is
    made once, not per batch: ZeRO-3 requires every rank to run the same sequence of modules, and
    unpacked batches carry a mask on one rank and none on another."""

    def __init__(self, hf_model: nn.Module, head: str, perf: PerfConfig | None = None, packed: bool = False,
                 focal_gamma: float = 0.0, label_smoothing: float = 0.0):
        super().__init__()
        perf = perf or PerfConfig()
        self.hf = hf_model
        self.head = head
        if head == "lm" and not isinstance(hf_model.lm_head, fastpath.LMHead):
            fastpath.install_lm_head(hf_model, perf)
        if perf.fused_gelu:
            fastpath.fuse_gelu(hf_model)
        self.causal_body = head == "lm" and packed and fastpath.can_use_causal_body(hf_model, perf)
        self.focal_gamma, self.label_smoothing = focal_gamma, label_smoothing

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor, attention_mask: torch.Tensor | None = None,
                loss_weights: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
                document_ids: torch.Tensor | None = None, grad_scale: torch.Tensor | None = None) -> torch.Tensor:
        """Sum of per-target losses. LM: labels are next tokens, -100 where nothing is predicted.

        cls: labels are class ids; `loss_weights` (per sample) scales each sample's loss, and the
        trainer normalizes by the global sum of those weights.

        Packed rows (lm) carry `position_ids` and `document_ids`: each example restarts its positions
        and attends only to itself (fastpath point 6). `grad_scale` (fp16): the gradient the backward will
        bring, for the chunked LM loss, which computes its gradients in the forward (losses.py).
        """
        smoothing = self.label_smoothing if self.training else 0.0  # a training regularizer, like dropout
        if self.head == "lm":
            hidden = self.body(input_ids, attention_mask, position_ids, document_ids)
            # the loss runs inside lm_head's forward (ZeRO-3: see fastpath)
            return self.hf.lm_head(hidden, labels, smoothing, grad_scale)
        logits = self.hf(input_ids=input_ids, attention_mask=attention_mask).logits
        return losses.cls_loss_sum(logits, labels, loss_weights, self.focal_gamma, smoothing)

    def body(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
             position_ids: torch.Tensor | None = None, document_ids: torch.Tensor | None = None) -> torch.Tensor:
        """The final hidden states of the GPT-2 body (lm): the direct causal body or transformers' forward."""
        if document_ids is not None:
            if self.causal_body:
                return fastpath.causal_body(self.hf.transformer, input_ids, position_ids, document_ids)
            # transformers uses a 4D mask as given: boolean for SDPA, additive for eager attention
            eager = self.hf.config._attn_implementation != "sdpa"
            mask = fastpath.document_mask(document_ids, self.hf.transformer.wte.weight.dtype if eager else None)
            return self.hf.transformer(input_ids=input_ids, attention_mask=mask, position_ids=position_ids,
                                       use_cache=False).last_hidden_state
        if attention_mask is None and self.causal_body:
            return fastpath.causal_body(self.hf.transformer, input_ids)
        return self.hf.transformer(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    def logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.hf(input_ids=input_ids, attention_mask=attention_mask).logits


def num_parameters(model: nn.Module) -> int:
    """Distinct parameters (tied weights once)."""
    seen = {}
    for p in model.parameters():
        seen[id(p)] = getattr(p, "ds_numel", p.numel())  # a ZeRO-3 partition knows its full size
    return sum(seen.values())


def load_exported(path: Path, head: str, **kwargs):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    auto = AutoModelForSequenceClassification if head == "cls" else AutoModelForCausalLM
    return auto.from_pretrained(path, **{**NO_HUB_KERNELS, **kwargs}).eval()
