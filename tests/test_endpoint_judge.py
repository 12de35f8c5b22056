"""Judges behind an OpenAI-compatible endpoint: client, verdict cache, pairwise and pointwise judging.

Two real servers: ``transformers serve`` over a tiny random Llama (one per module, see
``openai_servers``), whose gibberish answers exercise the wire format, ordering, caching and the
counting of unparseable verdicts; and a scripted stdlib HTTP server started here, whose answers a test
chooses (503 twice then 200, 400, 429 with Retry-After, slow answers for concurrency).
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from openai_servers import JudgeServer, transformers_judge_server
from prefect_servers import free_port

from rlhf_core.errors import UserError
from rlhf_core.judging.endpoint_client import EndpointClient, EndpointSettings
from rlhf_core.judging.endpoint_judge import (
    STORE_EVERY,
    ScoreScale,
    cached_generate,
    judge_digest,
    judge_pairs_on_endpoint,
    parse_score,
    score_on_endpoint,
    split_unparseable,
)
from rlhf_core.judging.policy_judge import JudgeParseError
from rlhf_core.judging.verdict_cache import VerdictCache

REPO_ROOT = Path(__file__).resolve().parents[1]
PAIRS = [("What is 2 + 3?", "5", "6"), ("Name a colour.", "blue", "a dog"), ("Say hi.", "hi", "bye")]


# --- servers ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def judge_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[JudgeServer]:
    with transformers_judge_server(tmp_path_factory.mktemp("judge-server")) as server:
        print(f"\ntransformers serve: tiny model built and server healthy in {server.startup_s:.1f}s")
        yield server


class ScriptedServer:
    """A threaded stdlib HTTP server answering POSTs from a script of (status, headers, body), then
    with ``answer(user turn)`` after ``delay_s``: the text of a 200 (default ``echo: <user turn>``) or
    a whole (status, headers, body). It records every request and the most it had in flight at once."""

    def __init__(
        self,
        script: list[tuple[int, dict[str, str], dict]] | None = None,
        *,
        delay_s: float = 0.0,
        answer: Callable[[str], str | tuple[int, dict[str, str], dict]] = lambda prompt: "echo: " + prompt,
    ) -> None:
        self.script, self.delay_s, self.answer = list(script or []), delay_s, answer
        self.requests: list[dict] = []
        self.in_flight = self.max_in_flight = 0
        self._lock = threading.Lock()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.base_url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (the stdlib's name)
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                status, headers, payload = server._next(self.path, dict(self.headers), body)
                data = json.dumps(payload).encode()
                self.send_response(status)
                for name, value in (headers | {"Content-Type": "application/json"}).items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: object) -> None:
                pass

        return Handler

    def _next(self, path: str, headers: dict, body: dict) -> tuple[int, dict[str, str], dict]:
        with self._lock:
            self.requests.append({"path": path, "headers": headers, "body": body})
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
            step = self.script.pop(0) if self.script else None
        try:
            if step is not None:
                return step
            time.sleep(self.delay_s)
            reply = self.answer(body["messages"][-1]["content"])
            if isinstance(reply, tuple):
                return reply
            return 200, {}, {"choices": [{"index": 0, "message": {"role": "assistant", "content": reply}}]}
        finally:
            with self._lock:
                self.in_flight -= 1

    def __enter__(self) -> ScriptedServer:
        threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def counting_client(settings: EndpointSettings) -> tuple[EndpointClient, list[str]]:
    """A client whose every request (retries included) is appended to the returned list."""
    sent: list[str] = []

    async def on_request(request) -> None:  # noqa: ANN001 (httpx.Request)
        sent.append(str(request.url))

    return EndpointClient(settings, event_hooks={"request": [on_request]}), sent


def settings_for(base_url: str, model: str = "judge", **overrides: object) -> EndpointSettings:
    return EndpointSettings(**({"base_url": base_url, "model": model, "backoff_s": 0.01} | overrides))  # type: ignore[arg-type]


# --- the real server -----------------------------------------------------------------------------------


def test_real_server_answers_every_prompt_in_order(judge_server: JudgeServer) -> None:
    prompts = [f"Question {i}: what is {i} + {i}?" for i in range(6)]
    settings = settings_for(judge_server.base_url, judge_server.model, max_tokens=6, max_concurrency=4)
    together = EndpointClient(settings).complete(prompts)
    one_by_one = [EndpointClient(settings).complete([p])[0] for p in prompts]
    assert len(together) == len(prompts) and all(isinstance(t, str) and t for t in together)
    assert together == one_by_one  # greedy: each prompt's answer is its own, whatever the order served


def test_real_server_rejects_an_unknown_model_without_retrying(judge_server: JudgeServer) -> None:
    client, sent = counting_client(settings_for(judge_server.base_url, "no-such-model", max_tokens=4))
    with pytest.raises(UserError) as caught:
        client.complete(["hello"])
    message = str(caught.value)
    assert "HTTP 400" in message and "'no-such-model'" in message and judge_server.base_url in message
    assert judge_server.model in message  # the server's own words: which model it is pinned to
    assert len(sent) == 1


def test_second_run_is_served_from_the_cache_even_at_another_url(
    judge_server: JudgeServer, tmp_path: Path
) -> None:
    cache = VerdictCache(tmp_path / "cache" / "judge")
    principles = ["Prefer correct answers.", "Prefer polite answers."]
    client, sent = counting_client(settings_for(judge_server.base_url, judge_server.model, max_tokens=8))
    first = judge_pairs_on_endpoint(client, cache, principles, PAIRS)
    assert len(sent) == 2 * len(PAIRS)  # both orders of every pair
    assert len(cache) == 2 * len(PAIRS)

    same_model_elsewhere = judge_server.base_url.replace("127.0.0.1", "localhost")
    again, sent_again = counting_client(settings_for(same_model_elsewhere, judge_server.model, max_tokens=8))
    assert [str(v) for v in judge_pairs_on_endpoint(again, cache, principles, PAIRS)] == [
        str(v) for v in first
    ]
    assert sent_again == []

    other_model, sent_other = counting_client(
        settings_for(judge_server.base_url, "another-model", max_tokens=8)
    )
    with pytest.raises(UserError):  # another model name is another key: it must ask (and is refused)
        judge_pairs_on_endpoint(other_model, cache, principles, PAIRS)
    assert sent_other


def test_gibberish_verdicts_are_counted_or_fail(judge_server: JudgeServer, tmp_path: Path) -> None:
    client = EndpointClient(settings_for(judge_server.base_url, judge_server.model, max_tokens=8))
    cache = VerdictCache(tmp_path)
    items = [(q, a) for q, a, _ in PAIRS]
    scores = score_on_endpoint(
        client, cache, "Correct and polite answers score high.", items, ScoreScale(1, 10)
    )
    kept, unparseable = split_unparseable(scores, on_unparseable="skip", what="judge 'rubric'")
    # A random one-layer model writes no [[score: N]]: every answer is an error in its place, counted.
    assert all(isinstance(s, JudgeParseError) for s in scores)
    assert (kept, unparseable) == ({}, len(items))
    with pytest.raises(JudgeParseError, match=r"judge 'rubric': 3 of 3 .*row 0"):
        split_unparseable(scores, on_unparseable="fail", what="judge 'rubric'")


# --- the scripted server: retries, errors, concurrency, keys ---------------------------------------------


def test_transient_errors_are_retried_until_an_answer() -> None:
    unavailable = (503, {}, {"error": {"message": "warming up"}})
    with ScriptedServer([unavailable, unavailable]) as server:
        client, sent = counting_client(settings_for(server.base_url, max_retries=3))
        assert client.complete(["ping"]) == ["echo: ping"]
    assert len(sent) == 3


def test_a_client_error_is_not_retried_and_names_endpoint_model_and_message() -> None:
    bad_request = (400, {}, {"error": {"message": "max_tokens is too large: " + "x" * 1000}})
    with ScriptedServer([bad_request]) as server:
        client, sent = counting_client(settings_for(server.base_url, "judge-7b", max_retries=5))
        with pytest.raises(UserError) as caught:
            client.complete(["ping"])
    message = str(caught.value)
    assert len(sent) == 1
    assert (
        f"{server.base_url}/chat/completions" in message and "'judge-7b'" in message and "HTTP 400" in message
    )
    assert "max_tokens is too large" in message and "x" * 300 not in message  # first 300 chars only


def test_retries_run_out_with_a_user_error() -> None:
    with ScriptedServer([(502, {}, {"detail": "bad gateway"})] * 3) as server:
        client, sent = counting_client(settings_for(server.base_url, max_retries=2))
        with pytest.raises(UserError, match=r"after 3 attempt\(s\); last: HTTP 502: bad gateway"):
            client.complete(["ping"])
    assert len(sent) == 3


def test_connection_refused_is_retried_then_reported() -> None:
    client, sent = counting_client(settings_for(f"http://127.0.0.1:{free_port()}/v1", max_retries=2))
    with pytest.raises(UserError, match=r"after 3 attempt\(s\); last: ConnectError"):
        client.complete(["ping"])
    assert len(sent) == 3


def test_retry_after_is_honoured() -> None:
    with ScriptedServer([(429, {"Retry-After": "1"}, {"error": {"message": "slow down"}})]) as server:
        client = EndpointClient(settings_for(server.base_url, backoff_s=0.0))
        started = time.monotonic()
        assert client.complete(["ping"]) == ["echo: ping"]
        waited = time.monotonic() - started
    assert waited >= 0.95  # backoff_s=0 would retry at once; the header asked for one second


def test_concurrency_is_bounded_and_order_kept() -> None:
    prompts = [f"p{i}" for i in range(12)]
    with ScriptedServer(delay_s=0.1) as server:
        answers = EndpointClient(settings_for(server.base_url, max_concurrency=3)).complete(prompts)
    assert answers == [f"echo: {p}" for p in prompts]
    assert server.max_in_flight == 3


def test_runs_from_a_worker_thread_and_from_inside_an_event_loop() -> None:
    with ScriptedServer() as server:
        client = EndpointClient(settings_for(server.base_url))
        from_thread: list[list[str]] = []
        worker = threading.Thread(target=lambda: from_thread.append(client.complete(["a"])))
        worker.start()
        worker.join()

        async def caller() -> list[str]:
            return client.complete(["b"])

        assert from_thread == [["echo: a"]] and asyncio.run(caller()) == ["echo: b"]


def test_api_key_comes_from_the_named_variable_and_is_never_shown(monkeypatch: pytest.MonkeyPatch) -> None:
    secret = "sk-test-not-a-real-key-123"
    monkeypatch.setenv("JUDGE_TEST_KEY", secret)
    with ScriptedServer() as server:
        settings = settings_for(server.base_url, api_key_env="JUDGE_TEST_KEY")
        client = EndpointClient(settings)
        client.complete(["ping"])
    assert server.requests[0]["headers"]["Authorization"] == f"Bearer {secret}"
    assert secret not in repr(settings) + repr(client) + settings.model_dump_json()
    monkeypatch.delenv("JUDGE_TEST_KEY")
    with pytest.raises(UserError, match="'JUDGE_TEST_KEY', which is not set"):
        client.complete(["ping"])


def test_pairwise_verdicts_from_both_orders(tmp_path: Path) -> None:
    """The scripted judge prefers a response reading '5' wherever it stands, has a bias for A otherwise,
    and says nothing parseable about greetings."""

    def judge(prompt: str) -> str:
        if "\nhi\n" in prompt:
            return "no idea"
        if "[Response A]\n5\n" in prompt:
            return "A is right. [[A]]"
        return "B is right. [[B]]" if "[Response B]\n5\n" in prompt else "Both fine, A. [[A]]"

    with ScriptedServer(answer=judge) as server:
        client = EndpointClient(settings_for(server.base_url))
        verdicts = judge_pairs_on_endpoint(client, VerdictCache(tmp_path), ["Prefer correct answers."], PAIRS)
    assert verdicts[:2] == ["first", "tie"]  # pair 1: both orders said A, position bias -> tie
    assert isinstance(verdicts[2], JudgeParseError)
    assert len(server.requests) == 2 * len(PAIRS)


def test_answers_before_a_failure_stay_cached(tmp_path: Path) -> None:
    """Prompts go out STORE_EVERY at a time and each batch is stored when it is back, so a run that
    fails in its second batch is resumed by asking only that batch again."""
    prompts = [f"q{i}" for i in range(STORE_EVERY + 10)]

    def refuse_last(prompt: str) -> str | tuple[int, dict[str, str], dict]:
        return (400, {}, {"error": {"message": "too long"}}) if prompt == prompts[-1] else "ok " + prompt

    with ScriptedServer(answer=refuse_last) as server:
        generate = cached_generate(EndpointClient(settings_for(server.base_url)), VerdictCache(tmp_path))
        with pytest.raises(UserError, match="too long"):
            generate(prompts)
    with ScriptedServer() as healed:  # the same model name, served again at another address
        client, sent = counting_client(settings_for(healed.base_url))
        outputs = cached_generate(client, VerdictCache(tmp_path))(prompts)
    assert len(sent) == 10 and outputs[:2] == ["ok q0", "ok q1"] and outputs[-1] == f"echo: {prompts[-1]}"


# --- pure parts: scores, digests, the cache across processes -----------------------------------------


def test_parse_score_normalises_the_last_score_and_rejects_others() -> None:
    scale = ScoreScale(1, 10)
    assert parse_score("first [[score: 2]] then [[ Score : 10 ]]", scale) == 1.0
    assert parse_score("[[score: 1]]", scale) == 0.0
    assert parse_score("[[score: 5.5]]", scale) == pytest.approx(0.5)  # (5.5 - 1) / (10 - 1)
    for bad in ("no score", "[[score: 11]]", "[[score: 0]]", "[[A]]"):
        with pytest.raises(JudgeParseError):
            parse_score(bad, scale)
    with pytest.raises(UserError, match="high"):
        ScoreScale(5, 5)


def test_judge_digest_covers_the_declaration_not_the_address() -> None:
    base = judge_digest("judge-7b", rubric="Be helpful.", scale=ScoreScale(1, 10))
    assert base == judge_digest("judge-7b", rubric="Be helpful.")  # 1-10 is the default scale
    changed = {
        judge_digest("judge-8b", rubric="Be helpful."),
        judge_digest("judge-7b", rubric="Be harmless."),
        judge_digest("judge-7b", rubric="Be helpful.", scale=ScoreScale(1, 5)),
        judge_digest("judge-7b", principles=["Be helpful."]),
    }
    assert base not in changed and len(changed) == 4
    with pytest.raises(UserError):
        judge_digest("judge-7b")


def test_cache_is_shared_safely_by_concurrent_processes(tmp_path: Path) -> None:
    writer = (
        "import sys\nfrom rlhf_core.judging.verdict_cache import VerdictCache\n"
        "cache = VerdictCache(sys.argv[1])\n"
        "for i in range(100):\n"
        "    cache.store('m', None, [f'{sys.argv[2]}-{i}', 'shared'], [f'out-{i}', sys.argv[2]])\n"
    )
    env = os.environ | {"PYTHONPATH": str(REPO_ROOT)}
    workers = [
        subprocess.Popen([sys.executable, "-c", writer, str(tmp_path), name], env=env, stderr=subprocess.PIPE)
        for name in ("left", "right")
    ]
    assert [w.wait(timeout=60) for w in workers] == [0, 0], [w.stderr.read() for w in workers]
    cache = VerdictCache(tmp_path)
    assert len(cache) == 201  # 100 per process and one shared key, stored once
    assert cache.lookup("m", None, ["left-99", "right-0", "shared", "absent"])[:2] == ["out-99", "out-0"]
    assert cache.lookup("m", None, ["shared"])[0] in {"left", "right"}
    assert cache.lookup("other-model", None, ["left-99"]) == [None]
