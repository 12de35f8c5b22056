"""The live terminal view of ``rlhf run``: rows from stage events, ETA from the step rate, terminal only,
and per-step log lines kept out of the console while it is up (other log lines still print)."""

from __future__ import annotations

import io
import logging

from rich.console import Console

from cli.live_view import PipelineView, key_metric, live_pipeline_view
from rlhf_core.spec import parse_spec
from runtime import progress
from runtime.stage_contract import STEP_LOG_MARK


def _text(view: PipelineView) -> str:
    console = Console(file=io.StringIO(), width=200, record=True)
    console.print(view.render())
    return console.export_text()


def _event(stage, event, status, step=None, total=None, metrics=None, at=0.0):
    return progress.StageEvent(stage, "sft", event, status, step, total, metrics or {}, time=at)


def test_rows_follow_the_stage_events_with_step_eta_and_key_metric(tiny_spec_dict):
    now = [100.0]
    view = PipelineView(parse_spec(tiny_spec_dict), clock=lambda: now[0])
    assert [r.name for r in view.rows.values()] == ["base", "data", "sft", "rm", "eval"]
    assert {r.state for r in view.rows.values()} == {"pending"}

    view.on_event(_event("base", progress.FINISHED, "cached", metrics={"parameters_m": 0.02}, at=100.0))
    view.on_event(_event("sft", progress.STARTED, "running", at=100.0))
    metrics = {"train/loss": 2.5, "train/lr": 1e-3, "train/progress": 0.25}
    view.on_event(_event("sft", progress.STEP, "running", 3, 12, metrics, at=110.0))
    now[0] = 110.0
    sft = view.rows["sft"]
    # 3 steps in 10 s -> the 9 steps left take 30 s
    assert sft.eta_seconds(110.0) == 30.0
    text = _text(view)
    assert "3/12" in text and "train/loss=2.5" in text and "0:30" in text and "running" in text
    assert "cached" in text and "parameters_m=0.02" in text

    view.on_event(_event("sft", progress.FINISHED, "ran", metrics={"final_train_loss": 1.25}, at=130.0))
    text = _text(view)
    assert "12/12" in text and "final_train_loss=1.25" in text and "0:30" in text  # elapsed 30 s


def test_a_resumed_stage_measures_its_rate_from_its_first_step_after_the_checkpoint(tiny_spec_dict):
    view = PipelineView(parse_spec(tiny_spec_dict))
    view.on_event(_event("sft", progress.STARTED, "resuming", at=0.0))
    view.on_event(_event("sft", progress.STEP, "running", 8, 12, {"train/loss": 1.0}, at=50.0))
    view.on_event(_event("sft", progress.STEP, "running", 10, 12, {"train/loss": 0.9}, at=54.0))
    assert view.rows["sft"].eta_seconds(54.0) == 4.0  # 2 steps in 4 s since step 8; 2 steps left


def test_a_rollout_pipelines_staleness_and_idle_shares_follow_the_key_metric(tiny_spec_dict):
    view = PipelineView(parse_spec(tiny_spec_dict))
    view.on_event(_event("sft", progress.STARTED, "running", at=0.0))
    view.on_event(_event("sft", progress.STEP, "running", 2, 8, {"train/loss": 0.5}, at=1.0))
    rollout = {"rollout/reward_mean": 0.3, "rollout/async/staleness_mean": 1.0}
    view.on_event(_event("sft", progress.DETAIL, "running", 3, None, rollout, at=2.0))
    shares = {"rollout/idle/trainer_share": 0.05, "rollout/idle/engine_share": 0.4}
    view.on_event(_event("sft", progress.DETAIL, "running", 3, None, shares, at=2.5))
    row = view.rows["sft"]
    assert (row.step, row.total, row.metric) == (2, 8, ("train/loss", 0.5))  # details move nothing else
    assert "train/loss=0.5 · stale 1 · trainer idle 5% · engine idle 40%" in _text(view)


def test_key_metric_skips_bookkeeping():
    assert key_metric({"train/progress": 0.5, "train/lr": 0.1, "train/kl": 0.2}) == ("train/kl", 0.2)
    assert key_metric({"train/progress": 0.5}) is None


def test_no_view_when_output_is_not_a_terminal(tiny_spec_dict):
    console = Console(file=io.StringIO(), force_terminal=False)
    with live_pipeline_view(parse_spec(tiny_spec_dict), console) as view:
        assert view is None
        assert not progress.has_listeners()


def test_view_listens_while_up_and_keeps_step_lines_out_of_the_console(tiny_spec_dict, monkeypatch):
    from prefect.logging.handlers import PrefectConsoleHandler

    monkeypatch.delenv("RLHF_LIVE_VIEW", raising=False)
    before = io.StringIO()
    handler = PrefectConsoleHandler(stream=before)
    logger = logging.getLogger("rlhf-test-live-view")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    out = io.StringIO()
    console = Console(file=out, force_terminal=True, width=160)
    try:
        with live_pipeline_view(parse_spec(tiny_spec_dict), console) as view:
            assert progress.has_listeners()
            progress.publish(_event("sft", progress.STEP, "running", 4, 12, {"train/loss": 3.0}))
            logger.info("sft step 4: train/loss=3", extra={STEP_LOG_MARK: True})
            logger.info("stage rm: cache hit")
        assert view.rows["sft"].step == 4
        assert not progress.has_listeners()
        assert "stage rm: cache hit" in out.getvalue()  # printed above the view, on its console
        assert "sft step 4" not in out.getvalue() + before.getvalue()
        assert before.getvalue() == ""  # nothing went around the view while it was up
        logger.info("after the view")
        assert "after the view" in before.getvalue()  # the handler's own stream is back
    finally:
        logger.removeHandler(handler)
