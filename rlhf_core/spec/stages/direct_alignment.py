"""The ``direct_alignment`` stage: DPO and its family on preference data (book ch.8)."""

from __future__ import annotations

import difflib
from typing import ClassVar, Literal

from pydantic import Field, StrictBool, ValidationInfo, field_validator, model_validator

from rlhf_core.losses.direct_alignment_table import DIRECT_ALIGNMENT_TABLE
from rlhf_core.spec.base import StageSpec, Strict
from rlhf_core.spec.monitor import MonitorSpec, check_monitor_proxy
from rlhf_core.spec.references import (
    PolicyModel,
    PreferenceData,
    RefType,
    UnpairedPreferenceData,
    model_output,
)
from rlhf_core.spec.training import LoraSpec, OptimSpec

PREFERENCE_LOSSES = DIRECT_ALIGNMENT_TABLE
"""Loss name -> its declaration (function, reference, pairing, beta, options); the losses' own table."""


def beta_problem(loss: str, beta: float | None) -> str | None:
    """Why ``beta`` may not be given to ``loss`` (None: fine, or the loss is unknown)."""
    declared = PREFERENCE_LOSSES.get(loss)
    if beta is None or declared is None or declared.beta is not None:
        return None
    options = ", ".join(f"loss_options.{name}" for name in declared.options)
    return f"loss '{loss}' takes no beta (its weight is {options}); remove beta"


def loss_option_problems(loss: str, options: dict[str, float | bool]) -> list[str]:
    """Unknown names and out-of-range values in ``loss_options`` for ``loss`` (unknown loss: none)."""
    declared = PREFERENCE_LOSSES.get(loss)
    if declared is None:
        return []
    takes = ", ".join(f"{n} ({o.describe()})" for n, o in declared.options.items()) or "none"
    problems = []
    for name, value in options.items():
        option = declared.options.get(name)
        if name == "beta":
            problems.append(f"{name}: give beta as the stage's own field `beta`, not in loss_options")
        elif option is None:
            close = difflib.get_close_matches(name, declared.options, n=1)
            hint = f"did you mean {close[0]}? " if close else ""
            problems.append(f"{name}: loss '{loss}' has no such option ({hint}it takes: {takes})")
        elif problem := option.problem(value):
            out_of_range = problem.startswith(("must be <", "must be >"))
            wrong = "is out of range" if out_of_range else "is refused"
            problems.append(f"{name}: {_shown(value)} {wrong} for loss '{loss}': {problem}")
    return problems


def _shown(value: object) -> str:
    """A value as the spec file writes it (true / false, 0.5)."""
    if isinstance(value, bool):
        return str(value).lower()
    return f"{value:g}" if isinstance(value, int | float) else repr(value)


def check_beta_of_loss(cls: type, beta: float | None, info: ValidationInfo) -> float | None:
    """Field validator of ``beta`` for a class with a ``loss`` field declared before it."""
    if problem := beta_problem(info.data.get("loss", ""), beta):
        raise ValueError(problem)
    return beta


def check_options_of_loss(
    cls: type, options: dict[str, float | bool], info: ValidationInfo
) -> dict[str, float | bool]:
    """Field validator of ``loss_options`` for a class with a ``loss`` field declared before it; a
    switch given as 1 / 0 (a number-typed field turns true into 1.0) comes back as true / false."""
    loss = info.data.get("loss", "")
    if problems := loss_option_problems(loss, options):
        raise ValueError("\n".join(problems))
    declared = PREFERENCE_LOSSES.get(loss)
    if declared is None:
        return options
    return {name: declared.options[name].accepted(value) for name, value in options.items()}


def resolved_loss_settings(
    loss: str, beta: float | None, options: dict[str, float | bool]
) -> dict[str, object]:
    """``beta`` and ``loss_options`` with the loss's defaults filled in (beta stays None where not taken)."""
    declared = PREFERENCE_LOSSES[loss]
    filled = {name: option.default for name, option in declared.options.items()} | dict(options)
    return {"beta": beta if beta is not None else declared.beta, "loss_options": filled}


class PreferenceTrainSpec(OptimSpec):
    """Direct-alignment hyperparameters (book ch.8; the companion configs use lr 5e-6, 3 epochs)."""

    lr: float = Field(default=5e-6, gt=0, description="Peak learning rate of AdamW (book: 1e-7 to 5e-6).")
    batch_size: int = Field(
        default=8,
        ge=1,
        description=(
            "Preference pairs per micro-batch, as in TRL's DPOTrainer (each pair is two sequences, "
            "chosen and rejected, in one forward pass); unpaired examples for KTO."
        ),
    )
    max_length: int = Field(
        default=512,
        ge=8,
        description=(
            "Longest prompt + completion, in tokens; left out: 512, or the model's position limit "
            "when smaller."
        ),
    )
    on_overlong: Literal["truncate_prompt", "skip", "fail"] = Field(
        default="truncate_prompt",
        description=(
            "A pair longer than max_length: cut its prompt from the left (a pair whose completion alone "
            "is too long is skipped and counted), skip and count it, or stop naming its row."
        ),
    )
    shared_prefix: bool = Field(
        default=True,
        description=(
            "Run the chosen and the rejected completion of a pair in one row that holds the prompt once "
            "(same log-probs, fewer tokens). Needs sdpa or eager attention and a plain LM head; other "
            "models use one padded row per sequence."
        ),
    )


