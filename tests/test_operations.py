"""Operations for real on 127.0.0.1: a Prefect server on PostgreSQL with its API auth on, a process worker on the
`gpu` pool (docker/process-pool-template.json), `prefect deploy` from prefect.yaml, its nightly schedule, a run
triggered with the UI's parameters, the report artifact on the flow run page in headless Chromium, the `gpu` tag
concurrency limit keeping two runs' stages apart, and the deployment policy refusing triggers it does not allow.

PostgreSQL and Chromium come from Debian's packages (`make system-deps`, run by .ci/run). Without the PostgreSQL
server binaries the server falls back to SQLite (said in a warning); without Chromium the browser test skips.
"""

import base64
import glob
import itertools
import json
import os
import pwd
import shutil
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC
from pathlib import Path

import pytest

from flows.finetune_then_quantize import GPU_STAGES, GPU_TAG, REPORT_KEY
from pipeline.run import STAGES
from tests.browser import chromium, needs_chromium
from tests.conftest import ROOT
from tests.processes import BIN, free_port, stop, wait_healthy

pytestmark = pytest.mark.slow
DEPLOYMENT = "finetune-then-quantize/nightly"  # from prefect.yaml
OUTPUTS = ROOT / "test-outputs" / "operations"
# The smoke config cut shorter still: these tests are about orchestration, the pipeline's own tests are elsewhere.
FAST = ["training.max_steps=4", "merge.check_samples=1", "quantization.calibration.n_samples=8"]
AUTH = "ftq-operator:ops-test-password"  # the server's API auth (PREFECT_SERVER_API_AUTH_STRING) and its clients'


def postgres_bin_dir() -> Path | None:
    """Debian's server binaries (/usr/lib/postgresql/<major>/bin), newest major first; else initdb on PATH."""
    dirs = [Path(p).parent for p in glob.glob("/usr/lib/postgresql/*/bin/initdb")]
    dirs.sort(key=lambda d: int(d.parent.name) if d.parent.name.isdigit() else 0, reverse=True)
    if not dirs and shutil.which("initdb"):
        dirs = [Path(shutil.which("initdb")).resolve().parent]
    return dirs[0] if dirs else None


