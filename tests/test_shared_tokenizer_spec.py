"""A teacher and its student must share a tokenizer (distillation, book ch.12): refused when the spec is
read where the base models already tell they cannot (tiny models trained to other tokenizers, a tiny
model and a hub model), for the ``distill`` stage and on-policy distillation alike."""

from __future__ import annotations

import pytest

from rlhf_core.spec import SpecError, parse_spec


def _spec(student: dict, teacher: dict, on_policy: bool) -> dict:
    stage = (
        {"kind": "policy_gradient", "algorithm": "grpo", "policy": "student", "prompts": "data.prompts",
         "distillation": {"teacher": "teacher_sft"}}
        if on_policy
        else {"kind": "distill", "student": "student", "teacher": "teacher_sft", "data": "data.sft"}
    )  # fmt: skip
    return {
        "name": "kd",
        "models": {"student": student, "teacher": teacher},
        "stages": {
            "data": {"kind": "dataset", "source": {"synthetic": {"n": 20}}},
            "teacher_sft": {"kind": "sft", "model": "teacher", "data": "data.sft"},
            "learn": stage,
        },
    }


def _tiny(**shape) -> dict:
    return {"tiny": {"hidden_size": 32, "layers": 1, "heads": 2, **shape}}


@pytest.mark.parametrize("on_policy", [False, True], ids=["distill", "on_policy"])
def test_tiny_models_of_one_tokenizer_recipe_may_distil_whatever_their_width(on_policy):
    spec = parse_spec(_spec(_tiny(), _tiny(hidden_size=64, layers=2), on_policy))
    assert "learn" in spec.stages


@pytest.mark.parametrize("on_policy", [False, True], ids=["distill", "on_policy"])
@pytest.mark.parametrize(
    ("student", "teacher", "why"),
    [
        (_tiny(vocab_size=320), _tiny(vocab_size=512), "vocab_size 320, corpus arithmetic; teacher teacher: "
         "vocab_size 512"),
        (_tiny(tokenizer_corpus="arithmetic_tools"), _tiny(), "corpus arithmetic_tools"),
        (_tiny(), {"hub": "Qwen/Qwen2.5-0.5B"}, "one descends from a tiny model"),
    ],
    ids=["vocab_size", "corpus", "tiny_and_hub"],
)  # fmt: skip
def test_a_teacher_that_cannot_share_the_students_tokenizer_is_refused(student, teacher, why, on_policy):
    field = "distillation.teacher" if on_policy else "teacher"
    with pytest.raises(SpecError) as info:
        parse_spec(_spec(student, teacher, on_policy))
    message = str(info.value)
    assert (
        f"stage 'learn', field {field}: the teacher 'teacher_sft' and the student 'student' cannot share a "
        "tokenizer" in message
    )
    assert why in message


def test_hub_models_are_left_to_the_check_on_their_tokenizers():
    """Two hub models may or may not share a tokenizer: the stage compares the tokenizers when it starts."""
    spec = parse_spec(_spec({"hub": "org/small"}, {"hub": "org/large"}, on_policy=False))
    assert "learn" in spec.stages
