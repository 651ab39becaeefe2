"""The deployment policy (pipeline/policy.py): what a run triggered from a deployment may change, checked before
anything is read or written. The same checks against the real server, worker and deployment: tests/test_operations.py."""

import json

import pytest
import yaml

from pipeline.config import load_config
from pipeline.policy import (
    DeploymentPolicy,
    Policy,
    PolicyError,
    check_config,
    check_request,
    deployment_policy,
)
from tests.conftest import ROOT

SECRET = "API_TOKEN=sk-live-0123456789"


@pytest.fixture(autouse=True)
def in_checkout(monkeypatch):
    monkeypatch.chdir(ROOT)  # a flow run starts in the checkout (prefect.yaml's pull step)


def policy(**rules) -> Policy:
    return Policy(DeploymentPolicy(**rules), "test policy")


def triggered(pol: Policy, config: str, overrides: list[str] = (), store: str | None = None,
              force: list[str] = ()) -> None:
    """What the flow does for a triggered run: the parameters, then the loaded config."""
    check_request(pol, config, list(overrides), list(force))
    check_config(pol, load_config(config, list(overrides), store=store), config)


def test_the_shipped_nightly_policy_lets_its_schedule_and_the_smoke_config_run():
    nightly = deployment_policy("nightly")
    assert nightly.source == f"{ROOT / 'prefect.yaml'}, deployment 'nightly'"
    assert nightly.rules.gguf and nightly.rules.package_sources and not nightly.rules.trust_remote_code
    triggered(nightly, "default")  # the schedule's parameters
    triggered(nightly, "smoke", ["training.max_steps=4", "quantization.calibration.n_samples=8",
                                 "data.path=data/smoke_chat.jsonl"], store=str(ROOT / "artifacts" / "ops"))


def test_a_deployment_without_a_policy_gets_the_closed_default():
    closed = deployment_policy("not-in-prefect-yaml")
    assert closed.rules == DeploymentPolicy() and "closed default" in closed.source
    triggered(closed, "smoke", ["data.path=data/smoke_chat.jsonl"])
    with pytest.raises(PolicyError) as refused:  # the demo's GGUF from PyPI is the deployer's to allow
        triggered(closed, "default")
    assert "pypi:` sources are not allowed (policy `package_sources: false`)" in str(refused.value)
    assert "a GGUF base is not allowed (policy `gguf: false`)" in str(refused.value)
    assert "closed default: deployment 'not-in-prefect-yaml' has no policy" in str(refused.value)
    with pytest.raises(PolicyError, match=r"override 'training.max_steps': not a key a triggered run may set "
                                          r"\(policy `overrides`: data.path, data.eval_path\)"):
        triggered(closed, "smoke", ["training.max_steps=4"])


def test_remote_code_and_pickle_are_refused_by_key_and_by_value():
    nightly = deployment_policy("nightly")
    with pytest.raises(PolicyError) as refused:
        triggered(nightly, "smoke", ["model.trust_remote_code=true", "model.name_or_path=someone/custom-code"])
    message = str(refused.value)
    assert "override 'model.trust_remote_code': not a key a triggered run may set" in message
    assert "override 'model.name_or_path'" in message and "deployment 'nightly'" in message
    assert "refused this run before it read data or a model or wrote anything" in message
    # A policy that opens model.* still keeps the switches that run code shut
    with pytest.raises(PolicyError) as refused:
        triggered(policy(overrides=["model.*"]), "smoke", ["model.trust_remote_code=true", "model.allow_pickle=true"])
    assert "model.trust_remote_code=true would run the model repository's own Python code" in str(refused.value)
    assert "model.allow_pickle=true: pickle weights can run code" in str(refused.value)
    triggered(policy(overrides=["model.*"], trust_remote_code=True, allow_pickle=True), "smoke",
              ["model.trust_remote_code=true", "model.allow_pickle=true"])


def test_a_file_outside_the_roots_is_refused_without_its_contents(tmp_path):
    secret = tmp_path / "secrets.jsonl"
    secret.write_text(SECRET + "\n")
    inside = tmp_path / "data"
    inside.mkdir()
    (inside / "link.jsonl").symlink_to(secret)  # inside by name, outside once resolved
    (inside / "rows.jsonl").write_text((ROOT / "data" / "smoke_chat.jsonl").read_text())
    rules = policy(roots=[str(inside)])
    for path in ("/etc/passwd", str(secret), str(inside / "link.jsonl"), "../../etc/shadow.jsonl"):
        with pytest.raises(PolicyError) as refused:
            triggered(rules, "smoke", [f"data.path={path}"])
        assert f"data.path={path!r} lies outside the allowed roots ({inside})" in str(refused.value)
        assert "sk-live" not in str(refused.value) and "root:" not in str(refused.value)
    triggered(rules, "smoke", [f"data.path={inside / 'rows.jsonl'}"])  # inside: allowed
    triggered(rules, "smoke", ["data.path=builtin:iso-dates"])  # no file: nothing to contain
    with pytest.raises(PolicyError, match=r"quantization.calibration.source='/etc/passwd.jsonl' lies outside"):
        triggered(policy(overrides=["quantization.*"]), "smoke", ["quantization.calibration.source=/etc/passwd.jsonl"])


