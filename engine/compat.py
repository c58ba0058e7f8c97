"""Which transformers versions the engine works with, in one place, and exports every one of them loads.

Two ranges, deliberately different:

- TRANSFORMERS_TRAIN: what the engine trains with (setup.py's install_requires reads it from here).
  Training uses recent APIs, so this floor may rise with the engine.
- TRANSFORMERS_EXPORT: what must load an export (`final/`, `best/`, `ftl export --format hf`, the tokenizer
  and config beside an ONNX/TorchScript graph). Users deploy on older stacks than they train on, so this
  range stays wide: every transformers from 4.57 on. Raising the training floor never shrinks it.

What keeps an export loadable across that range is the tokenizer's `tokenizer_config.json`:
transformers 5 writes the class of its in-memory object, `TokenizersBackend` (or `GPT2Tokenizer`, which
5.x rebuilds from vocab and merges), and 4.x knows no `TokenizersBackend`. `save_tokenizer` names a
class both know: `GPT2TokenizerFast` for GPT-2-style byte-level BPE (GPT-2's own, and the BPE the engine
trains locally, which has the same pre-tokenizer and decoder), else `PreTrainedTokenizerFast`. It also
sets `model_max_length` to the model's positions, so `truncation=True` (as `pipeline(...)` passes)
truncates to what the model can read instead of to 2**30.

The test (tests/integration/test_compat.py) loads an export with the oldest release of the export range,
installed beside the virtual environment by .ci/run:

    pip install --no-deps --target .venv-transformers4 $(python engine/compat.py pins)

This file imports nothing at module level, so setup.py and .ci/run can read it without the engine.
"""

# 4.57: the oldest the fast path was run on (its GPT2Block returns a tuple: fastpath.run_block; issue 13)
TRANSFORMERS_TRAIN = "transformers>=4.57"
TRANSFORMERS_EXPORT = "transformers>=4.57"

# The oldest transformers of the export range and what it needs that the engine's environment has in another
# version (tokenizers and huggingface_hub 1.x are too new for it; it still uses requests). Installed with
# --no-deps into a directory put first on PYTHONPATH: numpy, safetensors, torch etc. come from the venv.
EXPORT_CHECK_OLDEST = ("transformers==4.57.6", "tokenizers==0.22.2", "huggingface_hub==0.36.2",
                       "requests", "urllib3", "idna", "certifi", "charset_normalizer")
TRANSFORMERS4_DIR = ".venv-transformers4"  # beside .venv, relative to the repository root
TRANSFORMERS4_ENV = "FTL_TRANSFORMERS4"  # set by .ci/run: the directory must then exist (the test fails, not skips)

LOADER_KEYS = ("is_local", "local_files_only")
GPT2_CLASS = "GPT2TokenizerFast"  # known to transformers 4.x (a fast class) and 5.x (an alias of GPT2Tokenizer)
GENERIC_CLASS = "PreTrainedTokenizerFast"  # 4.x's name of any tokenizer.json; 5.x maps it to TokenizersBackend


def is_gpt2_bpe(tokenizer) -> bool:
    """A byte-level BPE exactly as GPT-2's: what transformers 5 rebuilds from vocab + merges for
    GPT2Tokenizer (ByteLevel pre-tokenizer without a prefix space, with GPT-2's regex; no normalizer;
    plain merges). Only then is naming that class lossless."""
    import json

    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return False
    spec = json.loads(backend.to_str())
    model, pre = spec.get("model") or {}, spec.get("pre_tokenizer") or {}
    return (model.get("type") == "BPE" and not model.get("continuing_subword_prefix")
            and not model.get("end_of_word_suffix") and not model.get("dropout") and not model.get("byte_fallback")
            and spec.get("normalizer") is None
            and pre.get("type") == "ByteLevel" and not pre.get("add_prefix_space") and pre.get("use_regex", True)
            and (spec.get("decoder") or {}).get("type") == "ByteLevel")


def portable_class(tokenizer, written: str | None) -> str:
    """The tokenizer_class to write: one every transformers of TRANSFORMERS_EXPORT knows."""
    if is_gpt2_bpe(tokenizer):
        return GPT2_CLASS
    if not written or written == "TokenizersBackend":
        return GENERIC_CLASS
    return written  # a model's own class (e.g. a hub tokenizer's), known to the versions that know the model


def save_tokenizer(tokenizer, out, max_length: int | None) -> None:
    """`tokenizer.save_pretrained(out)`, then tokenizer_config.json made loadable by every transformers of
    TRANSFORMERS_EXPORT, with model_max_length = `max_length` (the model's positions) when given."""
    import json
    from pathlib import Path

    tokenizer.save_pretrained(out)
    path = Path(out) / "tokenizer_config.json"
    cfg = json.loads(path.read_text(encoding="utf-8"))
    cfg["tokenizer_class"] = portable_class(tokenizer, cfg.get("tokenizer_class"))
    for key in LOADER_KEYS:  # how it was loaded here, not what the tokenizer is (5.x saves them back)
        cfg.pop(key, None)
    if max_length:
        cfg["model_max_length"] = int(max_length)
    path.write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


if __name__ == "__main__":  # `python engine/compat.py pins`: the packages .ci/run installs beside the venv
    import sys

    if sys.argv[1:] == ["pins"]:
        print(" ".join(EXPORT_CHECK_OLDEST))
    else:
        sys.exit("usage: python engine/compat.py pins")
