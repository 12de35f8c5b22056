"""End to end: judges behind an OpenAI-compatible endpoint, declared in a spec and run by the stages.

The served judge is ``transformers serve`` over a tiny random Llama (``openai_servers``, one per
module). It answers gibberish, so what a user would check is how its answers are handled:

- the shipped recipe ``recipes/endpoint_judge_labeling.yaml``, shrunk and pointed at the server:
  ``label_preferences`` asks the judge about every pair, counts every unparseable verdict, and fails
  with no pair left (as the policy judge does); the answers are in ``<home>/cache/judge``, so a re-run
  against a dead address sends no request and fails the same way; the API key never reaches MLflow;
- the recipe's ``evaluate`` win rate with the endpoint judge reports the unparseable verdicts;
- changing ``base_url`` keeps a stage's fingerprint, changing the rubric changes it;
- a reward source ``{endpoint: ...}`` scores through ``score_on_endpoint``, against a scripted server
  answering ``[[score: 7]]``: (7 - 1) / (10 - 1) = 0.667 on a 1-10 scale.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from openai_servers import JudgeServer, transformers_judge_server
from prefect_servers import free_port
from test_endpoint_judge import ScriptedServer
from test_recipes_e2e import shrink

from rlhf_core.fingerprint import fingerprint_stage
from rlhf_core.spec import parse_spec, read_yaml

pytestmark = pytest.mark.e2e

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "endpoint_judge_labeling.yaml"
KEY_ENV, SECRET = "RLHF_TEST_JUDGE_KEY", "sk-test-never-logged-4f1c"
JUDGE_TOKENS = 8  # the tiny judge's answers: long enough to be gibberish, short enough to be quick


@pytest.fixture(scope="module")
def judge_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[JudgeServer]:
    with transformers_judge_server(tmp_path_factory.mktemp("judge-server")) as server:
        yield server


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("endpoint-home")


def recipe(base_url: str, model: str, stages: tuple[str, ...]) -> dict:
    """The shipped recipe, shrunk, with its endpoint judges at ``base_url`` serving ``model``, keeping
    only ``stages``."""
    raw = shrink(read_yaml(RECIPE))
    raw["stages"] = {name: raw["stages"][name] for name in stages}
    judges = [raw["stages"]["label"]["judge_endpoint"]] if "label" in stages else []
    if "eval" in stages:
        judges += [j["endpoint"] for j in raw["stages"]["eval"]["win_rate"]["judges"] if "endpoint" in j]
    for judge in judges:
        judge.update(base_url=base_url, model=model, max_tokens=JUDGE_TOKENS, api_key_env=KEY_ENV)
    return raw


def verdicts_cached(home: Path) -> int:
    from rlhf_core.judging.verdict_cache import VerdictCache

    return len(VerdictCache(home / "cache" / "judge"))


def test_recipe_labels_with_the_served_judge_counts_unparseable_and_reruns_from_the_cache(
    judge_server, home, prefect_api_url, one_torch_thread, monkeypatch
):
    from flows.pipeline import run_pipeline
    from registry import tracking

    monkeypatch.setenv(KEY_ENV, SECRET)
    stages = ("data", "sft", "sample", "label")
    raw = recipe(judge_server.base_url, judge_server.model, stages)
    with pytest.raises(ValueError, match=r"stage 'label': no preference pair left.*judge_unparseable"):
        run_pipeline(parse_spec(raw), home=str(home))
    asked = verdicts_cached(home)
    assert asked > 0  # both orders of every pair, each answer kept

    # The same judge moved to an address where nothing listens: every answer comes from the cache.
    moved = recipe(f"http://127.0.0.1:{free_port()}/v1", judge_server.model, stages)
    moved["stages"]["label"]["judge_endpoint"]["max_retries"] = 0
    with pytest.raises(ValueError, match=r"no preference pair left.*'judge_unparseable': (\d+)") as failed:
        run_pipeline(parse_spec(moved), home=str(home))
    assert "connect" not in str(failed.value).lower() and verdicts_cached(home) == asked

    # on_unparseable: fail names the prompt whose verdict could not be read (still no request sent).
    moved["stages"]["label"]["judge_endpoint"]["on_unparseable"] = "fail"
    with pytest.raises(ValueError, match=r"stage 'label': prompt .*no \[\[A\]\], \[\[B\]\] or \[\[C\]\]"):
        run_pipeline(parse_spec(moved), home=str(home))

    experiment = tracking.client().get_experiment_by_name(raw["name"]).experiment_id
    runs = tracking.client().search_runs([experiment], "tags.`rlhf.stage` = 'label'")
    assert len(runs) == 3 and {r.info.status for r in runs} == {"FAILED"}
    for run in runs:  # the stage config is logged with the key's variable name, never the key
        logged = json.dumps(run.data.params) + json.dumps(run.data.tags)
        assert KEY_ENV in logged and SECRET not in logged


def test_recipe_win_rate_with_the_endpoint_judge_reports_unparseable_verdicts(
    judge_server, home, prefect_api_url, one_torch_thread, monkeypatch
):
    from flows.pipeline import run_pipeline

    monkeypatch.setenv(KEY_ENV, SECRET)
    raw = recipe(judge_server.base_url, judge_server.model, ("data", "sft", "eval"))
    raw["stages"]["eval"].update(models=["base", "sft"], baseline="base")
    outcomes = {o.stage: o for o in run_pipeline(parse_spec(raw), home=str(home))}
    assert outcomes["sft"].status == "cached"  # trained by the labelling test, same home
    report = outcomes["eval"].outputs["report"].metrics["sft"]
    name = "endpoint:judge"
    unparseable, judged = report[f"eval/judge_unparseable/{name}"], report[f"eval/win_rate/{name}_n"]
    prompts = report["eval/win_rate/verifier_n"]  # every prompt the verifier judged
    assert unparseable >= 1 and unparseable + judged <= prompts  # identical answers tie unasked


def test_moving_the_judge_keeps_the_fingerprint_and_a_new_rubric_changes_it():
    raw = recipe("http://localhost:8000/v1", "judge-model", ("data", "sft", "sample", "label", "dpo", "eval"))

    def fingerprint(edit) -> tuple[str, str]:
        """The label and eval stages' fingerprints after ``edit`` (inputs left out: they do not change)."""
        spec = copy.deepcopy(raw)
        edit(spec["stages"])
        stages = parse_spec(spec).stages
        return tuple(fingerprint_stage(stages[n].kind, stages[n], {}, 0) for n in ("label", "eval"))  # type: ignore[return-value]

    def endpoints(stages: dict) -> list[dict]:
        return [stages["label"]["judge_endpoint"], stages["eval"]["win_rate"]["judges"][1]["endpoint"]]

    def move(stages: dict) -> None:
        for judge in endpoints(stages):
            judge.update(base_url="https://judge.example.org/v1", api_key_env="OTHER", max_concurrency=2)
            judge.update(timeout_s=5, max_retries=0)

    def reword(stages: dict) -> None:
        stages["label"]["judge_endpoint"]["principles"] = ["Prefer the shorter answer."]
        stages["eval"]["win_rate"]["judges"][1]["endpoint"]["rubric"] = "Short answers are best."

    before = fingerprint(lambda stages: None)
    assert fingerprint(move) == before
    after = fingerprint(reword)
    assert after[0] != before[0] and after[1] != before[1]
    assert fingerprint(lambda s: endpoints(s)[1].update(scale={"low": 0, "high": 5}))[1] != before[1]


