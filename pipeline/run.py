"""The run context: what every stage is given, built once per run by the flow (or by a test, a benchmark, a script)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from pipeline.config import PipelineConfig
from pipeline.errors import BadInputError
from pipeline.store import Store, open_store

# The stages a run can be told to recompute (`--force`), in pipeline order; release always follows evaluate.
STAGES = ("data", "finetune", "merge", "quantize", "serve", "evaluate")


@dataclass(frozen=True)
class RunContext:
    """The run's config, its opened store, and the stages to recompute even where the store holds them.

    Each stage reads its own config section from `cfg` (`run.cfg.training`, `run.cfg.quantization`, ...).
    """

    cfg: PipelineConfig
    store: Store
    force: frozenset[str] = frozenset()

    @property
    def name(self) -> str:
        """The run's folder in the store."""
        return self.cfg.run_name


def open_run(cfg: PipelineConfig, force: Iterable[str] = ()) -> RunContext:
    """Open the config's store and check the stage names to force."""
    force = frozenset(force)
    if unknown := force - set(STAGES):
        raise BadInputError(f"force names unknown stage(s) {sorted(unknown)}; choose from {list(STAGES)}")
    return RunContext(cfg, open_store(cfg.store.uri, cfg.store.credentials_block), force)
