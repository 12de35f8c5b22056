"""Screenshots of a deployed pipeline in the Prefect UI, and a check of the form that starts its runs.

    python scripts/deployment_form_screenshots.py [--out docs/images/ui] [--home HOME] [--no-submit]

What a user does, on a fresh Prefect server with its UI (the one ``rlhf ui`` starts, here on a free
port of 127.0.0.1, on the Prefect database of ``HOME``, by default a temporary one):

1. ``rlhf pools create cpu|gpu|pipelines --type process``, then
   ``rlhf deploy recipes/quickstart.yaml --profile gpu --pool pipelines --schedule "0 3 * * *"``
   (the gpu profile puts stages on ``cpu`` and ``gpu``; the pipeline's own flow gets a pool of its own);
2. in a headless Chromium (selenium and chromedriver, as ``scripts/ui_screenshots.py`` drives it):
   the deployment page of ``rlhf-pipeline/quickstart`` -> ``prefect-deployment.png``; checked: its
   name, flow, work pool, the schedule in words (``At 03:00 AM``) and the next scheduled run;
3. its Run -> Custom run page (reached by clicking those) -> ``prefect-deployment-run-form.png``;
   checked: the title of every overridable value (``stages.sft.train.lr`` ...) and the default its
   input holds (read from the deployment's parameter schema), the Force, Spec and Home fields, and
   the stage names the Force choice offers once opened;
4. (unless ``--no-submit``) the form with ``seed`` changed is submitted: the flow run it creates stays
   Scheduled (no worker runs here); its parameters, read through the API, must carry the new seed in
   ``overrides``, and ``apply_spec_overrides`` of them must give a spec with that seed (what
   ``run_pipeline`` would run).

A page that lacks something makes the script exit with status 1, naming the page and the missing text
(the picture is still saved); no browser: status 2. The server is stopped on the way out, always.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
for _path in (REPO_ROOT, REPO_ROOT / "scripts"):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

import ui_screenshots as shots  # noqa: E402  (the browser, Page and shoot of the other UI pictures)

from cli import ui  # noqa: E402  (imports neither prefect nor mlflow)
from rlhf_core.settings import OFFLINE_DEFAULTS, RLHFSettings  # noqa: E402

SPEC = REPO_ROOT / "recipes" / "quickstart.yaml"
PIPELINE = "quickstart"
PROFILE = "gpu"
STAGE_POOLS = ("cpu", "gpu")
# The gpu profile's pipeline_pool is cpu, where its data and promote stages run too: rlhf deploy wants
# the pipeline's own flow on another pool.
PIPELINE_POOL = "pipelines"
SCHEDULE, SCHEDULE_IN_WORDS = "0 3 * * *", "At 03:00 AM"
FORM_WINDOW = (1400, 1400)
NEW_SEED = 7
CLIENT_ENV_DROPPED = ("PREFECT_API_KEY", "PREFECT_PROFILE")


class Missing(shots.Missing):
    """Something the server or a page should have and does not."""


@dataclass
class Submitted:
    """The flow run the form created: its name and parameters, and what was checked of them."""

    name: str
    parameters: dict
    missing: list[str]


# --- the server and the deployment --------------------------------------------------------------


@contextlib.contextmanager
def prefect_ui(home: Path) -> Iterator[str]:
    """``rlhf ui``'s Prefect server (UI on) on the home's database, on a free port; its base URL."""
    port = shots.free_port()
    server = ui.prefect_server(RLHFSettings(home=home), port)
    server.env.update(OFFLINE_DEFAULTS)
    server.env.update({"PREFECT_HOME": str(home / "prefect"), "PREFECT_SERVER_UI_ENABLED": "true"})
    for name in CLIENT_ENV_DROPPED:
        server.env.pop(name, None)
    try:
        server.start()
        ui.wait_until_ready([server])
        yield f"http://{ui.HOST}:{port}"
    finally:
        server.stop()


def client_env(base: str, home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in CLIENT_ENV_DROPPED}
    env.update(OFFLINE_DEFAULTS)
    env.update(
        {"PREFECT_API_URL": f"{base}/api", "PREFECT_HOME": str(home / "prefect"), "RLHF_LIVE_VIEW": "0"}
    )
    return env


def _rlhf(*args: str) -> list[str]:
    return [sys.executable, "-m", "cli.app", *args]


def deploy(base: str, home: Path) -> dict:
    """Create the pools and deploy the quickstart pipeline with the gpu profile; the deployment (API)."""
    env = client_env(base, home)
    creating = [
        subprocess.Popen(
            _rlhf("pools", "create", pool, "--type", "process"),
            cwd=REPO_ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )  # fmt: skip
        for pool in (*STAGE_POOLS, PIPELINE_POOL)
    ]
    for pool, process in zip((*STAGE_POOLS, PIPELINE_POOL), creating, strict=True):
        output, _ = process.communicate()
        if process.returncode != 0:
            raise Missing(f"rlhf pools create {pool} exited with status {process.returncode}:\n{output}")
    command = _rlhf(
        "deploy", str(SPEC), "--profile", PROFILE, "--pool", PIPELINE_POOL,
        "--schedule", SCHEDULE, "--home", str(home),
    )  # fmt: skip
    result = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise Missing(f"rlhf deploy exited with status {result.returncode}:\n{result.stdout}{result.stderr}")
    return _call(f"{base}/api/deployments/name/rlhf-pipeline/{PIPELINE}")  # type: ignore[return-value]


def _call(url: str, body: dict | None = None) -> dict | list:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read() or b"null")


# --- the pages ----------------------------------------------------------------------------------


def override_fields(deployment: dict) -> dict[str, dict]:
    """``path -> field`` of the ``overrides`` object in the deployment's parameter schema."""
    schema = deployment.get("parameter_openapi_schema") or {}
    fields = schema.get("properties", {}).get("overrides", {}).get("properties", {})
    if not fields:
        raise Missing(f"deployment {deployment.get('name')} has no overrides in its parameter schema")
    return fields


