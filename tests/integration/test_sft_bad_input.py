"""Bad instruction/chat data and settings: exit 2, one message naming every problem and the rows it is in,
no traceback, nothing written."""

import json

import pytest

from tests.conftest import assert_train_refused, run_ftl, tiny_overrides


def _lines(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _files(tmp_path):
    good = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
    _lines(tmp_path / "qa.jsonl", [{"question": "q", "answer": "a"}] * 3)
    _lines(tmp_path / "chats.jsonl", [
        good,
        {"messages": [{"role": "user", "content": "q"}, {"role": "bot", "content": "a"}]},  # line 2: unknown role
        {"messages": [{"role": "user", "content": ["q"]}, {"role": "assistant", "content": "a"}]},  # 3: not a string
        {"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "q"}]},  # 4: no assistant turn
        good,
        {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": 7}]},  # 6: a number
    ])
    _lines(tmp_path / "pairs.jsonl", [{"prompt": "p", "completion": "c"}, {"prompt": "p", "completion": ""},
                                      {"prompt": None, "completion": "c"}, {"prompt": "p", "completion": "c"}])
    _lines(tmp_path / "boom.jsonl", [good, good, {"messages": [{"role": "user", "content": "boom"},
                                                                {"role": "assistant", "content": "a"}]}, good])
    (tmp_path / "tpl.jinja").write_text(
        "{% for m in messages %}{% if m['content'] == 'boom' %}{{ raise_exception('boom is not allowed') }}{% endif %}"
        "{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}")


CASES = [
    ("missing-columns", ["data.source={tmp}/qa.jsonl", "data.format=prompt_completion"],
     ["data.prompt_column 'prompt' and data.completion_column 'completion' are not in the data",
      "columns: answer, question"]),
    ("missing-messages-column", ["data.source={tmp}/qa.jsonl", "data.format=chat"],
     ["data.messages_column 'messages' is not in the data", "columns: answer, question"]),
    ("every-chat-problem-with-its-row", ["data.source={tmp}/chats.jsonl", "data.format=chat"],
     ["4 problems", "unknown role 'bot'", "chats.jsonl line 2 message 2", "data.role_map, e.g. bot=assistant",
      "user message content is list, not a string: chats.jsonl line 3 message 1",
      "a conversation with no assistant turn: nothing to learn: chats.jsonl line 4",
      "assistant message content is int, not a string: chats.jsonl line 6 message 2"]),
    ("empty-completion", ["data.source={tmp}/pairs.jsonl", "data.format=prompt_completion"],
     ["empty completion (column 'completion'): nothing to learn: pairs.jsonl line 2",
      "prompt (column 'prompt') is missing, not a string: pairs.jsonl line 3"]),
    ("template-fails-on-a-row", ["data.source={tmp}/boom.jsonl", "data.format=chat",
                                 "data.chat_template={tmp}/tpl.jinja"],
     ["the chat template fails to render it", "boom is not allowed", "line 3"]),
    ("template-does-not-render", ["data.source={tmp}/boom.jsonl", "data.format=chat",
                                  "data.chat_template={{% for m in messages %}}{{{{ m.content | nosuchfilter }}}}"],
     ["cannot render a simple user/assistant conversation"]),
    ("settings", ["data.source={tmp}/pairs.jsonl", "data.format=prompt_completion", "data.overflow=window",
                  "model.head=cls", "data.chat_template=nope.jinja", "eval.stride=8", "data.role_map=[bot]"],
     ["data.overflow=window cuts text into windows", "needs model.head=lm",
      "data.chat_template is only used with data.format=chat", "eval.stride", "data.role_map entry 'bot'"]),
    ("text-with-sft-values", ["data.overflow=drop", "data.chat_template=x.jinja"],
     ["data.overflow=drop applies to prompt_completion/chat examples", "data.chat_template is only used with"]),
    ("bad-mix", ["data.mix=[{{source: {tmp}/pairs.jsonl, weight: 0, colour: red}}, {{format: chat}}]"],
     ["data.mix entry 1 has unknown key(s) colour", "data.mix entry 1: weight must be a positive number",
      "data.mix entry 2 needs a `source`"]),
    ("mix-problems-of-every-dataset", ["data.mix=[{{source: {tmp}/pairs.jsonl, format: prompt_completion}}, "
                                       "{{source: {tmp}/qa.jsonl, format: chat}}]"],
     ["pairs.jsonl line 2", "data.messages_column 'messages' is not in the data"]),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_sft_input_exits_2_naming_every_problem(case, tmp_path, capsys):
    _, overrides, expected = case
    _files(tmp_path)
    assert_train_refused(tmp_path, overrides, expected, capsys)


def test_real_process_exit_2_no_traceback_nothing_written(tmp_path):
    _files(tmp_path)
    run_dir = tmp_path / "r"
    proc = run_ftl(["train", *tiny_overrides(run_dir), "--set", f"data.source={tmp_path}/chats.jsonl",
                    "--set", "data.format=chat"])
    assert proc.returncode == 2 and "unknown role 'bot'" in proc.stderr and "Traceback" not in proc.stderr
    assert not run_dir.exists()
