"""PNG plots of the over-optimization monitor's history (book ch.14: rewards against KL).

- ``proxy_gold_vs_kl.png``: proxy (left axis) and gold (right axis) of every evaluation against the
  KL to the reference, in step order, the stop and the registered evaluation marked;
- ``frontier.png``: the reward-vs-KL frontier across the evaluated checkpoints: each evaluation as a
  point, and for proxy and gold the best reward reached at or below each KL (the upper envelope).

matplotlib is imported inside :func:`draw_monitor_plots` (Agg backend, no display needed).
"""

from __future__ import annotations

from pathlib import Path

from rlhf_core.training.monitor.history import Evaluation

PROXY_COLOR, GOLD_COLOR = "tab:blue", "tab:orange"


def frontier(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The upper envelope of (kl, reward) points: sorted by KL, each point whose reward beats every
    point at a lower or equal KL."""
    out: list[tuple[float, float]] = []
    for kl, reward in sorted(points, key=lambda p: (p[0], -p[1])):
        if not out or reward > out[-1][1]:
            out.append((kl, reward))
    return out


def draw_monitor_plots(
    history: list[Evaluation],
    directory: Path,
    *,
    title: str,
    stopped_at: int | None,
    registered_step: int | None,
) -> list[Path]:
    """Write the two plots into ``directory``; returns their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    directory.mkdir(parents=True, exist_ok=True)
    kl = [e.kl for e in history]
    marks = {"stopped": stopped_at, "registered": registered_step}

    fig, left = plt.subplots(figsize=(7, 4.5))
    right = left.twinx()
    left.plot(kl, [e.proxy for e in history], "o-", color=PROXY_COLOR, label="proxy")
    right.plot(kl, [e.gold for e in history], "s-", color=GOLD_COLOR, label="gold")
    for e in history:
        left.annotate(str(e.step), (e.kl, e.proxy), fontsize=7, xytext=(3, 3), textcoords="offset points")
    _mark(left, history, marks)
    left.set_xlabel("KL(pi || pi_ref), nats per completion (k1, sampled)")
    left.set_ylabel("proxy reward", color=PROXY_COLOR)
    right.set_ylabel("gold reward", color=GOLD_COLOR)
    left.set_title(f"{title}: proxy and gold vs KL (labels: optimizer step)")
    handles = [h for ax in (left, right) for h in ax.get_legend_handles_labels()[0]]
    left.legend(
        handles, [str(h.get_label()) for h in handles], loc="upper center", bbox_to_anchor=(0.5, -0.14),
        ncol=4, fontsize=8,
    )  # fmt: skip
    fig.tight_layout()
    first = directory / "proxy_gold_vs_kl.png"
    fig.savefig(first, dpi=120)
    plt.close(fig)

    fig, axes = plt.subplots(1, 2, figsize=(10, 4.2))
    for ax, role, color in ((axes[0], "proxy", PROXY_COLOR), (axes[1], "gold", GOLD_COLOR)):
        points = [(e.kl, getattr(e, role)) for e in history]
        ax.scatter(*zip(*points, strict=True), color=color, alpha=0.6, label="evaluated checkpoints")
        envelope = frontier(points)
        envelope.append((max(kl), envelope[-1][1]))  # the best so far holds up to the largest KL
        ax.step(*zip(*envelope, strict=True), where="post", color=color, label="frontier (best at <= KL)")
        ax.plot([p[0] for p in points], [p[1] for p in points], color=color, alpha=0.25, lw=1)
        _mark(ax, history, marks, role)
        ax.set_xlabel("KL(pi || pi_ref), nats")
        ax.set_ylabel(f"{role} reward")
        ax.set_title(f"{role} reward vs KL")
        ax.legend(fontsize=8, loc="best")
    fig.suptitle(f"{title}: reward-vs-KL frontier across checkpoints")
    fig.tight_layout()
    second = directory / "frontier.png"
    fig.savefig(second, dpi=120)
    plt.close(fig)
    return [first, second]


def _mark(ax, history: list[Evaluation], marks: dict[str, int | None], role: str = "proxy") -> None:
    """Vertical lines at the KL of the stop and of the registered evaluation."""
    styles = {"stopped": ("red", "--"), "registered": ("green", ":")}
    for label, step in marks.items():
        match = next((e for e in history if e.step == step), None)
        if match is not None and (label != "registered" or len(history) > 1):
            color, style = styles[label]
            ax.axvline(match.kl, color=color, ls=style, lw=1, label=f"{label} (step {step})")
