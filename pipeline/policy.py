"""What a triggered run may change: the deployment policy.

A run triggered from the Prefect UI (or `prefect deployment run`) is typed by whoever can open the UI, and runs on
the GPU worker with the worker's files, credentials and network. Its parameters (config, overrides, run name,
store, force) are therefore checked against a policy that only whoever deploys can set: the `policy:` of the
deployment's entry in the worker's own `prefect.yaml` (inline, or the path of a YAML file on the worker), never
the run's parameters. A deployment with no policy there gets `DeploymentPolicy()`, which is closed: data under the
checkout's data/, the config's own store, no remote code, no pickle, no package or GGUF sources, no --force.

The command line is not checked: whoever runs it already owns the machine.

Checks run in two steps, both before anything is downloaded, loaded or written: `check_request` on the raw
parameters (the config file's location before it is read, the override keys, --force), then `check_config` on the
loaded config (every local path it names, the store, the code-running switches). A file outside the allowed roots
is refused before it is opened, so no error can show its contents.
"""

from __future__ import annotations

import fnmatch
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from pipeline.config import CONF_DIR, PipelineConfig, StoreConfig, resolve_config_path
from pipeline.distributed import engine_config_path
from pipeline.errors import BadInputError
from pipeline.gguf_base import PYPI, is_gguf

logger = logging.getLogger(__name__)
CHECKOUT = CONF_DIR.parent  # the worker's checkout: prefect.yaml, conf/, data/
PREFECT_YAML = CHECKOUT / "prefect.yaml"
ALWAYS_SET = {"run_name"}  # a run's folder name is validated by the config itself; reusing one resumes that run
LOCAL_FILE_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet", ".gguf", ".yaml", ".yml")


class PolicyError(BadInputError):
    """A triggered run asked for something its deployment's policy does not allow; refused before any data or model
    was read and anything written."""


class DeploymentPolicy(BaseModel):
    """What a run triggered from a deployment may change. Relative paths are relative to the worker's checkout."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    overrides: list[str] = Field(
        default=["data.path", "data.eval_path"],
        description="Config keys a trigger may `--set`, as shell-style patterns (`training.*`, `data.path`). A config "
                    "file from outside conf/ counts as setting every key it holds.")
    roots: list[str] = Field(
        default=["data"], description="Folders that local data, model, calibration and config paths must lie in "
                                      "(symlinks resolved); the checkout's conf/ is always allowed for configs.")
    stores: list[str] = Field(
        default=[], description="Store URIs (a folder, or s3://bucket/prefix) a run may write to, besides the store "
                                "its config file names.")
    trust_remote_code: bool = Field(default=False, description="Allow model.trust_remote_code: true (runs the model "
                                                               "repository's Python code on the worker).")
    allow_pickle: bool = Field(default=False, description="Allow model.allow_pickle: true (pickle weights can run code).")
    package_sources: bool = Field(default=False, description="Allow `pypi:` sources (a wheel from the package index).")
    gguf: bool = Field(default=False, description="Allow a GGUF base (model.dequantize_gguf).")
    force: bool = Field(default=False, description="Allow --force (recompute finished stages).")


@dataclass(frozen=True)
class Policy:
    """A deployment's policy and where it came from (named in every refusal)."""

    rules: DeploymentPolicy
    source: str

    def refuse(self, problems: list[str]) -> None:
        if problems:
            listed = "\n".join(f"  {i}. {p}" for i, p in enumerate(problems, 1))
            raise PolicyError(f"the deployment policy ({self.source}) refused this run before it read data or a "
                              f"model or wrote anything:\n{listed}\nA triggered run can change only what the policy allows: ask whoever deploys "
                              f"to widen it in prefect.yaml, or run the pipeline from the command line on a machine "
                              f"you own.")


def deployment_policy(deployment: str, prefect_yaml: Path = PREFECT_YAML) -> Policy:
    """The policy of deployment `deployment` from the worker's prefect.yaml; the closed default if it has none."""
    policy = _read_policy(deployment, prefect_yaml)
    logger.info("deployment %s: the run's parameters are checked against the policy in %s", deployment, policy.source)
    return policy


