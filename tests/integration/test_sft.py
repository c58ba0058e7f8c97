"""Instruction and chat fine-tuning end to end: a chat run through the CLI (its log, TensorBoard and eval
reports), its export (chat template, stop tokens, what plain transformers renders), the OpenAI-compatible
server driven by the official `openai` client, `ftl generate --chat`, `ftl eval --format`, exact resume of a
packed run, mixed datasets, isolated text documents and the LoRA adapter export."""

from __future__ import annotations

import json
import random
import threading
from pathlib import Path

import pytest
import torch

from tests.conftest import check, read_metrics, run_ftl, tiny_config, tiny_overrides, train_losses

CHAT_RUN = {"data.format": "chat", "data.seq_len": 64, "data.tokenizer_vocab": 300, "train.micro_batch": 8,
            "train.max_steps": 30, "train.log_every": 10, "train.eval_every": 15, "train.eval_batches": 0,
            "optim.lr": 1e-2, "optim.warmup_steps": 3, "eval.generations": 2, "eval.generation_tokens": 6,
            "checkpoint.every": 15}
QUESTIONS = [[{"role": "user", "content": "Is 14 even?"}],
             [{"role": "system", "content": "Answer yes or no."}, {"role": "user", "content": "Is 7 even?"}],
             [{"role": "user", "content": "Is 2 even?"}, {"role": "assistant", "content": "yes"},
              {"role": "user", "content": "And 3?"}]]


def write_chats(path: Path, n: int = 96) -> Path:
    """A tiny task a 2-layer model learns in 30 steps: yes/no answers, so greedy replies end with the end-of-turn
    marker (finish_reason "stop"); some conversations have a system message or a second turn."""
    r = random.Random(0)
    with open(path, "w") as f:
        for i in range(n):
            k = r.randint(1, 999)
            msgs = ([{"role": "system", "content": "Answer yes or no."}] if i % 3 == 0 else []) + [
                {"role": "user", "content": f"Is {k} even?"}, {"role": "assistant", "content": "no" if k % 2 else "yes"}]
            if i % 5 == 0:
                msgs += [{"role": "user", "content": f"And {k + 1}?"},
                         {"role": "assistant", "content": "yes" if k % 2 else "no"}]
            f.write(json.dumps({"messages": msgs}) + "\n")
    return path


@pytest.fixture(scope="module")
def chat_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("sft_chat")
    data = write_chats(root / "chats.jsonl")
    run_dir = root / "run"
    proc = check(run_ftl(["train", "--no-progress", *tiny_overrides(run_dir, **{"data.source": data, **CHAT_RUN})]))
    return run_dir, proc.stdout + proc.stderr


def hf_greedy(model_dir: Path, ids: list[int], max_new: int) -> list[int]:
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    x = torch.tensor([ids])
    with torch.no_grad():
        out = hf.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=max_new, do_sample=False)
    return out[0, len(ids):].tolist()


def test_chat_run_log_eval_and_tensorboard(chat_run):
    run_dir, log = chat_run
    assert "packing efficiency" in log and "data: train: 96 examples" not in log  # 10% held out
    line = next(ln for ln in log.splitlines() if ln.startswith("data: train:"))
    eff = float(line.split("packing efficiency ")[1].split("%")[0])
    assert 50.0 < eff <= 100.0
    assert "chat template: the built-in ChatML template" in log and "'<|im_end|>'" in log
    assert "greedy completion at step 15" in log
    evals = [r for r in read_metrics(run_dir) if "eval_loss" in r]
    assert [r["step"] for r in evals] == [0, 15, 30] and evals[-1]["eval_loss"] < 0.5 * evals[0]["eval_loss"]
    report = json.loads((run_dir / "eval" / "latest.json").read_text())
    assert len(report["generations"]) == 2
    assert {g["completion"] for g in report["generations"]} <= {"yes", "no"}  # learned, and stopped at <|im_end|>
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tb"), size_guidance={"tensors": 0})
    acc.Reload()
    assert any("eval/generations" in t for t in acc.Tags()["tensors"])