@contextmanager
def postgres_cluster() -> Iterator[str | None]:
    """A throwaway PostgreSQL cluster on a free loopback port; yields Prefect's database URL, or None if the server
    binaries (or, as root, the `postgres` user that initdb must run as) are missing."""
    bin_dir, owner = postgres_bin_dir(), None
    if os.geteuid() == 0:  # initdb and postgres refuse to run as root: run them as Debian's `postgres` user
        try:
            owner = pwd.getpwnam("postgres")
        except KeyError:
            bin_dir = None
    if bin_dir is None:
        yield None
        return
    run_as = dict(user=owner.pw_uid, group=owner.pw_gid, extra_groups=[]) if owner else {}
    root = Path(tempfile.mkdtemp(prefix="ftq-pg-"))
    if owner:
        os.chown(root, owner.pw_uid, owner.pw_gid)
    port = free_port()
    proc = None
    try:
        init = subprocess.run([str(bin_dir / "initdb"), "-D", str(root / "data"), "-U", "postgres", "--auth=trust",
                               "-E", "UTF8", "--locale=C.UTF-8"], cwd=root, capture_output=True, text=True,
                              timeout=120, **run_as)
        assert init.returncode == 0, f"initdb failed:\n{init.stdout[-2000:]}\n{init.stderr[-2000:]}"
        log = open(root / "postgres.log", "w")
        proc = subprocess.Popen([str(bin_dir / "postgres"), "-D", str(root / "data"), "-p", str(port), "-k", str(root),
                                 "-c", "listen_addresses=127.0.0.1", "-c", "fsync=off"],
                                cwd=root, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, **run_as)
        deadline = time.monotonic() + 60
        while subprocess.run([str(bin_dir / "pg_isready"), "-q", "-h", "127.0.0.1", "-p", str(port)]).returncode:
            assert proc.poll() is None, (root / "postgres.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "postgres did not accept connections in 60 s"
            time.sleep(0.3)
        created = subprocess.run([str(bin_dir / "createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", "postgres",
                                  "prefect"], capture_output=True, text=True, timeout=60)
        assert created.returncode == 0, created.stderr
        yield f"postgresql+asyncpg://postgres@127.0.0.1:{port}/prefect"
    finally:
        if proc is not None:
            stop(proc)
            log.close()
        shutil.rmtree(root, ignore_errors=True)


def psql(db_url: str, sql: str) -> str:
    host_port = db_url.split("@", 1)[1].split("/", 1)[0]
    host, port = host_port.split(":")
    result = subprocess.run([str(postgres_bin_dir() / "psql"), "-h", host, "-p", port, "-U", "postgres", "-d", "prefect",
                             "-tAc", sql], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def prefect_cli(*args: str, env: dict, timeout: int = 180) -> str:
    """Run the `prefect` CLI from the project root, as an operator would; fail the test with its output if it fails."""
    result = subprocess.run([str(BIN / "prefect"), *args], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=timeout)
    assert result.returncode == 0, f"prefect {' '.join(args)} exited {result.returncode}:\n" \
                                   f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result.stdout


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    """PostgreSQL, `prefect server`, the `gpu` process pool with its concurrency limit, `prefect deploy --all` from
    prefect.yaml, and one process worker; everything started here is stopped here, by pid, in reverse order."""
    home = tmp_path_factory.mktemp("ops-prefect-home")
    port = free_port()
    url = f"http://127.0.0.1:{port}/api"
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_API_URL": url, "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "PREFECT_WORKER_QUERY_SECONDS": "2", "PREFECT_API_AUTH_STRING": AUTH}
    with postgres_cluster() as db_url:
        if db_url is None:
            warnings.warn("PostgreSQL server binaries not found (Debian package postgresql; `make system-deps`): "
                          "the Prefect server in tests/test_operations.py runs on SQLite", stacklevel=2)
        server_env = {**env, "PREFECT_SERVER_API_HOST": "127.0.0.1", "PREFECT_SERVER_API_AUTH_STRING": AUTH,
                      "PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS": "5",
                      "PREFECT_API_DATABASE_CONNECTION_URL": db_url or f"sqlite+aiosqlite:///{home}/prefect.db"}
        server_log, worker_log = home / "server.log", home / "worker.log"
        with open(server_log, "w") as log:
            server = subprocess.Popen([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1",
                                       "--port", str(port)], env=server_env, stdout=log, stderr=subprocess.STDOUT,
                                      start_new_session=True)
        worker = None
        try:
            wait_healthy(url, server, server_log)
            prefect_cli("work-pool", "create", "gpu", "--type", "process", "--base-job-template",
                        str(ROOT / "docker" / "process-pool-template.json"), env=env)
            prefect_cli("concurrency-limit", "create", GPU_TAG, "1", env=env)
            deployed = prefect_cli("--no-prompt", "deploy", "--all", env=env, timeout=300)
            with open(worker_log, "w") as log:
                worker = subprocess.Popen([str(BIN / "prefect"), "worker", "start", "--pool", "gpu",
                                           "--name", "ops-test"], cwd=ROOT, env=env, stdout=log,
                                          stderr=subprocess.STDOUT, start_new_session=True)
            yield {"url": url, "ui": url.removesuffix("/api"), "env": env, "db_url": db_url, "deployed": deployed,
                   "worker": worker, "worker_log": worker_log}
        finally:
            if worker is not None:
                stop(worker)
            stop(server)


@contextmanager
def api(stack) -> Iterator:
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_AUTH_STRING, PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: stack["url"], PREFECT_API_AUTH_STRING: AUTH}), \
            get_client(sync_client=True) as client:
        yield client


def wait_final(client, run_ids: list, stack, seconds: int) -> list:
    deadline = time.monotonic() + seconds
    while True:
        runs = [client.read_flow_run(run_id) for run_id in run_ids]
        if all(run.state.is_final() for run in runs):
            return runs
        assert stack["worker"].poll() is None, stack["worker_log"].read_text()[-4000:]
        assert time.monotonic() < deadline, f"flow runs stuck in {[r.state.name for r in runs]}:\n" + \
                                            stack["worker_log"].read_text()[-4000:]
        time.sleep(2)


def run_as_the_ui_does(client, parameters: dict):
    """The UI's Run -> Custom run: the deployment's parameter form, some values changed, posted to
    /deployments/{id}/create_flow_run."""
    deployment = client.read_deployment_by_name(DEPLOYMENT)
    form = {"config": None, "overrides": None, "run_name": None, "store": None, "force": None, **deployment.parameters}
    return client.create_flow_run_from_deployment(deployment.id, parameters={**form, **parameters})


