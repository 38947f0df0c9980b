"""The ``shiftlab`` command's entry point: the command line's imports (torch, matplotlib) take
seconds, and a Ctrl-C among them ends the program with one line and exit code 130, as it does
once the command runs, instead of a traceback from inside an import."""
from __future__ import annotations

import os
import sys


def main() -> None:
    """Import the command line, then run it (``shiftlab ...``, ``python -m shiftlab ...``)."""
    try:
        from .cli.commands import main as command
    except KeyboardInterrupt:
        sys.stderr.write("shiftlab: interrupted while starting (Ctrl-C); nothing was written\n")
        sys.stderr.flush()
        # Not sys.exit: an import interrupted inside an embedded interpreter call leaves CPython
        # flagged to re-raise SIGINT at exit (status -2 instead of 130); nothing needs cleanup yet.
        os._exit(130)
    command()
