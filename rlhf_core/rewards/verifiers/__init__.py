"""Built-in verifiers: score completions against what the prompt row carries.

Each module defines, per verifier, an ``<Name>Options`` pydantic model and a function
``<name>(completions, rows, options) -> RewardBatch``. Nothing is imported here, so importing one
verifier never pulls in another's dependencies.

- :mod:`~rlhf_core.rewards.verifiers.math_answer`: the final answer of a math completion
  (``\\boxed{}``, ``#### N``, "The answer is ...", last number) against the row's reference, compared
  by math-verify in a pool of worker processes;
- :mod:`~rlhf_core.rewards.verifiers.answer_extraction`: finding that final answer in text;
- :mod:`~rlhf_core.rewards.verifiers.timed_process_pool`: spawned worker processes with a per-task
  timeout, shared across batches;
- :mod:`~rlhf_core.rewards.verifiers.string_match`: format and string verifiers (``regex_match``,
  ``json_schema``, ``exact_match``, ``normalized_match``, ``multiple_choice``);
- :mod:`~rlhf_core.rewards.verifiers.code_tests`: a completion's code run against the row's asserts or
  stdin/stdout pairs in the sandbox of :mod:`rlhf_core.rewards.sandbox`.
"""
