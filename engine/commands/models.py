"""What `ftl eval`, `ftl generate` and `ftl export` do with models and checkpoints outside a training run."""

from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path

import torch
import yaml

from engine import checkpoint, dist, fastpath, model as model_lib, ownership
from engine.data import sources as data
from engine.config import DataConfig, PerfConfig
from engine.errors import UsageError


def resolve_model_dir(path: Path) -> tuple[Path, dict]:
    """A model directory, given it or a run directory (then its final/), plus the run's config if known."""
    run_cfg: dict = {}
    if (path / "final").is_dir():
        if (path / "config.yaml").is_file():
            run_cfg = yaml.safe_load((path / "config.yaml").read_text(encoding="utf-8")) or {}
        path = path / "final"
    elif (path.parent / "config.yaml").is_file():
        run_cfg = yaml.safe_load((path.parent / "config.yaml").read_text(encoding="utf-8")) or {}
    if not (path / "config.json").is_file():
        raise UsageError(f"{path} is not a model directory (no config.json); pass a run's final/ or the run directory")
    return path, run_cfg


def head_of(model_dir: Path) -> str:
    cfg = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    archs = cfg.get("architectures") or []
    return "cls" if any(a.endswith("ForSequenceClassification") for a in archs) else "lm"


def load_model(model_dir: Path, device: torch.device):
    from engine.model import load_exported

    head = head_of(model_dir)
    hf = load_exported(model_dir, head).to(device)
    tok = data.load_tokenizer(str(model_dir))
    return hf, tok, head


def evaluate_model(path: Path, source: str, split: str, seq_len: int | None, batch_size: int,
                   text_column: str | None, label_column: str | None, max_batches: int, stride: int | None = None,
                   **sft_options) -> dict:
    """Headline numbers plus (cls) labels, per-class scores and the confusion matrix, as one flat dict."""
    header, report = evaluate_model_report(path, source, split, seq_len, batch_size, text_column, label_column,
                                           max_batches, stride, **sft_options)
    out = {**header, **report.to_json()}
    out.pop("head")
    return out


SFT_KEYS = ("format", "prompt_column", "completion_column", "messages_column", "train_on_prompt", "role_map")


