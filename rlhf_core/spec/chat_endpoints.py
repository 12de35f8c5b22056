"""A model behind an OpenAI-compatible chat endpoint that writes text for a stage: a critic that revises
(``constitutional_revision``) or a judge that checks rubric items (``rubric`` reward sources).

What the model is (its name, its longest answer) is fingerprinted; where it is served and how it is
reached are not (:data:`~rlhf_core.spec.endpoints.NOT_FINGERPRINTED_FIELD`), as for endpoint judges.
Answers are greedy (temperature 0) and kept in the home's verdict cache.
"""

from __future__ import annotations

from urllib.parse import urlsplit

from pydantic import Field, field_validator

from rlhf_core.spec.base import Strict
from rlhf_core.spec.endpoints import NOT_FINGERPRINTED_FIELD


class ChatEndpointSpec(Strict):
    """Where a chat model is served and how it is asked. The API key is never a field: only the name of
    the environment variable holding it."""

    base_url: str = Field(
        description="API root, e.g. http://localhost:8000/v1 (not fingerprinted).",
        json_schema_extra=NOT_FINGERPRINTED_FIELD,
    )
    model: str = Field(min_length=1, description="Model name the endpoint serves (fingerprinted).")
    api_key_env: str | None = Field(
        default=None,
        description="Environment variable holding the API key (sent as a Bearer token); null: no key.",
        json_schema_extra=NOT_FINGERPRINTED_FIELD,
    )
    max_tokens: int = Field(default=512, ge=1, description="Longest answer, in tokens.")
    max_concurrency: int = Field(
        default=8, ge=1, description="Requests in flight at once.", json_schema_extra=NOT_FINGERPRINTED_FIELD
    )
    timeout_s: float = Field(
        default=120.0, gt=0, description="Seconds per request.", json_schema_extra=NOT_FINGERPRINTED_FIELD
    )
    max_retries: int = Field(
        default=5,
        ge=0,
        description="Retries of a transient failure (connection, timeout, 429, 5xx) per request.",
        json_schema_extra=NOT_FINGERPRINTED_FIELD,
    )

    @field_validator("base_url")
    @classmethod
    def _http_url(cls, url: str) -> str:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ValueError(
                f"base_url {url!r} is not an http(s) URL; expected e.g. http://localhost:8000/v1"
            )
        return url
