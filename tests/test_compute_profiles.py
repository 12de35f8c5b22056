"""Compute blocks and profiles: where a stage runs, never what it computes."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from flows.deploy import overridable_values, parameter_form, stage_pools
from rlhf_core.fingerprint import config_digest
from rlhf_core.spec import SpecError, load_spec, parse_spec
from rlhf_core.spec.compute import ComputeProfile, ComputeSpec
from rlhf_core.spec.loading import apply_spec_overrides, load_profiles, resolve_profile

REPO_ROOT = Path(__file__).resolve().parents[1]


def _profile(**data) -> ComputeProfile:
    return ComputeProfile.model_validate(data)


def test_profile_layers_apply_field_by_field(tiny_spec_dict):
    tiny_spec_dict["stages"]["rm"]["compute"] = {"pool": "own", "env": {"A": "spec"}, "retries": 5}
    spec = parse_spec(tiny_spec_dict)
    profile = _profile(
        all={"pool": "cpu"},
        kinds={"reward_model": {"pool": "gpu", "gpus": 1, "env": {"B": "kind"}}},
        stages={"rm": {"processes": 2, "env": {"A": "stage"}}},
    )
    placed = spec.with_profile(profile, "p")
    rm = placed.compute_of("rm")
    assert (rm.pool, rm.gpus, rm.processes, rm.retries) == ("gpu", 1, 2, 5)  # retries from the spec's block
    assert rm.env == {"A": "stage", "B": "kind"}
    assert placed.compute_of("sft").pool == "cpu" and placed.compute_of("sft").processes == 1
    assert stage_pools(placed) == ["cpu", "gpu"]
    assert stage_pools(spec) == ["own"]


def test_compute_is_not_part_of_the_fingerprint(tiny_spec_dict):
    spec = parse_spec(tiny_spec_dict)
    placed = spec.with_profile(
        _profile(all={"pool": "gpu", "env": {"X": "1"}}, kinds={"sft": {"processes": 2}})
    )
    for name in spec.stages:
        assert config_digest(spec.stages[name]) == config_digest(placed.stages[name])
    assert spec.digest() != placed.digest()  # the spec itself records where stages ran


def test_local_profile_brings_every_stage_home(tiny_spec_dict):
    for stage in tiny_spec_dict["stages"].values():
        stage["compute"] = {"pool": "gpu", "processes": 2 if stage["kind"] in ("sft", "reward_model") else 1}
    spec = parse_spec(tiny_spec_dict).with_profile(resolve_profile("local", None), "local")
    assert all(spec.compute_of(n).pool is None and spec.compute_of(n).processes == 1 for n in spec.stages)
    assert stage_pools(spec) == []


def test_profile_naming_unknown_stage_or_kind_is_an_error(tiny_spec_dict):
    spec = parse_spec(tiny_spec_dict)
    with pytest.raises(SpecError) as err:
        spec.with_profile(_profile(stages={"sfft": {"pool": "gpu"}}, kinds={"ppo": {"pool": "gpu"}}), "gpu")
    text = str(err.value)
    assert "profile 'gpu', stages.sfft: no stage 'sfft' in pipeline 'e2e'" in text
    assert "profile 'gpu', kinds.ppo: unknown stage kind" in text


def test_bad_compute_fields_name_stage_and_field(tiny_spec_dict):
    tiny_spec_dict["stages"]["sft"]["compute"] = {"pool": "gpu", "processes": 0, "gpu": 1}
    with pytest.raises(SpecError) as err:
        parse_spec(tiny_spec_dict)
    text = str(err.value)
    assert "stage 'sft', field compute.processes" in text
    assert "stage 'sft', field compute.gpu" in text  # unknown field (typo of gpus)
    with pytest.raises(ValueError, match="not environment variable names: 1BAD"):
        ComputeSpec(env={"1BAD": "x"})


def test_profile_file_errors_and_lookup(tmp_path):
    bad = tmp_path / "profiles.yaml"
    bad.write_text(
        yaml.safe_dump({"profiles": {"gpu": {"kinds": {"sft": {"pool": "gpu", "memory": "lots"}}}}})
    )
    with pytest.raises(SpecError, match=r"profiles\.gpu\.kinds\.sft\.memory"):
        load_profiles(bad)
    with pytest.raises(SpecError, match="--profile nope: no such profile in .*known: gpu, local"):
        bad.write_text(yaml.safe_dump({"profiles": {"gpu": {"all": {"pool": "g"}}}}))
        resolve_profile("nope", bad)


def test_recipe_profiles_fit_every_recipe():
    profiles = load_profiles(REPO_ROOT / "recipes" / "profiles.yaml")
    assert {"gpu", "local"} <= set(profiles)
    spec = load_spec(REPO_ROOT / "recipes" / "quickstart.yaml")
    for name, profile in profiles.items():
        placed = spec.with_profile(profile, name)
        assert all(placed.compute_of(s).pool != profile.pipeline_pool or profile.pipeline_pool is None
                   for s in placed.stages if placed.stages[s].kind == "sft")  # fmt: skip


def test_cli_validate_with_profile(tmp_path, tiny_spec_dict):
    from typer.testing import CliRunner

    from cli.app import app

    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text(yaml.safe_dump(tiny_spec_dict))
    (tmp_path / "profiles.yaml").write_text(yaml.safe_dump({"profiles": {"gpu": {"stages": {"sfft": {}}}}}))
    result = CliRunner().invoke(app, ["validate", str(spec_file), "--profile", "gpu"])
    assert result.exit_code == 2
    assert "no stage 'sfft'" in result.output
    result = CliRunner().invoke(app, ["validate", str(spec_file), "--profile", "local"])
    assert result.exit_code == 0, result.output


def test_overrides_form_and_application(tiny_spec_dict):
    raw = {**tiny_spec_dict, "stages": {**tiny_spec_dict["stages"]}}
    spec = parse_spec(tiny_spec_dict)
    values = overridable_values(spec, raw)
    assert values["seed"] == 0
    assert values["stages.sft.train.lr"] == pytest.approx(3e-3)
    assert values["stages.sft.train.max_steps"] == 12
    assert "stages.sft.model" not in values  # references are not offered: they would change the DAG
    form = parameter_form(spec, raw, "/tmp/home")
    lr = form["properties"]["overrides"]["properties"]["stages.sft.train.lr"]
    assert lr == {"title": "stages.sft.train.lr", "type": "number", "default": pytest.approx(3e-3)}
    assert form["properties"]["force"]["items"]["enum"] == ["base", "data", "sft", "rm", "eval"]

    changed = apply_spec_overrides(spec, {"stages.sft.train.lr": 1e-3, "seed": 7})
    assert changed.stages["sft"].train.lr == pytest.approx(1e-3) and changed.seed == 7
    assert config_digest(changed.stages["sft"]) != config_digest(spec.stages["sft"])
    assert config_digest(changed.stages["rm"]) == config_digest(spec.stages["rm"])
    with pytest.raises(SpecError, match="override stages.sft.train.lrr: no such field"):
        apply_spec_overrides(spec, {"stages.sft.train.lrr": 1.0})
    with pytest.raises(SpecError, match="stage 'sft', field train.max_steps"):
        apply_spec_overrides(spec, {"stages.sft.train.max_steps": "many"})


def test_run_with_pool_stages_needs_a_prefect_server(tmp_path, tiny_spec_dict):
    import os
    import subprocess
    import sys

    tiny_spec_dict["stages"]["sft"]["compute"] = {"pool": "gpu"}
    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text(yaml.safe_dump(tiny_spec_dict))
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    result = subprocess.run(
        [sys.executable, "-m", "cli.app", "run", str(spec_file), "--home", str(tmp_path / "home")],
        capture_output=True, text=True, env=env, cwd=REPO_ROOT, timeout=300,
    )  # fmt: skip
    assert result.returncode == 2, result.stdout + result.stderr
    assert "runs stages on work pool(s) gpu, which needs a running Prefect server" in result.stderr


def test_processes_only_on_kinds_that_train_in_several(tiny_spec_dict):
    tiny_spec_dict["stages"]["eval"]["compute"] = {"processes": 2}
    with pytest.raises(
        SpecError, match=r"stage 'eval', field compute.processes: evaluate stages run in one process"
    ):
        parse_spec(tiny_spec_dict)
    del tiny_spec_dict["stages"]["eval"]["compute"]
    spec = parse_spec(tiny_spec_dict)
    assert spec.with_profile(_profile(kinds={"sft": {"processes": 2}, "reward_model": {"processes": 2}}))
    with pytest.raises(SpecError, match=r"profile 'p': stage 'eval', field compute.processes"):
        spec.with_profile(_profile(all={"processes": 2}), "p")
