"""The pipeline spec: one YAML file declares models, stages and the references between them.

Stages name their inputs by referring to other stages (``sft.model: base``, ``sft.data: data.sft``);
those references form the DAG. Everything is validated before anything runs: unknown fields, wrong
types, unknown references, references of the wrong type, cycles. Errors name the stage and the
field path (see ``SpecError``).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from rlhf_core.rewards import REWARD_FUNCTIONS

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_-]*$"


class SpecError(ValueError):
    """A spec problem; ``problems`` holds one line per problem, each naming stage and field."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("invalid pipeline spec:\n" + "\n".join(f"  - {p}" for p in problems))


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# --------------------------------------------------------------------------- models


class TinyModelSource(Strict):
    """A random-init decoder built from a config, with a tokenizer trained locally (offline quickstart)."""

    arch: Literal["llama"] = Field(default="llama", description="Decoder architecture of the config.")
    hidden_size: int = Field(default=128, ge=8, description="Width of the residual stream.")
    layers: int = Field(default=2, ge=1, description="Number of transformer blocks.")
    heads: int = Field(default=4, ge=1, description="Attention heads (hidden_size must divide by it).")
    intermediate_size: int | None = Field(default=None, description="MLP width; default 4 * hidden_size.")
    vocab_size: int = Field(default=512, ge=300, description="Size of the locally trained BPE vocabulary.")
    max_position_embeddings: int = Field(
        default=512, ge=16, description="Longest sequence the model accepts."
    )
    tokenizer_corpus: Literal["arithmetic"] = Field(
        default="arithmetic", description="Synthetic corpus the local tokenizer is trained on."
    )

    @model_validator(mode="after")
    def _heads_divide_width(self) -> TinyModelSource:
        if self.hidden_size % self.heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by heads {self.heads}")
        return self


class ModelSource(Strict):
    """Where a base model comes from: exactly one of ``tiny``, ``path`` or ``hub``.

    The tokenizer's own chat template is used; a tokenizer without one gets ChatML.
    """

    tiny: TinyModelSource | None = Field(default=None, description="Build a tiny random-init model.")
    path: str | None = Field(default=None, description="Local directory saved with save_pretrained.")
    hub: str | None = Field(default=None, description="Hugging Face hub name, e.g. Qwen/Qwen2.5-0.5B.")
    revision: str | None = Field(default=None, description="Hub revision (branch, tag or commit).")

    @model_validator(mode="after")
    def _exactly_one_source(self) -> ModelSource:
        chosen = [k for k in ("tiny", "path", "hub") if getattr(self, k) is not None]
        if len(chosen) != 1:
            raise ValueError(f"give exactly one of tiny, path or hub (got {chosen or 'none'})")
        return self

    @property
    def kind(self) -> str:
        return "tiny" if self.tiny else "path" if self.path else "hub"


# --------------------------------------------------------------------------- data sources


class SyntheticSource(Strict):
    """A deterministic synthetic task with a verifiable answer; emits sft, preferences and prompts."""

    task: Literal["arithmetic"] = Field(default="arithmetic", description="Name of the synthetic task.")
    n: int = Field(default=2000, ge=2, description="Number of problems generated.")
    max_operand: int = Field(default=20, ge=1, description="Largest operand of a problem.")
    operations: tuple[Literal["+", "-", "*"], ...] = Field(default=("+", "-"), description="Operators used.")


class FileSource(Strict):
    """Rows from a local JSONL, JSON or Parquet file (or a datasets save_to_disk directory)."""

    path: str = Field(description="Path of the file, relative to the spec file's directory or absolute.")
    format: Literal["sft", "preference", "prompts"] = Field(description="Record schema of the rows.")
    columns: dict[str, str] = Field(
        default_factory=dict,
        description="Our column name -> the file's column name, e.g. {prompt: question}.",
    )