def test_export_carries_the_template_and_the_end_of_turn_stop(chat_run, tmp_path):
    from transformers import AutoTokenizer

    from engine.data import sources as data, sft

    run_dir, _ = chat_run
    final = run_dir / "final"
    tok = AutoTokenizer.from_pretrained(final)
    engine_tok = data.load_tokenizer(str(run_dir / "tokenizer"))
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    assert json.loads((final / "generation_config.json").read_text())["eos_token_id"] == [tok.eos_token_id, im_end]
    conversation = QUESTIONS[2] + [{"role": "assistant", "content": "no"}]
    roles, contents = [m["role"] for m in conversation], [m["content"] for m in conversation]
    trained_on, _, _ = sft.encode(engine_tok, "chat", "", "", roles, contents, False)
    rendered = tok.apply_chat_template(conversation, tokenize=False)
    assert tok(rendered, add_special_tokens=False)["input_ids"] == trained_on  # plain transformers == the engine
    prompt = tok.apply_chat_template(QUESTIONS[2], add_generation_prompt=True, tokenize=False)
    assert rendered.startswith(prompt) and prompt.endswith("<|im_start|>assistant\n")
    # every copy of the tokenizer carries it: checkpoints (what `ftl export` reads) and `ftl export`'s output
    latest = run_dir / "checkpoints" / (run_dir / "checkpoints" / "latest").read_text().strip()
    assert (latest / "tokenizer" / "chat_template.jinja").read_text() == (final / "chat_template.jinja").read_text()
    check(run_ftl(["export", run_dir, "--out", tmp_path / "exported"]))
    again = AutoTokenizer.from_pretrained(tmp_path / "exported")
    assert again.apply_chat_template(conversation, tokenize=False) == rendered
    assert json.loads((tmp_path / "exported" / "generation_config.json").read_text())["eos_token_id"] == \
        [tok.eos_token_id, im_end]


class Server:
    def __init__(self, model_dir, api_key=None):
        from engine.commands import serve

        self.service = serve.ModelService(model_dir, max_new_tokens=24, max_batch=4)
        self.httpd = serve.make_server(self.service, "127.0.0.1", 0, 65536, quiet=True, api_key=api_key)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def client(self, key="unused"):
        import openai

        return openai.OpenAI(base_url=self.url, api_key=key, max_retries=0, timeout=60)

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture(scope="module")
def server(chat_run):
    s = Server(chat_run[0] / "final")
    yield s
    s.close()


def test_openai_chat_completions_equal_transformers_generate(server, chat_run):
    from transformers import AutoTokenizer

    final = chat_run[0] / "final"
    tok = AutoTokenizer.from_pretrained(final)
    client = server.client()
    assert [m.id for m in client.models.list().data] == ["run"]  # a run's final/ goes by the run's name
    stop_ids = json.loads((final / "generation_config.json").read_text())["eos_token_id"]
    finishes = set()
    for messages in QUESTIONS:
        ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        ids = tok(ids, add_special_tokens=False)["input_ids"]
        for max_new in (8, 1):
            ref = hf_greedy(final, ids, max_new)
            r = client.chat.completions.create(model="run", messages=messages, max_tokens=max_new, temperature=0)
            (choice,) = r.choices
            assert choice.message.role == "assistant"
            assert choice.message.content == tok.decode(ref, skip_special_tokens=True)
            assert choice.finish_reason == ("stop" if ref[-1] in stop_ids else "length")
            finishes.add(choice.finish_reason)
            assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(ids), len(ref))
            assert r.usage.total_tokens == len(ids) + len(ref)

            chunks = list(client.chat.completions.create(model="run", messages=messages, max_tokens=max_new,
                                                         temperature=0, stream=True,
                                                         stream_options={"include_usage": True}))
            deltas = [c.choices[0] for c in chunks if c.choices]
            assert "".join(d.delta.content or "" for d in deltas) == choice.message.content
            assert [d.finish_reason for d in deltas if d.finish_reason] == [choice.finish_reason]  # exactly one
            assert deltas[-1].finish_reason and deltas[0].delta.role == "assistant"
            assert chunks[-1].usage.completion_tokens == len(ref) and not chunks[-1].choices
    assert finishes == {"stop", "length"}  # both endings were exercised