def _read_policy(deployment: str, prefect_yaml: Path) -> Policy:
    entry = next((d for d in _deployments(prefect_yaml) if isinstance(d, dict) and d.get("name") == deployment), None)
    if entry is None or entry.get("policy") is None:
        return Policy(DeploymentPolicy(), f"the closed default: deployment {deployment!r} has no policy in "
                                          f"{prefect_yaml}")
    value, source = entry["policy"], f"{prefect_yaml}, deployment {deployment!r}"
    if isinstance(value, str):  # a YAML file on the worker, named in prefect.yaml
        path = _checkout_path(value)
        source = f"{path}, named by {source}"
        try:
            value = yaml.safe_load(path.read_text())
        except (OSError, yaml.YAMLError) as exc:
            raise PolicyError(f"the deployment policy {source} cannot be read: {exc}; fix the file or the `policy:` "
                              "entry (every triggered run is refused until then)") from exc
    try:
        return Policy(DeploymentPolicy.model_validate(value or {}), source)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        raise PolicyError(f"the deployment policy in {source} is not valid: {problems}; fields: "
                          f"{', '.join(DeploymentPolicy.model_fields)} (docs/operations.md)") from exc


def _deployments(prefect_yaml: Path) -> list[Any]:
    try:
        tree = yaml.safe_load(prefect_yaml.read_text()) or {}
    except FileNotFoundError:
        return []
    except yaml.YAMLError as exc:
        raise PolicyError(f"{prefect_yaml} is not valid YAML ({exc}): no deployment policy can be read from it") from exc
    return tree.get("deployments") or [] if isinstance(tree, dict) else []


def check_request(policy: Policy, config: str, overrides: list[str], force: list[str]) -> None:
    """The parameters as typed, before any file is read: where the config is, which keys are set, --force."""
    rules, problems = policy.rules, []
    if force and not rules.force:
        problems.append(f"force {list(force)}: recomputing finished stages is not allowed (policy `force: false`)")
    path = _config_path(config)
    outside_conf = not _inside(path, [CONF_DIR])
    if outside_conf and not _inside(path, _roots(rules)):
        problems.append(f"config {config!r}: a file outside conf/ and outside the allowed roots "
                        f"({', '.join(rules.roots) or 'none'}); use a config name in conf/ (policy `roots`)")
    keys = [assignment.partition("=")[0].strip() for assignment in overrides]
    problems += _keys_refused(rules, keys, "override")
    policy.refuse(problems)
    if outside_conf:  # inside a root (checked above): every key the file sets counts as set by the trigger
        try:
            tree = yaml.safe_load(path.read_text()) or {}
        except (OSError, yaml.YAMLError):
            return  # load_config reports it, with the file's own words (the file is inside a root)
        policy.refuse(_keys_refused(rules, _leaf_keys(tree), f"config {config!r} sets"))


