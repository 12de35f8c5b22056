"""The evaluate stage's comparison fields: baseline, reference, win_rate, pass_at_k, kl."""

from __future__ import annotations

import pytest

from rlhf_core.spec import SpecError, parse_spec


def _problems(spec: dict) -> list[str]:
    with pytest.raises(SpecError) as info:
        parse_spec(spec)
    return info.value.problems


@pytest.fixture
def spec(tiny_spec_dict) -> dict:
    tiny_spec_dict["stages"]["eval"] |= {
        "baseline": "base",
        "win_rate": {
            "judges": [
                "verifier",
                {"model": "rm", "tie_margin": 0.1},
                {"function": "length_penalty"},
                {"policy": {"model": "sft", "principles": ["Correct arithmetic first."]}},
            ]
        },
        "pass_at_k": {"n": 8, "k": [1, 4, 8], "generation": {"temperature": 1.0}},
    }
    return tiny_spec_dict


def test_a_full_comparison_block_validates_and_its_models_are_inputs(spec):
    parsed = parse_spec(spec)
    stage = parsed.stages["eval"]
    assert [j.name for j in stage.win_rate.judges] == ["verifier", "rm:rm", "length_penalty", "policy:sft"]
    assert stage.kl_reference == "base" and stage.kl is not None  # the KL defaults to the baseline
    assert {"win_rate.judges[1].model", "win_rate.judges[3].policy.model", "baseline"} <= set(
        stage.input_refs()
    )
    assert "rm" in parsed.dependencies("eval")  # the reward-model judge runs before the evaluation
    spec["stages"]["eval"]["reference"] = "sft"
    assert parse_spec(spec).stages["eval"].kl_reference == "sft"


def test_k_larger_than_n_names_the_field(spec):
    spec["stages"]["eval"]["pass_at_k"] = {"n": 4, "k": [1, 8]}
    (problem,) = _problems(spec)
    assert problem.startswith(
        "stage 'eval', field pass_at_k: pass_at_k.k: k=8 is not within 1..pass_at_k.n=4"
    )


def test_baseline_must_be_one_of_the_models(spec):
    spec["stages"]["eval"]["baseline"] = "rm"
    (problem,) = _problems(spec)
    assert problem.startswith("stage 'eval', field baseline: baseline 'rm' is not one of models (base, sft)")


def test_win_rate_needs_a_baseline_and_distinct_known_judges(spec):
    del spec["stages"]["eval"]["baseline"]
    (problem,) = _problems(spec)
    assert problem.startswith("stage 'eval': win_rate compares each model with the baseline: give `baseline`")
    spec["stages"]["eval"]["baseline"] = "base"
    spec["stages"]["eval"]["win_rate"] = {"judges": ["verifier", {"verifier": True}]}
    assert _problems(spec) == [
        "stage 'eval', field win_rate: win_rate.judges: judge 'verifier' is given twice"
    ]
    spec["stages"]["eval"]["win_rate"] = {"judges": ["verfier"]}
    (problem,) = _problems(spec)
    assert problem.startswith("stage 'eval', field win_rate.judges: unknown judge 'verfier'")
    spec["stages"]["eval"]["win_rate"] = {"judges": [{"verifier": True, "tie_margin": 0.5}]}
    (problem,) = _problems(spec)
    assert "field win_rate.judges.0: tie_margin applies to reward judges" in problem
    spec["stages"]["eval"]["win_rate"] = {"judges": [{"model": "sft"}]}
    (problem,) = _problems(spec)
    assert (
        problem
        == "stage 'eval', field win_rate.judges[0].model: 'sft' is a policy model, expected a reward model"
    )


def test_pass_at_k_and_win_rate_need_prompts(spec):
    del spec["stages"]["eval"]["prompts"]
    (problem,) = _problems(spec)
    assert problem.startswith("stage 'eval'") and "needs `prompts`" in problem


def test_the_schema_accepts_the_verifier_shorthand(spec):
    import jsonschema

    from rlhf_core.spec.loading import pipeline_json_schema

    jsonschema.validate(spec, pipeline_json_schema())
