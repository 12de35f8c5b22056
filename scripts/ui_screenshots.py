"""Screenshots of the Prefect and MLflow UIs of a finished pipeline, and a check of what they show.

    python scripts/ui_screenshots.py --home HOME [--out docs/images/ui] [--model NAME]
    python scripts/ui_screenshots.py --home HOME --run recipes/quickstart.yaml   # run the pipeline first

It starts both UIs of ``HOME`` the way ``rlhf ui`` does (``cli/ui.py``: Prefect server on the home's
database, MLflow server on its store, both on 127.0.0.1, here on free ports), opens five pages in a
headless Chromium (through selenium and chromedriver), waits until each page shows what it must, saves
PNGs of it, and stops both servers, always:

1. MLflow, the registry page of the promoted version (the one holding the ``champion`` alias):
   ``mlflow-model-version.png`` (version, aliases, top of the model card), ``mlflow-model-card.png`` (its
   evaluation figures and promotion gate), ``mlflow-version-tags.png`` (the lineage tags). Checked: the
   version number, ``champion``, every heading and evaluation figure of the card (the version's
   description), the gate decision, the lineage tags ``rlhf.upstream_models`` (and its value),
   ``rlhf.base_model``, ``rlhf.stage``, ``rlhf.fingerprint`` where the version has them.
2. MLflow, the run of the evaluate stage: ``mlflow-evaluate-run.png`` (its name and every
   ``<candidate>/eval/<figure>`` metric) and ``mlflow-evaluate-report.png`` (its ``report.md`` artifact:
   every cell of the report table).
3. Prefect, the flow run that made that report (V2 UI, the one the server's root opens), Artifacts tab:
   ``prefect-flow-run.png`` (run graph with the artifacts on their task runs) and
   ``prefect-flow-run-artifacts.png``. Checked: the flow run's name, its ``pipeline:<name>`` tag and the
   evaluation artifact ``<pipeline>-<stage>-report``.
4. Prefect, that artifact's page: ``prefect-eval-report.png``; checked: every cell of the report table.

What each page must show is read from the servers' APIs first (the version's tags and description, the
run's metrics and report, the artifact), then looked for in the text the browser renders. A page that
lacks something makes the script exit with status 1 and name the page and the missing text (the picture
is still saved, for a look); no promoted version, evaluate run or report artifact also exits 1; no
browser exits 2. Needs ``chromium`` and ``chromedriver`` on PATH (Debian: ``apt-get install chromium
chromium-driver``) and the ``selenium`` package. ``--run SPEC`` runs a pipeline into the home first,
with both UIs up (its runs report to this Prefect server), so one command makes a home and its pictures.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from cli import ui  # noqa: E402  (imports neither prefect nor mlflow)
from rlhf_core.settings import RLHFSettings, apply_environment_defaults  # noqa: E402

DEFAULT_OUT = REPO_ROOT / "docs" / "images" / "ui"
WINDOW = (1400, 900)
WIDE = (1920, 900)  # for the pages with the report table (one column per figure)
PAGE_TIMEOUT_S = 90.0
CHAMPION = "champion"
LINEAGE_TAGS = ("rlhf.upstream_models", "rlhf.base_model", "rlhf.stage", "rlhf.fingerprint")


class Missing(Exception):
    """Something the pipeline or a page should have and does not."""


@dataclass
class Page:
    """One page to open, the texts it must show, and its screenshots: (texts to scroll to, file). The
    first text is scrolled to the top of the page, the next ones (inside a scrolling box) into view."""

    name: str
    url: str
    expected: list[str]
    shots: list[tuple[tuple[str, ...], str]]
    window: tuple[int, int] = WINDOW
    missing: list[str] = field(default_factory=list)


@dataclass
class UIs:
    prefect: str  # http://127.0.0.1:<port>
    mlflow: str


def free_port() -> int:
    with socket.socket() as s:
        s.bind((ui.HOST, 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running_uis(
    settings: RLHFSettings, prefect_port: int | None = None, mlflow_port: int | None = None
) -> Iterator[UIs]:
    """Both servers of ``rlhf ui`` on the home (free ports unless given); stopped on the way out, always."""
    prefect_port, mlflow_port = prefect_port or free_port(), mlflow_port or free_port()
    ui._prepare_stores(settings, local_store=True)
    servers = [ui.prefect_server(settings, prefect_port), ui.mlflow_server(settings, mlflow_port)]
    try:
        for server in servers:
            server.start()
        ui.wait_until_ready(servers)
        yield UIs(f"http://{ui.HOST}:{prefect_port}", f"http://{ui.HOST}:{mlflow_port}")
    finally:
        for server in servers:
            server.stop()


def run_pipeline(spec: Path, settings: RLHFSettings, uis: UIs) -> None:
    """``rlhf run SPEC`` into the home, reporting to the UIs' Prefect server, with links to these UIs."""
    env = {
        **os.environ,
        "PREFECT_API_URL": f"{uis.prefect}/api",
        "RLHF_PREFECT_UI_URL": uis.prefect,
        "RLHF_MLFLOW_UI_URL": uis.mlflow,
        "RLHF_LIVE_VIEW": "0",
    }
    command = [sys.executable, "-m", "cli.app", "run", str(spec), "--home", str(settings.resolved_home())]
    print(f"running {spec} into {settings.resolved_home()} ...", flush=True)
    result = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        tail = "\n".join((result.stdout + result.stderr).splitlines()[-40:])
        raise Missing(f"rlhf run {spec} exited with status {result.returncode}:\n{tail}")


