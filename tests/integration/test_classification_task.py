"""Classification end to end on the built-in, genuinely imbalanced task (builtin:stdlib_packages), through the
CLI: training beats the majority-class baseline on macro-F1; `ftl eval` prints the report; `ftl data stats`
shows the label distribution; eval/ JSON, TensorBoard images and the exported labels are all there."""

import json

import pytest

from tests.conftest import check, read_metrics, run_ftl, tiny_overrides

TASK = {
    "model.head": "cls", "data.source": "builtin:stdlib_packages", "data.seq_len": 64, "data.tokenizer_vocab": 1024,
    "train.micro_batch": 16, "train.max_steps": 400, "train.log_every": 100, "train.eval_every": 200,
    "train.eval_batches": 0, "optim.lr": 5e-3, "optim.head_lr": 2e-2, "optim.warmup_steps": 20,
    "data.balanced_sampling": "true", "eval.metric": "macro_f1",
}


@pytest.fixture(scope="module")
def cls_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("stdlib_cls") / "run"
    proc = check(run_ftl(["train", "--no-progress", *tiny_overrides(run_dir, **TASK)], timeout=600))
    return run_dir, proc


DATA_ARGS = [a for k, v in TASK.items() if k.startswith(("data.", "model.")) for a in ("--set", f"{k}={v}")]


@pytest.fixture(scope="module")
def baseline():
    """The majority-class baseline on the validation split, as `ftl data stats --json` reports it."""
    from engine.commands import datastats
    from engine.config import load_config

    cfg = load_config(None, DATA_ARGS[1::2])
    return json.loads(json.dumps(datastats.stats(cfg, "validation")))


def test_cls_beats_the_majority_class_baseline_on_macro_f1(cls_run, baseline):
    run_dir, _ = cls_run
    labels = baseline["labels"]
    assert labels["classes"] >= 20 and labels["imbalance_ratio"] >= 20  # genuinely imbalanced, long tail
    majority = labels["majority_macro_f1"]
    assert labels["majority_label"] == "encodings" and majority < 0.03
    final = [r for r in read_metrics(run_dir) if "eval_macro_f1" in r][-1]
    assert final["step"] == 400
    # measured 2026-12-03 (OMP_NUM_THREADS=1, the README's 400 steps): 0.165 with this seed; seeds 1-5 give 0.251,
    # 0.192, 0.231, 0.160, 0.187 (2 threads: 0.175). The figure is deterministic for a fixed thread count,
    # CPU and library set, but any change of float rounding (threads, the fused GELU, library versions) moves it
    # across that spread. The baseline is 0.0196; the bar below is well under the worst of those.
    assert final["eval_macro_f1"] >= 4 * majority and final["eval_macro_f1"] >= majority + 0.06, (final, majority)
    assert final["eval_balanced_accuracy"] > 2 / labels["classes"]


def test_eval_artifacts_best_and_exported_labels(cls_run):
    from transformers import AutoModelForSequenceClassification, pipeline

    run_dir, proc = cls_run
    rows = [r for r in read_metrics(run_dir) if "eval_loss" in r]
    assert [r["step"] for r in rows] == [0, 200, 400]
    for key in ("eval_accuracy", "eval_macro_f1", "eval_micro_f1", "eval_weighted_f1", "eval_balanced_accuracy"):
        assert 0.0 <= rows[-1][key] <= 1.0
    report = json.loads((run_dir / "eval/step-000400.json").read_text())
    assert report["eval_macro_f1"] == rows[-1]["eval_macro_f1"]
    assert sum(map(sum, report["confusion"])) == report["eval_samples"] == sum(
        c["support"] for c in report["per_class"].values())
    assert list(report["per_class"]) == report["labels"] == sorted(report["labels"])
    # best/ is the export of the best evaluation (macro-F1), a plain transformers model like final/
    best = max(rows, key=lambda r: r["eval_macro_f1"])
    assert f"new best eval_macro_f1 {best['eval_macro_f1']:.4g} at step {best['step']}" in proc.stderr
    hf = AutoModelForSequenceClassification.from_pretrained(run_dir / "best")
    assert [hf.config.id2label[i] for i in range(hf.config.num_labels)] == report["labels"]
    clf = pipeline("text-classification", model=str(run_dir / "final"), tokenizer=str(run_dir / "final"))
    assert clf("import codecs\nclass Codec(codecs.Codec):")[0]["label"] in report["labels"]
    # TensorBoard: the confusion matrix image and the per-class table, read back
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tb"), size_guidance={"images": 0, "tensors": 0}).Reload()
    images = acc.Images("eval/confusion_matrix")
    assert [i.step for i in images] == [0, 200, 400] and images[-1].width == images[-1].height > 26
    assert any("per_class" in t for t in acc.Tags()["tensors"])


def test_ftl_eval_prints_a_readable_report(cls_run, capsys):
    from engine.cli import main

    run_dir, _ = cls_run
    main(["eval", str(run_dir), "--data", "builtin:stdlib_packages", "--batch-size", "32"])
    out = capsys.readouterr().out
    logged = [r for r in read_metrics(run_dir) if "eval_macro_f1" in r][-1]
    assert f"eval_macro_f1: {logged['eval_macro_f1']:.4f}" in out
    assert "precision  recall      f1  support  predicted" in out and "confusion matrix (rows: true class" in out
    table = [line for line in out.splitlines() if line.startswith("encodings ")]
    assert len(table) == 2  # the per-class row and the confusion-matrix row
    from engine.commands import models as tools  # what `ftl eval --json` prints, in this process

    as_json = tools.evaluate_model(run_dir / "final", "builtin:stdlib_packages", "validation", None, 64, None, None, 0)
    assert as_json["eval_macro_f1"] == pytest.approx(logged["eval_macro_f1"], abs=1e-9)
    assert as_json["split"] == "validation" and len(as_json["confusion"]) == len(as_json["labels"])
    json.dumps(as_json)


def test_data_stats_reports_tokens_rare_tokens_and_labels(baseline, capsys):
    from engine.cli import main

    s = baseline
    assert s["documents"] > 300 and 0.2 < s["tokens_per_byte"] < 1.0
    assert len(s["rarest_tokens"]) == 20 and s["rarest_tokens"][0]["count"] <= s["rarest_tokens"][-1]["count"]
    assert sum(s["labels"]["counts"].values()) == s["documents"]
    main(["data", "stats", *DATA_ARGS, "--split", "validation", "--top", "5"])
    out = capsys.readouterr().out
    assert f"documents: {s['documents']:,}" in out and f"tokens per byte: {s['tokens_per_byte']:.3f}" in out
    assert "rarest tokens used (5)" in out and "imbalance" in out
    lab = s["labels"]
    assert f"macro-F1 {lab['majority_macro_f1']:.4f}" in out
    assert any(line.split()[:2] == ["encodings", str(lab["counts"]["encodings"])] for line in out.splitlines())
