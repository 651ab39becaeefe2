"""The reference pages that mirror code are generated from it and committed up to date; the README stays short."""

import subprocess
import sys

from pydantic import BaseModel

from pipeline.config import PipelineConfig
from tests.conftest import ROOT


def test_generated_pages_match_the_code():
    result = subprocess.run([sys.executable, "docs/generate.py", "--check"], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_every_config_field_is_described_and_in_the_reference():
    page = (ROOT / "docs" / "configuration.md").read_text()

    def fields(model: type[BaseModel], prefix: str = ""):
        for name, field in model.model_fields.items():
            if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
                yield from fields(field.annotation, f"{prefix}{name}.")
            else:
                yield f"{prefix}{name}", field

    for key, field in fields(PipelineConfig):
        assert field.description, f"{key} has no description for docs/configuration.md"
        assert f"| `{key}` |" in page
    for key in ("training.weight_decay", "training.gradient_checkpointing", "quantization.smoke_prompt"):
        assert f"| `{key}` |" in page


def test_readme_is_a_first_page_and_its_links_resolve():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 200
    import re

    for target in re.findall(r"\]\(((?:docs|benchmarks|conf|docker)/[^)#]+)", readme):
        assert (ROOT / target).exists(), f"README links to missing {target}"
