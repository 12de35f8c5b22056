"""Generative reward models (book ch.5): judge SFT rows from preference rows, the sft stage registering
role judge, and the reference type that takes a policy or a judge where a model is prompted."""

from __future__ import annotations

import pytest
from pydantic import BaseModel

from rlhf_core.judging.policy_judge import judge_prompt, parse_verdict
from rlhf_core.refs import ModelRef
from rlhf_core.spec import PipelineSpec, SFTStage, ref_type
from rlhf_core.spec.references import PolicyOrJudgeModel, RefType, model_output, reference_fields
from rlhf_core.training.sft.judge_rows import judge_rows

PRINCIPLES = ("Prefer the correct answer.",)
PAIRS = [
    {"prompt": "What is 2 + 3?", "chosen": "The answer is 5.", "rejected": "The answer is 6."},
    {"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 1 + 1?"}],
     "chosen": [{"role": "assistant", "content": "2"}], "rejected": [{"role": "assistant", "content": "3"}]},
]  # fmt: skip


def test_judge_rows_are_the_policy_judges_prompt_with_the_verdict_in_both_orders():
    rows = judge_rows(PAIRS, PRINCIPLES)
    assert rows[0] == {
        "prompt": judge_prompt(PRINCIPLES, "What is 2 + 3?", "The answer is 5.", "The answer is 6."),
        "completion": "[[A]]",
    }
    assert rows[1] == {
        "prompt": judge_prompt(PRINCIPLES, "What is 2 + 3?", "The answer is 6.", "The answer is 5."),
        "completion": "[[B]]",
    }
    # a conversation's question is its last user turn; replies given as messages are their text
    assert rows[2]["prompt"] == judge_prompt(PRINCIPLES, "What is 1 + 1?", "2", "3")
    assert [parse_verdict(r["completion"]) for r in rows] == ["A", "B", "A", "B"]


def test_one_order_per_pair_puts_the_chosen_response_first_or_second_at_random():
    rows = judge_rows(PAIRS * 10, PRINCIPLES, both_orders=False, seed=3)
    assert len(rows) == 20
    assert {r["completion"] for r in rows} == {"[[A]]", "[[B]]"}
    assert rows == judge_rows(PAIRS * 10, PRINCIPLES, both_orders=False, seed=3)  # seeded


def test_the_sft_stage_registers_a_judge_when_it_learns_verdicts():
    judge = SFTStage(
        kind="sft", model="base", judge={"preferences": "label.preferences", "principles": PRINCIPLES}
    )
    assert judge.register_role == "judge" and judge.output_types() == {"model": model_output("judge")}
    assert SFTStage(kind="sft", model="base", data="data.sft").output_types()["model"] == model_output(
        "policy"
    )
    assert "judge.preferences" in judge.input_refs()
    with pytest.raises(ValueError, match="give data .*, judge .*, or both"):
        SFTStage(kind="sft", model="base")


def _resolved(role: str) -> ModelRef:
    return ModelRef(uri="/m", digest="d", role=role, tokenizer_digest="t", stage="s", base_model="b")


def test_a_policy_or_judge_type_takes_both_and_refuses_a_reward_model_readably():
    either = RefType("model", ("policy", "judge"))
    assert str(either) == "model:policy|judge" and either.describe() == "a policy or judge model"
    assert either.covers(model_output("policy")) and either.covers(model_output("judge"))
    assert not either.covers(model_output("reward"))
    assert not model_output("policy").covers(either)  # a policy-only field takes no judge
    assert either.accepts(_resolved("judge")) and either.accepts(_resolved("policy"))
    assert not either.accepts(_resolved("reward"))
    assert model_output("policy").describe() == "a policy model"  # one role reads as before
    with pytest.raises(ValueError, match="take one or more of"):
        RefType("model", ("policy", "critic"))


class _JudgeField(BaseModel):
    model: PolicyOrJudgeModel


def test_a_judge_field_checked_against_a_pipeline_reads_well():
    """The pipeline's reference check compares the output's type with the field's (``covers``)."""
    spec = PipelineSpec.model_validate(
        {
            "name": "judges",
            "models": {"base": {"tiny": {"hidden_size": 32, "layers": 1, "heads": 2, "vocab_size": 320}}},
            "stages": {
                "data": {"kind": "dataset", "source": {"synthetic": {"n": 20}}},
                "sft": {"kind": "sft", "model": "base", "data": "data.sft"},
                "judge": {"kind": "sft", "model": "sft", "judge": {"preferences": "data.preferences",
                                                                   "principles": list(PRINCIPLES)}},
                "rm": {"kind": "reward_model", "model": "sft", "data": "data.preferences"},
            },
        }
    )  # fmt: skip
    for name, accepted in {"base": True, "sft": True, "judge": True, "rm": False}.items():
        (_, (ref, expected)), = reference_fields(_JudgeField(model=name)).items()  # fmt: skip
        actual, error = ref_type(spec, ref)
        assert error is None and expected.covers(actual) is accepted, name
    actual, _ = ref_type(spec, "rm")
    message = f"'rm' is {actual.describe()}, expected {expected.describe()}"
    assert message == "'rm' is a reward model, expected a policy or judge model"


def test_a_judge_model_judges_where_a_policy_judge_is_asked(tiny_spec_dict):
    """A judge (an sft stage on verdicts) labels preferences and judges win rates; a policy still does; a
    reward model is refused, naming the field and what it takes."""
    from rlhf_core.spec import SpecError, parse_spec

    stages = tiny_spec_dict["stages"]
    stages["judge"] = {"kind": "sft", "model": "sft", "judge": {"preferences": "data.preferences",
                                                                "principles": list(PRINCIPLES)}}  # fmt: skip
    stages["sample"] = {"kind": "sample", "policy": "sft", "prompts": "data.prompts",
                        "rewards": [{"function": "arithmetic_exact"}]}  # fmt: skip
    stages["label"] = {"kind": "label_preferences", "completions": "sample.completions",
                       "judge_policy": {"model": "judge", "principles": list(PRINCIPLES)}}  # fmt: skip
    judges = [{"policy": {"model": m, "principles": list(PRINCIPLES)}} for m in ("judge", "sft")]
    stages["eval"] |= {"baseline": "base", "win_rate": {"judges": judges}}
    spec = parse_spec(tiny_spec_dict)
    assert "judge" in spec.dependencies("label") and "judge" in spec.dependencies("eval")
    stages["label"]["judge_policy"]["model"] = "rm"
    with pytest.raises(SpecError) as info:
        parse_spec(tiny_spec_dict)
    assert info.value.problems == [
        "stage 'label', field judge_policy.model: 'rm' is a reward model, expected a policy or judge model"
    ]
