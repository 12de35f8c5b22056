"""Constitutional AI, supervised part (book ch.12, Bai et al. 2022): the ``constitutional_revision`` stage.

Per prompt x the policy answers y^0; then, n times, a principle c_i is drawn from the constitution and the
critic (the policy itself, another policy model, or a model behind an OpenAI-compatible endpoint)
critiques the latest answer under c_i and revises it into y^{i+1}. The stage keeps (x, y^n) as SFT data,
with the chain (principles, critiques, revisions) in extra columns, and (x, chosen y^n, rejected y^0) as
preference data. The constitution is part of the stage config, so editing a principle re-runs the stage.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import Field, field_validator, model_validator

from rlhf_core.spec.base import StageSpec, Strict, check_split_fractions
from rlhf_core.spec.decoding import SamplingSpec
from rlhf_core.spec.endpoints import ChatEndpointSpec
from rlhf_core.spec.references import PolicyModel, PromptsData, RefType, dataset_output

# The requests a principle given as plain text gets (our wording, after the critique/revision request
# pairs of Bai et al. 2022, appendix). Bump the version with the wording: it is in the stage config.
CRITIQUE_TEMPLATE = (
    "Identify specific ways in which the last response does not follow this principle: {principle}"
)
REVISION_TEMPLATE = (
    "Rewrite the response so that it follows this principle: {principle} "
    "Reply with the rewritten response only."
)
REVISION_PROMPT_VERSION = "critique-revision-v1"


class ConstitutionPrinciple(Strict):
    """One principle c of the constitution, as Bai et al. 2022 write them: a critique request and a
    revision request. A plain string in the spec is the ``principle`` text, the two requests filled in
    from the templates above (the filled-in values are what runs and is fingerprinted)."""

    principle: str | None = Field(default=None, min_length=1, description="The principle in a few words.")
    critique_request: str = Field(min_length=1, description="Asks the critic what is wrong under c.")
    revision_request: str = Field(min_length=1, description="Asks the critic to rewrite the answer under c.")

    @model_validator(mode="before")
    @classmethod
    def _from_text(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = {"principle": value}
        if isinstance(value, dict) and value.get("principle") and len(value) == 1:
            text = value["principle"]
            return {
                "principle": text,
                "critique_request": CRITIQUE_TEMPLATE.format(principle=text),
                "revision_request": REVISION_TEMPLATE.format(principle=text),
            }
        return value


class ConstitutionalRevisionStage(StageSpec):
    """Critique-and-revise data from a constitution (Constitutional AI's supervised part, book ch.12):
    SFT rows (x, y^n) with their chain, and preference rows (x, y^n over y^0)."""

    kind: Literal["constitutional_revision"]
    policy: PolicyModel = Field(description="Policy model that writes the first answers y^0.")
    prompts: PromptsData = Field(description="Prompts dataset reference, e.g. data.prompts.")
    split: str = Field(default="train", description="Split of the prompts dataset to use.")
    max_prompts: int | None = Field(default=None, ge=1, description="Use at most this many prompts.")
    constitution: tuple[ConstitutionPrinciple, ...] = Field(
        description="The principles: each a string, or {principle?, critique_request, revision_request}."
    )
    revisions: int = Field(default=2, description="n: critique-revision rounds per prompt, each under a "
                           "principle drawn (seeded, with replacement) from the constitution.")  # fmt: skip
    critic: PolicyModel | None = Field(
        default=None, description="Policy model that critiques and revises; default: the policy itself."
    )
    critic_endpoint: ChatEndpointSpec | None = Field(
        default=None, description="Or: a critic model behind an OpenAI-compatible endpoint (greedy)."
    )
    generation: SamplingSpec = Field(
        default_factory=SamplingSpec,
        description="Decoding of the first answers, and of critiques and revisions by a policy critic.",
    )
    on_error: Literal["skip", "fail"] = Field(
        default="skip",
        description="An empty revision: drop the prompt and count it, or stop naming the row.",
    )
    prompt_version: Literal["critique-revision-v1"] = Field(
        default=REVISION_PROMPT_VERSION,
        description="Version of the critique and revision prompts (fingerprinted: rewording re-runs).",
    )
    splits: dict[str, float] = Field(
        default_factory=lambda: {"train": 0.9, "eval": 0.1},
        description="Split name -> fraction of prompts; a prompt's SFT and preference rows share a split.",
    )

    outputs: ClassVar[dict[str, RefType]] = {
        "sft": dataset_output("sft"),
        "preferences": dataset_output("preference"),
    }

    @field_validator("constitution")
    @classmethod
    def _not_empty(cls, constitution: tuple) -> tuple:
        if not constitution:
            raise ValueError("the constitution is empty; give at least one principle")
        return constitution

    @field_validator("revisions")
    @classmethod
    def _at_least_one(cls, n: int) -> int:
        if n < 1:
            raise ValueError(f"revisions is {n}; give at least 1 critique-revision round")
        return n

    @model_validator(mode="after")
    def _one_critic(self) -> ConstitutionalRevisionStage:
        if self.critic is not None and self.critic_endpoint is not None:
            raise ValueError("give critic (a policy model) or critic_endpoint, not both")
        check_split_fractions(self.splits)
        return self
