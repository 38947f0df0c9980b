"""The command line: click commands (``commands``), their options (``options``), what each
command does once parsed (``jobs``), the files of a run's folder (``reports``), and the
console (one-line errors, warnings, exit codes)."""
from .commands import main

__all__ = ["main"]