def test_a_config_outside_conf_is_refused_unread_and_inside_a_root_counts_as_its_keys(tmp_path):
    outside = tmp_path / "evil.yaml"
    outside.write_text(f"# {SECRET}\nrun_name: x\n")
    with pytest.raises(PolicyError) as refused:
        triggered(policy(), str(outside))
    assert f"config {str(outside)!r}: a file outside conf/ and outside the allowed roots (data)" in str(refused.value)
    assert "sk-live" not in str(refused.value)
    root = tmp_path / "configs"
    root.mkdir()
    tree = yaml.safe_load((ROOT / "conf" / "smoke.yaml").read_text())
    tree["model"]["trust_remote_code"] = True
    (root / "mine.yaml").write_text(yaml.safe_dump(tree))
    with pytest.raises(PolicyError) as refused:
        check_request(policy(roots=[str(root)], overrides=["training.*"]), str(root / "mine.yaml"), [], [])
    assert f"config {str(root / 'mine.yaml')!r} sets 'model.trust_remote_code': not a key" in str(refused.value)
    assert "'training.max_steps'" not in str(refused.value)  # allowed by training.*


def test_stores_allowed_are_the_configs_own_and_the_listed_ones(tmp_path):
    nightly = deployment_policy("nightly")
    with pytest.raises(PolicyError, match=rf"store '{tmp_path}' is not an allowed store \(./artifacts, "
                                          r"s3://ftq-artifacts\)"):
        triggered(nightly, "smoke", store=str(tmp_path))
    triggered(nightly, "smoke", store="s3://ftq-artifacts/team-a")
    for other in ("s3://ftq-artifacts-other", "s3://ftq-artifacts/../other", "./artifacts/../conf"):
        with pytest.raises(PolicyError, match=f"store '{other}' is not an allowed store"):
            triggered(nightly, "smoke", store=other)
    with pytest.raises(PolicyError, match=r"override 'store.uri'"):
        triggered(nightly, "smoke", ["store.uri=s3://elsewhere"])


def test_engine_configs_from_conf_pass_and_others_must_lie_in_a_root(tmp_path):
    rules = policy(overrides=["training.*"])
    triggered(rules, "smoke", ["training.distributed=fsdp", "training.fsdp_config=full_shard"])  # conf/fsdp/
    outside = tmp_path / "zero.json"
    outside.write_text("{}")
    with pytest.raises(PolicyError, match=rf"training.deepspeed_config='{outside}' lies outside the allowed roots"):
        triggered(rules, "smoke", ["training.distributed=deepspeed", f"training.deepspeed_config={outside}"])


def test_force_needs_the_policy():
    with pytest.raises(PolicyError, match=r"force \['merge'\]: recomputing finished stages is not allowed"):
        triggered(policy(), "smoke", force=["merge"])
    triggered(policy(force=True), "smoke", force=["merge"])


def test_a_policy_file_named_in_prefect_yaml_and_a_bad_one(tmp_path):
    (tmp_path / "tight.yaml").write_text("overrides: []\nroots: []\n")
    (tmp_path / "bad.yaml").write_text("overides: [training.*]\n")
    (tmp_path / "prefect.yaml").write_text(yaml.safe_dump({"deployments": [
        {"name": "tight", "policy": str(tmp_path / "tight.yaml")},
        {"name": "bad", "policy": str(tmp_path / "bad.yaml")},
        {"name": "inline", "policy": {"force": True}}]}))
    tight = deployment_policy("tight", tmp_path / "prefect.yaml")
    assert tight.rules.overrides == [] and tight.source.startswith(str(tmp_path / "tight.yaml"))
    with pytest.raises(PolicyError, match=r"override 'data.path': not a key .*\(policy `overrides`: none\)"):
        triggered(tight, "smoke", ["data.path=data/smoke_chat.jsonl"])
    assert deployment_policy("inline", tmp_path / "prefect.yaml").rules.force
    with pytest.raises(PolicyError, match=r"bad.yaml.* is not valid: overides: Extra inputs are not permitted"):
        deployment_policy("bad", tmp_path / "prefect.yaml")


