"""Format and string verifiers (book ch.7, verifiable rewards): 1.0 when the completion passes, else 0.0.

- ``regex_match``: the completion matches a pattern (a format reward: "ends with 'Answer: X'");
- ``json_schema``: the completion is JSON (bare, or inside a ```json fence) valid against a schema given
  in the options or carried by each row;
- ``exact_match`` / ``normalized_match``: the completion equals the row's answer (or one of a list of
  answers), exactly or after SQuAD-style normalisation (case, punctuation, articles, whitespace);
- ``multiple_choice``: the letter the completion chose ("The answer is (B)", "**B**", "Answer: B",
  "B) ...") equals the row's letter.

These run in the caller's process: each check is a regex or a JSON parse, linear in the text.
"""

from __future__ import annotations

import json
import re
import string
from typing import Any, Literal

import jsonschema
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from rlhf_core.errors import UserError
from rlhf_core.rewards.reward_batch import RewardBatch

_FROZEN = ConfigDict(extra="forbid", frozen=True)


def _row_value(row: dict, row_index: int, column: str, option: str, verifier: str) -> Any:
    """``row[column]``, or a UserError naming the row, the column, the row's columns and the option."""
    if column not in row:
        raise UserError(
            f"{verifier}: row {row_index} has no column '{column}' (its columns: {sorted(row)}); "
            f"set the option {option} to the column that holds it"
        )
    return row[column]


def _check_lengths(verifier: str, completions: list[str], rows: list[dict]) -> None:
    if len(completions) != len(rows):
        raise ValueError(f"{verifier} got {len(completions)} completions for {len(rows)} rows")


class RegexMatchOptions(BaseModel):
    """What ``regex_match`` looks for."""

    model_config = _FROZEN
    pattern: str = Field(description="Python regular expression the completion must match.")
    mode: Literal["search", "full"] = Field(
        "search", description="'search': anywhere in the completion; 'full': the whole (stripped) completion."
    )
    flags: tuple[Literal["IGNORECASE", "MULTILINE", "DOTALL"], ...] = Field(
        (), description="re flags by name, e.g. ['IGNORECASE', 'DOTALL']."
    )

    @field_validator("pattern")
    @classmethod
    def _compiles(cls, pattern: str) -> str:
        try:
            re.compile(pattern)
        except re.error as error:
            raise ValueError(f"pattern {pattern!r} is not a valid regular expression: {error}") from None
        return pattern


def regex_match(completions: list[str], rows: list[dict], options: RegexMatchOptions) -> RewardBatch:
    """1.0 where the completion matches ``options.pattern`` (``search`` or ``full``), else 0.0."""
    _check_lengths("regex_match", completions, rows)
    flags = 0
    for name in options.flags:
        flags |= getattr(re, name)
    compiled = re.compile(options.pattern, flags)
    match = compiled.search if options.mode == "search" else compiled.fullmatch
    scores = [1.0 if match(completion.strip()) else 0.0 for completion in completions]
    return RewardBatch(scores=scores, metrics={"matched": list(scores)})


class JsonSchemaOptions(BaseModel):
    """Where ``json_schema`` finds the schema, and how it reads the completion."""

    model_config = _FROZEN
    json_schema: dict | None = Field(None, description="The JSON Schema every completion must satisfy.")
    schema_column: str | None = Field(
        None, description="Row column holding each row's JSON Schema (a dict or a JSON string) instead."
    )
    fenced: bool = Field(
        True, description="Read the first ```json (or ```) fenced block when the completion has one."
    )

    @model_validator(mode="after")
    def _one_schema_source(self) -> JsonSchemaOptions:
        if (self.json_schema is None) == (self.schema_column is None):
            raise ValueError("json_schema needs exactly one of the options json_schema and schema_column")
        if self.json_schema is not None:
            _checked_schema(self.json_schema, "the option json_schema")
        return self


_FENCE = re.compile(r"```(?:json)?[ \t]*\n(.*?)```", re.DOTALL | re.IGNORECASE)


def _checked_schema(schema: Any, where: str) -> dict:
    """A JSON Schema as a dict (parsed when a string), checked against its metaschema."""
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except json.JSONDecodeError as error:
            raise UserError(f"json_schema: {where} is not valid JSON: {error}") from None
    try:
        jsonschema.validators.validator_for(schema).check_schema(schema)
    except (jsonschema.SchemaError, TypeError, AttributeError) as error:
        raise UserError(f"json_schema: {where} is not a valid JSON Schema: {str(error)[:300]}") from None
    return schema


def _completion_json(completion: str, fenced: bool) -> tuple[bool, Any]:
    """(parsed, value) of the completion's JSON: the fenced block if asked and present, else the text."""
    fence = _FENCE.search(completion) if fenced else None
    try:
        return True, json.loads(fence.group(1) if fence else completion)
    except json.JSONDecodeError:
        return False, None


def json_schema(completions: list[str], rows: list[dict], options: JsonSchemaOptions) -> RewardBatch:
    """1.0 where the completion's JSON parses and validates against the schema, else 0.0."""
    _check_lengths("json_schema", completions, rows)
    parsed_metric, scores = [], []
    for i, (completion, row) in enumerate(zip(completions, rows, strict=True)):
        if options.schema_column is None:
            schema = options.json_schema
        else:
            value = _row_value(row, i, options.schema_column, "schema_column", "json_schema")
            schema = _checked_schema(value, f"row {i}, column '{options.schema_column}'")
        parsed, value = _completion_json(completion, options.fenced)
        valid = parsed and jsonschema.validators.validator_for(schema)(schema).is_valid(value)
        parsed_metric.append(float(parsed))
        scores.append(float(valid))
    return RewardBatch(scores=scores, metrics={"parsed": parsed_metric, "valid": list(scores)})


