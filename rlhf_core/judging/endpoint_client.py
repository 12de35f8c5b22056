"""A client for a judge model behind an OpenAI-compatible chat endpoint (LLM-as-a-judge, book ch.12).

``EndpointClient.complete(prompts)`` sends one ``POST {base_url}/chat/completions`` per prompt, at most
``max_concurrency`` at a time, and returns the answers in the order of the prompts. It is synchronous
to its caller (stages are plain functions) and runs its own event loop, in a fresh thread when the
calling thread already runs one.

Transient failures (connection errors, timeouts, HTTP 408, 409, 429 and 5xx) are retried with
exponential backoff and full jitter, honouring ``Retry-After``; any other answer stops at once with a
``UserError`` naming the endpoint, the model, the status and the server's own message. The API key is
read from the environment variable the settings name, at request time, and is never kept on an object.
"""

from __future__ import annotations

import asyncio
import email.utils
import os
import random
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
from pydantic import BaseModel, ConfigDict, Field

from rlhf_core.errors import UserError

TRANSIENT_STATUS = frozenset({408, 409, 429})  # and every 5xx
TRANSIENT_ERRORS = (httpx.TimeoutException, httpx.NetworkError, httpx.RemoteProtocolError)
MAX_RETRY_AFTER_S = 120.0  # a server asking for a longer pause is treated as down
SERVER_MESSAGE_CHARS = 300


