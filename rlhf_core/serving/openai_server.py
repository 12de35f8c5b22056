"""A native OpenAI-compatible HTTP server around one causal LM loaded in this process.

It answers what a chat client or an LLM judge (book ch.12) asks of an OpenAI endpoint:

- ``GET /health``: 200 once the model is loaded;
- ``GET /v1/models``: the one served model, under the name it is served as;
- ``POST /v1/completions``: ``prompt`` is text, token ids, or a batch of either;
- ``POST /v1/chat/completions``: ``messages`` rendered with the tokenizer's chat template, exactly as
  the generating stages render prompts (``rlhf_core.rollout.generation.chat_prompt``).

Decoding is the project's own KV-cached loop (``decode_batch``), so a greedy answer equals what
``generate`` gives in-process. The ``n`` choices of a request are drawn from one ``torch.Generator``
seeded with the request's ``seed`` (a random one without it), so a seed reproduces its answer. A choice
ends at the tokenizer's EOS (``finish_reason`` "stop") or after ``max_tokens`` ("length"); ``usage``
counts prompt tokens once per prompt and every generated token, EOS included. One request decodes at a
time: tiny and CPU models gain nothing from interleaving, and the lock keeps seeded answers exact.
Errors use OpenAI's shape ``{"error": {"message", "type", "param", "code"}}``.
"""

from __future__ import annotations

import secrets
import socket
import threading
import time
import uuid
from collections.abc import Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from rlhf_core.modeling.models import load_model
from rlhf_core.modeling.modes import eval_mode
from rlhf_core.rollout.generation import chat_prompt, decode_batch
from rlhf_core.serving.openai_schemas import (
    ChatRequest,
    CompletionRequest,
    RequestError,
    SamplingFields,
    parse_request,
)

COMPLETION_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
UNBOUNDED_DEFAULT = 256  # chat max_tokens for a model whose config states no context length
ROUTES = "GET /health, GET /v1/models, POST /v1/completions, POST /v1/chat/completions"


@dataclass
class ServedModel:
    """The model, its tokenizer, the name clients call it by, and the lock that serialises decoding."""

    name: str
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    created: int = field(default_factory=lambda: int(time.time()))
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def context_length(self) -> int | None:
        return getattr(self.model.config, "max_position_embeddings", None)


def load_served_model(source: str, name: str, *, revision: str | None = None) -> ServedModel:
    """Load a local checkpoint directory or hub model (fp32, eval mode) to be served as ``name``."""
    model, tokenizer = load_model(source, revision=revision)
    model.eval()
    return ServedModel(name=name, model=model, tokenizer=tokenizer)


@dataclass(frozen=True)
class Choice:
    token_ids: list[int]  # generated ids, EOS included when the choice stopped there
    text: str
    finish_reason: str  # "stop" at EOS, "length" at max_tokens


def sample_choices(
    served: ServedModel, prompts: list[list[int]], request: SamplingFields, max_tokens: int
) -> list[Choice]:
    """``request.n`` choices per tokenized prompt, prompt-major, decoded together under the lock."""
    tokenizer = served.tokenizer
    seed = request.seed if request.seed is not None else secrets.randbits(31)
    with served.lock, torch.no_grad(), eval_mode(served.model):
        generator = torch.Generator(device=served.model.device).manual_seed(seed)
        rows = decode_batch(
            served.model, prompts, request.n, max_tokens, request.temperature, request.top_p,
            tokenizer.eos_token_id, tokenizer.pad_token_id, generator,
        )  # fmt: skip
    return [
        Choice(ids, tokenizer.decode(ids, skip_special_tokens=True), _finish_reason(ids, tokenizer))
        for ids in rows
    ]


def _finish_reason(ids: list[int], tokenizer: PreTrainedTokenizerBase) -> str:
    return "stop" if ids and ids[-1] == tokenizer.eos_token_id else "length"


def completion_prompts(served: ServedModel, request: CompletionRequest) -> list[list[int]]:
    """Token ids of each prompt: text is tokenized as the tokenizer does by default (its special tokens
    included); ids are checked against the vocabulary."""
    vocab = len(served.tokenizer)
    batch = request.prompt_list()
    if not batch:
        raise RequestError("/v1/completions: field 'prompt' is empty", "prompt")
    prompts = []
    for i, prompt in enumerate(batch):
        where = "prompt" if batch == [request.prompt] else f"prompt[{i}]"
        ids = served.tokenizer(prompt)["input_ids"] if isinstance(prompt, str) else list(prompt)
        if not ids:
            raise RequestError(f"/v1/completions: field '{where}' is empty", where)
        bad = [t for t in ids if not 0 <= t < vocab]
        if bad:
            raise RequestError(
                f"/v1/completions: field '{where}': token id {bad[0]} is outside the vocabulary "
                f"(0..{vocab - 1})",
                where,
            )
        prompts.append(ids)
    return prompts


def chat_prompts(served: ServedModel, request: ChatRequest) -> list[list[int]]:
    """The conversation rendered with the chat template and its generation header, then tokenized."""
    text = chat_prompt(served.tokenizer, request.conversation())
    return [served.tokenizer(text, add_special_tokens=False)["input_ids"]]


