"""Distillation compares two models' next-token distributions token by token, so teacher and student must
share a tokenizer: the same vocabulary (token -> id), special tokens and chat template. Checked on the
loaded tokenizers when the stage starts, before any model is loaded or trained; the error names both
models and the first difference found.
"""

from __future__ import annotations

from transformers import PreTrainedTokenizerBase

from rlhf_core.errors import UserError

SPECIAL_TOKEN_ROLES = ("bos_token", "eos_token", "pad_token", "unk_token")


def _vocabulary_difference(teacher: dict[str, int], student: dict[str, int]) -> str | None:
    """The first token (by the teacher's id, then the student's) whose id differs or is missing."""
    for token, ident in sorted(teacher.items(), key=lambda item: item[1]):
        if student.get(token) != ident:
            found = f"id {student[token]}" if token in student else "missing"
            return (
                f"token {token!r} has id {ident} in the teacher's vocabulary and is {found} in the student's"
            )
    for token, ident in sorted(student.items(), key=lambda item: item[1]):
        if token not in teacher:
            return f"token {token!r} (id {ident}) is in the student's vocabulary and missing in the teacher's"
    return None


def _special_token_difference(
    teacher: PreTrainedTokenizerBase, student: PreTrainedTokenizerBase
) -> str | None:
    for role in SPECIAL_TOKEN_ROLES:
        ours, theirs = getattr(teacher, role), getattr(student, role)
        if ours != theirs:
            return f"{role} is {ours!r} for the teacher and {theirs!r} for the student"
    extra_t, extra_s = sorted(teacher.all_special_tokens), sorted(student.all_special_tokens)
    if extra_t != extra_s:
        only_t, only_s = set(extra_t) - set(extra_s), set(extra_s) - set(extra_t)
        return f"special tokens differ: teacher only {sorted(only_t)}, student only {sorted(only_s)}"
    return None


def _template_difference(teacher: str | None, student: str | None) -> str | None:
    if teacher == student:
        return None
    if teacher is None or student is None:
        return f"only the {'student' if teacher is None else 'teacher'} has a chat template"
    at = next((i for i, (a, b) in enumerate(zip(teacher, student, strict=False)) if a != b), None)
    at = min(len(teacher), len(student)) if at is None else at
    return (
        f"the chat templates differ from character {at}: teacher {teacher[at : at + 30]!r}, "
        f"student {student[at : at + 30]!r}"
    )


def tokenizer_difference(teacher: PreTrainedTokenizerBase, student: PreTrainedTokenizerBase) -> str | None:
    """The first way the two tokenizers differ (vocabulary, special tokens, chat template); None: same."""
    return (
        _vocabulary_difference(teacher.get_vocab(), student.get_vocab())
        or _special_token_difference(teacher, student)
        or _template_difference(teacher.chat_template, student.chat_template)
    )


def check_shared_tokenizer(
    teacher: PreTrainedTokenizerBase,
    student: PreTrainedTokenizerBase,
    *,
    stage: str,
    teacher_name: str,
    student_name: str,
) -> None:
    """UserError naming the stage, both models and the first difference when they do not share a
    tokenizer."""
    if difference := tokenizer_difference(teacher, student):
        raise UserError(
            f"stage '{stage}': teacher '{teacher_name}' and student '{student_name}' do not share a "
            f"tokenizer, so their next-token distributions cannot be compared token by token: {difference}. "
            "Distil into a student built on the teacher's tokenizer."
        )
