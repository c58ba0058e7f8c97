"""Bad input: one clear message naming every problem, exit code 2, no traceback, nothing written."""

import json

import pytest

from tests.conftest import assert_train_refused, run_ftl, tiny_overrides


def _files(tmp_path):
    (tmp_path / "nocol.jsonl").write_text('{"body": "some text here", "topic": 1}\n' * 4)
    (tmp_path / "labels.jsonl").write_text("".join(json.dumps({"text": f"sample {i} text", "label": i % 3 * 2}) + "\n"
                                                   for i in range(12)))
    (tmp_path / "empty.csv").write_text("text\n")
    (tmp_path / "short.jsonl").write_text('{"text": "too short"}\n' * 3)
    (tmp_path / "nomodel").mkdir()
    (tmp_path / "empty.txt").write_bytes(b"")
    (tmp_path / "binary.txt").write_bytes(bytes(range(256)) * 40)
    (tmp_path / "latin1.txt").write_bytes("caf\u00e9 au lait\n\nmore text here\n".encode("latin-1"))
    (tmp_path / "broken.jsonl").write_text('{"text": "a fine line"}\n{"text": "no closing brace"\n{"text": "x"}\n')
    with open(tmp_path / "mixed.csv", "w") as f:  # pandas reads CSVs in blocks: the type comes from the first
        f.write("text,label\n" + "".join(f"row {i},{i % 3}\n" for i in range(25000)) + "last row,oops\n")
    (tmp_path / "one_row.jsonl").write_text('{"body": "a single row, and not the column asked for"}\n')
    (tmp_path / "afile").write_text("not a directory")


CASES = [
    # (id, overrides, expected fragments)
    ("unknown-key", ["train.max_stpes=3"], ["unknown config key 'train.max_stpes'; did you mean 'train.max_steps'?"]),
    ("wrong-type", ["train.micro_batch=four", "model.compile=sometimes"],
     ["train.micro_batch must be an integer (got 'four')", "model.compile must be true or false"]),
    ("non-positive", ["train.micro_batch=0", "optim.lr=0", "train.grad_accum=-1"],
     ["3 problems", "train.micro_batch must be positive", "optim.lr must be positive", "train.grad_accum must be positive"]),
    ("seq-beyond-positions", ["data.seq_len=2048"], ["data.seq_len=2048 exceeds the model's 1024 positions"]),
    ("missing-data-file", ["data.source={tmp}/missing.jsonl"], ["no such file", "missing.jsonl"]),
    ("missing-column", ["data.source={tmp}/nocol.jsonl"],
     ["data.text_column 'text' is not in the data; columns: body, topic"]),
    ("missing-label-column", ["data.source={tmp}/nocol.jsonl", "model.head=cls", "data.text_column=body"],
     ["data.label_column 'label' is not in the data; columns: body, topic"]),
    ("labels-outside-num-labels", ["data.source={tmp}/labels.jsonl", "model.head=cls", "model.num_labels=3"],
     ["labels [4] in column 'label' are outside 0..2"]),
    ("empty-split", ["data.source={tmp}/empty.csv"], ["the training split is empty"]),
    ("nothing-fits", ["data.source={tmp}/short.jsonl", "data.val_fraction=0"],
     ["no training sample of data.seq_len=32 tokens fits"]),
    ("model-dir-without-config", ["model.name={tmp}/nomodel"], ["is a directory without config.json"]),
    ("bad-resume-path", ["checkpoint.resume={tmp}"], ["is not a complete checkpoint directory"]),
    ("empty-file", ["data.source={tmp}/empty.txt"], ["empty.txt is empty (0 bytes)"]),
    ("binary-file", ["data.source={tmp}/binary.txt"], ["binary.txt is a binary file (it holds NUL bytes), not text"]),
    ("not-utf8", ["data.source={tmp}/latin1.txt"],
     ["latin1.txt is not UTF-8 text: byte 0xe9 at offset 3 (line 1)", "iconv"]),
    ("malformed-jsonl-line", ["data.source={tmp}/broken.jsonl"],
     ["broken.jsonl line 2 is not valid JSON", "no closing brace"]),
    ("mixed-type-csv-column", ["data.source={tmp}/mixed.csv"],
     ["mixed.csv line 25002: column 'label' holds 'oops', but its earlier rows were read as int64"]),
    ("too-small-to-split", ["data.source={tmp}/one_row.jsonl"], ["data.text_column 'text' is not in the data; columns: body"]),
    ("run-dir-is-a-file", ["run.dir={tmp}/afile"], ["run.dir", "afile is an existing file, not a directory"]),
    ("run-dir-under-a-file", ["run.dir={tmp}/afile/run"], ["afile is a file; set run.dir elsewhere"]),
    ("missing-tokenizer-dir", ["data.tokenizer={tmp}/runs/demo/tokenizer"],
     ["data.tokenizer: the directory", "runs/demo/tokenizer' does not exist"]),
    ("missing-model-dir", ["model.name=runs/demo/final"], ["model.name: the directory 'runs/demo/final' does not exist"]),
    ("epochs-and-max-steps", ["train.epochs=2"], ["train.epochs=2 and train.max_steps=6 are both set; set one of them"]),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_exits_2_naming_the_problem(case, tmp_path, capsys):
    _, overrides, expected = case
    _files(tmp_path)
    assert_train_refused(tmp_path, overrides, expected, capsys)


def test_real_process_exit_code_and_no_traceback(tmp_path):
    proc = run_ftl(["train", str(tmp_path / "nope.yaml")])
    assert proc.returncode == 2 and "config file not found" in proc.stderr and "Traceback" not in proc.stderr
    proc = run_ftl(["train", *tiny_overrides(tmp_path / "r"), "--set", "data.source=/definitely/not/here.csv"])
    assert proc.returncode == 2 and "no such file" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "r").exists()
