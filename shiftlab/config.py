"""Every ``SHIFTLAB_*`` environment switch, read here and nowhere else, with one rule for on/off.

============================  ==========================================================
``SHIFTLAB_OFFLINE``          on/off: never try to download pretrained weights
``SHIFTLAB_DEBUG``            on/off: the CLI shows a traceback for an unexpected error
``SHIFTLAB_NATIVE``           on/off/``auto``: the compiled CPU kernel (on: required, a
                              failed build is an error; off: never; auto, the default: when
                              it builds)
``SHIFTLAB_CACHE_DIR``        a directory: where the compiled kernel is cached
============================  ==========================================================

On/off values (case and surrounding spaces ignored): ``1 true yes on`` and ``0 false no off``;
unset or empty is off (``auto`` for ``SHIFTLAB_NATIVE``). Anything else is a ``UsageError``
naming the variable: a misspelt switch must not silently mean "off".

A bottom-layer module: it imports the standard library and :mod:`shiftlab.errors` only, so any
module may read its settings through it.
"""
from __future__ import annotations

import os
from pathlib import Path

from .errors import UsageError

OFFLINE = "SHIFTLAB_OFFLINE"
DEBUG = "SHIFTLAB_DEBUG"
NATIVE = "SHIFTLAB_NATIVE"
CACHE_DIR = "SHIFTLAB_CACHE_DIR"

TRUE = ("1", "true", "yes", "on")
FALSE = ("0", "false", "no", "off")


def _value(name: str) -> str:
    return os.environ.get(name, "").strip().lower()


def flag(name: str) -> bool:
    """The on/off switch ``name``: True for 1/true/yes/on, False for 0/false/no/off, unset or
    empty; any other value is a UsageError naming the variable and the accepted values.

    >>> os.environ["SHIFTLAB_EXAMPLE"] = " Yes"
    >>> flag("SHIFTLAB_EXAMPLE")
    True
    >>> del os.environ["SHIFTLAB_EXAMPLE"]
    >>> flag("SHIFTLAB_EXAMPLE")
    False
    """
    value = _value(name)
    if value in TRUE:
        return True
    if value in FALSE or value == "":
        return False
    raise UsageError(f"{name}={value!r}: use one of {', '.join(TRUE)} (on) or "
                     f"{', '.join(FALSE)} (off), or leave it unset (off)")


def offline() -> bool:
    """``SHIFTLAB_OFFLINE``: never try to download weights."""
    return flag(OFFLINE)


def debug() -> bool:
    """``SHIFTLAB_DEBUG``: show tracebacks of unexpected errors."""
    return flag(DEBUG)


def native_mode() -> str:
    """``SHIFTLAB_NATIVE`` as 'on' (the compiled kernel is required), 'off' (never used) or
    'auto' (used when it builds; also unset or empty)."""
    value = _value(NATIVE)
    if value in ("", "auto"):
        return "auto"
    if value in TRUE:
        return "on"
    if value in FALSE:
        return "off"
    raise UsageError(f"{NATIVE}={value!r}: use 1 (require the compiled kernel), "
                     "0 (never use it) or auto")


def cache_dir() -> Path:
    """Where shiftlab caches what it builds: ``$SHIFTLAB_CACHE_DIR``, else
    ``$XDG_CACHE_HOME/shiftlab``, else ``~/.cache/shiftlab``."""
    chosen = os.environ.get(CACHE_DIR)
    if chosen:
        return Path(chosen)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "shiftlab"
