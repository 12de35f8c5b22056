"""The ``evaluate`` stage: candidates compared with a baseline on held-out data, every figure with a
bootstrap interval: held-out NLL, verifiable accuracy, pass@k, reward-source means, win rates against
the baseline, KL to a reference, response lengths, best-of-N, and a table of samples."""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import Field, ValidationInfo, field_validator, model_validator

from rlhf_core.errors import UserError
from rlhf_core.rewards.scorers import check_scorer
from rlhf_core.spec.base import StageSpec, Strict
from rlhf_core.spec.decoding import GenerationSpec, SamplingSpec
from rlhf_core.spec.endpoints import EndpointJudgeSpec
from rlhf_core.spec.engines import VLLMSpec
from rlhf_core.spec.environments import EnvironmentSpec
from rlhf_core.spec.function_references import RewardFunctionName
from rlhf_core.spec.references import REPORT, PolicyModel, PromptsData, RefType, RewardModel, SFTData
from rlhf_core.spec.reward_sources import RewardSourceSpec
from rlhf_core.spec.stages.sampling import PolicyJudgeSpec


class BestOfNSpec(Strict):
    """Best-of-N evaluation: N samples per prompt, answer with the one the reward sources rank first."""

    n: int = Field(default=8, ge=2, description="Completions sampled per prompt.")
    rewards: tuple[RewardSourceSpec, ...] = Field(
        min_length=1, description="Reward sources that rank the N samples (weighted sum)."
    )
    generation: SamplingSpec = Field(default_factory=SamplingSpec, description="Sampling settings.")
    curve: bool = Field(
        default=False,
        description="Also report the best-of-N curve: proxy (the rewards) and gold reward of the pick for "
        "N = 1, 2, 4, ..., n, each estimated without bias from the same n samples "
        "(eval/best_of_n/proxy_at_<N>, gold_at_<N>), and plot it (best_of_n_curve.png).",
    )
    gold: tuple[RewardSourceSpec, ...] = Field(
        default=(),
        description="The curve's gold reward sources (weighted sum), e.g. a held-out reward model or a "
        "reward function; left out: the stage's verifier (1 for a correct answer).",
    )

    @model_validator(mode="after")
    def _gold_for_the_curve(self) -> BestOfNSpec:
        if self.gold and not self.curve:
            raise ValueError("best_of_n.gold is the curve's gold reward: set curve: true, or remove gold")
        return self

    def curve_sizes(self) -> tuple[int, ...]:
        """The N of the curve: the powers of two below n, then n."""
        return (*(2**i for i in range(self.n.bit_length()) if 2**i < self.n), self.n)


class PassAtKSpec(Strict):
    """Unbiased pass@k (Chen et al. 2021): n samples per prompt, c of them verified correct."""

    n: int = Field(default=8, ge=1, description="Completions sampled per prompt.")
    k: tuple[int, ...] = Field(
        default=(1,), min_length=1, description="The k of each pass@k reported (each 1 <= k <= n)."
    )
    generation: SamplingSpec = Field(
        default_factory=SamplingSpec, description="Sampling settings (pass@k needs temperature > 0)."
    )

    @model_validator(mode="after")
    def _k_within_n(self) -> PassAtKSpec:
        too_large = [k for k in self.k if k > self.n]
        if too_large or min(self.k) < 1:
            bad = too_large[0] if too_large else min(self.k)
            raise ValueError(
                f"pass_at_k.k: k={bad} is not within 1..pass_at_k.n={self.n}; the unbiased estimate of "
                "pass@k needs at least k samples per prompt (raise n or drop that k)"
            )
        return self


