"""`saewb serve-llm`: a small OpenAI-compatible chat server around the built-in SmolLM2 (stdlib http.server).

Serves GET /v1/models and POST /v1/chat/completions (non-streaming) on 127.0.0.1, so `saewb explain
--explainer-url` can be tried, and tested, against a real server without any other software. For
real work point --explainer-url at vLLM, a llama.cpp server, Ollama or OpenAI instead.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from analysis.llm import BUILTIN_EXPLAINER, Chat, LLMAnswerError

ChatFn = Callable[[Sequence[Chat], int], list[Any]]
MAX_TOKENS_CAP = 256


def make_server(
    chat: ChatFn, model: str = BUILTIN_EXPLAINER, host: str = "127.0.0.1", port: int = 0
) -> ThreadingHTTPServer:
    """A server (not yet serving) answering with `chat`; port 0 picks a free port (see server_address)."""

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the stdlib's name
            return None

        def _send(self, status: int, body: dict[str, Any]) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _error(self, status: int, message: str) -> None:
            self._send(status, {"error": {"message": message, "type": "invalid_request_error"}})

        def do_GET(self) -> None:  # noqa: N802 - the stdlib's name
            if self.path.rstrip("/") == "/v1/models":
                self._send(
                    200, {"object": "list", "data": [{"id": model, "object": "model", "owned_by": "saewb"}]}
                )
            else:
                self._error(404, f"no route {self.path}; this server has /v1/models and /v1/chat/completions")

        def do_POST(self) -> None:  # noqa: N802
            if self.path.rstrip("/") != "/v1/chat/completions":
                self._error(404, f"no route {self.path}")
                return
            try:
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)) or b"{}")
                messages = [{"role": str(m["role"]), "content": str(m["content"])} for m in body["messages"]]
            except (ValueError, KeyError, TypeError) as err:
                self._error(400, f"malformed request: {err}")
                return
            if body.get("model") != model:
                self._error(
                    404, f"model {body.get('model')!r} is not served here; this server serves {model!r}"
                )
                return
            max_tokens = min(int(body.get("max_tokens") or 64), MAX_TOKENS_CAP)
            answer = chat([messages], max_tokens)[0]
            if isinstance(answer, LLMAnswerError):
                answer = ""
            self._send(
                200,
                {
                    "id": f"chatcmpl-{time.time_ns()}",
                    "object": "chat.completion",
                    "created": int(time.time()),
                    "model": model,
                    "choices": [
                        {
                            "index": 0,
                            "finish_reason": "stop",
                            "message": {"role": "assistant", "content": answer},
                        }
                    ],
                    "usage": {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0},
                },
            )

    server = ThreadingHTTPServer((host, port), Handler)
    server.daemon_threads = True
    return server


def serve_in_thread(
    chat: ChatFn, model: str = BUILTIN_EXPLAINER, port: int = 0
) -> tuple[ThreadingHTTPServer, str]:
    """Start a server on 127.0.0.1 in a daemon thread; returns it and its base URL (.../v1)."""
    server = make_server(chat, model, port=port)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    host, port = server.server_address[:2]
    return server, f"http://{host}:{port}/v1"