class EndpointSettings(BaseModel):
    """Where the judge model is served and how it is asked. The key's value is never a field."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    base_url: str = Field(description="OpenAI-compatible API root, e.g. http://host:8000/v1")
    model: str = Field(description="model name the endpoint serves (part of verdict caches and digests)")
    api_key_env: str | None = Field(
        default=None, description="name of the environment variable holding the API key; None: no key"
    )
    timeout_s: float = Field(default=120.0, gt=0, description="seconds per HTTP request")
    max_concurrency: int = Field(default=8, ge=1, description="requests in flight at once")
    max_retries: int = Field(default=5, ge=0, description="retries of a transient failure per prompt")
    backoff_s: float = Field(
        default=1.0, ge=0, description="first retry's mean delay; doubles with each retry (full jitter)"
    )
    max_backoff_s: float = Field(default=30.0, ge=0, description="cap on one backoff delay")
    temperature: float = Field(default=0.0, ge=0, description="sampling temperature; 0 asks for greedy")
    max_tokens: int = Field(default=512, ge=1, description="longest answer, in tokens")

    @property
    def chat_url(self) -> str:
        return self.base_url.rstrip("/") + "/chat/completions"

    def describe(self) -> str:
        """'endpoint URL (model NAME)' for error messages."""
        return f"judge endpoint {self.chat_url} (model {self.model!r})"


EventHooks = dict[str, list[Callable[..., Any]]]


class EndpointClient:
    """Chat completions from one endpoint and model; see the module docstring for retries and errors.

    ``event_hooks`` are handed to ``httpx.AsyncClient`` (async callables), e.g. to count requests.
    """

    def __init__(self, settings: EndpointSettings, *, event_hooks: EventHooks | None = None) -> None:
        self.settings = settings
        self._event_hooks = event_hooks or {}

    def __repr__(self) -> str:
        return f"EndpointClient({self.settings.base_url!r}, model={self.settings.model!r})"

    def complete(self, prompts: list[str], system: str | None = None) -> list[str]:
        """The answer to each prompt (a user turn after an optional ``system`` turn), in order."""
        if not prompts:
            return []
        run = lambda: asyncio.run(self._complete_all(prompts, system))  # noqa: E731
        try:
            asyncio.get_running_loop()
        except RuntimeError:  # no loop in this thread (main or worker thread): run one here
            return run()
        with ThreadPoolExecutor(max_workers=1) as pool:  # a loop already runs here: use another thread
            return pool.submit(run).result()

    async def _complete_all(self, prompts: list[str], system: str | None) -> list[str]:
        limit = asyncio.Semaphore(self.settings.max_concurrency)
        limits = httpx.Limits(max_connections=self.settings.max_concurrency)
        async with httpx.AsyncClient(
            timeout=self.settings.timeout_s, limits=limits, event_hooks=self._event_hooks
        ) as http:

            async def one(prompt: str) -> str:
                async with limit:
                    return await self._complete_one(http, prompt, system)

            return list(await asyncio.gather(*(one(p) for p in prompts)))

    async def _complete_one(self, http: httpx.AsyncClient, prompt: str, system: str | None) -> str:
        messages = ([{"role": "system", "content": system}] if system is not None else []) + [
            {"role": "user", "content": prompt}
        ]
        body = {
            "model": self.settings.model,
            "messages": messages,
            "temperature": self.settings.temperature,
            "max_tokens": self.settings.max_tokens,
        }
        for attempt in range(self.settings.max_retries + 1):
            last_try = attempt == self.settings.max_retries
            try:
                response = await http.post(self.settings.chat_url, json=body, headers=self._headers())
            except TRANSIENT_ERRORS as exc:
                if last_try:
                    raise self._gave_up(f"{type(exc).__name__}: {exc}") from exc
                await asyncio.sleep(self._backoff(attempt, None))
                continue
            except httpx.HTTPError as exc:  # a bad URL or protocol: retrying cannot help
                raise UserError(f"{self.settings.describe()}: {type(exc).__name__}: {exc}") from exc
            if response.status_code < 400:
                return self._answer_text(response)
            if not _is_transient(response.status_code):
                raise UserError(
                    f"{self.settings.describe()} answered HTTP {response.status_code}: "
                    f"{_server_message(response)}"
                )
            if last_try:
                raise self._gave_up(f"HTTP {response.status_code}: {_server_message(response)}")
            await asyncio.sleep(self._backoff(attempt, response.headers.get("retry-after")))
        raise AssertionError("unreachable: the last attempt returns or raises")

    def _headers(self) -> dict[str, str]:
        name = self.settings.api_key_env
        if name is None:
            return {}
        key = os.environ.get(name)
        if not key:
            raise UserError(
                f"{self.settings.describe()}: api_key_env names the environment variable {name!r}, "
                "which is not set; export the key there or set api_key_env to null for no key"
            )
        return {"Authorization": f"Bearer {key}"}

    def _backoff(self, attempt: int, retry_after: str | None) -> float:
        """Seconds before retry ``attempt + 1``: the server's Retry-After if it gave one, else full jitter
        over ``backoff_s * 2**attempt`` (capped), so that many clients do not retry in step."""
        asked = _retry_after_seconds(retry_after)
        if asked is not None:
            return min(asked, MAX_RETRY_AFTER_S)
        return random.uniform(0, min(self.settings.max_backoff_s, self.settings.backoff_s * 2**attempt))

    def _gave_up(self, last: str) -> UserError:
        tries = self.settings.max_retries + 1
        last = last[:SERVER_MESSAGE_CHARS]
        return UserError(f"{self.settings.describe()} still failing after {tries} attempt(s); last: {last}")

    def _answer_text(self, response: httpx.Response) -> str:
        try:
            content = response.json()["choices"][0]["message"]["content"]
        except (ValueError, KeyError, IndexError, TypeError) as exc:
            raise UserError(
                f"{self.settings.describe()}: the answer is not a chat completion "
                f"(expected choices[0].message.content): {response.text[:SERVER_MESSAGE_CHARS]!r}"
            ) from exc
        return content or ""


def _is_transient(status: int) -> bool:
    return status in TRANSIENT_STATUS or status >= 500


def _server_message(response: httpx.Response) -> str:
    """The server's own words: OpenAI's ``error.message``, FastAPI's ``detail``, or the raw body."""
    try:
        payload = response.json()
    except ValueError:
        return response.text[:SERVER_MESSAGE_CHARS]
    if isinstance(payload, dict):
        error = payload.get("error")
        if isinstance(error, dict) and "message" in error:
            return str(error["message"])[:SERVER_MESSAGE_CHARS]
        if "detail" in payload:
            return str(payload["detail"])[:SERVER_MESSAGE_CHARS]
    return response.text[:SERVER_MESSAGE_CHARS]


def _retry_after_seconds(value: str | None) -> float | None:
    """Retry-After as seconds: a number of seconds or an HTTP date; None when absent or unreadable."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())
