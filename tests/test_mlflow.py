"""MLflow for real: `mlflow server` (SQLite, a local artifact root) on 127.0.0.1, started here and stopped by pid; the
smoke job run from the command line into the S3 test server, as a team's nightly run would be; everything read back
through MLflow's REST API."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from pipeline.config import load_config
from pipeline.errors import PreflightError
from pipeline.gate import gate_figures
from pipeline.preflight import preflight
from pipeline.report import run_report
from pipeline.summary import RunSummary
from tests.browser import chromium, needs_chromium
from tests.conftest import ROOT, run_cli
from tests.processes import BIN, free_port, stop
from tests.s3server import BUCKET

OUTPUTS = ROOT / "test-outputs" / "tracking"
MODEL = "smoke-int4"      # the registered model of the passing runs
EXPERIMENT = "ftq-tests"
QUIET = {"MLFLOW_DISABLE_TELEMETRY": "true"}  # MLflow's usage reports: nothing leaves the machine in tests


class MlflowServer:
    """`mlflow server` in its own session (it starts workers of its own), on a free port."""

    def __init__(self, home: Path):
        self.home, self.port = home, free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = home / "server.log"
        self.proc: subprocess.Popen | None = None

    def start(self) -> MlflowServer:
        self.home.mkdir(parents=True, exist_ok=True)
        with open(self.log, "w") as log:
            self.proc = subprocess.Popen(
                [str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1",
                 "--backend-store-uri", f"sqlite:///{self.home / 'mlflow.db'}",
                 "--artifacts-destination", str(self.home / "artifacts")],
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env={**os.environ, **QUIET})
        deadline = time.monotonic() + 180
        while True:
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=2) as response:
                    if response.status == 200:
                        return self
            except OSError:
                pass
            assert self.proc.poll() is None, self.log.read_text()[-3000:]
            assert time.monotonic() < deadline, f"mlflow server did not answer: {self.log.read_text()[-2000:]}"
            time.sleep(0.5)

    def stop(self) -> None:
        if self.proc is not None:
            stop(self.proc)

    def get(self, path: str, **query: str) -> dict:
        url = f"{self.url}/api/2.0/mlflow/{path}?{urllib.parse.urlencode(query)}"
        with urllib.request.urlopen(url, timeout=30) as response:
            return json.loads(response.read())

    def artifact(self, run_id: str, path: str) -> bytes:
        url = f"{self.url}/get-artifact?{urllib.parse.urlencode({'run_id': run_id, 'path': path})}"
        with urllib.request.urlopen(url, timeout=30) as response:
            return response.read()


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    server = MlflowServer(tmp_path_factory.mktemp("mlflow")).start()
    yield server
    server.stop()


def tracked_args(server: MlflowServer, store: str, *sets: str) -> list[str]:
    options = [f"tracking.mlflow_tracking_uri={server.url}", "tracking.report_to=[mlflow]",
               f"tracking.experiment={EXPERIMENT}", f"tracking.registered_model={MODEL}", "training.logging_steps=1",
               *sets]
    return ["--config", "smoke", "--store", store, *[arg for option in options for arg in ("--set", option)]]


def s3_json(s3, path: str) -> dict:
    return json.loads(s3.filesystem().cat_file(path))


@pytest.fixture(scope="module")
def passing(s3, mlflow_server, tmp_path_factory):
    """The smoke job into s3://ftq/<prefix>, tracked: it passes the gate, so its release is registered."""
    prefix = f"{BUCKET}/tracked-{int(time.time())}"
    env = {**s3.env(), **QUIET, "FTQ_CACHE_DIR": str(tmp_path_factory.mktemp("machine-cache"))}
    result = run_cli(*tracked_args(mlflow_server, f"s3://{prefix}"), env=env)
    assert result.returncode == 0, result.stderr[-4000:]
    summary = s3_json(s3, f"{prefix}/smoke/run.json")
    return {"prefix": prefix, "env": env, "summary": summary, "result": result,
            "run": mlflow_server.get("runs/get", run_id=summary["mlflow"]["run_id"])["run"]}


def versions(server: MlflowServer, name: str) -> list[dict]:
    return server.get("model-versions/search", filter=f"name = '{name}'").get("model_versions", [])