def pages(base: str, deployment: dict) -> tuple[shots.Page, shots.Page]:
    """The deployment page and its custom-run form, and what each must show."""
    page = f"{base}/v2/deployments/deployment/{deployment['id']}"  # the V2 UI, as the server's root opens
    overview = shots.Page(
        "Prefect deployment",
        page,
        [
            PIPELINE,
            "rlhf-pipeline",
            PIPELINE_POOL,
            "Schedules",
            SCHEDULE_IN_WORDS,
            "Next Run",
            "Scheduled",
            f"pipeline:{PIPELINE}",
        ],  # fmt: skip
        [((), "prefect-deployment.png")],
    )
    form = shots.Page(
        "Prefect custom run form",
        f"{page}/run",
        [
            "Parameters",
            "Values of this run",
            *(label(f) for f in override_fields(deployment).values()),
            "Force (Optional)",
            "Spec",
            "Home (Optional)",
            "Submit",
        ],  # fmt: skip
        [((), "prefect-deployment-run-form.png")],
        FORM_WINDOW,
    )
    return overview, form


def label(field: dict) -> str:
    """What the form shows above a field's input (none of the fields is required)."""
    return f"{field['title']} (Optional)"


def _input_after(driver, text: str):
    """The first input after the element whose text is ``text`` (a field's label)."""
    from selenium.webdriver.common.by import By

    xpath = f"//*[normalize-space(text())={json.dumps(text)}]/following::input[1]"
    found = driver.find_elements(By.XPATH, xpath)
    return found[0] if found else None


def _shown_value(element, kind: str) -> object:
    if kind == "boolean":
        return element.is_selected()
    raw = element.get_attribute("value")
    try:
        return float(raw)
    except (TypeError, ValueError):
        return raw


def check_defaults(driver, form: shots.Page, fields: dict[str, dict]) -> None:
    """Every override input holds its default (numbers compared as numbers)."""
    for path, field in fields.items():
        element = _input_after(driver, label(field))
        if element is None:
            form.missing.append(f"an input for {path}")
            continue
        shown, default = _shown_value(element, field["type"]), field["default"]
        expected = default if field["type"] == "boolean" else float(default)
        if shown != expected:
            form.missing.append(f"{path} = {default} (its input shows {shown!r})")


