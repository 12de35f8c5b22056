"""Every ``rlhf`` command in docs/scaling.md parses against the real command line (the typer app):
a renamed option or a missing argument in the guide fails here, not on a newcomer's cluster."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import typer
from typer._click.core import Context  # typer 0.29 carries its own click
from typer._click.exceptions import UsageError

from cli.app import app

GUIDE = Path(__file__).resolve().parents[1] / "docs" / "scaling.md"
ENV_ASSIGNMENT = re.compile(r"^[A-Z_][A-Z0-9_]*=\S*$")
# the guide's placeholders, as a reader fills them in
PLACEHOLDERS = {"SPEC": "recipes/quickstart.yaml", "NAME": "gpu", "TYPE": "process", "POOL": "cpu"}


def _code_lines(text: str) -> list[str]:
    """Lines of fenced and indented code blocks (continuations joined) and inline code spans."""
    lines, fenced = [], False
    for raw in text.splitlines():
        if raw.lstrip().startswith("```"):
            fenced = not fenced
            continue
        if fenced or raw.startswith("    "):
            lines.append(raw.strip())
        else:
            lines += re.findall(r"`(rlhf [^`]* --[^`]+)`", raw)  # spans with options, not mentions
    joined, current = [], ""
    for line in lines:
        current += line[:-1] + " " if line.endswith("\\") else line
        if not line.endswith("\\"):
            joined.append(current)
            current = ""
    return joined


def rlhf_commands(text: str) -> list[list[str]]:
    """The argument lists of the ``rlhf`` commands in ``text`` (env assignments and comments dropped)."""
    found = []
    for line in _code_lines(text):
        for part in re.split(r"\s*(?:&&|;)\s*", line):
            if not re.match(r"^([A-Z_][A-Z0-9_]*=\S*\s+)*rlhf\s", part):
                continue
            words = shlex.split(part, comments=True)
            while words and ENV_ASSIGNMENT.match(words[0]):
                words.pop(0)
            if words and words[0] == "rlhf":
                found.append([PLACEHOLDERS.get(w, w) for w in words[1:]])
    return found


COMMANDS = rlhf_commands(GUIDE.read_text())


def _parse(args: list[str]) -> None:
    """Resolve the subcommand and parse its options and arguments as click would, without running it."""
    command = typer.main.get_command(app)
    path = ["rlhf"]
    while hasattr(command, "list_commands"):  # a group: rlhf, rlhf pools, rlhf models
        name, *args = args
        command = command.get_command(Context(command), name)
        assert command is not None, f"no command 'rlhf {' '.join(path[1:] + [name])}'"
        path.append(name)
    command.make_context(" ".join(path), list(args))


def test_the_guide_has_the_commands_a_cluster_needs():
    verbs = {" ".join(c[:2]) if c[0] in ("pools", "models") else c[0] for c in COMMANDS}
    assert {"pools create", "pools template", "deploy", "run", "plan"} <= verbs, verbs
    created = {c[2] for c in COMMANDS if c[:2] == ["pools", "create"]}
    assert {"cpu", "gpu"} <= created  # the gpu profile's two pools


@pytest.mark.parametrize("args", COMMANDS, ids=[" ".join(c)[:60] for c in COMMANDS])
def test_each_rlhf_command_in_the_guide_parses(args):
    _parse(args)


def test_a_wrong_option_would_be_caught():
    with pytest.raises(UsageError):
        _parse(["pools", "create", "gpu", "--type", "process", "--concurrent", "2"])
    with pytest.raises(UsageError):
        _parse(["deploy", "spec.yaml", "--pools", "cpu"])