def token_budget(
    served: ServedModel, prompts: list[list[int]], asked: int | None, default: int | None, route: str
) -> int:
    """``max_tokens`` as asked, else the default, else the rest of the context; 400 when it cannot fit."""
    longest = max(len(p) for p in prompts)
    context = served.context_length
    if context is not None and longest >= context:
        raise RequestError(
            f"{route}: the prompt has {longest} tokens, but this model's context is {context} tokens; "
            "shorten the prompt",
            "messages" if "chat" in route else "prompt",
        )
    if asked is None:  # a config without a position limit (rare): a bounded default all the same
        asked = default if default is not None else (context - longest if context else UNBOUNDED_DEFAULT)
    if context is not None and longest + asked > context:
        raise RequestError(
            f"{route}: this model's context is {context} tokens, but the prompt has {longest} and "
            f"max_tokens asks for {asked} more; lower max_tokens to at most {max(context - longest, 0)}",
            "max_tokens",
        )
    return asked


def check_model_name(served: ServedModel, request: SamplingFields) -> None:
    if request.model is not None and request.model != served.name:
        raise RequestError(
            f"field 'model': {request.model!r} is not served here; this server serves {served.name!r}",
            "model",
            status=404,
        )


def _usage(prompts: list[list[int]], choices: list[Choice]) -> dict[str, int]:
    prompt_tokens = sum(len(p) for p in prompts)
    completion_tokens = sum(len(c.token_ids) for c in choices)
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def answer_completion(served: ServedModel, body: Any) -> dict[str, Any]:
    """The answer to a ``/v1/completions`` body (a RequestError when it cannot be answered)."""
    request = parse_request(CompletionRequest, body, "/v1/completions")
    check_model_name(served, request)
    prompts = completion_prompts(served, request)
    budget = token_budget(
        served, prompts, request.max_tokens, COMPLETION_DEFAULT_MAX_TOKENS, "/v1/completions"
    )
    choices = sample_choices(served, prompts, request, budget)
    return {
        "id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
        "model": served.name,
        "choices": [
            {"index": i, "text": c.text, "logprobs": None, "finish_reason": c.finish_reason}
            for i, c in enumerate(choices)
        ],
        "usage": _usage(prompts, choices),
    }  # fmt: skip


def answer_chat(served: ServedModel, body: Any) -> dict[str, Any]:
    """The answer to a ``/v1/chat/completions`` body (a RequestError when it cannot be answered)."""
    request = parse_request(ChatRequest, body, "/v1/chat/completions")
    check_model_name(served, request)
    prompts = chat_prompts(served, request)
    budget = token_budget(served, prompts, request.max_tokens, None, "/v1/chat/completions")
    choices = sample_choices(served, prompts, request, budget)
    return {
        "id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
        "model": served.name,
        "choices": [
            {"index": i, "message": {"role": "assistant", "content": c.text}, "logprobs": None,
             "finish_reason": c.finish_reason}
            for i, c in enumerate(choices)
        ],
        "usage": _usage(prompts, choices),
    }  # fmt: skip


def create_app(served: ServedModel, on_ready: Callable[[], None] | None = None) -> FastAPI:
    """The FastAPI app serving ``served``; ``on_ready`` runs once the server starts up."""

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        if on_ready is not None:
            on_ready()
        yield

    app = FastAPI(title=f"rlhf serve: {served.name}", lifespan=lifespan, docs_url=None, redoc_url=None)

    @app.exception_handler(RequestError)
    async def request_error(_: Request, exc: RequestError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:  # unknown route or method
        message = f"{request.method} {request.url.path}: {exc.detail}; this server answers {ROUTES}"
        return JSONResponse(RequestError(message, status=exc.status_code).body(), exc.status_code)

    @app.get("/health")
    def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/v1/models")
    def models() -> dict[str, Any]:
        entry = {"id": served.name, "object": "model", "created": served.created, "owned_by": "rlhf"}
        return {"object": "list", "data": [entry]}

    # Decoding runs in the server's thread pool (the event loop keeps answering /health); the model's
    # lock lets one request decode at a time.
    @app.post("/v1/completions")
    async def completions(request: Request) -> dict[str, Any]:
        return await run_in_threadpool(answer_completion, served, await _json_body(request))

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> dict[str, Any]:
        return await run_in_threadpool(answer_chat, served, await _json_body(request))

    return app


async def _json_body(request: Request) -> Any:
    """The request body as decoded JSON, whatever its shape (checking it is ``parse_request``'s job)."""
    try:
        return await request.json()
    except ValueError as exc:
        raise RequestError(f"{request.url.path}: the request body is not valid JSON ({exc})") from None


def serve_forever(
    served: ServedModel, sock: socket.socket, on_ready: Callable[[], None] | None = None
) -> None:
    """Serve on a bound socket until SIGINT or SIGTERM (uvicorn's own handlers stop it gracefully)."""
    import uvicorn

    config = uvicorn.Config(create_app(served, on_ready), log_level="warning", access_log=False)
    uvicorn.Server(config).run(sockets=[sock])