def open_custom_run(driver, overview: shots.Page, form: shots.Page, timeout_s: float = 15.0) -> None:
    """On the deployment page, Run -> Custom run must lead to the form's page."""
    from selenium.webdriver.common.by import By

    buttons = driver.find_elements(By.XPATH, "//button[normalize-space(.)='Run']")
    if not buttons:
        overview.missing.append("a Run button")
        return
    buttons[0].click()
    deadline = time.monotonic() + timeout_s
    while not (
        items := driver.find_elements(By.XPATH, "//*[@role='menuitem'][normalize-space(.)='Custom run']")
    ):
        if time.monotonic() > deadline:
            overview.missing.append("Run -> Custom run (a menu item)")
            return
        time.sleep(0.5)
    items[0].click()
    while not driver.current_url.split("?")[0].endswith("/run"):
        if time.monotonic() > deadline:
            overview.missing.append(f"Run -> Custom run leading to {form.url} (at {driver.current_url})")
            return
        time.sleep(0.5)


def check_force_choices(driver, form: shots.Page, deployment: dict) -> None:
    """The Force choice, opened, offers every stage and model name of the schema's enum; closed again
    (Escape) before anything else is typed: an open list would take the keys and the clicks."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    names = deployment["parameter_openapi_schema"]["properties"]["force"]["items"]["enum"]
    opener = driver.find_elements(By.CSS_SELECTOR, "button[aria-label='Select Force']")
    if not opener:
        form.missing.append("the Force choice (a button 'Select Force')")
        return
    opener[0].click()
    deadline = time.monotonic() + 10
    while (absent := [n for n in names if n not in _popup_text(driver)]) and time.monotonic() < deadline:
        time.sleep(0.5)
    form.missing += [f"Force choice {n!r}" for n in absent]
    driver.switch_to.active_element.send_keys(Keys.ESCAPE)  # the list's own input has the focus
    if not _wait(lambda: not _popup_text(driver), 10):
        form.missing.append("the Force choice closing on Escape")


def _popup_text(driver) -> list[str]:
    from selenium.webdriver.common.by import By

    return [e.text.strip() for e in driver.find_elements(By.CSS_SELECTOR, "[role=option]")]


def _wait(condition, timeout_s: float, every_s: float = 0.25) -> bool:
    """Poll ``condition`` until it holds (True) or ``timeout_s`` passes (False)."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(every_s)
    return True


def submit_with_seed(driver, base: str, deployment: dict, seed: int, timeout_s: float = 120.0) -> Submitted:
    """Change ``seed`` in the open form, submit it, and check the flow run it made (through the API).

    Each step waits for what the page shows, not for a time: the input holding the new value, then,
    after Submit, the form's own answer. On success the page goes back to the deployment (the run is
    created by then); on failure it stays on the form with an error (a toast or a field's message),
    which is quoted. ``timeout_s`` only bounds a page that never answers (a stalled server)."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    from rlhf_core.spec import PipelineSpec
    from rlhf_core.spec.loading import apply_spec_overrides

    field = override_fields(deployment)["seed"]
    element = _input_after(driver, label(field))
    if element is None:
        raise Missing("the custom run form has no seed input")
    element.send_keys(Keys.CONTROL, "a")
    element.send_keys(str(seed))
    if not _wait(lambda: element.get_attribute("value") == str(seed), 10):
        raise Missing(f"the seed input shows {element.get_attribute('value')!r} after typing {seed}")
    shots.scroll_to(driver, "Submit")
    (button,) = driver.find_elements(By.XPATH, "//form//button[@type='submit'][normalize-space(.)='Submit']")
    if not _wait(button.is_enabled, 10):
        raise Missing("the custom run form's Submit button stays disabled")
    button.click()
    if not _wait(lambda: not _on_form(driver) or _form_errors(driver), timeout_s, every_s=0.5):
        raise Missing(f"the custom run form did not answer its Submit within {timeout_s:.0f} s")
    if _on_form(driver):
        raise Missing(f"the custom run form refused its Submit: {_form_errors(driver)}")
    run = _manual_run(base, deployment["id"])
    overrides = run["parameters"].get("overrides") or {}
    missing = []
    if overrides.get("seed") != seed:
        missing.append(f"overrides.seed = {seed} (got {overrides.get('seed')!r})")
    try:
        spec = apply_spec_overrides(PipelineSpec.model_validate(run["parameters"]["spec"]), overrides)
        if spec.seed != seed:
            missing.append(f"the spec run_pipeline would run has seed {spec.seed}, not {seed}")
    except Exception as exc:  # a SpecError or ValidationError: the form sent what the flow cannot take
        missing.append(f"run_pipeline's spec and overrides: {exc}")
    return Submitted(run["name"], run["parameters"], missing)


def _on_form(driver) -> bool:
    return driver.current_url.split("?")[0].endswith("/run")


def _form_errors(driver) -> list[str]:
    """What the form shows as wrong: toasts (an API error) and fields' messages (validation)."""
    from selenium.webdriver.common.by import By

    found = driver.find_elements(
        By.CSS_SELECTOR, "[data-sonner-toast][data-type='error'], [role=alert], .text-destructive"
    )
    return [text for e in found if (text := e.text.strip())]


