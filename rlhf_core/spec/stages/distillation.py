"""The ``distill`` stage: offline token-level knowledge distillation from a teacher into a student
(book ch.12, "distillation").

The student reads the data's completions with teacher forcing ("supervised KD"), and at every
completion token its next-token distribution is pulled toward the teacher's by a divergence
(``rlhf_core.losses.distillation``): forward KL (word-level KD of Kim & Rush up to the teacher's
entropy), reverse KL, or GKD's generalized JSD. Sequence-level KD (SFT on the teacher's own samples) is
a chain of existing stages instead: ``sample`` with the teacher, ``rejection_sampling``, ``sft``; and
the ``data`` of this stage may be such a chain's output, to distil token by token on teacher samples.
"""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field, model_validator

from rlhf_core.losses.distillation_table import DEFAULT_JSD_BETA, DEFAULT_TOP_K, Divergence
from rlhf_core.spec.base import StageSpec
from rlhf_core.spec.references import PolicyModel, RefType, SFTData, model_output
from rlhf_core.spec.stages.supervised import SFTTrainSpec
from rlhf_core.spec.training import LoraSpec


class DistillTrainSpec(SFTTrainSpec):
    """Distillation hyperparameters: the sft stage's (tokenization, masking, packing, optimizer)."""

    eval_rows: int = Field(
        default=64,
        ge=0,
        description=(
            "Rows of the data's eval split (when it has one) on which the student's mean per-token "
            "divergence to the teacher is measured before and after training (0: not measured)."
        ),
    )


class DistillStage(StageSpec):
    """Token-level knowledge distillation of ``teacher`` into ``student`` on the completions of ``data``.

    Teacher and student must share a tokenizer (the student's token ids read as the same tokens by the
    teacher, the same special tokens): checked when the spec is read where the base models tell, and on
    the tokenizers when the stage starts, before any training.
    """

    kind: Literal["distill"]
    student: PolicyModel = Field(description="Model to train: a `models:` entry or a model-producing stage.")
    teacher: PolicyModel = Field(
        description="Frozen model whose next-token distributions the student learns (eval mode, no gradient)."
    )
    data: SFTData = Field(
        description=(
            "SFT dataset whose completions (assistant turns) both models read, e.g. data.sft or the "
            "sft output of a rejection_sampling stage over teacher samples."
        )
    )
    loss: Divergence = Field(
        default="forward_kl",
        description=(
            "Divergence per completion token: forward_kl = KL(teacher || student) (word-level KD up to the "
            "teacher entropy), reverse_kl = KL(student || teacher), jsd = GKD's generalized JSD(beta)."
        ),
    )
    beta: float | None = Field(
        default=None,
        ge=0,
        le=1,
        description=(
            f"jsd only: the mixture weight of the teacher, M = beta T + (1 - beta) S; 0 gives forward "
            f"KL, 1 reverse KL; left out: {DEFAULT_JSD_BETA}."
        ),
    )
    temperature: float = Field(
        default=1.0, gt=0, description="Both models' logits are divided by it before the softmax."
    )
    top_k: int | None = Field(
        default=None,
        ge=1,
        description=(
            "Keep only the teacher's k likeliest tokens plus one tail bucket (the book's companion uses "
            f"{DEFAULT_TOP_K}); null: the full vocabulary."
        ),
    )
    sft_weight: float = Field(
        default=0.0,
        ge=0,
        description="Weight of the usual NLL of the data's completion tokens added to the distillation loss.",
    )
    train: DistillTrainSpec = Field(default_factory=DistillTrainSpec, description="Training settings.")
    lora: LoraSpec | None = Field(default=None, description="Train LoRA adapters instead of all weights.")
    register_as: str | None = Field(
        default=None, description="Registered model name; default '<pipeline>-<stage>'."
    )

    outputs: ClassVar[dict[str, RefType]] = {"model": model_output("policy")}

    def shared_tokenizer_refs(self) -> dict[str, tuple[str, str]]:
        return {"teacher": (self.student, self.teacher)}

    @model_validator(mode="after")
    def _consistent_options(self) -> DistillStage:
        if self.beta is not None and self.loss != "jsd":
            raise ValueError(f"beta: only loss jsd takes beta (loss is {self.loss}); remove beta")
        if self.student == self.teacher:
            raise ValueError(
                f"teacher: '{self.teacher}' is also the student; the divergence of a model to itself is 0 "
                "and nothing would train"
            )
        return self

    def resolved(self) -> DistillStage:
        """This stage with jsd's default beta filled in (see ``rlhf_core.spec``)."""
        if self.loss == "jsd" and self.beta is None:
            return self.model_copy(update={"beta": DEFAULT_JSD_BETA})
        return self