def test_deploy_from_prefect_yaml_gives_a_nightly_schedule_with_defaults_on_the_gpu_pool(stack):
    from prefect.client.schemas.filters import (
        DeploymentFilter,
        DeploymentFilterId,
        FlowRunFilter,
        FlowRunFilterState,
        FlowRunFilterStateName,
    )

    with api(stack) as client:
        deployment = client.read_deployment_by_name(DEPLOYMENT)
        assert deployment.work_pool_name == "gpu"
        assert deployment.parameters == {"config": "default", "overrides": []}
        assert [(s.schedule.cron, s.schedule.timezone, s.active) for s in deployment.schedules] == \
               [("0 2 * * *", "UTC", True)]
        # The pull step recorded the folder `prefect deploy` ran in: flow runs start in this checkout.
        assert deployment.pull_steps == [
            {"prefect.deployments.steps.set_working_directory": {"directory": str(ROOT)}}]
        form = deployment.parameter_openapi_schema["properties"]
        assert sorted(form, key=lambda name: form[name]["position"]) == ["config", "overrides", "run_name", "store", "force"]
        assert all(field.get("description") for field in form.values()), form  # the UI form's help texts
        assert form["overrides"]["anyOf"][0] == {"items": {"type": "string"}, "type": "array"}
        limit = client.read_concurrency_limit_by_tag(GPU_TAG)
        assert limit.concurrency_limit == 1

        # The server's scheduler puts the next nightly runs on the calendar, at 02:00 UTC with the defaults.
        only_scheduled = dict(
            deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment.id])),
            flow_run_filter=FlowRunFilter(state=FlowRunFilterState(name=FlowRunFilterStateName(any_=["Scheduled"]))))
        deadline = time.monotonic() + 90
        while not (scheduled := client.read_flow_runs(**only_scheduled)):
            assert time.monotonic() < deadline, "the scheduler created no nightly run in 90 s"
            time.sleep(1)
        for run in scheduled:
            start = run.expected_start_time.astimezone(UTC)
            assert (start.hour, start.minute, run.auto_scheduled) == (2, 0, True)
            assert run.parameters == {"config": "default", "overrides": []}

        # Pause it, so a test session that happens to span 02:00 UTC does not start the default job here.
        client.update_deployment_schedule(deployment.id, deployment.schedules[0].id, active=False)
        for run in client.read_flow_runs(**only_scheduled):
            client.delete_flow_run(run.id)

    if stack["db_url"]:  # the server's state really lives in PostgreSQL
        assert psql(stack["db_url"], "select count(*) from deployment where name = 'nightly'") == "1"
        assert "0 2 * * *" in psql(stack["db_url"], "select schedule::text from deployment_schedule")


@pytest.fixture(scope="module")
def store():
    """A folder in the checkout's store, ./artifacts (a store prefect.yaml's nightly policy allows); removed after."""
    artifacts = ROOT / "artifacts"
    artifacts.mkdir(exist_ok=True)
    folder = Path(tempfile.mkdtemp(prefix="ops-", dir=artifacts))
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="module")
def ui_run(stack, store):
    """One run of the nightly deployment triggered with the UI's parameters: the smoke config in the store."""
    parameters = {"config": "smoke", "overrides": FAST, "run_name": "from-ui", "store": str(store)}
    with api(stack) as client:
        run = run_as_the_ui_does(client, parameters)
        [run] = wait_final(client, [run.id], stack, seconds=480)
    return {"run": run, "parameters": parameters, "store": store, "run_dir": store / "from-ui"}