def evaluate_model_report(path: Path, source: str, split: str, seq_len: int | None, batch_size: int,
                          text_column: str | None, label_column: str | None, max_batches: int,
                          stride: int | None = None, generations: int = 0, generation_tokens: int = 32,
                          **sft_options):
    """(header, EvalReport) of a model directory or run on a dataset split; streaming, one process.

    `sft_options` (format, prompt_column, completion_column, messages_column, train_on_prompt, role_map; None:
    the run's, else the defaults) read prompt_completion/chat data: the loss is then the completion loss,
    the chat template the model's own (saved with its tokenizer)."""
    from engine import evaluation

    model_dir, run_cfg = resolve_model_dir(path)
    env = dist.DistEnv(device=torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    hf, tok, head = load_model(model_dir, env.device)
    d = run_cfg.get("data", {})
    mix = []
    if not source:  # the data the run trained on: its validation split is the run's own held-out data
        if not d.get("source"):
            raise UsageError(f"--data is needed: {path} is a model directory without the run's config.yaml, so the "
                             f"data it was trained on is unknown (give --data SOURCE)")
        source, mix = d["source"], d.get("mix") or []  # a run on a data.mix: its datasets, their held-out parts
    sft = {k: sft_options[k] if sft_options.get(k) is not None else d[k] for k in SFT_KEYS
           if sft_options.get(k) is not None or k in d}
    dcfg = DataConfig(source=source, text_column=text_column or d.get("text_column", "text"),
                      label_column=label_column or d.get("label_column", "label"),
                      seq_len=seq_len or d.get("seq_len", min(1024, hf.config.n_positions)),
                      val_fraction=d.get("val_fraction", 0.1), pack=d.get("pack", True),
                      overflow=d.get("overflow", "truncate"), stride=d.get("stride", 0),
                      max_windows=d.get("max_windows", 0), window_pool=d.get("window_pool", "mean"), mix=mix, **sft)
    if dcfg.sft:
        if head != "lm":
            raise UsageError(f"--format {dcfg.format} needs a language model; {model_dir} is a classifier")
        if dcfg.overflow == "window":
            dcfg.overflow = "truncate"
        if dcfg.format == "chat" and not getattr(tok, "chat_template", None):
            raise UsageError(f"{model_dir} has no chat template (its tokenizer_config.json / chat_template.jinja); "
                             f"--format chat needs the template the model was trained with")
    if dcfg.seq_len > hf.config.n_positions:
        raise UsageError(f"--seq-len {dcfg.seq_len} exceeds the model's {hf.config.n_positions} positions")
    raw = data.load_raw(dcfg, seed=int(run_cfg.get("run", {}).get("seed", 1234)), need_label=head == "cls")
    if split == "train":
        raw["validation"] = raw["train"]
    labels = [hf.config.id2label[i] for i in range(hf.config.num_labels)] if head == "cls" else None
    vocab = len(tok)
    prepared = data.prepare(raw, tok, dcfg, head, label_names=labels, prompts=generations)
    if len(tok) != vocab:
        raise UsageError(f"{model_dir}'s tokenizer lacks the chat template's markers; evaluate the model with the "
                         f"tokenizer it was trained with")
    if len(prepared.validation) == 0:
        raise UsageError(f"the {split} split of {source!r} has no sample of {dcfg.seq_len} tokens; lower --seq-len")
    stride = run_cfg.get("eval", {}).get("stride", 0) if stride is None else stride
    if stride and (head != "lm" or dcfg.sft):
        raise UsageError("--stride (sliding-window perplexity) needs a language model and --format text")
    if stride > dcfg.seq_len:
        raise UsageError(f"--stride {stride} must not exceed the window of {dcfg.seq_len} tokens (--seq-len)")
    windows = evaluation.window_dataset(raw["validation"], tok, dcfg.text_column, dcfg.seq_len, stride) if stride else None
    report = evaluation.evaluate_report(model_lib.TrainModule(hf, head, packed=dcfg.pack), prepared, env, batch_size, max_batches,
                                        windows=windows, generation_tokens=generation_tokens)
    header = {"model": str(model_dir), "split": split, "samples": len(prepared.validation)}
    if dcfg.sft:
        st = prepared.stats["validation"]
        header.update(format=dcfg.format, examples=st.kept, target_tokens=st.targets)
        if st.too_long or st.no_target:
            header["dropped"] = st.too_long + st.no_target
    if stride:
        header["stride"] = stride
    return header, report


def generate_text(path: Path, prompt: str, max_new_tokens: int, temperature: float, top_k: int, top_p: float,
                  seed: int) -> str:
    model_dir, _ = resolve_model_dir(path)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    hf, tok, head = load_model(model_dir, device)
    if head != "lm":
        raise UsageError(f"{model_dir} is a classification model; `ftl generate` needs a language model")
    torch.manual_seed(seed)
    ids = tok(prompt, return_tensors="pt").to(device)
    sampling = dict(do_sample=True, temperature=temperature, top_k=top_k or None, top_p=top_p) if temperature > 0 \
        else dict(do_sample=False)
    out = hf.generate(**ids, max_new_tokens=max_new_tokens, pad_token_id=tok.pad_token_id, **sampling)
    return tok.decode(out[0], skip_special_tokens=True)


def parse_messages(value: str) -> list[dict]:
    """`ftl generate --chat`: a JSON list of {role, content} messages, given inline or as a file path."""
    text = value
    if not value.lstrip().startswith(("[", "{")) and Path(value).expanduser().is_file():
        text = Path(value).expanduser().read_text(encoding="utf-8")
    try:
        messages = json.loads(text)
    except json.JSONDecodeError as e:
        raise UsageError(f"--chat must be a JSON list of messages (or a file holding one): {e.msg}") from None
    if isinstance(messages, dict) and isinstance(messages.get("messages"), list):
        messages = messages["messages"]
    problems = []
    if not isinstance(messages, list) or not messages:
        problems.append("--chat must be a non-empty JSON list of {\"role\": ..., \"content\": ...} messages")
    else:
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant"):
                problems.append(f"--chat message {i}: role must be system, user or assistant")
            elif not isinstance(m.get("content"), str):
                problems.append(f"--chat message {i}: content must be a string")
    if problems:
        raise UsageError(problems)
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def generate_chat(path: Path, messages: list[dict], max_new_tokens: int, temperature: float, top_k: int,
                  top_p: float, seed: int) -> str:
    """The assistant's reply to `messages`: rendered with the model's saved chat template (the generation
    prompt added), generated until EOS or the template's end-of-turn marker (generation_config.json)."""
    model_dir, _ = resolve_model_dir(path)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    hf, tok, head = load_model(model_dir, device)
    if head != "lm":
        raise UsageError(f"{model_dir} is a classification model; `ftl generate` needs a language model")
    if not getattr(tok, "chat_template", None):
        raise UsageError(f"{model_dir} has no chat template; --chat needs a model trained with data.format=chat "
                         f"(use --prompt for plain text)")
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = tok(text, add_special_tokens=False, return_tensors="pt").to(device)
    if ids["input_ids"].shape[1] + max_new_tokens > hf.config.n_positions:
        raise UsageError(f"the conversation has {ids['input_ids'].shape[1]} tokens; with --max-new-tokens "
                         f"{max_new_tokens} that exceeds the model's {hf.config.n_positions} positions")
    torch.manual_seed(seed)
    sampling = dict(do_sample=True, temperature=temperature, top_k=top_k or None, top_p=top_p) if temperature > 0 \
        else dict(do_sample=False)
    out = hf.generate(**ids, max_new_tokens=max_new_tokens, pad_token_id=tok.pad_token_id, **sampling)
    return tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)


