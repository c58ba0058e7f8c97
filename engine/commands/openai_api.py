"""The OpenAI-compatible part of `ftl serve`: GET /v1/models, POST /v1/completions, POST /v1/chat/completions.

What the official `openai` client and tools built on it (LangChain, lm-eval's local-completions, curl
recipes) send and expect:
  request   model (the served id, see /v1/models), prompt (string, list of strings, token ids) or messages
            ({role: system|developer|user|assistant, content: string or text parts}), max_tokens
            (chat: also max_completion_tokens), temperature (0: greedy), top_p, n, stop (up to 4 strings),
            seed, stream, stream_options.include_usage; presence/frequency penalties, logit_bias, logprobs,
            echo, best_of, suffix, tools are refused unless at their "off" value.
  response  {id, object, created, model, choices: [{index, text | message, finish_reason}], usage:
            {prompt_tokens, completion_tokens, total_tokens}}. finish_reason is "stop" (EOS, the chat
            template's end-of-turn marker, or a stop string) or "length" (max_tokens, or the model's context).
  stream    server-sent events `data: {chunk}` ending with `data: [DONE]`; per choice, content deltas that
            concatenate to exactly the non-streamed text, then one chunk carrying finish_reason (text held
            back while it could still become a stop string, or is an incomplete UTF-8 character).
  errors    {"error": {"message", "type", "param", "code"}} with 400 (bad request), 401 (API key), 404
            (unknown model or path), 405, 411, 413, 415 and 500.

Generation is transformers' own `generate` on the exported model, with the model's generation_config
(whose eos_token_id lists the end-of-turn marker), so a greedy request returns exactly what plain
transformers gives for the same prompt. A chat is rendered with the tokenizer's chat template (the one
the engine trained with), add_generation_prompt=True. Token counts in `usage` are exact: prompt tokens as
the model sees them, completion tokens as generated (the final EOS / end-of-turn token included, as in
transformers' output).
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field

import torch

COMMON = {"model", "max_tokens", "temperature", "top_p", "n", "stop", "seed", "stream", "stream_options", "user",
          "presence_penalty", "frequency_penalty", "logit_bias", "logprobs"}
COMPLETION_FIELDS = COMMON | {"prompt", "echo", "best_of", "suffix"}
CHAT_FIELDS = COMMON | {"messages", "max_completion_tokens", "top_logprobs", "response_format", "tools", "tool_choice",
                        "parallel_tool_calls", "functions", "function_call", "store", "metadata"}
# accepted only at their "off" value
OFF = {"presence_penalty": (0, 0.0, None), "frequency_penalty": (0, 0.0, None), "logit_bias": (None,),
       "logprobs": (None, False), "top_logprobs": (None, 0), "echo": (None, False), "best_of": (None, 1),
       "suffix": (None, ""), "tools": (None,), "tool_choice": (None, "none"), "functions": (None,),
       "function_call": (None, "none"), "parallel_tool_calls": (None, False, True), "store": (None, False)}
CHAT_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        self.status, self.message, self.param, self.code = status, message, param, code
        super().__init__(message)

    def body(self) -> dict:
        kind = "server_error" if self.status >= 500 else "invalid_request_error"
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


@dataclass
class Request:
    kind: str  # "completion" | "chat"
    model: str
    prompts: list[list[int]]  # token ids, one per prompt (a chat is one prompt)
    max_tokens: list[int]  # per prompt
    temperature: float
    top_p: float
    n: int
    stop: list[str]
    seed: int | None
    stream: bool
    include_usage: bool
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:24])
    created: int = field(default_factory=lambda: int(time.time()))


# ------------------------------------------------------------------------------------------ parsing

def _number(body, key, default, kind, lo, hi, problems):
    if body.get(key) is None:
        return default
    v = body[key]
    ok = isinstance(v, (int, float)) and not isinstance(v, bool) and (kind is float or isinstance(v, int))
    if not ok or not lo <= v <= hi:
        problems.append((f"{key!r} must be {'an integer' if kind is int else 'a number'} in [{lo}, {hi}] (got {v!r})",
                         key))
        return default
    return kind(v)


def _text(content, where: str, problems) -> str | None:
    """A message's content: a string, or a list of text parts [{type: text, text}]."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                                         for p in content):
        return "".join(p["text"] for p in content)
    problems.append((f"{where}.content must be a string or a list of text parts (got {type(content).__name__})",
                     "messages"))
    return None


