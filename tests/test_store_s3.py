"""The store on a real S3 server (SeaweedFS on 127.0.0.1): publish, reuse from another machine, checksums,
credentials kept out of everything written. No mocks of the store."""

import json
import time

import pytest

from tests.conftest import run_cli
from tests.s3server import BUCKET, READER, WRITER

pytestmark = pytest.mark.slow


def cli_env(s3, tmp_path, identity=WRITER):
    return {**s3.env(identity), "FTQ_CACHE_DIR": str(tmp_path / "machine-cache")}


def read_json(s3, path):
    return json.loads(s3.filesystem().cat_file(path))


@pytest.fixture(scope="module")
def first_run(s3, tmp_path_factory):
    """One smoke run into s3://ftq/<prefix>, as a user would start it, credentials from the environment."""
    tmp = tmp_path_factory.mktemp("s3-first")
    prefix = f"{BUCKET}/first-{int(time.time())}"
    result = run_cli("--config", "smoke", "--store", f"s3://{prefix}", env=cli_env(s3, tmp))
    return prefix, result


def test_run_publishes_every_stage_to_s3(s3, first_run):
    prefix, result = first_run
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().splitlines()[-1] == f"run summary: s3://{prefix}/smoke/run.json"
    run = read_json(s3, f"{prefix}/smoke/run.json")
    assert run["status"] == "completed"
    fs = s3.filesystem()
    for stage in ("finetune", "merge", "quantize"):
        assert run["stages"][stage]["uri"] == f"s3://{prefix}/smoke/{stage}"
        manifest = read_json(s3, f"{prefix}/smoke/{stage}/manifest.json")
        for rel, info in manifest["files"].items():
            assert fs.info(f"{prefix}/smoke/{stage}/{rel}")["size"] == info["size"]
        assert fs.exists(f"{prefix}/index/{stage}/{manifest['key']}.json")
    assert not fs.glob(f"{prefix}/smoke/.work/**/*.safetensors"), "spent checkpoints go once the adapter is published"
    qc = json.loads(fs.cat_file(f"{prefix}/smoke/quantize/config.json"))["quantization_config"]
    assert qc["checkpoint_format"] == "gptq"


def test_credentials_never_written_or_logged(s3, first_run):
    prefix, result = first_run
    for secret in (WRITER[1], WRITER[0]):
        assert secret not in result.stdout and secret not in result.stderr
        for path, data in s3.all_bytes(prefix).items():
            assert secret.encode() not in data, f"{secret} leaked into {path}"


def test_another_machine_reuses_every_stage_and_verifies_downloads(s3, first_run, tmp_path):
    prefix, _ = first_run
    result = run_cli("--config", "smoke", "--store", f"s3://{prefix}", "--run-name", "second-machine",
                     env=cli_env(s3, tmp_path))  # an empty local cache: everything comes from the store
    assert result.returncode == 0, result.stderr[-3000:]
    run = read_json(s3, f"{prefix}/second-machine/run.json")
    assert all(stage["reused"] for stage in run["stages"].values())
    assert run["stages"]["quantize"]["uri"] == f"s3://{prefix}/smoke/quantize"
    assert "quantize: reusing s3://" in result.stderr


def test_corrupted_object_is_treated_as_missing_and_rebuilt(s3, first_run, tmp_path):
    prefix, _ = first_run
    fs = s3.filesystem()
    weights = f"{prefix}/smoke/merge/model.safetensors"
    original = fs.cat_file(weights)
    fs.pipe_file(weights, original[:-8] + b"corrupt!")
    result = run_cli("--config", "smoke", "--store", f"s3://{prefix}", env=cli_env(s3, tmp_path))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "model.safetensors fails its checksum; treating the stage as missing" in result.stderr
    run = read_json(s3, f"{prefix}/smoke/run.json")
    assert [run["stages"][s]["reused"] for s in ("finetune", "merge", "quantize")] == [True, False, False]
    manifest = read_json(s3, f"{prefix}/smoke/merge/manifest.json")
    import hashlib

    assert hashlib.sha256(fs.cat_file(weights)).hexdigest() == manifest["files"]["model.safetensors"]["sha256"]


def test_read_only_credentials_are_refused_before_anything_is_written(s3, tmp_path):
    prefix = f"{BUCKET}/readonly-{int(time.time())}"
    result = run_cli("--config", "smoke", "--store", f"s3://{prefix}", env=cli_env(s3, tmp_path, READER))
    assert result.returncode == 2
    assert f"store 's3://{prefix}' is not writable with the configured credentials" in result.stderr
    assert READER[1] not in result.stderr
    assert not s3.filesystem().exists(prefix)


def test_unreachable_store_fails_fast_with_exit_2(tmp_path, s3):
    env = {**s3.env(), "AWS_ENDPOINT_URL": "http://127.0.0.1:9", "FTQ_CACHE_DIR": str(tmp_path / "c")}
    start = time.monotonic()
    result = run_cli("--config", "smoke", "--store", "s3://ftq/nowhere", env=env)
    assert result.returncode == 2
    assert "store 's3://ftq/nowhere' is unreachable" in result.stderr and "after 3 attempts" in result.stderr
    assert time.monotonic() - start < 90


def test_uri_with_embedded_credentials_is_refused(tmp_path):
    result = run_cli("--config", "smoke", "--store", "s3://AKIAXXXX:sekrit@bucket/prefix")
    assert result.returncode == 2
    assert "embeds credentials" in result.stderr and "sekrit" not in result.stderr


def test_credentials_from_a_prefect_secret_block(s3, tmp_path, monkeypatch):
    from prefect.blocks.system import Secret
    from prefect.testing.utilities import prefect_test_harness

    from pipeline.store import open_store, write_json
    from pipeline.store import read_json as store_read

    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL"):
        monkeypatch.delenv(name, raising=False)
    with prefect_test_harness(server_startup_timeout=120):
        Secret(value={"key": WRITER[0], "secret": WRITER[1], "endpoint_url": s3.endpoint}).save("ftq-s3")
        store = open_store(f"s3://{BUCKET}/block-test", credentials_block="ftq-s3")
        write_json(store, store.path("probe.json"), {"ok": True})
        assert store_read(store, store.path("probe.json")) == {"ok": True}
    assert json.loads(s3.filesystem().cat_file(f"{BUCKET}/block-test/probe.json")) == {"ok": True}
