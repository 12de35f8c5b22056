"""``engine: vllm`` in the evaluate stage and in iterative DPO's rounds, with real vLLM servers.

What must hold (issue 19): evaluate's greedy answers through the engine equal the native loop's (fp32),
and its generating parts (answers, pass@k, best-of-N) share one engine start; each round of iterative
DPO samples with that round's policy weights (the round-2 samples are a draw from the round-1-trained
policy, not from the initial one); a stage whose parts ask for different vLLM settings is refused when
the spec is read. Three engine starts in all (~25 s each on a CPU).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from pydantic import ValidationError

from rlhf_core.data.synthetic import synthetic_records
from rlhf_core.evaluation.evaluate import evaluate_model
from rlhf_core.judging.labeling import LabelingInputs, label_preferences
from rlhf_core.modeling.models import build_tiny_model, load_model, save_model
from rlhf_core.modeling.preference_tokens import encode_completion
from rlhf_core.rollout.sampling import SampleInputs, sample_and_score, sample_completions
from rlhf_core.rollout.token_scoring import encode_prompts
from rlhf_core.spec import EvaluateStage, TinyModelSource
from rlhf_core.spec.stages.direct_alignment import DirectAlignmentStage
from rlhf_core.spec.stages.online_dpo import IterativeDPOTemplate
from rlhf_core.spec.stages.sampling import LabelPreferencesStage, SampleStage
from rlhf_core.stage_environment import StageEnvironment
from rlhf_core.training.direct_alignment.trainer import DirectAlignmentInputs, optimize_on_preferences
from tests.engine_environment import TEST_VLLM, require_vllm

pytestmark = pytest.mark.usefixtures("one_torch_thread")

PROMPTS = synthetic_records("arithmetic", "prompts", n=8, seed=1, max_operand=9)
SERVER_STARTED = "Application startup complete."  # uvicorn's line, once per server start


@pytest.fixture(scope="module")
def policy_dir(tmp_path_factory, one_torch_thread) -> str:
    """A tiny Llama whose head size (64 / 2 = 32) vLLM's CPU attention supports."""
    model, tokenizer = build_tiny_model(TinyModelSource(hidden_size=64, heads=2, layers=2), seed=0)
    return str(save_model(model, tokenizer, tmp_path_factory.mktemp("policy") / "model"))


def _evaluate_stage(engine: str, **parts) -> EvaluateStage:
    generation = {"max_new_tokens": 12, "engine": engine}
    if engine == "vllm":
        generation["vllm"] = TEST_VLLM
    base = {"kind": "evaluate", "models": ["base"], "prompts": "data.prompts", "generation": generation}
    return EvaluateStage(**base, **parts)


# --- the spec ---------------------------------------------------------------------------------------


def test_parts_with_different_vllm_blocks_are_refused_naming_the_fields():
    with pytest.raises(ValidationError, match=r"pass_at_k.generation.vllm differs from generation.vllm"):
        _evaluate_stage(
            "vllm", pass_at_k={"n": 2, "generation": {"engine": "vllm", "vllm": {"dtype": "bfloat16"}}}
        )


def test_a_vllm_block_given_once_serves_every_part_that_uses_the_engine():
    stage = _evaluate_stage(
        "vllm",
        pass_at_k={"n": 2, "generation": {"engine": "vllm"}},  # no block: the stage's one engine
        best_of_n={"n": 2, "rewards": [{"function": "length_penalty"}], "generation": {"engine": "native"}},
    )
    assert stage.vllm_settings().model_dump(exclude_unset=True) == TEST_VLLM
    assert list(stage.generating_parts()) == ["generation", "pass_at_k.generation", "best_of_n.generation"]
    assert _evaluate_stage("native").vllm_settings() is None


def test_iterative_dpo_hands_the_engine_and_a_seed_per_round_to_each_sample_stage():
    template = _online_template(rounds=3)
    stages = template.expand("online", pipeline_seed=7)
    samples = [SampleStage(**stages[f"online-r{r}-samples"]) for r in (1, 2, 3)]
    assert [s.seed for s in samples] == [7, 8, 9]  # seed + round - 1: a pure function of both
    assert all(s.generation.engine == "vllm" for s in samples)
    assert all(s.generation.vllm.model_dump(exclude_unset=True) == TEST_VLLM for s in samples)
    assert [s.policy for s in samples] == ["sft", "online-r1", "online-r2"]  # each round's own policy


# --- with the engine --------------------------------------------------------------------------------


@pytest.mark.e2e
def test_evaluate_answers_equal_native_and_one_engine_serves_every_part(policy_dir, tmp_path):
    require_vllm()
    sampled = {"max_new_tokens": 6, "temperature": 1.0, "top_k": 5, "engine": "vllm"}
    native = _evaluate_stage("native")
    with_engine = _evaluate_stage(
        "vllm",
        pass_at_k={"n": 3, "k": [1, 3], "generation": sampled},
        best_of_n={"n": 3, "rewards": [{"function": "length_penalty"}], "generation": sampled},
    )
    expected = evaluate_model(policy_dir, None, [], PROMPTS, native, {}, seed=0, stage_name="eval")
    got = evaluate_model(
        policy_dir, None, [], PROMPTS, with_engine, {}, seed=0, stage_name="eval", log_dir=tmp_path
    )
    assert got.rows == expected.rows  # greedy, fp32: the same answers, verdicts and lengths
    assert sum(r["new_tokens"] for r in got.rows) > len(PROMPTS)  # answers of more than one token
    assert got.metrics["eval/accuracy"] == expected.metrics["eval/accuracy"]
    assert {"eval/pass_at_1", "eval/pass_at_3", "eval/best_of_n/accuracy"} <= set(got.metrics)
    assert got.metrics["eval/best_of_n/prompts"] == len(PROMPTS)
    log = (tmp_path / "vllm-server.log").read_text()
    assert log.count(SERVER_STARTED) == 1  # one engine for the answers, pass@k and best-of-N


