"""``engine: vllm`` for the policy judges and the over-optimization monitor, with real vLLM servers.

What must hold (issue 19): a policy judge's greedy verdicts through the engine equal the native loop's
(fp32); and the monitor of a ``policy_gradient`` stage whose rollouts use the engine decodes its answers
there, from the weights of the step it evaluates (each evaluation's answers equal the native greedy
answers of the policy at that step), without syncing the engine twice for one step; with
``monitor.generation.engine: native`` the engine serves the rollouts only. Two engine starts in all
(~25 s each on a CPU).
"""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from rlhf_core.data.synthetic import synthetic_records
from rlhf_core.judging.policy_judge import judge_pairs, open_policy_judge
from rlhf_core.modeling.models import build_tiny_model, load_model, save_model
from rlhf_core.rollout.engines.opening import open_engine
from rlhf_core.rollout.generation import generate_completions
from rlhf_core.spec import PolicyJudgeSpec, TinyModelSource
from rlhf_core.spec.monitor import MonitorSpec
from rlhf_core.spec.stages.online_dpo import IterativeDPOTemplate
from rlhf_core.spec.stages.policy_gradient import PolicyGradientStage
from rlhf_core.spec.stages.sampling import LabelPreferencesStage
from rlhf_core.training.monitor.overoptimization import MonitorInputs
from rlhf_core.training.policy_gradient.trainer import train_policy_gradient
from tests.engine_environment import TEST_VLLM, require_vllm

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TINY = TinyModelSource(hidden_size=64, heads=2, layers=2)  # head size 32: vLLM's CPU attention runs it
JUDGE_VLLM = {**TEST_VLLM, "max_model_len": 512}  # a judge prompt is ~300 tokens of this tokenizer
PRINCIPLES = ("Prefer the correct answer.",)
SERVER_STARTED = "Application startup complete."  # uvicorn's line, once per server start


# --- the policy judge ---------------------------------------------------------------------------------


def _judge_pairs() -> list[tuple[str, str, str]]:
    """(question, first, second): the right answer to an arithmetic prompt against one off by one."""
    records = synthetic_records("arithmetic", "prompts", n=6, seed=3, max_operand=9)
    return [(r["prompt"], str(r["answer"]), str(int(r["answer"]) + 1)) for r in records]


def _judge_spec(engine: str) -> PolicyJudgeSpec:
    vllm = {"vllm": JUDGE_VLLM} if engine == "vllm" else {}
    return PolicyJudgeSpec(model="judge", principles=PRINCIPLES, max_new_tokens=24, engine=engine, **vllm)


def _verdicts(spec: PolicyJudgeSpec, judge_dir: str, log_dir: Path) -> tuple[list[str], list[str]]:
    """The judge's outputs (both orders of every pair) and its verdicts, errors as their messages."""
    outputs: list[str] = []
    with open_policy_judge(spec, judge_dir, None, stage="pairs", log_dir=log_dir) as generate:

        def recorded(prompts: list[str]) -> list[str]:
            outputs.extend(generate(prompts))
            return outputs

        verdicts = judge_pairs(recorded, spec.principles, _judge_pairs())
    return outputs, [str(v) for v in verdicts]


def test_a_policy_judge_names_its_engine_and_iterative_dpo_hands_it_to_each_round():
    assert _judge_spec("native").engine == "native"  # the default stays the in-process loop
    with pytest.raises(ValidationError, match=r"engine"):
        PolicyJudgeSpec(model="judge", principles=PRINCIPLES, engine="sglang")
    template = IterativeDPOTemplate(
        kind="iterative_dpo", policy="sft", prompts="data.prompts", rounds=2,
        judge=[{"function": "length_penalty"}], judge_policy=_judge_spec("vllm").model_dump(),
    )  # fmt: skip
    stages = template.expand("online", pipeline_seed=0)
    for r in (1, 2):
        judge = LabelPreferencesStage(**stages[f"online-r{r}-pairs"]).judge_policy
        assert judge.engine == "vllm" and judge.vllm.max_model_len == 512


def test_the_monitor_follows_the_stages_engine_unless_told_native():
    monitor = {"gold": [{"function": "arithmetic_exact"}]}
    assert MonitorSpec(**monitor).generation.engine == "stage"
    assert MonitorSpec(**monitor, generation={"engine": "native"}).generation.engine == "native"
    with pytest.raises(ValidationError, match=r"generation\.engine"):
        MonitorSpec(**monitor, generation={"engine": "vllm"})  # the stage's engine, not one of its own


@pytest.mark.e2e
def test_policy_judge_verdicts_through_the_engine_equal_the_native_ones(tmp_path):
    """The stage's judge (``open_policy_judge``, what label_preferences and the win-rate judge call),
    on the untrained tiny model: its outputs are gibberish, so the verdicts are mostly parse failures
    whose messages quote the outputs; 24 greedy tokens per prompt must be equal token for token."""
    require_vllm()
    model, tokenizer = build_tiny_model(TINY, seed=1)
    judge_dir = str(save_model(model, tokenizer, tmp_path / "judge"))
    native_outputs, native_verdicts = _verdicts(_judge_spec("native"), judge_dir, tmp_path / "native")
    outputs, verdicts = _verdicts(_judge_spec("vllm"), judge_dir, tmp_path / "vllm")
    assert len(outputs) == 2 * len(_judge_pairs())  # each pair in both orders
    assert len(set(native_outputs)) > 1 and min(map(len, native_outputs)) > 10  # long, varied answers
    assert outputs == native_outputs  # greedy, fp32: the same answers
    assert verdicts == native_verdicts
    assert (tmp_path / "vllm" / "vllm-server.log").read_text().count(SERVER_STARTED) == 1
    assert not (tmp_path / "native" / "vllm-server.log").exists()  # native: no engine started


