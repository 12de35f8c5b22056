"""The over-optimization monitor's rules on hand-made histories (stop, best checkpoint, frontier), its
spec block on every stage kind that takes it, and its plots."""

from __future__ import annotations

import copy

import pytest

from rlhf_core.spec import SpecError, parse_spec
from rlhf_core.training.monitor.history import (
    Evaluation,
    best_evaluation,
    gold_fell_while_proxy_rose,
)
from rlhf_core.training.monitor.plots import draw_monitor_plots, frontier


def history(gold: list[float], proxy: list[float]) -> list[Evaluation]:
    return [
        Evaluation(step=20 * i, kl=0.1 * i, proxy=p, gold=g)
        for i, (g, p) in enumerate(zip(gold, proxy, strict=True))
    ]


@pytest.mark.parametrize(
    ("gold", "proxy", "patience", "stop"),
    [
        ([0.8, 0.7, 0.6, 0.5], [0.1, 0.2, 0.3, 0.4], 3, True),  # three falls, proxy up: stop
        ([0.9, 0.8, 0.7, 0.6, 0.5], [0.5, 0.1, 0.2, 0.3, 0.4], 3, True),  # only the last k+1 count
        ([0.8, 0.7, 0.6, 0.5], [0.4, 0.3, 0.2, 0.1], 3, False),  # gold falls, proxy falls too
        ([0.8, 0.7, 0.6, 0.5], [0.2, 0.3, 0.1, 0.2], 3, False),  # proxy ends the span where it began
        ([0.8, 0.7, 0.6, 0.5], [0.2, 0.1, 0.1, 0.25], 3, True),  # proxy need not rise every time
        ([0.8, 0.7, 0.7, 0.6], [0.1, 0.2, 0.3, 0.4], 3, False),  # a tie in gold breaks the run of falls
        ([0.8, 0.7, 0.75, 0.6], [0.1, 0.2, 0.3, 0.4], 3, False),  # a rise in gold breaks it
        ([0.8, 0.7, 0.6], [0.1, 0.2, 0.3], 3, False),  # two falls are fewer than three
        ([0.8, 0.7, 0.6], [0.1, 0.2, 0.3], 2, True),
        ([0.8, 0.7], [0.3, 0.3], 1, False),  # proxy flat: no rise
        ([0.8], [0.3], 1, False),
    ],
)
def test_stop_when_gold_falls_k_times_in_a_row_while_proxy_rises(gold, proxy, patience, stop):
    assert gold_fell_while_proxy_rose(history(gold, proxy), patience) is stop


def test_the_best_checkpoint_has_the_highest_gold_and_ties_go_to_the_earliest():
    runs = history([0.5, 0.7, 0.6, 0.7, 0.2], [0.1, 0.2, 0.3, 0.4, 0.5])
    assert best_evaluation(runs).step == 20  # 0.7 first reached at step 20 (and again at 60, more KL)
    assert best_evaluation(runs[:1]).step == 0


def test_frontier_keeps_the_best_reward_at_or_below_each_kl():
    points = [(0.0, 0.5), (0.4, 0.45), (0.2, 0.6), (0.8, 0.7), (0.6, 0.6), (0.2, 0.55)]
    assert frontier(points) == [(0.0, 0.5), (0.2, 0.6), (0.8, 0.7)]


def test_plots_are_written_as_png(tmp_path):
    runs = history([0.8, 0.82, 0.7, 0.6, 0.5], [0.1, 0.2, 0.3, 0.4, 0.5])
    paths = draw_monitor_plots(runs, tmp_path, title="ppo", stopped_at=80, registered_step=20)
    assert [p.name for p in paths] == ["proxy_gold_vs_kl.png", "frontier.png"]
    for path in paths:
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 10_000


# -- the spec block -------------------------------------------------------------------------------


def _spec(tiny_spec_dict, stage: dict) -> dict:
    spec = copy.deepcopy(tiny_spec_dict)
    spec["stages"]["opt"] = stage
    return spec


PG = {"kind": "policy_gradient", "algorithm": "grpo", "policy": "sft", "prompts": "data.prompts",
      "rewards": [{"model": "rm"}]}  # fmt: skip
DPO = {"kind": "direct_alignment", "policy": "sft", "data": "data.preferences"}
GOLD = {"gold": [{"function": "arithmetic_exact"}]}


def _problems(tiny_spec_dict, stage: dict) -> str:
    with pytest.raises(SpecError) as err:
        parse_spec(_spec(tiny_spec_dict, stage))
    return "\n".join(err.value.problems)