class ExactMatchOptions(BaseModel):
    """Which column ``exact_match`` compares with."""

    model_config = _FROZEN
    answer_column: str = Field("answer", description="Row column with the answer, or a list of answers.")
    strip: bool = Field(True, description="Ignore leading and trailing whitespace on both sides.")


def _acceptable(value: Any) -> list[str]:
    return [str(item) for item in value] if isinstance(value, list | tuple) else [str(value)]


def exact_match(completions: list[str], rows: list[dict], options: ExactMatchOptions) -> RewardBatch:
    """1.0 where the completion equals the row's answer (or one of its answers), else 0.0."""
    _check_lengths("exact_match", completions, rows)

    def prepared(text: str) -> str:
        return text.strip() if options.strip else text

    scores = []
    for i, (completion, row) in enumerate(zip(completions, rows, strict=True)):
        answers = _acceptable(_row_value(row, i, options.answer_column, "answer_column", "exact_match"))
        scores.append(float(prepared(completion) in {prepared(answer) for answer in answers}))
    return RewardBatch(scores=scores, metrics={"correct": list(scores)})


class NormalizedMatchOptions(BaseModel):
    """Which column ``normalized_match`` compares with, and which normalisation steps apply."""

    model_config = _FROZEN
    answer_column: str = Field("answer", description="Row column with the answer, or a list of answers.")
    lowercase: bool = Field(True, description="Compare case-insensitively.")
    remove_punctuation: bool = Field(True, description="Drop ASCII punctuation.")
    remove_articles: bool = Field(True, description="Drop the English articles 'a', 'an', 'the'.")


_ARTICLES = re.compile(r"\b(?:a|an|the)\b", re.IGNORECASE)
_PUNCTUATION = str.maketrans("", "", string.punctuation)


def normalize_text(text: str, options: NormalizedMatchOptions) -> str:
    """SQuAD-style normalisation: lowercase, punctuation and articles dropped, whitespace collapsed."""
    if options.lowercase:
        text = text.lower()
    if options.remove_punctuation:
        text = text.translate(_PUNCTUATION)
    if options.remove_articles:
        text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def normalized_match(
    completions: list[str], rows: list[dict], options: NormalizedMatchOptions
) -> RewardBatch:
    """1.0 where the normalised completion equals a normalised acceptable answer, else 0.0."""
    _check_lengths("normalized_match", completions, rows)
    scores = []
    for i, (completion, row) in enumerate(zip(completions, rows, strict=True)):
        answers = _acceptable(_row_value(row, i, options.answer_column, "answer_column", "normalized_match"))
        wanted = {normalize_text(answer, options) for answer in answers}
        scores.append(float(normalize_text(completion, options) in wanted))
    return RewardBatch(scores=scores, metrics={"correct": list(scores)})


class MultipleChoiceOptions(BaseModel):
    """The letters a question offers and the column holding the right one."""

    model_config = _FROZEN
    answer_column: str = Field("answer", description="Row column with the correct letter ('B' or '(B)').")
    letters: str = Field(
        "ABCD", pattern=r"^[A-Z]{2,26}$", description="The choice letters, upper case, e.g. 'ABCDE'."
    )


def _choice_patterns(letters: str) -> list[re.Pattern]:
    """Ways a completion states its choice, most explicit first; each captures the letter."""
    letter = f"([{letters}])"
    return [
        re.compile(rf"(?i:answer\s*(?:is|:)\s*(?:option\s*)?)[(*\[]*{letter}\b"),  # The answer is (B)
        re.compile(rf"\*\*\(?{letter}\)?\*\*"),  # **B** or **(B)**
        re.compile(rf"(?:^|\n)\s*\(?{letter}[).:]"),  # B) ... / (B) ... / B. at a line's start
        re.compile(rf"^\s*\(?{letter}\)?\s*$"),  # the whole completion is the letter
    ]


def chosen_letter(completion: str, letters: str) -> str | None:
    """The letter the completion picked (the last statement of the most explicit form), or None."""
    for pattern in _choice_patterns(letters):
        found = pattern.findall(completion)
        if found:
            return found[-1].upper()
    return None


def multiple_choice(completions: list[str], rows: list[dict], options: MultipleChoiceOptions) -> RewardBatch:
    """1.0 where the letter the completion chose is the row's letter, else 0.0."""
    _check_lengths("multiple_choice", completions, rows)
    extracted, scores = [], []
    for i, (completion, row) in enumerate(zip(completions, rows, strict=True)):
        value = _row_value(row, i, options.answer_column, "answer_column", "multiple_choice")
        correct = str(value).strip().strip("()").upper()
        if len(correct) != 1 or correct not in options.letters:
            raise UserError(
                f"multiple_choice: row {i}, column '{options.answer_column}' holds {value!r}; expected one "
                f"of the letters {options.letters!r} (option letters)"
            )
        chosen = chosen_letter(completion, options.letters)
        extracted.append(float(chosen is not None))
        scores.append(float(chosen == correct))
    return RewardBatch(scores=scores, metrics={"extracted": extracted, "correct": list(scores)})
