"""Deployment exports: Hugging Face, ONNX and TorchScript, each checked by a round trip.

`ftl export SOURCE --format hf|onnx|torchscript --out DIR`. SOURCE is a checkpoint, a run directory
(its newest checkpoint) or a Hugging Face model directory (a run's final/, or an earlier export).
ONNX and TorchScript start from the Hugging Face model, so they always carry the model's real
vocabulary, whatever padding the training engine used internally.

DIR is never something the export did not write: an existing non-empty DIR is refused (exit 2) unless an
earlier `ftl export` wrote it (its export.json lists its files) and --force is given; the source, the
current directory and their parents are always refused (engine/ownership.py).

Every format is checked before DIR appears (it is written under a temporary name and renamed last):
- hf: reloaded by plain `transformers`, its weights must equal the source's exactly and its logits
  match the engine's model built from the same weights;
- onnx: run by onnxruntime on a probe batch of a different shape than the export example, with
  padding, against the PyTorch model's logits;
- torchscript: reloaded with `torch.jit.load` and compared the same way.
A mismatch raises `ExportCheckFailed` (exit 1) naming the largest difference; nothing is left at DIR.
LM logits are compared at real (non-pad) positions only: a pad position's output is never used.

Graph exports take (input_ids, attention_mask), int64, batch and sequence dynamic, and return logits:
[batch, seq, vocab] for lm, [batch, num_labels] for cls (pooled at the last non-pad token, so pad
with the tokenizer's pad id, on the right).
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import torch
from torch import nn

from engine.errors import UsageError

FORMATS = ("hf", "onnx", "torchscript")
PROBE_TEXTS = ["The with statement is used to wrap the execution of a block", "A class definition", "x = 1"]


class ExportCheckFailed(RuntimeError):
    """An export that does not reproduce the PyTorch model: never ship it."""


class LogitsOnly(nn.Module):
    """(input_ids, attention_mask) -> logits: the graph a runtime sees (no cache, no dict outputs)."""

    def __init__(self, hf: nn.Module):
        super().__init__()
        self.hf = hf

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.hf(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits


def is_hf_dir(path: Path) -> bool:
    return (path / "config.json").is_file() and any(path.glob("*.safetensors")) and not (path / "trainer_state.json").exists()


def probe(tokenizer, texts=PROBE_TEXTS, max_len: int | None = None) -> dict[str, torch.Tensor]:
    """A fixed batch with right padding (the graph exports are checked on padded input)."""
    old = tokenizer.padding_side
    tokenizer.padding_side = "right"
    try:
        enc = tokenizer(list(texts), return_tensors="pt", padding=True, truncation=bool(max_len), max_length=max_len)
    finally:
        tokenizer.padding_side = old
    return {"input_ids": enc["input_ids"].long(), "attention_mask": enc["attention_mask"].long()}


def compare(ours: torch.Tensor, theirs: torch.Tensor, mask: torch.Tensor | None, what: str,
            rtol: float = 1e-4) -> float:
    """Max |difference| (at mask positions for per-token logits); raises if above rtol * max(1, |logits|)."""
    ours, theirs = torch.as_tensor(ours).float(), torch.as_tensor(theirs).float()
    if ours.shape != theirs.shape:
        raise ExportCheckFailed(f"{what}: logits shape {tuple(ours.shape)} != PyTorch's {tuple(theirs.shape)}")
    diff = (ours - theirs).abs()
    if mask is not None and diff.dim() == 3:
        diff = diff[mask.bool()]
    worst = float(diff.max()) if diff.numel() else 0.0
    limit = rtol * max(1.0, float(theirs.abs().max()))
    if not worst <= limit:  # also catches NaN
        raise ExportCheckFailed(f"{what} does not reproduce the PyTorch logits: max abs difference {worst:.3g} "
                                f"> tolerance {limit:.3g}")
    return worst


# ------------------------------------------------------------------------------------------- sources

def hf_source(path: Path, workdir: Path) -> tuple[Path, str]:
    """A Hugging Face directory for `path` (exporting a checkpoint into `workdir` when needed) and what it was."""
    from engine import tools

    if is_hf_dir(path):
        return path, f"model directory {path}"
    if (path / "final").is_dir() and not (path / "checkpoints").is_dir():
        return path / "final", f"model directory {path / 'final'}"
    out = workdir / "hf"
    with tools.reading_checkpoint(path) as ckpt:
        tools._export_checkpoint(ckpt, out)
    return out, f"checkpoint {ckpt}"


def export(path: Path, out: Path, fmt: str, opset: int = 18, force: bool = False) -> dict:
    """Write `fmt` to `out` (atomically) and return the round-trip report (also saved as export.json).
    An existing `out` is replaced only with force=True and only if an earlier export wrote it."""
    from engine import ownership, tools

    problems = [] if fmt in FORMATS else [f"--format must be one of {', '.join(FORMATS)} (got {fmt!r})"]
    out = Path(out)
    problems += ownership.target_problems(out, force, sources=[Path(path)])
    if problems:
        raise UsageError(problems)
    try:
        tmp = ownership.temp_sibling(out)
    except OSError as e:
        raise UsageError(f"--out {out}: cannot create a directory there ({e.strerror or e})") from None
    try:
        if fmt == "hf":
            if is_hf_dir(path):
                report = dict(reexport_hf(path, tmp / "model"), source=f"model directory {path}")
            else:
                report = tools.export_checkpoint_checked(path, tmp / "model")
        else:
            with tempfile.TemporaryDirectory(dir=tmp) as work:
                src, what = hf_source(path, Path(work))
                target = tmp / "model"
                target.mkdir()
                report = (export_onnx(src, target, opset) if fmt == "onnx" else export_torchscript(src, target))
                report["source"] = what
        report["format"] = fmt
        ownership.stamp(tmp / "model", report)  # export.json: the check's numbers and the files written
        ownership.replace_dir(tmp / "model", out, what="--out")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return report


def _load(src: Path):
    from engine import data, tools
    from engine.trainer import load_exported

    head = tools.head_of(src)
    return load_exported(src, head), data.load_tokenizer(str(src)), head


def _copy_side_files(src: Path, out: Path) -> None:
    """What a runtime needs beside the graph: config.json, generation config and the tokenizer."""
    for f in src.iterdir():
        if f.is_file() and not f.name.endswith((".safetensors", ".bin")) and f.name != "export.json":
            shutil.copy2(f, out / f.name)


def reexport_hf(src: Path, out: Path) -> dict:
    """An HF directory written again (e.g. to a new place), checked against its source's logits."""
    hf, tok, head = _load(src)
    hf.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    for f in ("generation_config.json",):
        if (src / f).is_file() and not (out / f).is_file():
            shutil.copy2(src / f, out / f)
    from engine.trainer import load_exported

    batch = probe(tok)
    with torch.no_grad():
        ref = hf(**batch).logits
        got = load_exported(out, head)(**batch).logits
    diff = compare(got, ref, batch["attention_mask"], f"the Hugging Face export {out}")
    return {"check": "transformers reload vs source logits", "max_abs_diff": diff, "probe_shape": list(batch["input_ids"].shape)}