def parse(kind: str, body: dict, service) -> Request:
    """Check a request body against the model; raises APIError(400/404) naming every problem."""
    problems: list[tuple[str, str]] = []
    allowed = CHAT_FIELDS if kind == "chat" else COMPLETION_FIELDS
    extra = sorted(set(body) - allowed)
    if extra:
        problems.append((f"unrecognized request argument(s): {', '.join(extra)}", extra[0]))
    for key, off in OFF.items():
        if key in body and key in allowed and body[key] not in off:
            problems.append((f"{key!r} is not supported by this server (leave it out)", key))
    if "response_format" in body and body["response_format"] not in (None, {"type": "text"}):
        problems.append(("'response_format' other than {\"type\": \"text\"} is not supported", "response_format"))
    model = body.get("model")
    if not isinstance(model, str) or not model:
        problems.append(("'model' is required: the id that GET /v1/models lists", "model"))
    elif model != service.served_name:
        raise APIError(404, f"The model {model!r} does not exist; this server serves {service.served_name!r}",
                       "model", "model_not_found")
    tok = service.tok
    prompts: list[list[int]] = []
    if kind == "chat":
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            problems.append(("'messages' must be a non-empty list of {role, content}", "messages"))
        elif not service.chat:
            problems.append((f"{service.model_dir} has no chat template; use /v1/completions, or train with "
                             f"data.format=chat", "messages"))
        else:
            conv = []
            for i, m in enumerate(messages):
                role = m.get("role") if isinstance(m, dict) else None
                if role not in CHAT_ROLES:
                    problems.append((f"messages[{i}].role must be one of {', '.join(CHAT_ROLES)} (got {role!r})",
                                     "messages"))
                    continue
                text = _text(m.get("content"), f"messages[{i}]", problems)
                if text is not None:
                    conv.append({"role": CHAT_ROLES[role], "content": text})
            if len(conv) == len(messages):
                try:
                    rendered = tok.apply_chat_template(conv, tokenize=False, add_generation_prompt=True)
                except Exception as e:  # the template refuses this conversation (e.g. raise_exception)
                    problems.append((f"the model's chat template cannot render these messages: {e}", "messages"))
                else:
                    prompts.append(tok(rendered, add_special_tokens=False)["input_ids"])
    else:
        prompt = body.get("prompt")
        if isinstance(prompt, str):
            prompt = [prompt]
        if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            prompt = [prompt]  # one prompt as token ids
        if not isinstance(prompt, list) or not prompt:
            problems.append(("'prompt' must be a string, a list of strings or token ids", "prompt"))
        else:
            vocab = len(tok)
            for i, p in enumerate(prompt):
                if isinstance(p, str) and p:
                    prompts.append(tok(p, add_special_tokens=False)["input_ids"])
                elif isinstance(p, list) and p and all(isinstance(t, int) and 0 <= t < vocab for t in p):
                    prompts.append(list(p))
                else:
                    problems.append((f"prompt[{i}] must be a non-empty string or a list of token ids in [0, {vocab})",
                                     "prompt"))
    n = _number(body, "n", 1, int, 1, service.max_batch, problems)
    if len(prompts) * n > service.max_batch:
        problems.append((f"{len(prompts)} prompt(s) x n={n} = {len(prompts) * n} choices; at most "
                         f"{service.max_batch} per request", "n"))
    temperature = _number(body, "temperature", 1.0, float, 0.0, 2.0, problems)
    top_p = _number(body, "top_p", 1.0, float, 0.0, 1.0, problems)
    seed = _number(body, "seed", None, int, -(2**63), 2**63 - 1, problems)
    key = "max_completion_tokens" if kind == "chat" and body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = _number(body, key, None, int, 1, service.max_new_tokens, problems)
    stop = body.get("stop")
    stop = [stop] if isinstance(stop, str) else ([] if stop is None else stop)
    if not isinstance(stop, list) or len(stop) > 4 or not all(isinstance(s, str) and s for s in stop):
        problems.append(("'stop' must be a non-empty string or a list of at most 4 of them", "stop"))
        stop = []
    stream = body.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        problems.append(("'stream' must be true or false", "stream"))
    options = body.get("stream_options") or {}
    if not isinstance(options, dict) or set(options) - {"include_usage", "include_obfuscation"}:
        problems.append(("'stream_options' may only hold include_usage", "stream_options"))
        options = {}
    if options and not stream:
        problems.append(("'stream_options' needs 'stream': true", "stream_options"))
    limits = []
    for i, ids in enumerate(prompts):
        want = max_tokens if max_tokens is not None else (
            COMPLETIONS_DEFAULT_MAX_TOKENS if kind == "completion" else min(service.max_new_tokens,
                                                                           service.positions - len(ids)))
        if len(ids) + max(want, 1) > service.positions:
            problems.append((f"This model's maximum context length is {service.positions} tokens. However, you "
                             f"requested {len(ids) + max(want, 1)} tokens ({len(ids)} in the "
                             f"{'messages' if kind == 'chat' else f'prompt[{i}]'}, {max(want, 1)} in the completion). "
                             f"Please reduce the length of the {'messages' if kind == 'chat' else 'prompt'} or "
                             f"the completion.", "messages" if kind == "chat" else "prompt"))
        limits.append(want)
    if problems:
        raise APIError(400, "; ".join(p for p, _ in problems), problems[0][1], "invalid_request")
    return Request(kind, model, prompts, limits, temperature, top_p, n, stop, seed, stream,
                   bool(options.get("include_usage")))


# ------------------------------------------------------------------------------------------ generation

