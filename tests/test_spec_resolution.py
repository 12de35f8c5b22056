"""Every declaration resolved and checked when the spec is read: loss options, gates, position limits,
registered models; and the effective values (defaults filled in) that run, are logged and fingerprinted.
"""

from __future__ import annotations

import inspect

import pytest

from rlhf_core.errors import UserError
from rlhf_core.spec import SpecError, parse_spec
from rlhf_core.spec.loading import apply_spec_overrides, resolve_spec


def _problems(raw: dict) -> list[str]:
    with pytest.raises(SpecError) as info:
        parse_spec(raw)
    return info.value.problems


def _with_dpo(spec: dict, **fields) -> dict:
    spec["stages"]["dpo"] = {
        "kind": "direct_alignment",
        "policy": "sft",
        "data": "data.preferences",
        **fields,
    }
    return spec


# --- loss options: one table, checked when the spec is read ---------------------------------------


def test_a_misspelled_loss_option_is_a_spec_error_naming_stage_field_and_the_options(tiny_spec_dict):
    spec = _with_dpo(tiny_spec_dict, loss="kto", loss_options={"desirable_weigth": 1})
    assert _problems(spec) == [
        "stage 'dpo', field loss_options: desirable_weigth: loss 'kto' has no such option (did you mean "
        "desirable_weight? it takes: desirable_weight (default 1, > 0), undesirable_weight (default 1, > 0))"
    ]


def test_an_option_of_another_loss_is_rejected(tiny_spec_dict):
    (problem,) = _problems(_with_dpo(tiny_spec_dict, loss="dpo", loss_options={"alpha": 1.0}))
    assert problem.startswith("stage 'dpo', field loss_options: alpha: loss 'dpo' has no such option")
    assert problem.endswith("it takes: none)")


def test_a_negative_kto_weight_is_out_of_range(tiny_spec_dict):
    spec = _with_dpo(tiny_spec_dict, loss="kto", loss_options={"undesirable_weight": -1.33})
    assert _problems(spec) == [
        "stage 'dpo', field loss_options: undesirable_weight: -1.33 is out of range for loss 'kto': "
        "must be > 0"
    ]


def test_cdpo_label_smoothing_of_one_half_or_more_is_out_of_range(tiny_spec_dict):
    spec = _with_dpo(tiny_spec_dict, loss="cdpo", loss_options={"label_smoothing": 0.5})
    assert _problems(spec) == [
        "stage 'dpo', field loss_options: label_smoothing: 0.5 is out of range for loss 'cdpo': must be < 0.5"
    ]


def test_beta_for_a_loss_without_one_is_rejected(tiny_spec_dict):
    assert _problems(_with_dpo(tiny_spec_dict, loss="orpo", beta=0.2)) == [
        "stage 'dpo', field beta: loss 'orpo' takes no beta (its weight is "
        "loss_options.odds_ratio_weight); remove beta"
    ]


def test_the_iterative_dpo_template_checks_its_loss_options_too(tiny_spec_dict):
    tiny_spec_dict["stages"]["online"] = {
        "kind": "iterative_dpo", "policy": "sft", "prompts": "data.prompts",
        "judge": [{"function": "arithmetic_exact"}], "loss": "dpo_nll", "loss_options": {"alhpa": 1.0},
    }  # fmt: skip
    (problem,) = _problems(tiny_spec_dict)
    assert problem.startswith("stage 'online', field loss_options: alhpa: loss 'dpo_nll' has no such option")
    assert "did you mean alpha?" in problem


def test_the_loss_functions_defaults_are_the_tables():
    """The table is the one declaration; the functions' keyword defaults must say the same."""
    from rlhf_core.losses import direct_alignment as losses
    from rlhf_core.losses.direct_alignment_table import DIRECT_ALIGNMENT_TABLE

    for name, declared in DIRECT_ALIGNMENT_TABLE.items():
        fn = getattr(losses, declared.function)
        keywords = {
            p.name: p.default for p in inspect.signature(fn).parameters.values() if p.kind is p.KEYWORD_ONLY
        }
        assert keywords == declared.defaults(), name
        assert losses.DIRECT_ALIGNMENT_LOSSES[name].fn is fn