def test_openai_completions_n_seed_stop(server, chat_run):
    from transformers import AutoTokenizer

    final = chat_run[0] / "final"
    tok = AutoTokenizer.from_pretrained(final)
    client = server.client()
    prompt = "<|im_start|>user\nIs 10 even?<|im_end|>\n<|im_start|>assistant\n"
    ids = tok(prompt, add_special_tokens=False)["input_ids"]
    ref = hf_greedy(final, ids, 5)
    r = client.completions.create(model="run", prompt=prompt, max_tokens=5, temperature=0)
    assert r.choices[0].text == tok.decode(ref, skip_special_tokens=True) and r.usage.prompt_tokens == len(ids)
    # sampling with a seed repeats itself, choice by choice
    sample = dict(model="run", prompt=["Is 3 even?", "Is 4 even?"], max_tokens=6, temperature=1.0, n=2, seed=7)
    a, b = client.completions.create(**sample), client.completions.create(**sample)
    assert [c.text for c in a.choices] == [c.text for c in b.choices] and [c.index for c in a.choices] == [0, 1, 2, 3]
    # a stop string ends the text before it, streamed or not
    free = client.completions.create(model="run", prompt="Is", max_tokens=12, temperature=0).choices[0].text
    assert len(free) >= 3, free
    stop = free[1:3]  # streamed, its first character is held back until the second decides
    cut = free[:free.index(stop)]
    got = client.completions.create(model="run", prompt="Is", max_tokens=12, temperature=0, stop=[stop])
    assert got.choices[0].text == cut and got.choices[0].finish_reason == "stop"
    streamed = list(client.completions.create(model="run", prompt="Is", max_tokens=12, temperature=0, stop=stop,
                                              stream=True))
    assert "".join(c.choices[0].text for c in streamed) == cut
    assert [c.choices[0].finish_reason for c in streamed if c.choices[0].finish_reason] == ["stop"]


def test_openai_bad_requests_get_400_and_the_server_keeps_working(server):
    import openai

    client = server.client()
    bad = [dict(messages=[{"role": "robot", "content": "hi"}]),
           dict(messages=[{"role": "user", "content": "hi"}], max_tokens=10_000),
           dict(messages=[{"role": "user", "content": "hi"}], temperature=5),
           dict(messages=[{"role": "user", "content": "hi"}], stop=["a", "b", "c", "d", "e"]),
           dict(messages=[{"role": "user", "content": "hi"}], n=99),
           dict(messages=[{"role": "user", "content": "hi"}], presence_penalty=1.0),
           dict(messages=[])]
    for kwargs in bad:
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model="run", **kwargs)
        assert e.value.status_code == 400 and e.value.body["message"], kwargs
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="run", messages=[{"role": "user", "content": "x " * 1100}], max_tokens=24)
    assert "maximum context length is 1024 tokens" in e.value.body["message"]
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="run", prompt="x", extra_body={"colour": "blue"})
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="gpt-4", messages=[{"role": "user", "content": "hi"}])
    assert e.value.body["code"] == "model_not_found"
    ok = client.chat.completions.create(model="run", messages=QUESTIONS[0], max_tokens=3, temperature=0)
    assert ok.choices[0].finish_reason in ("stop", "length")


