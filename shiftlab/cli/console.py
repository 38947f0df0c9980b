"""How the CLI talks to a person: one-line errors and warnings, exit codes, signals.

Exit codes: 0 done, 1 runtime failure, 2 usage error, 130 Ctrl-C, 143 SIGTERM. Nothing here
measures or writes results.
"""
from __future__ import annotations

import os
import signal
import sys
import warnings
from contextlib import contextmanager
from typing import Iterator

import click

from .. import config
from ..errors import ShiftlabError, one_line

EXIT_INTERRUPTED = 130
EXIT_TERMINATED = 143


class Terminated(BaseException):
    """SIGTERM, raised in the main thread so that cleanup runs as for Ctrl-C."""


def _on_sigterm(signum, frame) -> None:  # noqa: ANN001
    raise Terminated()


def warn_line(message: object) -> None:
    """One ``warning: ...`` line on stderr (shown also under --quiet)."""
    click.echo(f"warning: {' '.join(str(message).split())}", err=True)


class _OncePerCommand:
    """``warnings.showwarning`` for one command: each distinct warning one line, once (the
    same model loaded twice, under ``--padding both`` or ``compare``, warns once), in the
    command line's words where the warning has them (``cli_text``)."""

    def __init__(self) -> None:
        self.shown: set[str] = set()

    def __call__(self, message, category, filename, lineno, file=None, line=None) -> None:  # noqa: ANN001
        text = message.cli_text() if hasattr(message, "cli_text") else str(message)
        if text not in self.shown:
            self.shown.add(text)
            warn_line(text)


@contextmanager
def user_errors() -> Iterator[None]:
    """Turn every failure into one line and an exit code; a traceback only with SHIFTLAB_DEBUG.

    Warnings become one ``warning:`` line each; SIGTERM is handled like Ctrl-C (outputs are
    moved into place only when all are written, so neither changes the output folder).
    """
    previous = signal.getsignal(signal.SIGTERM)
    in_main = _is_main_thread()
    if in_main:
        signal.signal(signal.SIGTERM, _on_sigterm)
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.filterwarnings("ignore", message=r".*TypedStorage is deprecated.*")
        warnings.showwarning = _OncePerCommand()
        try:
            yield
        except ShiftlabError as exc:
            # our own messages name the fix, sometimes on a second line: keep every line
            click.echo(f"error: {' '.join(str(exc).split()) or type(exc).__name__}", err=True)
            sys.exit(exc.exit_code)
        except KeyboardInterrupt:
            click.echo("interrupted: the output folder was not changed by this run (outputs are"
                       " moved into place only when all are written)", err=True)
            sys.exit(EXIT_INTERRUPTED)
        except Terminated:
            click.echo("terminated (SIGTERM): the output folder was not changed by this run",
                       err=True)
            sys.exit(EXIT_TERMINATED)
        except (click.exceptions.Exit, SystemExit):
            raise
        except Exception as exc:  # noqa: BLE001
            if is_out_of_memory(exc):
                click.echo("error: out of memory; lower --batch-size or --size", err=True)
                sys.exit(1)
            _unexpected(exc)
        finally:
            if in_main:
                signal.signal(signal.SIGTERM, previous)


def _is_main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def is_out_of_memory(exc: BaseException) -> bool:
    """CUDA's OutOfMemoryError, Python's MemoryError, or the CPU allocator's RuntimeError."""
    import torch

    if isinstance(exc, (MemoryError, torch.OutOfMemoryError)):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and ("DefaultCPUAllocator: can't allocate memory" in text
                                              or "not enough memory" in text)


def _unexpected(exc: BaseException) -> None:
    try:
        debug = config.debug()
    except ShiftlabError as bad:  # a malformed SHIFTLAB_DEBUG must not hide the real error
        warn_line(bad)
        debug = False
    if debug:
        raise exc
    click.echo(f"error: {type(exc).__name__}: {one_line(exc)} (set SHIFTLAB_DEBUG=1 for a"
               " traceback and please report it)", err=True)
    sys.exit(1)


def import_matplotlib() -> None:
    """Import matplotlib with an invalid MPLBACKEND set aside: matplotlib raises a ValueError on
    import for one, before any command could report it. ``check_matplotlib_backend`` then
    reports it as one line; a valid one is applied as matplotlib would have."""
    backend = os.environ.get("MPLBACKEND")
    if not backend or "matplotlib" in sys.modules:
        return
    del os.environ["MPLBACKEND"]
    try:
        import matplotlib
    finally:
        os.environ["MPLBACKEND"] = backend
    try:
        matplotlib.rcParams["backend"] = backend
    except ValueError:
        pass  # reported by check_matplotlib_backend when a command runs


def check_matplotlib_backend() -> None:
    """An invalid MPLBACKEND gives one line naming the fix, before any work is done."""
    backend = os.environ.get("MPLBACKEND")
    if not backend:
        return
    import matplotlib

    try:
        matplotlib.use(backend)
    except Exception as exc:  # noqa: BLE001  (ValueError or ImportError, by version)
        raise ShiftlabError(f"MPLBACKEND={backend!r} is not a usable matplotlib backend"
                            f" ({one_line(exc)}); unset it or use MPLBACKEND=Agg") from exc


class Group(click.Group):
    """A click group whose usage errors are one line (``error: ... (see 'shiftlab X --help')``)
    with exit code 2, instead of click's usage block."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):  # noqa: ANN001
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode, **extra)
        try:
            code = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except click.exceptions.NoArgsIsHelpError as exc:
            click.echo(exc.ctx.get_help() if exc.ctx else str(exc))
            sys.exit(0)
        except click.ClickException as exc:
            context = getattr(exc, "ctx", None)
            where = f" (see '{context.command_path} --help')" if context is not None else ""
            click.echo(f"error: {one_line(exc.format_message())}{where}", err=True)
            sys.exit(exc.exit_code)
        except click.Abort:
            click.echo("interrupted", err=True)
            sys.exit(EXIT_INTERRUPTED)
        sys.exit(code if isinstance(code, int) else 0)
