"""The MLflow UI shows a pipeline run the way users compare models: in a real headless browser.

A real `mlflow server` on 127.0.0.1 (one worker, no job runners, SQLite in a temporary folder) receives a
pipeline run logged with the tracking helpers: a parent and two nested model runs named by
model key, with fake metrics (no training). Debian's chromium, driven by chromedriver through
selenium, opens the UI's compare-runs page of those runs, waits for it to render, saves a
screenshot under tmp_path/reports/compare/, and checks that every model key and an eval/ metric
are on the page. A second test logs a model run's data as MLflow dataset inputs
(components/tracking/datasets.py) and checks that the run page's Datasets panel shows
`digits/train` with the DVC hash as its digest. Server (tests/integration/conftest.py) and
browser are stopped by PID even when the test fails.
"""
import json
import os
import shutil
import signal
import time
import uuid
from pathlib import Path

import pytest

from components import tracking
from components.config import DatasetConfig, ModelConfig, Params

pytestmark = pytest.mark.integration

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
MODELS = {"digits-unet": {"eval/fd": 0.81, "eval/class_acc": 0.95, "perf/sample_ms_per_item": 40.0},
          "digits-gpt": {"eval/fd": 1.52, "eval/class_acc": 0.80, "perf/sample_ms_per_item": 10.0}}


def stop(pid: int) -> None:
    """SIGTERM, then SIGKILL, to a process; quiet when already gone."""
    for sig, wait in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
        try:
            os.kill(pid, sig)
        except (ProcessLookupError, PermissionError):
            return
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
                if Path(f"/proc/{pid}/stat").exists() and \
                        Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] == "Z":
                    return  # a zombie: dead, waiting for its parent
            except ProcessLookupError:
                return
            time.sleep(0.1)


