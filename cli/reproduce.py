"""``rlhf reproduce`` and ``rlhf models lineage``: a registered model's history, read back from the registry.

Reproduce, step by step:
1. the model reference (``models:/<name>@<alias>``, ``models:/<name>/<version>``, ``<name>:<version>``
   or a bare ``<name>``: its champion, else its latest version) -> the version -> its stage run -> the
   pipeline run (tag ``rlhf.pipeline_run_id``) -> that run's ``resolved_spec.yaml`` and the record of
   every stage (fingerprint, its parts, output refs);
2. the spec is rebuilt from that file and cut down to the stages the model descends from; it is printed
   as YAML (or written to ``--spec-out FILE``), ready for ``rlhf run``;
3. each of those stages is fingerprinted again, with today's code, libraries and local files, from the
   upstream outputs as recorded, and compared with its recorded fingerprint; where they differ, the
   recorded parts (``fingerprint_parts.json``) name what changed: the code, a config field, a local file,
   an input, a library version, the seed. A stage whose upstream differs differs too;
4. the cut-down spec is planned against the home (would each stage come from cache?);
5. with ``--run``, the cut-down spec runs into a fresh home and the rebuilt model's weights digest is
   compared with the registered one (training on CPU with the same seed is bit-identical).

Exit status: 0 when every stage matches (with ``--run``: when the rebuilt weights digest equals the
registered one), ``EXIT_REPRODUCTION_DIFFERS`` (4) when something differs, 2 for a bad reference or an
unreadable record, 1 for a crash.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from cli.console import console, exit_status, settings_for
from rlhf_core.errors import EXIT_REPRODUCTION_DIFFERS, UserError
from rlhf_core.refs import ModelRef, StageOutput

if TYPE_CHECKING:  # Prefect and MLflow load inside the commands, after the CLI's environment defaults
    from registry.lineage import LineageNode, PipelineRecord, VersionRef
    from rlhf_core.spec import PipelineSpec  # loaded by the commands that rebuild a spec, not for --help

MATCH, DIFFERS, UNRECORDED = "match", "differs", "not recorded"


@dataclass
class StageCheck:
    """One stage: its recorded fingerprint against today's, and why they differ."""

    stage: str
    kind: str
    status: str  # MATCH, DIFFERS or UNRECORDED
    recorded: str
    current: str = ""
    reasons: list[str] = field(default_factory=list)
    in_home: str = ""  # what ``rlhf plan`` says in this home: "cached" or "run"


@dataclass
class Rebuild:
    """The outcome of ``--run``: where it ran and the weights digest rebuilt vs registered."""

    home: str
    registered_digest: str
    rebuilt_digest: str
    stages: dict[str, str]  # stage -> "equal" or "differs" (its output digests)

    @property
    def equal(self) -> bool:
        return self.registered_digest == self.rebuilt_digest


@dataclass
class Reproduction:
    model: VersionRef
    stage: str
    pipeline: str
    pipeline_run_id: str
    checks: list[StageCheck]
    rebuild: Rebuild | None = None

    @property
    def stages_match(self) -> bool:
        return all(c.status == MATCH for c in self.checks)

    @property
    def reproduced(self) -> bool:
        return self.rebuild.equal if self.rebuild is not None else self.stages_match


def check_reproduction(ref: str, home: str) -> tuple[Reproduction, PipelineSpec, PipelineRecord]:
    """Steps 1-4 of the module docstring; the cut-down spec and the record come along for ``--run``."""
    from flows.plan import plan_pipeline
    from registry import tracking
    from registry.lineage import producing_pipeline
    from rlhf_core.settings import RLHFSettings

    tracking.configure(RLHFSettings(home=Path(home)))
    record = producing_pipeline(ref)
    spec = rebuilt_spec(record)
    needed = ancestry(spec, record.stage)
    checks = [c for c in compare_fingerprints(spec, record) if c.stage in needed]
    actions = {p.stage: p.action for p in plan_pipeline(spec, set(), home)}
    for check in checks:
        check.in_home = actions.get(check.stage, "")
    result = Reproduction(record.model, record.stage, spec.name, record.pipeline_run_id, checks)
    return result, spec, record


