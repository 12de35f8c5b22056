"""A real OpenAI-compatible chat server for tests whose answers a test writes: a stdlib HTTP server on a
free loopback port answering ``POST .../chat/completions`` with ``answer(last user turn)``.

Used where a test needs to know what a judge or critic will say (the tiny model behind ``transformers
serve`` answers gibberish); every request body is kept in ``requests``.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class ScriptedChatServer:
    """Answers each chat completion with ``answer(content of the last message)``."""

    def __init__(self, answer: Callable[[str], str]) -> None:
        self.answer = answer
        self.requests: list[dict] = []
        self._lock = threading.Lock()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.base_url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    @property
    def user_turns(self) -> list[str]:
        return [body["messages"][-1]["content"] for body in self.requests]

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (the stdlib's name)
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with server._lock:
                    server.requests.append(body)
                content = server.answer(body["messages"][-1]["content"])
                data = json.dumps({"choices": [{"message": {"role": "assistant", "content": content}}]})
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data.encode())

            def log_message(self, *args: object) -> None:
                pass

        return Handler


@contextmanager
def scripted_chat_server(answer: Callable[[str], str]) -> Iterator[ScriptedChatServer]:
    """The server, serving in a daemon thread for the ``with`` block, then shut down."""
    server = ScriptedChatServer(answer)
    threading.Thread(target=server.httpd.serve_forever, args=(0.05,), daemon=True).start()
    try:
        yield server
    finally:
        server.httpd.shutdown()
        server.httpd.server_close()
