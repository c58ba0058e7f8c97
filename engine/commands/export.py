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

from engine import compat
from engine.commands.export_check import PROBE_TEXTS, ExportCheckFailed, compare, probe  # noqa: F401
from engine.errors import UsageError

FORMATS = ("hf", "onnx", "onnx-kv", "torchscript")


class LogitsOnly(nn.Module):
    """(input_ids, attention_mask) -> logits: the graph a runtime sees (no cache, no dict outputs)."""

    def __init__(self, hf: nn.Module):
        super().__init__()
        self.hf = hf

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.hf(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits


def is_hf_dir(path: Path) -> bool:
    return (path / "config.json").is_file() and any(path.glob("*.safetensors")) and not (path / "trainer_state.json").exists()


# ------------------------------------------------------------------------------------------- sources

def hf_source(path: Path, workdir: Path) -> tuple[Path, str]:
    """A Hugging Face directory for `path` (exporting a checkpoint into `workdir` when needed) and what it was."""
    from engine.commands import models as tools

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
    from engine import ownership
    from engine.commands import models as tools

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
                exporter = {"onnx": export_onnx, "onnx-kv": export_onnx_kv}.get(fmt)
                report = exporter(src, target, opset) if exporter else export_torchscript(src, target)
                report["source"] = what
        report["format"] = fmt
        ownership.stamp(tmp / "model", report)  # export.json: the check's numbers and the files written
        ownership.replace_dir(tmp / "model", out, what="--out")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return report


def _load(src: Path):
    from engine.data import sources as data
    from engine.commands import models as tools
    from engine.model import load_exported

    head = tools.head_of(src)
    return load_exported(src, head), data.load_tokenizer(str(src)), head


def _copy_side_files(src: Path, out: Path, tokenizer=None, positions: int | None = None) -> None:
    """What a runtime needs beside the graph: config.json, generation config and the tokenizer (written
    again when given, so a source exported by an older engine still gets a portable tokenizer_config.json)."""
    for f in src.iterdir():
        if f.is_file() and not f.name.endswith((".safetensors", ".bin")) and f.name != "export.json":
            shutil.copy2(f, out / f.name)
    if tokenizer is not None:
        compat.save_tokenizer(tokenizer, out, positions)


def reexport_hf(src: Path, out: Path) -> dict:
    """An HF directory written again (e.g. to a new place), checked against its source's logits."""
    hf, tok, head = _load(src)
    hf.save_pretrained(out, safe_serialization=True)
    compat.save_tokenizer(tok, out, hf.config.n_positions)
    for f in ("generation_config.json",):
        if (src / f).is_file() and not (out / f).is_file():
            shutil.copy2(src / f, out / f)
    from engine.model import load_exported

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
    _copy_side_files(src, out, tok, hf.config.n_positions)
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


# ------------------------------------------------------------------------------------- ONNX, KV cache

class WithPast(nn.Module):
    """One decoding step over a key/value cache, as ONNX Runtime (and Optimum's GPT-2 exports) name it:
    (input_ids [B,S], attention_mask [B,P+S], position_ids [B,S], past_key_values.<i>.key/value [B,H,P,D])
    -> (logits [B,S,V], present.<i>.key/value [B,H,P+S,D]). A past of length P=0 is the prompt's own pass;
    each later call feeds the last `present` back as the past, so a token costs one position, not the
    whole sequence."""

    def __init__(self, hf: nn.Module):
        super().__init__()
        self.hf, self.n_layer = hf, hf.config.n_layer
        import inspect

        # transformers renames forward's past_key_values to cache (5.x deprecation): use whichever it takes
        self._cache_arg = "cache" if "cache" in inspect.signature(hf.forward).parameters else "past_key_values"

    def forward(self, input_ids, attention_mask, position_ids, *past):
        from transformers import DynamicCache

        cache = DynamicCache(ddp_cache_data=[(past[2 * i], past[2 * i + 1]) for i in range(self.n_layer)])
        out = self.hf(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=True,
                      **{self._cache_arg: cache})
        present = []
        for layer in out.past_key_values.layers:
            present += [layer.keys, layer.values]
        return (out.logits, *present)


def kv_names(n_layer: int) -> tuple[list[str], list[str]]:
    past = [f"past_key_values.{i}.{kv}" for i in range(n_layer) for kv in ("key", "value")]
    return past, [n.replace("past_key_values", "present") for n in past]


def export_onnx_kv(src: Path, out: Path, opset: int = 18) -> dict:
    """model.onnx with a KV cache (WithPast), checked with onnxruntime: the prompt's logits and each decoding
    step's against PyTorch, and greedy generation against transformers' `generate`."""
    import logging
    import warnings

    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    hf, tok, head = _load(src)
    if head != "lm":
        raise UsageError(f"--format onnx-kv needs a language model; {src} is a classifier (use --format onnx)")
    wrapped = WithPast(hf).eval()
    cfg = hf.config
    past_names, present_names = kv_names(cfg.n_layer)
    # example: a past of 3 positions and 2 new tokens (export sees the general case, P=0 works at run time)
    b, p, s, heads, dim = 2, 3, 2, cfg.n_head, cfg.n_embd // cfg.n_head
    example = (torch.randint(0, cfg.vocab_size, (b, s)), torch.ones(b, p + s, dtype=torch.long),
               torch.arange(p, p + s)[None].expand(b, -1).contiguous(),
               *[torch.randn(b, heads, p, dim) for _ in past_names])
    batch, seq = torch.export.Dim("batch"), torch.export.Dim("sequence", max=cfg.n_positions)
    total, past = torch.export.Dim("total", max=cfg.n_positions), torch.export.Dim("past", min=0, max=cfg.n_positions)
    dynamic = {"input_ids": {0: batch, 1: seq}, "attention_mask": {0: batch, 1: total},
               "position_ids": {0: batch, 1: seq}, "past": tuple({0: batch, 2: past} for _ in past_names)}
    path = out / "model.onnx"
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(wrapped, example, dynamo=True,
                                    input_names=["input_ids", "attention_mask", "position_ids", *past_names],
                                    output_names=["logits", *present_names], dynamic_shapes=dynamic,
                                    opset_version=opset, verbose=False)
        program.save(str(path), external_data=False)
    _copy_side_files(src, out, tok, cfg.n_positions)
    report = check_onnx_kv(path, hf, tok)
    report.update(opset=opset, inputs=["input_ids", "attention_mask", "position_ids", "past_key_values.<i>.key|value"],
                  outputs=["logits", "present.<i>.key|value"], head=head, n_layer=cfg.n_layer, n_head=heads,
                  head_dim=dim)
    return report


def _feeds(ids, mask, positions, past, names) -> dict:
    feeds = {"input_ids": ids, "attention_mask": mask, "position_ids": positions}
    feeds.update({n: t for n, t in zip(names, past)})
    return {k: (v.numpy() if isinstance(v, torch.Tensor) else v) for k, v in feeds.items()}


def onnx_generate(session, tokenizer, prompts: list[str], max_new_tokens: int, n_layer: int, n_head: int,
                  head_dim: int, steps_out: list | None = None) -> list[list[int]]:
    """Greedy decoding with a KV-cache ONNX export: the prompts left-padded in one pass with an empty past,
    then one token per step (the reference loop for users of the graph). Positions follow the attention
    mask, as transformers' generate sets them, so left padding changes nothing; a row that produced EOS
    continues with pad tokens, and decoding ends when every row has (as in generate). Returns the new
    token ids of each prompt; `steps_out` collects (inputs, logits) of every call."""
    import numpy as np

    old = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        enc = tokenizer(list(prompts), return_tensors="np", padding=True)
    finally:
        tokenizer.padding_side = old
    ids, mask = enc["input_ids"].astype(np.int64), enc["attention_mask"].astype(np.int64)
    past_names, _ = kv_names(n_layer)
    past = [np.zeros((len(prompts), n_head, 0, head_dim), np.float32) for _ in past_names]
    positions = np.maximum(np.cumsum(mask, -1) - 1, 0)
    new: list[list[int]] = [[] for _ in prompts]
    done = np.zeros(len(prompts), dtype=bool)
    for _ in range(max_new_tokens):
        outs = session.run(None, _feeds(ids, mask, positions, past, past_names))
        if steps_out is not None:
            steps_out.append(((ids, mask, positions, past), outs[0]))
        nxt = np.where(done, tokenizer.pad_token_id, outs[0][:, -1].argmax(-1)).astype(np.int64)
        for row, t in zip(new, nxt):
            row.append(int(t))
        done |= nxt == tokenizer.eos_token_id
        if done.all():
            break
        past = outs[1:]
        ids, positions = nxt[:, None], positions[:, -1:] + 1
        mask = np.concatenate([mask, np.ones((len(prompts), 1), np.int64)], axis=1)
    return new


def check_onnx_kv(path: Path, hf: nn.Module, tokenizer, new_tokens: int = 6) -> dict:
    """onnxruntime vs PyTorch on the probe prompts (left-padded, a batch shape the export never saw): every
    decoding call's logits (the first with an empty past) against transformers given the same inputs and
    cache, and the greedy continuation against transformers' generate."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    cfg = hf.config
    steps: list = []
    got = onnx_generate(sess, tokenizer, PROBE_TEXTS, new_tokens, cfg.n_layer, cfg.n_head, cfg.n_embd // cfg.n_head,
                        steps)
    wrapped = WithPast(hf).eval()
    worst = 0.0
    with torch.no_grad():
        for (ids, mask, positions, past), logits in steps:
            ref = wrapped(*(torch.from_numpy(x) for x in (ids, mask, positions, *past)))[0]
            keep = torch.from_numpy(mask[:, -ids.shape[1]:])  # pad positions' logits are never used
            worst = max(worst, compare(torch.from_numpy(logits), ref, keep, f"the ONNX KV-cache export {path}"))
        old = tokenizer.padding_side
        tokenizer.padding_side = "left"
        try:
            enc = tokenizer(PROBE_TEXTS, return_tensors="pt", padding=True)
        finally:
            tokenizer.padding_side = old
        out = hf.generate(**enc, max_new_tokens=new_tokens, do_sample=False, eos_token_id=tokenizer.eos_token_id,
                          pad_token_id=tokenizer.pad_token_id)
    expected = out[:, enc["input_ids"].shape[1]:].tolist()
    if got != expected:
        raise ExportCheckFailed(f"greedy generation from the ONNX KV-cache export {path} gives tokens {got}, "
                                f"transformers' generate {expected}")
    return {"check": f"onnxruntime {ort.__version__} vs PyTorch logits at every decoding step (past 0..{new_tokens - 1} "
                     f"new tokens) and greedy generation vs transformers generate ({new_tokens} tokens, equal)",
            "max_abs_diff": worst, "probe_shape": list(enc["input_ids"].shape)}


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
    _copy_side_files(src, out, tok, hf.config.n_positions)
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
