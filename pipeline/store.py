"""The artifact store: a local folder or any fsspec URL (`s3://bucket/prefix` on AWS, MinIO, SeaweedFS, Ceph).

Layout: `<store>/<run-name>/<stage>/` holds a stage's files and its `manifest.json`, written last. A stage is
visible only once its manifest exists; readers ignore folders without one. Locally a stage is staged in a hidden
sibling folder and moved into place with one rename; on object storage the old manifest is removed first (the
stage turns invisible), the files are uploaded, then the manifest. `<store>/index/<stage>/<key>.json` points at
the stage that holds a key, so any run on any machine that sees the store can reuse it.

Credentials never pass through here as values: s3fs reads them from the environment (AWS_ACCESS_KEY_ID,
AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL) or, with `store.credentials_block`, from a Prefect Secret block.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import re
import shutil
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, TypeVar

import fsspec
from fsspec.implementations.local import LocalFileSystem

from pipeline.cache import cache_root
from pipeline.errors import BadInputError

logger = logging.getLogger(__name__)

MANIFEST = "manifest.json"
RUN_SUMMARY = "run.json"
VERSIONED = ("torch", "transformers", "peft", "accelerate", "datasets", "safetensors", "gptqmodel", "optimum",
             "prefect", "fsspec", "s3fs")
S3_CLIENT = {"connect_timeout": 5, "read_timeout": 60, "retries": {"max_attempts": 3, "mode": "standard"}}
T = TypeVar("T")


class StoreError(BadInputError):
    """The store is misconfigured (bad URI, unknown credentials block): the user must fix the config."""


class StoreUnavailable(RuntimeError):
    """The store stopped answering mid-operation, after bounded retries."""


class StoreFull(RuntimeError):
    """The disk a stage writes to (the store's, or this machine's cache for a remote store) has no room left."""


DISK_FULL = {errno.ENOSPC, errno.EDQUOT}


@dataclass(frozen=True)
class Store:
    """An fsspec filesystem and the store's root path in it. Holds no credentials of its own."""

    uri: str
    fs: Any
    root: str

    @property
    def is_local(self) -> bool:
        return isinstance(self.fs, LocalFileSystem)

    def path(self, *parts: str) -> str:
        return "/".join([self.root.rstrip("/"), *parts])

    def url(self, path: str) -> str:
        """A path in this store as users write it: a local path, or `s3://bucket/...`."""
        return path if self.is_local else self.fs.unstrip_protocol(path)


def open_store(uri: str, credentials_block: str | None = None) -> Store:
    """Open `uri` (a local path, `file://`, `s3://`, or any fsspec protocol)."""
    protocol, _, rest = uri.partition("://")
    if _ and "@" in rest.split("/", 1)[0]:
        raise StoreError(f"store URI {redact(uri)!r} embeds credentials; remove them and set AWS_ACCESS_KEY_ID/"
                         "AWS_SECRET_ACCESS_KEY in the environment or store.credentials_block instead")
    options: dict[str, Any] = {}
    if protocol == "s3" and _:
        # A fresh client per open, without listing caches: other processes and machines write this store too.
        options = {"config_kwargs": S3_CLIENT, "skip_instance_cache": True, "use_listings_cache": False,
                   **_block_options(credentials_block)}
    try:
        fs, root = fsspec.core.url_to_fs(uri, **options)
    except (ImportError, ValueError) as exc:
        raise StoreError(f"cannot open store {uri!r}: {exc}. Local paths and s3:// are supported "
                         "(s3 needs s3fs, installed with this project)") from exc
    return Store(uri=uri, fs=fs, root=root.rstrip("/") or root)


def _block_options(block_name: str | None) -> dict[str, Any]:
    """s3fs options from a Prefect Secret block holding {"key", "secret", "endpoint_url"?, "region"?} as JSON."""
    if not block_name:
        return {}
    from prefect.blocks.system import Secret

    try:
        value = Secret.load(block_name).get()
    except ValueError as exc:
        raise StoreError(f"store.credentials_block {block_name!r} cannot be loaded ({exc}); create it with "
                         "prefect.blocks.system.Secret(value={...}).save(name)") from exc
    value = json.loads(value) if isinstance(value, str) else value
    client = {k: value[k] for k in ("endpoint_url",) if value.get(k)}
    if value.get("region"):
        client["region_name"] = value["region"]
    return {"key": value.get("key"), "secret": value.get("secret"), "client_kwargs": client}


