"""Instruction data (engine/data/sft.py): which tokens are targets, overflow, packing, and invariant 6 — a packed row
gives the same per-token losses and gradients as its examples run one by one (CPU, SDPA, default perf settings,
and the transformers/eager paths)."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from engine import fastpath, losses, model as model_lib
from engine.data import sources as data, sft
from engine.config import DataConfig, ModelConfig, PerfConfig

IGNORE = losses.IGNORE


@pytest.fixture(scope="module")
def tok():
    import pydoc_data.topics

    texts = list(pydoc_data.topics.topics.values())[:40]
    t = data.train_bpe(texts, 600)
    sft.install_template(DataConfig(format="chat"), t)
    return t


def targets_text(tok, ids, target) -> str:
    return tok.decode([i for i, t in zip(ids, target) if t])


def test_prompt_completion_targets_are_the_completion_and_eos(tok):
    ids, target, last = sft.encode(tok, "prompt_completion", "Q: what is a list?\nA:", " A mutable sequence.", [], [],
                                   False)
    p = tok("Q: what is a list?\nA:", add_special_tokens=False)["input_ids"]
    c = tok(" A mutable sequence.", add_special_tokens=False)["input_ids"]
    assert ids == p + c + [tok.eos_token_id]  # tokenized separately, no special tokens, then EOS
    assert target == [False] * len(p) + [True] * (len(c) + 1) and last == len(p)
    ids2, target2, _ = sft.encode(tok, "prompt_completion", "Q: what is a list?\nA:", " A mutable sequence.", [], [],
                                  True)
    assert ids2 == ids and all(target2)  # data.train_on_prompt
    inputs, labels = sft.example_columns(ids, target)
    assert inputs == ids[:-1] and len(labels) == len(inputs)
    assert [y for y in labels if y != IGNORE] == c + [tok.eos_token_id]


def test_chat_targets_are_the_assistant_turns_and_their_end_of_turn_marker(tok):
    roles = ["system", "user", "assistant", "user", "assistant"]
    contents = ["Be brief.", "What is a tuple?", "An immutable sequence.", "And a set?", "An unordered collection."]
    ids, target, last = sft.encode(tok, "chat", "", "", roles, contents, False)
    messages = [{"role": r, "content": c} for r, c in zip(roles, contents)]
    # what the engine trains on is, token for token, what transformers renders and tokenizes
    assert ids == tok(tok.apply_chat_template(messages, tokenize=False), add_special_tokens=False)["input_ids"]
    assert tok.decode(ids, skip_special_tokens=False).startswith("<|im_start|>system\nBe brief.<|im_end|>")
    assert targets_text(tok, ids, target) == "An immutable sequence.<|im_end|>An unordered collection.<|im_end|>"
    # the last completion starts where the second assistant turn's content starts
    assert tok.decode(ids[last:]).startswith("An unordered collection.")
    end = tok.convert_tokens_to_ids("<|im_end|>")
    assert sft.end_of_turn_ids(tok) == [tok.eos_token_id, end]


def test_sharegpt_rows_are_normalized_with_the_role_map():
    cfg = DataConfig(format="chat", messages_column="conversations")
    part = sft.parts(cfg)[0]
    problems = sft.RowProblems()
    rows = [("f line 1", {"conversations": [{"from": "system", "value": "s"}, {"from": "human", "value": "hi"},
                                            {"from": "gpt", "value": "hello"}]}),
            ("f line 2", {"conversations": json.dumps([{"role": "user", "content": "q"},
                                                       {"role": "assistant", "content": "a"}])})]
    out = sft.normalize(part, rows, cfg.role_names()[0], problems)
    assert not problems
    assert out["roles"] == [["system", "user", "assistant"], ["user", "assistant"]]
    assert out["contents"] == [["s", "hi", "hello"], ["q", "a"]]


def test_every_row_problem_is_named_with_its_rows():
    cfg = DataConfig(format="chat")
    problems = sft.RowProblems()
    rows = [(f"d.jsonl line {i}", r) for i, r in enumerate([
        {"messages": [{"role": "bot", "content": "x"}, {"role": "assistant", "content": "y"}]},
        {"messages": [{"role": "user", "content": 5}, {"role": "assistant", "content": "y"}]},
        {"messages": [{"role": "user", "content": "only a question"}]},
        {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "  "}]},
        {"messages": "not a list"},
        {"messages": [{"role": "user", "content": "fine"}, {"role": "assistant", "content": "ok"}]},
    ], 1)]
    out = sft.normalize(sft.parts(cfg)[0], rows, cfg.role_names()[0], problems)
    text = "\n".join(problems.messages())
    assert "unknown role 'bot'" in text and "d.jsonl line 1 message 1" in text
    assert "content is int, not a string" in text and "d.jsonl line 2 message 1" in text
    assert "no assistant turn" in text and "d.jsonl line 3" in text
    assert "empty assistant message" in text and "d.jsonl line 4 message 2" in text
    assert "must hold a non-empty list of messages" in text and "d.jsonl line 5" in text
    assert out["_row"] == ["d.jsonl line 6"]  # only the good row survives
    many = sft.RowProblems()
    for i in range(9):
        many.add("empty completion", f"row {i}")
    assert many.messages() == ["empty completion: row 0, row 1, row 2, row 3, row 4 and 4 more"]


@pytest.mark.parametrize("overflow, fate, kept", [
    ("truncate", "truncated", "head"), ("truncate_prompt", "truncated", "tail"), ("drop", "too_long", None)])
def test_overflow(overflow, fate, kept):
    ids, target = list(range(20)), [False] * 12 + [True] * 8  # prompt 12, completion + EOS 8
    got, t, f = sft.fit(ids, target, 12, 15, overflow)
    assert f == fate
    if kept == "head":
        assert got == ids[:15] and t == target[:15]
    elif kept == "tail":  # the prompt loses its first 5 tokens, the completion stays whole
        assert got == ids[5:] and t == target[5:] and sum(t) == 8
    else:
        assert got is None
    # truncate_prompt keeps at least one prompt token (so the completion's first token is predicted), else drops
    assert sft.fit(ids, target, 12, 8, "truncate_prompt")[2] == "too_long"
    # an example whose targets are all cut away is dropped, never trained on
    assert sft.fit(ids, target, 12, 10, "truncate")[2] == "no_target"
    assert sft.fit(ids[:10], target[:10], 12, 15, "truncate")[2] == "no_target"


def test_packing_puts_every_example_whole_into_one_row():
    lengths = [5, 17, 3, 9, 30, 1, 12, 12, 7, 25, 2]
    bins = sft.pack_groups(lengths, 32)
    assert sorted(i for b in bins for i in b) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in b) <= 32 for b in bins)
    assert len(bins) == -(-sum(lengths) // 32)  # best fit decreasing is optimal here: no row more than needed
    assert sft.pack_groups(lengths, 32) == bins  # deterministic


def test_packed_collate_restarts_positions_and_separates_documents():
    rows = [[1, 2, 3, 4, 5], [6, 7]]
    labels = [[2, IGNORE, 4, IGNORE, IGNORE], [7, 8]]
    b = sft.collate(rows, labels, [[3, 2], [2]], 0, 6)
    assert b["position_ids"].tolist() == [[0, 1, 2, 0, 1, 0], [0, 1, 0, 1, 2, 3]]
    assert b["document_ids"].tolist() == [[0, 0, 0, 1, 1, -1], [0, 0, -1, -1, -1, -1]]
    assert b["labels"][0, -1] == IGNORE and b["input_ids"][1, 2:].tolist() == [0] * 4
    assert data.real_tokens(b) == 7  # padding is not counted as tokens
    mask = fastpath.document_mask(b["document_ids"])[0, 0]
    assert mask[4].tolist() == [False, False, False, True, True, False]  # example 2 sees only itself
    assert mask.tril().equal(mask)  # causal
    unpacked = sft.collate(rows, labels, [[5], [2]], 0, None)
    assert "position_ids" not in unpacked and unpacked["attention_mask"].tolist()[1] == [1, 1, 0, 0, 0]


def test_isolated_text_documents():
    eos = 9
    batch = {"input_ids": torch.tensor([[1, 2, eos, 3, 4, eos, 5]]), "labels": torch.tensor([[2, eos, 3, 4, eos, 5, 6]])}
    b = sft.isolate_documents(batch, eos)
    assert b["document_ids"].tolist() == [[0, 0, 0, 1, 1, 1, 2]]
    assert b["position_ids"].tolist() == [[0, 1, 2, 0, 1, 2, 0]]
    assert b["labels"].tolist() == [[2, eos, IGNORE, 4, eos, IGNORE, 6]]  # an EOS cannot predict the next document


# ------------------------------------------------------------------------------------- invariant 6

class _Tok:
    eos_token_id = pad_token_id = 0

    def __len__(self):
        return 101


def _module(perf: PerfConfig, attn: str = "sdpa") -> model_lib.TrainModule:
    torch.manual_seed(0)
    source = model_lib.ModelSource("gpt2-tiny", False, None, model_lib.preset_config("gpt2-tiny"))
    hf = model_lib.build(ModelConfig(name="gpt2-tiny", attn_implementation=attn), source, _Tok())
    return model_lib.TrainModule(hf, "lm", perf=perf, packed=True).eval()


def _examples():
    g = torch.Generator().manual_seed(3)
    out = []
    for n, prompt in ((9, 4), (15, 10), (6, 2), (11, 5)):
        ids = torch.randint(1, 101, (n,), generator=g).tolist()
        out.append(sft.example_columns(ids, [False] * prompt + [True] * (n - prompt)))
    return out


def _per_token_losses(module, batch) -> torch.Tensor:
    """Per-position cross-entropy through the training body (IGNORE positions 0)."""
    extra = {k: batch[k] for k in ("attention_mask", "position_ids", "document_ids") if k in batch}
    hidden = module.body(batch["input_ids"], **extra)
    logits = module.hf.lm_head(hidden).float()
    per = F.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten(), ignore_index=IGNORE, reduction="none")
    return per.view(batch["labels"].shape)


def _grads(module, batch) -> tuple[torch.Tensor, dict]:
    module.zero_grad()
    loss = module(**batch)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("perf, attn", [(PerfConfig(), "sdpa"), (PerfConfig(causal_body=False), "sdpa"),
                                        (PerfConfig(), "eager")], ids=["default", "transformers-forward", "eager"])
def test_a_packed_row_equals_its_examples_alone(perf, attn):
    module = _module(perf, attn)
    assert module.causal_body == (perf.causal_body and attn == "sdpa")
    exs = _examples()
    width = 48  # 41 tokens of examples + padding at the end of the row
    packed = sft.collate([sum((x for x, _ in exs), [])], [sum((y for _, y in exs), [])], [[len(x) for x, _ in exs]],
                         0, width)
    with torch.no_grad():
        per_packed = _per_token_losses(module, packed)[0]
    at = 0
    for x, y in exs:
        alone = sft.collate([x], [y], [[len(x)]], 0, None)
        with torch.no_grad():
            per_alone = _per_token_losses(module, alone)[0]
        assert torch.allclose(per_packed[at:at + len(x)], per_alone, rtol=1e-5, atol=1e-6)
        # the gradient of this example's loss inside the packed row (other targets masked) is its gradient alone
        only = dict(packed, labels=packed["labels"].clone())
        keep = torch.zeros_like(only["labels"], dtype=torch.bool)
        keep[0, at:at + len(x)] = True
        only["labels"][~keep] = IGNORE
        loss_p, grads_p = _grads(module, only)
        loss_a, grads_a = _grads(module, alone)
        assert torch.allclose(loss_p, loss_a, rtol=1e-5)
        assert grads_p.keys() == grads_a.keys()
        for name in grads_a:
            scale = float(grads_a[name].abs().max()) + 1e-12
            assert float((grads_p[name] - grads_a[name]).abs().max()) <= 1e-5 * max(1.0, scale), name
        at += len(x)
    # and the check has teeth: without the document mask the second example sees the first
    leaky = {k: v for k, v in packed.items() if k != "document_ids"}
    with torch.no_grad():
        per_leaky = _per_token_losses(module, leaky)[0]
    n0 = len(exs[0][0])
    assert not torch.allclose(per_leaky[n0:n0 + len(exs[1][0])], per_packed[n0:n0 + len(exs[1][0])], atol=1e-3)


def test_packing_raises_tokens_per_row_at_the_same_loss():
    """The same examples packed and unpacked: the same summed loss over the same targets, in fewer rows."""
    module = _module(PerfConfig())
    exs = _examples() * 3
    groups = sft.pack_groups([len(x) for x, _ in exs], 32)
    packed = sft.collate([sum((exs[i][0] for i in g), []) for g in groups], [sum((exs[i][1] for i in g), []) for g in groups],
                         [[len(exs[i][0]) for i in g] for g in groups], 0, 32)
    unpacked = sft.collate([x for x, _ in exs], [y for _, y in exs], [[len(x)] for x, _ in exs], 0, None)
    with torch.no_grad():
        loss_p, loss_u = module(**packed), module(**unpacked)
    assert losses.target_count(packed, "lm") == losses.target_count(unpacked, "lm")
    assert torch.allclose(loss_p, loss_u, rtol=1e-5)
    assert data.real_tokens(packed) == data.real_tokens(unpacked)
    assert packed["input_ids"].shape[0] < unpacked["input_ids"].shape[0] / 2  # more tokens per row


# ------------------------------------------------------------------------ streaming (engine/commands/openai_api.py)

def _stream(tok, text: str, stops: list[str], stop_ids=()):
    from engine.commands import openai_api

    ids = tok(text, add_special_tokens=False)["input_ids"]
    deltas = []
    progress = openai_api._Progress(tok, set(stop_ids), stops, deltas.append)
    progress.put(torch.tensor([[1, 2, 3]]))  # the prompt comes first and is not part of the output
    for i in ids:
        progress.put(torch.tensor([i]))
        if progress.finish:
            break
    progress.finish_text()
    return deltas, progress


def test_streamed_deltas_never_show_a_stop_string_or_half_a_character(tok):
    text = "The with statement wraps a block: naïve café ✓ and more text after it"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    pieces = [tok.decode(ids[:k]) for k in range(len(ids) + 1)]
    # stop strings that straddle a token boundary: their first half arrives one token before the rest
    crossing = [pieces[k][-2:] + pieces[k + 1][len(pieces[k]):][:2] for k in range(2, len(ids) - 2)
                if len(pieces[k + 1]) - len(pieces[k]) >= 2 and "\ufffd" not in pieces[k + 1]]
    assert len(crossing) >= 3
    for stop in crossing[:6]:
        deltas, progress = _stream(tok, text, [stop])
        cut = text[:text.index(stop)]
        assert progress.finish == "stop" and progress.text == cut
        assert "".join(deltas) == cut, (stop, deltas)  # nothing of the stop string was sent early
    deltas, progress = _stream(tok, text, [])
    assert "".join(deltas) == text and progress.finish is None and progress.ids == ids
    assert not any("\ufffd" in d for d in deltas)  # a multi-byte character is sent whole
    deltas, progress = _stream(tok, text, [], stop_ids=[ids[5]])  # an end-of-turn token: stop, not in the text
    assert progress.finish == "stop" and "".join(deltas) == tok.decode(ids[:5]) and len(progress.ids) == 6
