"""A store on a disk too small for the run: a real tmpfs of a few hundred KiB mounted for the test. A stage that knows
its size is refused before writing; a write that runs out of space anyway ends as one sentence. Either way exit 1,
no traceback, finished stages kept, no partial folder left behind."""

import json
import subprocess
from pathlib import Path

import pytest

from tests.conftest import run_cli

pytestmark = pytest.mark.slow


@pytest.fixture
def small_disk(tmp_path):
    """Mount a tmpfs of the requested size at a fresh folder; unmounted at the end. Needs root (CI runs as root)."""
    mounted = []

    def mount(size: str) -> Path:
        point = tmp_path / f"disk-{size}"
        point.mkdir()
        result = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(point)],
                                capture_output=True, text=True)
        if result.returncode:
            pytest.skip(f"cannot mount a tmpfs here (needs root): {result.stderr.strip()}")
        mounted.append(point)
        return point

    yield mount
    for point in mounted:
        subprocess.run(["umount", str(point)], check=False)


def leftovers(store: Path) -> list[Path]:
    return [p for p in store.rglob(".*") if ".partial-" in p.name or ".old-" in p.name]


def test_a_merge_that_cannot_fit_is_refused_with_the_numbers(small_disk):
    store = small_disk("1400k")  # data and adapter fit; the tiny model's 1.3 MiB merged weights do not
    result = run_cli("--config", "smoke", "--store", str(store), "--set", "training.save_steps=1000")
    assert result.returncode == 1, result.stderr[-3000:]
    error = result.stderr.split("error: ", 1)[1]
    assert error.startswith(f"the run failed in merge: StoreFull: merge writes about 1.3 MiB to {store / 'smoke'}, "
                            "but that disk has ")
    assert "MiB free; free space there, or point store.uri" in error and "Traceback" not in error
    run = json.loads((store / "smoke" / "run.json").read_text())
    assert run["status"] == "failed" and run["failed_stage"] == "merge" and list(run["stages"]) == ["data", "finetune"]
    assert (store / "smoke" / "finetune" / "manifest.json").is_file() and not (store / "smoke" / "merge").exists()
    assert leftovers(store) == []


def test_running_out_of_space_mid_write_is_one_sentence_and_leaves_nothing_partial(small_disk):
    store = small_disk("256k")  # the data fits; the first fine-tune checkpoint does not
    result = run_cli("--config", "smoke", "--store", str(store), "--set", "training.save_steps=5",
                     "--set", "training.max_steps=10")
    assert result.returncode == 1, result.stderr[-3000:]
    error = result.stderr.split("error: ", 1)[1].strip().splitlines()[0]
    assert error.startswith(f"the run failed in finetune: StoreFull: the disk of {store / 'smoke'}/.work/finetune-")
    assert "ran out of space while finetune was writing " in error and "/checkpoint-5 (" in error
    assert "left); free space there, or point store.uri" in error and "shutil.Error" not in result.stderr
    assert leftovers(store) == []
    assert not list(store.glob("smoke/.work/*/checkpoint-*")), "no half-copied checkpoint is published"
    assert json.loads((store / "smoke" / "run.json").read_text())["failed_stage"] == "finetune"
