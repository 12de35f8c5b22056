"""A judge model served behind an OpenAI-compatible endpoint, declared in a spec (LLM-as-a-judge,
book ch.12; a rubric or constitution as the judge's prompt, book ch.13).

One declaration, :class:`EndpointJudgeSpec`, serves three places:

- ``label_preferences.judge_endpoint``: pairwise (both orders, like ``judge_policy``) or pointwise
  (scores, then the stage's pairing rules);
- ``evaluate.win_rate.judges: [{endpoint: {...}}]``: pairwise or pointwise;
- a reward source, ``rewards: [{endpoint: {...}}]``: pointwise only, the score in [0, 1].

What the judge *is* (model, principles or rubric, scale, mode, prompt template) is part of the stage
fingerprint; where it is served and how it is reached (``base_url``, ``api_key_env``, concurrency,
timeout, retries) is not: those fields carry :data:`NOT_FINGERPRINTED_FIELD`, which
:func:`rlhf_core.fingerprint.config_dict` leaves out, so moving the same model to another host re-runs
nothing. The API key itself is never a field: only the name of the environment variable holding it.
"""

from __future__ import annotations

from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import Field, field_validator, model_validator

from rlhf_core.spec.base import Strict

# Marks a field that says where or how a stage reaches something, not what the stage computes.
NOT_FINGERPRINTED_FIELD: dict[str, Any] = {"fingerprinted": False}

# The versions of the judge prompts (rlhf_core.judging): bump with a prompt's wording.
PAIRWISE_TEMPLATE_VERSION = "pairwise-v1"
POINTWISE_TEMPLATE_VERSION = "pointwise-v1"
TEMPLATES = {"pairwise": PAIRWISE_TEMPLATE_VERSION, "pointwise": POINTWISE_TEMPLATE_VERSION}
JudgeMode = Literal["pairwise", "pointwise"]


class ScoreScaleSpec(Strict):
    """The closed range a pointwise judge scores on: ``low`` maps to reward 0, ``high`` to 1."""

    low: int = Field(default=1, description="Worst score the judge may give.")
    high: int = Field(default=10, description="Best score the judge may give.")

    @model_validator(mode="after")
    def _ordered(self) -> ScoreScaleSpec:
        if self.high <= self.low:
            raise ValueError(f"scale.high ({self.high}) must be above scale.low ({self.low})")
        return self


class ChatEndpointSpec(Strict):
    """A model behind an OpenAI-compatible ``/chat/completions`` endpoint (vLLM, TGI, ``transformers
    serve``, a hosted API): where it is served and how it is asked. The API key is never a field: only
    the name of the environment variable holding it. Judges (:class:`EndpointJudgeSpec`), a
    constitutional critic and a rubric's judge are such models; their answers are greedy."""

    base_url: str = Field(
        description="API root, e.g. http://localhost:8000/v1 (not fingerprinted: the same model on another "
        "host gives the same answers).",
        json_schema_extra=NOT_FINGERPRINTED_FIELD,
    )
    model: str = Field(min_length=1, description="Model name the endpoint serves (fingerprinted).")
    api_key_env: str | None = Field(
        default=None,
        description="Name of the environment variable holding the API key (sent as a Bearer token); "
        "null: no key. The key itself never appears in a spec, a log or a fingerprint.",
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


class EndpointJudgeSpec(ChatEndpointSpec):
    """A judge model behind an OpenAI-compatible ``/chat/completions`` endpoint (vLLM, TGI,
    ``transformers serve``, a hosted API). Give ``principles`` for a pairwise judge or a ``rubric``
    for a pointwise one; ``mode`` may be left out and follows from which you gave."""

    name: str | None = Field(
        default=None,
        description="Short name in metric names (eval/win_rate/endpoint:<name>, reward endpoint:<name>); "
        "default: the model name.",
    )
    mode: JudgeMode | None = Field(
        default=None,
        description="pairwise: compare two answers in both orders ([[A]]/[[B]]/[[C]]); pointwise: score "
        "one answer on `scale` ([[score: N]]). Default: pairwise with principles, pointwise with a rubric.",
    )
    principles: tuple[str, ...] | None = Field(
        default=None, min_length=1, description="Pairwise: the rubric or constitution, one principle each."
    )
    rubric: str | None = Field(
        default=None,
        min_length=1,
        description="Pointwise: what a good answer is, as the judge's system turn.",
    )
    scale: ScoreScaleSpec = Field(
        default_factory=ScoreScaleSpec, description="Pointwise: the score range, e.g. {low: 1, high: 10}."
    )
    prompt_template: Literal["pairwise-v1", "pointwise-v1"] | None = Field(
        default=None,
        description="Version of the judge prompt, filled in from the mode (recorded and fingerprinted, so "
        "a reworded prompt re-runs the stage).",
    )
    on_unparseable: Literal["skip", "fail"] = Field(
        default="skip",
        description="An answer without a verdict or score: leave it out and count it, or stop the stage "
        "naming the row.",
    )

    @model_validator(mode="after")
    def _mode_matches_prompt(self) -> EndpointJudgeSpec:
        if self.principles is not None and self.rubric is not None:
            raise ValueError("give principles (pairwise) or a rubric (pointwise), not both")
        inferred = "pairwise" if self.principles is not None else "pointwise" if self.rubric else None
        mode = self.mode or inferred
        if mode is None:
            raise ValueError("give a rubric (pointwise judge) or principles (pairwise judge)")
        if mode == "pairwise" and self.principles is None:
            raise ValueError("mode pairwise needs principles (the rubric as a list, one principle each)")
        if mode == "pointwise" and self.rubric is None:
            raise ValueError("mode pointwise needs a rubric (what a good answer is)")
        if self.prompt_template not in (None, TEMPLATES[mode]):
            raise ValueError(f"prompt_template {self.prompt_template!r} is not the {mode} template")
        object.__setattr__(self, "mode", mode)  # the effective values, shown in plan, MLflow and cards
        object.__setattr__(self, "prompt_template", TEMPLATES[mode])
        return self

    @property
    def judge_name(self) -> str:
        """The judge's key in scores and metric names: ``endpoint:<name or model>``."""
        return f"endpoint:{self.name or self.model}"