def test_reading_a_spec_loads_no_torch():
    """The spec reads the loss table; ``rlhf validate`` must stay quick (no torch import)."""
    import subprocess
    import sys

    from tests.conftest import REPO_ROOT

    probe = "import sys, rlhf_core.spec; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", probe], cwd=REPO_ROOT, capture_output=True, text=True)
    assert out.stdout.strip() == "False", out.stderr


# --- effective values -----------------------------------------------------------------------------


def test_loss_defaults_are_filled_into_the_resolved_spec_only(tiny_spec_dict):
    written = parse_spec(_with_dpo(tiny_spec_dict, loss="kto", loss_options={"undesirable_weight": 1.33}))
    assert written.stages["dpo"].beta is None  # what the file says
    resolved = resolve_spec(written).stages["dpo"]
    assert resolved.beta == 0.1
    assert resolved.loss_options == {"desirable_weight": 1.0, "undesirable_weight": 1.33}
    assert resolve_spec(resolve_spec(written)) == resolve_spec(written)  # idempotent


def test_a_resolved_spec_validates_again_unchanged(tiny_spec_dict):
    """``rlhf reproduce`` rebuilds a spec from the logged resolved_spec.yaml."""
    resolved = resolve_spec(parse_spec(_with_dpo(tiny_spec_dict, loss="simpo")))
    again = parse_spec(resolved.model_dump(mode="json"))
    assert again.stages["dpo"].beta == 2.0 and again.stages["dpo"].loss_options == {"gamma_beta_ratio": 0.5}
    assert resolve_spec(again).digest() == resolved.digest()


def test_overriding_the_loss_gives_the_new_losses_default_beta(tiny_spec_dict):
    written = parse_spec(_with_dpo(tiny_spec_dict, loss="dpo_norm"))
    assert resolve_spec(written).stages["dpo"].beta == 2.0
    # as a deployment run does: the spec parameter is what the file wrote, then the form's values
    parameter = parse_spec(written.model_dump(mode="json", exclude_unset=True))
    overridden = apply_spec_overrides(parameter, {"stages.dpo.loss": "ipo"})
    assert resolve_spec(overridden).stages["dpo"].beta == 0.1  # IPO's default, not dpo_norm's 2.0


def test_policy_gradient_algorithm_defaults_are_filled(tiny_spec_dict):
    tiny_spec_dict["stages"]["rl"] = {
        "kind": "policy_gradient", "algorithm": "dapo", "policy": "sft", "prompts": "data.prompts",
        "rewards": [{"function": "arithmetic_exact"}], "generation": {"max_new_tokens": 16},
    }  # fmt: skip
    resolved = resolve_spec(parse_spec(tiny_spec_dict)).stages["rl"]
    assert (resolved.clip_low, resolved.clip_high, resolved.aggregation) == (0.2, 0.28, "token")
    assert (resolved.kl.beta, resolved.kl.placement, resolved.kl.estimator) == (0.0, "loss", "k3")
    assert (resolved.group_size, resolved.dynamic_sampling, resolved.overlong_cache) == (8, True, 4)


def test_reinforce_shows_no_clip_range(tiny_spec_dict):
    tiny_spec_dict["stages"]["rl"] = {
        "kind": "policy_gradient", "algorithm": "reinforce", "policy": "sft", "prompts": "data.prompts",
        "rewards": [{"function": "arithmetic_exact"}],
    }  # fmt: skip
    resolved = resolve_spec(parse_spec(tiny_spec_dict)).stages["rl"]
    assert (resolved.clip_low, resolved.clip_high) == (None, None)
    assert (resolved.kl.beta, resolved.kl.placement, resolved.kl.estimator) == (0.05, "reward", "k1")


def test_the_stage_config_logged_and_fingerprinted_holds_the_effective_beta(tiny_spec_dict):
    """The MLflow params are ``call.stage.model_dump()``; today's flow builds calls from the resolved spec."""
    from rlhf_core.fingerprint import fingerprint_parts

    written = parse_spec(_with_dpo(tiny_spec_dict))
    resolved = resolve_spec(written)
    assert resolved.stages["dpo"].model_dump(mode="json")["beta"] == 0.1
    explicit = resolve_spec(parse_spec(_with_dpo(tiny_spec_dict, beta=0.1)))
    parts = [fingerprint_parts("direct_alignment", s.stages["dpo"], {}, 0) for s in (resolved, explicit)]
    assert parts[0] == parts[1]  # the default and the same value written run the same: one fingerprint