USERINFO = re.compile(r"([a-zA-Z][a-zA-Z0-9+.-]*://)[^/\s@\"]+@")  # scheme://user:password@


def redact(text: str) -> str:
    """`text` with every URL's user and password replaced by ***: a URI, or a value that may hold one."""
    return USERINFO.sub(r"\1***@", text)


def _transient_errors() -> tuple[type[BaseException], ...]:
    """Connection-level failures worth a retry: the OS's, and botocore's/aiohttp's own families (not OSError)."""
    errors: list[type[BaseException]] = [ConnectionError, TimeoutError, OSError]
    try:
        from botocore.exceptions import ConnectionError as BotoConnectionError
        errors.append(BotoConnectionError)
    except ImportError:
        pass
    try:
        from aiohttp import ClientConnectionError
        errors.append(ClientConnectionError)
    except ImportError:
        pass
    return tuple(errors)


def retrying(what: str, call: Callable[[], T], attempts: int = 3, wait: float = 1.0) -> T:
    """Run a store operation, retrying connection failures a bounded number of times, then a clear StoreError."""
    transient = _transient_errors()
    for attempt in range(1, attempts + 1):
        try:
            return call()
        except transient as exc:
            if isinstance(exc, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)):
                raise
            if attempt == attempts:
                raise StoreUnavailable(f"{what} failed after {attempts} attempts: {type(exc).__name__}: "
                                 f"{str(exc)[:300]}. Check that the store is reachable and retry") from exc
            logger.warning("%s failed (%s), retry %d/%d in %.0f s", what, type(exc).__name__, attempt, attempts - 1, wait)
            time.sleep(wait)
            wait *= 2
    raise AssertionError("unreachable")


def free_bytes(path: str | Path) -> int:
    """Free bytes on the disk that holds `path` (or its nearest existing parent)."""
    existing = Path(path)
    while not existing.exists():
        existing = existing.parent
    return shutil.disk_usage(existing).free