# --- the over-optimization monitor --------------------------------------------------------------------


class RecordingEngine:
    """The real engine, with a record of its greedy answers (the monitor's) and of its weight syncs."""

    def __init__(self, engine):
        self.engine, self.name = engine, engine.name
        self.greedy_answers: list[list[list[int]]] = []
        self.syncs = 0

    def generate(self, prompt_ids, n, request, seed):
        out = self.engine.generate(prompt_ids, n, request, seed)
        if request.temperature == 0:
            self.greedy_answers.append(out.token_ids)
        return out

    def sync_weights(self, model) -> None:
        self.syncs += 1
        self.engine.sync_weights(model)

    def release_memory(self) -> None:
        self.engine.release_memory()

    def close(self) -> None:
        self.engine.close()


def digit_share(rows):
    rewards = [sum(ch.isdigit() for ch in r["completion"]) / max(1, len(r["completion"])) for r in rows]
    return rewards, {"digits": rewards}


MONITOR_PROMPTS = synthetic_records("arithmetic", "prompts", n=40, seed=1)[:6]
TRAIN_PROMPTS = synthetic_records("arithmetic", "prompts", n=16, seed=0)


def _monitored_stage(monitor_engine: str) -> PolicyGradientStage:
    """Two GRPO rollouts of one update each on the engine, evaluated before each step and at the end."""
    return PolicyGradientStage.model_validate({
        "kind": "policy_gradient", "algorithm": "grpo", "policy": "policy", "prompts": "data.prompts",
        "rewards": [{"function": "answer_format"}], "rollouts": 2, "prompts_per_rollout": 4,
        "truncated": "score", "kl": {"beta": 0.0},
        "train": {"lr": 5e-2, "batch_size": 8, "checkpoint_every": 100},
        "generation": {"max_new_tokens": 6, "temperature": 1.0, "engine": "vllm", "vllm": TEST_VLLM},
        "monitor": {"every": 1, "gold": [{"function": "arithmetic_exact"}],
                    "generation": {"max_new_tokens": 8, "engine": monitor_engine}},
    })  # fmt: skip


@pytest.fixture(scope="module")
def policy_engine(tmp_path_factory, one_torch_thread):
    """The tiny policy's directory and a vLLM engine started from it, shared by the monitor's tests
    (each training run hands the engine its starting weights at step 0)."""
    require_vllm()
    model, tokenizer = build_tiny_model(TINY, seed=0)
    policy_dir = str(save_model(model, tokenizer, tmp_path_factory.mktemp("policy") / "model"))
    settings = _monitored_stage("stage").generation
    log_dir = tmp_path_factory.mktemp("engine")
    with open_engine(settings, model, tokenizer, stage="pg", log_dir=log_dir) as engine:
        yield policy_dir, engine


def _train(policy_dir: str, engine, monitor_engine: str, work: Path, after_evaluation=None):
    """Train the stage from ``policy_dir`` with the engine recorded; (result, recording, tokenizer).
    ``after_evaluation(policy, tokenizer, step)`` runs when the monitor logs an evaluation, before the
    optimizer step: the policy still holds the evaluated weights."""
    policy, tokenizer = load_model(policy_dir)

    def log(metrics: dict, step: int) -> None:
        if after_evaluation is not None and "monitor/gold" in metrics:
            after_evaluation(policy, tokenizer, step)

    stage, recording = _monitored_stage(monitor_engine), RecordingEngine(engine)
    monitor = MonitorInputs(stage.monitor, stage.monitor_proxy, MONITOR_PROMPTS, {}, work / "monitor")
    _, _, result = train_policy_gradient(
        policy, tokenizer, TRAIN_PROMPTS, stage, digit_share, seed=0, checkpoint_dir=work / "ckpt",
        log=log, monitor_inputs=monitor, engine=recording,
    )  # fmt: skip
    return result, recording, tokenizer


@pytest.mark.e2e
def test_the_monitor_answers_through_the_engine_with_the_weights_of_each_evaluated_step(
    policy_engine, tmp_path
):
    policy_dir, engine = policy_engine
    native_answers: dict[int, list[str]] = {}

    def native_greedy(policy, tokenizer, step: int) -> None:
        prompts = [r["prompt"] for r in MONITOR_PROMPTS]
        native_answers[step] = generate_completions(policy, tokenizer, prompts, max_new_tokens=8)

    result, recording, tokenizer = _train(policy_dir, engine, "stage", tmp_path, native_greedy)
    assert [e["step"] for e in result.monitor["history"]] == [0, 1, 2]  # before, every step, the end
    engine_answers = [
        [t.strip() for t in tokenizer.batch_decode(ids, skip_special_tokens=True)]
        for ids in recording.greedy_answers
    ]
    assert engine_answers == [native_answers[s] for s in (0, 1, 2)]  # the weights of each step
    assert native_answers[0] != native_answers[2]  # training changed the answers: the syncs mattered
    assert recording.syncs == 3  # steps 0, 1, 2: each rollout reused the monitor's sync of its step


@pytest.mark.e2e
def test_a_native_monitor_leaves_the_engine_to_the_rollouts(policy_engine, tmp_path):
    policy_dir, engine = policy_engine
    result, recording, _ = _train(policy_dir, engine, "native", tmp_path)
    assert [e["step"] for e in result.monitor["history"]] == [0, 1, 2]
    assert recording.greedy_answers == []  # no greedy decoding on the engine: the answers were native
    assert recording.syncs == 2  # the two rollouts' syncs only