def test_api_key(chat_run):
    import openai

    s = Server(chat_run[0] / "final", api_key="s3cret")
    try:
        with pytest.raises(openai.AuthenticationError):
            s.client("wrong").models.list()
        assert s.client("s3cret").models.list().data[0].id == "run"
        import urllib.request

        with urllib.request.urlopen(s.url.removesuffix("/v1") + "/health") as resp:  # health stays open
            assert json.loads(resp.read())["status"] == "ok"
    finally:
        s.close()


def test_generate_chat_and_eval_formats(chat_run):
    from transformers import AutoTokenizer

    run_dir, _ = chat_run
    tok = AutoTokenizer.from_pretrained(run_dir / "final")
    ids = tok(tok.apply_chat_template(QUESTIONS[1], add_generation_prompt=True, tokenize=False),
              add_special_tokens=False)["input_ids"]
    ref = tok.decode(hf_greedy(run_dir / "final", ids, 8), skip_special_tokens=True)
    got = check(run_ftl(["generate", run_dir, "--chat", json.dumps(QUESTIONS[1]), "--temperature", "0",
                         "--max-new-tokens", "8"]))
    assert got.stdout.strip() == ref.strip() and ref.strip() in ("yes", "no")
    data = run_dir.parent / "chats.jsonl"
    out = json.loads(check(run_ftl(["eval", run_dir, "--data", data, "--json", "--generations", "1"])).stdout)
    assert out["format"] == "chat" and out["examples"] == 10 and out["eval_loss"] < 1.0  # completions only
    assert out["generations"][0]["completion"] in ("yes", "no")
    bad = run_ftl(["generate", run_dir, "--chat", '[{"role": "user"}]'])
    assert bad.returncode == 2 and "content must be a string" in bad.stderr


# ----------------------------------------------------------------------------------------- training

def sft_config(run_dir: Path, data: Path, **extra):
    return tiny_config(run_dir, **{"data.source": data, "data.format": "prompt_completion", "data.seq_len": 48,
                                   "data.tokenizer_vocab": 400, "train.micro_batch": 4, "train.max_steps": 6,
                                   "optim.warmup_steps": 1, "eval.generations": 0, "train.sample_tokens": 0, **extra})


def train(cfg) -> dict:
    from engine.trainer import Trainer

    t = Trainer(cfg, progress=False)
    try:
        return t.train()
    finally:
        t.close()


@pytest.fixture(scope="module")
def pairs(tmp_path_factory) -> Path:
    from tests.distributed.test_sft_parity import write_sft_data

    return write_sft_data(tmp_path_factory.mktemp("sft_pairs") / "pairs.jsonl", 64)


def test_packed_sft_resumes_exactly(tmp_path, pairs):
    full = tmp_path / "full"
    train(sft_config(full, pairs, **{"checkpoint.every": 3}))
    part = tmp_path / "part"
    train(sft_config(part, pairs, **{"train.stop_at_step": 3}))
    train(sft_config(part, pairs))  # resumes from step 3
    assert len(train_losses(full)) == 6
    assert train_losses(part) == train_losses(full)  # bitwise: CPU fp32, DDP path


def test_mixed_datasets_each_with_its_format_and_weight(tmp_path, pairs):
    from engine.data import sources as data

    chats = write_chats(tmp_path / "chats.jsonl", 20)
    share = tmp_path / "sharegpt.jsonl"
    share.write_text("".join(json.dumps({"conversations": [{"from": "human", "value": f"hi {i}"},
                                                           {"from": "gpt", "value": f"hello {i}"}]}) + "\n"
                             for i in range(10)))
    cfg = sft_config(tmp_path / "run", pairs, **{"data.val_fraction": 0.0}).data
    cfg.mix = [{"source": str(pairs), "weight": 0.5},
               {"source": str(chats), "format": "chat", "weight": 2},
               {"source": str(share), "format": "chat", "messages_column": "conversations"}]
    raw = data.load_raw(cfg, 1234)
    formats = raw["train"]["_format"]
    assert formats.count("prompt_completion") == 32 and formats.count("chat") == 2 * 20 + 10
    tok = data.train_bpe(data.text_iterator(raw["train"], "text"), 400)
    prepared = data.prepare(raw, tok, cfg, "lm")
    assert prepared.chat is not None and prepared.stats["train"].examples == 82
    assert sum(raw["train"]["roles"], []).count("assistant") == 2 * (20 + 4) + 10  # 4 of 20 chats have 2 turns


