"""``rlhf reproduce`` prints (or writes) the spec it rebuilt, as a file ``rlhf run`` takes."""

from __future__ import annotations

from pathlib import Path

import pytest

from cli.reproduce import spec_yaml, write_spec
from rlhf_core.spec import load_spec

RECIPES = Path(__file__).resolve().parents[1] / "recipes"


@pytest.mark.parametrize("recipe", ["quickstart.yaml", "online_dpo.yaml"])
def test_the_printed_spec_loads_back_as_the_same_spec(tmp_path, recipe):
    spec = load_spec(RECIPES / recipe)
    target = tmp_path / "rebuilt.yaml"
    write_spec(spec, target)
    assert target.read_text() == spec_yaml(spec)
    again = load_spec(target)
    assert again.digest() == spec.digest()
    assert again.topological_order() == spec.topological_order()


def test_without_a_file_the_spec_goes_to_stdout(capsys):
    spec = load_spec(RECIPES / "quickstart.yaml")
    write_spec(spec, None)
    out = capsys.readouterr().out
    assert out.startswith(f"# rebuilt spec of pipeline '{spec.name}'\n")
    assert f"name: {spec.name}\n" in out and "stages:\n" in out
