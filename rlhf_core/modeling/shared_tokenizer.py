"""Whether a teacher reads a student's token ids as the same tokens (distillation, book ch.12).

Both forms of distillation compare the two models token by token at the same ids: the ``distill`` stage
(the teacher's next-token distribution at every position of the student's rows) and on-policy
distillation (the teacher's log-probs of the tokens the student sampled). So every token of the student's
vocabulary must have the same id in the teacher's (a teacher may have more tokens after them), and the
special tokens that frame an answer must be the same: a teacher ending its answers with another EOS
would teach the student never to stop. The chat templates are not compared: both models read the ids
the student's template wrote (models of one family may word their templates differently and still
share every token).
"""

from __future__ import annotations

from transformers import PreTrainedTokenizerBase

from rlhf_core.errors import UserError

SPECIAL_TOKENS = ("eos_token", "bos_token", "unk_token")


def tokenizer_difference(student: PreTrainedTokenizerBase, teacher: PreTrainedTokenizerBase) -> str | None:
    """The first reason the teacher would read the student's token ids as other tokens, or None."""
    student_vocab, teacher_vocab = student.get_vocab(), teacher.get_vocab()
    teacher_by_id = {i: token for token, i in teacher_vocab.items()}
    for token, i in sorted(student_vocab.items(), key=lambda item: item[1]):
        if teacher_vocab.get(token) != i:
            theirs = teacher_by_id.get(i)
            seen = f"{theirs!r}" if theirs is not None else "no token"
            return f"vocabulary: token id {i} is {token!r} for the student and {seen} for the teacher"
    for name in SPECIAL_TOKENS:
        mine, theirs = getattr(student, name), getattr(teacher, name)
        if mine != theirs:
            return f"special tokens: the student's {name} is {mine!r}, the teacher's {theirs!r}"
    return None


def check_shared_tokenizer(
    student: PreTrainedTokenizerBase,
    teacher: PreTrainedTokenizerBase,
    *,
    stage: str,
    field: str,
    student_name: str,
    teacher_name: str,
) -> None:
    """UserError naming the stage, the field, both models and the first difference when the teacher does
    not read the student's token ids as the same tokens."""
    if difference := tokenizer_difference(student, teacher):
        raise UserError(
            f"stage '{stage}', field {field}: the teacher '{teacher_name}' does not share the tokenizer of "
            f"the student '{student_name}' ({difference}); distillation compares the two models at the "
            "student's token ids: pick a teacher of the same tokenizer"
        )
