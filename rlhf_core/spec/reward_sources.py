"""Reward sources in a spec: a reward function (built-in or the user's own), a reward-model stage, or a
judge model behind an OpenAI-compatible endpoint scoring each completion on a rubric."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from rlhf_core.errors import UserError
from rlhf_core.rewards.scorers import check_scorer
from rlhf_core.rewards.token_aggregation import OUTCOME_AGGREGATIONS, PROCESS_AGGREGATIONS, SCORING_OPTIONS
from rlhf_core.rewards.user_functions import is_reference, parse_reference
from rlhf_core.spec.base import Strict
from rlhf_core.spec.endpoints import EndpointJudgeSpec
from rlhf_core.spec.function_references import RewardFunctionName
from rlhf_core.spec.references import RewardModel
from rlhf_core.spec.rubrics import RubricSpec


class RewardSourceSpec(Strict):
    """One scorer of completions: a reward function, a reward-model stage or an endpoint judge, with a
    weight."""

    function: RewardFunctionName | None = Field(
        default=None,
        description="A built-in (arithmetic_exact, math_answer, code_tests, ...) or your own function: "
        "'rewards.py:score' (a file next to the spec) or 'my_pkg.rewards:score'. It gets the completion "
        "and the prompt row (every column) and returns a float (or is batched: lists).",
    )
    model: RewardModel | None = Field(
        default=None, description="Reward-model reference (a reward_model stage)."
    )
    endpoint: EndpointJudgeSpec | None = Field(
        default=None,
        description="A judge model behind an OpenAI-compatible endpoint scoring each completion by a "
        "rubric (pointwise); its score on `scale` is mapped to [0, 1].",
    )
    rubric: RubricSpec | None = Field(
        default=None,
        description="Per-prompt rubric items (a prompt column) checked one by one by a judge endpoint; "
        "the reward is the weighted share of items satisfied (book ch.12).",
    )
    options: dict[str, Any] = Field(
        default_factory=dict,
        description="Options of the function: a built-in's documented options (defaults filled in), or "
        "keyword arguments of your function. For an outcome or process reward model: how its per-token "
        "or per-step probabilities become one score, {aggregation: ..., last_m: m}; ORM: last_m (mean of "
        "the last m tokens, m = 1 by default), mean, min, product; PRM: min (default), mean, product, "
        "weighted (step i of K weighs i), last.",
    )
    on_error: Literal["fail", "zero"] = Field(
        default="fail",
        description="A function that raises on a row: fail the stage naming the row, or score the row 0 "
        "and count it (metric <source>/errors).",
    )
    weight: float = Field(default=1.0, description="Weight w_s in the composite sum_s w_s * r_s(x, y).")

    @model_validator(mode="after")
    def _exactly_one(self) -> RewardSourceSpec:
        given = [f for f in ("function", "model", "endpoint", "rubric") if getattr(self, f) is not None]
        if len(given) != 1:
            raise ValueError(
                "give exactly one of function, model, endpoint or rubric"
                + (f" (got {', '.join(given)})" if given else "")
            )
        if self.endpoint is not None and self.endpoint.mode != "pointwise":
            raise ValueError(
                "endpoint: a reward scores each completion alone; give a rubric (mode pointwise), "
                "not principles"
            )
        if self.model is not None:
            _check_model_options(self.options)
            return self
        if self.function is None:
            if self.options:
                raise ValueError(
                    "options are for a function or a reward model; an endpoint or a rubric takes none"
                )
            return self
        try:
            filled = check_scorer(self.function, self.options)
        except UserError as exc:
            raise ValueError(str(exc)) from None
        object.__setattr__(self, "options", filled)  # the effective options, defaults included
        return self

    @property
    def name(self) -> str:
        """The source's key in scores and metric names: the built-in's name, ``rewards.py:fn`` for a
        user's file, ``module:fn`` for a module, ``rm:<stage>`` for a reward model (``rm:<stage>:<how>``
        with scoring options, e.g. ``rm:prm:mean``), ``endpoint:<name>`` for an endpoint judge (its
        ``name``, else its model), ``rubric:<name>`` for a rubric (its ``name``, else its judge's model)."""
        if self.rubric is not None:
            return self.rubric.source_name
        if self.endpoint is not None:
            return self.endpoint.judge_name
        if self.function is None:
            return f"rm:{self.model}{_aggregation_suffix(self.options)}"
        return parse_reference(self.function).short if is_reference(self.function) else self.function


def _aggregation_suffix(options: dict[str, Any]) -> str:
    """How a reward model's source name tells its scoring options apart: ``rm:prm:mean``,
    ``rm:orm:last_4``; none: ``rm:prm`` (the model's default). Two sources on one model with other options
    are two sources (two scores, two metric names), never one silently scored with the other's options."""
    if not options:
        return ""
    aggregation = options.get("aggregation", "last_m")  # last_m alone: an ORM's default aggregation
    return f":last_{options.get('last_m', 1)}" if aggregation == "last_m" else f":{aggregation}"


def _check_model_options(options: dict[str, Any]) -> None:
    """A reward model's scoring options: known keys and values. Whether the model's kind takes them is
    known once it is trained: a Bradley-Terry model given any fails at load time, naming the source."""
    unknown = sorted(set(options) - set(SCORING_OPTIONS))
    if unknown:
        raise ValueError(f"options {unknown} are not a reward model's; it takes {list(SCORING_OPTIONS)}")
    known = list(dict.fromkeys(OUTCOME_AGGREGATIONS + PROCESS_AGGREGATIONS))
    aggregation = options.get("aggregation")
    if aggregation is not None and aggregation not in known:
        raise ValueError(f"options.aggregation {aggregation!r} is not one of {known}")
    if "last_m" in options:
        last_m = options["last_m"]
        if type(last_m) is not int or last_m < 1:
            raise ValueError(f"options.last_m: a whole number of tokens >= 1, got {last_m!r}")
        if aggregation not in (None, "last_m"):  # left out: an ORM's default, last_m
            raise ValueError("options.last_m goes with aggregation: last_m")
