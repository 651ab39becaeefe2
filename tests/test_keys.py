"""Stage keys by one rule: the code of every project module a stage imports, docstrings and comments left out."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.keys import PLUMBING, code_modules
from tests.conftest import ROOT

STAGE_MODULES = ["tasks.data", "tasks.finetune", "tasks.merge", "tasks.quantize", "tasks.evaluate", "tasks.release"]


def test_every_stage_counts_the_modules_that_shape_its_output():
    modules = {stage: code_modules(stage) for stage in STAGE_MODULES}
    for stage in ("tasks.finetune", "tasks.merge", "tasks.quantize", "tasks.evaluate"):
        assert "pipeline.data" in modules[stage], f"{stage} tokenizes data with pipeline.data"
    assert "pipeline.report" in modules["tasks.evaluate"] and "pipeline.report" in modules["tasks.release"]
    assert "pipeline.gguf_base" in modules["tasks.finetune"]  # how a GGUF base is dequantized shapes the weights
    assert not PLUMBING & {m for found in modules.values() for m in found}


@pytest.fixture
def project_copy(tmp_path) -> Path:
    for package in ("pipeline", "tasks"):
        shutil.copytree(ROOT / package, tmp_path / package, ignore=shutil.ignore_patterns("__pycache__"))
    return tmp_path


def versions(root: Path) -> dict[str, str]:
    """Each stage's code version, computed from the project copy at `root`."""
    script = ("import json; from pipeline.keys import code_version; "
              f"print(json.dumps({{m: code_version(m) for m in {STAGE_MODULES!r}}}))")
    result = subprocess.run([sys.executable, "-c", script], cwd=root, capture_output=True, text=True, timeout=120,
                            env={})
    assert result.returncode == 0, result.stderr[-2000:]
    import json

    return json.loads(result.stdout.strip().splitlines()[-1])


def edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text, f"{old!r} not in {path}"
    path.write_text(text.replace(old, new, 1))


def test_comment_and_docstring_edits_reuse_every_stage(project_copy):
    before = versions(project_copy)
    edit(project_copy / "tasks" / "finetune.py", '    """Train a LoRA adapter', '    # a comment\n    """Train the LoRA adapter')
    edit(project_copy / "pipeline" / "data.py", "IGNORE_INDEX = -100", "IGNORE_INDEX = -100  # ignored by the loss")
    assert versions(project_copy) == before


def test_a_change_to_data_rendering_invalidates_every_stage_that_tokenizes(project_copy):
    before = versions(project_copy)
    edit(project_copy / "pipeline" / "data.py", "        return row[\"prompt\"] + row[\"completion\"]",
         "        return row[\"prompt\"] + \" \" + row[\"completion\"]")
    after = versions(project_copy)
    changed = {m for m in STAGE_MODULES if after[m] != before[m]}
    assert changed == {"tasks.data", "tasks.finetune", "tasks.merge", "tasks.quantize", "tasks.evaluate"}


def test_a_report_change_invalidates_evaluate_and_release_only(project_copy):
    before = versions(project_copy)
    edit(project_copy / "pipeline" / "report.py", '"| model | perplexity', '"| Model | perplexity')
    after = versions(project_copy)
    assert {m for m in STAGE_MODULES if after[m] != before[m]} == {"tasks.evaluate", "tasks.release"}
