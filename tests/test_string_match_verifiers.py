"""Format and string verifiers: regex_match, json_schema, exact_match, normalized_match, multiple_choice."""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from rlhf_core.errors import UserError
from rlhf_core.rewards.verifiers.string_match import (
    ExactMatchOptions,
    JsonSchemaOptions,
    MultipleChoiceOptions,
    NormalizedMatchOptions,
    RegexMatchOptions,
    chosen_letter,
    exact_match,
    json_schema,
    multiple_choice,
    normalized_match,
    regex_match,
)

CHOICE_ROWS = [
    {"question": "Which planet is known as the Red Planet?\n(A) Venus (B) Mars (C) Jupiter (D) Saturn",
     "answer": "B"},
    {"question": "What is the boiling point of water at sea level?\n(A) 90 C (B) 100 C (C) 110 C (D) 120 C",
     "answer": "(B)"},
    {"question": "Which gas do plants absorb?\nA) Oxygen B) Nitrogen C) Carbon dioxide D) Helium",
     "answer": "C"},
    {"question": "Who wrote 'Hamlet'?\nA. Dickens B. Austen C. Tolstoy D. Shakespeare", "answer": "d"},
]  # fmt: skip
PERSON_SCHEMA = {
    "type": "object",
    "properties": {"name": {"type": "string"}, "age": {"type": "integer", "minimum": 0}},
    "required": ["name", "age"],
}


def test_regex_match_search_full_and_flags():
    completions = ["Reasoning...\nAnswer: 42", "answer: 42", "no answer"]
    rows = [{}] * 3
    search = regex_match(completions, rows, RegexMatchOptions(pattern=r"Answer: \d+$"))
    assert search.scores == [1.0, 0.0, 0.0]
    ignoring_case = RegexMatchOptions(pattern=r"answer: \d+", mode="full", flags=("IGNORECASE",))
    assert regex_match(completions, rows, ignoring_case).scores == [0.0, 1.0, 0.0]
    with pytest.raises(ValidationError, match="not a valid regular expression"):
        RegexMatchOptions(pattern="(unclosed")


def test_json_schema_reads_bare_or_fenced_json_and_validates():
    completions = [
        '{"name": "Ada", "age": 36}',
        'Here you go:\n```json\n{"name": "Ada", "age": 36}\n```\nAnything else?',
        '{"name": "Ada", "age": -1}',
        '{"name": "Ada", "age": 36',
        '```json\n{"name": "Ada"}\n```',
    ]
    result = json_schema(completions, [{}] * 5, JsonSchemaOptions(json_schema=PERSON_SCHEMA))
    assert result.scores == [1.0, 1.0, 0.0, 0.0, 0.0]
    assert result.metrics["parsed"] == [1.0, 1.0, 1.0, 0.0, 1.0]


def test_json_schema_from_a_row_column_and_its_errors():
    rows = [
        {"schema": json.dumps(PERSON_SCHEMA)},
        {"schema": {"type": "array", "items": {"type": "integer"}}},
    ]
    result = json_schema(
        ['{"name": "B", "age": 2}', "[1, 2, 3]"], rows, JsonSchemaOptions(schema_column="schema")
    )
    assert result.scores == [1.0, 1.0]
    with pytest.raises(UserError, match=r"row 1 has no column 'schema'.*schema_column"):
        json_schema(["{}", "{}"], [rows[0], {"other": 1}], JsonSchemaOptions(schema_column="schema"))
    with pytest.raises(UserError, match=r"row 0, column 'schema' is not a valid JSON Schema"):
        json_schema(["{}"], [{"schema": {"type": "no-such-type"}}], JsonSchemaOptions(schema_column="schema"))
    with pytest.raises(ValidationError, match="exactly one"):
        JsonSchemaOptions()


def test_exact_match_with_a_list_of_acceptable_answers():
    rows = [{"answer": "Paris"}, {"answer": ["NYC", "New York City"]}, {"answer": "Paris"}]
    result = exact_match([" Paris\n", "New York City", "paris"], rows, ExactMatchOptions())
    assert result.scores == [1.0, 1.0, 0.0]
    assert exact_match([" Paris"], rows[:1], ExactMatchOptions(strip=False)).scores == [0.0]


def test_normalized_match_ignores_case_punctuation_articles_and_spacing():
    rows = [{"gold": "The Eiffel Tower"}, {"gold": ["Leonardo da Vinci", "da Vinci"]}, {"gold": "Mars"}]
    completions = ["eiffel   tower.", "Da Vinci!", "Venus"]
    options = NormalizedMatchOptions(answer_column="gold")
    assert normalized_match(completions, rows, options).scores == [1.0, 1.0, 0.0]
    keep_articles = NormalizedMatchOptions(answer_column="gold", remove_articles=False)
    assert normalized_match(completions[:1], rows[:1], keep_articles).scores == [0.0]
    with pytest.raises(
        UserError, match=r"row 0 has no column 'answer' \(its columns: \['gold'\]\).*answer_column"
    ):
        normalized_match(["x"], rows[:1], NormalizedMatchOptions())


@pytest.mark.parametrize(
    ("completion", "letter"),
    [
        ("Mars is red because of iron oxide. The answer is (B).", "B"),
        ("**B**", "B"),
        ("B) Mars, since its surface is rusty.", "B"),
        ("Answer: B", "B"),
        ("The answer is a tricky one; I would say **C**", "C"),  # 'a' is an article, not choice A
        ("(A) is wrong and (C) is wrong. Answer: D", "D"),
        ("I cannot tell.", None),
    ],
)
def test_chosen_letter(completion, letter):
    assert chosen_letter(completion, "ABCD") == letter


def test_multiple_choice_scores_rows_and_checks_the_letter_set():
    completions = ["The answer is (B).", "Answer: (B)", "**A**", "D) Shakespeare"]
    result = multiple_choice(completions, CHOICE_ROWS, MultipleChoiceOptions())
    assert result.scores == [1.0, 1.0, 0.0, 1.0]
    assert result.metrics["extracted"] == [1.0] * 4
    five = MultipleChoiceOptions(letters="ABCDE")
    assert multiple_choice(["Answer: E"], [{"answer": "E"}], five).scores == [1.0]
    with pytest.raises(UserError, match=r"row 0, column 'answer' holds 'E'.*'ABCD' \(option letters\)"):
        multiple_choice(["Answer: E"], [{"answer": "E"}], MultipleChoiceOptions())
    with pytest.raises(ValidationError):
        MultipleChoiceOptions(letters="abc")