def rebuilt_spec(record: PipelineRecord) -> PipelineSpec:
    """The resolved spec of the pipeline run, cut down to the model's stage and what it descends from."""
    raw = record.resolved_spec
    from rlhf_core.spec import parse_spec

    where = f"model {record.model} (pipeline run {record.pipeline_run_id})"
    if record.stage not in {**raw.get("models", {}), **raw.get("stages", {})}:
        raise UserError(f"{where}: its stage '{record.stage}' is not in the pipeline's resolved spec")
    try:
        full = parse_spec(raw)
        needed = ancestry(full, record.stage)
        if not any(name in full.stages for name in needed):  # a base model: a spec needs one stage
            return full
        cut = {
            **raw,
            "models": {k: v for k, v in raw.get("models", {}).items() if k in needed},
            "stages": {k: v for k, v in raw["stages"].items() if k in needed},
        }
        return parse_spec(cut)
    except UserError as exc:
        raise UserError(f"{where}: the spec that produced it does not validate today:\n{exc}") from None


def ancestry(spec: PipelineSpec, name: str) -> set[str]:
    """``name`` and every stage or model it (transitively) reads from."""
    found, todo = set(), [name]
    while todo:
        current = todo.pop()
        if current in found:
            continue
        found.add(current)
        if current in spec.stages:
            todo.extend(spec.dependencies(current))
    return found


def compare_fingerprints(spec: PipelineSpec, record: PipelineRecord) -> list[StageCheck]:
    """Each stage's fingerprint today (from the recorded upstream outputs) against the recorded one."""
    outputs: dict[str, dict[str, StageOutput]] = {n: s.outputs for n, s in record.stages.items()}
    checks: dict[str, StageCheck] = {}
    for name in [*spec.models, *spec.topological_order()]:
        upstream = spec.dependencies(name) if name in spec.stages else []
        checks[name] = _check_stage(spec, name, record, outputs)
        changed = [dep for dep in upstream if checks.get(dep) and checks[dep].status != MATCH]
        if changed:  # its inputs will be rebuilt differently: today's fingerprint is not known yet
            checks[name].status = DIFFERS if checks[name].status == MATCH else checks[name].status
            checks[name].current = ""
            checks[name].reasons += [f"differs because upstream {dep} differs" for dep in changed]
    return list(checks.values())


def _check_stage(spec: PipelineSpec, name: str, record: PipelineRecord, outputs) -> StageCheck:
    from flows.stage_calls import UpstreamNotReady, base_model_call, stage_call
    from rlhf_core.fingerprint import config_changes, config_dict, describe_part_changes

    kind = spec.stages[name].kind if name in spec.stages else "base_model"
    recorded = record.stages.get(name)
    if recorded is None or not recorded.fingerprint:
        why = f"pipeline run {record.pipeline_run_id} holds no finished run of this stage"
        return StageCheck(name, kind, UNRECORDED, "", reasons=[why])
    try:
        call = base_model_call(spec, name) if name in spec.models else stage_call(spec, name, outputs)
    except UpstreamNotReady as exc:
        return StageCheck(name, kind, UNRECORDED, recorded.fingerprint, reasons=[str(exc)])
    except (UserError, TypeError) as exc:  # e.g. a recorded input no longer fits the stage's field
        return StageCheck(name, kind, DIFFERS, recorded.fingerprint, reasons=[str(exc)])
    check = StageCheck(name, kind, MATCH, recorded.fingerprint, call.fingerprint)
    if call.fingerprint == recorded.fingerprint:
        return check
    check.status = DIFFERS
    if recorded.parts is None:
        check.reasons = ["fingerprint differs (recorded before fingerprint parts were; no part to name)"]
        return check
    reasons = describe_part_changes(recorded.parts, call.fingerprint_parts)
    if "config changed" in reasons:
        fields = config_changes(config_dict(recorded.config), config_dict(call.stage))
        at = reasons.index("config changed")
        reasons[at : at + 1] = fields or ["config changed"]
    check.reasons = reasons or ["fingerprint differs although its recorded parts match (formula changed)"]
    return check