class HeldoutKLSpec(Strict):
    """KL(pi || pi_ref) on held-out prompts, estimated once after training from the policy's samples."""

    prompts: int = Field(default=32, ge=0, description="Held-out prompts sampled (0: no estimate).")
    max_new_tokens: int = Field(default=64, ge=1, description="Tokens sampled per prompt at most.")


class DirectAlignmentStage(StageSpec):
    """Preference optimisation against a frozen reference: DPO, cDPO, IPO, length-normalized DPO,
    SimPO, ORPO, KTO, APO-zero/down and DPO+NLL (book ch.8)."""

    kind: Literal["direct_alignment"]
    policy: PolicyModel = Field(description="Policy to optimise (usually the SFT model).")
    data: PreferenceData | None = Field(
        default=None,
        description=(
            "Preference dataset (prompt, chosen, rejected), e.g. prefs.preferences. For kto each pair "
            "gives one desirable (chosen) and one undesirable (rejected) example."
        ),
    )
    unpaired_data: UnpairedPreferenceData | None = Field(
        default=None,
        description="Or, for kto: an unpaired_preference dataset (prompt, completion, desirable label).",
    )
    reference: PolicyModel | None = Field(
        default=None,
        description=(
            "Reference model pi_ref; default: the policy's starting weights. Reference-free losses "
            "(simpo, orpo) load none. Its log-probs are computed once and cached."
        ),
    )
    loss: str = Field(default="dpo", description=f"One of: {', '.join(PREFERENCE_LOSSES)}.")
    beta: float | None = Field(
        default=None,
        gt=0,
        description=(
            "beta of the loss; default: the loss's own (0.1; 2.0 for dpo_norm, simpo); orpo takes none."
        ),
    )
    loss_options: dict[str, float | StrictBool] = Field(
        default_factory=dict,
        description=(
            "Other hyperparameters of the loss by name, e.g. {label_smoothing: 0.1} (cdpo), "
            "{alpha: 1.0} (dpo_nll), {gamma_beta_ratio: 0.5} (simpo), {odds_ratio_weight: 0.1} (orpo), "
            "{average_log_probs: true} (ipo on per-token averaged log-ratios; default false, summed), "
            "{desirable_weight: 1.0, undesirable_weight: 1.33} (kto); names and ranges are checked when the "
            "spec is read, and the loss's defaults fill the options not given."
        ),
    )
    train: PreferenceTrainSpec = Field(default_factory=PreferenceTrainSpec, description="Training settings.")
    heldout_kl: HeldoutKLSpec = Field(
        default_factory=HeldoutKLSpec,
        description="KL to the reference estimated from samples on the eval prompts (k1, temperature 1).",
    )
    lora: LoraSpec | None = Field(default=None, description="Train LoRA adapters instead of all weights.")
    monitor: MonitorSpec | None = Field(
        default=None,
        description=(
            "Over-optimization monitor: a proxy and a gold reward of the policy's answers vs KL on held-out "
            "prompts (default: the eval split of the preference data's prompts)."
        ),
    )
    register_as: str | None = Field(
        default=None, description="Registered model name; default '<pipeline>-<stage>'."
    )

    outputs: ClassVar[dict[str, RefType]] = {"model": model_output("policy")}
    trains_in_processes: ClassVar[bool] = True

    def processes_problem(self) -> str | None:
        if self.monitor is not None and self.compute is not None and self.compute.processes > 1:
            return "the over-optimization monitor runs in one process; remove the monitor or set it to 1"
        return super().processes_problem()

    _loss_takes_beta = field_validator("beta")(check_beta_of_loss)
    _loss_takes_options = field_validator("loss_options")(check_options_of_loss)

    @model_validator(mode="after")
    def _known_loss(self) -> DirectAlignmentStage:
        check_monitor_proxy(self.monitor, "direct_alignment")
        if self.loss not in PREFERENCE_LOSSES:
            raise ValueError(f"unknown loss '{self.loss}' (known: {', '.join(PREFERENCE_LOSSES)})")
        if self.reference is not None and not PREFERENCE_LOSSES[self.loss].needs_reference:
            raise ValueError(f"loss '{self.loss}' is reference-free: remove `reference`")
        if (self.data is None) == (self.unpaired_data is None):
            raise ValueError("give exactly one of `data` (preference pairs) or `unpaired_data` (for kto)")
        if self.unpaired_data is not None and PREFERENCE_LOSSES[self.loss].paired:
            raise ValueError(
                f"loss '{self.loss}' needs preference pairs (`data`); only kto takes `unpaired_data`"
            )
        return self

    @property
    def needs_reference(self) -> bool:
        return PREFERENCE_LOSSES[self.loss].needs_reference

    def resolved(self) -> DirectAlignmentStage:
        """This stage with the loss's beta and option defaults filled in (see ``rlhf_core.spec``)."""
        return self.model_copy(update=resolved_loss_settings(self.loss, self.beta, self.loss_options))
