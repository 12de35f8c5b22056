"""Spec validation: every error names the stage and field path and says what was expected."""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from rlhf_core.spec import SpecError, apply_override, load_spec, parse_spec
from rlhf_core.spec.compute import PROFILE_FILE  # recipes/profiles.yaml: compute profiles

REPO_ROOT = Path(__file__).resolve().parents[1]


def _problems(raw: dict) -> list[str]:
    with pytest.raises(SpecError) as info:
        parse_spec(raw)
    return info.value.problems


def test_quickstart_recipe_is_valid():
    spec = load_spec(REPO_ROOT / "recipes" / "quickstart.yaml")
    assert spec.topological_order() == ["data", "sft", "eval", "promote"]
    assert spec.dependencies("eval") == ["base", "sft", "data"]


def test_unknown_field_and_wrong_type_name_stage_and_path(tiny_spec_dict):
    tiny_spec_dict["stages"]["sft"]["train"].update(lr="fast", bogus=1)
    problems = _problems(tiny_spec_dict)
    assert any(p.startswith("stage 'sft', field train.lr:") and "number" in p for p in problems)
    assert any(p.startswith("stage 'sft', field train.bogus:") and "not permitted" in p for p in problems)


def test_unknown_stage_kind(tiny_spec_dict):
    tiny_spec_dict["stages"]["data"]["kind"] = "collect"
    (problem,) = _problems(tiny_spec_dict)
    assert problem.startswith("stage 'data'") and "'collect'" in problem and "'sft'" in problem


def test_unknown_reference_lists_known_names(tiny_spec_dict):
    tiny_spec_dict["stages"]["sft"]["model"] = "bsae"
    (problem,) = _problems(tiny_spec_dict)
    assert problem.startswith("stage 'sft', field model: unknown reference 'bsae'")
    assert "base" in problem and "data" in problem


def test_reference_of_the_wrong_type(tiny_spec_dict):
    tiny_spec_dict["stages"]["sft"]["model"] = "data.sft"
    tiny_spec_dict["stages"]["eval"]["prompts"] = "data.sft"
    problems = _problems(tiny_spec_dict)
    assert "stage 'sft', field model: 'data.sft' is an sft dataset, expected a policy model" in problems
    assert "stage 'eval', field prompts: 'data.sft' is an sft dataset, expected a prompts dataset" in problems


def test_unknown_output_and_ambiguous_reference(tiny_spec_dict):
    tiny_spec_dict["stages"]["sft"]["data"] = "data.chat"
    tiny_spec_dict["stages"]["eval"]["data"] = "data"
    problems = _problems(tiny_spec_dict)
    assert any("field data: stage 'data' has no output 'chat'" in p for p in problems)
    assert any("'data' has several outputs" in p and "data.sft" in p for p in problems)


def test_cycle_is_reported_with_its_path(tiny_spec_dict):
    stages = tiny_spec_dict["stages"]
    stages["sft2"] = {"kind": "sft", "model": "sft3", "data": "data.sft"}
    stages["sft3"] = {"kind": "sft", "model": "sft2", "data": "data.sft"}
    (problem,) = _problems(tiny_spec_dict)
    assert "dependency cycle" in problem and "sft2 -> sft3 -> sft2" in problem


def test_self_reference(tiny_spec_dict):
    tiny_spec_dict["stages"]["sft"]["model"] = "sft"
    (problem,) = _problems(tiny_spec_dict)
    assert "cannot refer to itself" in problem


def test_model_source_needs_exactly_one_kind(tiny_spec_dict):
    tiny_spec_dict["models"]["base"] = {"path": "/x", "hub": "org/name"}
    (problem,) = _problems(tiny_spec_dict)
    assert problem.startswith("model 'base'") and "exactly one of tiny, path, hub or registered" in problem


def test_splits_must_sum_to_one(tiny_spec_dict):
    tiny_spec_dict["stages"]["data"]["splits"] = {"train": 0.8, "eval": 0.1}
    (problem,) = _problems(tiny_spec_dict)
    assert problem.startswith("stage 'data'") and "sum to 1" in problem