class HubSource(Strict):
    """Rows from a Hugging Face hub dataset through ``datasets.load_dataset``."""

    hub: str = Field(description="Dataset name on the hub.")
    config: str | None = Field(default=None, description="Dataset configuration name.")
    split: str = Field(default="train", description="Split to read.")
    revision: str | None = Field(default=None, description="Dataset revision.")
    format: Literal["sft", "preference", "prompts"] = Field(description="Record schema of the rows.")
    columns: dict[str, str] = Field(default_factory=dict, description="Our column name -> their column name.")
    limit: int | None = Field(default=None, ge=1, description="Read at most this many rows.")


class DataSourceChoice(Strict):
    """Exactly one of ``synthetic``, ``file`` or ``hub``."""

    synthetic: SyntheticSource | None = Field(default=None, description="Offline synthetic task.")
    file: FileSource | None = Field(default=None, description="Local file.")
    hub: HubSource | None = Field(default=None, description="Hub dataset.")

    @model_validator(mode="after")
    def _exactly_one(self) -> DataSourceChoice:
        chosen = [k for k in ("synthetic", "file", "hub") if getattr(self, k) is not None]
        if len(chosen) != 1:
            raise ValueError(f"give exactly one of synthetic, file or hub (got {chosen or 'none'})")
        return self

    def outputs(self) -> dict[str, str]:
        """Output name -> dataset kind this source provides."""
        if self.synthetic:
            return {"sft": "sft", "preferences": "preference", "prompts": "prompts"}
        fmt = (self.file or self.hub).format  # type: ignore[union-attr]
        return {OUTPUT_NAME_OF_FORMAT[fmt]: fmt}


OUTPUT_NAME_OF_FORMAT = {"sft": "sft", "preference": "preferences", "prompts": "prompts"}


# --------------------------------------------------------------------------- stages


class _Stage(Strict):
    seed: int | None = Field(default=None, description="Seed for this stage; defaults to the pipeline seed.")

    def input_refs(self) -> dict[str, tuple[str, str]]:
        """Field path -> (reference string, expected type), for DAG and type checks."""
        return {}

    def output_types(self) -> dict[str, str]:
        """Output name -> type ('model', 'report' or 'dataset:<kind>')."""
        return {}


def check_split_fractions(splits: dict[str, float]) -> None:
    total = sum(splits.values())
    if abs(total - 1.0) > 1e-6 or any(v <= 0 for v in splits.values()):
        raise ValueError(f"splits must be positive and sum to 1, got {splits} (sum {total:g})")


class DatasetStage(_Stage):
    """Prepare data: load or generate rows, validate them, split them, store them as JSONL."""

    kind: Literal["dataset"]
    source: DataSourceChoice = Field(description="Where the rows come from.")
    splits: dict[str, float] = Field(
        default_factory=lambda: {"train": 0.9, "eval": 0.1},
        description="Split name -> fraction of rows; fractions must sum to 1.",
    )
    on_error: Literal["fail", "skip"] = Field(
        default="fail", description="Bad rows: 'fail' stops the stage, 'skip' drops them and counts them."
    )

    @model_validator(mode="after")
    def _splits_sum_to_one(self) -> DatasetStage:
        check_split_fractions(self.splits)
        return self

    def output_types(self) -> dict[str, str]:
        return {name: f"dataset:{kind}" for name, kind in self.source.outputs().items()}


class LoraSpec(Strict):
    """LoRA adapters through peft; merged into the weights when the stage finishes."""

    r: int = Field(default=8, ge=1, description="Adapter rank.")
    alpha: int = Field(default=16, ge=1, description="Scaling numerator (scale = alpha / r).")
    dropout: float = Field(default=0.0, ge=0, lt=1, description="Dropout on the adapter input.")
    target_modules: tuple[str, ...] = Field(
        default=("q_proj", "k_proj", "v_proj", "o_proj"), description="Module names that get adapters."
    )


