"""Model cards: a markdown page per registered version, built from what the registry holds.

The card is the version's description (the registry's version page shows it) and ``model_card.md`` in
the version's run. It says what produced the version (stage, kind, pipeline, spec digest, commit,
package version, fingerprint, seed, a link to its run), its lineage as links to the upstream versions,
its evaluation figures with their confidence intervals, the plots drawn about it (its own run's and
the evaluations'), the promotion gate's decision, its aliases and
the resolved config of its stage. ``refresh_model_card`` rebuilds it whenever one of those changes
(after registration, evaluation and promotion); it never raises, so a card can never fail a stage.
"""

from __future__ import annotations

import json
import logging

import mlflow
import yaml
from mlflow.exceptions import MlflowException

from registry.lineage import (
    FINGERPRINT_PARTS,
    PIPELINE_RUN_TAG,
    RELATION_TAGS,
    RESOLVED_SPEC,
    VersionRef,
    dataset_digests,
    related_models,
)
from registry.model_metrics import measuring_runs, version_metrics
from registry.tracking import PACKAGE_VERSION_TAG, client

CARD_ARTIFACT = "model_card.md"
MAX_DESCRIPTION = 5000  # the registry's description column (VARCHAR(5000) on MySQL/PostgreSQL stores)
CI_SUFFIXES = ("_ci_low", "_ci_high", "_n")
GATE_TAGS = {
    "rlhf.gate.decision": "decision",
    "rlhf.gate.reason": "reason",
    "rlhf.gate.figures": "figures",
    "rlhf.promoted": "promoted by",
    "rlhf.rolled_back_from": "rolled back from",
    "rlhf.rolled_back": "rolled back",
}

logger = logging.getLogger("rlhf.model_cards")


def refresh_model_card(name: str, version: str) -> str:
    """Rebuild the card of ``name`` version ``version``, set it as the description, log it in the run.

    Returns the card, or "" when it could not be built or saved (a warning says why; never raises).
    """
    try:
        card = model_card(name, str(version))
        description = card if len(card) <= MAX_DESCRIPTION else _shortened(card)
        c = client()
        c.update_model_version(name, str(version), description=description)
        run_id = c.get_model_version(name, str(version)).run_id
        if run_id:
            c.log_text(run_id, card, CARD_ARTIFACT)
        return card
    except Exception as exc:  # noqa: BLE001 - a card must never fail the stage that asked for it
        logger.warning("model card of %s v%s not updated: %s: %s", name, version, type(exc).__name__, exc)
        return ""


def model_card(name: str, version: str) -> str:
    """The markdown card of a registered version (see the module docstring for its sections)."""
    c = client()
    info = c.get_model_version(name, version)
    tags = dict(info.tags)
    run = c.get_run(info.run_id) if info.run_id else None
    sections = [
        _header(name, version, tags, sorted(getattr(info, "aliases", None) or [])),
        _provenance(tags, run),
        _lineage(name, version, tags),
        _evaluation(version_metrics(name, version)),
        _plots([info.run_id, *measuring_runs(name, version)]),
        _gate(tags),
        _config(run, tags.get("rlhf.stage", "")),
    ]
    return "\n\n".join(s for s in sections if s) + "\n"


def _header(name: str, version: str, tags: dict[str, str], aliases: list[str]) -> str:
    role, stage = tags.get("rlhf.role", "model"), tags.get("rlhf.stage", "?")
    shown = ", ".join(f"`@{a}`" for a in aliases) or "none"
    return (
        f"# {name} v{version}\n\n"
        f"A **{role}** model produced by stage `{stage}`. Aliases: {shown}. "
        f"Load it with `models:/{name}/{version}`."
    )