class WinRateJudgeSpec(Strict):
    """One judge of the pairwise comparison with the baseline; give exactly one of function, model,
    verifier, policy or endpoint."""

    function: RewardFunctionName | None = Field(
        default=None,
        description="A reward function (built-in, or yours as 'rewards.py:score'): the higher score wins.",
    )
    options: dict[str, Any] = Field(default_factory=dict, description="Options of the function.")
    model: RewardModel | None = Field(
        default=None, description="Reward-model reference (a reward_model stage): the higher score wins."
    )
    verifier: bool = Field(
        default=False,
        description="The stage's verifier: a correct answer beats a wrong one; both right or both wrong tie.",
    )
    policy: PolicyJudgeSpec | None = Field(
        default=None,
        description="A policy judging against a rubric (principles), asked in both orders; disagreement "
        "between the orders is a tie.",
    )
    endpoint: EndpointJudgeSpec | None = Field(
        default=None,
        description="A judge model behind an OpenAI-compatible endpoint: pairwise (principles, both "
        "orders) or pointwise (a rubric: the higher score wins).",
    )
    tie_margin: float = Field(
        default=0.0,
        ge=0,
        description="Reward and pointwise endpoint judges: scores closer than this (|difference| <= margin) "
        "tie.",
    )

    @model_validator(mode="after")
    def _exactly_one(self) -> WinRateJudgeSpec:
        given = [f for f in ("function", "model", "policy", "endpoint") if getattr(self, f) is not None]
        given += ["verifier"] * self.verifier
        if len(given) != 1:
            raise ValueError(
                "a win-rate judge is exactly one of function, model, verifier, policy or endpoint"
                + (f" (got {', '.join(given)})" if given else "")
            )
        if self.options and self.function is None:
            raise ValueError("options are for a function judge")
        pointwise = self.endpoint is not None and self.endpoint.mode == "pointwise"
        if self.tie_margin and self.reward_source() is None and not pointwise:
            raise ValueError(
                "tie_margin applies to reward judges (function or model) and pointwise endpoints only"
            )
        return self

    @property
    def name(self) -> str:
        """The judge's name in metric names: the reward source's name, ``verifier``, ``policy:<model>``
        or ``endpoint:<name or model>``."""
        if self.verifier:
            return "verifier"
        if self.endpoint is not None:
            return self.endpoint.judge_name
        if self.policy is not None:
            return f"policy:{self.policy.model}"
        source = self.reward_source()
        assert source is not None
        return source.name

    def reward_source(self) -> RewardSourceSpec | None:
        """The judge as a reward source (function or reward model); None for the verifier, a policy and
        an endpoint."""
        if self.function is None and self.model is None:
            return None
        return RewardSourceSpec(function=self.function, model=self.model, options=self.options)


def _verifier_shorthand_schema(schema: dict[str, Any]) -> None:
    """The JSON schema accepts the plain string ``verifier`` as a judge, as validation does."""
    schema["items"] = {"anyOf": [schema["items"], {"const": "verifier", "type": "string"}]}
    schema["minItems"] = 1


class WinRateSpec(Strict):
    """Pairwise comparison of each candidate's answer with the baseline's answer to the same prompt."""

    judges: tuple[WinRateJudgeSpec, ...] = Field(
        description="Judges, each reported on its own (eval/win_rate/<judge>): reward functions or reward "
        "models ({function: ...} / {model: ...}), `verifier`, {policy: {model, principles}}, or "
        "{endpoint: {base_url, model, principles or rubric}}.",
        json_schema_extra=_verifier_shorthand_schema,
    )

    @field_validator("judges", mode="before")
    @classmethod
    def _verifier_shorthand(cls, judges: Any) -> Any:
        if not isinstance(judges, list | tuple):
            return judges
        for judge in judges:
            if isinstance(judge, str) and judge != "verifier":
                raise ValueError(
                    f"unknown judge {judge!r}: give `verifier`, {{function: ...}}, {{model: ...}}, "
                    "{policy: {model: ..., principles: [...]}} or {endpoint: {base_url: ..., model: ...}}"
                )
        return tuple({"verifier": True} if j == "verifier" else j for j in judges)

    @model_validator(mode="after")
    def _distinct_judges(self) -> WinRateSpec:
        if not self.judges:
            raise ValueError("win_rate.judges: give at least one judge")
        names = [j.name for j in self.judges]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise ValueError(f"win_rate.judges: judge {twice[0]!r} is given twice")
        return self


class KLEstimateSpec(Strict):
    """Samples for the KL to the reference, drawn from each candidate at temperature 1."""

    samples_per_prompt: int = Field(default=4, ge=1, description="Completions sampled per prompt.")
    max_new_tokens: int = Field(
        default=32, ge=1, description="Tokens per completion at most (the KL of the first tokens)."
    )
    batch_size: int = Field(default=64, ge=1, description="Sequences decoded or scored together.")