def _manual_run(base: str, deployment_id: str, timeout_s: float = 10.0) -> dict:
    """The flow run of the deployment started from the form (not one of the schedule's). The form has
    gone back to the deployment page: the run was created before, so it is there at once."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        runs = _call(f"{base}/api/flow_runs/filter", {"deployments": {"id": {"any_": [deployment_id]}}})
        manual = [r for r in runs if not r.get("auto_scheduled")]  # type: ignore[union-attr]
        if manual:
            return manual[0]
        time.sleep(1.0)
    raise Missing("the custom run form went back to the deployment, but the API shows no flow run of it")


def check(out: Path, home: Path, submit: bool = True) -> tuple[list[shots.Page], Submitted | None]:
    """Start the server, deploy, shoot and check both pages (and submit the form, unless not)."""
    out.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    with prefect_ui(home) as base:
        print(f"Prefect UI {base} ({time.monotonic() - started:.0f} s)", flush=True)
        deployment = deploy(base, home)
        print(f"deployed rlhf-pipeline/{PIPELINE} ({time.monotonic() - started:.0f} s)", flush=True)
        overview, form = pages(base, deployment)
        submitted = None
        with shots.browser() as driver:
            shots.shoot(driver, overview, out)
            open_custom_run(driver, overview, form)
            shots.shoot(driver, form, out)
            check_defaults(driver, form, override_fields(deployment))
            check_force_choices(driver, form, deployment)
            if submit:
                submitted = submit_with_seed(driver, base, deployment, NEW_SEED)
        for page in (overview, form):
            state = "ok" if not page.missing else f"MISSING {page.missing}"
            print(f"{page.name}: {page.url} -> {page.shots[0][1]}: {state}", flush=True)
        if submitted:
            state = "ok" if not submitted.missing else f"MISSING {submitted.missing}"
            print(f"submitted run {submitted.name}: overrides.seed {NEW_SEED}: {state}", flush=True)
        print(f"pages checked ({time.monotonic() - started:.0f} s)", flush=True)
    return [overview, form], submitted


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=shots.DEFAULT_OUT, help="where the PNGs go")
    parser.add_argument("--home", type=Path, help="home of the server's database (default: a temporary one)")
    parser.add_argument("--no-submit", action="store_true", help="do not submit the form (no flow run)")
    args = parser.parse_args(argv)
    why = shots.chromium_missing()
    if why:
        print(f"cannot take screenshots: {why}", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="rlhf-deploy-form-") as scratch:
        home = (args.home or Path(scratch) / "home").resolve()
        try:
            done, submitted = check(args.out.resolve(), home, submit=not args.no_submit)
        except (shots.Missing, RuntimeError) as exc:  # RuntimeError: the server did not start
            print(f"error: {exc}", file=sys.stderr)
            return 1
    failed = [(p.name, p.url, p.missing) for p in done if p.missing]
    if submitted and submitted.missing:
        failed.append(("submitted flow run", submitted.name, submitted.missing))
    for name, where, missing in failed:
        print(f"error: the {name} ({where}) does not show: {missing}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