def test_overrides_are_parsed_as_yaml_and_validated(tiny_spec_dict):
    raw = copy.deepcopy(tiny_spec_dict)
    apply_override(raw, "stages.sft.train.lr=1e-4")
    apply_override(raw, "stages.eval.models=[sft]")
    spec = parse_spec(raw)
    assert spec.stages["sft"].train.lr == 1e-4
    assert spec.stages["eval"].models == ("sft",)
    apply_override(raw, "stages.sft.train.epochs=zero")
    assert any("train.epochs" in p for p in _problems(raw))
    with pytest.raises(SpecError, match="expected KEY.PATH=VALUE"):
        apply_override(raw, "no-equals-sign")


def test_relative_paths_resolve_against_the_spec_file(tmp_path, tiny_spec_dict):
    tiny_spec_dict["stages"]["data"]["source"] = {"file": {"path": "rows.jsonl", "format": "sft"}}
    tiny_spec_dict["stages"]["eval"].pop("prompts")
    del tiny_spec_dict["stages"]["rm"]
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(tiny_spec_dict))
    (tmp_path / "rows.jsonl").write_text("")
    spec = load_spec(tmp_path / "p.yaml")
    assert spec.stages["data"].source.file.path == str(tmp_path / "rows.jsonl")


def test_downstream_and_topological_order(tiny_spec_dict):
    spec = parse_spec(tiny_spec_dict)
    assert spec.downstream_of("data") == {"data", "sft", "rm", "eval"}
    assert spec.downstream_of("sft") == {"sft", "rm", "eval"}
    assert spec.downstream_of("rm") == {"rm"}
    assert spec.downstream_of("base") == {"base", "sft", "rm", "eval"}


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "cli.app", *args], capture_output=True, text=True, cwd=REPO_ROOT, timeout=120
    )


def test_cli_validate_ok_and_errors_exit_nonzero(tmp_path, tiny_spec_dict):
    ok = _cli("validate", str(REPO_ROOT / "recipes" / "quickstart.yaml"))
    assert ok.returncode == 0 and "data -> sft -> eval" in ok.stdout
    bad = _cli(
        "validate", str(REPO_ROOT / "recipes" / "quickstart.yaml"), "--set", "stages.sft.model=data.prompts"
    )
    assert bad.returncode == 2
    expected = "stage 'sft', field model: 'data.prompts' is a prompts dataset, expected a policy model"
    assert expected in bad.stderr


def test_cli_validate_checks_data_file_columns(tmp_path, tiny_spec_dict):
    (tmp_path / "rows.jsonl").write_text('{"question": "q", "good": "a", "bad": "b"}\n')
    tiny_spec_dict["stages"]["data"]["source"] = {
        "file": {
            "path": "rows.jsonl",
            "format": "preference",
            "columns": {"chosen": "good", "rejected": "bad"},
        }
    }
    for stage in ("sft", "rm", "eval"):
        del tiny_spec_dict["stages"][stage]
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(tiny_spec_dict))
    result = _cli("validate", str(tmp_path / "p.yaml"))
    assert result.returncode == 2
    assert "stage 'data', field source.file" in result.stderr and "prompt" in result.stderr
    assert not (tmp_path / ".rlhf").exists()


def test_every_spec_field_has_a_description():
    """Descriptions double as docs and as the Prefect UI form: none may be missing."""
    from rlhf_core.spec.loading import pipeline_json_schema

    schema = pipeline_json_schema()
    assert "IterativeDPOTemplate" in schema["$defs"]  # stage templates are part of the file's schema
    missing = []
    for model_name, model in [("PipelineSpec", schema), *schema["$defs"].items()]:
        for field, prop in model.get("properties", {}).items():
            if field != "kind" and "description" not in prop:
                missing.append(f"{model_name}.{field}")
    assert not missing, missing


def test_reward_model_stage_types(tiny_spec_dict):
    """A reward model is not a policy: it cannot be fine-tuned by sft or evaluated as a generator."""
    tiny_spec_dict["stages"]["sft2"] = {"kind": "sft", "model": "rm", "data": "data.sft"}
    tiny_spec_dict["stages"]["rm"]["data"] = "data.sft"
    problems = _problems(tiny_spec_dict)
    assert "stage 'sft2', field model: 'rm' is a reward model, expected a policy model" in problems
    assert "stage 'rm', field data: 'data.sft' is an sft dataset, expected a preference dataset" in problems


