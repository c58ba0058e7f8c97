"""Deployment: exports (HF, ONNX, TorchScript) against PyTorch logits, batch generation, `ftl serve` over
real HTTP on loopback, and `ftl explain` from the command line."""

import http.client
import json
import re
import socket
import subprocess
import sys
import threading
import time

import pytest
import torch

from engine import cli, dist
from engine.data import sources as data
from engine.commands import export as deploy, models as tools
from engine.trainer import Trainer
from tests.conftest import check, env_for_subprocess, run_ftl, tiny_config

TEXTS = ["The with statement", "A class definition is an executable statement", "x"]


@pytest.fixture(scope="module")
def lm_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("deploy") / "run"
    trainer = Trainer(tiny_config(run, **{"train.max_steps": 4, "checkpoint.every": 2, "train.sample_tokens": 0}),
                      progress=False)
    try:
        trainer.train()
    finally:
        trainer.close()
        dist.shutdown()
    return run


@pytest.fixture(scope="module")
def cls_dir(lm_run, tmp_path_factory):
    """A 3-class classifier with 64 positions, saved as an ordinary HF directory."""
    from transformers import GPT2Config, GPT2ForSequenceClassification

    tok = data.load_tokenizer(str(lm_run / "final"))
    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=2, n_embd=32, n_head=4, n_positions=64, vocab_size=len(tok), num_labels=3,
                     pad_token_id=tok.pad_token_id, id2label={0: "neg", 1: "neu", 2: "pos"},
                     label2id={"neg": 0, "neu": 1, "pos": 2})
    path = tmp_path_factory.mktemp("cls") / "model"
    GPT2ForSequenceClassification(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def padded(tok, texts=TEXTS):
    tok.padding_side = "right"
    enc = tok(texts, return_tensors="pt", padding=True)
    return enc["input_ids"], enc["attention_mask"]


# ------------------------------------------------------------------------------------------ exports

def test_onnx_and_hf_exports_match_pytorch_logits(lm_run, tmp_path, capsys):
    import onnxruntime as ort
    from transformers import AutoModelForCausalLM

    onnx_out, hf_out = tmp_path / "onnx", tmp_path / "hf"
    res = check(run_ftl(["export", lm_run, "--format", "onnx", "--out", onnx_out]))  # the CLI as users run it
    assert "checkpoints/step-000004 -> " in res.stdout and "onnxruntime" in res.stdout
    cli.main(["export", str(lm_run / "checkpoints" / "step-000002"), "--format", "hf", "--out", str(hf_out)])
    assert "(hf); check: transformers reload" in capsys.readouterr().out
    for f in ("model.onnx", "tokenizer.json", "config.json", "export.json"):
        assert (onnx_out / f).is_file(), f
    for f in ("model.safetensors", "tokenizer.json", "config.json", "generation_config.json", "export.json"):
        assert (hf_out / f).is_file(), f
    report = json.loads((onnx_out / "export.json").read_text())
    assert report["format"] == "onnx" and report["max_abs_diff"] < 1e-4

    # ONNX, independently: onnxruntime on new text vs transformers on the same (step-4) weights
    tok = data.load_tokenizer(str(onnx_out))
    ids, mask = padded(tok, ["def f(x):", "import os and sys and the rest", "The"])
    sess = ort.InferenceSession(str(onnx_out / "model.onnx"), providers=["CPUExecutionProvider"])
    got = torch.from_numpy(sess.run(None, {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})[0])
    ref_model = AutoModelForCausalLM.from_pretrained(lm_run / "final").eval()  # final/ = step 4's weights
    with torch.no_grad():
        ref = ref_model(input_ids=ids, attention_mask=mask).logits
    assert got.shape == ref.shape and ref.shape[-1] == len(tok)  # the real vocabulary
    assert (got - ref).abs()[mask.bool()].max() < 1e-4

    # HF from the step-2 checkpoint: the engine's weights of step 2, not step 4
    from safetensors.torch import load_file

    from engine import model as model_lib

    hf = AutoModelForCausalLM.from_pretrained(hf_out).eval()
    module = model_lib.TrainModule(AutoModelForCausalLM.from_pretrained(hf_out), "lm").eval()
    module.load_state_dict(load_file(str(lm_run / "checkpoints/step-000002/model.safetensors")), strict=False)
    with torch.no_grad():
        assert torch.allclose(module.logits(ids, mask), hf(input_ids=ids, attention_mask=mask).logits, atol=1e-5)
        assert not torch.allclose(hf(input_ids=ids).logits, ref_model(input_ids=ids).logits, atol=1e-3)


def test_torchscript_and_classifier_exports(lm_run, cls_dir, tmp_path):
    import onnxruntime as ort
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    ts = tmp_path / "ts"
    report = deploy.export(lm_run / "final", ts, "torchscript")
    assert report["max_abs_diff"] < 1e-4 and (ts / "model.pt").is_file()
    tok = data.load_tokenizer(str(ts))
    ids, mask = padded(tok, ["Some other text of a new length", "x y"])
    with torch.no_grad():
        got = torch.jit.load(str(ts / "model.pt"))(ids, mask)
        ref = AutoModelForCausalLM.from_pretrained(lm_run / "final").eval()(input_ids=ids, attention_mask=mask).logits
    assert (got - ref).abs()[mask.bool()].max() < 1e-4

    onnx_cls = tmp_path / "cls-onnx"
    deploy.export(cls_dir, onnx_cls, "onnx")
    ids, mask = padded(tok, ["a short one", "and a longer sentence with padding in the other row", "z"])
    sess = ort.InferenceSession(str(onnx_cls / "model.onnx"), providers=["CPUExecutionProvider"])
    got = sess.run(None, {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})[0]
    with torch.no_grad():
        ref = AutoModelForSequenceClassification.from_pretrained(cls_dir).eval()(input_ids=ids, attention_mask=mask).logits
    assert got.shape == (3, 3) and (torch.from_numpy(got) - ref).abs().max() < 1e-4  # pooled at the last real token


def test_onnx_kv_cache_export_generates_as_transformers_does(lm_run, cls_dir, tmp_path, capsys):
    import onnxruntime as ort
    from transformers import AutoModelForCausalLM

    out = tmp_path / "kv"
    cli.main(["export", str(lm_run / "final"), "--format", "onnx-kv", "--out", str(out)])
    assert "(onnx-kv); check: onnxruntime" in capsys.readouterr().out
    report = json.loads((out / "export.json").read_text())
    assert report["format"] == "onnx-kv" and report["max_abs_diff"] < 1e-4
    hf = AutoModelForCausalLM.from_pretrained(lm_run / "final").eval()
    layers, heads, dim = hf.config.n_layer, hf.config.n_head, hf.config.n_embd // hf.config.n_head
    sess = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    cache = [f"{i}.{kv}" for i in range(layers) for kv in ("key", "value")]
    assert [i.name for i in sess.get_inputs()] == ["input_ids", "attention_mask", "position_ids",
                                                   *[f"past_key_values.{c}" for c in cache]]
    assert [o.name for o in sess.get_outputs()] == ["logits", *[f"present.{c}" for c in cache]]

    # greedy decoding through the cache, on prompts and a batch size the export never saw, left-padded,
    # gives transformers' generate tokens; after the prompt's pass each call feeds one token per row
    tok = data.load_tokenizer(str(out))
    prompts, steps = ["def f(x):", "The import statement is", "x"], []
    got = deploy.onnx_generate(sess, tok, prompts, 10, layers, heads, dim, steps)
    tok.padding_side = "left"
    enc = tok(prompts, return_tensors="pt", padding=True)
    with torch.no_grad():
        ref = hf.generate(**enc, max_new_tokens=10, do_sample=False, eos_token_id=tok.eos_token_id,
                          pad_token_id=tok.pad_token_id)
    assert got == ref[:, enc["input_ids"].shape[1]:].tolist()
    width = enc["input_ids"].shape[1]
    for i, ((ids, mask, _, past), _) in enumerate(steps):
        assert ids.shape == (3, width if i == 0 else 1) and past[0].shape == (3, heads, 0 if i == 0 else width + i - 1, dim)

    # a classifier has no cache to export: refused before anything is written
    with pytest.raises(SystemExit) as e:
        cli.main(["export", str(cls_dir), "--format", "onnx-kv", "--out", str(tmp_path / "cls-kv")])
    assert e.value.code == 2 and "--format onnx-kv needs a language model" in capsys.readouterr().err
    assert not (tmp_path / "cls-kv").exists()


def test_an_export_that_does_not_match_fails_loudly_and_leaves_nothing(lm_run, tmp_path, monkeypatch, capsys):
    real_check = deploy.check_onnx

    def check_against_a_different_model(path, torch_model, tokenizer):
        with torch.no_grad():
            torch_model.hf.transformer.h[0].mlp.c_fc.weight.add_(0.05)  # the PyTorch side drifts from the file
        return real_check(path, torch_model, tokenizer)

    monkeypatch.setattr(deploy, "check_onnx", check_against_a_different_model)
    out = tmp_path / "bad"
    with pytest.raises(SystemExit) as e:
        cli.main(["export", str(lm_run / "final"), "--format", "onnx", "--out", str(out)])
    err = capsys.readouterr().err
    assert e.value.code == 1 and "export check FAILED" in err and "max abs difference" in err
    assert not out.exists() and list(tmp_path.iterdir()) == []  # no half-written directory either


# --------------------------------------------------------------------------------------- generation

def test_generate_batch_prompts(lm_run, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("The with statement\n\nA class\nimport\n")
    cli.main(["generate", str(lm_run), "--prompts-file", str(prompts), "--temperature", "0", "--max-new-tokens", "6",
              "--batch-size", "2"])
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["prompt"] for r in rows] == ["The with statement", "A class", "import"]
    # batched greedy decoding (left padding) gives each prompt what it gets alone
    hf, tok, _ = tools.load_model(lm_run / "final", torch.device("cpu"))
    alone = [tools.generate_batch(hf, tok, [r["prompt"]], 6, 0.0, 40, 1.0, None, 1)[0] for r in rows]
    assert [r["completion"] for r in rows] == alone
    # seeded sampling is reproducible, and the seed matters
    a = tools.generate_batch(hf, tok, ["The", "A"], 8, 1.0, 0, 1.0, seed=3)
    assert a == tools.generate_batch(hf, tok, ["The", "A"], 8, 1.0, 0, 1.0, seed=3)
    assert a != tools.generate_batch(hf, tok, ["The", "A"], 8, 1.0, 0, 1.0, seed=4)



def test_generate_bad_prompt_files(lm_run, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "ok"}\nnot json\n{"text": "x"}\n')
    with pytest.raises(SystemExit) as e:
        cli.main(["generate", str(lm_run), "--prompts-file", str(bad)])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "line 2: not JSON" in err and "line 3: needs a string field" in err
    with pytest.raises(SystemExit) as e:
        cli.main(["generate", str(lm_run), "--prompts-file", str(bad), "--prompt", "x"])
    assert e.value.code == 2 and "exactly one of --prompt" in capsys.readouterr().err


# -------------------------------------------------------------------------------------------- serve

class Server:
    def __init__(self, model_dir, max_body=2048):
        from engine.commands import serve

        self.service = serve.ModelService(model_dir, max_new_tokens=32, max_batch=4)
        self.httpd = serve.make_server(self.service, "127.0.0.1", 0, max_body, quiet=True)
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def request(self, method, path, body=None, headers=None, raw=None):
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        payload = raw if raw is not None else (None if body is None else json.dumps(body).encode())
        hdrs = {"Content-Type": "application/json", **(headers or {})}
        conn.request(method, path, body=payload, headers=hdrs)
        resp = conn.getresponse()
        data_ = json.loads(resp.read() or b"null")
        conn.close()
        return resp.status, data_, resp

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture(scope="module")
def lm_server(lm_run):
    s = Server(lm_run / "final")
    yield s
    s.close()


def test_serve_generates_over_http(lm_server, lm_run):
    status, body, _ = lm_server.request("GET", "/health")
    assert status == 200 and body["head"] == "lm" and "POST /generate" in body["endpoints"]
    status, body, _ = lm_server.request("POST", "/generate", {"prompt": "The with", "max_new_tokens": 5,
                                                              "temperature": 0})
    assert status == 200
    hf, tok, _ = tools.load_model(lm_run / "final", torch.device("cpu"))
    assert body["completions"] == [{"prompt": "The with",
                                    "completion": tools.generate_batch(hf, tok, ["The with"], 5, 0.0, 40, 1.0, None)[0]}]
    req = {"prompts": ["The", "A class"], "max_new_tokens": 6, "temperature": 1.0, "seed": 11}
    first = lm_server.request("POST", "/generate", req)[1]
    assert len(first["completions"]) == 2 and lm_server.request("POST", "/generate", req)[1] == first

    # threads: concurrent clients all get answers
    results = []
    threads = [threading.Thread(target=lambda: results.append(
        lm_server.request("POST", "/generate", {"prompt": "x", "max_new_tokens": 3})[0])) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [200] * 4


def test_serve_rejects_bad_requests_with_clear_4xx(lm_server):
    s = lm_server
    status, body, _ = s.request("POST", "/generate", raw=b'{"prompt": "unterminated')
    assert status == 400 and "not valid JSON" in body["error"]
    status, body, _ = s.request("POST", "/generate", {"prompt": 5, "max_new_tokens": 0, "temperature": "hot",
                                                      "colour": "blue"})
    assert status == 400 and len(body["problems"]) == 4, body  # every problem at once
    assert any("'colour'" in p for p in body["problems"]) and any("max_new_tokens" in p for p in body["problems"])
    status, body, _ = s.request("POST", "/generate", {"prompts": ["a"] * 5})
    assert status == 400 and "at most 4 per request" in body["error"]
    status, body, _ = s.request("POST", "/generate", [1, 2])
    assert status == 400 and "JSON object" in body["error"]
    status, body, _ = s.request("POST", "/generate", {"prompt": "x" * 3000})  # over max_body=2048
    assert status == 413 and "exceeds the limit of 2048 bytes" in body["error"]
    status, body, _ = s.request("POST", "/generate", raw=b"prompt=x", headers={"Content-Type": "text/plain"})
    assert status == 415
    # a web page's cross-site form POST (no CORS preflight for form types) is refused
    status, body, _ = s.request("POST", "/generate", raw=b'{"prompt": "x"}',
                                headers={"Content-Type": "application/x-www-form-urlencoded",
                                         "Origin": "http://evil.example"})
    assert status == 403 and "Origin" in body["error"]
    status, body, resp = s.request("GET", "/generate")
    assert status == 405 and resp.getheader("Allow") == "POST"
    status, body, _ = s.request("POST", "/nope", {"prompt": "x"})
    assert status == 404 and "no such endpoint" in body["error"]
    status, body, _ = s.request("POST", "/classify", {"text": "x"})
    assert status == 404 and "POST /generate" in body["error"]
    # no Content-Length (a raw socket, since http.client always sends one)
    with socket.create_connection(("127.0.0.1", s.port), timeout=10) as sock:
        sock.sendall(b"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\r\n")
        reply = sock.recv(4096).decode()
    assert reply.startswith("HTTP/1.1 411") and "Content-Length" in reply
    # a huge declared body is refused without reading it
    with socket.create_connection(("127.0.0.1", s.port), timeout=10) as sock:
        sock.sendall(b"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 1000000000\r\n\r\n{")
        reply = sock.recv(4096).decode()
    assert reply.startswith("HTTP/1.1 413")
    assert s.request("GET", "/health")[0] == 200  # still serving


def test_serve_classifies_texts_of_any_length(cls_dir):
    s = Server(cls_dir, max_body=65536)
    try:
        long_text = " ".join(["the with statement and a class definition"] * 30)  # far beyond 64 positions
        status, body, _ = s.request("POST", "/classify", {"texts": ["a short one", long_text]})
        assert status == 200 and len(body["predictions"]) == 2
        for p in body["predictions"]:
            assert p["label"] in ("neg", "neu", "pos") and abs(sum(p["probs"].values()) - 1) < 1e-5
            assert p["score"] == max(p["probs"].values())
        hf, tok, _ = tools.load_model(cls_dir, torch.device("cpu"))
        with torch.no_grad():
            direct = hf(**tok(["a short one"], return_tensors="pt")).logits.softmax(-1)[0]
        assert body["predictions"][0]["probs"]["pos"] == pytest.approx(float(direct[2]), abs=1e-5)
        assert s.request("POST", "/generate", {"prompt": "x"})[0] == 404
    finally:
        s.close()


def test_serve_command_binds_loopback(lm_run):
    proc = subprocess.Popen([sys.executable, "-m", "engine.cli", "serve", str(lm_run), "--port", "0", "--quiet"],
                            stderr=subprocess.PIPE, text=True, env=env_for_subprocess())
    try:
        line = ""
        deadline = time.time() + 120
        while "serving" not in line and time.time() < deadline:
            line = proc.stderr.readline()
            if not line and proc.poll() is not None:
                break
        m = re.search(r"http://([\d.]+):(\d+)", line)
        assert m and m.group(1) == "127.0.0.1", line
        conn = http.client.HTTPConnection("127.0.0.1", int(m.group(2)), timeout=30)
        conn.request("GET", "/health")
        resp = conn.getresponse()
        assert resp.status == 200 and json.loads(resp.read())["head"] == "lm"
    finally:
        proc.terminate()
        proc.wait(timeout=30)


# ------------------------------------------------------------------------------------------ explain

def test_explain_command(lm_run, tmp_path, capsys):
    out = tmp_path / "ex"
    cli.main(["explain", str(lm_run), "--text", "The with statement is", "--attention", "1:mean", "--steps", "32",
              "--out", str(out)])
    stdout = capsys.readouterr().out
    assert stdout.startswith("next token after the text:")
    m = re.search(r"completeness: sum (\S+) vs f\(x\)-f\(baseline\) (\S+)", stdout)
    assert m and abs(float(m.group(1)) - float(m.group(2))) < 1e-3 * max(1, abs(float(m.group(2))))
    assert "top next tokens" in stdout
    for f in ("explain.html", "attributions.png", "attention.png", "explain.json"):
        assert (out / f).is_file(), f


def test_explain_bad_input(lm_run, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["explain", str(lm_run), "--text", "x", "--attention", "7:0", "--target", "two tokens here",
                  "--out", str(tmp_path / "ex")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "--attention 7:0 is outside" in err and "give one token" in err
    assert not (tmp_path / "ex").exists()
