"""End to end: a real `mlflow server`, a tiny training logged to it, the REST API, and the run's
page in headless Chromium.

The server and the browser are started by fixtures and always stopped (`finally`), also when a
check fails. The test skips only when the Chromium or chromedriver binaries are missing
(`.ci/run` installs the Debian packages `chromium` and `chromium-driver`).
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request

import keras
import numpy as np
import pytest

from toolkit.tracking import tracking_run

pytestmark = [pytest.mark.slow]

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
EPOCHS = 2


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url, timeout=10):
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return json.load(response)


def _post(url, body, timeout=10):
    request = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.load(response)


def _stop_process_group(process):
    # The server forks uvicorn workers: stop the whole process group, then kill what is left.
    try:
        os.killpg(process.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    try:
        process.wait(timeout=15)
    except subprocess.TimeoutExpired:
        pass
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    process.wait(timeout=10)


@pytest.fixture
def mlflow_server(tmp_path):
    """Starts `mlflow server` on a free 127.0.0.1 port; yields its URI; always stops it."""
    port = _free_port()
    log = open(tmp_path / "server.log", "wb")  # closed in finally
    env = {
        **os.environ,
        "MLFLOW_DISABLE_TELEMETRY": "true",
        # The job runner starts several worker processes the UI does not need here.
        "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
    }
    command = [
        sys.executable,
        "-m",
        "mlflow",
        "server",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        "1",
        "--backend-store-uri",
        f"sqlite:///{tmp_path}/server.db",
        "--artifacts-destination",
        str(tmp_path / "server-artifacts"),
    ]
    process = subprocess.Popen(
        command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
    )
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            if process.poll() is not None:
                raise RuntimeError(
                    "mlflow server exited: " + (tmp_path / "server.log").read_text()[-2000:]
                )
            try:
                with urllib.request.urlopen(uri + "/health", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("mlflow server did not start within 180 s")
            time.sleep(0.5)
        yield uri
    finally:
        _stop_process_group(process)
        log.close()


@pytest.fixture
def browser(tmp_path):
    """Headless Chromium driven by selenium; always quit."""
    if not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)):
        pytest.skip(
            f"chromium ({CHROMIUM}) or chromedriver ({CHROMEDRIVER}) is not installed; "
            "install the Debian packages chromium and chromium-driver"
        )
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        "--disable-dev-shm-usage",
        "--window-size=1400,1000",
        f"--user-data-dir={tmp_path / 'chromium-profile'}",
    ):
        options.add_argument(argument)
    driver = webdriver.Chrome(
        service=Service(CHROMEDRIVER, log_output=str(tmp_path / "chromedriver.log")),
        options=options,
    )
    try:
        yield driver
    finally:
        driver.quit()


def _train(uri, out_dir):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(32, 4)).astype("float32")
    y = x.sum(axis=1, keepdims=True)
    inputs = keras.Input((4,), name="features")
    model = keras.Model(inputs, keras.layers.Dense(1)(keras.layers.Dense(8)(inputs)))
    model.compile(keras.optimizers.Adam(0.01), "mse")

    def image_fn(epoch, model):
        return {"weights": np.full((16, 16), 60 * epoch, dtype="uint8")}

    config = {"model": {"name": "e2e", "units": 8}, "train": {"epochs": EPOCHS}}
    with tracking_run("e2e", config, out_dir, tracking_uri=uri, system_metrics_interval=1) as t:
        model.fit(
            x,
            y,
            epochs=EPOCHS,
            validation_split=0.25,
            verbose=0,
            callbacks=[t.callback(image_fn=image_fn)],
        )
        (out_dir / "metrics.json").write_text(json.dumps({"test_mse": 1.0}))
    return t


@pytest.mark.browser
def test_run_is_reviewable_in_mlflow_ui(mlflow_server, browser, tmp_path, monkeypatch):
    monkeypatch.setenv("ATTENTION_TOOLKIT_HOME", str(tmp_path / "default-home"))
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    monkeypatch.chdir(tmp_path)
    uri = mlflow_server
    tracker = _train(uri, tmp_path / "out")
    assert not (tmp_path / "default-home").exists()

    # The REST API sees the run, its per-epoch metric history and its artifacts.
    api = uri + "/api/2.0/mlflow"
    experiment = _get(f"{api}/experiments/get-by-name?experiment_name=e2e")["experiment"]
    runs = _post(f"{api}/runs/search", {"experiment_ids": [experiment["experiment_id"]]})["runs"]
    assert [r["info"]["run_id"] for r in runs] == [tracker.run_id]
    info = runs[0]["info"]
    assert info["status"] == "FINISHED" and info["run_name"] == tracker.run_name
    params = {p["key"]: p["value"] for p in runs[0]["data"]["params"]}
    assert params["model.name"] == "e2e" and params["train.epochs"] == str(EPOCHS)
    tags = {t["key"]: t["value"] for t in runs[0]["data"]["tags"]}
    assert tags["keras_backend"] == keras.config.backend()

    query = urllib.parse.urlencode({"run_id": tracker.run_id, "metric_key": "val_loss"})
    val_loss = _get(f"{api}/metrics/get-history?{query}")["metrics"]
    assert sorted(m["step"] for m in val_loss) == list(range(EPOCHS))
    query = urllib.parse.urlencode(
        {"run_id": tracker.run_id, "metric_key": "system/cpu_utilization_percentage"}
    )
    assert len(_get(f"{api}/metrics/get-history?{query}")["metrics"]) >= 1

    files = _get(f"{api}/artifacts/list?run_id={tracker.run_id}")["files"]
    assert {"config.yaml", "metrics.json", "images"} <= {f["path"] for f in files}
    images = _get(f"{api}/artifacts/list?run_id={tracker.run_id}&path=images")["files"]
    steps = sorted(int(f["path"].split("+")[2]) for f in images if f["path"].endswith(".png"))
    assert steps == list(range(EPOCHS))

    versions = _get(f"{api}/registered-models/get?name=e2e")["registered_model"]
    assert versions["latest_versions"][0]["run_id"] == tracker.run_id

    # The run's page in the UI shows the run name and a metric.
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    experiment_id = experiment["experiment_id"]
    browser.get(f"{uri}/#/experiments/{experiment_id}/runs/{tracker.run_id}")
    body = lambda driver: driver.find_element(By.TAG_NAME, "body").text  # noqa: E731
    WebDriverWait(browser, 90).until(
        lambda d: tracker.run_name in body(d) and "val_loss" in body(d)
    )
    text = body(browser)
    assert tracker.run_name in text
    assert "val_loss" in text and "model.name" in text
    shot = tmp_path / "run_page.png"
    assert browser.save_screenshot(str(shot))
    data = shot.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000

    # The metric charts tab draws the per-epoch metrics.
    browser.find_element(By.XPATH, "//*[normalize-space(text())='Model metrics']").click()
    WebDriverWait(browser, 60).until(lambda d: "epoch_time_s" in body(d))
    charts = tmp_path / "run_metrics.png"
    assert browser.save_screenshot(str(charts))
    assert charts.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # The experiment's run list names the run.
    browser.get(f"{uri}/#/experiments/{experiment_id}/runs")
    WebDriverWait(browser, 60).until(lambda d: tracker.run_name in body(d))
    run_list = tmp_path / "run_list.png"
    assert browser.save_screenshot(str(run_list))

    keep = os.environ.get("TOOLKIT_KEEP_SCREENSHOTS")
    if keep:  # for looking at the pages by eye
        for path in (shot, charts, run_list):
            shutil.copy(path, os.path.join(keep, path.name))
