"""`environment:` in a spec (book ch.13): bad declarations fail before anything runs, naming the stage and
what was wrong; a user's environment class and tool functions are part of the stage's fingerprint."""

from __future__ import annotations

import re
import textwrap

import pytest

from rlhf_core.fingerprint import describe_part_changes, fingerprint_parts
from rlhf_core.spec import SpecError, parse_spec

ENVIRONMENT = textwrap.dedent(
    """
    from rlhf_core.environments.base import EpisodeStart, StepResult

    class Echo:
        def __init__(self, rounds=1):
            self.rounds = rounds

        def reset(self, row):
            return EpisodeStart([{"role": "user", "content": row["prompt"]}])

        def step(self, assistant):
            return StepResult(done=True, reward=1.0)
    """
)
TOOL = textwrap.dedent(
    '''
    def lookup(city: str) -> str:
        """The weather in a city."""
        return f"sunny in {city}"
    '''
)


def _spec(tiny_spec_dict: dict, environment: dict, base_dir=".") -> object:
    spec = dict(tiny_spec_dict)
    spec["stages"] = {
        "data": {"kind": "dataset", "source": {"synthetic": {"task": "arithmetic", "n": 20}}},
        "sample": {"kind": "sample", "policy": "base", "prompts": "data.prompts", "environment": environment},
    }
    return parse_spec(spec, base_dir=base_dir)


@pytest.mark.parametrize(
    ("environment", "expected"),
    [
        (
            {"name": "toolz"},
            r"unknown environment 'toolz' \(built-in: tools, user_simulator, verifier_feedback",
        ),
        ({"name": "tools", "tools": ["abacus"]}, r"abacus"),
        (
            {"name": "tools", "tools": [{"function": "math:sqrt", "parameters": {"type": "objekt"}}]},
            r"tools\[0\].*(JSON Schema|objekt)",
        ),
        ({"name": "tools", "tools": ["calculator"], "options": {"call_style": "xml"}}, r"call_style"),
        (
            {"name": "verifier_feedback", "verifier": "no_such_verifier"},
            r"unknown verifier 'no_such_verifier'",
        ),
        ({"name": "envs.py:Missing"}, r"envs\.py"),
        ({"name": "tools", "tools": ["calculator"], "max_turns": 0}, r"max_turns"),
    ],
)
def test_a_bad_environment_is_refused_naming_the_stage(tiny_spec_dict, tmp_path, environment, expected):
    with pytest.raises(SpecError, match=r"sample") as raised:
        _spec(tiny_spec_dict, environment, base_dir=tmp_path)
    assert any(re.search(expected, p) for p in raised.value.problems), raised.value.problems


def test_a_sample_stage_needs_rewards_or_an_environment(tiny_spec_dict):
    spec = dict(tiny_spec_dict)
    spec["stages"] = {
        "data": {"kind": "dataset", "source": {"synthetic": {"task": "arithmetic", "n": 20}}},
        "sample": {"kind": "sample", "policy": "base", "prompts": "data.prompts"},
    }
    with pytest.raises(SpecError, match="at least one reward source"):
        parse_spec(spec)


def test_a_class_without_step_is_refused(tiny_spec_dict, tmp_path):
    (tmp_path / "envs.py").write_text("class Half:\n    def reset(self, row):\n        return None\n")
    with pytest.raises(SpecError, match=r"environment 'envs.py:Half' has no step method"):
        _spec(tiny_spec_dict, {"name": "envs.py:Half"}, base_dir=tmp_path)


def test_the_environment_and_tool_code_are_part_of_the_fingerprint(tiny_spec_dict, tmp_path):
    (tmp_path / "envs.py").write_text(ENVIRONMENT)
    (tmp_path / "tools.py").write_text(TOOL)
    tool = {
        "function": "tools.py:lookup",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    }

    def parts():
        user_env = _spec(
            tiny_spec_dict, {"name": "envs.py:Echo", "options": {"rounds": 2}}, base_dir=tmp_path
        )
        tools = _spec(tiny_spec_dict, {"name": "tools", "tools": [tool]}, base_dir=tmp_path)
        return (
            fingerprint_parts("sample", user_env.stages["sample"], {}, 0),
            fingerprint_parts("sample", tools.stages["sample"], {}, 0),
        )

    env_before, tool_before = parts()
    assert any(key.startswith("function:environment.name") for key in env_before)
    assert any(key.startswith("function:environment.tools[0].function") for key in tool_before)
    (tmp_path / "envs.py").write_text(ENVIRONMENT.replace("reward=1.0", "reward=0.5"))
    (tmp_path / "tools.py").write_text(TOOL.replace("sunny", "rainy"))
    env_after, tool_after = parts()
    assert [c.split(" (")[0] for c in describe_part_changes(env_before, env_after)] == [
        "environment code environment.name changed"
    ]
    assert [c.split(" (")[0] for c in describe_part_changes(tool_before, tool_after)] == [
        "environment code environment.tools[0].function changed"
    ]
