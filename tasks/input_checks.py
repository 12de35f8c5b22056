"""Pre-run checks shared by stage kinds: a stage's resolved inputs must fit together before any MLflow
stage run is opened (``runtime.stage_tasks.stage_task(..., check=...)``)."""

from __future__ import annotations

from rlhf_core.errors import UserError
from rlhf_core.refs import DatasetRef, ModelRef
from runtime.stage_contract import StageCall


def check_split(call: StageCall, dataset: DatasetRef, split: str, field: str = "split") -> None:
    """UserError naming the stage and ``field`` when ``dataset`` has no split ``split``."""
    if split not in dataset.splits:
        raise UserError(
            f"stage '{call.name}', field {field}: '{split}' is not a split of "
            f"{dataset.stage}.{dataset.kind} (it has: {', '.join(dataset.splits)})"
        )


def check_reference_tokenizer(call: StageCall, reference: ModelRef | None, policy: ModelRef) -> None:
    """UserError when the reference model (field ``reference``) tokenizes unlike the policy (field
    ``policy``): the log-probs of one text under the two would not be of the same tokens."""
    if reference is not None and reference.tokenizer_digest != policy.tokenizer_digest:
        raise UserError(
            f"stage '{call.name}', field reference: '{call.stage.reference}' has another tokenizer or chat "
            f"template than the policy '{call.stage.policy}'; log-probs of the same text would not compare"
        )