def size_text(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def check_room(what: str, where: Path, needed: int) -> None:
    """Refuse, before writing, when the disk holding `where` has less than `needed` bytes free."""
    free = free_bytes(where)
    if free < needed:
        raise StoreFull(f"{what} writes about {size_text(needed)} to {where.parent}, but that disk has "
                        f"{size_text(free)} free; free space there, or point store.uri (for a remote store "
                        "FTQ_CACHE_DIR) at a larger disk")


@contextmanager
def disk_full_as_one_sentence(what: str, destination: str, where: Path) -> Iterator[None]:
    """A write that fails for want of space (ENOSPC, a quota: also inside shutil.copytree's error list) becomes one
    StoreFull sentence: what was being written, to which destination, and the free space on the disk of `where`
    (the folder being written: the store's own disk, or this machine's cache for a remote store)."""
    try:
        yield
    except (OSError, shutil.Error) as exc:
        causes = exc.args[0] if isinstance(exc, shutil.Error) and isinstance(exc.args[0], list) else [exc]
        full = [c for c in causes if (isinstance(c, OSError) and c.errno in DISK_FULL)
                or (isinstance(c, tuple) and any(f"[Errno {n}]" in str(c[-1]) for n in DISK_FULL))]
        if not full:
            raise
        # the file that did not fit names the full disk: the store's, or this machine's cache (checkpoints, scratch)
        failed = full[0].filename if isinstance(full[0], OSError) else full[0][1]
        failed = Path(os.fsdecode(failed)) if failed else None
        folder = where.parent if failed is None or failed.is_relative_to(where) else failed.parent
        raise StoreFull(f"the disk of {folder} ran out of space while {what} was writing {destination} "
                        f"({size_text(free_bytes(folder))} left); free space there, or point store.uri (for a remote "
                        "store FTQ_CACHE_DIR) at a larger disk") from None


def check_store(store: Store) -> list[str]:
    """Problems that stop a run from writing to the store. Locally nothing is created; remotely one probe
    object is written and removed (object stores grant write access only on write)."""
    if store.is_local:
        existing = Path(store.root)
        while not existing.exists():
            existing = existing.parent
        if not existing.is_dir():
            return [f"store {store.uri!r}: {existing} is a file, not a directory; choose another store.uri"]
        if not os.access(existing, os.W_OK | os.X_OK):
            return [f"store {store.uri!r}: {existing} is not writable by this user; "
                    "choose another store.uri or fix permissions"]
        return []
    probe = store.path(".ftq-probe", uuid.uuid4().hex)
    try:
        retrying(f"writing a probe to store {store.uri}", lambda: store.fs.pipe(probe, b""))
        store.fs.rm(probe)
    except PermissionError as exc:
        return [f"store {store.uri!r} is not writable with the configured credentials ({str(exc)[:200]}); "
                "check AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or store.credentials_block"]
    except FileNotFoundError as exc:
        return [f"store {store.uri!r}: bucket not found ({str(exc)[:200]}); create it or fix store.uri"]
    except StoreUnavailable as exc:
        return [f"store {store.uri!r} is unreachable: {exc}"]
    except Exception as exc:  # botocore raises its own types for DNS, TLS, signature problems
        return [f"store {store.uri!r} cannot be written: {type(exc).__name__}: {str(exc)[:200]}"]
    return []


# --- manifests ---------------------------------------------------------------------------------------

def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def describe_files(root: Path) -> dict[str, dict[str, Any]]:
    """{relative path: {sha256, size}} of every file under a local folder except the manifest."""
    return {
        p.relative_to(root).as_posix(): {"sha256": sha256_file(p), "size": p.stat().st_size}
        for p in sorted(Path(root).rglob("*")) if p.is_file() and p.name != MANIFEST
    }


def library_versions() -> dict[str, str]:
    versions = {}
    for name in VERSIONED:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def read_json(store: Store, path: str) -> dict[str, Any] | None:
    try:
        raw = retrying(f"reading {store.url(path)}", lambda: store.fs.cat_file(path))
    except FileNotFoundError:
        return None
    return json.loads(raw)


def write_json(store: Store, path: str, payload: dict[str, Any], sort_keys: bool = True) -> None:
    """Write JSON in one step: a local rename, or one PUT (atomic on object stores)."""
    data = (json.dumps(payload, indent=2, sort_keys=sort_keys, default=str) + "\n").encode()
    if store.is_local:
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex[:8]}")
        tmp.write_bytes(data)
        os.replace(tmp, target)
    else:
        retrying(f"writing {store.url(path)}", lambda: store.fs.pipe_file(path, data))


def read_manifest(store: Store, stage_path: str) -> dict[str, Any] | None:
    return read_json(store, f"{stage_path}/{MANIFEST}")


def verify_local(folder: Path, manifest: dict[str, Any]) -> str | None:
    """Why the local copy of a stage does not match its manifest, or None."""
    for rel, info in manifest["files"].items():
        path = folder / rel
        if not path.is_file():
            return f"{rel} is missing"
        if path.stat().st_size != info["size"] or sha256_file(path) != info["sha256"]:
            return f"{rel} fails its checksum"
    return None


# --- stages -----------------------------------------------------------------------------------------------------

def find_reusable(store: Store, stage_path: str, key: str) -> dict[str, Any] | None:
    """The manifest of a complete stage at stage_path with this key whose files match their checksums."""
    manifest = read_manifest(store, stage_path)
    if manifest is None:
        return None
    if manifest.get("key") != key:
        logger.info("%s holds another %s (key %s..., want %s...)", store.url(stage_path), manifest.get("stage"),
                    str(manifest.get("key"))[:12], key[:12])
        return None
    try:
        materialize(store, stage_path, manifest)
    except StageCorrupt as exc:
        logger.warning("%s: %s; treating the stage as missing and recomputing it", store.url(stage_path), exc)
        return None
    return manifest


class StageCorrupt(Exception):
    """A stage's files do not match its manifest."""


