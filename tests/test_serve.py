"""A deployment served against a real `prefect server` on 127.0.0.1, triggered through the API as the UI does, within
the policy of its namesake in prefect.yaml."""

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from tests.conftest import ROOT
from tests.processes import BIN, free_port, stop, wait_healthy

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def prefect_server(tmp_path_factory):
    home = tmp_path_factory.mktemp("prefect-home")
    port = free_port()
    url = f"http://127.0.0.1:{port}/api"
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "PREFECT_API_URL": url, "PREFECT_SERVER_API_HOST": "127.0.0.1"}
    log = open(home / "server.log", "w")
    proc = subprocess.Popen([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_healthy(url, proc, home / "server.log", seconds=90)
        yield {"url": url, "env": env, "home": home}
    finally:
        stop(proc)
        log.close()


def test_served_deployment_runs_with_parameter_override(prefect_server, tmp_path):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterName
    from prefect.settings import PREFECT_API_URL, temporary_settings

    log = open(tmp_path / "serve.log", "w")
    serve = subprocess.Popen(
        [sys.executable, "-m", "flows.serve", "--name", "nightly", "--cron", "30 3 * * *", "--config", "smoke"],
        cwd=ROOT, env=prefect_server["env"], stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    (ROOT / "artifacts").mkdir(exist_ok=True)
    store = Path(tempfile.mkdtemp(prefix="serve-", dir=ROOT / "artifacts"))  # a store the nightly policy allows
    try:
        with temporary_settings({PREFECT_API_URL: prefect_server["url"]}), get_client(sync_client=True) as client:
            deadline = time.monotonic() + 90
            while not (found := client.read_deployments(
                    deployment_filter=DeploymentFilter(name=DeploymentFilterName(any_=["nightly"])))):
                assert serve.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
                assert time.monotonic() < deadline, "deployment never appeared"
                time.sleep(1)
            deployment = found[0]
            assert deployment.parameters["config"] == "smoke"
            assert [s.schedule.cron for s in deployment.schedules] == ["30 3 * * *"]

            # What the UI's "Custom run" form posts: the deployment's parameters with some changed.
            run = client.create_flow_run_from_deployment(deployment.id, parameters={
                "config": "smoke", "overrides": ["training.max_steps=12"], "run_name": "from-ui", "store": str(store)})
            refused = client.create_flow_run_from_deployment(deployment.id, parameters={
                "config": "smoke", "overrides": ["model.allow_pickle=true"], "run_name": "refused", "store": str(store)})
            deadline = time.monotonic() + 420
            while not all((state := client.read_flow_run(r.id).state).is_final() for r in (run, refused)):
                assert time.monotonic() < deadline, f"flow run stuck in {state.name}"
                time.sleep(2)
            state, refused_state = client.read_flow_run(run.id).state, client.read_flow_run(refused.id).state
            assert state.is_completed(), f"{state.name}: {state.message}\n" + (tmp_path / "serve.log").read_text()[-4000:]
            assert refused_state.is_failed(), refused_state.name
            assert "override 'model.allow_pickle': not a key a triggered run may set" in refused_state.message
            assert f"{ROOT / 'prefect.yaml'}, deployment 'nightly'" in refused_state.message
            assert not (store / "refused").exists()
    finally:
        stop(serve)
        log.close()
    summary = json.loads((store / "from-ui" / "run.json").read_text())
    assert summary["status"] == "completed"
    assert summary["metrics"]["finetune"]["steps"] == 12
    assert summary["config"]["training"]["max_steps"] == 12
    shutil.rmtree(store)
