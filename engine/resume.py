"""What a resumed run checks against the checkpoint it continues: config drift and the model's shape.

A resumed run is the same run, so what defines it must not change under it:
  error (UsageError, exit 2, nothing written): the model (name, head, labels, and every shape in the
      checkpoint's config.json), the data (source, columns, seq_len, split, packing, tokenizer),
      run.seed (it fixes the data order and the dropout streams) and dist.backend (the file format);
  warning (printed, the run goes on): how training continues — optim.* (lr, schedule), train.max_steps,
      the global batch (micro_batch x grad_accum x ranks), precision, clipping, dropout, ...;
  silent: logging, evaluation, checkpoint cadence, timeouts, where the run lives.
Keys added later (other sections) are warnings unless listed here. A different number of ranks is not
drift: the data continues from the saved global sample index, the backend re-shards.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from engine.config import Config
from engine.errors import UsageError

MUST_MATCH = {
    "model.name", "model.head", "model.num_labels", "model.max_positions", "model.freeze", "model.lora_rank",
    "model.lora_targets", "perf.pad_vocab_to",
    "data.source", "data.text_column", "data.label_column", "data.seq_len", "data.val_fraction", "data.pack",
    "data.tokenizer", "data.overflow", "data.stride", "data.max_windows", "data.balanced_sampling", "data.add_tokens",
    "data.format", "data.prompt_column", "data.completion_column", "data.messages_column", "data.train_on_prompt",
    "data.chat_template", "data.role_map", "data.mix", "data.isolate_documents",
    "run.seed", "dist.backend",
}
IGNORED = {
    "run.name", "run.dir",
    "model.init", "model.compile", "model.gradient_checkpointing", "model.position_init", "data.window_pool",
    "eval.stride", "eval.metric", "eval.mode", "eval.patience", "eval.min_delta", "eval.save_best",
    "eval.generations", "eval.generation_tokens",
    "data.tokenizer_vocab",  # a resumed run reuses the tokenizer it trained
    "train.log_every", "train.eval_every", "train.eval_batches", "train.device", "train.sample_tokens",
    "train.sample_prompt", "train.max_bad_steps", "train.stop_at_step",
    "train.epochs",  # resolved to train.max_steps at start (the trainer compares those)
    "checkpoint.every", "checkpoint.every_minutes", "checkpoint.keep", "checkpoint.resume",
    "dist.timeout_s", "dist.step_timeout_s", "dist.watchdog_s",
}
SHAPE_FIELDS = ("n_layer", "n_embd", "n_head", "n_inner", "n_positions", "vocab_size", "num_labels")


def _flat(tree: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def config_drift(saved: dict, cfg: Config) -> tuple[list[str], list[str]]:
    """(errors, warnings) between the config a checkpoint was written with and this run's."""
    before, now = _flat(saved), _flat(cfg.to_dict())
    errors, warnings = [], []
    for key in now:
        if key not in before or key in IGNORED or before[key] == now[key]:
            continue
        change = f"{key} {before[key]!r} -> {now[key]!r}"
        (errors if key in MUST_MATCH else warnings).append(change)
    return errors, warnings


def check_config(path: Path, state: dict, cfg: Config, world_size: int, log=None) -> None:
    """Raise UsageError for drift that breaks the run; report the rest through `log` (rank 0's console)."""
    log = log or (lambda line: print(line, file=sys.stderr, flush=True))
    errors, warnings = config_drift(state.get("config", {}), cfg)
    if errors:
        raise UsageError(
            [f"the checkpoint {path} was written with {e.split(' -> ')[0]}; this run has {e.split(' -> ')[1]}"
             for e in errors],
            hint="Resuming continues the same run: restore those settings, or start a new run "
                 "(checkpoint.resume=none, or another run.dir).")
    saved_world, saved_batch = int(state.get("world_size", world_size)), state.get("global_batch")
    batch = world_size * cfg.train.micro_batch * cfg.train.grad_accum
    if warnings:
        log("warning: resuming with changed settings: " + "; ".join(warnings))
    if saved_batch is not None and int(saved_batch) != batch:
        log(f"warning: the global batch changes from {saved_batch} to {batch} samples per step; the data continues "
            f"from global sample {state.get('sample_index')}, so no sample is skipped or repeated")
    if saved_world != world_size:
        log(f"resuming a checkpoint written by {saved_world} rank(s) on {world_size}")


def check_model_shape(path: Path, hf_config) -> None:
    """The model built for this run must have the checkpoint's shapes (its config.json)."""
    saved_file = path / "config.json"
    if not saved_file.is_file():
        return
    saved = json.loads(saved_file.read_text(encoding="utf-8"))
    now = hf_config.to_dict()
    diffs = [f"{k} {saved.get(k)!r} -> {now.get(k)!r}" for k in SHAPE_FIELDS
             if k in saved and saved.get(k) != now.get(k)]
    if diffs:
        raise UsageError(f"the model differs from the one in checkpoint {path}: {', '.join(diffs)}",
                         hint="Resuming needs the same model: restore model.* and data.*, or start a new run "
                              "(checkpoint.resume=none, or another run.dir).")