def rebuild(spec: PipelineSpec, record: PipelineRecord, into: Path) -> Rebuild:
    """Run the cut-down spec into the fresh home ``into``; compare its outputs with the recorded ones."""
    from flows.pipeline import run_pipeline

    own = record.stages.get(record.stage)
    if own is None or not any(isinstance(v, ModelRef) for v in own.outputs.values()):
        raise UserError(
            f"model {record.model}: its stage run never recorded its outputs (the stage did not finish), "
            "so there is no registered weights digest to compare a rebuild with"
        )
    outcomes = run_pipeline(spec, home=str(into))
    stages = {}
    for outcome in outcomes:
        recorded = record.stages.get(outcome.stage)
        old = {k: v.digest for k, v in (recorded.outputs if recorded else {}).items()}
        new = {k: v.digest for k, v in outcome.outputs.items()}
        stages[outcome.stage] = "equal" if old == new else "differs"
    registered = _model_output(record.stages[record.stage].outputs)
    rebuilt = _model_output(next(o.outputs for o in outcomes if o.stage == record.stage))
    return Rebuild(str(into), registered.digest, rebuilt.digest, stages)


def _model_output(outputs: dict[str, StageOutput]) -> ModelRef:
    return next(v for v in outputs.values() if isinstance(v, ModelRef))


def fresh_home(into: Path | None, home: Path) -> Path:
    """``--into`` (which must be empty: a home with runs would answer from its cache) or a temp dir."""
    if into is None:
        return Path(tempfile.mkdtemp(prefix="rlhf-reproduce-"))
    into = into.expanduser().resolve()
    if into == home.resolve():
        raise UserError(f"--into {into}: that is the home being checked; give a new, empty directory")
    if into.exists() and any(into.iterdir()):
        raise UserError(
            f"--into {into}: not empty; give a new, empty directory (a used home answers from cache)"
        )
    into.mkdir(parents=True, exist_ok=True)
    return into


# ---- the commands -------------------------------------------------------------------------------

RefArg = Annotated[
    str,
    typer.Argument(
        help="models:/<name>@<alias>, models:/<name>/<version>, <name>:<version>, or <name> (its champion, "
        "else its latest version)."
    ),
]
HomeOpt = Annotated[Path | None, typer.Option("--home", help="State dir (default $RLHF_HOME or ./.rlhf).")]
TracebackOpt = Annotated[
    bool, typer.Option("--traceback", envvar="RLHF_TRACEBACK", help="Show full tracebacks.")
]
RunOpt = Annotated[
    bool, typer.Option("--run", help="Also rebuild the model in a fresh home and compare its weights digest.")
]
SpecOutOpt = Annotated[
    Path | None,
    typer.Option(
        "--spec-out",
        help="Write the rebuilt spec (YAML, for rlhf run) to this file instead of printing it ('-': print).",
    ),
]
IntoOpt = Annotated[
    Path | None, typer.Option("--into", help="Fresh home for --run (default: a new temporary directory).")
]


def reproduce(
    ref: RefArg,
    home: HomeOpt = None,
    run: RunOpt = False,
    into: IntoOpt = None,
    spec_out: SpecOutOpt = None,
    traceback_: TracebackOpt = False,
) -> None:
    """Rebuild the spec that produced a registered model (printed as YAML, or --spec-out FILE) and check
    it stage by stage: do the fingerprints (code, config, data) still match what the registry recorded?
    With --run, rebuild the model too and compare its weights. Exit status 0: all match; 4: something
    differs."""
    settings = settings_for(home)
    with exit_status(traceback_, f"reproduce {ref}: "):
        result, spec, record = check_reproduction(ref, str(settings.resolved_home()))
        write_spec(spec, spec_out)
        print_checks(console, result)
        if run:
            from cli.prefect_database import initialize_temporary_server_database

            target = fresh_home(into, settings.resolved_home())
            console.print(f"rebuilding {', '.join(c.stage for c in result.checks)} in {target} ...")
            initialize_temporary_server_database()
            result.rebuild = rebuild(spec, record, target)
    print_verdict(console, result)
    raise typer.Exit(0 if result.reproduced else EXIT_REPRODUCTION_DIFFERS)


def spec_yaml(spec: PipelineSpec) -> str:
    """The rebuilt spec as a spec file: ``rlhf run FILE`` runs it (every default resolved, as it ran)."""
    import yaml

    return yaml.safe_dump(spec.model_dump(mode="json"), sort_keys=False)  # as resolved_spec.yaml