@pytest.mark.slow
def test_the_run_holds_the_config_the_steps_the_evaluation_and_the_report(s3, mlflow_server, passing):
    summary, run = passing["summary"], passing["run"]
    run_id = summary["mlflow"]["run_id"]
    assert run["info"]["status"] == "FINISHED" and run["info"]["run_name"] == "smoke"
    experiment = mlflow_server.get("experiments/get-by-name", experiment_name=EXPERIMENT)["experiment"]
    assert run["info"]["experiment_id"] == experiment["experiment_id"] == summary["mlflow"]["experiment_id"]
    assert summary["mlflow"]["run_url"] == f"{mlflow_server.url}/#/experiments/{experiment['experiment_id']}/runs/{run_id}"
    assert summary["mlflow"]["error"] is None
    assert "View run" not in passing["result"].stdout  # MLflow's own print; the pipeline logs the link once
    assert passing["result"].stdout.strip().splitlines()[-1] == f"run summary: s3://{passing['prefix']}/smoke/run.json"

    params = {p["key"]: p["value"] for p in run["data"]["params"]}
    assert params["run_name"] == "smoke" and params["model.name_or_path"] == summary["config"]["model"]["name_or_path"]
    assert params["training.max_steps"] == str(summary["config"]["training"]["max_steps"])
    assert json.loads(params["lora.target_modules"]) == summary["config"]["lora"]["target_modules"]

    # per-step loss: every step the fine-tune logged, the values of its training_log.json
    history = s3_json(s3, f"{summary['stages']['finetune']['uri'][len('s3://'):]}/training_log.json")
    loss = mlflow_server.get("metrics/get-history", run_id=run_id, metric_key="train/loss")["metrics"]
    assert [m["step"] for m in sorted(loss, key=lambda m: m["step"])] == [e["step"] for e in history]
    assert len(history) == summary["stages"]["finetune"]["metrics"]["steps"] > 1
    assert {m["step"]: m["value"] for m in loss} == pytest.approx({e["step"]: e["loss"] for e in history})

    # the evaluation table and each stage's figures, tags for the stage keys and URIs
    metrics = {m["key"]: m["value"] for m in run["data"]["metrics"]}
    models = summary["stages"]["evaluate"]["metrics"]["models"]
    for model in ("base", "merged", "rtn", "gptq"):
        assert metrics[f"eval.{model}.perplexity"] == pytest.approx(models[model]["perplexity"])
        assert metrics[f"eval.{model}.exact_match"] == pytest.approx(models[model]["exact_match"])
    assert metrics["quantize.bits"] == 4 and metrics["finetune.steps"] == len(history)
    tags = {t["key"]: t["value"] for t in run["data"]["tags"]}
    for name, stage in summary["stages"].items():
        assert tags[f"ftq.stage.{name}.key"] == stage["key"] and tags[f"ftq.stage.{name}.uri"] == stage["uri"]
        assert tags[f"ftq.stage.{name}.reused"] == "false"
        assert metrics[f"{name}.seconds"] == pytest.approx(stage["seconds"], abs=0.01)
    assert tags["ftq.run_folder"] == f"s3://{passing['prefix']}/smoke"

    # report.md, metrics.json and the loss plot as artifacts, the same bytes as the evaluation stage's
    listed = mlflow_server.get("artifacts/list", run_id=run_id)["files"]
    assert sorted(f["path"] for f in listed) == ["metrics.json", "report.md", "training_loss.png"]
    evaluate = summary["stages"]["evaluate"]["uri"][len("s3://"):]
    for name in ("metrics.json", "report.md", "training_loss.png"):
        assert mlflow_server.artifact(run_id, name) == s3.filesystem().cat_file(f"{evaluate}/{name}")


@pytest.mark.slow
def test_a_passing_release_is_one_registered_version_pointing_at_the_store(mlflow_server, passing):
    summary = passing["summary"]
    [version] = versions(mlflow_server, MODEL)
    release = summary["stages"]["release"]
    assert version["source"] == release["uri"] == f"s3://{passing['prefix']}/smoke/release"
    assert version["run_id"] == summary["mlflow"]["run_id"]
    assert summary["mlflow"]["registered_model"] == {"name": MODEL, "version": version["version"]}
    tags = {t["key"]: t["value"] for t in version["tags"]}
    models = summary["stages"]["evaluate"]["metrics"]["models"]
    assert tags["ftq.release_key"] == release["key"]
    assert float(tags["gate.ppl_increase"]) == pytest.approx(
        models["gptq"]["perplexity"] / models["merged"]["perplexity"] - 1, rel=1e-5)
    assert float(tags["gate.exact_match"]) == pytest.approx(models["gptq"]["exact_match"], rel=1e-5)  # 6 digits
    # the Prefect report artifact, made from run.json, links the MLflow run and names the version
    summary.pop("metrics")  # computed from the stages
    report = run_report(RunSummary(**summary), "run.json")
    assert (f"MLflow run: [{summary['mlflow']['run_id']}]({summary['mlflow']['run_url']}) at `{mlflow_server.url}`; "
            f"registered as **{MODEL}** version {version['version']}") in report


