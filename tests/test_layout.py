"""The codebase's shape: every stage is one function of the run context and its inputs, and nothing outside flows/
needs Prefect to import (stages run on a GPU machine, in a benchmark or a test without it)."""

import inspect
import subprocess
import sys

from pipeline.run import RunContext
from pipeline.stage import StageArtifact
from tasks.data import prepare_data
from tasks.evaluate import evaluate
from tasks.finetune import finetune
from tasks.merge import merge
from tasks.quantize import quantize
from tasks.release import release
from tasks.serve_check import serve_check
from tests.conftest import ROOT

STAGES = (prepare_data, finetune, merge, quantize, serve_check, evaluate, release)


def test_every_stage_takes_the_run_context_and_at_most_two_inputs():
    for stage in STAGES:
        hints = inspect.get_annotations(stage, eval_str=True)
        parameters = list(inspect.signature(stage).parameters)
        assert parameters[0] == "run" and hints["run"] is RunContext, stage.__name__
        assert len(parameters) <= 3, f"{stage.__name__}{inspect.signature(stage)}"
        assert hints["return"] is StageArtifact


def test_nothing_outside_flows_imports_prefect():
    modules = sorted(f"{p.parent.name}.{p.stem}" for folder in ("pipeline", "tasks") for p in (ROOT / folder).glob("*.py")
                     if p.stem != "__init__")
    script = ("import sys; sys.modules['prefect'] = None\n"  # any `import prefect` now raises ImportError
              + "".join(f"import {m}\n" for m in modules))
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]


def test_building_blocks_never_import_the_stages_or_the_flow():
    """pipeline/ is what tasks/ and flows/ are built on: an import the other way round makes the floors circular."""
    import ast

    upward = []
    for path in sorted((ROOT / "pipeline").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([alias.name for alias in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            upward += [f"{path.relative_to(ROOT)}:{node.lineno} imports {name}" for name in names
                       if name.split(".")[0] in ("tasks", "flows")]
    assert not upward, upward