class OptimSpec(Strict):
    """Optimisation settings shared by the offline trainers (AdamW, warmup + decay, clipping, checkpoints)."""

    epochs: int = Field(default=1, ge=1, description="Passes over the training split.")
    max_steps: int | None = Field(default=None, ge=1, description="Stop after this many optimizer steps.")
    lr: float = Field(default=3e-4, gt=0, description="Peak learning rate of AdamW.")
    weight_decay: float = Field(default=0.0, ge=0, description="AdamW decoupled weight decay.")
    batch_size: int = Field(default=8, ge=1, description="Rows per micro-batch (packed rows when packing).")
    grad_accum: int = Field(default=1, ge=1, description="Micro-batches per optimizer step.")
    warmup_ratio: float = Field(default=0.1, ge=0, lt=1, description="Fraction of steps of linear warmup.")
    schedule: Literal["linear", "cosine", "constant"] = Field(
        default="linear", description="Decay after warmup."
    )
    max_grad_norm: float | None = Field(default=1.0, gt=0, description="Clip gradients to this L2 norm.")
    checkpoint_every: int = Field(default=50, ge=1, description="Save a resumable checkpoint every N steps.")
    log_every: int = Field(default=10, ge=1, description="Report metrics every N steps.")
    precision: Literal["fp32", "bf16"] = Field(
        default="fp32",
        description=(
            "fp32, or bf16 mixed precision (bf16 autocast for the forward pass; weights, gradients and "
            "optimizer state stay fp32). bf16 pays off on GPUs; on CPU it is usually slower."
        ),
    )


class SFTTrainSpec(OptimSpec):
    """Supervised fine-tuning hyperparameters (book ch.4)."""

    max_length: int = Field(default=256, ge=8, description="Longest tokenized example; longer rows are cut.")
    packing: bool = Field(
        default=True, description="Pack examples into rows; examples never attend across boundaries."
    )
    mask: Literal["all_assistant", "final_turn"] = Field(
        default="all_assistant",
        description="Which assistant turns are trained: all of them, or only the last one (book 4.3).",
    )


class SFTStage(_Stage):
    """Supervised fine-tuning with prompt masking (only assistant tokens are trained)."""

    kind: Literal["sft"]
    model: str = Field(description="Model to fine-tune: a `models:` entry or a model-producing stage.")
    data: str = Field(description="SFT dataset reference, e.g. data.sft.")
    train: SFTTrainSpec = Field(default_factory=SFTTrainSpec, description="Training hyperparameters.")
    lora: LoraSpec | None = Field(default=None, description="Train LoRA adapters instead of all weights.")
    register_as: str | None = Field(
        default=None, description="Registered model name; default '<pipeline>-<stage>'."
    )

    def input_refs(self) -> dict[str, tuple[str, str]]:
        return {"model": (self.model, "model:policy"), "data": (self.data, "dataset:sft")}

    def output_types(self) -> dict[str, str]:
        return {"model": "model:policy"}


class RewardTrainSpec(OptimSpec):
    """Reward-model hyperparameters (book ch.5; one epoch is the common practice)."""

    lr: float = Field(default=5e-5, gt=0, description="Peak learning rate of AdamW.")
    batch_size: int = Field(
        default=8, ge=1, description="Prompts per micro-batch (all pairs of a prompt together)."
    )
    max_length: int = Field(default=256, ge=8, description="Longest prompt + completion, in tokens.")
    on_overlong: Literal["fail", "skip"] = Field(
        default="fail", description="A pair longer than max_length: stop with its row, or skip and count it."
    )
    margin_column: str | None = Field(
        default=None, description="Column with the Llama 2 margin m(y_c, y_r) subtracted inside the loss."
    )
    shared_prefix: bool = Field(
        default=True,
        description=(
            "Score the distinct completions of a prompt in one row that holds the prompt once (same "
            "rewards, fewer tokens). Needs sdpa or eager attention; other kernels use padded rows."
        ),
    )