def test_best_of_n_needs_prompts_and_a_reward_model_reference(tiny_spec_dict):
    eval_stage = tiny_spec_dict["stages"]["eval"]
    eval_stage["best_of_n"] = {"n": 4, "rewards": [{"model": "sft"}, {"function": "arithmetic_exact"}]}
    problems = _problems(tiny_spec_dict)
    expected = (
        "stage 'eval', field best_of_n.rewards[0].model: 'sft' is a policy model, expected a reward model"
    )
    assert expected in problems
    eval_stage["best_of_n"]["rewards"] = [{"model": "rm"}]
    spec = parse_spec(tiny_spec_dict)
    assert "rm" in spec.dependencies("eval")  # the reward model runs before the evaluation
    del eval_stage["prompts"]
    (problem,) = _problems(tiny_spec_dict)
    assert problem.startswith("stage 'eval'") and "best_of_n needs `prompts`" in problem


@pytest.mark.parametrize(
    "recipe", sorted(p.name for p in (REPO_ROOT / "recipes").glob("*.yaml") if p.name != PROFILE_FILE)
)
def test_every_recipe_validates(recipe):
    spec = load_spec(REPO_ROOT / "recipes" / recipe)
    assert spec.topological_order()


def test_duplicate_keys_are_rejected_with_their_lines(tmp_path):
    text = (REPO_ROOT / "recipes" / "quickstart.yaml").read_text()
    text = text.replace("  sft:\n    kind: sft\n", "  sft:\n    kind: sft\n    kind: sft\n", 1)
    (tmp_path / "dup.yaml").write_text(text)
    with pytest.raises(SpecError) as info:
        load_spec(tmp_path / "dup.yaml")
    (problem,) = info.value.problems
    line = text.splitlines().index("    kind: sft") + 1
    assert f"duplicate key 'kind' on line {line + 1} (first given on line {line})" in problem


@pytest.mark.parametrize("name", ["../sft main!", "sft/x", "", "-x", "a" * 65])
def test_stage_and_model_names_are_checked_before_anything_runs(tiny_spec_dict, name):
    tiny_spec_dict["stages"][name] = tiny_spec_dict["stages"].pop("eval")
    problems = _problems(tiny_spec_dict)
    assert f"stage {name!r}: invalid name; use 1-64 letters, digits, '_' or '-'" in problems[0]
    tiny_spec_dict["stages"]["eval"] = tiny_spec_dict["stages"].pop(name)
    tiny_spec_dict["models"] = {name: tiny_spec_dict["models"]["base"]}
    assert any(p.startswith(f"model {name!r}: invalid name") for p in _problems(tiny_spec_dict))


def test_registered_model_names_are_checked(tiny_spec_dict):
    tiny_spec_dict["stages"]["sft"]["register_as"] = "team/sft model"
    (problem,) = _problems(tiny_spec_dict)
    assert problem.startswith("stage 'sft', field register_as: 'team/sft model' is not a valid")


def test_max_length_beyond_the_tiny_models_position_limit(tiny_spec_dict):
    tiny_spec_dict["models"]["base"]["tiny"]["max_position_embeddings"] = 48
    problems = _problems(tiny_spec_dict)
    assert (
        "stage 'sft', field train.max_length: 64, as written in the spec, is longer than model 'base' "
        "accepts (max_position_embeddings 48); lower it, or leave it out to use the model's limit"
    ) in problems
    assert any(p.startswith("stage 'rm', field train.max_length: 64") for p in problems)  # through sft
    # eval's max_length is its default (512), not written: it follows the model (tests/test_spec_resolution)
    assert not any(p.startswith("stage 'eval'") for p in problems)


def test_local_model_path_must_be_a_saved_model(tmp_path, tiny_spec_dict):
    tiny_spec_dict["models"]["base"] = {"path": "no-such-model"}
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(tiny_spec_dict))
    with pytest.raises(SpecError) as info:
        load_spec(tmp_path / "p.yaml")
    assert info.value.problems == [
        f"model 'base', field path: {tmp_path / 'no-such-model'} does not exist "
        "(expected a directory saved with save_pretrained)"
    ]
    (tmp_path / "no-such-model").mkdir()
    with pytest.raises(SpecError, match="has no config.json: not a save_pretrained model directory"):
        load_spec(tmp_path / "p.yaml")
    (tmp_path / "no-such-model" / "config.json").write_text('{"model_type": "gpt2", "n_positions": 48}')
    with pytest.raises(SpecError, match="field train.max_length: 64, as written in the spec, is longer than"):
        load_spec(tmp_path / "p.yaml")  # the limit of a local model is read from its config.json