def test_run_triggered_like_the_ui_completes_with_report_artifact_and_store(stack, ui_run):
    from prefect.client.schemas.filters import (
        ArtifactFilter,
        ArtifactFilterFlowRunId,
        FlowRunFilter,
        FlowRunFilterId,
        LogFilter,
        LogFilterFlowRunId,
    )

    run, run_dir = ui_run["run"], ui_run["run_dir"]
    assert run.state.is_completed(), f"{run.state.name}: {run.state.message}\n" + stack["worker_log"].read_text()[-4000:]
    assert run.parameters == {"force": None, **ui_run["parameters"]}
    assert run.work_pool_name == "gpu"

    summary = json.loads((run_dir / "run.json").read_text())
    assert summary["status"] == "completed"
    assert summary["config"]["training"]["max_steps"] == 4 and summary["metrics"]["finetune"]["steps"] == 4
    for stage in STAGES:
        assert Path(summary["stages"][stage]["uri"]) == run_dir / stage
        assert (run_dir / stage / "manifest.json").is_file()

    with api(stack) as client:
        tasks = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run.id])))
        artifacts = client.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[run.id])))
        # the flow's own log lines reach the run's Logs tab (the worker loads the flow module by its path); logs are
        # shipped in batches, so the last lines may land a few seconds after the run's final state
        line, deadline = f"run from-ui completed: {run_dir / 'run.json'}", time.monotonic() + 60
        while line not in (logs := [log.message for log in client.read_logs(
                log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run.id])))]):
            assert time.monotonic() < deadline, logs[-10:]
            time.sleep(2)
    stage_tasks = [t for t in tasks if t.name.rsplit("-", 1)[0] in STAGES]
    assert sorted(t.name.rsplit("-", 1)[0] for t in stage_tasks) == sorted(STAGES)
    assert all(t.state.is_completed() for t in stage_tasks)
    # what the concurrency limit counts: every stage that loads a model
    assert sorted(t.name.rsplit("-", 1)[0] for t in stage_tasks if GPU_TAG in t.tags) == sorted(GPU_STAGES)
    [report] = artifacts
    assert (report.key, report.type) == (REPORT_KEY, "markdown")
    assert report.description == f"run from-ui: {run_dir / 'run.json'}"
    assert report.data.startswith("# finetune-then-quantize: from-ui completed")
    for stage in STAGES:
        assert f"| {stage} | `{run_dir / stage}` |" in report.data
    assert json.loads(report.data.split("```json\n", 1)[1].split("\n```", 1)[0]) == summary


@needs_chromium
def test_flow_run_page_in_the_ui_shows_the_report_artifact(stack, ui_run, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as shown
    from selenium.webdriver.support.ui import WebDriverWait

    run, run_dir = ui_run["run"], ui_run["run_dir"]
    assert run.state.is_completed()
    OUTPUTS.mkdir(parents=True, exist_ok=True)
    with chromium(tmp_path / "chromium-profile") as browser:
        wait = WebDriverWait(browser, 60)
        browser.get(stack["ui"])  # the UI's login form keeps the credentials here
        browser.execute_script("localStorage.setItem('prefect-password', arguments[0])",
                               base64.b64encode(AUTH.encode()).decode())
        browser.get(f"{stack['ui']}/runs/flow-run/{run.id}")
        wait.until(shown.text_to_be_present_in_element((By.TAG_NAME, "body"), run.name))  # this run's page
        wait.until(shown.element_to_be_clickable((By.CSS_SELECTOR, "li.p-tab#artifacts"))).click()
        card = wait.until(shown.visibility_of_element_located((By.CSS_SELECTOR, "a .artifact-card")))
        browser.save_screenshot(str(OUTPUTS / "flow-run-artifacts.png"))
        assert card.find_element(By.CSS_SELECTOR, ".artifact-card__title").text == REPORT_KEY
        assert f"run from-ui: {run_dir / 'run.json'}" in card.text

        card.click()  # the card opens the artifact: the report rendered from its markdown
        wait.until(shown.text_to_be_present_in_element((By.TAG_NAME, "body"), "finetune-then-quantize: from-ui completed"))
        page = browser.find_element(By.TAG_NAME, "body").text
        browser.save_screenshot(str(OUTPUTS / "report-artifact.png"))
    for stage in STAGES:
        assert f"{stage} {run_dir / stage}" in page  # the table row: stage, store URI, ...
    assert (OUTPUTS / "flow-run-artifacts.png").stat().st_size > 10_000


def test_gpu_tag_limit_keeps_two_simultaneous_runs_off_the_gpu_at_the_same_time(stack, store):
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with api(stack) as client:
        triggered = [run_as_the_ui_does(client, {"config": "smoke", "overrides": FAST, "run_name": name,
                                                 "store": str(store)}) for name in ("gpu-a", "gpu-b")]
        runs = wait_final(client, [run.id for run in triggered], stack, seconds=600)
        tasks = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[r.id for r in runs])))
        limit = client.read_concurrency_limit_by_tag(GPU_TAG)
    assert all(run.state.is_completed() for run in runs), [(r.state.name, r.state.message) for r in runs]
    # The two flow runs were running at the same time ...
    assert max(run.start_time for run in runs) < min(run.end_time for run in runs)
    # ... yet no two stages (task runs tagged `gpu`) ever overlapped: each started after the previous one ended.
    on_gpu = [t for t in tasks if GPU_TAG in t.tags]
    assert sorted(t.name.rsplit("-", 1)[0] for t in on_gpu) == sorted(GPU_STAGES * 2)
    ordered = sorted(on_gpu, key=lambda t: t.start_time)
    for earlier, later in itertools.pairwise(ordered):
        assert earlier.end_time <= later.start_time, f"{earlier.name} and {later.name} ran at once"
    assert limit.active_slots == []
    for name in ("gpu-a", "gpu-b"):
        assert json.loads((store / name / "run.json").read_text())["status"] == "completed"