# --- what the pages must show, from the servers' APIs ------------------------------------------------


def _call(url: str, body: dict | None = None) -> dict | list:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read() or b"null")


def _mlflow(uis: UIs, path: str, **query) -> dict:
    return _call(f"{uis.mlflow}/api/2.0/mlflow/{path}?{urllib.parse.urlencode(query)}")  # type: ignore[return-value]


def promoted_version(uis: UIs, model: str | None) -> dict:
    """The version holding ``champion`` (of ``model``, else of the registered model promoted last)."""
    models = _mlflow(uis, "registered-models/search", max_results=1000).get("registered_models", [])
    if model:
        models = [m for m in models if m["name"] == model]
        if not models:
            raise Missing(f"no registered model named {model!r} in this home")
    champions = []
    for m in models:
        for alias in m.get("aliases", []):
            if alias["alias"] == CHAMPION:
                version = _mlflow(uis, "model-versions/get", name=m["name"], version=alias["version"])
                champions.append(version["model_version"])
    if not champions:
        where = f"model {model!r}" if model else "any registered model"
        raise Missing(
            f"no version of {where} holds the alias {CHAMPION!r}: run a pipeline with a promote stage"
        )
    return max(champions, key=lambda v: int(v.get("last_updated_timestamp", 0)))


def _tags(entity: dict) -> dict[str, str]:
    """Tags of a model version (``tags``) or of a run (``data.tags``) as the REST API returns them."""
    tags = entity.get("tags") or entity.get("data", {}).get("tags", [])
    return {t["key"]: t.get("value", "") for t in tags}


def card_lines(card: str) -> list[str]:
    """Lines of a markdown model card as a browser renders them: its headings, and each evaluation figure
    as ``eval/<metric> = <value> [<low>, <high>] (n=<count>)`` (from the card's ``- `eval/...` = ...``
    items, whose escaped brackets render as plain brackets)."""
    headings = [re.sub(r"^#+\s*", "", line).strip() for line in card.splitlines() if line.startswith("#")]
    figures = [
        (key, value.replace("\\[", "[").replace("\\]", "]").strip())
        for key, value in re.findall(r"^- `(eval/[^`]+)` = (.+)$", card, flags=re.MULTILINE)
    ]
    return [re.sub(r"[*_`]", "", h) for h in headings if h] + [f"{k} = {v}" for k, v in figures]


def evaluate_run(uis: UIs, experiment_id: str, model_run_id: str) -> dict:
    """The newest run of an evaluate stage in the version's experiment (the one its promotion read)."""
    found = _call(
        f"{uis.mlflow}/api/2.0/mlflow/runs/search",
        {
            "experiment_ids": [experiment_id],
            "filter": "tags.`rlhf.kind` = 'evaluate' and attributes.status = 'FINISHED'",
            "order_by": ["attributes.start_time DESC"],
            "max_results": 1,
        },
    ).get("runs", [])  # type: ignore[union-attr]
    if not found:
        raise Missing(
            f"no finished evaluate stage run in MLflow experiment {experiment_id} (of run {model_run_id})"
        )
    return found[0]