@pytest.mark.slow
def test_a_rerun_logs_its_stages_as_reused_and_registers_nothing_new(s3, mlflow_server, passing):
    result = run_cli(*tracked_args(mlflow_server, f"s3://{passing['prefix']}"), env=passing["env"])
    assert result.returncode == 0, result.stderr[-4000:]
    summary = s3_json(s3, f"{passing['prefix']}/smoke/run.json")
    assert summary["mlflow"]["run_id"] != passing["summary"]["mlflow"]["run_id"]  # a run of its own
    run = mlflow_server.get("runs/get", run_id=summary["mlflow"]["run_id"])["run"]
    tags = {t["key"]: t["value"] for t in run["data"]["tags"]}
    metrics = {m["key"]: m["value"] for m in run["data"]["metrics"]}
    for name in ("data", "finetune", "merge", "quantize", "serve", "evaluate", "release"):
        assert tags[f"ftq.stage.{name}.reused"] == "true"
        assert f"{name}.seconds" not in metrics  # not measured again
        assert tags[f"ftq.stage.{name}.key"] == passing["summary"]["stages"][name]["key"]
    assert metrics["eval.gptq.perplexity"] == pytest.approx(
        passing["summary"]["stages"]["evaluate"]["metrics"]["models"]["gptq"]["perplexity"])
    assert len(versions(mlflow_server, MODEL)) == 1  # the same release, registered once
    assert summary["mlflow"]["registered_model"] == passing["summary"]["mlflow"]["registered_model"]


@pytest.mark.slow
def test_a_run_that_fails_the_gate_registers_nothing(s3, mlflow_server, tmp_path):
    prefix = f"{BUCKET}/gate-{int(time.time())}"
    env = {**s3.env(), **QUIET, "FTQ_CACHE_DIR": str(tmp_path / "machine-cache")}
    result = run_cli(*tracked_args(mlflow_server, f"s3://{prefix}", "tracking.registered_model=smoke-failing",
                                   "gate.min_exact_match=100"), env=env)
    assert result.returncode == 1 and "failed the quality gate" in result.stderr
    summary = s3_json(s3, f"{prefix}/smoke/run.json")
    assert summary["status"] == "failed" and summary["failed_stage"] == "gate"
    run = mlflow_server.get("runs/get", run_id=summary["mlflow"]["run_id"])["run"]
    assert run["info"]["status"] == "FAILED"
    assert "eval.gptq.exact_match" in {m["key"] for m in run["data"]["metrics"]}  # measured, then refused
    assert versions(mlflow_server, "smoke-failing") == []
    with pytest.raises(urllib.error.HTTPError) as missing:
        mlflow_server.get("registered-models/get", name="smoke-failing")
    assert missing.value.code == 404
    assert summary["mlflow"]["registered_model"] is None


@pytest.mark.slow
def test_a_tracking_server_stopped_mid_run_leaves_a_completed_run(tmp_path):
    server = MlflowServer(tmp_path / "mlflow").start()
    store, log = tmp_path / "store", tmp_path / "cli.log"
    with open(log, "w") as out:
        cli = subprocess.Popen([sys.executable, "-m", "flows.finetune_then_quantize",
                                *tracked_args(server, str(store))], cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
                               start_new_session=True, env={**os.environ, **QUIET})
    try:
        deadline = time.monotonic() + 300
        while "MLflow: run " not in log.read_text():  # the MLflow run is open: now the server goes away
            assert cli.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.2)
        server.stop()
        assert cli.wait(timeout=600) == 0, log.read_text()[-4000:]
    finally:
        stop(cli)
        server.stop()
    summary = json.loads((store / "smoke" / "run.json").read_text())
    assert summary["status"] == "completed"
    assert (store / "latest.json").is_file() and (store / "smoke" / "release" / "model.safetensors").is_file()
    assert summary["mlflow"]["run_id"] and summary["mlflow"]["error"]  # why tracking stopped, in run.json
    said = [line for line in log.read_text().splitlines() if "MLflow tracking at" in line]
    assert len(said) == 1 and "the run goes on without it" in said[0]  # once


