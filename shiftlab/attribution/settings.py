"""What defines an attribution (axis, output space, dtype, input size, layers, padding): one
frozen dataclass, validated when built, saved with the result; and the choice lists it takes."""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Optional

from ..checks import check_choice, check_count
from ..errors import UsageError

#: translation axes: along W (columns), along H (rows), or both (squared norms added)
AXES = ("horizontal", "vertical", "both")
#: where the output's change is measured: the model's output, or its softmax over dim 1
OUTPUT_SPACES = ("logits", "probabilities")
#: the dtype of the forward-mode passes (float64 for the known answers)
DTYPES = ("float32", "float64")


@dataclass(frozen=True)
class AttributionSettings:
    """What defines an attribution; two results are comparable only when these agree.

    >>> AttributionSettings(axis="vertical", size=(32, 32)).axes
    ('vertical',)
    >>> AttributionSettings(axis="diagonal")
    Traceback (most recent call last):
    ...
    shiftlab.errors.UsageError: unknown axis 'diagonal'; choose one of horizontal, vertical, both
    """

    axis: str = "both"
    output: str = "logits"
    dtype: str = "float32"
    size: tuple[int, int] = (224, 224)
    layers: Optional[tuple[str, ...]] = None
    padding: str = "as-trained"

    def __post_init__(self) -> None:
        check_choice("axis", self.axis, AXES)
        check_choice("output space", self.output, OUTPUT_SPACES)
        check_choice("dtype", self.dtype, DTYPES)
        if not isinstance(self.size, (tuple, list)) or len(self.size) != 2:
            raise UsageError(f"size is (H, W) in pixels, got {self.size!r}")
        object.__setattr__(self, "size", tuple(check_count("size", v) for v in self.size))
        if self.layers is not None:
            object.__setattr__(self, "layers", tuple(str(item) for item in self.layers))
        object.__setattr__(self, "padding", str(self.padding))

    @property
    def axes(self) -> tuple[str, ...]:
        """The single axes measured: ('horizontal', 'vertical') for 'both'."""
        return ("horizontal", "vertical") if self.axis == "both" else (self.axis,)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "AttributionSettings":
        layers = data.get("layers")
        return cls(axis=data["axis"], output=data["output"], dtype=data["dtype"],
                   size=tuple(data["size"]), layers=None if layers is None else tuple(layers),
                   padding=str(data.get("padding", "as-trained")))