def write_spec(spec: PipelineSpec, target: Path | None) -> None:
    text = spec_yaml(spec)
    if target is None or str(target) == "-":
        console.print(f"# rebuilt spec of pipeline '{spec.name}'", highlight=False, markup=False)
        console.print(text, end="", soft_wrap=True, highlight=False, markup=False)
        return
    target.write_text(text)
    console.print(f"rebuilt spec written to {target} (rlhf run {target} runs it)", highlight=False)


def print_checks(console, result: Reproduction) -> None:
    from rich.table import Table

    table = Table(title=f"reproduce {result.model} (stage {result.stage}, pipeline {result.pipeline})")
    for column in ("stage", "kind", "recorded", "today", "verdict", "in this home", "why"):
        table.add_column(column, overflow="fold")
    colour = {MATCH: "green", DIFFERS: "red", UNRECORDED: "yellow"}
    for c in result.checks:
        verdict = f"[{colour[c.status]}]{c.status}[/{colour[c.status]}]"
        action = {"cached": "cached", "run": "would run"}.get(c.in_home, c.in_home)
        today = c.current[:12] or ("after upstream" if c.status == DIFFERS else "")
        table.add_row(c.stage, c.kind, c.recorded[:12], today, verdict, action, "\n".join(c.reasons))
    console.print(table)


def verdict_lines(result: Reproduction) -> list[str]:
    """The plain-text verdict (one reason per line, never wrapped, so logs and tests can read it)."""
    differing = [c for c in result.checks if c.status != MATCH]
    if not differing:
        lines = [f"all stages match: {result.model} would be rebuilt from the same code, data and config"]
    else:
        lines = [
            f"{len(differing)} of {len(result.checks)} stage(s) differ from the record of {result.model}:"
        ]
        lines += [f"  stage {c.stage}: {reason}" for c in differing for reason in c.reasons]
    if (rb := result.rebuild) is not None:
        lines.append(
            f"rebuilt in {rb.home}; output digests per stage: "
            + ", ".join(f"{k} {v}" for k, v in rb.stages.items())
        )
        if rb.equal:
            lines.append(f"weights digest equal to the registered one ({rb.rebuilt_digest[:16]})")
        else:
            lines.append(
                f"weights digest differs: registered {rb.registered_digest[:16]}, "
                f"rebuilt {rb.rebuilt_digest[:16]}"
            )
    return lines


def print_verdict(console, result: Reproduction) -> None:
    for line in verdict_lines(result):
        console.print(line, soft_wrap=True, highlight=False, markup=False)


def lineage(ref: RefArg, home: HomeOpt = None, traceback_: TracebackOpt = False) -> None:
    """Show a registered model's lineage as a tree: the versions it was built from (policy <- SFT <-
    base model, its reward models), with their runs, fingerprints, commits and dataset digests."""
    settings = settings_for(home)
    with exit_status(traceback_, f"lineage of {ref}: "):
        from registry import tracking
        from registry.lineage import model_lineage

        tracking.configure(settings)
        root = model_lineage(ref)
    console.print(lineage_tree(root))


def lineage_tree(node: LineageNode, tree=None):
    """A rich Tree of a lineage (each node: version, stage, role, aliases; run and its pipeline,
    fingerprint, commit, data)."""
    from rich.markup import escape
    from rich.tree import Tree

    relation = f"[dim]{node.relation}:[/dim] " if node.relation else ""
    if not node.registered:
        label = f"{relation}{escape(node.label)} [dim](not registered)[/dim]"
    else:
        aliases = " ".join(f"@{a}" for a in node.aliases)
        label = (
            f"{relation}[bold]{escape(node.label)}[/bold]  stage {node.stage or '?'} · {node.role or '?'}"
            + (f"  [cyan]{aliases}[/cyan]" if aliases else "")
        )
    branch = Tree(label) if tree is None else tree.add(label)
    if node.registered:
        pipeline = f" (pipeline {escape(node.pipeline)})" if node.pipeline else ""
        branch.add(
            f"[dim]run {node.run_id}{pipeline}  fingerprint {node.fingerprint[:12] or '?'}  "
            f"commit {escape(node.git_commit or '?')}[/dim]"
        )
        for dataset, digest in node.datasets.items():
            branch.add(f"[dim]data {escape(dataset)} sha256 {digest[:16]}[/dim]")
    for upstream in node.upstream:
        lineage_tree(upstream, branch)
    return branch