def descendants(pid: int) -> list[int]:
    """Every process below pid (from /proc), so that a browser's helpers can be stopped by PID too."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


@pytest.fixture
def browser(tmp_path):
    """A headless chromium driven by chromedriver; it and its helper processes are stopped by PID."""
    if not (CHROMIUM and CHROMEDRIVER):
        pytest.skip("chromium and chromium-driver are not installed: run `make browser` as root "
                    "(apt-get install -y chromium chromium-driver)")
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        pytest.skip("selenium is not installed: pip install -e '.[dev]'")
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-dev-shm-usage",
                f"--user-data-dir={tmp_path / 'chromium-profile'}", "--window-size=1600,1200"):
        opts.add_argument(arg)
    service = Service(executable_path=CHROMEDRIVER, log_output=str(tmp_path / "chromedriver.log"))
    driver = webdriver.Chrome(service=service, options=opts)
    pid = driver.service.process.pid
    try:
        yield driver
    finally:
        helpers = descendants(pid)
        try:
            driver.quit()
        finally:
            for p in [pid, *helpers]:
                stop(p)


def test_compare_runs_page_shows_every_model_of_a_pipeline_run(mlflow_server, browser, tmp_path, monkeypatch):
    import mlflow
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    params = Params(datasets={"digits": DatasetConfig(source="builtin:digits")},
                    models={"digits-unet": ModelConfig(family="diffusion", backbone="unet", dataset="digits"),
                            "digits-gpt": ModelConfig(family="transformer", backbone="gpt", dataset="digits")})
    params.tracking.experiment_prefix = f"ui{uuid.uuid4().hex[:6]}"
    with tracking.pipeline_run(params, tmp_path, flow_run_id="ui-test", models=list(MODELS)) as parent:
        for key, metrics in MODELS.items():
            with tracking.model_run(key, params, tmp_path, parent_run_id=parent.info.run_id):
                tracking.log_metrics(metrics)

    # Nested under the parent, named by model key: what the UI's run tree is drawn from.
    client = mlflow.MlflowClient(mlflow_server)
    exp_id = client.get_run(parent.info.run_id).info.experiment_id
    children = client.search_runs([exp_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert sorted(r.info.run_name for r in children) == sorted(MODELS)
    assert {r.data.tags["genflow.model_key"] for r in children} == set(MODELS)

    run_ids = [parent.info.run_id] + [r.info.run_id for r in children]
    # MLflow 3.17's route: getCompareRunPageRoute -> #/compare-runs?runs=[...]&experiments=[...]
    browser.get(f"{mlflow_server}/#/compare-runs?runs={json.dumps(run_ids)}&experiments={json.dumps([exp_id])}")

    def rendered(driver) -> bool:
        text = driver.find_element(By.TAG_NAME, "body").text
        # eval/class_acc only appears in the metrics table (eval/fd is also a promotion param value)
        return all(k in text for k in MODELS) and "eval/class_acc" in text

    try:
        WebDriverWait(browser, 120, poll_frequency=1).until(rendered)
        metric = browser.find_elements(By.XPATH, "//*[normalize-space(text())='eval/class_acc']")
        if metric:  # the screenshot shows the metrics table, not only the page's top
            browser.execute_script("arguments[0].scrollIntoView({block: 'center'});", metric[-1])
    finally:  # a screenshot also when it did not render: it shows what the page showed
        shot = tmp_path / "reports" / "compare" / "mlflow-compare-runs.png"
        shot.parent.mkdir(parents=True, exist_ok=True)
        browser.save_screenshot(str(shot))
    assert shot.stat().st_size > 10_000
    text = browser.find_element(By.TAG_NAME, "body").text
    for key in MODELS:
        assert key in text
    assert "eval/fd" in text and "eval/class_acc" in text
    assert "1.52" in text and "0.81" in text  # the models' eval/fd values, side by side


DVC_HASH = "6f1ed002ab5595859014ebf0951522d9.dir"   # what dvc.lock holds for a prepared folder


def test_run_page_shows_the_logged_datasets_and_their_digest(mlflow_server, browser, tmp_path, monkeypatch):
    import mlflow
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    params = Params(datasets={"digits": DatasetConfig(source="builtin:digits")},
                    models={"digits-unet": ModelConfig(family="diffusion", backbone="unet", dataset="digits")})
    params.tracking.experiment_prefix = f"ds{uuid.uuid4().hex[:6]}"
    hashes = {"digits": {"raw": "0a1b2c3d4e5f60718293a4b5c6d7e8f9.dir", "prepared": DVC_HASH}}
    with tracking.pipeline_run(params, tmp_path, flow_run_id="ui-test", models=["digits-unet"],
                               data_hashes=hashes) as parent:
        with tracking.model_run("digits-unet", params, tmp_path, parent_run_id=parent.info.run_id) as run:
            tracking.log_metrics({"eval/fd": 0.81})
    inputs = mlflow.MlflowClient(mlflow_server).get_run(run.info.run_id).inputs.dataset_inputs
    assert sorted((i.dataset.name, i.dataset.digest) for i in inputs) == [("digits/test", DVC_HASH),
                                                                           ("digits/train", DVC_HASH)]

    exp_id = run.info.experiment_id
    browser.get(f"{mlflow_server}/#/experiments/{exp_id}/runs/{run.info.run_id}")
    body = lambda: browser.find_element(By.TAG_NAME, "body").text  # noqa: E731
    try:
        WebDriverWait(browser, 120, poll_frequency=1).until(lambda d: "digits/train (" in body())
    finally:
        shot = tmp_path / "reports" / "datasets" / "mlflow-run-datasets.png"
        shot.parent.mkdir(parents=True, exist_ok=True)
        browser.save_screenshot(str(shot))
    # the overview's Datasets row: the training input as "name (digest)", its context, the test split as +1
    # (the tags show the same hash as "key\n: value", so this line is the Datasets panel's)
    assert f"Datasets\ndigits/train ({DVC_HASH})\nTraining\n+1" in body()