def _provenance(tags: dict[str, str], run) -> str:
    run_tags = run.data.tags if run is not None else {}
    experiment = run.info.experiment_id if run is not None else ""
    rows = [
        ("stage", f"`{tags.get('rlhf.stage', '?')}` (kind `{run_tags.get('rlhf.kind', '?')}`)"),
        ("pipeline", _pipeline(experiment, run_tags.get(PIPELINE_RUN_TAG, ""))),
        ("MLflow run", _run_link(experiment, run.info.run_id) if run is not None else "none"),
        ("spec digest", _code(tags.get("rlhf.spec_digest"))),
        ("git commit", _code(tags.get("rlhf.git_commit"))),
        ("package version", _code(tags.get(PACKAGE_VERSION_TAG))),
        ("fingerprint", _code(tags.get("rlhf.fingerprint"))),
        ("seed", _code(_seed(run))),
    ]
    functions = run_tags.get("rlhf.reward_functions", "")
    if functions:  # each user reward function by reference, with the digest of its code
        rows.append(("reward functions", "<br>".join(_code(line) for line in functions.splitlines())))
    return "## What produced it\n\n| | |\n|---|---|\n" + "\n".join(f"| {k} | {v} |" for k, v in rows)


def _pipeline(experiment_id: str, pipeline_run_id: str) -> str:
    """The pipeline run that ran the stage; its experiment can differ from the stage run's (a pipeline
    that resumed another pipeline's interrupted run: ``registry.stage_cache``)."""
    if not experiment_id:
        return "unknown"
    if pipeline_run_id:
        try:
            experiment_id = client().get_run(pipeline_run_id).info.experiment_id
        except MlflowException:  # the pipeline run was deleted: the card still names the stage's
            pipeline_run_id = ""
    name = client().get_experiment(experiment_id).name
    if not pipeline_run_id:
        return f"`{name}`"
    return f"`{name}` ({_run_link(experiment_id, pipeline_run_id, 'pipeline run')})"


def _run_link(experiment_id: str, run_id: str, text: str | None = None) -> str:
    """A link relative to the MLflow UI's root (its pages live under ``#/``)."""
    return f"[{text or run_id}](#/experiments/{experiment_id}/runs/{run_id})"


def version_link(ref: VersionRef) -> str:
    return f"[{ref.name} v{ref.version}](#/models/{ref.name}/versions/{ref.version})"


def _code(value: str | None) -> str:
    return f"`{value}`" if value else "unknown"


def _seed(run) -> str | None:
    """The seed the stage used: its ``seed`` param if logged, else the recorded fingerprint parts."""
    if run is None:
        return None
    if "seed" in run.data.params:
        return run.data.params["seed"]
    try:
        return mlflow.artifacts.load_dict(f"runs:/{run.info.run_id}/{FINGERPRINT_PARTS}").get("seed")
    except Exception:  # noqa: BLE001 - recorded before fingerprint parts were
        return None


def _lineage(name: str, version: str, tags: dict[str, str]) -> str:
    lines = []
    for tag, relation in RELATION_TAGS.items():
        for target in related_models(tags.get(tag, "")):
            if isinstance(target, VersionRef):
                lines.append(f"- {relation}: {version_link(target)} (`{target.uri}`)")
            else:
                lines.append(f"- {relation}: `{target}` (not registered)")
    if base := tags.get("rlhf.base_model"):
        lines.append(
            f"- base model: `{base}`" + (f" (source: {tags['rlhf.source']})" if "rlhf.source" in tags else "")
        )
    for dataset, digest in dataset_digests(tags.get("rlhf.dataset_digests", "")).items():
        lines.append(f"- data `{dataset}`: sha256 `{digest}`")
    lines.append(
        f"\nWhole chain: `rlhf models lineage models:/{name}/{version}`; "
        f"rebuild check: `rlhf reproduce models:/{name}/{version}`."
    )
    return "## Lineage\n\n" + "\n".join(lines)


def evaluation_rows(
    metrics: dict[str, float],
) -> list[tuple[str, float, float | None, float | None, int | None]]:
    """(metric, value, CI low, CI high, n) per figure; ``x_ci_low``, ``x_ci_high``, ``x_n`` join ``x``."""
    names = sorted(k for k in metrics if not k.endswith(CI_SUFFIXES) or _is_base_metric(k, metrics))
    rows = []
    for key in names:
        n = metrics.get(f"{key}_n")
        rows.append(
            (
                key,
                metrics[key],
                metrics.get(f"{key}_ci_low"),
                metrics.get(f"{key}_ci_high"),
                None if n is None else int(n),
            )
        )
    return rows


def _is_base_metric(key: str, metrics: dict[str, float]) -> bool:
    """A key ending like a CI suffix that is a figure of its own (no ``x`` it belongs to)."""
    return not any(key.endswith(s) and key.removesuffix(s) in metrics for s in CI_SUFFIXES)


