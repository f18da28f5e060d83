"""User-facing errors: bad config, bad names. The CLI prints them as one line and exits 2."""

from __future__ import annotations

from collections.abc import Iterable


class FaithfulError(Exception):
    """An error the user can fix from the config or command line (never a bug)."""


class ConfigError(FaithfulError):
    """A config key, value or type that is not allowed."""


class DataError(FaithfulError):
    """A data file, row or column that cannot be used (the message names file, row and column)."""


class UnknownNameError(FaithfulError, KeyError):
    """A name (site, objective, audit, task, variable...) that is not one of the valid ones."""

    def __init__(self, kind: str, name: object, valid: Iterable[object]):
        self.kind, self.name, self.valid = kind, name, sorted(str(v) for v in valid)
        super().__init__(f"unknown {kind} {name!r}; valid: {', '.join(self.valid) or '(none)'}")

    def __str__(self) -> str:  # KeyError would otherwise quote the message
        return self.args[0]
