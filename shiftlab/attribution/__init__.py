"""Layer attribution: each layer call's share of the change of a model's output under a
continuous (band-limited) translation of its input, adding up exactly (docs/semantics.md,
section 10). :func:`attribute` measures, :class:`AttributionResult` holds the numbers,
:func:`layer_tangents` gives one batch's tangent vectors.

Names are imported on first use (PEP 562), as in ``shiftlab`` itself: the request module reads
the choice lists in ``settings`` without loading the engine.
"""
from importlib import import_module
from typing import TYPE_CHECKING

_EXPORTS = {
    "attribute": "engine", "layer_tangents": "engine", "LayerTangents": "engine",
    "AttributionResult": "result", "load_attribution": "result", "REMAINDER": "result",
    "AttributionSettings": "settings", "AXES": "settings", "OUTPUT_SPACES": "settings",
    "DTYPES": "settings",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str) -> object:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


if TYPE_CHECKING:
    from .engine import LayerTangents, attribute, layer_tangents
    from .result import REMAINDER, AttributionResult, load_attribution
    from .settings import AXES, DTYPES, OUTPUT_SPACES, AttributionSettings
