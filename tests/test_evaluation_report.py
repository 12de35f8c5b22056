"""The evaluation report as a markdown table and as PNG plots."""

from __future__ import annotations

from rlhf_core.evaluation.plots import write_plots
from rlhf_core.evaluation.report_table import figure_names, report_markdown

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _figure(name: str, value: float, low: float, high: float, n: int) -> dict[str, float]:
    return {name: value, f"{name}_ci_low": low, f"{name}_ci_high": high, f"{name}_n": float(n)}


REPORT = {
    "sft": {
        **_figure("eval/accuracy", 0.5, 0.3, 0.7, 20),
        **_figure("eval/reward/rm:rm", 0.1, -0.2, 0.4, 20),
        **_figure("eval/kl_to_reference", 0.0, 0.0, 0.0, 20),
        **_figure("eval/nll", 1.25, 1.2, 1.3, 10),
        "eval/loss": 1.25,
        "eval/tokens": 300.0,
        "eval/perplexity": 3.49,
    },
    "ppo": {
        **_figure("eval/accuracy", 0.625, 0.4, 0.85, 20),
        **_figure("eval/pass_at_10", 0.9, 0.8, 1.0, 20),
        **_figure("eval/pass_at_2", 0.7, 0.5, 0.9, 20),
        **_figure("eval/win_rate/rm:rm", 0.675, 0.55, 0.8, 20),
        **_figure("eval/tie_rate/rm:rm", 0.05, 0.0, 0.15, 20),
        **_figure("eval/reward/rm:rm", 0.9, 0.6, 1.2, 20),
        **_figure("eval/kl_to_reference", 2.5, 1.9, 3.1, 20),
        "eval/win_rate/policy:judge_n": 0.0,
    },
}


def test_the_table_has_a_row_per_model_and_a_column_per_figure_with_interval_and_count():
    text = report_markdown(REPORT, baseline="sft", reference="sft", title="Evaluation: eval")
    lines = text.splitlines()
    assert lines[0] == "## Evaluation: eval"
    header = [c.strip() for c in lines[2].strip("|").split("|")]
    assert header == [
        "model",
        "accuracy",
        "pass_at_2",
        "pass_at_10",
        "win_rate/policy:judge",
        "win_rate/rm:rm",
        "tie_rate/rm:rm",
        "reward/rm:rm",
        "kl_to_reference",
        "nll",
        "perplexity",
    ]  # fmt: skip  (eval/loss is eval/nll; eval/tokens is not a figure)
    sft = dict(zip(header, (c.strip() for c in lines[4].strip("|").split("|")), strict=True))
    ppo = dict(zip(header, (c.strip() for c in lines[5].strip("|").split("|")), strict=True))
    assert sft["model"] == "sft (baseline)" and ppo["model"] == "ppo"
    assert ppo["win_rate/rm:rm"] == "0.675 [0.55, 0.8] n=20"
    assert ppo["accuracy"] == "0.625 [0.4, 0.85] n=20"
    assert sft["win_rate/rm:rm"] == "—"  # the baseline gets no win rate
    assert ppo["win_rate/policy:judge"] == "— n=0"  # no comparison could be judged
    assert sft["perplexity"] == "3.49" and ppo["nll"] == "—"
    assert "(wins + ties / 2) / comparisons" in text and "baseline `sft`" in text
    assert "KL(model || `sft`)" in text


def test_figure_names_drop_the_interval_suffixes():
    names = figure_names({"m": _figure("eval/accuracy", 0.5, 0.4, 0.6, 5) | {"eval/tokens": 3.0}})
    assert names == ["eval/accuracy"]


def test_plots_are_png_files_one_per_figure_with_an_interval_and_reward_vs_kl(tmp_path):
    written = write_plots(REPORT, tmp_path / "plots", baseline="sft")
    names = sorted(p.name for p in written)
    assert names == sorted(
        [
            "accuracy.png", "pass_at_2.png", "pass_at_10.png", "win_rate-rm-rm.png", "tie_rate-rm-rm.png",
            "reward-rm-rm.png", "kl_to_reference.png", "nll.png", "reward_vs_kl.png",
        ]
    )  # fmt: skip
    for path in written:
        data = path.read_bytes()
        assert data.startswith(PNG_SIGNATURE) and len(data) > 2000
    assert sorted(p.name for p in (tmp_path / "plots").iterdir()) == names


def test_no_kl_no_reward_vs_kl_plot(tmp_path):
    report = {"m": _figure("eval/accuracy", 0.5, 0.4, 0.6, 5)}
    assert [p.name for p in write_plots(report, tmp_path)] == ["accuracy.png"]