def artifact_key(*parts: str) -> str:
    """A Prefect artifact key as the stages write it (``runtime.stage_reports.artifact_key``)."""
    return re.sub(r"[^a-z0-9-]+", "-", "-".join(parts).lower()).strip("-")


def report_artifact(uis: UIs, key: str) -> dict:
    """The newest Prefect artifact with this key."""
    found = _call(
        f"{uis.prefect}/api/artifacts/filter",
        {"artifacts": {"key": {"any_": [key]}}, "sort": "CREATED_DESC", "limit": 1},
    )
    if not found:
        raise Missing(
            f"no Prefect artifact {key!r}: the evaluate stage did not run under this Prefect server"
        )
    return found[0]  # type: ignore[index]


def report_cells(markdown: str) -> list[list[str]]:
    """The body rows of the first markdown table in ``markdown`` (header and separator left out)."""
    rows = [
        [c.strip() for c in line.strip().strip("|").split("|")]
        for line in markdown.splitlines()
        if line.startswith("|")
    ]
    return [r for r in rows[1:] if not all(set(c) <= set("-: ") for c in r)]


def pages(uis: UIs, model: str | None) -> list[Page]:
    """The pages to open and what each must show, read from the servers' APIs."""
    version = promoted_version(uis, model)
    name, number = version["name"], version["version"]
    tags = _tags(version)
    card = version.get("description") or ""
    if not card.strip():
        raise Missing(f"{name} v{number} has no description (model card) in the registry")
    if "rlhf.upstream_models" not in tags:
        raise Missing(f"{name} v{number} has no rlhf.upstream_models tag (tags: {sorted(tags)})")
    lineage = [t for t in LINEAGE_TAGS if t in tags]
    gate = (
        ["rlhf.gate.decision", f"decision: {tags['rlhf.gate.decision']}"]
        if "rlhf.gate.decision" in tags
        else []
    )
    version_page = Page(
        "MLflow model version",
        ui.mlflow_page(uis.mlflow, f"#/models/{urllib.parse.quote(name)}/versions/{number}"),
        [f"Version {number}", CHAMPION, *card_lines(card), *gate, *lineage, tags["rlhf.upstream_models"]],
        [
            ((), "mlflow-model-version.png"),
            (("Evaluation",), "mlflow-model-card.png"),
            (("Tags", "rlhf.upstream_models"), "mlflow-version-tags.png"),  # the tags table scrolls by itself
        ],
    )

    model_run = _mlflow(uis, "runs/get", run_id=version["run_id"])["run"]
    experiment_id = model_run["info"]["experiment_id"]
    candidate = _tags(model_run).get("rlhf.stage", "")
    evaluation = evaluate_run(uis, experiment_id, version["run_id"])
    eval_id = evaluation["info"]["run_id"]
    metrics = sorted(m["key"] for m in evaluation["data"].get("metrics", []))
    shown = [
        m for m in metrics if m.startswith(f"{candidate}/eval/") and not re.search(r"_(ci_low|ci_high|n)$", m)
    ]
    if not shown:
        raise Missing(f"evaluate run {eval_id} has no metrics of {candidate!r} (has {metrics[:10]})")
    accuracy = f"{candidate}/eval/accuracy"
    eval_run_page = Page(
        "MLflow evaluate run",
        ui.mlflow_page(uis.mlflow, f"#/experiments/{experiment_id}/runs/{eval_id}"),
        [evaluation["info"]["run_name"], *shown],
        # the metrics table scrolls by itself and lists the baseline's first: bring the candidate's in view
        [(("Overview", accuracy if accuracy in shown else shown[0]), "mlflow-evaluate-run.png")],
    )
    with urllib.request.urlopen(
        f"{uis.mlflow}/get-artifact?path=report.md&run_uuid={eval_id}", timeout=30
    ) as response:
        report_md = response.read().decode()
    rows = report_cells(report_md)
    if not any(r[0] == candidate for r in rows):
        raise Missing(f"report.md of evaluate run {eval_id} has no row for {candidate!r}")
    report_md_page = Page(
        "MLflow evaluation report",
        ui.mlflow_page(uis.mlflow, f"#/experiments/{experiment_id}/runs/{eval_id}/artifacts/report.md"),
        ["report.md", *{cell for row in rows for cell in row}],
        [((), "mlflow-evaluate-report.png")],
        WIDE,
    )

    eval_tags = _tags(evaluation)
    pipeline = _pipeline_name(uis, eval_tags)
    key = artifact_key(pipeline, eval_tags.get("rlhf.stage", ""), "report")
    artifact = report_artifact(uis, key)
    flow_run: dict = _call(f"{uis.prefect}/api/flow_runs/{artifact['flow_run_id']}")  # type: ignore[assignment]
    # The V2 UI: the one a browser gets at the server's root (deep links without /v2 open the V1 UI).
    flow_run_page = Page(
        "Prefect flow run",
        f"{uis.prefect}/v2/runs/flow-run/{flow_run['id']}?tab=Artifacts",
        [flow_run["name"], f"pipeline:{pipeline}", key, artifact.get("description") or key],
        [((), "prefect-flow-run.png"), (("Job Variables",), "prefect-flow-run-artifacts.png")],
    )
    artifact_rows = report_cells(artifact.get("data") or "")
    report_page = Page(
        "Prefect evaluation artifact",
        f"{uis.prefect}/v2/artifacts/artifact/{artifact['id']}",
        [key, flow_run["name"], *{cell for row in artifact_rows for cell in row}],
        [((), "prefect-eval-report.png")],
        WIDE,  # the report table is wider than the artifact's column at 1400 px and runs under the side panel
    )
    return [version_page, eval_run_page, report_md_page, flow_run_page, report_page]