def materialize(store: Store, stage_path: str, manifest: dict[str, Any]) -> Path:
    """A local folder with the stage's verified files: the store folder itself, or a download cached by key."""
    if store.is_local:
        folder = Path(stage_path)
        if problem := verify_local(folder, manifest):
            raise StageCorrupt(problem)
        return folder
    cached = _local_cache_of(manifest)
    if (cached / MANIFEST).is_file() and json.loads((cached / MANIFEST).read_text()) == manifest \
            and verify_local(cached, manifest) is None:
        return cached
    tmp = cached.with_name(f".{cached.name}.{uuid.uuid4().hex[:8]}")
    try:
        for rel in manifest["files"]:
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            retrying(f"downloading {rel}", lambda rel=rel: store.fs.get_file(f"{stage_path}/{rel}", str(tmp / rel)))
        if problem := verify_local(tmp, manifest):
            raise StageCorrupt(problem)
        (tmp / MANIFEST).write_text(json.dumps(manifest))
        shutil.rmtree(cached, ignore_errors=True)
        tmp.rename(cached)
    except FileNotFoundError as exc:
        raise StageCorrupt(f"a file listed in the manifest is missing ({exc})") from exc
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return cached


def _local_cache_of(manifest: dict[str, Any]) -> Path:
    """Where this machine keeps its verified copy of a remote stage."""
    return cache_root() / "stages" / f"{manifest['stage']}-{manifest['key'][:32]}"


def new_scratch(store: Store, stage_path: str) -> Path:
    """A fresh local folder to build a stage in: beside the stage for a local store (so publishing is one
    rename), in the local cache for a remote one."""
    if store.is_local:
        target = Path(stage_path)
        scratch = target.parent / f".{target.name}.partial-{uuid.uuid4().hex[:8]}"
    else:
        scratch = cache_root() / "scratch" / uuid.uuid4().hex
    scratch.mkdir(parents=True)
    return scratch


def publish(store: Store, scratch: Path, stage_path: str, manifest: dict[str, Any]) -> dict[str, Any]:
    """Make scratch's files the stage at stage_path, manifest last; return the manifest written."""
    manifest = {**manifest, "files": describe_files(scratch)}
    if store.is_local:
        (scratch / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True, default=str) + "\n")
        target, old = Path(stage_path), None
        if target.exists():
            old = target.with_name(f".{target.name}.old-{uuid.uuid4().hex[:8]}")
            target.rename(old)
        scratch.rename(target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    else:
        # Retire an older stage here: its manifest goes first, so no reader ever sees it half replaced.
        old_manifest = f"{stage_path}/{MANIFEST}"
        if retrying("checking the stage", lambda: store.fs.exists(old_manifest)):
            retrying(f"retiring {store.url(stage_path)}", lambda: store.fs.rm_file(old_manifest))
        if retrying("checking the stage", lambda: store.fs.exists(stage_path)):
            retrying(f"retiring {store.url(stage_path)}", lambda: store.fs.rm(stage_path, recursive=True))
        for rel in manifest["files"]:
            retrying(f"uploading {rel}", lambda rel=rel: store.fs.put_file(str(scratch / rel), f"{stage_path}/{rel}"))
        write_json(store, f"{stage_path}/{MANIFEST}", manifest)
        # Keep the built copy as the local cache of this key, so the next stage does not download it again.
        (scratch / MANIFEST).write_text(json.dumps(manifest))
        cached = _local_cache_of(manifest)
        shutil.rmtree(cached, ignore_errors=True)
        cached.parent.mkdir(parents=True, exist_ok=True)
        scratch.rename(cached)
    logger.info("published %s (%d files)", store.url(stage_path), len(manifest["files"]))
    return manifest


def remove_leftovers(store: Store, stage_path: str) -> None:
    """Once a stage is published, the scratch (`new_scratch`) and retired (`publish`) copies of it that killed runs
    left beside it go. On object storage a stage is never staged beside itself."""
    if not store.is_local:
        return
    target = Path(stage_path)
    for leftover in [*target.parent.glob(f".{target.name}.partial-*"), *target.parent.glob(f".{target.name}.old-*")]:
        logger.info("removing %s, left by an interrupted run", leftover)
        shutil.rmtree(leftover, ignore_errors=True)


def index_path(store: Store, stage: str, key: str) -> str:
    return store.path("index", stage, f"{key}.json")
