"""The ``evaluate`` stage's work: every model evaluated on the same held-out data, each candidate then
compared with the baseline.

1. Each model in ``stage.models`` is evaluated on its own
   (:func:`~rlhf_core.evaluation.evaluate.evaluate_model`): NLL, accuracy, pass@k, reward means,
   lengths, and the KL to the reference (``stage.reference``, by default the baseline; the reference
   itself is at KL 0 by definition). A model's generating parts with ``engine: vllm`` share one vLLM
   engine started from that model (its log: ``<work dir>/vllm-server.log``).
2. With a ``baseline`` and ``win_rate``, every other model's answer to each prompt is judged against
   the baseline's answer to the same prompt, by each judge (:mod:`rlhf_core.evaluation.win_rate`;
   an endpoint judge: :mod:`rlhf_core.judging.endpoint_stage_judges`). The baseline gets no win rate.
   A policy judge decodes greedily with the engine its ``engine`` names (``vllm``: one engine started
   from the judge model, for every candidate).

The report is {model: {metric: value}}; every figure comes with ``_ci_low``, ``_ci_high`` and ``_n``.
Entry point: :func:`compare_models` (``run(stage, inputs, env)``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from rlhf_core.evaluation.evaluate import Reference, evaluate_model
from rlhf_core.evaluation.win_rate import (
    Verdict,
    policy_verdicts,
    question_text,
    reward_verdicts,
    verifier_verdicts,
    win_rate_metrics,
)
from rlhf_core.judging.endpoint_stage_judges import endpoint_win_verdicts, judge_cache
from rlhf_core.judging.policy_judge import GenerateFn, open_policy_judge
from rlhf_core.modeling.models import load_model
from rlhf_core.spec import EvaluateStage
from rlhf_core.spec.stages.evaluation import WinRateJudgeSpec
from rlhf_core.stage_environment import StageEnvironment
from rlhf_core.stage_results import StageResult

ModelLocation = tuple[str, str | None]  # local directory (or hub name), revision
KEY_FIGURES = (  # shown in the pipeline summary, with the first judge's win rate
    "eval/loss",
    "eval/perplexity",
    "eval/accuracy",
    "eval/best_of_n/accuracy",
    "eval/kl_to_reference",
)


@dataclass(frozen=True)
class EvaluationInputs:
    """The ``evaluate`` stage's resolved inputs.

    ``models``: name -> location, in the stage's order; ``eval_rows`` / ``prompt_rows``: the eval splits
    of ``data`` and ``prompts`` (empty without them); ``reward_model_dirs``: reward models by source name
    (``rm:<stage>``); ``judge_models``: the policy judges by judge name (``policy:<model>``);
    ``reference``: the location of ``stage.kl_reference``; ``prompts_source``: the prompts' dataset, in
    words, for errors.
    """

    models: dict[str, ModelLocation]
    eval_rows: list[dict] = field(default_factory=list)
    prompt_rows: list[dict] = field(default_factory=list)
    reward_model_dirs: dict[str, str] = field(default_factory=dict)
    judge_models: dict[str, ModelLocation] = field(default_factory=dict)
    reference: ModelLocation | None = None
    prompts_source: str = "prompts"


@dataclass
class ComparisonReport(StageResult):
    """Figures per model (``report``), the table of sample answers, and each model's answers."""

    report: dict[str, dict[str, float]] = field(default_factory=dict)
    samples: list[dict] = field(default_factory=list)
    answers: dict[str, list[dict]] = field(default_factory=dict)

    def summary(self) -> dict[str, float]:
        """Each model's key figures, as ``<model>.<figure>`` (``eval/`` left out)."""
        return {
            f"{name}.{k.removeprefix('eval/')}": v
            for name, metrics in self.report.items()
            for k, v in key_figures(metrics).items()
        }


def key_figures(metrics: dict[str, float]) -> dict[str, float]:
    """The figures of one model shown in the pipeline summary: KEY_FIGURES and the first judge's win rate."""
    shown = {k: metrics[k] for k in KEY_FIGURES if k in metrics}
    win_rates = [
        k for k in metrics if k.startswith("eval/win_rate/") and not k.endswith(("_low", "_high", "_n"))
    ]
    return shown | ({win_rates[0]: metrics[win_rates[0]]} if win_rates else {})