class RewardModelStage(_Stage):
    """A Bradley-Terry reward model: scalar head on the backbone of a policy model (book ch.5)."""

    kind: Literal["reward_model"]
    model: str = Field(
        description="Policy whose backbone initialises the reward model (usually the SFT model)."
    )
    data: str = Field(description="Preference dataset reference, e.g. data.preferences.")
    train: RewardTrainSpec = Field(default_factory=RewardTrainSpec, description="Training hyperparameters.")
    register_as: str | None = Field(
        default=None, description="Registered model name; default '<pipeline>-<stage>'."
    )

    def input_refs(self) -> dict[str, tuple[str, str]]:
        return {"model": (self.model, "model:policy"), "data": (self.data, "dataset:preference")}

    def output_types(self) -> dict[str, str]:
        return {"model": "model:reward"}


class RewardSourceSpec(Strict):
    """One scorer of completions: a registered reward function or a reward-model stage, with a weight."""

    function: str | None = Field(
        default=None, description="Registered reward function, e.g. arithmetic_exact."
    )
    model: str | None = Field(default=None, description="Reward-model reference (a reward_model stage).")
    weight: float = Field(default=1.0, description="Weight w_s in the composite sum_s w_s * r_s(x, y).")

    @model_validator(mode="after")
    def _exactly_one(self) -> RewardSourceSpec:
        if (self.function is None) == (self.model is None):
            raise ValueError("give exactly one of function or model")
        if self.function is not None and self.function not in REWARD_FUNCTIONS:
            raise ValueError(
                f"unknown reward function '{self.function}' (known: {', '.join(REWARD_FUNCTIONS)})"
            )
        return self

    @property
    def name(self) -> str:
        return self.function or f"rm:{self.model}"


DecodingEngine = Literal["native", "transformers"]


def engine_field() -> Any:
    return Field(
        default="native",
        description=(
            "Decoding loop: 'native' pre-fills each prompt once for all its samples and drops finished "
            "rows; 'transformers' calls model.generate per batch (same sampling rule, other random draws)."
        ),
    )


class SamplingSpec(Strict):
    """Decoding settings for sampling N completions per prompt."""

    temperature: float = Field(default=1.0, gt=0, description="Softmax temperature (book: 0.7-1.0).")
    top_p: float = Field(default=1.0, gt=0, le=1, description="Nucleus sampling mass.")
    max_new_tokens: int = Field(default=32, ge=1, description="Tokens generated per completion at most.")
    batch_size: int = Field(default=64, ge=1, description="Sequences decoded together (prompts x samples).")
    engine: DecodingEngine = engine_field()


class SampleStage(_Stage):
    """N completions per prompt from a policy, each scored by the reward sources (book ch.9)."""

    kind: Literal["sample"]
    policy: str = Field(description="Policy model that generates.")
    prompts: str = Field(description="Prompts dataset reference, e.g. data.prompts.")
    split: str = Field(default="train", description="Split of the prompts dataset to sample from.")
    n: int = Field(default=8, ge=1, description="Completions per prompt (book: 10-30+; fewer is noisier).")
    max_prompts: int | None = Field(default=None, ge=1, description="Use at most this many prompts.")
    generation: SamplingSpec = Field(default_factory=SamplingSpec, description="Decoding settings.")
    rewards: tuple[RewardSourceSpec, ...] = Field(
        min_length=1, description="Reward sources; scores are summed."
    )
    on_invalid_reward: Literal["fail", "skip"] = Field(
        default="fail",
        description="A NaN/inf reward: stop naming the row, or drop the completion and count it.",
    )

    def input_refs(self) -> dict[str, tuple[str, str]]:
        refs = {"policy": (self.policy, "model:policy"), "prompts": (self.prompts, "dataset:prompts")}
        for i, source in enumerate(self.rewards):
            if source.model is not None:
                refs[f"rewards[{i}].model"] = (source.model, "model:reward")
        return refs

    def output_types(self) -> dict[str, str]:
        return {"completions": "dataset:completions"}