def read_prompts(path: Path) -> list[str]:
    """Prompts from a file: JSON lines with a "prompt" field (.jsonl), or one prompt per non-empty line."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"--prompts-file {path}: cannot read it ({e})") from None
    if path.suffix == ".jsonl":
        prompts, problems = [], []
        for i, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                problems.append(f"--prompts-file {path} line {i}: not JSON ({e.msg})")
                continue
            if not isinstance(row, dict) or not isinstance(row.get("prompt"), str):
                problems.append(f"--prompts-file {path} line {i}: needs a string field \"prompt\"")
                continue
            prompts.append(row["prompt"])
        if problems:
            raise UsageError(problems)
    else:
        prompts = [line for line in text.splitlines() if line.strip()]
    if not prompts:
        raise UsageError(f"--prompts-file {path} holds no prompt")
    return prompts


@torch.no_grad()
def generate_batch(hf, tok, prompts: list[str], max_new_tokens: int, temperature: float, top_k: int, top_p: float,
                   seed: int | None, batch_size: int = 8) -> list[str]:
    """Continuations (new text only) of `prompts`, `batch_size` at a time, left-padded.

    The global torch RNG is seeded once, so the same prompts, batch size and seed give the same texts;
    greedy decoding (temperature 0) gives each prompt the continuation it gets alone."""
    device = next(hf.parameters()).device
    if seed is not None:
        torch.manual_seed(seed)
    sampling = dict(do_sample=True, temperature=temperature, top_k=top_k or None, top_p=top_p) if temperature > 0 \
        else dict(do_sample=False)
    old_side, tok.padding_side = tok.padding_side, "left"
    out: list[str] = []
    try:
        for i in range(0, len(prompts), batch_size):
            chunk = prompts[i:i + batch_size]
            enc = tok(chunk, return_tensors="pt", padding=True).to(device)
            gen = hf.generate(**enc, max_new_tokens=max_new_tokens, pad_token_id=tok.pad_token_id, **sampling)
            width = enc["input_ids"].shape[1]
            out += [tok.decode(g[width:], skip_special_tokens=True) for g in gen]
    finally:
        tok.padding_side = old_side
    return out


def generate_many(path: Path, prompts: list[str], max_new_tokens: int, temperature: float, top_k: int, top_p: float,
                  seed: int, batch_size: int) -> list[dict]:
    """`ftl generate --prompts-file`: one {"prompt", "completion"} per prompt."""
    model_dir, _ = resolve_model_dir(path)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    hf, tok, head = load_model(model_dir, device)
    if head != "lm":
        raise UsageError(f"{model_dir} is a classification model; `ftl generate` needs a language model")
    texts = generate_batch(hf, tok, prompts, max_new_tokens, temperature, top_k, top_p, seed, batch_size)
    return [{"prompt": p, "completion": t} for p, t in zip(prompts, texts)]


def full_state_from_checkpoint(ckpt: Path) -> dict[str, torch.Tensor]:
    """The transformers-model weights saved in a checkpoint, whatever backend wrote it."""
    single = ckpt / "model.safetensors"
    if single.is_file():
        from safetensors.torch import load_file

        prefix = "hf."
        return {k[len(prefix):]: v for k, v in load_file(str(single)).items() if k.startswith(prefix)}
    from engine.backends import checkpoint_reader

    reader = checkpoint_reader(ckpt)
    if reader is None:
        raise UsageError(f"{ckpt} holds no model weights this engine knows how to read")
    return reader(ckpt)


def export_checkpoint(path: Path, out: Path) -> Path:
    """Checkpoint (or run directory -> its latest checkpoint) -> Hugging Face directory, verified."""
    with reading_checkpoint(path) as ckpt:
        return _export_checkpoint(ckpt, out)


def _export_checkpoint(path: Path, out: Path) -> Path:
    from transformers import AutoConfig

    state = json.loads((path / checkpoint.STATE).read_text(encoding="utf-8"))
    head = state["config"]["model"]["head"]
    hf_config = AutoConfig.from_pretrained(path / "config.json")
    tok = data.load_tokenizer(str(path / "tokenizer"))
    weights = full_state_from_checkpoint(path)
    if head == "lm":  # checkpoints hold the padded vocabulary (perf.pad_vocab_to)
        weights = fastpath.unpad_state_dict(weights, hf_config.vocab_size)
    labels = [hf_config.id2label[i] for i in range(hf_config.num_labels)] if head == "cls" else None
    extras = None
    if state["config"]["model"].get("lora_rank"):
        from engine import transfer
        from engine.config import from_dict

        adapter, model_cfg = weights, from_dict(state["config"])[0].model
        extras = lambda d: transfer.save_adapter(adapter, model_cfg, head, d / "adapter", tok)
        weights = lora_checkpoint_weights(state, weights, tok, labels)
    checkpoint.export_hf(hf_config, head, weights, tok, out, labels, extras=extras)
    verify_weights(out, weights, head)
    return out


def resolve_checkpoint(path: Path) -> Path:
    """A complete checkpoint directory, given it or a run directory (then its newest one that verifies)."""
    with reading_checkpoint(path) as ckpt:
        return ckpt


@contextlib.contextmanager
def reading_checkpoint(path: Path):
    """A checkpoint, given it or a run directory (then its newest one that verifies, naming the newer ones
    skipped), verified against its digests and held with a shared lock while the block reads it: a run still
    training in that directory leaves a checkpoint a reader holds for a later save to delete. A damaged
    checkpoint named explicitly, or a run directory where none verifies, is a UsageError (exit 2)."""
    if (path / "checkpoints").is_dir():
        ckpt, lock = checkpoint.choose(path / "checkpoints", lambda line: print(line, file=sys.stderr, flush=True),
                                       hold=lambda c: ownership.SharedLock(c / checkpoint.COMPLETE))
        if ckpt is None:
            raise UsageError(f"{path} has no complete checkpoint under checkpoints/")
    else:
        if not checkpoint.is_complete(path):
            raise UsageError(f"{path} is not a complete checkpoint (it needs {checkpoint.STATE} and "
                             f"{checkpoint.COMPLETE}), a run directory or a model directory")
        try:
            lock = ownership.SharedLock(path / checkpoint.COMPLETE)
        except ownership.Vanished:
            raise UsageError(f"{path} was deleted while this started reading it (a run's retention?)") from None
        ckpt = path
        try:
            checkpoint.check_explicit(path)
        except BaseException:
            lock.release()
            raise
    with lock:
        yield ckpt


def export_checkpoint_checked(path: Path, out: Path) -> dict:
    """`export_checkpoint`, then the engine's model built from the checkpoint's weights and the export
    reloaded by transformers must give the same logits on a padded probe batch."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    from engine.commands import export_check
    from engine.model import load_exported

    with reading_checkpoint(path) as ckpt:
        return _export_checkpoint_checked(ckpt, out)


