"""Errors that mean "bad input": the CLI prints them and exits with status 2."""

from __future__ import annotations


class PeftbenchError(Exception):
    """Base class for user-facing errors (bad config, data or plugin). Exit status 2."""

    exit_code = 2


class ConfigError(PeftbenchError):
    """A config file or ``--set`` override is invalid. The message names the file, line and key path."""


class DataError(PeftbenchError):
    """Task data is missing or malformed. The message names the file and line."""


class PluginError(PeftbenchError):
    """A plugin failed to load, or a name refers to no registered plugin."""


class BudgetError(PeftbenchError):
    """A method cannot meet the trainable-parameter budget within the tolerance."""