def test_a_stage_without_kind_lists_the_kinds(tiny_spec_dict):
    del tiny_spec_dict["stages"]["eval"]["kind"]
    (problem,) = _problems(tiny_spec_dict)
    assert problem.startswith(
        "stage 'eval': field kind is missing; give one of: constitutional_revision, dataset, "
    )
    assert ", evaluate, " in problem and ", sft" in problem
    tiny_spec_dict["name"] = "bad name"
    assert "field name: 'bad name' is not a valid name; use 1-64 letters" in "\n".join(
        _problems(tiny_spec_dict)
    )


def _online(tiny_spec_dict, **fields) -> dict:
    tiny_spec_dict["stages"]["online"] = {
        "kind": "iterative_dpo", "policy": "sft", "prompts": "data.prompts", "rounds": 3,
        "judge": [{"function": "arithmetic_exact"}], "loss": "dpo", **fields,
    }  # fmt: skip
    tiny_spec_dict["stages"]["eval"]["models"] = ["sft", "online-r1", "online"]
    return tiny_spec_dict


def test_iterative_dpo_expands_into_rounds_of_ordinary_stages(tiny_spec_dict):
    spec = parse_spec(_online(tiny_spec_dict))
    rounds = [n for n in spec.topological_order() if n.startswith("online")]
    assert rounds == [
        "online-r1-samples", "online-r1-pairs", "online-r1",
        "online-r2-samples", "online-r2-pairs", "online-r2",
        "online-r3-samples", "online-r3-pairs", "online",
    ]  # fmt: skip
    stages = spec.stages
    assert stages["online-r1-samples"].policy == "sft" and stages["online-r2-samples"].policy == "online-r1"
    assert stages["online"].policy == "online-r2" and stages["online"].data == "online-r3-pairs.preferences"
    assert stages["online-r2"].reference is None  # 'previous': the round's own starting policy
    assert [stages[f"online-r{r}-samples"].seed for r in (1, 2, 3)] == [0, 1, 2]  # fresh samples per round
    from conftest import TINY_SPEC

    initial = parse_spec(_online(copy.deepcopy(TINY_SPEC), reference="initial"))
    assert initial.stages["online-r2"].reference == "sft"


def test_iterative_dpo_judges_each_pair_by_a_subset_of_the_principles(tiny_spec_dict):
    judge = {"model": "sft", "principles": ["Be right.", "Be brief.", "Be kind."]}
    spec = parse_spec(_online(tiny_spec_dict, judge_policy=judge, principles_per_comparison=2))
    assert [spec.stages[f"online-r{r}-pairs"].principles_per_comparison for r in (1, 2)] == [2, 2]
    assert (
        parse_spec(_online(tiny_spec_dict, judge_policy=judge))
        .stages["online-r1-pairs"]
        .principles_per_comparison
        is None
    )
    for fields, message in [
        ({"principles_per_comparison": 2}, "principles_per_comparison needs judge_policy"),
        ({"judge_policy": judge, "principles_per_comparison": 4}, "is 4 but judge_policy.principles has 3"),
    ]:
        assert any(
            p.startswith("stage 'online'") and message in p
            for p in _problems(_online(copy.deepcopy(tiny_spec_dict), **fields))
        ), fields


def test_iterative_dpo_errors_name_the_template(tiny_spec_dict):
    problems = _problems(_online(tiny_spec_dict, rounds=0, bogus=1))
    assert "stage 'online', field rounds: Input should be greater than or equal to 1" in problems
    assert any(p.startswith("stage 'online', field bogus:") for p in problems)
    tiny_spec_dict["stages"]["online-r1-pairs"] = tiny_spec_dict["stages"]["sft"]
    tiny_spec_dict["stages"]["online"].update(rounds=2)
    del tiny_spec_dict["stages"]["online"]["bogus"]
    assert "stage 'online': expands to a stage 'online-r1-pairs', a name already in use" in _problems(
        tiny_spec_dict
    )
