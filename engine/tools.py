"""What `ftl eval`, `ftl generate` and `ftl export` do with models and checkpoints outside a training run."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import yaml

from engine import checkpoint, data, dist, model as model_lib
from engine.config import DataConfig
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
    from engine.trainer import load_exported

    head = head_of(model_dir)
    hf = load_exported(model_dir, head).to(device)
    tok = data.load_tokenizer(str(model_dir))
    return hf, tok, head


def evaluate_model(path: Path, source: str, split: str, seq_len: int | None, batch_size: int,
                   text_column: str | None, label_column: str | None, max_batches: int) -> dict:
    from engine.trainer import evaluate

    model_dir, run_cfg = resolve_model_dir(path)
    env = dist.DistEnv(device=torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    hf, tok, head = load_model(model_dir, env.device)
    d = run_cfg.get("data", {})
    dcfg = DataConfig(source=source, text_column=text_column or d.get("text_column", "text"),
                      label_column=label_column or d.get("label_column", "label"),
                      seq_len=seq_len or d.get("seq_len", min(1024, hf.config.n_positions)),
                      val_fraction=d.get("val_fraction", 0.1), pack=d.get("pack", True))
    if dcfg.seq_len > hf.config.n_positions:
        raise UsageError(f"--seq-len {dcfg.seq_len} exceeds the model's {hf.config.n_positions} positions")
    raw = data.load_raw(dcfg, seed=int(run_cfg.get("run", {}).get("seed", 1234)), need_label=head == "cls")
    if split == "train":
        raw["validation"] = raw["train"]
    labels = [hf.config.id2label[i] for i in range(hf.config.num_labels)] if head == "cls" else None
    prepared = data.prepare(raw, tok, dcfg, head, label_names=labels)
    if len(prepared.validation) == 0:
        raise UsageError(f"the {split} split of {source!r} has no sample of {dcfg.seq_len} tokens; lower --seq-len")
    out = evaluate(model_lib.TrainModule(hf, head), prepared, env, batch_size, max_batches)
    return {"model": str(model_dir), "split": split, "samples": len(prepared.validation), **out}


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
    from transformers import AutoConfig

    if (path / "checkpoints").is_dir():
        latest = checkpoint.find_latest(path / "checkpoints")
        if latest is None:
            raise UsageError(f"{path} has no complete checkpoint under checkpoints/")
        path = latest
    if not checkpoint.is_complete(path):
        raise UsageError(f"{path} is not a complete checkpoint (it needs {checkpoint.STATE} and {checkpoint.COMPLETE})")
    state = json.loads((path / checkpoint.STATE).read_text(encoding="utf-8"))
    head = state["config"]["model"]["head"]
    hf_config = AutoConfig.from_pretrained(path / "config.json")
    tok = data.load_tokenizer(str(path / "tokenizer"))
    weights = full_state_from_checkpoint(path)
    labels = [hf_config.id2label[i] for i in range(hf_config.num_labels)] if head == "cls" else None
    checkpoint.export_hf(hf_config, head, weights, tok, out, labels)
    verify_weights(out, weights, head)
    return out


def verify_weights(out: Path, weights: dict[str, torch.Tensor], head: str) -> None:
    """The written directory, reloaded by transformers, holds exactly `weights` (non-empty, same shapes)."""
    from engine.trainer import load_exported

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
    if problems:
        raise RuntimeError(f"export {out} failed verification: " + "; ".join(problems[:5]))