class _Progress:
    """Streamer (transformers calls put() with the prompt, then with each new token) and stopping
    criterion at once: it decodes the new tokens, watches for stop strings, and passes on the text that
    is final (never text that could still turn into a stop string, nor half of a UTF-8 character)."""

    def __init__(self, tok, stop_ids: set[int], stops: list[str], on_text=None):
        self.tok, self.stop_ids, self.stops, self.on_text = tok, stop_ids, stops, on_text
        self.ids: list[int] = []
        self.text, self.sent, self.prompt_seen = "", 0, False
        self.finish: str | None = None
        self.stop_string_hit = False

    # streamer
    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        for t in value.reshape(-1).tolist():
            if self.finish:  # nothing after the stop (a batch of one never continues past it)
                continue
            self.ids.append(t)
            if t in self.stop_ids:
                self.finish = "stop"
                break
            text = self.tok.decode([i for i in self.ids if i not in self.stop_ids], skip_special_tokens=True)
            hits = [i for i in (text.find(s) for s in self.stops) if i >= 0]
            if hits:
                text, self.finish, self.stop_string_hit = text[:min(hits)], "stop", True
            self.text = text
            self._emit(final=False)

    def end(self) -> None:
        pass

    # stopping criterion
    def __call__(self, input_ids, scores, **kwargs):
        return torch.full((input_ids.shape[0],), self.stop_string_hit, dtype=torch.bool, device=input_ids.device)

    def _emit(self, final: bool) -> None:
        if self.on_text is None:
            return
        safe = len(self.text)
        if not final and not self.finish:
            while safe and self.text[safe - 1] == "\ufffd":  # an incomplete multi-byte character
                safe -= 1
            for s in self.stops:  # the longest tail that could still become a stop string
                for k in range(min(len(s) - 1, safe), 0, -1):
                    if self.text[safe - k:safe] == s[:k]:
                        safe -= k
                        break
        if safe > self.sent:
            self.on_text(self.text[self.sent:safe])
            self.sent = safe

    def finish_text(self) -> None:
        self._emit(final=True)


@torch.no_grad()
def generate_one(service, ids: list[int], max_tokens: int, req: Request, on_text=None) -> tuple[str, str, int]:
    """(text, finish_reason, completion tokens) of one choice; `on_text(delta)` gets the text as it becomes final."""
    from transformers import StoppingCriteriaList

    progress = _Progress(service.tok, set(service.stop_ids), req.stop, on_text)
    x = torch.tensor([ids], dtype=torch.long, device=service.device)
    sampling = (dict(do_sample=True, temperature=req.temperature, top_p=req.top_p, top_k=0)
                if req.temperature > 0 and req.top_p > 0 else dict(do_sample=False, temperature=None, top_p=None,
                                                                     top_k=None))
    service.hf.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=max_tokens,
                        eos_token_id=service.stop_ids, pad_token_id=service.tok.pad_token_id, streamer=progress,
                        stopping_criteria=StoppingCriteriaList([progress]), **sampling)
    progress.finish_text()
    return progress.text, progress.finish or "length", len(progress.ids)


def run(service, req: Request, send=None) -> dict | None:
    """Generate every choice. Without `send`, the response object; with it, stream chunks through `send`."""
    stamp = {"id": ("chatcmpl-" if req.kind == "chat" else "cmpl-") + req.id, "created": req.created,
             "model": req.model}
    chunk_object = "chat.completion.chunk" if req.kind == "chat" else "text_completion"
    choices, prompt_tokens, completion_tokens = [], sum(len(p) for p in req.prompts), 0
    with service.lock:
        if req.seed is not None:
            torch.manual_seed(req.seed)
        for p, (ids, limit) in enumerate(zip(req.prompts, req.max_tokens)):
            for j in range(req.n):
                index = p * req.n + j
                on_text = None
                if send is not None:
                    def chunk(payload: dict, finish=None, index=index) -> dict:
                        key = "delta" if req.kind == "chat" else "text"
                        c = {"index": index, key: payload if req.kind == "chat" else payload.get("content", ""),
                             "logprobs": None, "finish_reason": finish}
                        out = {**stamp, "object": chunk_object, "choices": [c]}
                        if req.include_usage:
                            out["usage"] = None
                        return out

                    if req.kind == "chat":
                        send(chunk({"role": "assistant", "content": ""}))
                    on_text = lambda delta, chunk=chunk: send(chunk({"content": delta}))
                text, finish, n_tokens = generate_one(service, ids, limit, req, on_text)
                completion_tokens += n_tokens
                if send is not None:
                    send(chunk({}, finish))
                elif req.kind == "chat":
                    choices.append({"index": index, "message": {"role": "assistant", "content": text},
                                    "logprobs": None, "finish_reason": finish})
                else:
                    choices.append({"index": index, "text": text, "logprobs": None, "finish_reason": finish})
    usage = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
             "total_tokens": prompt_tokens + completion_tokens}
    if send is not None:
        if req.include_usage:
            send({**stamp, "object": chunk_object, "choices": [], "usage": usage})
        return None
    return {**stamp, "object": "chat.completion" if req.kind == "chat" else "text_completion", "choices": choices,
            "usage": usage}


def models(service) -> dict:
    return {"object": "list", "data": [{"id": service.served_name, "object": "model", "created": service.created,
                                        "owned_by": "ftl"}]}