class RejectionSamplingStage(_Stage):
    """Keep the best completions (top per prompt or top-K overall) as an SFT dataset (book ch.9)."""

    kind: Literal["rejection_sampling"]
    completions: str = Field(description="Completions dataset of a sample stage.")
    strategy: Literal["top_per_prompt", "top_k_overall"] = Field(
        default="top_per_prompt", description="Selection rule S(R) of the book."
    )
    k: int | None = Field(default=None, ge=1, description="How many completions top_k_overall keeps.")
    min_reward: float | None = Field(
        default=None, description="Also drop selected completions below this reward."
    )

    @model_validator(mode="after")
    def _k_for_top_k(self) -> RejectionSamplingStage:
        if self.strategy == "top_k_overall" and self.k is None:
            raise ValueError("strategy top_k_overall needs k")
        return self

    def input_refs(self) -> dict[str, tuple[str, str]]:
        return {"completions": (self.completions, "dataset:completions")}

    def output_types(self) -> dict[str, str]:
        return {"sft": "dataset:sft"}


class PolicyJudgeSpec(Strict):
    """A policy model as pairwise judge, prompted with a rubric or constitution (LLM-as-a-judge)."""

    model: str = Field(description="Policy model that judges (a stage or a `models:` entry).")
    principles: tuple[str, ...] = Field(
        min_length=1, description="The rubric or constitution, one principle each."
    )
    max_new_tokens: int = Field(default=64, ge=1, description="Length of the judge's answer.")
    on_unparseable: Literal["skip", "fail"] = Field(
        default="skip", description="A verdict without [[A]]/[[B]]/[[C]]: drop and count, or stop."
    )


class LabelPreferencesStage(_Stage):
    """Turn sampled completions into preference pairs labelled by a judge (AI feedback, book ch.12)."""

    kind: Literal["label_preferences"]
    completions: str = Field(description="Completions dataset of a sample stage.")
    judge: tuple[RewardSourceSpec, ...] = Field(
        default=(), description="Reward sources that score each completion (verifier, reward model, mix)."
    )
    judge_policy: PolicyJudgeSpec | None = Field(
        default=None, description="Or: a policy model judging pairs against written principles."
    )
    pairing: Literal["best_vs_worst", "all_pairs"] = Field(
        default="best_vs_worst",
        description="One pair per prompt, or every ordered pair of distinct completions.",
    )
    min_margin: float = Field(
        default=0.0, ge=0, description="Drop pairs whose judge-score margin is smaller."
    )
    on_tie: Literal["skip", "fail"] = Field(
        default="skip", description="Equal judge scores: drop and count, or stop."
    )
    splits: dict[str, float] = Field(
        default_factory=lambda: {"train": 0.9, "eval": 0.1}, description="Split name -> fraction of pairs."
    )

    @model_validator(mode="after")
    def _one_judge_and_valid_splits(self) -> LabelPreferencesStage:
        if bool(self.judge) == (self.judge_policy is not None):
            raise ValueError("give exactly one of judge (reward sources) or judge_policy")
        check_split_fractions(self.splits)
        return self

    def input_refs(self) -> dict[str, tuple[str, str]]:
        refs = {"completions": (self.completions, "dataset:completions")}
        for i, source in enumerate(self.judge):
            if source.model is not None:
                refs[f"judge[{i}].model"] = (source.model, "model:reward")
        if self.judge_policy is not None:
            refs["judge_policy.model"] = (self.judge_policy.model, "model:policy")
        return refs

    def output_types(self) -> dict[str, str]:
        return {"preferences": "dataset:preference"}


class GenerationSpec(Strict):
    """Decoding settings used by evaluation."""

    max_new_tokens: int = Field(default=32, ge=1, description="Tokens generated per prompt at most.")
    temperature: float = Field(default=0.0, ge=0, description="0 means greedy decoding.")
    batch_size: int = Field(default=32, ge=1, description="Prompts decoded together.")
    engine: DecodingEngine = engine_field()