def _export_checkpoint_checked(ckpt: Path, out: Path) -> dict:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    from engine.commands import export_check
    from engine.model import load_exported

    _export_checkpoint(ckpt, out)
    head = head_of(out)
    hf_config = AutoConfig.from_pretrained(ckpt / "config.json")
    state = json.loads((ckpt / checkpoint.STATE).read_text(encoding="utf-8"))
    if state["config"]["model"].get("lora_rank"):  # the adapted model, adapters unmerged: checks the merge too
        labels = [hf_config.id2label[i] for i in range(hf_config.num_labels)] if head == "cls" else None
        adapted = lora_adapted_model(state, full_state_from_checkpoint(ckpt),
                                     data.load_tokenizer(str(ckpt / "tokenizer")), labels)
        module = model_lib.TrainModule(adapted, head).eval()
    else:
        auto = AutoModelForSequenceClassification if head == "cls" else AutoModelForCausalLM
        # the real vocabulary: whatever padding (perf.pad_vocab_to) the checkpoint was trained with is cut off
        module = model_lib.TrainModule(auto.from_config(hf_config), head, perf=PerfConfig(pad_vocab_to=1)).eval()
        weights = full_state_from_checkpoint(ckpt)
        if head == "lm":  # the tied embedding is saved under one of its two names
            tied = weights.get("lm_head.weight", weights.get("transformer.wte.weight"))
            weights = fastpath.unpad_state_dict({**weights, "lm_head.weight": tied, "transformer.wte.weight": tied},
                                                hf_config.vocab_size)
        missing = module.hf.load_state_dict(weights, strict=False).missing_keys
        if missing:
            raise export_check.ExportCheckFailed(f"checkpoint {ckpt} lacks weights for {missing[:5]}")
    tok = data.load_tokenizer(str(out))
    batch = export_check.probe(tok)
    with torch.no_grad():
        ours = module.logits(batch["input_ids"], batch["attention_mask"])
        theirs = load_exported(out, head)(**batch).logits
    diff = export_check.compare(theirs, ours, batch["attention_mask"], f"the Hugging Face export {out}")
    return {"check": "transformers reload vs the engine's model from the checkpoint weights (and the weights equal)",
            "max_abs_diff": diff, "probe_shape": list(batch["input_ids"].shape), "source": f"checkpoint {ckpt}"}


