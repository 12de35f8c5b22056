"""Datasets for the pipeline: row schemas and validation, loading and splitting, synthetic tasks."""

from rlhf_core.data.loading import (
    directory_digest,
    file_digest,
    load_records,
    read_jsonl,
    split_records,
    write_jsonl,
)
from rlhf_core.data.schemas import (
    REQUIRED_COLUMNS,
    DatasetFormat,
    DataValidationError,
    sft_messages,
    validate_records,
)
from rlhf_core.data.synthetic import (
    SYNTHETIC_TASKS,
    ArithmeticProblem,
    arithmetic_corpus,
    extract_answer,
    format_solution,
    generate_arithmetic,
    is_correct,
    synthetic_records,
    to_preference_record,
    to_prompt_record,
    to_sft_record,
)

__all__ = [
    "REQUIRED_COLUMNS",
    "SYNTHETIC_TASKS",
    "ArithmeticProblem",
    "DataValidationError",
    "DatasetFormat",
    "arithmetic_corpus",
    "directory_digest",
    "extract_answer",
    "file_digest",
    "format_solution",
    "generate_arithmetic",
    "is_correct",
    "load_records",
    "read_jsonl",
    "sft_messages",
    "split_records",
    "synthetic_records",
    "to_preference_record",
    "to_prompt_record",
    "to_sft_record",
    "validate_records",
    "write_jsonl",
]