def compare_models(stage: EvaluateStage, inputs: EvaluationInputs, env: StageEnvironment) -> ComparisonReport:
    """Evaluate the models (in the stage's order) and compare them with the baseline."""
    eval_rows, prompt_rows, reference = inputs.eval_rows, inputs.prompt_rows, inputs.reference
    out = ComparisonReport()
    ref_name = stage.kl_reference if stage.kl is not None and prompt_rows else None
    loaded: Reference | None = None
    for name, (model_dir, revision) in inputs.models.items():
        needs_kl = ref_name is not None and name != ref_name and reference is not None
        if needs_kl and loaded is None:
            loaded = Reference(ref_name, *load_model(reference[0], revision=reference[1]))
        evaluation = evaluate_model(
            model_dir, revision, eval_rows, prompt_rows, stage, inputs.reward_model_dirs, env.seed,
            stage_name=env.stage, prompts_source=inputs.prompts_source,
            reference=loaded if needs_kl else None, cache_dir=env.cache_dir, log_dir=env.work_dir,
        )  # fmt: skip
        if ref_name == name and evaluation.rows:
            evaluation.metrics |= reference_itself(len(evaluation.rows))
        out.report[name], out.answers[name] = evaluation.metrics, evaluation.rows
        out.samples += [{"model": name, **row} for row in evaluation.samples]
    if stage.win_rate is not None and stage.baseline is not None:
        for judge in stage.win_rate.judges:
            judged = judged_candidates(out, stage, judge, inputs.judge_models, env)
            for name, metrics in judged:
                out.report[name] |= metrics
    return out


def reference_itself(prompts: int) -> dict[str, float]:
    """The reference's KL to itself: 0 exactly, nothing to sample."""
    name = "eval/kl_to_reference"
    return {name: 0.0, f"{name}_ci_low": 0.0, f"{name}_ci_high": 0.0, f"{name}_n": float(prompts)}


def judged_candidates(
    out: ComparisonReport,
    stage: EvaluateStage,
    judge: WinRateJudgeSpec,
    judge_models: dict[str, ModelLocation],
    env: StageEnvironment,
) -> list[tuple[str, dict[str, float]]]:
    """Win-rate figures of one judge for every candidate (every model but the baseline); an endpoint
    judge's answers are cached in ``<home>/cache/judge``; a policy judge decodes with its ``engine``
    (one engine start per judge, for all candidates)."""
    if judge.policy is None:
        return judge_candidates(out, stage, judge, None, env)
    judge_dir, judge_revision = judge_models[judge.name]
    with open_policy_judge(
        judge.policy, judge_dir, judge_revision, stage=env.stage, log_dir=env.work_dir
    ) as generate:
        return judge_candidates(out, stage, judge, generate, env)


def judge_candidates(
    out: ComparisonReport,
    stage: EvaluateStage,
    judge: WinRateJudgeSpec,
    generate: GenerateFn | None,
    env: StageEnvironment,
) -> list[tuple[str, dict[str, float]]]:
    """:func:`judged_candidates`' work; ``generate``: the open policy judge, if the judge is one."""
    baseline = out.answers[stage.baseline]
    candidates = [name for name in out.answers if name != stage.baseline]
    results = []
    for name in candidates:
        answers = out.answers[name]
        verdicts: list[Verdict | Exception]
        if judge.verifier:
            verdicts = list(
                verifier_verdicts([r["correct"] for r in answers], [r["correct"] for r in baseline])
            )
        elif judge.endpoint is not None:
            verdicts = endpoint_win_verdicts(  # type: ignore[assignment]
                judge.endpoint, judge_cache(env.cache_dir), [question_text(r["prompt"]) for r in answers],
                [r["completion"] for r in answers], [r["completion"] for r in baseline], judge.tie_margin,
            )  # fmt: skip
        elif judge.policy is not None and generate is not None:
            verdicts = policy_verdicts(
                generate, judge.policy.principles, [r["prompt"] for r in answers],
                [r["completion"] for r in answers], [r["completion"] for r in baseline],
            )  # fmt: skip
        else:
            key = judge.name
            scores = [r["scores"][key] for r in answers], [r["scores"][key] for r in baseline]
            verdicts = list(reward_verdicts(*scores, tie_margin=judge.tie_margin))
        judge_model = judge.policy or judge.endpoint  # only a judge model's answer can fail to parse
        on_unparseable = judge_model.on_unparseable if judge_model is not None else "skip"
        metrics = win_rate_metrics(
            judge.name, verdicts, env.seed, on_unparseable=on_unparseable, stage=env.stage,
            prompts=[r["prompt"] for r in answers],
        )  # fmt: skip
        results.append((name, metrics))
    return results
