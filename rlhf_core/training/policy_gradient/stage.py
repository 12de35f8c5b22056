"""The ``policy_gradient`` stage's entry point (``run(stage, inputs, env)``): load the policy, the
reference, PPO's value model, distillation's teacher and the reward sources, open the rollout engine the
stage names, and train (:func:`rlhf_core.training.policy_gradient.trainer.train_policy_gradient`)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from rlhf_core.errors import UserError
from rlhf_core.judging.endpoint_stage_judges import reward_scorers
from rlhf_core.rollout.engines.base import RolloutEngine
from rlhf_core.rollout.engines.opening import open_engine
from rlhf_core.spec.stages.policy_gradient import PolicyGradientStage
from rlhf_core.stage_environment import StageEnvironment
from rlhf_core.training.monitor.overoptimization import load_monitor_inputs
from rlhf_core.training.policy_gradient.algorithms import needs_value_model
from rlhf_core.training.policy_gradient.trainer import (
    PolicyGradientResult,
    SampleLogFn,
    train_policy_gradient,
)


def check_value_tokenizer(
    policy_tokenizer: PreTrainedTokenizerBase, value_tokenizer: PreTrainedTokenizerBase, stage_name: str
) -> None:
    """A value model initialised from a reward model must read the policy's token ids as the same tokens
    (its tokenizer may only add tokens, e.g. a pad token)."""
    policy_vocab, value_vocab = policy_tokenizer.get_vocab(), value_tokenizer.get_vocab()
    differing = [t for t, i in policy_vocab.items() if value_vocab.get(t) != i]
    if differing or policy_tokenizer.chat_template != value_tokenizer.chat_template:
        what = f"{len(differing)} tokens have other ids" if differing else "the chat template differs"
        raise UserError(
            f"stage '{stage_name}', field ppo.value_model: its tokenizer is not the policy's ({what}); "
            "initialise the value model from a reward model trained on this policy, or drop "
            "ppo.value_model to start it from the policy"
        )


@dataclass(frozen=True)
class PolicyGradientInputs:
    """The ``policy_gradient`` stage's resolved inputs: the policy, the prompt rows of its split, and the
    models around it (reference, PPO's value model's start, the reward models and the monitor's)."""

    policy_dir: str  # a local directory or a hub name
    policy_revision: str | None
    prompt_rows: list[dict]
    reference_dir: str | None = None  # None: the policy's starting weights are the reference
    reference_revision: str | None = None
    value_init_dir: str | None = None  # PPO's value model; None: the policy's backbone with a zero head
    reward_model_dirs: dict[str, str] = field(default_factory=dict)  # by reward source name
    monitor_rows: list[dict] | None = None  # the over-optimization monitor's prompt rows
    monitor_model_dirs: dict[str, str] = field(default_factory=dict)  # its reward models by source name
    teacher_dir: str | None = None  # distillation's teacher
    teacher_revision: str | None = None


def optimize_on_rollouts(
    stage: PolicyGradientStage, inputs: PolicyGradientInputs, env: StageEnvironment
) -> PolicyGradientResult:
    """The ``policy_gradient`` stage's work: load the policy, the reference (only when beta > 0 or the
    monitor needs it, and one is given; otherwise the starting weights serve), PPO's value model and the
    reward models; train. A few completions of every ``stage.sample_table_every``-th rollout go to
    ``env.log_table`` as ``samples/rollout_<n>.json``. The result carries the trained policy and its
    tokenizer."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from rlhf_core.modeling.models import load_model
    from rlhf_core.modeling.reward_model import build_reward_model
    from rlhf_core.rewards.composite import model_source_options
    from rlhf_core.rewards.reward_model_scoring import load_reward_model_scorers
    from rlhf_core.training.policy_gradient.rollouts import reward_function

    if not inputs.prompt_rows:
        raise UserError(f"stage '{env.stage}': the prompts split '{stage.split}' has no rows")
    policy, tokenizer = load_model(inputs.policy_dir, revision=inputs.policy_revision)
    teacher = load_teacher(stage, inputs, tokenizer, env.stage) if stage.distillation is not None else None
    reference = None
    if (stage.needs_reference or stage.monitor is not None) and inputs.reference_dir is not None:
        reference = load_model(inputs.reference_dir, revision=inputs.reference_revision)[0]
        reference = reference.eval().requires_grad_(False)
    value_model = None
    if needs_value_model(stage):
        if inputs.value_init_dir is not None:
            value_tokenizer = AutoTokenizer.from_pretrained(inputs.value_init_dir)
            check_value_tokenizer(tokenizer, value_tokenizer, env.stage)
            value_model = AutoModelForSequenceClassification.from_pretrained(inputs.value_init_dir)
        else:  # the policy's backbone, zero head
            value_model = build_reward_model(inputs.policy_dir, revision=inputs.policy_revision)
    monitored = (*stage.monitor_proxy, *stage.monitor.gold) if stage.monitor is not None else ()
    sources = (*stage.rewards, *monitored)
    scorers = load_reward_model_scorers(inputs.reward_model_dirs, model_source_options(sources))
    scorers |= reward_scorers(sources, env.cache_dir, env.stage)  # judges behind endpoints, by source name
    reward_fn = reward_function(stage.rewards, scorers, env.stage)
    monitor_inputs = None
    if stage.monitor is not None:
        monitor_inputs = load_monitor_inputs(
            stage.monitor, stage.monitor_proxy, inputs.monitor_rows or [], inputs.monitor_model_dirs,
            env.checkpoint_dir / "monitor", env.stage, loaded=scorers,
        )  # fmt: skip
    with rollout_engine(stage, policy, tokenizer, env) as engine:
        trained, _, result = train_policy_gradient(
            policy, tokenizer, inputs.prompt_rows, stage, reward_fn, seed=env.seed,
            checkpoint_dir=env.checkpoint_dir, stage_name=env.stage, reference_model=reference,
            value_model=value_model, log=env.log, log_samples=sample_table_logger(env),
            monitor_inputs=monitor_inputs, engine=None if isinstance(engine, str) else engine,
            teacher_model=teacher,
        )  # fmt: skip
    result.model, result.tokenizer = trained, tokenizer
    return result


def load_teacher(
    stage: PolicyGradientStage,
    inputs: PolicyGradientInputs,
    tokenizer: PreTrainedTokenizerBase,
    stage_name: str,
) -> PreTrainedModel:
    """Distillation's teacher, frozen; its tokenizer is checked to be the policy's before its weights load."""
    from rlhf_core.modeling.models import load_model, load_tokenizer
    from rlhf_core.modeling.shared_tokenizer import check_shared_tokenizer

    if inputs.teacher_dir is None:
        raise ValueError("distillation: the stage's inputs carry no teacher_dir")
    check_shared_tokenizer(
        tokenizer, load_tokenizer(inputs.teacher_dir, revision=inputs.teacher_revision), stage=stage_name,
        field="distillation.teacher", student_name=stage.policy, teacher_name=stage.distillation.teacher,
    )  # fmt: skip
    teacher, _ = load_model(inputs.teacher_dir, revision=inputs.teacher_revision)
    return teacher.eval().requires_grad_(False)


@contextmanager
def rollout_engine(
    stage: PolicyGradientStage,
    policy: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    env: StageEnvironment,
) -> Iterator[RolloutEngine | str]:
    """The engine the stage's rollouts come from: its ``generation.engine`` (a name for an in-process
    loop, or an open vLLM engine); with asynchronous rollouts and the native loop, that loop in a
    background process, this process's torch threads split between it and the trainer."""
    if stage.asynchronous and stage.generation.engine == "native":
        import torch

        from rlhf_core.rollout.engines.native_process import NativeProcessEngine

        # the CPU's torch threads split between the trainer and the background loop (at least one each)
        threads = torch.get_num_threads()
        background = max(1, threads // 2)
        torch.set_num_threads(max(1, threads - background))
        what = f"stage '{env.stage}'"
        try:
            with NativeProcessEngine(
                policy, tokenizer, what=what, threads=background, batch_size=stage.generation.batch_size
            ) as engine:
                yield engine
        finally:
            torch.set_num_threads(threads)
        return
    with open_engine(stage.generation, policy, tokenizer, stage=env.stage, log_dir=env.work_dir) as engine:
        yield engine


def sample_table_logger(env: StageEnvironment) -> SampleLogFn | None:
    """Each logged rollout's sample rows as the table ``samples/rollout_<n>.json`` (n from 1) of
    ``env.log_table``; None when the environment keeps no tables."""
    log_table = env.log_table
    if log_table is None:
        return None
    return lambda rows, rollout: log_table(rows, f"samples/rollout_{rollout + 1:05d}.json")