# ---------------------------------------------------------------------------------------------- ONNX

def export_onnx(src: Path, out: Path, opset: int = 18) -> dict:
    """model.onnx (torch.export -> ONNX, dynamic batch and sequence) checked with onnxruntime."""
    import logging
    import warnings

    logging.getLogger("torch.onnx").setLevel(logging.ERROR)  # "torchvision is not installed" notes
    hf, tok, head = _load(src)
    wrapped = LogitsOnly(hf).eval()
    example = probe(tok, PROBE_TEXTS[:2])
    batch, seq = torch.export.Dim("batch"), torch.export.Dim("sequence", max=hf.config.n_positions)
    dynamic = {"input_ids": {0: batch, 1: seq}, "attention_mask": {0: batch, 1: seq}}
    path = out / "model.onnx"
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(wrapped, (example["input_ids"], example["attention_mask"]), dynamo=True,
                                    input_names=["input_ids", "attention_mask"], output_names=["logits"],
                                    dynamic_shapes=dynamic, opset_version=opset, verbose=False)
        program.save(str(path), external_data=False)
    _copy_side_files(src, out)
    report = check_onnx(path, wrapped, tok)
    report.update(opset=opset, inputs=["input_ids", "attention_mask"], outputs=["logits"], head=head)
    return report


def check_onnx(path: Path, torch_model: nn.Module, tokenizer) -> dict:
    """Run the ONNX file with onnxruntime on the probe batch (3 rows, padded; not the export's shape)
    and compare with `torch_model`'s logits."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    batch = probe(tokenizer)
    got = sess.run(["logits"], {k: v.numpy() for k, v in batch.items()})[0]
    with torch.no_grad():
        ref = torch_model(batch["input_ids"], batch["attention_mask"])
    diff = compare(torch.from_numpy(got), ref, batch["attention_mask"], f"the ONNX export {path}")
    return {"check": f"onnxruntime {ort.__version__} vs PyTorch logits", "max_abs_diff": diff,
            "probe_shape": list(batch["input_ids"].shape)}


# --------------------------------------------------------------------------------------- TorchScript

def export_torchscript(src: Path, out: Path) -> dict:
    """model.pt (torch.jit.trace on a padded example, so the masked path is what gets recorded)."""
    import warnings

    hf, tok, head = _load(src)
    hf.config.return_dict = True
    wrapped = LogitsOnly(hf).eval()
    example = probe(tok, PROBE_TEXTS[:2])
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(wrapped, (example["input_ids"], example["attention_mask"]), check_trace=False)
    path = out / "model.pt"
    traced.save(str(path))
    _copy_side_files(src, out)
    report = check_torchscript(path, wrapped, tok)
    report.update(inputs=["input_ids", "attention_mask"], outputs=["logits"], head=head)
    return report


def check_torchscript(path: Path, torch_model: nn.Module, tokenizer) -> dict:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # TorchScript is deprecated upstream, still loadable
        loaded = torch.jit.load(str(path), map_location="cpu").eval()
    batch = probe(tokenizer)
    with torch.no_grad():
        got = loaded(batch["input_ids"], batch["attention_mask"])
        ref = torch_model(batch["input_ids"], batch["attention_mask"])
    diff = compare(got, ref, batch["attention_mask"], f"the TorchScript export {path}")
    return {"check": "torch.jit.load vs PyTorch logits", "max_abs_diff": diff, "probe_shape": list(batch["input_ids"].shape)}
