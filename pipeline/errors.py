"""Typed errors. Library code raises these; only the CLI turns them into exit codes."""

from __future__ import annotations


class BadInputError(Exception):
    """The user's input (config, model, data, store) cannot work. The CLI exits 2 with the message."""


class ConfigError(BadInputError):
    """A config file or a --set override is malformed."""


class PreflightError(BadInputError):
    """Every problem preflight found, reported at once."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        listed = "\n".join(f"  {i}. {p}" for i, p in enumerate(self.problems, 1))
        super().__init__(f"preflight found {len(self.problems)} problem(s); nothing was written:\n{listed}")


class StageCheckError(RuntimeError):
    """A stage produced output that failed its own check (e.g. merged logits drifted from the adapter's)."""