def _pipeline_name(uis: UIs, stage_run_tags: dict[str, str]) -> str:
    parent = stage_run_tags.get("rlhf.pipeline_run_id") or stage_run_tags.get("mlflow.parentRunId")
    if not parent:
        raise Missing("the evaluate run has no rlhf.pipeline_run_id tag")
    params = {
        p["key"]: p["value"] for p in _mlflow(uis, "runs/get", run_id=parent)["run"]["data"].get("params", [])
    }
    if "pipeline" not in params:
        raise Missing(f"pipeline run {parent} has no 'pipeline' param")
    return params["pipeline"]


# --- the browser ------------------------------------------------------------------------------------


def chromium_missing() -> str | None:
    """Why no screenshots can be taken here, or None."""
    for tool in ("chromium", "chromedriver"):
        if not (shutil.which(tool) or (tool == "chromium" and shutil.which("chromium-browser"))):
            return f"{tool} is not on PATH (Debian: apt-get install chromium chromium-driver)"
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "the selenium package is not installed (pip install selenium)"
    return None


@contextlib.contextmanager
def browser(window: tuple[int, int] = WINDOW):
    """A headless Chromium whose pages are exactly ``window`` pixels (through chromedriver)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                     "--hide-scrollbars", f"--window-size={window[0]},{window[1]}"):  # fmt: skip
        options.add_argument(argument)
    options.binary_location = shutil.which("chromium") or shutil.which("chromium-browser") or ""
    driver = webdriver.Chrome(options=options, service=Service(shutil.which("chromedriver")))
    try:
        set_window(driver, window)
        yield driver
    finally:
        driver.quit()


def set_window(driver, window: tuple[int, int]) -> None:
    """Pages (and their screenshots) of exactly ``window`` CSS pixels, whatever the browser's frame."""
    driver.execute_cdp_cmd(
        "Emulation.setDeviceMetricsOverride",
        {"width": window[0], "height": window[1], "deviceScaleFactor": 1, "mobile": False},
    )


def quiet_mlflow(driver, mlflow_base: str) -> None:
    """Keep the MLflow UI's assistant panel closed (it opens by itself on a browser's first visit and
    would cover a third of every picture): the UI's own saved preferences, set before the first page."""
    driver.get(f"{mlflow_base}/static-files/favicon.ico")
    driver.execute_script(
        "localStorage.setItem('mlflow.assistant.fab.autoOpenedOnFirstLoad_v1', 'true');"
        "localStorage.setItem('mlflow.assistant.panelOpen_v1', 'false');"
    )