class BestOfNSpec(Strict):
    """Best-of-N evaluation: N samples per prompt, answer with the one the reward sources rank first."""

    n: int = Field(default=8, ge=2, description="Completions sampled per prompt.")
    rewards: tuple[RewardSourceSpec, ...] = Field(
        min_length=1, description="Reward sources that rank the N samples (weighted sum)."
    )
    generation: SamplingSpec = Field(default_factory=SamplingSpec, description="Sampling settings.")


class EvaluateStage(_Stage):
    """Held-out loss/perplexity, verifiable accuracy and a table of sample generations."""

    kind: Literal["evaluate"]
    models: tuple[str, ...] = Field(
        min_length=1, description="Models to evaluate (stages or `models:` entries)."
    )
    data: str | None = Field(default=None, description="SFT dataset whose eval split gives loss/perplexity.")
    prompts: str | None = Field(default=None, description="Prompts dataset with answers for accuracy.")
    verifier: Literal["arithmetic"] = Field(default="arithmetic", description="Checks a completion's answer.")
    max_prompts: int = Field(default=200, ge=1, description="Evaluate on at most this many prompts.")
    samples_in_table: int = Field(default=8, ge=0, description="Generations shown in the samples table.")
    max_length: int = Field(default=512, ge=8, description="Longest eval conversation (tokens) for the loss.")
    generation: GenerationSpec = Field(default_factory=GenerationSpec, description="Decoding settings.")
    best_of_n: BestOfNSpec | None = Field(
        default=None,
        description="Also report best-of-N accuracy (needs prompts): pass@1, best-of-N and pass@N.",
    )

    @model_validator(mode="after")
    def _needs_something_to_measure(self) -> EvaluateStage:
        if self.data is None and self.prompts is None:
            raise ValueError("give `data` (for loss/perplexity), `prompts` (for accuracy), or both")
        if self.best_of_n is not None and self.prompts is None:
            raise ValueError("best_of_n needs `prompts` (a prompts dataset with answers to verify)")
        return self

    def input_refs(self) -> dict[str, tuple[str, str]]:
        refs = {f"models[{i}]": (m, "model:policy") for i, m in enumerate(self.models)}
        if self.data:
            refs["data"] = (self.data, "dataset:sft")
        if self.prompts:
            refs["prompts"] = (self.prompts, "dataset:prompts")
        for i, source in enumerate(self.best_of_n.rewards if self.best_of_n else ()):
            if source.model is not None:
                refs[f"best_of_n.rewards[{i}].model"] = (source.model, "model:reward")
        return refs

    def output_types(self) -> dict[str, str]:
        return {"report": "report"}


Stage = Annotated[
    DatasetStage
    | SFTStage
    | RewardModelStage
    | SampleStage
    | RejectionSamplingStage
    | LabelPreferencesStage
    | EvaluateStage,
    Field(discriminator="kind"),
]
STAGE_KINDS = (
    "dataset",
    "sft",
    "reward_model",
    "sample",
    "rejection_sampling",
    "label_preferences",
    "evaluate",
)


# --------------------------------------------------------------------------- the pipeline


