"""`ftl serve MODEL --port P`: a small JSON-over-HTTP endpoint for an exported model (stdlib only).

    GET  /health      {"status": "ok", "model": ..., "head": "lm"|"cls", "endpoints": [...], "limits": {...}}
    POST /generate    {"prompt": "..."} or {"prompts": [...]}, optional max_new_tokens, temperature,
                      top_k, top_p, seed  ->  {"completions": [{"prompt", "completion"}, ...]}
    POST /classify    {"text": "..."} or {"texts": [...]}
                      ->  {"predictions": [{"label", "score", "probs": {label: p}}, ...]}
    GET  /v1/models, POST /v1/completions, POST /v1/chat/completions (lm): the OpenAI API, streaming
                      included, for the official `openai` client and tools built on it (engine/commands/openai_api.py)

It binds 127.0.0.1 unless told otherwise. `--api-key KEY` (or FTL_API_KEY) makes every request but GET
/health present `Authorization: Bearer KEY` (401 otherwise); without it there is no authentication, so
exposing the port is a decision.
Requests are handled on threads (a slow client does not block the others); the model itself runs one
request at a time under a lock, which also makes `seed` reproducible. Bad requests get a 4xx with a
JSON body {"error": "..."} naming every problem: 400 malformed JSON / wrong fields or values,
404 unknown path (or the endpoint of the other head), 405 wrong method, 411 no Content-Length,
413 body over --max-body-bytes, 415 a Content-Type other than JSON (curl's default form type is
accepted and parsed as JSON), 403 a POST with an Origin header (a web page in the user's browser: a
form-encoded POST needs no CORS preflight, so it would otherwise reach this unauthenticated endpoint).
Classification of texts longer than the model's positions pools windows (engine/data/windows.py), like
evaluation does.
"""

from __future__ import annotations

import hmac
import json
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import torch

GEN_FIELDS = {"prompt", "prompts", "max_new_tokens", "temperature", "top_k", "top_p", "seed"}
CLS_FIELDS = {"text", "texts"}


class RequestError(Exception):
    def __init__(self, status: int, problems: str | list[str]):
        self.status = status
        self.problems = [problems] if isinstance(problems, str) else problems
        super().__init__("; ".join(self.problems))