def page_text(driver) -> str:
    from selenium.webdriver.common.by import By

    try:
        return driver.find_element(By.TAG_NAME, "body").text
    except Exception:  # the page is being replaced while it renders
        return ""


def scroll_to(driver, text: str, block: str = "start") -> bool:
    """Scroll the first shown element whose text is ``text`` into view (``block``: where it goes)."""
    return bool(
        driver.execute_script(
            """
            const want = arguments[0];
            const walker = document.createTreeWalker(document.body, NodeFilter.SHOW_ELEMENT);
            let found = null;
            while (walker.nextNode()) {
              const el = walker.currentNode;
              if (el.offsetParent !== null && el.textContent.trim() === want) { found = el; }
              if (found) break;
            }
            if (!found) return false;
            found.scrollIntoView({block: arguments[1]});
            return true;
            """,
            text,
            block,
        )
    )


def shoot(driver, page: Page, out: Path, timeout_s: float = PAGE_TIMEOUT_S) -> Page:
    """Open the page, wait until its text shows every expected string (or time out), save its PNGs."""
    set_window(driver, page.window)
    driver.get(page.url)
    deadline = time.monotonic() + timeout_s
    while True:
        text = page_text(driver)
        page.missing = [e for e in page.expected if e not in text]
        if not page.missing or time.monotonic() > deadline:
            break
        time.sleep(1.0)
    time.sleep(1.5)  # let the last renders (fonts, tables) settle before the picture
    for targets, png in page.shots:
        for i, target in enumerate(targets):
            if not scroll_to(driver, target, "start" if i == 0 else "nearest"):
                page.missing.append(f"{target!r} (to scroll to, for {png})")
        time.sleep(0.5)
        driver.save_screenshot(str(out / png))
    if os.environ.get("UI_SHOTS_TEXT"):  # the text the page showed, next to its picture (for debugging)
        (out / page.shots[0][1]).with_suffix(".txt").write_text(page_text(driver))
    return page


def check(home: Path, out: Path, model: str | None = None, run: Path | None = None) -> list[Page]:
    """Start the UIs of the home (running ``run`` first, if given), shoot and check every page."""
    if run is None and not home.is_dir():
        raise Missing(f"no pipeline home at {home} (run a pipeline into it, or pass --run SPEC)")
    settings = RLHFSettings(home=home)
    store = settings.resolved_tracking_uri()
    if store.startswith(("http://", "https://")):
        raise Missing(f"the tracking store is a server ({store}); this script needs a home's own store")
    apply_environment_defaults(settings)
    out.mkdir(parents=True, exist_ok=True)
    with running_uis(settings) as uis:
        print(f"Prefect UI {uis.prefect}, MLflow UI {uis.mlflow}", flush=True)
        if run is not None:
            run_pipeline(run, settings, uis)
        todo = pages(uis, model)
        with browser() as driver:
            quiet_mlflow(driver, uis.mlflow)
            for page in todo:
                shoot(driver, page, out)
                state = "ok" if not page.missing else f"MISSING {page.missing}"
                files = ", ".join(png for _, png in page.shots)
                print(f"{page.name}: {page.url} -> {files}: {state}", flush=True)
    return todo


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--home",
        type=Path,
        default=os.environ.get("RLHF_HOME"),
        help="the pipeline home (default $RLHF_HOME)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=DEFAULT_OUT,
        help=f"where the PNGs go (default {DEFAULT_OUT.relative_to(REPO_ROOT)})",
    )
    parser.add_argument(
        "--model", help="registered model whose champion to show (default: the one promoted last)"
    )
    parser.add_argument("--run", type=Path, help="a spec to run into the home first, with both UIs up")
    args = parser.parse_args(argv)
    if args.home is None:
        parser.error("--home (or $RLHF_HOME) is required")
    why = chromium_missing()
    if why:
        print(f"cannot take screenshots: {why}", file=sys.stderr)
        return 2
    try:
        done = check(args.home.resolve(), args.out.resolve(), args.model, args.run and args.run.resolve())
    except (Missing, RuntimeError) as exc:  # RuntimeError: a server did not start (its log's tail says why)
        print(f"error: {exc}", file=sys.stderr)
        return 1
    failed = [p for p in done if p.missing]
    for page in failed:
        print(f"error: the {page.name} page ({page.url}) does not show: {page.missing}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