def test_isolated_text_documents_train(tmp_path):
    run_dir = tmp_path / "iso"
    train(tiny_config(run_dir, **{"data.isolate_documents": True, "train.max_steps": 2, "train.sample_tokens": 0}))
    assert len(train_losses(run_dir)) == 2 and (run_dir / "final").is_dir()


def test_lora_adapter_export_in_peft_format(tmp_path, pairs):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

    from engine.data import sources as data

    base = tmp_path / "base"
    tok = data.train_bpe([json.loads(line)["prompt"] + json.loads(line)["completion"]
                          for line in pairs.read_text().splitlines()], 400)
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=len(tok), bos_token_id=0,
                               eos_token_id=0)).save_pretrained(base)
    tok.save_pretrained(base)
    run_dir = tmp_path / "lora"
    train(sft_config(run_dir, pairs, **{"model.name": str(base), "model.lora_rank": 4, "optim.lr": 1e-2}))
    adapter = run_dir / "final" / "adapter"
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 4 and cfg["base_model_name_or_path"] == str(base)
    merged = AutoModelForCausalLM.from_pretrained(run_dir / "final").eval()
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter).eval()
    x = torch.tensor([tok("Q: what does a list hold?", add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        a, b = merged(x).logits, peft_model(x).logits
        plain = AutoModelForCausalLM.from_pretrained(base)(x).logits
    assert torch.allclose(a, b, atol=1e-5)
    assert not torch.allclose(a, plain, atol=1e-3)  # the adapters changed the model


def test_chat_template_loads_in_transformers_4(chat_run, tmp_path):
    """The exported template renders, and tokenizes, the same in the oldest transformers of the export range
    (4.57, installed beside the venv by .ci/run: engine/compat.py) as here."""
    import os
    import subprocess
    import sys

    from transformers import AutoTokenizer

    from engine import compat
    from tests.conftest import OFFLINE
    from tests.integration.test_compat import _transformers4

    site = _transformers4()
    final = chat_run[0] / "final"
    assert json.loads((final / "tokenizer_config.json").read_text())["tokenizer_class"] == "GPT2TokenizerFast"
    script = ("import json, sys; from transformers import AutoTokenizer, __version__ as v; "
              "t = AutoTokenizer.from_pretrained(sys.argv[1]); m = json.loads(sys.argv[2]); "
              "s = t.apply_chat_template(m, tokenize=False, add_generation_prompt=True); "
              "print(json.dumps([v, s, t(s, add_special_tokens=False)['input_ids'], t.decode(t(s)['input_ids'], "
              "skip_special_tokens=True)]))")
    env = {**os.environ, **OFFLINE, "PYTHONPATH": str(site)}
    out = subprocess.run([sys.executable, "-c", script, str(final), json.dumps(QUESTIONS[2])], capture_output=True,
                         text=True, env=env, cwd=tmp_path, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    version, text, ids, shown = json.loads(out.stdout.strip().splitlines()[-1])
    assert version == compat.EXPORT_CHECK_OLDEST[0].split("==")[1]
    tok = AutoTokenizer.from_pretrained(final)
    here = tok.apply_chat_template(QUESTIONS[2], tokenize=False, add_generation_prompt=True)
    assert text == here and ids == tok(here, add_special_tokens=False)["input_ids"]
    assert "<|im_start|>" not in shown and shown == tok.decode(ids, skip_special_tokens=True)  # markers stay special