def test_a_tracking_uri_with_credentials_is_refused_without_echoing_them(tmp_path, monkeypatch):
    cfg = load_config("smoke", ["tracking.mlflow_tracking_uri=http://bob:hunter2@mlflow.example:5000"],
                      store=str(tmp_path / "store"))
    with pytest.raises(PreflightError) as refused:
        preflight(cfg)
    assert "tracking.mlflow_tracking_uri 'http://***@mlflow.example:5000' embeds credentials" in str(refused.value)
    assert "MLFLOW_TRACKING_USERNAME" in str(refused.value) and "hunter2" not in str(refused.value)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "https://bob:hunter2@mlflow.example")
    with pytest.raises(PreflightError, match=r"MLFLOW_TRACKING_URI 'https://\*\*\*@mlflow.example' embeds"):
        preflight(load_config("smoke", [], store=str(tmp_path / "store")))
    assert not (tmp_path / "store").exists()


def test_the_gate_figures_tagged_on_a_version_for_both_routes():
    merged_route = {"models": {"base": {"perplexity": 9.0, "exact_match": 10.0},
                               "merged": {"perplexity": 4.0, "exact_match": 60.0},
                               "gptq": {"perplexity": 4.4, "exact_match": 55.0}},
                    "serving": {"checked": True, "loaded": True, "exact_match": 54.0}}
    assert gate_figures(merged_route) == pytest.approx(
        {"exact_match": 55.0, "perplexity": 4.4, "ppl_increase": 0.1, "serving_gap": 1.0})
    adapter_route = {"models": {"base": {"perplexity": 6.0, "exact_match": None},
                                "adapted": {"perplexity": 5.0, "exact_match": None}}, "serving": {"checked": False}}
    assert gate_figures(adapter_route) == {"perplexity": 5.0}


def test_config_values_sent_as_params_lose_a_urls_password():
    from pipeline.mlflow_run import as_param

    assert as_param(["--extra-index-url", "https://bob:t0ken@pypi.example/simple"]) == \
        '["--extra-index-url", "https://***@pypi.example/simple"]'
    assert as_param("s3://bucket/data.jsonl") == "s3://bucket/data.jsonl" and as_param(None) == "null"
    assert len(as_param("x" * 10_000)) == 6000


def test_mlflow_in_report_to_needs_a_server(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = load_config("smoke", ["tracking.report_to=[mlflow]"], store=str(tmp_path / "store"))
    with pytest.raises(PreflightError, match="tracking.report_to includes 'mlflow' but no MLflow server is set"):
        preflight(cfg)


@pytest.mark.slow
@needs_chromium
def test_the_run_in_mlflows_ui(mlflow_server, passing, tmp_path):
    """The MLflow UI's page of the run, opened from run.json's link: the fine-tune's curves and the stages' figures
    (docs/images/mlflow-run.png is this screenshot)."""
    OUTPUTS.mkdir(parents=True, exist_ok=True)
    with chromium(tmp_path / "chromium-profile") as browser:
        page = show_run_charts(browser, passing["summary"]["mlflow"]["run_url"], OUTPUTS / "mlflow-run.png")
    for chart in ("loss", "grad_norm", "learning_rate", "epoch"):  # the fine-tune's curves, drawn first
        assert chart in page.splitlines()
    assert "smoke" in page.splitlines() and "train" in page.splitlines()  # the run, its section of curves
    assert (OUTPUTS / "mlflow-run.png").stat().st_size > 10_000


def show_run_charts(browser, run_url: str, screenshot: Path) -> str:
    """Open the run's page in the UI's model-training view (assistant panel closed), go to its metric charts, save a
    screenshot; return the page's text."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as shown
    from selenium.webdriver.support.ui import WebDriverWait

    wait = WebDriverWait(browser, 90)
    browser.get(run_url.split("#")[0])
    browser.execute_script("localStorage.setItem('mlflow.workflowType_v1', '\"machine_learning\"');"
                           "localStorage.setItem('mlflow.assistant.panelOpen_v1', 'false');"
                           "localStorage.setItem('mlflow.assistant.fab.autoOpenedOnFirstLoad_v1', 'true')")
    browser.get(run_url)
    wait.until(shown.text_to_be_present_in_element((By.TAG_NAME, "body"), "eval.gptq.perplexity"))
    wait.until(shown.element_to_be_clickable((By.XPATH, "//*[@role='tab' and .//text()='Model metrics']"))).click()
    wait.until(shown.text_to_be_present_in_element((By.TAG_NAME, "body"), "train/loss"))
    wait.until(shown.presence_of_element_located((By.CSS_SELECTOR, ".js-plotly-plot svg.main-svg")))  # a chart drawn
    time.sleep(2)  # the other charts finish drawing
    page = browser.find_element(By.TAG_NAME, "body").text
    browser.save_screenshot(str(screenshot))
    return page