def verify_weights(out: Path, weights: dict[str, torch.Tensor], head: str) -> None:
    """The written directory, reloaded by transformers, holds exactly `weights` (non-empty, same shapes)."""
    from engine.model import load_exported

    reloaded = load_exported(out, head).state_dict()
    problems = []
    for name, tensor in weights.items():
        got = reloaded.get(name)
        if got is None or got.numel() == 0:
            problems.append(f"{name}: missing or empty")
        elif got.shape != tensor.shape:
            problems.append(f"{name}: shape {tuple(got.shape)} != {tuple(tensor.shape)}")
        elif not torch.equal(got.float(), tensor.float()):
            problems.append(f"{name}: values differ")
    if problems:  # an ExportCheckFailed: `ftl export` reports it in one line, exit 1, nothing left at --out
        from engine.commands.export_check import ExportCheckFailed

        raise ExportCheckFailed(f"export {out} failed verification: " + "; ".join(problems[:5]))


def lora_checkpoint_weights(state: dict, adapter: dict[str, torch.Tensor], tokenizer, labels) -> dict[str, torch.Tensor]:
    """A LoRA checkpoint's weights as a plain model's: the adapted model rebuilt, adapters merged."""
    from engine import transfer
    from engine.config import from_dict

    hf = lora_adapted_model(state, adapter, tokenizer, labels)
    return transfer.merge_lora({k: v.detach().float() for k, v in hf.state_dict().items()},
                               from_dict(state["config"])[0].model)


def lora_adapted_model(state: dict, adapter: dict[str, torch.Tensor], tokenizer, labels):
    """A LoRA checkpoint holds adapters (and a classifier) only: rebuild the base as the run built it
    (model.name, seeded), check it is the one trained on, and load the adapters into it."""
    from engine import transfer
    from engine.config import from_dict
    from engine.trainer import seed_everything

    cfg, problems = from_dict(state["config"])
    if problems:
        raise UsageError([f"the checkpoint's config: {p}" for p in problems])
    source = model_lib.resolve(cfg.model)
    seed_everything(cfg.run.seed)
    hf = model_lib.build(cfg.model, source, tokenizer, len(labels or []))
    if cfg.model.head == "lm":  # as the trainer does: pad the LM head before the adapters go in
        fastpath.install_lm_head(hf, cfg.perf)
    transfer.adapt(hf, cfg.model)
    module = model_lib.TrainModule(hf, cfg.model.head, perf=cfg.perf, packed=cfg.data.pack)
    saved = state.get("base_fingerprint")
    if saved and transfer.base_fingerprint(module) != saved:
        raise UsageError(f"model.name {cfg.model.name!r} no longer gives the base weights this LoRA checkpoint was "
                         f"trained on; export needs that base model")
    missing = set(adapter) - set(hf.state_dict())
    if missing:
        raise UsageError(f"the checkpoint holds weights this model does not have: {sorted(missing)[:3]}")
    hf.load_state_dict(adapter, strict=False)
    return hf.eval()
