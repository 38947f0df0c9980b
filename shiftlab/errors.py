"""User-facing errors. The CLI turns each into one line on stderr and an exit code."""
from __future__ import annotations


class ShiftlabError(Exception):
    """Base class for errors caused by user input or environment; ``exit_code`` is the CLI's."""

    exit_code: int = 1


class UsageError(ShiftlabError):
    """The request itself is wrong (bad option value, unknown name): exit code 2."""

    exit_code = 2


class ModelError(ShiftlabError):
    """A model cannot be built, loaded or run on the requested input."""


class WeightsError(ShiftlabError):
    """A weights spec or checkpoint file cannot be used."""


class ImageError(ShiftlabError):
    """Images cannot be found or read."""


class SettingsMismatchError(ShiftlabError):
    """Two results were measured with different settings and cannot be compared."""


def one_line(exc: object) -> str:
    """An exception (or any text) as one line: the first non-empty line, whitespace collapsed.

    The CLI prints every error this way; messages built from third-party exceptions use it so a
    multi-line torch or PIL message never spills over several lines.

    >>> one_line(ValueError("bad\\n  detail"))
    'bad'
    """
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    if not lines:
        return type(exc).__name__ if isinstance(exc, BaseException) else ""
    return " ".join(lines[0].split())