def test_the_compose_stack_needs_its_secrets_and_turns_the_api_auth_on():
    """docker/compose.yaml as an operator gets it: no built-in passwords, the API's auth on for server and clients,
    ports on localhost unless opened, the pool created with the narrowed job template."""
    text = (ROOT / "docker" / "compose.yaml").read_text()
    for secret in ("POSTGRES_PASSWORD", "FTQ_PREFECT_AUTH", "FTQ_S3_ACCESS_KEY", "FTQ_S3_SECRET_KEY"):
        assert f"${{{secret}:-" not in text and f"${{{secret}:?" in text, secret
    stack = yaml.safe_load(text)
    server = stack["services"]["prefect-server"]
    assert server["environment"]["PREFECT_SERVER_API_AUTH_STRING"].startswith("${FTQ_PREFECT_AUTH:?")
    assert stack["x-ftq-image"]["environment"]["PREFECT_API_AUTH_STRING"].startswith("${FTQ_PREFECT_AUTH:?")
    assert server["ports"] == ["${FTQ_PUBLISH_HOST:-127.0.0.1}:4200:4200"]
    assert "--base-job-template docker/process-pool-template.json" in stack["services"]["setup"]["command"][-1]


def job_template(name: str) -> dict:
    return json.loads((ROOT / "docker" / name).read_text())


@pytest.mark.parametrize("name", ["process-pool-template.json", "k8s-gpu-job-template.json"])
def test_the_job_templates_refuse_job_variables_that_replace_command_image_or_environment(name):
    """What the server checks a flow run's job variables against (the UI's Custom run, `--job-variable`)."""
    from prefect.utilities.schema_tools import ValidationError as JobVariablesRefused
    from prefect.utilities.schema_tools import validate

    schema = job_template(name)["variables"]
    for variables in ({"command": "sh -c id"}, {"env": {"PREFECT_API_URL": "http://elsewhere"}}, {"image": "evil"},
                      {"working_dir": "/"}, {"namespace": "kube-system"}, {"service_account_name": "admin"}):
        with pytest.raises(JobVariablesRefused, match="Additional properties are not allowed"):
            validate(variables, schema, raise_on_error=True, preprocess=True, ignore_required=True)
    allowed = {"gpu_count": 2, "shm_size": "16Gi"} if name.startswith("k8s") else {"stream_output": False}
    validate(allowed, schema, raise_on_error=True, preprocess=True, ignore_required=True)


def test_the_kubernetes_job_reads_the_credentials_from_the_secret_not_the_workers_copy():
    """The Job prefect-kubernetes renders for a flow run, as its worker does, on a worker holding the credentials."""
    import asyncio
    import uuid

    from prefect.client.schemas.objects import FlowRun
    from prefect.settings import PREFECT_API_AUTH_STRING, PREFECT_API_URL, temporary_settings
    from prefect_kubernetes.worker import KubernetesWorkerJobConfiguration

    with temporary_settings({PREFECT_API_URL: "http://prefect:4200/api", PREFECT_API_AUTH_STRING: "ops:s3cret"}):
        job = asyncio.run(KubernetesWorkerJobConfiguration.from_template_and_values(
            job_template("k8s-gpu-job-template.json"), {"gpu_count": 2}))
        job.prepare_for_flow_run(flow_run=FlowRun(id=uuid.uuid4(), flow_id=uuid.uuid4(), name="nightly-run"))
    manifest = job.job_manifest
    [container] = manifest["spec"]["template"]["spec"]["containers"]
    assert "s3cret" not in json.dumps(manifest)  # the worker's copy of the password is not in the Job's spec
    [auth] = [e for e in container["env"] if e["name"] == "PREFECT_API_AUTH_STRING"]
    assert auth == {"name": "PREFECT_API_AUTH_STRING",
                    "valueFrom": {"secretKeyRef": {"name": "ftq-prefect-auth", "key": "auth-string"}}}
    assert {"name": "PREFECT_API_URL", "value": "http://prefect:4200/api"} in container["env"]
    assert container["envFrom"] == [{"secretRef": {"name": "ftq-store", "optional": True}}]
    assert container["args"] == ["prefect", "flow-run", "execute"]  # the worker's own command
    assert (container["image"], manifest["metadata"]["namespace"]) == ("ftq-gpu-worker:0.1.0", "default")
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 2
