"""Small dense (map-to-map) networks with known answers, as factories the CLI can load
(``tests/dense_nets.py:pool_upsample``) and the tests can build."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from conftest import _randomise_bn, conv_stack


class _Heads(nn.Module):
    """A body, then a 1x1 head upsampled to the input size in forward: {'out': (N, C, H, W)}."""

    def __init__(self, body: nn.Module, channels: int, classes: int) -> None:
        super().__init__()
        self.body = body
        self.head = nn.Conv2d(channels, classes, 1)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"out": F.interpolate(self.head(self.body(x)), size=x.shape[-2:], mode="nearest")}


def circular_fcn(classes: int = 5) -> nn.Module:
    """Circular convs + BN(eval) + ReLU without striding: exactly equivariant (known answer)."""
    torch.manual_seed(0)
    return _randomise_bn(_Heads(nn.Sequential(*conv_stack("circular")), 8, classes), 0).eval()


def pool_upsample(classes: int = 4) -> nn.Module:
    """Circular convs, MaxPool2d(2), a circular conv, nearest x2 upsampling: exact at even
    shifts only (known answer)."""
    torch.manual_seed(0)
    body = nn.Sequential(*conv_stack("circular"), nn.MaxPool2d(2),
                         nn.Conv2d(8, classes, 3, padding=1, padding_mode="circular"),
                         nn.Upsample(scale_factor=2, mode="nearest"))
    return _randomise_bn(body, 0).eval()


class Threshold(nn.Module):
    """Pixel-wise: class 1 where the red channel is positive, else 0 (logits (-r, r))."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        red = x[:, :1]
        return torch.cat([-red, red], 1)


def threshold() -> nn.Module:
    return Threshold().eval()


class Strided(nn.Module):
    """A map at half the input's size: not comparable pixel by pixel."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, :, ::2, ::2]


class NaNCorner(nn.Module):
    """Threshold's logits, NaN in the top-left 2x2 pixels of every output."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = Threshold()(x).clone()
        out[:, :, :2, :2] = float("nan")
        return out
