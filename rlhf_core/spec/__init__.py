"""The pipeline spec: one YAML file declares models, stages and the references between them.

Stages name their inputs by referring to other stages (``sft.model: base``, ``sft.data: data.sft``);
those references form the DAG. Everything is validated before anything runs: unknown fields, wrong
types, names, unknown references, references of the wrong type, cycles, position limits, missing
local paths, duplicate YAML keys. Errors name the stage and the field path (see ``SpecError``).

Written and effective values. A validated ``PipelineSpec`` holds what the file wrote: a default that
follows another field (a loss's beta and options, an algorithm's clip range, aggregation and KL
estimator, a ``max_length`` that follows the model's position limit) is ``None`` or its plain default,
and pydantic's ``model_fields_set`` says what was written. ``PipelineSpec.resolved(position_limits)``
(``loading.resolve_spec`` finds the limits) is the effective spec: every such default filled in. The
flow and ``rlhf plan`` resolve once, after overrides and profiles; the resolved spec is what runs,
what ``resolved_spec.yaml``, the MLflow params, the model card and the fingerprints record, and what
``rlhf plan`` lists ("defaults in effect"). Checks run on the written spec, against effective values,
so an error can say a value was written. Whatever dumps a spec to validate it again dumps what was
written (``model_dump(exclude_unset=True)``: deployment parameters, ``apply_spec_overrides``), so
overriding ``loss: ipo`` on a DPO spec gives IPO's default beta; a resolved spec validates as
written (``rlhf reproduce``) and resolves to itself.

Layout: ``base`` (the StageSpec base class that registers kinds), ``references`` (typed reference
fields), ``local_paths`` (fields naming local files), ``models`` (base models), shared settings
(``training``, ``decoding``, ``reward_sources``), ``stages/`` (one module per family of stage kinds),
``pipeline`` (the DAG and its checks) and ``loading`` (YAML, overrides, error wording).
"""

from rlhf_core.spec.base import NAME_PATTERN, STAGE_CLASSES, SpecError, StageSpec, Strict
from rlhf_core.spec.decoding import DecodingEngine, GenerationSpec, SamplingSpec
from rlhf_core.spec.loading import apply_override, load_spec, parse_spec, read_yaml
from rlhf_core.spec.models import ModelSource, TinyModelSource
from rlhf_core.spec.pipeline import STAGE_KINDS, PipelineSpec, Stage, lineage_root, ref_type
from rlhf_core.spec.references import RefType, parse_ref, reference_fields, resolve_ref
from rlhf_core.spec.reward_sources import RewardSourceSpec
from rlhf_core.spec.stages.data import DatasetStage, DataSourceChoice, FileSource, HubSource, SyntheticSource
from rlhf_core.spec.stages.evaluation import BestOfNSpec, EvaluateStage
from rlhf_core.spec.stages.reward_model import RewardModelStage, RewardTrainSpec
from rlhf_core.spec.stages.sampling import (
    LabelPreferencesStage,
    PolicyJudgeSpec,
    RejectionSamplingStage,
    SampleStage,
)
from rlhf_core.spec.stages.supervised import SFTStage, SFTTrainSpec
from rlhf_core.spec.training import LoraSpec, OptimSpec

__all__ = [
    "NAME_PATTERN",
    "STAGE_CLASSES",
    "STAGE_KINDS",
    "BestOfNSpec",
    "DataSourceChoice",
    "DatasetStage",
    "DecodingEngine",
    "EvaluateStage",
    "FileSource",
    "GenerationSpec",
    "HubSource",
    "LabelPreferencesStage",
    "LoraSpec",
    "ModelSource",
    "OptimSpec",
    "PipelineSpec",
    "PolicyJudgeSpec",
    "RefType",
    "RejectionSamplingStage",
    "RewardModelStage",
    "RewardSourceSpec",
    "RewardTrainSpec",
    "SFTStage",
    "SFTTrainSpec",
    "SampleStage",
    "SamplingSpec",
    "SpecError",
    "Stage",
    "StageSpec",
    "Strict",
    "SyntheticSource",
    "TinyModelSource",
    "apply_override",
    "lineage_root",
    "load_spec",
    "parse_ref",
    "parse_spec",
    "read_yaml",
    "ref_type",
    "reference_fields",
    "resolve_ref",
]