class ModelService:
    """The model behind the endpoint, with the limits every request is checked against."""

    def __init__(self, model_dir: Path, device: torch.device | None = None, max_new_tokens: int = 256,
                 max_batch: int = 16, served_name: str | None = None):
        from engine.commands import models as tools

        self.model_dir, _ = tools.resolve_model_dir(Path(model_dir))
        self.device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.hf, self.tok, self.head = tools.load_model(self.model_dir, self.device)
        self.positions = int(self.hf.config.n_positions)
        self.max_new_tokens, self.max_batch = max_new_tokens, max_batch
        self.lock = threading.Lock()
        self.labels = ([self.hf.config.id2label[i] for i in range(self.hf.config.num_labels)]
                       if self.head == "cls" else [])
        # the OpenAI endpoints: the model's id (a run's final/ or best/ goes by its run's name), the tokens
        # generation stops at (generation_config.json: EOS and the chat template's end-of-turn marker)
        d = self.model_dir.resolve()
        self.served_name = served_name or (d.parent.name if d.name in ("final", "best") else d.name)
        self.created = int(time.time())
        self.chat = bool(getattr(self.tok, "chat_template", None))
        eos = getattr(getattr(self.hf, "generation_config", None), "eos_token_id", None)
        eos = eos if eos is not None else self.tok.eos_token_id
        self.stop_ids = [int(i) for i in (eos if isinstance(eos, (list, tuple)) else [eos]) if i is not None]

    def info(self) -> dict:
        lm = ["POST /generate", "GET /v1/models", "POST /v1/completions"] + (["POST /v1/chat/completions"]
                                                                            if self.chat else [])
        return {"status": "ok", "model": str(self.model_dir), "head": self.head,
                "endpoints": ["GET /health", *(lm if self.head == "lm" else ["POST /classify"])],
                "limits": {"max_batch": self.max_batch, "max_new_tokens": self.max_new_tokens,
                           "positions": self.positions}, **({"labels": self.labels} if self.labels else {}),
                **({"served_model": self.served_name} if self.head == "lm" else {})}

    # ------------------------------------------------------------------------------------- checks
    def _texts(self, body: dict, one: str, many: str, problems: list[str]) -> list[str]:
        if (one in body) == (many in body):
            problems.append(f"give exactly one of {one!r} (a string) or {many!r} (a list of strings)")
            return []
        if one in body:
            value = body[one]
            if not isinstance(value, str) or not value:
                problems.append(f"{one!r} must be a non-empty string")
                return []
            return [value]
        value = body[many]
        if not isinstance(value, list) or not value or not all(isinstance(v, str) and v for v in value):
            problems.append(f"{many!r} must be a non-empty list of non-empty strings")
            return []
        if len(value) > self.max_batch:
            problems.append(f"{many!r} holds {len(value)} items; at most {self.max_batch} per request")
        return value

    @staticmethod
    def _number(body: dict, key: str, default, kind, lo, hi, problems: list[str]):
        if key not in body:
            return default
        v = body[key]
        ok = isinstance(v, (int, float)) and not isinstance(v, bool) and (kind is float or isinstance(v, int))
        if not ok or not lo <= v <= hi:
            problems.append(f"{key!r} must be {'an integer' if kind is int else 'a number'} in [{lo}, {hi}] (got {v!r})")
            return default
        return kind(v)

    @staticmethod
    def _unknown(body: dict, allowed: set[str], problems: list[str]) -> None:
        extra = sorted(set(body) - allowed)
        if extra:
            problems.append(f"unknown field(s) {', '.join(map(repr, extra))}; allowed: {', '.join(sorted(allowed))}")

    # ---------------------------------------------------------------------------------- endpoints
    def generate(self, body: dict) -> dict:
        from engine.commands import models as tools

        if self.head != "lm":
            raise RequestError(404, "this server holds a classification model: POST /classify")
        problems: list[str] = []
        self._unknown(body, GEN_FIELDS, problems)
        prompts = self._texts(body, "prompt", "prompts", problems)
        new = self._number(body, "max_new_tokens", min(50, self.max_new_tokens), int, 1, self.max_new_tokens, problems)
        temperature = self._number(body, "temperature", 0.8, float, 0.0, 100.0, problems)
        top_k = self._number(body, "top_k", 40, int, 0, 1_000_000, problems)
        top_p = self._number(body, "top_p", 1.0, float, 0.0, 1.0, problems)
        seed = self._number(body, "seed", None, int, 0, 2**63 - 1, problems)
        for i, p in enumerate(prompts):
            n = len(self.tok(p, add_special_tokens=False)["input_ids"])
            if n + new > self.positions:
                problems.append(f"prompt {i}: {n} tokens + max_new_tokens {new} exceed the model's {self.positions} "
                                f"positions")
        if problems:
            raise RequestError(400, problems)
        with self.lock:
            texts = tools.generate_batch(self.hf, self.tok, prompts, new, temperature, top_k, top_p, seed,
                                         batch_size=self.max_batch)
        return {"completions": [{"prompt": p, "completion": t} for p, t in zip(prompts, texts)]}

    def classify(self, body: dict) -> dict:
        from engine.data import windows

        if self.head != "cls":
            raise RequestError(404, "this server holds a language model: POST /generate")
        problems: list[str] = []
        self._unknown(body, CLS_FIELDS, problems)
        texts = self._texts(body, "text", "texts", problems)
        if problems:
            raise RequestError(400, problems)
        with self.lock:
            probs = windows.classify_texts(self.hf, self.tok, texts, self.positions, self.positions // 2).cpu()
        out = []
        for row in probs.tolist():
            best = max(range(len(row)), key=row.__getitem__)
            out.append({"label": self.labels[best], "score": row[best],
                        "probs": {name: p for name, p in zip(self.labels, row)}})
        return {"predictions": out}


V1_POST = {"/v1/completions": "completion", "/v1/chat/completions": "chat"}


def make_handler(service: ModelService, max_body: int, quiet: bool = False, api_key: str | None = None):
    from engine.commands import openai_api

    routes = {"/generate": service.generate, "/classify": service.classify}
    v1 = service.head == "lm"  # the OpenAI paths exist for language models

    class Handler(BaseHTTPRequestHandler):
        server_version = "ftl-serve/1"
        protocol_version = "HTTP/1.1"
        timeout = 30  # a client that stops sending does not hold its thread forever

        def _send(self, status: int, payload: dict, extra_headers: dict | None = None) -> None:
            body = (json.dumps(payload) + "\n").encode("utf-8")
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            for k, v in (extra_headers or {}).items():
                self.send_header(k, v)
            if status >= 400:
                self.send_header("Connection", "close")
                self.close_connection = True
            self.end_headers()
            self.wfile.write(body)

        def _error(self, status: int, problems, extra_headers=None) -> None:
            problems = [problems] if isinstance(problems, str) else problems
            if self.path.startswith("/v1/"):  # OpenAI clients read {"error": {"message", "type", ...}}
                code = {401: "invalid_api_key", 404: "not_found", 405: "method_not_allowed"}.get(status)
                return self._send(status, openai_api.APIError(status, "; ".join(problems), None, code).body(),
                                  extra_headers)
            self._send(status, {"error": "; ".join(problems), "problems": problems, "status": status}, extra_headers)

        def _authorized(self) -> bool:
            """With --api-key: the request carries `Authorization: Bearer <key>` (compared in constant time)."""
            if api_key is None:
                return True
            scheme, _, given = self.headers.get("Authorization", "").partition(" ")
            if scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), api_key.encode()):
                return True
            self._error(401, "missing or incorrect API key: send the header `Authorization: Bearer <key>` with the "
                             "key the server was started with (--api-key)", {"WWW-Authenticate": "Bearer"})
            return False

        def do_GET(self):
            path = self.path.split("?", 1)[0]
            if path in ("/", "/health"):
                return self._send(200, service.info())
            if not self._authorized():
                return None
            if v1 and path == "/v1/models":
                return self._send(200, openai_api.models(service))
            if path in routes or (v1 and path in V1_POST):
                return self._error(405, f"{path} takes POST with a JSON body", {"Allow": "POST"})
            return self._error(404, f"no such endpoint {path!r}; try GET /health")

        def do_POST(self):
            path = self.path.split("?", 1)[0]
            if not self._authorized():
                return None
            if path not in routes and not (v1 and path in V1_POST):
                if path in ("/", "/health") or (v1 and path == "/v1/models"):
                    return self._error(405, f"{path} takes GET", {"Allow": "GET"})
                return self._error(404, f"no such endpoint {path!r}; POST /generate or /classify, GET /health"
                                        + (", or the OpenAI API under /v1" if v1 else ""))
            if self.headers.get("Origin"):
                # Browsers add Origin to cross-site POSTs; a form-encoded one needs no CORS preflight, so
                # without this any web page the user opens could drive this unauthenticated endpoint.
                return self._error(403, "requests from web pages (an Origin header) are refused: the endpoint has "
                                        "no authentication; call it from a program (curl, requests)")
            if self.headers.get("Transfer-Encoding", "").lower() == "chunked" or "Content-Length" not in self.headers:
                return self._error(411, "send a Content-Length header (chunked bodies are not accepted)")
            try:
                length = int(self.headers["Content-Length"])
                if length < 0:
                    raise ValueError
            except ValueError:
                return self._error(400, "Content-Length must be a non-negative integer")
            if length > max_body:
                if length <= 16 * max_body:  # read it off the socket so the client sees the answer, not a reset
                    self.rfile.read(length)
                return self._error(413, f"request body of {length} bytes exceeds the limit of {max_body} bytes")
            ctype = self.headers.get("Content-Type", "application/json").split(";")[0].strip().lower()
            # curl -d sends x-www-form-urlencoded unless told otherwise; its body is still parsed as JSON
            if ctype not in ("application/json", "application/x-www-form-urlencoded") and not ctype.endswith("+json"):
                return self._error(415, f"Content-Type must be application/json (got {ctype!r})")
            raw = self.rfile.read(length)
            try:
                body = json.loads(raw.decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                return self._error(400, f"the body is not valid JSON: {e}")
            if not isinstance(body, dict):
                return self._error(400, "the body must be a JSON object")
            if path in V1_POST:
                return self._openai(path, body)
            try:
                result = routes[path](body)
            except RequestError as e:
                return self._error(e.status, e.problems)
            except Exception as e:  # a bug or an out-of-memory: the client learns it is not its fault
                self.log_error("internal error on %s: %r", path, e)
                return self._error(500, f"internal error: {type(e).__name__}")
            self._send(200, result)

        def _openai(self, path: str, body: dict) -> None:
            try:
                req = openai_api.parse(V1_POST[path], body, service)
                if not req.stream:
                    return self._send(200, openai_api.run(service, req))
            except openai_api.APIError as e:
                return self._send(e.status, e.body())
            except Exception as e:
                self.log_error("internal error on %s: %r", path, e)
                return self._send(500, openai_api.APIError(500, f"internal error: {type(e).__name__}").body())
            # Server-sent events: one `data:` line per chunk, then [DONE]; the response ends when the
            # connection closes (no Content-Length is known in advance).
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Cache-Control", "no-cache")
            self.send_header("Connection", "close")
            self.end_headers()
            self.close_connection = True

            def send(obj: dict) -> None:
                self.wfile.write(b"data: " + json.dumps(obj).encode("utf-8") + b"\n\n")
                self.wfile.flush()

            try:
                openai_api.run(service, req, send)
                self.wfile.write(b"data: [DONE]\n\n")
                self.wfile.flush()
            except (BrokenPipeError, ConnectionResetError):
                pass  # the client went away; generation stopped with it
            except Exception as e:
                self.log_error("internal error while streaming %s: %r", path, e)
                try:
                    send(openai_api.APIError(500, f"internal error: {type(e).__name__}").body())
                except OSError:
                    pass

        def log_message(self, fmt, *args):
            if not quiet:
                sys.stderr.write(f"{time.strftime('%H:%M:%S')} {self.address_string()} {fmt % args}\n")

    return Handler


def make_server(service: ModelService, host: str = "127.0.0.1", port: int = 8000, max_body: int = 65536,
                quiet: bool = False, api_key: str | None = None) -> ThreadingHTTPServer:
    server = ThreadingHTTPServer((host, port), make_handler(service, max_body, quiet, api_key or None))
    server.daemon_threads = True
    return server