class PipelineSpec(Strict):
    """A whole post-training pipeline: base models plus a DAG of stages."""

    name: str = Field(pattern=NAME_PATTERN, description="Pipeline name; MLflow experiment and model prefix.")
    description: str = Field(default="", description="What the pipeline is for.")
    seed: int = Field(default=0, description="Default seed of every stage.")
    models: dict[str, ModelSource] = Field(default_factory=dict, description="Base models by name.")
    stages: dict[str, Stage] = Field(min_length=1, description="Stages by name; order does not matter.")

    @model_validator(mode="after")
    def _check_graph(self) -> PipelineSpec:
        problems = list(_reference_problems(self))
        if not problems:
            problems = _cycle_problems(self)
        if problems:
            raise ValueError("\n".join(problems))
        return self

    def stage_seed(self, stage_name: str) -> int:
        seed = self.stages[stage_name].seed
        return self.seed if seed is None else seed

    def dependencies(self, stage_name: str) -> list[str]:
        """Names of the stages and models a stage reads from, in field order."""
        refs = self.stages[stage_name].input_refs().values()
        return list(dict.fromkeys(parse_ref(ref)[0] for ref, _ in refs))

    def topological_order(self) -> list[str]:
        """Stage names so that every stage comes after the stages it depends on (stable by spec order)."""
        order: list[str] = []
        seen: set[str] = set()

        def visit(name: str) -> None:
            if name in seen or name not in self.stages:
                return
            seen.add(name)
            for dep in self.dependencies(name):
                visit(dep)
            order.append(name)

        for name in self.stages:
            visit(name)
        return order

    def downstream_of(self, stage_name: str) -> set[str]:
        """The stage itself and every stage that (transitively) depends on it."""
        result = {stage_name}
        for name in self.topological_order():
            if any(dep in result for dep in self.dependencies(name)):
                result.add(name)
        return result

    def digest(self) -> str:
        payload = json.dumps(self.model_dump(mode="json"), sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()


def parse_ref(ref: str) -> tuple[str, str | None]:
    """Split 'stage.output' into ('stage', 'output'); a bare name gives ('name', None)."""
    name, _, output = ref.partition(".")
    return name, (output or None)


def resolve_ref(ref: str, outputs: dict[str, dict[str, Any]]) -> Any:
    """The output a reference points at ('data.sft' -> outputs['data']['sft']); KeyError if not produced."""
    name, output = parse_ref(ref)
    produced = outputs[name]
    return produced[output] if output else next(iter(produced.values()))


def ref_type(spec: PipelineSpec, ref: str) -> tuple[str | None, str | None]:
    """(type of the referenced output, error message). Types: 'model', 'dataset:<kind>', 'report'."""
    name, output = parse_ref(ref)
    if name in spec.models:
        if output is not None:
            return None, f"model '{name}' has no outputs; refer to it as '{name}'"
        return "model:policy", None
    if name not in spec.stages:
        known = sorted([*spec.models, *spec.stages])
        return (
            None,
            f"unknown reference '{ref}': no model or stage named '{name}' (known: {', '.join(known)})",
        )
    outputs = spec.stages[name].output_types()
    if output is None:
        if len(outputs) == 1:
            return next(iter(outputs.values())), None
        return None, f"'{name}' has several outputs; pick one of: {', '.join(f'{name}.{o}' for o in outputs)}"
    if output not in outputs:
        return None, f"stage '{name}' has no output '{output}' (it has: {', '.join(outputs)})"
    return outputs[output], None


def _reference_problems(spec: PipelineSpec) -> Iterator[str]:
    for stage_name, stage in spec.stages.items():
        if stage_name in spec.models:
            yield f"stage '{stage_name}': name is also used by a model under `models:`"
        for field_path, (ref, expected) in stage.input_refs().items():
            actual, error = ref_type(spec, ref)
            where = f"stage '{stage_name}', field {field_path}"
            if error:
                yield f"{where}: {error}"
            elif parse_ref(ref)[0] == stage_name:
                yield f"{where}: a stage cannot refer to itself"
            elif actual != expected:
                yield f"{where}: '{ref}' is {_describe(actual)}, expected {_describe(expected)}"


def _describe(type_name: str | None) -> str:
    if type_name and type_name.startswith("dataset:"):
        kind = type_name.split(":")[1]
        return f"{'an' if kind == 'sft' else 'a'} {kind} dataset"
    names = {
        "model:policy": "a policy model",
        "model:reward": "a reward model",
        "report": "an evaluation report",
    }
    return names.get(type_name or "", str(type_name))


def _cycle_problems(spec: PipelineSpec) -> list[str]:
    state: dict[str, str] = {}
    path: list[str] = []

    def visit(name: str) -> list[str] | None:
        state[name] = "active"
        path.append(name)
        for dep in spec.dependencies(name):
            if dep not in spec.stages:
                continue
            if state.get(dep) == "active":
                return path[path.index(dep) :] + [dep]
            if dep not in state and (cycle := visit(dep)):
                return cycle
        state[name] = "done"
        path.pop()
        return None

    for name in spec.stages:
        if name not in state and (cycle := visit(name)):
            return [f"stage '{cycle[0]}': dependency cycle {' -> '.join(cycle)}"]
    return []


# --------------------------------------------------------------------------- loading


def load_spec(path: str | Path, overrides: list[str] | None = None) -> PipelineSpec:
    """Read a YAML spec, apply ``--set a.b=c`` overrides, validate. Raises SpecError."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise SpecError([f"spec file not found: {path}"]) from None
    except yaml.YAMLError as exc:
        raise SpecError([f"{path}: not valid YAML: {exc}"]) from None
    if not isinstance(raw, dict):
        raise SpecError([f"{path}: expected a mapping at the top level, got {type(raw).__name__}"])
    for override in overrides or []:
        apply_override(raw, override)
    raw = _resolve_relative_paths(raw, path.parent)
    return parse_spec(raw)


def parse_spec(raw: dict[str, Any]) -> PipelineSpec:
    try:
        return PipelineSpec.model_validate(raw)
    except ValidationError as exc:
        raise SpecError(_format_validation_error(exc)) from None


def apply_override(raw: dict[str, Any], override: str) -> None:
    """Apply one ``a.b.c=value`` override in place; the value is parsed as YAML (numbers, lists...)."""
    key, sep, value = override.partition("=")
    if not sep or not key.strip():
        raise SpecError([f"--set '{override}': expected KEY.PATH=VALUE, e.g. stages.sft.train.lr=1e-4"])
    parts = key.strip().split(".")
    node: Any = raw
    for i, part in enumerate(parts[:-1]):
        if not isinstance(node, dict):
            raise SpecError([f"--set '{override}': '{'.'.join(parts[:i])}' is not a mapping"])
        node = node.setdefault(part, {})
    if not isinstance(node, dict):
        raise SpecError([f"--set '{override}': '{'.'.join(parts[:-1])}' is not a mapping"])
    try:
        node[parts[-1]] = yaml.safe_load(value)
    except yaml.YAMLError as exc:
        raise SpecError([f"--set '{override}': value is not valid YAML: {exc}"]) from None


def _resolve_relative_paths(raw: dict[str, Any], base: Path) -> dict[str, Any]:
    """Make model `path:` and file-source `path:` entries relative to the spec's directory."""
    for model in (raw.get("models") or {}).values():
        if isinstance(model, dict) and isinstance(model.get("path"), str):
            model["path"] = _absolute(model["path"], base)
    for stage in (raw.get("stages") or {}).values():
        source = stage.get("source") if isinstance(stage, dict) else None
        file_source = source.get("file") if isinstance(source, dict) else None
        if isinstance(file_source, dict) and isinstance(file_source.get("path"), str):
            file_source["path"] = _absolute(file_source["path"], base)
    return raw


def _absolute(path: str, base: Path) -> str:
    p = Path(path).expanduser()
    return str(p if p.is_absolute() else (base / p).resolve())


def _format_validation_error(exc: ValidationError) -> list[str]:
    problems = []
    for err in exc.errors():
        loc = [str(part) for part in err["loc"]]
        message = err["msg"].removeprefix("Value error, ")
        if loc[:1] == ["stages"] and len(loc) >= 2:
            stage, rest = loc[1], loc[2:]
            if rest and rest[0] in STAGE_KINDS:
                rest = rest[1:]  # drop the discriminated-union tag pydantic adds
            where = f"stage '{stage}'" + (f", field {'.'.join(rest)}" if rest else "")
        elif loc[:1] == ["models"] and len(loc) >= 2:
            where = f"model '{loc[1]}'" + (f", field {'.'.join(loc[2:])}" if loc[2:] else "")
        elif loc:
            where = f"field {'.'.join(loc)}"
        else:
            where = "pipeline"
        for line in message.splitlines():
            problems.append(line if line.startswith("stage '") else f"{where}: {line}")
    return problems