# --- position limits: a default follows the model -------------------------------------------------


def test_evaluate_without_a_written_max_length_accepts_a_256_position_model(tiny_spec_dict):
    tiny_spec_dict["models"]["base"]["tiny"]["max_position_embeddings"] = 256
    spec = parse_spec(tiny_spec_dict)  # eval's default max_length (512) is no error
    assert spec.stages["eval"].max_length == 512
    assert resolve_spec(spec).stages["eval"].max_length == 256


def test_evaluate_with_a_written_max_length_beyond_the_model_is_rejected_as_written(tiny_spec_dict):
    tiny_spec_dict["models"]["base"]["tiny"]["max_position_embeddings"] = 256
    tiny_spec_dict["stages"]["eval"]["max_length"] = 512
    assert _problems(tiny_spec_dict) == [
        "stage 'eval', field max_length: 512, as written in the spec, is longer than model 'base' accepts "
        "(max_position_embeddings 256); lower it, or leave it out to use the model's limit"
    ]


def test_every_max_length_default_follows_the_model(tiny_spec_dict):
    """sft and reward_model default to 256, direct_alignment and evaluate to 512: all follow a 128 limit."""
    tiny_spec_dict["models"]["base"]["tiny"]["max_position_embeddings"] = 128
    del tiny_spec_dict["stages"]["sft"]["train"]["max_length"]
    del tiny_spec_dict["stages"]["rm"]["train"]["max_length"]
    resolved = resolve_spec(parse_spec(_with_dpo(tiny_spec_dict)))
    lengths = [resolved.stages[n].train.max_length for n in ("sft", "rm", "dpo")]
    assert [*lengths, resolved.stages["eval"].max_length] == [128, 128, 128, 128]


def test_a_local_models_limit_is_followed_too(tmp_path, tiny_spec_dict):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text('{"model_type": "gpt2", "n_positions": 100}')
    tiny_spec_dict["models"]["base"] = {"path": str(tmp_path / "m")}
    tiny_spec_dict["stages"]["sft"]["train"]["max_length"] = 64
    tiny_spec_dict["stages"]["rm"]["train"]["max_length"] = 64
    assert resolve_spec(parse_spec(tiny_spec_dict)).stages["eval"].max_length == 100


def test_a_default_max_length_follows_a_limit_known_only_when_the_model_is_prepared(tiny_spec_dict):
    """Hub and registry models: the limit is on the model's ref, when its stage ran; the call follows it."""
    from flows.stage_calls import stage_call
    from tests.test_stage_declarations import fake_outputs

    spec = resolve_spec(parse_spec(tiny_spec_dict))
    outputs = fake_outputs(spec)
    for name in ("base", "sft"):
        outputs[name]["model"] = outputs[name]["model"].model_copy(update={"max_positions": 200})
    assert stage_call(spec, "eval", outputs).stage.max_length == 200  # the default 512, capped
    tiny_spec_dict["stages"]["eval"]["max_length"] = 300
    with pytest.raises(UserError, match="stage 'eval', field max_length: 300 is longer than model"):
        stage_call(resolve_spec(parse_spec(tiny_spec_dict)), "eval", outputs)


# --- promotion gates -------------------------------------------------------------------------------


def _with_promote(spec: dict, gate: list[dict], model: str = "sft") -> dict:
    spec["stages"]["promote"] = {"kind": "promote", "model": model, "evaluation": "eval.report", "gate": gate}
    return spec


def test_a_gate_metric_typo_lists_the_measured_figures(tiny_spec_dict):
    (problem,) = _problems(_with_promote(tiny_spec_dict, [{"metric": "acuracy", "min": 0.5}]))
    assert problem.startswith(
        "stage 'promote', field gate[0].metric: stage 'eval' measures no 'acuracy' for 'sft' "
        "(did you mean accuracy?); it measures: nll (+ _ci_low, _ci_high, _n), loss, perplexity, tokens, "
        "accuracy (+ _ci_low, _ci_high, _n), length/mean"
    )