class EvaluateStage(StageSpec):
    """Held-out NLL, verifiable accuracy, pass@k, reward means, win rates vs a baseline, KL to a reference,
    response lengths and a table of sample generations; every figure with a bootstrap interval."""

    kind: Literal["evaluate"]
    models: tuple[PolicyModel, ...] = Field(
        min_length=1, description="Models to evaluate (stages or `models:` entries)."
    )
    data: SFTData | None = Field(
        default=None, description="SFT dataset whose eval split gives loss/perplexity."
    )
    prompts: PromptsData | None = Field(
        default=None, description="Prompts dataset with answers for accuracy."
    )
    verifier: RewardFunctionName = Field(
        default="arithmetic_exact",
        description="The check of a correct answer: a built-in verifier (arithmetic_exact, math_answer, "
        "code_tests, ...) or your own function ('rewards.py:correct') giving 1 for a correct answer, else 0.",
    )
    verifier_options: dict[str, Any] = Field(
        default_factory=dict, description="Options of the verifier (a built-in's defaults filled in)."
    )
    max_prompts: int = Field(default=200, ge=1, description="Evaluate on at most this many prompts.")
    samples_in_table: int = Field(default=8, ge=0, description="Generations shown in the samples table.")
    max_length: int = Field(
        default=512,
        ge=8,
        description=(
            "Longest eval conversation (tokens) for the loss; left out: 512, or the model's position limit "
            "when smaller."
        ),
    )
    generation: GenerationSpec = Field(default_factory=GenerationSpec, description="Decoding settings.")
    rewards: tuple[RewardSourceSpec, ...] = Field(
        default=(),
        description=(
            "Reward sources (reward models, functions) that also score each model's completions of the "
            "prompts: their mean is reported per source (eval/reward/<source>), e.g. to see whether RL "
            "raised a reward model's score and whether the verifier agrees."
        ),
    )
    best_of_n: BestOfNSpec | None = Field(
        default=None,
        description="Also report best-of-N accuracy (needs prompts): pass@1, best-of-N and pass@N.",
    )

    pass_at_k: PassAtKSpec | None = Field(
        default=None,
        description="Also report unbiased pass@k (needs prompts): n samples per prompt, checked by the "
        "verifier; e.g. {n: 8, k: [1, 4, 8]}.",
    )
    baseline: PolicyModel | None = Field(
        default=None,
        description="One of `models`: every other model is compared with it (win rates) and, unless "
        "`reference` is given, the KL is measured to it.",
    )
    reference: PolicyModel | None = Field(
        default=None,
        description="Reference policy of eval/kl_to_reference (default: the baseline); any policy model.",
    )
    win_rate: WinRateSpec | None = Field(
        default=None,
        description="Pairwise win rates of each candidate against the baseline (needs baseline and "
        "prompts), one per judge.",
    )
    environment: EnvironmentSpec | None = Field(
        default=None,
        description="Answer the prompts in multi-turn episodes with this environment (tools, verifier "
        "feedback, ...): accuracy is task success, pass_at_k adds pass^k, and tool use is measured.",
    )
    kl: KLEstimateSpec | None = Field(
        default_factory=KLEstimateSpec,
        description="Sampling for eval/kl_to_reference, reported when a reference (or baseline) and "
        "prompts are given; null turns it off.",
    )

    outputs: ClassVar[dict[str, RefType]] = {"report": REPORT}

    @field_validator("baseline")
    @classmethod
    def _baseline_among_models(cls, baseline: str | None, info: ValidationInfo) -> str | None:
        models = info.data.get("models")
        if baseline is not None and models is not None and baseline not in models:
            raise ValueError(
                f"baseline '{baseline}' is not one of models ({', '.join(models)}); the baseline is "
                "evaluated with the candidates, so list it under models too"
            )
        return baseline

    @property
    def kl_reference(self) -> str | None:
        """The model the KL is measured to: ``reference``, else the baseline (None: no KL)."""
        return self.reference or self.baseline

    def measured_figures(self, model: str) -> dict[str, bool]:
        """Figure name (without ``eval/``) -> whether it comes with an interval (``<name>_ci_low``,
        ``_ci_high``, ``_n``), for every figure this stage reports for ``model`` (one of ``models``).
        Kept with ``rlhf_core.evaluation``, which produces them; a promote gate is checked against it."""
        figures: dict[str, bool] = {}
        if self.data is not None:
            figures |= {"nll": True, "loss": False, "perplexity": False, "tokens": False}
        if self.prompts is not None:
            figures |= {"accuracy": True, "length/mean": True, "length/p50": True, "length/p90": True}
            figures |= {f"reward/{source.name}": True for source in self.rewards}
            if self.pass_at_k is not None:
                figures |= {f"pass_at_{k}": True for k in self.pass_at_k.k}
                if self.environment is not None:
                    figures |= {f"pass_hat_{k}": True for k in self.pass_at_k.k}
            if self.environment is not None:
                figures |= {"episode/turns": True, "tool_call_validity": False, "tool_call_match": True}
            if self.kl is not None and self.kl_reference is not None:
                figures["kl_to_reference"] = True
            if self.win_rate is not None and model != self.baseline:
                for judge in self.win_rate.judges:
                    figures |= {f"win_rate/{judge.name}": True, f"tie_rate/{judge.name}": True}
                    if judge.policy is not None or judge.endpoint is not None:  # judge models only
                        figures[f"judge_unparseable/{judge.name}"] = False
        if self.best_of_n is not None:
            names = ("accuracy", "pass_at_1", "pass_at_n", "selected_reward_mean", "prompts")
            figures |= {f"best_of_n/{name}": False for name in names}
            for size in self.best_of_n.curve_sizes() if self.best_of_n.curve else ():
                figures |= {f"best_of_n/proxy_at_{size}": False, f"best_of_n/gold_at_{size}": False}
        return figures

    def generating_parts(self) -> dict[str, GenerationSpec | SamplingSpec]:
        """Field path -> decoding settings of each part that generates from the evaluated model: the
        answers (accuracy), pass@k and best-of-N. The KL part samples with the native loop (it needs the
        model's own forward for the log-probs), so it is not one of them."""
        parts: dict[str, GenerationSpec | SamplingSpec] = {"generation": self.generation}
        if self.pass_at_k is not None:
            parts["pass_at_k.generation"] = self.pass_at_k.generation
        if self.best_of_n is not None:
            parts["best_of_n.generation"] = self.best_of_n.generation
        return parts

    def vllm_settings(self) -> VLLMSpec | None:
        """The settings of the one vLLM engine the stage starts per model for all its parts with
        ``engine: vllm`` (None: no part uses it): the ``vllm`` block one of them gives (they must agree,
        see ``_one_vllm_block``), else the defaults. A part that gives none runs with this one."""
        using = [part for part in self.generating_parts().values() if part.engine == "vllm"]
        if not using:
            return None
        given = [part.vllm for part in using if "vllm" in part.model_fields_set]
        return given[0] if given else using[0].vllm

    @model_validator(mode="after")
    def _one_vllm_block(self) -> EvaluateStage:
        """One engine serves every part of a model (a start costs ~25 s on a CPU), so the ``vllm``
        blocks of the parts using it must not disagree."""
        given = {
            path: part.vllm
            for path, part in self.generating_parts().items()
            if part.engine == "vllm" and "vllm" in part.model_fields_set
        }
        first = next(iter(given), None)
        for path, settings in given.items():
            if settings != given[first]:
                raise ValueError(
                    f"{path}.vllm differs from {first}.vllm: the stage starts one vLLM engine per model "
                    "for all its parts with engine: vllm, so give the vllm block once (the other parts "
                    "use it) or the same in each"
                )
        return self

    @model_validator(mode="after")
    def _needs_something_to_measure(self) -> EvaluateStage:
        if self.data is None and self.prompts is None:
            raise ValueError("give `data` (for loss/perplexity), `prompts` (for accuracy), or both")
        if self.rewards and self.prompts is None:
            raise ValueError("rewards score the models' completions of the prompts: give prompts")
        if self.best_of_n is not None and self.prompts is None:
            raise ValueError("best_of_n needs `prompts` (a prompts dataset with answers to verify)")
        if self.environment is not None and (self.prompts is None or self.best_of_n is not None):
            raise ValueError(
                "environment: episodes answer the prompts (give `prompts`); best_of_n over episodes is not "
                "built yet (remove best_of_n)"
            )
        if self.pass_at_k is not None and self.prompts is None:
            raise ValueError("pass_at_k needs `prompts` (a prompts dataset with answers to verify)")
        if self.win_rate is not None and self.baseline is None:
            raise ValueError(
                "win_rate compares each model with the baseline: give `baseline` (one of models)"
            )
        if self.win_rate is not None and self.prompts is None:
            raise ValueError("win_rate compares the models' answers to the prompts: give `prompts`")
        if self.win_rate is not None and len(set(self.models)) < 2:
            raise ValueError("win_rate needs a candidate besides the baseline in `models`")
        try:
            filled = check_scorer(self.verifier, self.verifier_options, verifier=True)
        except UserError as exc:
            raise ValueError(f"verifier: {exc}") from None
        object.__setattr__(self, "verifier_options", filled)
        return self
