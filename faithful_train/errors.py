"""User-facing errors: bad config, bad names. The CLI prints them as one line and exits 2."""

from __future__ import annotations

from collections.abc import Iterable


def first_line(error: BaseException | str, limit: int = 200) -> str:
    """The first line of an exception's message (a library's multi-line error folded into ours)."""
    return (str(error).strip().splitlines() or [type(error).__name__])[0][:limit]


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


class TrainingDiverged(FaithfulError):
    """A non-finite loss, objective term or weight: the run stops (the CLI exits 3) and no
    non-finite checkpoint is written."""


def note(message: str) -> None:
    """One line for the user on stderr (``faithful-train: note: ...``), from rank zero only."""
    import os
    import sys

    if os.environ.get("LOCAL_RANK", "0") == "0" and os.environ.get("NODE_RANK", "0") == "0":
        print(f"faithful-train: note: {message}", file=sys.stderr)