def check_config(policy: Policy, cfg: PipelineConfig, config: str) -> None:
    """The loaded config (from the `config` parameter), before preflight reads anything: local paths in the roots,
    the store allowed, and no remote code, pickle, package or GGUF source the policy does not allow."""
    rules, problems = policy.rules, []
    roots = _roots(rules)
    sources = {"model.name_or_path": cfg.model.name_or_path, "data.path": cfg.data.path,
               "data.eval_path": cfg.data.eval_path}
    if cfg.quantization.calibration.source != "train":
        sources["quantization.calibration.source"] = cfg.quantization.calibration.source
    for engine in ("fsdp", "deepspeed"):
        if name := getattr(cfg.training, f"{engine}_config"):
            try:
                path = engine_config_path(engine, name)  # where training will read it: a path, or a name in conf/
            except FileNotFoundError:
                continue  # preflight says so
            if not _inside(path, [CONF_DIR]):
                sources[f"training.{engine}_config"] = name
    for key, value in sources.items():
        if value is None:
            continue
        if value.startswith(PYPI) and not rules.package_sources:
            problems.append(f"{key}={value!r}: `pypi:` sources are not allowed (policy `package_sources: false`)")
        if (path := _local_path(value)) is not None and not _inside(path, roots):
            problems.append(f"{key}={value!r} lies outside the allowed roots ({', '.join(rules.roots) or 'none'}); "
                            "put the file under one of them (policy `roots`)")
    if is_gguf(cfg.model.name_or_path) and not rules.gguf:
        problems.append(f"model.name_or_path={cfg.model.name_or_path!r}: a GGUF base is not allowed (policy "
                        "`gguf: false`)")
    if cfg.model.trust_remote_code and not rules.trust_remote_code:
        problems.append("model.trust_remote_code=true would run the model repository's own Python code on the worker "
                        "(policy `trust_remote_code: false`)")
    if cfg.model.allow_pickle and not rules.allow_pickle:
        problems.append("model.allow_pickle=true: pickle weights can run code when loaded (policy "
                        "`allow_pickle: false`)")
    allowed = list(dict.fromkeys([*_own_store(config), *rules.stores]))
    if not any(_store_within(cfg.store.uri, store) for store in allowed):
        problems.append(f"store {cfg.store.uri!r} is not an allowed store ({', '.join(allowed) or 'none'}); write "
                        "to one of them (policy `stores`)")
    policy.refuse(problems)


def _own_store(config: str) -> list[str]:
    """The store a config in conf/ names (the deployer's): allowed without being listed. None for other configs."""
    path = _config_path(config)
    if not _inside(path, [CONF_DIR]):
        return []
    tree = yaml.safe_load(path.read_text()) or {}
    return [(tree.get("store") or {}).get("uri") or StoreConfig().uri]


def _keys_refused(rules: DeploymentPolicy, keys: list[str], what: str) -> list[str]:
    refused = [k for k in keys if k not in ALWAYS_SET and not any(fnmatch.fnmatchcase(k, p) for p in rules.overrides)]
    allowed = ", ".join(rules.overrides) or "none"
    return [f"{what} {key!r}: not a key a triggered run may set (policy `overrides`: {allowed})" for key in refused]


def _leaf_keys(tree: Any, prefix: str = "") -> list[str]:
    if not isinstance(tree, dict) or not tree:
        return [prefix] if prefix else []
    return [key for name, value in tree.items() for key in _leaf_keys(value, f"{prefix}{name}" if not prefix
                                                                        else f"{prefix}.{name}")]


def _config_path(config: str) -> Path:
    """Where the config parameter points, without reading it: a name in conf/ or a path."""
    try:
        return resolve_config_path(config)
    except BadInputError:
        return Path(config)  # does not exist: the location check still applies; load_config says "not found"


def _local_path(value: str) -> Path | None:
    """The local file or folder `value` names, or None for a hub id or a `builtin:`/`pypi:` source."""
    if value.startswith(("builtin:", PYPI)):
        return None
    path = Path(value).expanduser()
    if path.is_absolute() or value.startswith((".", "~")) or path.exists() or path.suffix.lower() in LOCAL_FILE_SUFFIXES:
        return path
    return None


def _checkout_path(value: str) -> Path:
    path = Path(value).expanduser()
    return path if path.is_absolute() else CHECKOUT / path


def _roots(rules: DeploymentPolicy) -> list[Path]:
    return [_checkout_path(root) for root in rules.roots]


def _inside(path: Path, roots: list[Path]) -> bool:
    resolved = path.resolve()  # symlinks followed: data/x.jsonl -> /etc/passwd is outside data/
    return any(resolved.is_relative_to(root.resolve()) for root in roots)


def _store_within(uri: str, allowed: str) -> bool:
    if "://" in allowed or "://" in uri:
        if ".." in uri.split("://", 1)[-1].split("/"):
            return False  # an object store does not resolve `..`: refuse rather than guess which prefix it means
        return uri.rstrip("/") == allowed.rstrip("/") or uri.startswith(allowed.rstrip("/") + "/")
    return _inside(Path(uri).expanduser(), [_checkout_path(allowed)])