def _online_template(rounds: int, judge: str = "length_penalty") -> IterativeDPOTemplate:
    return IterativeDPOTemplate(
        kind="iterative_dpo", policy="sft", prompts="data.prompts", rounds=rounds, n=3,
        generation={"engine": "vllm", "vllm": TEST_VLLM, "max_new_tokens": 24, "temperature": 1.0},
        judge=[{"function": judge}], pairing="all_pairs",
        train={"max_steps": 4, "batch_size": 8, "max_length": 96, "lr": 3e-2, "warmup_ratio": 0.0},
    )  # fmt: skip


def _run_round(stages: dict, r: int, policy_dir: str, work: Path) -> tuple[list[dict], str]:
    """Round ``r`` as the flow runs it (sample -> label -> optimise); its samples and trained model."""
    sample = SampleStage(**stages[f"online-r{r}-samples"])
    env = StageEnvironment.local(f"online-r{r}-samples", sample.seed, work / f"r{r}-samples")
    rows = sample_and_score(sample, SampleInputs(policy_dir, None, PROMPTS), env).rows
    pairs_stage = LabelPreferencesStage(**stages[f"online-r{r}-pairs"])
    env = StageEnvironment.local(f"online-r{r}-pairs", 0, work / f"r{r}-pairs")
    pairs = label_preferences(pairs_stage, LabelingInputs(rows), env).report.pairs
    name = "online" if f"online-r{r}" not in stages else f"online-r{r}"
    env = StageEnvironment.local(name, 0, work / name)
    inputs = DirectAlignmentInputs(
        policy_dir, None, pairs, None, reference_digest=f"r{r}", data_digest=f"r{r}"
    )
    trained = optimize_on_preferences(DirectAlignmentStage(**stages[name]), inputs, env)
    return rows, str(save_model(trained.model, trained.tokenizer, work / f"{name}-model"))


@torch.no_grad()
def _completion_logprob(model, tokenizer, prompt: str, completion: str) -> float:
    """log pi(y | x) of a completion's tokens (re-encoded after the chat prompt)."""
    start = len(encode_prompts(tokenizer, [prompt])[0])
    ids = torch.tensor([encode_completion(tokenizer, prompt, completion)])
    logps = model(input_ids=ids).logits[0, :-1].float().log_softmax(-1)  # (T-1, V)
    return float(logps.gather(-1, ids[0, 1:, None])[start - 1 :].sum())


@pytest.mark.e2e
def test_iterative_dpo_samples_each_round_from_that_rounds_weights(policy_dir, tmp_path):
    """Round 2's samples (texts, re-encoded) score like samples of the round-1 policy pi_1, not like
    samples of the initial pi_0, under the statistic S = mean over completions of log pi_1(y) - log pi_0(y):
    E_{y~pi_1}[S] = KL(pi_1 || pi_0) exceeds E_{y~pi_0}[S] = -KL(pi_0 || pi_1) (both shifted alike by
    re-encoding the texts, which DPO trained pi_1 on). The two references are native-loop samples of
    pi_1 and pi_0 with the round's settings. Measured once here: engine 52, pi_1 45, pi_0 36 nats; with
    round 2 sampled from pi_0 instead (a missed sync), the engine's S was 35 and the test failed."""
    require_vllm()
    judge = tmp_path / "longer.py"  # continuous scores, so each prompt's samples make pairs
    judge.write_text("def score(completion, row):\n    return float(len(completion))\n")
    stages = _online_template(rounds=2, judge=f"{judge}:score").expand("online", pipeline_seed=0)
    _, round_1_dir = _run_round(stages, 1, policy_dir, tmp_path)
    round_2_rows, final_dir = _run_round(stages, 2, round_1_dir, tmp_path)
    assert Path(final_dir, "model.safetensors").exists()
    (initial, tokenizer), (round_1, _) = load_model(policy_dir), load_model(round_1_dir)
    settings = SampleStage(**stages["online-r2-samples"]).generation

    def statistic(rows: list[dict]) -> float:  # nats per completion
        gaps = [
            _completion_logprob(round_1, tokenizer, row["prompt"], row["completion"])
            - _completion_logprob(initial, tokenizer, row["prompt"], row["completion"])
            for row in rows
        ]
        return sum(gaps) / len(gaps)

    def native_samples(model) -> list[dict]:
        return sample_completions(model, tokenizer, PROMPTS, 3, settings, seed=1, engine="native")[0]

    engine, of_round_1, of_initial = map(
        statistic, (round_2_rows, native_samples(round_1), native_samples(initial))
    )
    assert of_round_1 > of_initial  # the statistic tells the two policies apart
    assert abs(engine - of_round_1) < abs(engine - of_initial), (engine, of_round_1, of_initial)