def test_an_endpoint_reward_source_scores_by_the_rubric_on_its_scale(tmp_path):
    from rlhf_core.judging.endpoint_stage_judges import reward_scorers
    from rlhf_core.rewards.composite import score_completions
    from rlhf_core.spec import RewardSourceSpec

    rows = [{"prompt": "What is 2 + 3?", "completion": c} for c in ("5", "6", "five")]
    with ScriptedServer(answer=lambda prompt: "Correct and short. [[score: 7]]") as server:
        judge = {"base_url": server.base_url, "model": "scripted", "rubric": "Correct answers are best."}
        source = RewardSourceSpec(endpoint=judge, weight=0.5)
        scorers = reward_scorers([source], tmp_path, "sample")
        scored, problems = score_completions(rows, [source], scorers, on_invalid="fail", stage="sample")
        again, _ = score_completions(rows, [source], scorers, on_invalid="fail", stage="sample")
    # [[score: 7]] on 1..10 -> (7 - 1) / (10 - 1) = 2/3; the composite is weight * score = 1/3
    assert [r["scores"]["endpoint:scripted"] for r in scored] == pytest.approx([2 / 3] * 3)
    assert [r["reward"] for r in scored] == pytest.approx([1 / 3] * 3) and problems == []
    assert len(server.requests) == 3 and again == scored  # the second scoring came from the cache
    request = server.requests[0]["body"]
    assert request["model"] == "scripted" and "Correct answers are best." in request["messages"][0]["content"]
    assert (tmp_path / "judge" / "verdicts.sqlite").exists()