def test_a_gate_on_win_rate_needs_the_evaluation_to_measure_it(tiny_spec_dict):
    gate = [{"metric": "win_rate/verifier_ci_low", "min": 0.5}, {"metric": "eval/accuracy", "min": 0.1}]
    (problem,) = _problems(_with_promote(tiny_spec_dict, gate))
    assert problem.startswith("stage 'promote', field gate[0].metric: stage 'eval' measures no 'win_rate/")
    tiny_spec_dict["stages"]["eval"] |= {"baseline": "base", "win_rate": {"judges": ["verifier"]}}
    parse_spec(tiny_spec_dict)  # measured now: the interval bound and the prefixed name are accepted


def test_the_candidate_must_be_among_the_evaluated_models(tiny_spec_dict):
    tiny_spec_dict["stages"]["eval"]["models"] = ["base"]
    assert _problems(_with_promote(tiny_spec_dict, [{"metric": "accuracy", "min": 0.5}])) == [
        "stage 'promote', field model: 'sft' is not among the models stage 'eval' evaluates (base); "
        "add it to its models"
    ]


def test_a_stage_named_with_its_output_is_the_same_candidate(tiny_spec_dict):
    parse_spec(_with_promote(tiny_spec_dict, [{"metric": "accuracy", "min": 0.5}], model="sft.model"))


# --- registered models: checked before any stage runs ---------------------------------------------


@pytest.fixture
def registry_home(tmp_path):
    """A home whose SQLite registry holds 'team-sft' versions 1 and 2, version 2 as @champion."""
    from registry import tracking
    from rlhf_core.settings import RLHFSettings

    settings = RLHFSettings(home=tmp_path / "home")
    tracking.configure(settings)
    client = tracking.client()
    client.create_registered_model("team-sft")
    for _ in range(2):
        client.create_model_version("team-sft", source=str(tmp_path / "weights"))
    client.set_registered_model_alias("team-sft", "champion", "2")
    return settings


def _registered_spec(tiny_spec_dict: dict, reference: str) -> dict:
    tiny_spec_dict["models"]["champ"] = {"registered": reference}
    tiny_spec_dict["stages"]["eval"]["models"] = ["base", "sft", "champ"]
    return tiny_spec_dict


def test_an_unregistered_model_fails_rlhf_plan_listing_what_the_registry_has(registry_home, tiny_spec_dict):
    from flows.plan import plan_pipeline

    spec = parse_spec(_registered_spec(tiny_spec_dict, "models:/team-sft@champoin"))
    with pytest.raises(UserError) as info:
        plan_pipeline(spec, set(), str(registry_home.home))
    assert str(info.value) == (
        "model 'champ', field registered: 'models:/team-sft@champoin' is not in this home's registry "
        "('team-sft' has versions 1, 2; aliases @champion -> 2)"
    )


def test_an_unknown_registered_name_lists_the_registered_models(registry_home, tiny_spec_dict):
    from registry.lineage import missing_registered_models

    assert missing_registered_models({"champ": "models:/team-stf/1", "ok": "models:/team-sft/2"}) == [
        "model 'champ', field registered: 'models:/team-stf/1' is not in this home's registry (no "
        "registered model named 'team-stf'; registered models: team-sft)"
    ]


def test_the_pipeline_fails_on_an_unregistered_model_before_any_stage_runs(registry_home, tiny_spec_dict):
    from flows.pipeline import run_pipeline
    from registry import tracking

    spec = parse_spec(_registered_spec(tiny_spec_dict, "models:/team-sft/3"))
    with pytest.raises(UserError, match="'models:/team-sft/3' is not in this home's registry"):
        run_pipeline.fn(spec, home=str(registry_home.home))  # the flow's body, without a Prefect server
    experiment = tracking.client().get_experiment_by_name(spec.name)
    runs = tracking.client().search_runs([experiment.experiment_id]) if experiment else []
    assert runs == []  # no pipeline run, no stage run, nothing registered


def test_rlhf_plan_lists_the_defaults_in_effect(registry_home, tiny_spec_dict):
    from flows.plan import plan_pipeline

    spec = parse_spec(_with_dpo(tiny_spec_dict, loss="cdpo"))
    planned = {p.stage: p for p in plan_pipeline(spec, set(), str(registry_home.home))}
    assert planned["dpo"].filled == {"beta": 0.1, "loss_options.label_smoothing": 0.1}
    assert planned["sft"].filled == {}  # everything there is written or a plain default