def format_figure(value: float, low: float | None, high: float | None, n: int | None) -> str:
    """``0.82 \\[0.71, 0.9\\] (n=50)``, shown as ``0.82 [0.71, 0.9] (n=50)``; the interval and count only
    when known. The brackets are escaped: the registry's markdown reads ``[...] (...)`` as a link."""
    text = f"{value:.4g}"
    if low is not None and high is not None:
        text += f" \\[{low:.4g}, {high:.4g}\\]"
    if n is not None:
        text += f" (n={n})"
    return text


def _evaluation(metrics: dict[str, float]) -> str:
    rows = evaluation_rows(metrics)
    if not rows:
        return "## Evaluation\n\nNo evaluation figures yet (an `evaluate` stage adds them)."
    lines = [f"- `{key}` = {format_figure(v, lo, hi, n)}" for key, v, lo, hi, n in rows]
    return "## Evaluation\n\nFigures with their 95% bootstrap interval and sample count:\n\n" + "\n".join(
        lines
    )


def _plots(run_ids: list[str | None]) -> str:
    """The figures drawn about the version: ``plots/*.png`` of its own run (a reward model's reliability
    plot) and of the runs that measured it (an evaluation's best-of-N curve, its comparison plots)."""
    c, lines = client(), []
    for run_id in dict.fromkeys(r for r in run_ids if r):  # a version may have no run of its own
        pngs = [f.path for f in c.list_artifacts(run_id, "plots") if f.path.endswith(".png")]
        if pngs:
            run = c.get_run(run_id)
            where = _run_link(run.info.experiment_id, run_id, run.info.run_name or run_id)
            lines.append(f"- {where}: " + ", ".join(f"`{path}`" for path in sorted(pngs)))
    return "## Plots\n\n" + "\n".join(lines) if lines else ""


def _gate(tags: dict[str, str]) -> str:
    shown = {tag: value for tag, value in tags.items() if value}
    if shown.get("rlhf.gate.reason") == shown.get("rlhf.gate.figures"):  # a pass: the reason is every figure
        shown.pop("rlhf.gate.reason", None)
    lines = [f"- {label}: {shown[tag]}" for tag, label in GATE_TAGS.items() if tag in shown]
    if not lines:
        return "## Promotion gate\n\nNot gated yet."
    return "## Promotion gate\n\n" + "\n".join(lines)


def _config(run, stage: str) -> str:
    config = _config_from_params(run.data.params) if run is not None else {}
    if not config and run is not None and (parent := run.data.tags.get(PIPELINE_RUN_TAG)):
        config = _config_from_spec(parent, stage)
    if not config:
        return ""
    text = yaml.safe_dump(config, sort_keys=False).rstrip()
    return f"## Resolved config of stage `{stage}`\n\n```yaml\n{text}\n```"


def _config_from_params(params: dict[str, str]) -> dict:
    """The nested config back from the stage run's flat ``config.*`` params (values JSON-decoded)."""
    config: dict = {}
    for key in sorted(k for k in params if k.startswith("config.")):
        node = config
        *path, leaf = key.removeprefix("config.").split(".")
        for part in path:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                break
        else:
            node[leaf] = _decoded(params[key])
    return config


def _decoded(value: str):
    try:
        return json.loads(value)
    except ValueError:
        return value


def _config_from_spec(pipeline_run_id: str, stage: str) -> dict:
    try:
        spec = yaml.safe_load(mlflow.artifacts.load_text(f"runs:/{pipeline_run_id}/{RESOLVED_SPEC}"))
    except Exception:  # noqa: BLE001 - no resolved spec: the card goes without a config section
        return {}
    return (spec.get("stages") or {}).get(stage) or (spec.get("models") or {}).get(stage) or {}


def _shortened(card: str) -> str:
    """A card that fits the description field: the config section gives way first."""
    head, marker, _ = card.partition("## Resolved config")
    note = f"The resolved config is in `{CARD_ARTIFACT}` of the version's run (too long for this page).\n"
    short = head + (note if marker else "")
    return short if len(short) <= MAX_DESCRIPTION else short[: MAX_DESCRIPTION - 20] + "\n\n(truncated)\n"