def test_the_api_refuses_calls_without_the_credentials_and_the_worker_with_them_runs(stack, ui_run):
    def status(path: str, auth: str | None, body: bytes | None = None) -> int:
        request = urllib.request.Request(f"{stack['url']}{path}", data=body, method="POST" if body else "GET",
                                         headers={"Content-Type": "application/json"})
        if auth:
            request.add_header("Authorization", "Basic " + base64.b64encode(auth.encode()).decode())
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                return response.status
        except urllib.error.HTTPError as exc:
            return exc.code

    assert status("/deployments/filter", None, b"{}") == 401
    assert status("/deployments/filter", "ftq-operator:wrong", b"{}") == 401
    assert status("/flow_runs/filter", None, b"{}") == 401
    assert status("/deployments/filter", AUTH, b"{}") == 200
    assert status("/health", None) == 200  # probes stay open
    assert ui_run["run"].state.is_completed()  # the worker, with the credentials, ran the deployment


def test_a_trigger_cannot_replace_the_command_or_environment_through_job_variables(stack, tmp_path):
    from prefect.exceptions import PrefectHTTPStatusError

    marker = tmp_path / "ran"
    with api(stack) as client:
        deployment = client.read_deployment_by_name(DEPLOYMENT)
        for variables in ({"command": f"touch {marker}"}, {"env": {"FTQ_ANYTHING": "1"}}, {"working_dir": "/"}):
            with pytest.raises(PrefectHTTPStatusError) as refused:
                client.create_flow_run_from_deployment(deployment.id, parameters={"config": "smoke"},
                                                       job_variables=variables)
            assert refused.value.response.status_code == 422
            assert "Additional properties are not allowed" in refused.value.response.text
    assert not marker.exists()


@pytest.fixture(scope="module")
def refused_runs(stack, tmp_path_factory):
    """Three triggers the nightly policy refuses, run at once; `outside` is the store one of them names."""
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    outside = tmp_path_factory.mktemp("outside-store")
    triggers = {
        "remote-code": {"overrides": ["model.trust_remote_code=true"]},
        "passwd": {"overrides": ["data.path=/etc/passwd"]},
        "outside-store": {"store": str(outside)},
    }
    with api(stack) as client:
        runs = {name: run_as_the_ui_does(client, {"config": "smoke", "run_name": name, **parameters})
                for name, parameters in triggers.items()}
        final = wait_final(client, [run.id for run in runs.values()], stack, seconds=300)
        logs = {run.id: client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run.id])))
                for run in final}
    return {"runs": dict(zip(runs, final, strict=True)), "outside": outside, "logs": logs}


def test_the_deployment_policy_refuses_triggers_before_reading_or_writing_anything(refused_runs, store):
    runs = refused_runs["runs"]
    expected = {
        "remote-code": "override 'model.trust_remote_code': not a key a triggered run may set",
        "passwd": "data.path='/etc/passwd' lies outside the allowed roots (data, /data)",
        "outside-store": f"store {str(refused_runs['outside'])!r} is not an allowed store",
    }
    for name, run in runs.items():
        assert run.state.is_failed(), f"{name}: {run.state.name}"
        message = run.state.message
        assert "PolicyError" in message and expected[name] in message, message
        assert f"{ROOT / 'prefect.yaml'}, deployment 'nightly'" in message
        assert "root:" not in message  # /etc/passwd was never opened
        logged = "\n".join(log.message for log in refused_runs["logs"][run.id])
        assert "deployment nightly: the run's parameters are checked against the policy in" in logged
        assert "preflight passed" not in logged and "root:x:" not in logged  # refused before preflight read anything
        assert not (store / name).exists()
    assert list(refused_runs["outside"].iterdir()) == []