def test_an_unparseable_endpoint_reward_is_an_invalid_reward_for_the_stage(tmp_path):
    from rlhf_core.judging.endpoint_stage_judges import reward_scorers
    from rlhf_core.rewards.composite import RewardValueError, score_completions
    from rlhf_core.spec import RewardSourceSpec

    rows = [{"prompt": "Say hi.", "completion": c} for c in ("hi", "bye")]
    answers = {"hi": "[[score: 9]]", "bye": "no score here"}
    with ScriptedServer(
        answer=lambda prompt: answers[prompt.split("[Response]\n")[1].split("\n")[0]]
    ) as server:
        judge = {"base_url": server.base_url, "model": "scripted", "rubric": "Friendly is best."}
        source = RewardSourceSpec(endpoint=judge)
        scorers = reward_scorers([source], tmp_path, "sample")
        kept, problems = score_completions(rows, [source], scorers, on_invalid="skip", stage="sample")
        assert [r["completion"] for r in kept] == ["hi"] and len(problems) == 1
        assert "row 1" in problems[0] and "no parseable [[score: N]]" in problems[0]
        with pytest.raises(RewardValueError, match=r"stage 'sample': .*endpoint:scripted.*row 1"):
            score_completions(rows, [source], scorers, on_invalid="fail", stage="sample")
        strict = RewardSourceSpec(endpoint={**judge, "on_unparseable": "fail"})
        with pytest.raises(ValueError, match=r"reward source 'endpoint:scripted'.*row 1.*no \[\[score"):
            score_completions(
                rows,
                [strict],
                reward_scorers([strict], tmp_path, "sample"),
                on_invalid="skip",
                stage="sample",
            )


def test_an_endpoint_reward_scores_in_sample_policy_gradient_and_evaluate_through_the_flow(
    tmp_path, prefect_api_url
):
    """A rubric judge as a reward source of three stage kinds in one pipeline run: every stage asks it
    (its answers are scripted: [[score: 7]] -> 2/3) and reports the score; a second run is cached."""
    from conftest import TINY_SPEC
    from mlflow import MlflowClient

    from flows.pipeline import run_pipeline

    with ScriptedServer(answer=lambda prompt: "Fine. [[score: 7]]") as server:
        judge = {"endpoint": {"base_url": server.base_url, "model": "scripted", "rubric": "Be correct."}}
        spec = copy.deepcopy({k: TINY_SPEC[k] for k in ("seed", "models")})
        sft = copy.deepcopy(TINY_SPEC["stages"]["sft"])
        sft["train"].update(max_steps=2, checkpoint_every=2)
        spec |= {
            "name": "endpoint-rewards",
            "stages": {
                "data": {"kind": "dataset", "source": {"synthetic": {"n": 40, "max_operand": 9}}},
                "sft": sft,
                "sample": {
                    "kind": "sample", "policy": "sft", "prompts": "data.prompts", "max_prompts": 3, "n": 2,
                    "rewards": [judge], "generation": {"max_new_tokens": 4},
                },
                "grpo": {
                    "kind": "policy_gradient", "algorithm": "grpo", "policy": "sft",
                    "prompts": "data.prompts", "rewards": [judge], "kl": {"beta": 0.0}, "rollouts": 1,
                    "prompts_per_rollout": 2, "group_size": 2, "truncated": "score",
                    "generation": {"max_new_tokens": 4}, "train": {"batch_size": 4},
                },
                "eval": {
                    "kind": "evaluate", "models": ["sft"], "prompts": "data.prompts", "max_prompts": 3,
                    "rewards": [judge], "generation": {"max_new_tokens": 4},
                },
            },
        }  # fmt: skip
        home = str(tmp_path / "home")
        outcomes = {o.stage: o for o in run_pipeline(parse_spec(spec), home=home)}
        asked = len(server.requests)
        again = {o.stage: o.status for o in run_pipeline(parse_spec(spec), home=home)}
    assert {s: o.status for s, o in outcomes.items()} == dict.fromkeys(outcomes, "ran")
    assert asked == 3 * 2 + 2 * 2 + 3  # sample 3 x 2, one rollout of 2 x 2, evaluate 3 answers
    assert len(server.requests) == asked and set(again.values()) == {"cached"}
    runs = {s: MlflowClient().get_run(outcomes[s].run_id).data.metrics for s in ("sample", "grpo", "eval")}
    assert runs["grpo"]["rollout/reward/endpoint:scripted"] == pytest.approx(2 / 3)
    assert runs["eval"]["sft/eval/reward/endpoint:scripted"] == pytest.approx(2 / 3)  # per model
    assert any(v == pytest.approx(2 / 3) for k, v in runs["sample"].items() if "reward_mean" in k)
