"""The requests ``rlhf serve`` accepts: the subset of OpenAI's completions and chat completions APIs it
honours, and the 400 message a request gets when it asks for anything else.

Honoured: ``model``, ``max_tokens``, ``temperature`` (0 = greedy), ``top_p``, ``n``, ``seed``, and the
prompt (``prompt`` for completions: a string, token ids, or a list of either; ``messages`` for chat).
Some OpenAI fields are accepted only at the value that changes nothing (``stream: false``, ``stop:
null``, penalties of 0, ...): clients often send them filled in with their defaults, and quietly
ignoring a real value would hand back text the client did not ask for. Any other field is an error
naming it and listing the fields there are.
"""

from __future__ import annotations

from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

MAX_SAMPLES = 128  # n: one request decodes its n samples in one batch

# field -> the values that change nothing; any other value is refused with the reason given
NEUTRAL_ONLY: dict[str, tuple[tuple[Any, ...], str]] = {
    "stream": ((False, None), "streaming is not supported; send false or leave it out"),
    "stream_options": ((None,), "streaming is not supported; leave it out"),
    "stop": ((None, [], ""), "stop sequences are not supported (generation stops at the model's EOS)"),
    "presence_penalty": ((0, None), "penalties are not supported; send 0 or leave it out"),
    "frequency_penalty": ((0, None), "penalties are not supported; send 0 or leave it out"),
    "logit_bias": ((None, {}), "logit_bias is not supported; leave it out"),
    "logprobs": ((None, False), "log-probabilities are not returned; leave it out"),
    "top_logprobs": ((None, 0), "log-probabilities are not returned; leave it out"),
    "echo": ((None, False), "echo is not supported; send false or leave it out"),
    "best_of": ((None, 1), "best_of is not supported; use n"),
    "suffix": ((None, ""), "suffix is not supported; leave it out"),
}
IGNORED = ("user",)  # OpenAI's end-user id: metadata only, accepted and not used


class RequestError(ValueError):
    """A request this server cannot answer as asked: an HTTP 400 (or ``status``) in OpenAI's error shape."""

    def __init__(self, message: str, param: str | None = None, status: int = 400) -> None:
        super().__init__(message)
        self.param, self.status = param, status

    def body(self) -> dict[str, Any]:
        kind = "invalid_request_error" if self.status == 400 else "not_found_error"
        return {"error": {"message": str(self), "type": kind, "param": self.param, "code": None}}


class SamplingFields(BaseModel):
    """Fields both endpoints share. Defaults are OpenAI's, except ``max_tokens`` (see each endpoint)."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = Field(default=None, description="The served model's name; left out: that model.")
    max_tokens: int | None = Field(default=None, ge=1, description="Most new tokens per choice.")
    temperature: float = Field(default=1.0, ge=0, le=2, description="Softmax temperature; 0 is greedy.")
    top_p: float = Field(default=1.0, gt=0, le=1, description="Nucleus sampling mass.")
    n: int = Field(default=1, ge=1, le=MAX_SAMPLES, description="Choices per prompt.")
    seed: int | None = Field(
        default=None,
        ge=0,
        le=2**64 - 1,  # what torch.Generator.manual_seed takes
        description="Seed of the sampling generator; the same seed gives the same choices.",
    )


class CompletionRequest(SamplingFields):
    """``POST /v1/completions``; ``max_tokens`` defaults to 16, as in OpenAI's API."""

    prompt: str | list[int] | list[str] | list[list[int]] = Field(
        description="Text, token ids, or a batch of either."
    )

    def prompt_list(self) -> list[str | list[int]]:
        """The prompts as a batch: a single text or token-id list becomes a batch of one."""
        if isinstance(self.prompt, str) or (self.prompt and isinstance(self.prompt[0], int)):
            return [self.prompt]
        return list(self.prompt)


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = None  # OpenAI's participant name: accepted, not rendered

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatRequest(SamplingFields):
    """``POST /v1/chat/completions``; without ``max_tokens`` a choice may run to the end of the context."""

    messages: list[ChatMessage] = Field(min_length=1, description="The conversation so far.")

    def conversation(self) -> list[dict[str, str]]:
        return [{"role": m.role, "content": m.text()} for m in self.messages]


Request = TypeVar("Request", bound=SamplingFields)


def parse_request(kind: type[Request], body: Any, route: str) -> Request:
    """``body`` (decoded JSON) as a ``kind`` request, or a RequestError naming the first bad field."""
    if not isinstance(body, dict):
        raise RequestError(f"{route}: the request body must be a JSON object, got {type(body).__name__}")
    fields = dict(body)
    for name in IGNORED:
        fields.pop(name, None)
    for name, (neutral, reason) in NEUTRAL_ONLY.items():
        if name in fields:
            value = fields.pop(name)
            if value not in neutral:  # by ==, so 0.0 counts as 0
                raise RequestError(f"{route}: field '{name}' = {value!r}: {reason}", name)
    try:
        return kind.model_validate(fields)
    except ValidationError as exc:
        raise _first_problem(exc, kind, route) from None


def _first_problem(exc: ValidationError, kind: type[SamplingFields], route: str) -> RequestError:
    """The first validation error as one sentence: which field, what was wrong, what is accepted."""
    error = exc.errors(include_url=False)[0]
    param = _dotted(error["loc"])
    if error["type"] == "extra_forbidden":
        known = ", ".join([*kind.model_fields, *NEUTRAL_ONLY, *IGNORED])
        return RequestError(f"{route}: unknown field '{param}'; the fields are: {known}", param)
    if error["type"] == "missing":
        return RequestError(f"{route}: field '{param}' is required", param)
    given = f" (got {error['input']!r})" if "input" in error else ""
    return RequestError(f"{route}: field '{param}': {error['msg']}{given}", param)


def _dotted(loc: tuple[int | str, ...]) -> str:
    """``('messages', 0, 'content')`` -> ``messages[0].content``; union branch names are left out."""
    text = ""
    for part in loc:
        if isinstance(part, int):
            text += f"[{part}]"
        elif "[" in part or part.startswith(("list", "str", "int")):  # pydantic names union branches
            continue
        else:
            text += f".{part}" if text else part
    return text
