"""The run configuration: a tree of small typed dataclasses.

A config is built from defaults, then an optional YAML/JSON file, then `--set section.key=value`
overrides, in that order. Values are coerced to each field's declared type (so `--set optim.lr=1e-4`
is a float even though YAML reads `1e-4` as a string). `Config.validate()` checks every field and
returns every problem at once; `load_config` raises one `UsageError` that lists them all.

Each field documents itself through `help`; `ftl config keys` prints them.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from engine.errors import UsageError


def opt(default: Any, help: str, choices: tuple | None = None):
    """A config field with its documentation (and allowed values) attached."""
    meta = {"help": help, "choices": choices}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata=meta)
    return field(default=default, metadata=meta)


def positive(key: str, value, allow_zero: bool = False) -> list[str]:
    if value < 0 or (value == 0 and not allow_zero):
        return [f"{key} must be {'>= 0' if allow_zero else 'positive'} (got {value})"]
    return []


def within(key: str, value: float, lo: float, hi: float, hi_open: bool = False) -> list[str]:
    if lo <= value < hi if hi_open else lo <= value <= hi:
        return []
    return [f"{key} must be within [{lo}, {hi}{')' if hi_open else ']'} (got {value})"]


def looks_like_path(name: str) -> bool:
    """A local path rather than a hub id ("gpt2", "org/name"): absolute, relative with ./ or ~, or holding
    more than one "/" (a hub id holds at most one)."""
    return name.startswith(("/", "./", "../", "~")) or name.count("/") > 1 or name.endswith("/")


def missing_dir(key: str, value: str, what: str) -> list[str]:
    """A path-like value that names no directory: say so (a hub lookup would only report a bad repo id)."""
    if value and looks_like_path(value) and not Path(value).expanduser().is_dir():
        return [f"{key}: the directory {value!r} does not exist ({what})"]
    return []


# Each section validates its own keys in `problems(cfg)` (cfg: the whole Config, for cross-section rules).


@dataclass
class RunConfig:
    name: str = opt("default", "Name of the run; the run directory defaults to runs/<name>.")
    dir: str = opt("", "Run directory (metrics, TensorBoard, checkpoints, final/). Empty: runs/<name>.")
    seed: int = opt(1234, "Seed for model init, data order and dropout; every rank derives its own streams from it.")
    report_to: list[str] = opt(
        ["tensorboard"],
        "Where rank 0 reports metrics besides metrics.jsonl, any of: tensorboard (<run dir>/tb), mlflow "
        "(MLFLOW_TRACKING_URI, else <run dir>/mlruns; needs pip install 'ftl-engine[mlflow]'), wandb (WANDB_MODE="
        "offline works without an account; needs pip install 'ftl-engine[wandb]'). Same names and steps as "
        "metrics.jsonl; a resumed run continues the same tracker run.",
    )

    def problems(self, cfg: "Config") -> list[str]:
        from engine import tracking

        return tracking.problems(self.report_to)


LORA_TARGETS = ("c_attn", "c_proj", "c_fc")
FORMATS = ("text", "prompt_completion", "chat")
MESSAGE_ROLES = ("system", "user", "assistant")
MIX_KEYS = ("source", "weight", "format", "text_column", "prompt_column", "completion_column", "messages_column",
            "train_on_prompt")


@dataclass
class ModelConfig:
    name: str = opt(
        "gpt2-mini",
        "A preset (gpt2-tiny, gpt2-mini, gpt2, gpt2-medium, gpt2-large, gpt2-xl), a local Hugging Face model "
        "directory, or a hub id such as gpt2.",
    )
    init: str = opt(
        "auto",
        "auto: pretrained weights for directories and hub ids, random for engine-only presets; "
        "random: GPT-2 shapes with fresh weights (no download); pretrained: require real weights.",
        ("auto", "random", "pretrained"),
    )
    head: str = opt("lm", "lm: language model tied to the token embedding; cls: sequence classification.", ("lm", "cls"))
    num_labels: int = opt(0, "Classes for head=cls; 0 infers them from the training data.")
    dropout: float = opt(0.0, "Dropout on embeddings, attention and residual streams (0 disables).")
    compile: bool | None = opt(None, "torch.compile the training step (the model and its loss). Empty (null) or auto: on "
                                     "for CUDA with DDP or ZeRO 0-2 (if compilation fails the run says so and continues "
                                     "eager), off on the CPU, where compiling costs more than it saves.")
    gradient_checkpointing: bool = opt(False, "Recompute each block's activations in backward to save memory.")
    attn_implementation: str = opt("sdpa", "Attention kernel: sdpa (flash/memory-efficient) or eager.", ("sdpa", "eager"))
    max_positions: int = opt(0, "Learned positions of the model; more than it has (GPT-2: 1024) extends the position "
                                "embeddings (see model.position_init). 0: keep the model's.")
    position_init: str = opt("copy", "How positions beyond a pretrained model's are initialized: copy (tile the learned "
                                      "table; the first positions stay exactly as trained) or interpolate (stretch the "
                                      "table linearly over the new length).", ("copy", "interpolate"))
    embd_dropout: float | None = opt(None, "Dropout on the embeddings' output; empty (null): model.dropout.")
    attn_dropout: float | None = opt(None, "Dropout on the attention probabilities; empty (null): model.dropout.")
    resid_dropout: float | None = opt(None, "Dropout on each block's attention and MLP outputs; empty (null): model.dropout.")
    freeze: list[str] = opt(
        [],
        "Parameters kept fixed (no gradient, no optimizer state), any of: embeddings (token + position embeddings; "
        "with head=lm also the tied output layer), blocks:N (the first N transformer blocks), body (everything but "
        "the classifier: a linear probe, head=cls).",
    )
    lora_rank: int = opt(0, "LoRA adapter rank r (needs peft); 0: off. The base weights are frozen and only the "
                            "adapters train (and, head=cls, the classifier); final/ has them merged in.")
    lora_alpha: float = opt(16.0, "LoRA scale numerator: the adapter's update is scaled by lora_alpha / lora_rank.")
    lora_dropout: float = opt(0.0, "Dropout on the LoRA adapters' input.")
    lora_targets: list[str] = opt(
        ["c_attn", "c_proj", "c_fc"],
        "GPT-2 modules that get adapters: c_attn (fused query/key/value), c_proj (attention and MLP output "
        "projections), c_fc (MLP input projection).",
    )

    def problems(self, cfg: "Config") -> list[str]:
        p = within("model.dropout", self.dropout, 0.0, 1.0, hi_open=True) + positive("model.num_labels", self.num_labels, True)
        if self.head == "lm" and self.num_labels:
            p.append("model.num_labels is only used with model.head=cls; remove it or set model.head=cls")
        p += positive("model.max_positions", self.max_positions, True)
        p += missing_dir("model.name", self.name, "give a preset, a Hugging Face model directory or a hub id such as gpt2")
        if self.max_positions and cfg.data.seq_len > self.max_positions:
            p.append(f"data.seq_len={cfg.data.seq_len} exceeds model.max_positions={self.max_positions}; "
                     f"raise model.max_positions or lower data.seq_len")
        for key in ("embd_dropout", "attn_dropout", "resid_dropout"):
            if getattr(self, key) is not None:
                p += within(f"model.{key}", getattr(self, key), 0.0, 1.0, hi_open=True)
        p += self.freeze_spec()[2]
        if "body" in self.freeze and self.head != "cls":
            p.append("model.freeze=body needs model.head=cls (with head=lm nothing would be left to train)")
        p += positive("model.lora_rank", self.lora_rank, True) + within("model.lora_dropout", self.lora_dropout, 0.0, 1.0, True)
        if self.lora_rank:
            p += positive("model.lora_alpha", self.lora_alpha)
            unknown = sorted(set(self.lora_targets) - set(LORA_TARGETS))
            if unknown or not self.lora_targets:
                p.append(f"model.lora_targets must be a non-empty subset of {', '.join(LORA_TARGETS)} (got {self.lora_targets})")
            if self.freeze:
                p.append("model.freeze and model.lora_rank both choose what trains; LoRA already freezes every base "
                         "weight, so remove model.freeze")
        return p

    def freeze_spec(self) -> tuple[bool, int | None, list[str]]:
        """model.freeze as (freeze embeddings, number of leading blocks to freeze (None: all), problems)."""
        embeddings, blocks, problems = False, 0, []
        for item in self.freeze:
            name, _, n = item.partition(":")
            if item in ("embeddings", "body"):
                embeddings = True
                blocks = None if item == "body" else blocks
            elif name == "blocks" and n.isdigit() and int(n) > 0:
                blocks = None if blocks is None else max(blocks, int(n))
            else:
                problems.append(f"model.freeze entry {item!r} is not one of: embeddings, blocks:N (N >= 1), body")
        return embeddings, blocks, problems


@dataclass
class DataConfig:
    source: str = opt(
        "builtin:pydoc",
        "A builtin (offline, shipped with Python): builtin:pydoc (the text of Python's documentation topics; LM), "
        "builtin:stdlib (the standard library's source; LM), builtin:stdlib_packages (snippets of the standard "
        "library's source labelled with their package, ~26 imbalanced classes, own train/validation splits; "
        "head=cls), builtin:stdlib_qa (questions about standard-library functions answered with their docstrings' "
        "summaries; data.format=prompt_completion or chat); local files (.txt/.jsonl/.json/.csv/.parquet, globs allowed); or a hub dataset name (name or "
        "name:config).",
    )
    text_column: str = opt("text", "Column holding the text.")
    label_column: str = opt("label", "Column holding the class label (head=cls).")
    seq_len: int = opt(128, "Tokens per training sample (LM blocks are packed to this length).")
    val_fraction: float = opt(0.1, "Fraction of documents held out for evaluation when the source has no validation split.")
    tokenizer: str = opt("", "Tokenizer directory or hub id; empty: the model's own, else a byte-level BPE trained on the training split.")
    tokenizer_vocab: int = opt(4096, "Vocabulary size of a locally trained BPE tokenizer.")
    pack: bool = opt(True, "LM: concatenate documents (EOS between them) and cut into full blocks; false: one padded "
                           "sample per document. prompt_completion/chat (default true there too): whole examples packed "
                           "into rows of seq_len tokens, each restarting its positions at 0 and attending only to "
                           "itself; false: one padded example per row (docs/sft.md).")
    overflow: str = opt("truncate", "Documents longer than seq_len (cls, and lm with data.pack=false): truncate keeps the "
                                    "first seq_len tokens; window cuts them into windows data.stride tokens apart "
                                    "(docs/fine-tuning.md: Long inputs). prompt_completion/chat examples longer than seq_len + 1 "
                                    "tokens: truncate keeps their first tokens; truncate_prompt cuts the prompt (the "
                                    "oldest turns) from the left and keeps the last completion whole, dropping the "
                                    "example when that alone does not fit; drop drops them. Dropped examples, and "
                                    "examples left without a target, are counted in the run log.",
                        ("truncate", "window", "truncate_prompt", "drop"))
    stride: int = opt(0, "overflow=window: tokens between window starts (overlap = seq_len - stride); 0: seq_len, no overlap.")
    max_windows: int = opt(0, "overflow=window: at most this many windows per document (0: no cap).")
    window_pool: str = opt("mean", "overflow=window, cls evaluation: pool the class probabilities of a document's windows "
                                   "by mean, or by max (per class, renormalized).", ("mean", "max"))
    balanced_sampling: bool = opt(False, "head=cls: draw every class equally often (a seeded, resumable class-balanced "
                                         "stream; rare-class samples repeat more often than common ones).")
    add_tokens: list[str] = opt([], "Tokens added to the tokenizer, each kept whole; the embedding grows and the new "
                                    "rows start at the mean of the existing ones (a tied LM head stays tied).")
    # Instruction and chat fine-tuning (engine/data/sft.py, docs/sft.md)
    format: str = opt("text", "text: raw text (data.text_column); prompt_completion: columns data.prompt_column and "
                              "data.completion_column, the loss on the completion (and EOS) only; chat: "
                              "data.messages_column, lists of {role, content} (or ShareGPT {from, value}) rendered with "
                              "the chat template, the loss on the assistant turns only.",
                      ("text", "prompt_completion", "chat"))
    prompt_column: str = opt("prompt", "data.format=prompt_completion: column holding the prompt.")
    completion_column: str = opt("completion", "data.format=prompt_completion: column holding the completion.")
    messages_column: str = opt("messages", "data.format=chat: column holding the conversation (a list of messages).")
    train_on_prompt: bool = opt(False, "prompt_completion/chat: also learn the prompt (every token a target, for chat "
                                       "the whole rendered conversation) instead of the completions only.")
    chat_template: str = opt("", "data.format=chat: a Jinja chat template (the string, or a file holding it); empty: "
                                 "the tokenizer's own, else the built-in ChatML template, whose <|im_start|> / "
                                 "<|im_end|> markers are added to the tokenizer as special tokens. Saved with the "
                                 "tokenizer in every export.")
    role_map: list[str] = opt(["human=user", "gpt=assistant"],
                              "data.format=chat: other role names and what they mean, as name=role with role one of "
                              "system, user, assistant (ShareGPT's human/gpt by default).")
    mix: list[dict] = opt([], "Several datasets mixed into one training set, each a mapping with `source` and "
                              "optionally `weight` (default 1: each epoch holds the dataset once; 2 twice; 0.5 a "
                              "seeded half), `format`, `prompt_column`, `completion_column`, `messages_column`, "
                              "`text_column` (defaults: the data.* keys). Replaces data.source (docs/sft.md).")
    isolate_documents: bool = opt(False, "data.format=text with data.pack=true: every document restarts its positions at "
                                         "0 and attends only to itself within a packed block (no attention across "
                                         "the EOS between documents).")

    def problems(self, cfg: "Config") -> list[str]:
        p = positive("data.seq_len", self.seq_len) + within("data.val_fraction", self.val_fraction, 0.0, 1.0, True)
        p += positive("data.stride", self.stride, True) + positive("data.max_windows", self.max_windows, True)
        if self.stride and self.stride > self.seq_len:
            p.append(f"data.stride={self.stride} exceeds data.seq_len={self.seq_len}: tokens between windows would be "
                     f"skipped; use at most {self.seq_len}")
        if self.overflow == "window" and cfg.model.head == "lm" and self.pack and not self.sft:
            p.append("data.overflow=window needs data.pack=false for model.head=lm (packing already uses every token)")
        if self.tokenizer_vocab < 256 + 1:
            p.append(f"data.tokenizer_vocab must be at least 257 to hold the byte alphabet (got {self.tokenizer_vocab})")
        if not self.source.strip():
            p.append("data.source is empty: name a builtin:<name>, a file or a hub dataset")
        p += missing_dir("data.tokenizer", self.tokenizer, "give a tokenizer directory, e.g. a run's tokenizer/ or "
                                                           "final/, or a hub id such as gpt2")
        if self.balanced_sampling and cfg.model.head != "cls":
            p.append("data.balanced_sampling needs model.head=cls (it balances classes)")
        if any(not t.strip() for t in self.add_tokens) or len(set(self.add_tokens)) != len(self.add_tokens):
            p.append(f"data.add_tokens must be distinct, non-empty strings (got {self.add_tokens})")
        return p + self.sft_problems(cfg)

    @property
    def formats(self) -> set[str]:
        """Every data format this config reads (data.mix entries may each have their own)."""
        if not self.mix:
            return {self.format}
        return {str(e.get("format", self.format)) for e in self.mix if isinstance(e, dict)}

    @property
    def sft(self) -> bool:
        """Examples rather than a text stream: prompt_completion/chat data, or a mix of datasets."""
        return bool(self.mix) or self.format != "text"

    def role_names(self) -> tuple[dict[str, str], list[str]]:
        """data.role_map as {name: role}, plus problems."""
        out, problems = {}, []
        for item in self.role_map:
            name, eq, role = (x.strip() for x in str(item).partition("="))
            if not eq or not name or role not in MESSAGE_ROLES:
                problems.append(f"data.role_map entry {item!r} must look like name=role with role one of "
                                f"{', '.join(MESSAGE_ROLES)}")
            else:
                out[name] = role
        return out, problems

    def sft_problems(self, cfg: "Config") -> list[str]:
        p = self.role_names()[1]
        for i, entry in enumerate(self.mix):
            if not isinstance(entry, dict):
                p.append(f"data.mix entry {i + 1} must be a mapping with at least `source` (got {entry!r})")
                continue
            unknown = sorted(set(entry) - set(MIX_KEYS))
            if unknown:
                p.append(f"data.mix entry {i + 1} has unknown key(s) {', '.join(unknown)}; allowed: {', '.join(MIX_KEYS)}")
            if not str(entry.get("source") or "").strip():
                p.append(f"data.mix entry {i + 1} needs a `source` (a builtin:<name>, a file or a hub dataset)")
            w = entry.get("weight", 1)
            if isinstance(w, bool) or not isinstance(w, (int, float)) or not w > 0:
                p.append(f"data.mix entry {i + 1}: weight must be a positive number (got {w!r})")
            if entry.get("format", self.format) not in FORMATS:
                p.append(f"data.mix entry {i + 1}: format must be one of {', '.join(FORMATS)} (got {entry.get('format')!r})")
            if not isinstance(entry.get("train_on_prompt", False), bool):
                p.append(f"data.mix entry {i + 1}: train_on_prompt must be true or false")
        if not self.sft:
            if self.overflow in ("truncate_prompt", "drop"):
                p.append(f"data.overflow={self.overflow} applies to prompt_completion/chat examples; data.format=text "
                         f"uses truncate or window")
            if self.chat_template:
                p.append("data.chat_template is only used with data.format=chat")
            if self.isolate_documents and not (self.pack and cfg.model.head == "lm"):
                p.append("data.isolate_documents needs data.pack=true and model.head=lm (it isolates the documents "
                         "packed into one block)")
            return p
        what = f"data.format={self.format}" if not self.mix else "data.mix"
        if self.overflow == "window":
            p.append(f"data.overflow=window cuts text into windows, which would split examples; {what} uses "
                     f"truncate, truncate_prompt or drop")
        if cfg.model.head != "lm":
            p.append(f"{what} trains a language model: it needs model.head=lm")
        if self.isolate_documents:
            p.append(f"data.isolate_documents is for data.format=text; {what} examples never attend to each other "
                     f"when packed anyway")
        if self.chat_template and "chat" not in self.formats:
            p.append("data.chat_template is only used with data.format=chat")
        if self.chat_template and "{" not in self.chat_template and not Path(self.chat_template).expanduser().is_file():
            p.append(f"data.chat_template {self.chat_template!r} is neither a Jinja template nor an existing file")
        if cfg.eval.stride:
            p.append(f"eval.stride (sliding-window perplexity over whole documents) is for data.format=text; {what} "
                     f"reports the completion loss")
        return p


@dataclass
class TrainConfig:
    micro_batch: int = opt(16, "Samples per rank per forward/backward.")
    grad_accum: int = opt(1, "Micro-batches per optimizer step on each rank.")
    max_steps: int = opt(300, "Optimizer steps to train (or set train.epochs instead).")
    epochs: float = opt(0.0, "Passes over the training samples (after packing/windowing), instead of train.max_steps "
                             "(set at most one of them; fractions allowed). Resolved once, at the start of the run, "
                             "to max_steps = ceil(epochs x samples / global batch), which config.yaml and the "
                             "checkpoints record, so a resume on another number of ranks keeps the same total. "
                             "0: train.max_steps.")
    log_every: int = opt(10, "Write metrics every N steps.")
    eval_every: int = opt(100, "Evaluate every N steps (0: only before and after training).")
    eval_batches: int = opt(0, "Cap on eval micro-batches per rank (0: the whole validation split).")
    precision: str = opt("auto", "auto (bf16 on a GPU that supports it, else fp32), fp32, or bf16/fp16 autocast "
                         "(fp16 adds dynamic loss scaling).", ("auto", "fp32", "bf16", "fp16"))
    clip_grad: float = opt(1.0, "Clip the global gradient norm to this value (0 disables).")
    device: str = opt("auto", "auto (cuda when available), cuda, or cpu.", ("auto", "cuda", "cpu"))
    sample_tokens: int = opt(40, "Length of the text sample generated after training (lm head, data.format=text; "
                                 "prompt_completion/chat runs show eval.generations instead; 0 disables).")
    sample_prompt: str = opt("The ", "Prompt of that sample.")
    stop_at_step: int = opt(0, "Stop after this step with a checkpoint and an eval but no final export, as if paused; "
                               "the schedule still spans max_steps and running again with a later stop (or 0) "
                               "continues. Sweeps use it for successive halving. 0: run to max_steps.")
    max_bad_steps: int = opt(20, "Stop (exit code 3) after this many consecutive steps whose loss or gradient norm was "
                                 "non-finite on any rank; each such step is skipped without touching weights or optimizer state.")
    loss_scale_window: int = opt(1000, "fp16: overflow-free steps before the dynamic loss scale doubles (it halves, and "
                                       "the step is skipped, on every overflow).")

    def problems(self, cfg: "Config") -> list[str]:
        return (positive("train.micro_batch", self.micro_batch) + positive("train.grad_accum", self.grad_accum)
                + positive("train.max_steps", self.max_steps) + positive("train.epochs", self.epochs, True)
                + positive("train.log_every", self.log_every)
                + positive("train.eval_every", self.eval_every, True) + positive("train.eval_batches", self.eval_batches, True)
                + positive("train.clip_grad", self.clip_grad, True) + positive("train.sample_tokens", self.sample_tokens, True)
                + positive("train.stop_at_step", self.stop_at_step, True)
                + positive("train.max_bad_steps", self.max_bad_steps) + positive("train.loss_scale_window", self.loss_scale_window))


@dataclass
class OptimConfig:
    lr: float = opt(1e-3, "Peak learning rate.")
    weight_decay: float = opt(0.1, "AdamW weight decay (never applied to biases, LayerNorms or embeddings).")
    betas: list[float] = opt([0.9, 0.95], "AdamW betas [beta1, beta2].")
    eps: float = opt(1e-8, "AdamW epsilon.")
    schedule: str = opt("cosine", "Learning-rate decay after warmup.", ("cosine", "linear", "constant"))
    warmup_steps: int = opt(20, "Linear warmup steps from 0 to lr.")
    min_lr_ratio: float = opt(0.1, "Final learning rate as a fraction of lr (cosine/linear).")
    fused: bool = opt(True, "Fused AdamW on CUDA (one kernel for all parameters; foreach elsewhere).")
    layer_lr_decay: float = opt(1.0, "Discriminative learning rates: of L blocks, block i learns at "
                                     "lr * layer_lr_decay^(L-1-i) and the embeddings at lr * layer_lr_decay^L, so lower "
                                     "layers move less (1: one lr for all).")
    head_lr: float = opt(0.0, "head=cls: peak learning rate of the classifier, on the same schedule; 0: optim.lr.")

    def problems(self, cfg: "Config") -> list[str]:
        p = (positive("optim.lr", self.lr) + positive("optim.weight_decay", self.weight_decay, True)
             + positive("optim.eps", self.eps) + positive("optim.warmup_steps", self.warmup_steps, True)
             + within("optim.min_lr_ratio", self.min_lr_ratio, 0.0, 1.0))
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            p.append(f"optim.betas must be two numbers in [0, 1) (got {self.betas})")
        if not 0.0 < self.layer_lr_decay <= 1.0:
            p.append(f"optim.layer_lr_decay must be within (0, 1] (got {self.layer_lr_decay})")
        p += positive("optim.head_lr", self.head_lr, True)
        if self.head_lr and cfg.model.head != "cls":
            p.append("optim.head_lr needs model.head=cls (the lm head is the tied token embedding)")
        return p


@dataclass
class DistConfig:
    backend: str = opt("ddp", "ddp (also used for a single process), deepspeed (ZeRO), or fsdp (PyTorch FSDP2: "
                              "parameters, gradients and optimizer state sharded; docs/distributed.md).",
                       ("ddp", "deepspeed", "fsdp"))
    zero_stage: int = opt(0, "DeepSpeed ZeRO stage 0-3 (backend=deepspeed).")
    ds_config: str = opt("", "Path to your own DeepSpeed JSON; 'auto' values are filled from this config.")
    offload: str = opt("none", "CPU offload: deepspeed, of optimizer state (and parameters at stage 3); fsdp, of "
                               "parameter shards, gradients and the optimizer step.", ("none", "cpu"))
    reshard_after_forward: bool = opt(True, "fsdp: free each block's gathered weights after its forward and gather "
                                            "them again for backward (ZeRO-3-like); false keeps them until backward "
                                            "(ZeRO-2-like: more memory, less communication).")
    fsdp_replicate: int = opt(1, "fsdp: number of replica groups (HSDP): shard within a group of world/N ranks (a "
                                 "node), replicate across the N groups. 1: shard over every rank.")
    fsdp_grad_sync: str = opt("micro_batch", "fsdp: micro_batch reduce-scatters each micro-batch's gradients into "
                                             "the shards (gradients stay 1/world); step keeps full-size gradients "
                                             "until the last micro-batch and reduce-scatters once per step (fewer "
                                             "collectives, more memory).", ("micro_batch", "step"))
    timeout_s: int = opt(1800, "Collective timeout in seconds at start-up, in the first step, evaluation and checkpoint "
                               "saves (dist.step_timeout_s applies to the other steps).")
    step_timeout_s: int = opt(600, "Collective timeout in seconds once the first step has completed: a rank waiting "
                                   "longer for its peers raises an error instead of hanging. With the watchdog on, "
                                   "every collective timeout is at least the watchdog's deadline + 60 s (on every "
                                   "process group), so the watchdog's stack dump and exit code 4 come first.")
    watchdog_s: int = opt(1200, "A training step running longer than this makes the rank write every thread's stack to "
                                "<run dir>/hang-rank<R>.txt and exit with code 4 (0 disables). The first step, "
                                "evaluation and checkpoint saves get dist.timeout_s.")

    def problems(self, cfg: "Config") -> list[str]:
        p = (positive("dist.timeout_s", self.timeout_s) + positive("dist.step_timeout_s", self.step_timeout_s)
             + positive("dist.watchdog_s", self.watchdog_s, True))
        if self.zero_stage not in (0, 1, 2, 3):
            p.append(f"dist.zero_stage must be 0, 1, 2 or 3 (got {self.zero_stage})")
        if self.backend != "deepspeed" and (self.zero_stage or self.ds_config):
            p.append("dist.zero_stage / dist.ds_config need dist.backend=deepspeed")
        if self.backend == "ddp" and self.offload != "none":
            p.append("dist.offload needs dist.backend=deepspeed or fsdp")
        if self.backend != "fsdp" and (self.fsdp_replicate != 1 or self.fsdp_grad_sync != "micro_batch"
                                       or not self.reshard_after_forward):
            p.append("dist.reshard_after_forward / dist.fsdp_replicate / dist.fsdp_grad_sync need dist.backend=fsdp")
        if self.fsdp_replicate < 1:
            p.append(f"dist.fsdp_replicate must be >= 1 (got {self.fsdp_replicate})")
        if self.ds_config and not Path(self.ds_config).is_file():
            p.append(f"dist.ds_config: no such file {self.ds_config!r}")
        elif self.backend == "deepspeed" and self.zero_stage in (0, 1, 2, 3):
            from engine.backends import ds_config  # the JSON against this config (contradictions, bad stage)

            p += ds_config.problems(cfg)
        return p


@dataclass
class CheckpointConfig:
    every: int = opt(0, "Save a checkpoint every N steps (0: only at the end, and every_minutes).")
    every_minutes: float = opt(30.0, "Also save a checkpoint when this many minutes have passed since the last one "
                                     "(rank 0's clock decides; every rank saves at the same step). 0: off.")
    keep: int = opt(2, "Keep the newest N checkpoints (and the newest one that verified, until a newer one does).")
    resume: str = opt("auto", "auto: the newest complete checkpoint in the run directory that verifies against its "
                              "digests; none: start fresh; or a checkpoint path (it must verify).")

    def problems(self, cfg: "Config") -> list[str]:
        p = (positive("checkpoint.every", self.every, True) + positive("checkpoint.keep", self.keep)
             + positive("checkpoint.every_minutes", self.every_minutes, True))
        if self.resume not in ("auto", "none") and not Path(self.resume).exists():
            p.append(f"checkpoint.resume: no checkpoint at {self.resume!r} (use auto, none or an existing checkpoint directory)")
        return p


@dataclass
class PerfConfig:
    """Fast-path switches (engine/fastpath.py); the defaults are the fast path."""

    pad_vocab_to: int = opt(64, "lm head: pad the tied embedding/LM head to a multiple of this many rows (padded "
                                "logits are masked; exports keep the real vocabulary). 1 disables.")
    chunked_ce: bool = opt(True, "lm head: compute the output layer and the loss in chunks of tokens, never "
                                 "materializing the [tokens x vocab] fp32 logits.")
    ce_chunk_tokens: int = opt(0, "Tokens per chunk of the chunked loss; 0: auto, per device (CPU: chunk logits "
                                  "<= 2^26 values, CUDA: <= 2^28, in equal chunks).")
    fused_loss: bool = opt(True, "CUDA: compile each chunk's softmax and gradient into fused kernels (torch.compile), "
                                 "also when model.compile is off; falls back to eager with a warning if that fails.")
    causal_body: bool = opt(True, "lm head, sdpa, unpadded batches: call the GPT-2 blocks directly with causal SDPA "
                                  "(flash on GPU), skipping transformers' per-forward mask checks (host syncs).")
    fused_gelu: bool = opt(True, "Compute GPT-2's gelu_new (tanh GELU) in one kernel (F.gelu approximate=tanh) "
                                 "instead of transformers' 8 elementwise operations.")
    tf32: bool = opt(True, "CUDA: TF32 tensor-core matmuls for fp32 (train.precision=fp32).")
    compile_mode: str = opt("default", "torch.compile mode when model.compile is on (reduce-overhead and max-autotune "
                                       "replay CUDA graphs).",
                            ("default", "reduce-overhead", "max-autotune-no-cudagraphs", "max-autotune"))
    compile_backend: str = opt("inductor", "torch.compile backend (inductor; aot_eager/eager for debugging).",
                               ("inductor", "aot_eager", "eager"))

    def problems(self, cfg: "Config") -> list[str]:
        return positive("perf.pad_vocab_to", self.pad_vocab_to) + positive("perf.ce_chunk_tokens", self.ce_chunk_tokens, True)


@dataclass
class LossConfig:
    class_weights: str | list[float] = opt(
        "none",
        "head=cls: none; auto (from the training split's label counts: N / (K * count), so every class carries the "
        "same total weight); or one weight per class in label order, e.g. [1, 5, 20]. The loss is the weighted mean "
        "over the whole global batch.",
    )
    focal_gamma: float = opt(0.0, "head=cls: focal loss exponent; each sample's loss is scaled by (1 - p_true)^gamma, "
                                  "which down-weights easy samples (0: cross-entropy).")
    label_smoothing: float = opt(0.0, "Mix the one-hot target with a uniform distribution by this much (training "
                                      "loss only: eval loss and perplexity stay plain cross-entropy).")

    @property
    def auto_weights(self) -> bool:
        return isinstance(self.class_weights, str) and self.class_weights.strip().lower() == "auto"

    def class_weight_values(self) -> list[float] | None:
        """The explicit weights, or None for none/auto (raises ValueError on a malformed value)."""
        spec = self.class_weights
        if isinstance(spec, list):
            return [float(w) for w in spec]
        if spec.strip().lower() in ("none", "auto", ""):
            return None
        return [float(w) for w in spec.strip("[]() ").split(",") if w.strip()]

    def problems(self, cfg: "Config") -> list[str]:
        p = positive("loss.focal_gamma", self.focal_gamma, True) + within("loss.label_smoothing", self.label_smoothing, 0.0, 1.0, True)
        try:
            weights = self.class_weight_values()
        except ValueError:
            weights = None
            p.append(f"loss.class_weights must be none, auto or a list of numbers (got {self.class_weights!r})")
        if weights is not None and (not weights or min(weights) < 0 or max(weights) == 0):
            p.append(f"loss.class_weights must be non-negative with at least one positive weight (got {weights})")
        uses = [k for k, on in (("loss.class_weights", weights is not None or self.auto_weights),
                                ("loss.focal_gamma", self.focal_gamma > 0)) if on]
        if uses and cfg.model.head != "cls":
            p.append(f"{' and '.join(uses)} need{'s' if len(uses) == 1 else ''} model.head=cls")
        if self.auto_weights and cfg.data.balanced_sampling:
            p.append("loss.class_weights=auto and data.balanced_sampling=true both correct the same imbalance (rare "
                     "classes would count twice over); use one of them")
        return p


EVAL_METRICS = {
    "lm": ("eval_loss", "eval_ppl", "eval_sliding_loss", "eval_sliding_ppl"),
    "cls": ("eval_loss", "eval_accuracy", "eval_macro_f1", "eval_micro_f1", "eval_weighted_f1", "eval_balanced_accuracy"),
}


@dataclass
class EvalConfig:
    stride: int = opt(0, "head=lm: also score whole validation documents with sliding windows of data.seq_len tokens "
                         "that advance by this many (every token predicted once, with at least seq_len - stride tokens "
                         "of context): eval_sliding_loss / eval_sliding_ppl. 0: off.")
    metric: str = opt("", "Eval metric that picks best/ and drives early stopping: eval_loss, eval_ppl, "
                          "eval_sliding_ppl (lm); eval_loss, eval_accuracy, eval_macro_f1, eval_micro_f1, "
                          "eval_weighted_f1, eval_balanced_accuracy (cls). The eval_ prefix may be left out. Empty: neither.")
    mode: str = opt("auto", "Whether larger or smaller eval.metric is better; auto: min for loss/ppl, max otherwise.",
                    ("auto", "min", "max"))
    patience: int = opt(0, "Stop training after this many evaluations in a row without an improvement of eval.metric "
                           "(0: never stop early).")
    min_delta: float = opt(0.0, "Smallest change of eval.metric that counts as an improvement.")
    save_best: bool = opt(True, "With eval.metric: keep best/ beside final/, the exported model of the best evaluation.")
    generations: int = opt(3, "prompt_completion/chat: greedy completions of this many held-out prompts (the first "
                              "validation examples) at every evaluation, in the log, TensorBoard and eval/*.json "
                              "(0: none).")
    generation_tokens: int = opt(32, "Most new tokens of each of those completions (they stop at EOS or the chat "
                                     "template's end-of-turn marker).")

    @property
    def metric_key(self) -> str:
        m = self.metric.strip()
        return m if not m or m.startswith("eval_") else f"eval_{m}"

    @property
    def maximize(self) -> bool:
        if self.mode != "auto":
            return self.mode == "max"
        return not self.metric_key.endswith(("loss", "ppl"))

    def problems(self, cfg: "Config") -> list[str]:
        p = (positive("eval.stride", self.stride, True) + positive("eval.patience", self.patience, True)
             + positive("eval.min_delta", self.min_delta, True) + positive("eval.generations", self.generations, True)
             + positive("eval.generation_tokens", self.generation_tokens))
        if self.stride and cfg.model.head != "lm":
            p.append("eval.stride (sliding-window perplexity) needs model.head=lm")
        if self.stride and self.stride > cfg.data.seq_len > 0:
            p.append(f"eval.stride={self.stride} must not exceed data.seq_len={cfg.data.seq_len} (tokens would be skipped)")
        known = EVAL_METRICS.get(cfg.model.head, ())
        if self.metric_key and known and self.metric_key not in known:
            p.append(f"eval.metric {self.metric!r} is not reported for model.head={cfg.model.head}; use one of "
                     f"{', '.join(known)}")
        elif self.metric_key.startswith("eval_sliding") and not self.stride:
            p.append(f"eval.metric {self.metric!r} needs eval.stride > 0")
        if self.patience and not self.metric_key:
            p.append("eval.patience needs eval.metric (the metric to watch)")
        if self.patience and not cfg.train.eval_every:
            p.append("eval.patience needs train.eval_every > 0 (early stopping decides at evaluations)")
        return p


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    perf: PerfConfig = field(default_factory=PerfConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    @property
    def run_dir(self) -> Path:
        return Path(self.run.dir or os.path.join("runs", self.run.name))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def validate(self) -> list[str]:
        """Every problem with the values, each naming its key; empty when the config is usable."""
        p: list[str] = []
        for section in dataclasses.fields(self):
            sec = getattr(self, section.name)
            for f in dataclasses.fields(sec):
                choices = f.metadata.get("choices")
                value = getattr(sec, f.name)
                if choices and value not in choices:
                    p.append(f"{section.name}.{f.name} must be one of {', '.join(map(str, choices))} (got {value!r})")
            p += sec.problems(self) if hasattr(sec, "problems") else []
        return p


SECTIONS: dict[str, type] = {f.name: f.type for f in dataclasses.fields(Config)}  # type: ignore[misc]


def _section_types() -> dict[str, type]:
    hints = typing.get_type_hints(Config)
    return {name: hints[name] for name in SECTIONS}


def describe() -> list[tuple[str, str, Any, str]]:
    """(key, type, default, help) for every config key, in declaration order."""
    rows = []
    for sname, stype in _section_types().items():
        hints = typing.get_type_hints(stype)
        for f in dataclasses.fields(stype):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
            help_text = f.metadata.get("help", "")
            if f.metadata.get("choices"):
                help_text += f" [{' | '.join(map(str, f.metadata['choices']))}]"
            rows.append((f"{sname}.{f.name}", _type_name(hints[f.name]), default, help_text))
    return rows


def _type_name(tp) -> str:
    return getattr(tp, "__name__", str(tp)).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Convert a YAML/--set value to the field's declared type, or raise ValueError naming the key."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None or (args == [bool] and isinstance(value, str) and value.strip().lower() in ("auto", "")):
            return None  # an optional switch: empty/null/auto lets the engine decide
        errors = []
        for arg in args:  # the first member of the union the value converts to
            try:
                return _coerce(value, arg, key)
            except ValueError as e:
                errors.append(e)
        raise errors[0]
    if origin in (list, tuple):
        (elem,) = typing.get_args(tp)[:1] or (Any,)
        if isinstance(value, str):
            value = [v for v in value.strip("[]()").split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{key} must be a list (got {value!r})")
        return [_coerce(v, elem, key) for v in value]
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "yes", "on", "1", "false", "no", "off", "0"):
            return value.lower() in ("true", "yes", "on", "1")
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        raise ValueError(f"{key} must be true or false (got {value!r})")
    if tp is int:
        if isinstance(value, bool):
            raise ValueError(f"{key} must be an integer (got {value!r})")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                f = float(value.replace("_", ""))
            except ValueError:
                f = None
            if f is not None and f.is_integer():
                return int(f)
        raise ValueError(f"{key} must be an integer (got {value!r})")
    if tp is float:
        if isinstance(value, bool):
            raise ValueError(f"{key} must be a number (got {value!r})")
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ValueError(f"{key} must be a number (got {value!r})")
    if tp is str:
        if value is None:
            return ""
        if isinstance(value, (dict, list)):
            raise ValueError(f"{key} must be a string (got {value!r})")
        return str(value)
    if dataclasses.is_dataclass(tp):
        raise ValueError(f"{key} is a section; set its keys, e.g. {key}.<key>=...")
    return value


def _unknown(key: str, known: list[str]) -> str:
    close = difflib.get_close_matches(key, known, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else f"; known: {', '.join(known)}"
    return f"unknown config key {key!r}{hint}"


class _StrictLoader(yaml.SafeLoader):
    """YAML's safe loader, except that a key given twice in one mapping is an error (plain YAML keeps
    the last one silently); every repeat is collected, with both line numbers."""

    def __init__(self, stream):
        super().__init__(stream)
        self.repeated: list[str] = []

    def construct_mapping(self, node, deep=False):
        seen: dict = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            if key in seen:
                self.repeated.append(f"key {key!r} is given twice (lines {seen[key]} and {line}); YAML would keep "
                                     f"only the last: remove one")
            else:
                seen[key] = line
        return super().construct_mapping(node, deep)


def _load_yaml(text: str, path: str):
    loader = _StrictLoader(text)
    try:
        data = loader.get_single_data()
    finally:
        loader.dispose()
    if loader.repeated:
        raise UsageError([f"config file {path}: {r}" for r in loader.repeated])
    return data


def _json_pairs(path: str):
    def hook(pairs):
        keys = [k for k, _ in pairs]
        twice = sorted({k for k in keys if keys.count(k) > 1})
        if twice:
            raise UsageError([f"config file {path}: key {k!r} is given twice in one object; remove one" for k in twice])
        return dict(pairs)
    return hook


def _read_file(path: str) -> dict:
    p = Path(path)
    if not p.is_file():
        raise UsageError(f"config file not found: {path}")
    try:
        text = p.read_text(encoding="utf-8")
        data = json.loads(text, object_pairs_hook=_json_pairs(path)) if p.suffix == ".json" else _load_yaml(text, path)
    except (yaml.YAMLError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UsageError(f"cannot parse config file {path}: {e}".strip()) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UsageError(f"config file {path} must hold a mapping of sections (run:, model:, data:, ...)")
    return data


def parse_overrides(overrides: list[str] | tuple[str, ...]) -> tuple[dict, list[str]]:
    """`a.b=v` strings -> nested dict; values read as YAML scalars. Returns (tree, problems)."""
    tree: dict = {}
    problems: list[str] = []
    for item in overrides:
        key, eq, raw = item.partition("=")
        key = key.strip()
        if not eq or "." not in key:
            problems.append(f"--set {item!r} must look like section.key=value (e.g. train.max_steps=50)")
            continue
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        section, _, rest = key.partition(".")
        tree.setdefault(section, {})
        if not isinstance(tree[section], dict):
            tree[section] = {}
        tree[section][rest] = value
    return tree, problems


def merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = merge(out[k], v)
        else:
            out[k] = v
    return out


def from_dict(data: dict) -> tuple[Config, list[str]]:
    """Build a Config from a nested dict; unknown keys and type errors are returned, not raised."""
    problems: list[str] = []
    section_types = _section_types()
    kwargs = {}
    for sname, sval in data.items():
        if sname not in section_types:
            problems.append(_unknown(sname, list(section_types)))
            continue
        if sval is None:
            continue
        if not isinstance(sval, dict):
            problems.append(f"config section {sname!r} must be a mapping of keys (got {sval!r})")
            continue
        stype = section_types[sname]
        hints = typing.get_type_hints(stype)
        known = [f.name for f in dataclasses.fields(stype)]
        values = {}
        for k, v in sval.items():
            full = f"{sname}.{k}"
            if k not in known:
                problems.append(_unknown(full, [f"{sname}.{n}" for n in known]))
                continue
            try:
                values[k] = _coerce(v, hints[k], full)
            except ValueError as e:
                problems.append(str(e))
        kwargs[sname] = stype(**values)
    train = data.get("train") if isinstance(data.get("train"), dict) else {}
    if train.get("epochs") not in (None, 0, 0.0, "0", "") and "max_steps" in train:
        problems.append(f"train.epochs={train['epochs']} and train.max_steps={train['max_steps']} are both set; "
                        f"set one of them (epochs resolve to steps at the start of the run)")
    return Config(**kwargs), problems


def load_config(path: str | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """File (optional) + overrides -> validated Config, or a UsageError listing every problem."""
    data = _read_file(path) if path else {}
    tree, problems = parse_overrides(overrides)
    cfg, more = from_dict(merge(data, tree))
    problems += more
    problems += cfg.validate()
    if problems:
        raise UsageError(problems, hint="See `ftl config keys` for every key, its type and default.")
    return cfg


def dump_resolved(cfg: Config, path: Path, header: str = "") -> None:
    """config.yaml: the config the run used, every value resolved (`header`: comment lines on top), replaced
    whole (a temporary name, then a rename): never half-written."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(header + cfg.to_yaml(), encoding="utf-8")
    os.replace(tmp, path)