def test_policy_gradient_monitor_defaults_to_its_rewards_and_the_eval_split(tiny_spec_dict):
    spec = parse_spec(_spec(tiny_spec_dict, {**PG, "monitor": GOLD}))
    stage = spec.stages["opt"]
    assert stage.monitor.split == "eval" and stage.monitor.prompts is None
    assert [s.name for s in stage.monitor_proxy] == ["rm:rm"]
    assert stage.monitor.every == 20 and stage.monitor.max_prompts == 64 and stage.monitor.early_stop is None


def test_a_monitor_reward_model_is_an_input_of_the_stage(tiny_spec_dict):
    stage = {**PG, "rewards": [{"function": "answer_format"}],
             "monitor": {"gold": [{"model": "rm"}], "prompts": "data.prompts"}}  # fmt: skip
    refs = parse_spec(_spec(tiny_spec_dict, stage)).stages["opt"].input_refs()
    assert refs["monitor.gold[0].model"][0] == "rm" and refs["monitor.prompts"][0] == "data.prompts"


@pytest.mark.parametrize(
    ("stage", "expected"),
    [
        (
            {**DPO, "monitor": GOLD},
            "stage 'opt': monitor.proxy: a direct_alignment stage optimizes no reward",
        ),
        ({**PG, "monitor": {"gold": [{"model": "rm"}]}}, "stage 'opt': monitor.gold: it is the proxy"),
        ({**PG, "monitor": {}}, "stage 'opt', field monitor.gold: Field required"),
        (
            {**PG, "monitor": {**GOLD, "every": 0}},
            "stage 'opt', field monitor.every: Input should be greater",
        ),
        ({**PG, "monitor": {**GOLD, "early_stop": {"patience": 0}}}, "field monitor.early_stop.patience"),
        ({**PG, "monitor": {**GOLD, "evry": 5}}, "stage 'opt', field monitor.evry: Extra inputs"),
        ({**PG, "monitor": {**GOLD, "prompts": "data.sft"}}, "monitor.prompts"),
        (
            {**DPO, "monitor": {**GOLD, "proxy": [{"function": "nope"}]}},
            "field monitor.proxy.0: unknown reward function 'nope'",
        ),
    ],
)
def test_bad_monitor_blocks_are_refused_naming_the_stage_and_field(tiny_spec_dict, stage, expected):
    assert expected in _problems(tiny_spec_dict, stage)


def test_iterative_dpo_hands_the_monitor_to_every_round(tiny_spec_dict):
    stage = {"kind": "iterative_dpo", "policy": "sft", "prompts": "data.prompts", "rounds": 2,
             "judge": [{"function": "arithmetic_exact"}],
             "monitor": {"proxy": [{"model": "rm"}], **GOLD, "early_stop": {"patience": 2}}}  # fmt: skip
    spec = parse_spec(_spec(tiny_spec_dict, stage))
    for name in ("opt-r1", "opt"):
        monitor = spec.stages[name].monitor
        assert monitor.prompts == "data.prompts" and monitor.split == "eval"
        assert [s.name for s in monitor.proxy] == ["rm:rm"] and monitor.early_stop.patience == 2
    assert "monitor.proxy" in _problems(tiny_spec_dict, {**stage, "monitor": GOLD})


def test_a_verifier_on_prompts_without_answers_is_refused_naming_monitor_prompts():
    """DPO's default monitor prompts come from preference data, which has no answers to verify."""
    from rlhf_core.errors import UserError
    from rlhf_core.refs import DatasetRef
    from rlhf_core.spec.monitor import MonitorSpec
    from runtime.stage_contract import StageCall
    from tasks.optimize_policy import monitor_inputs

    monitor = MonitorSpec(proxy=[{"function": "length_penalty"}], gold=[{"function": "arithmetic_exact"}])
    call = StageCall(name="dpo", kind="direct_alignment", stage=monitor, seed=0, fingerprint="f")

    def prompts(columns):
        return DatasetRef(
            uri="/x", digest="d", kind="prompts", splits={"eval": 4}, columns=columns, stage="data"
        )

    with pytest.raises(UserError, match=r"stage 'dpo', field monitor.prompts: the verifier arithmetic_exact"):
        monitor_inputs(call, monitor, prompts(("prompt",)), monitor.proxy)
    chosen, models = monitor_inputs(call, monitor, prompts(("answer", "prompt")), monitor.proxy)
    assert chosen.columns == ("answer", "prompt") and models == {}
