"""Helpers for notebook 04: scikit-learn's bundled digits at 32 px and a small VGG-style net.

Kept beside the notebook (not in the package): it is example code, not part of shiftlab's API.

>>> data = load_digits_32(seed=0)                   # doctest: +SKIP
>>> net = small_vgg(); losses = train(net, data.x_train, data.y_train, epochs=2)  # doctest: +SKIP
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class Digits:
    """Train/test split: images (N, 1, 32, 32) in [0, 1] on a black (0) border, labels (N,)."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor


def load_digits_32(seed: int = 0, test_fraction: float = 0.3, upsample: int = 3) -> Digits:
    """sklearn's 8x8 digits, bilinearly upsampled x``upsample`` and zero-padded to 32x32.

    Example:
        >>> load_digits_32().x_train.shape                # doctest: +SKIP
        torch.Size([1257, 1, 32, 32])
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32)[:, None] / 16.0
    x = F.interpolate(x, scale_factor=upsample, mode="bilinear", align_corners=False)
    total = 32 - x.shape[-1]
    x = F.pad(x.clamp(0, 1), [total // 2, total - total // 2] * 2)
    y = torch.tensor(digits.target, dtype=torch.long)
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=test_fraction, random_state=seed, stratify=y)
    return Digits(x_train, y_train, x_test, y_test)


def small_vgg(num_classes: int = 10, widths: tuple[int, ...] = (16, 32, 64)) -> nn.Sequential:
    """[conv3x3-BN-ReLU x2, MaxPool2d(2)] per width, global average pool, linear: (N, 1, H, W).

    Zero padding, as trained nets usually have; global pooling, so the classifier sees no
    position except through aliasing and the border.
    """
    layers = _encoder(widths)
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(widths[-1], num_classes)]
    return nn.Sequential(*layers)


def _encoder(widths: tuple[int, ...]) -> list[nn.Module]:
    """[conv3x3-BN-ReLU x2, MaxPool2d(2)] per width, from one input channel."""
    layers: list[nn.Module] = []
    c_in = 1
    for width in widths:
        for _ in range(2):
            layers += [nn.Conv2d(c_in, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU()]
            c_in = width
        layers.append(nn.MaxPool2d(2))
    return layers


def digit_masks(x: torch.Tensor, y: torch.Tensor, threshold: float = 0.25) -> torch.Tensor:
    """Segmentation masks (N, H, W) of the digits: class y + 1 where the ink is above
    ``threshold``, 0 (background) elsewhere; 11 classes."""
    digit = (y + 1)[:, None, None]
    return torch.where(x[:, 0] > threshold, digit, torch.zeros_like(digit))


def small_fcn(num_classes: int = 11, widths: tuple[int, ...] = (16, 32, 64)) -> nn.Sequential:
    """``small_vgg``'s encoder, a 1x1 classifier per position and bilinear upsampling back to
    the input size: a fully convolutional segmentation net, (N, 1, H, W) -> (N, 11, H, W)."""
    layers = _encoder(widths)
    layers += [nn.Conv2d(widths[-1], num_classes, 1),
               nn.Upsample(scale_factor=2 ** len(widths), mode="bilinear")]
    return nn.Sequential(*layers)


def train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int = 10,
          batch_size: int = 64, lr: float = 3e-3, seed: int = 0) -> list[float]:
    """Adam on cross-entropy, no augmentation; the batch order is drawn from ``seed``. ``y``
    holds one class per image, or per pixel (N, H, W) for a segmentation net.

    Returns the mean loss per epoch; leaves ``model`` in eval mode.
    """
    generator = torch.Generator().manual_seed(seed)
    optimiser = torch.optim.Adam(model.parameters(), lr=lr)
    losses = []
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=generator)
        total = 0.0
        for start in range(0, len(x), batch_size):
            index = order[start:start + batch_size]
            loss = F.cross_entropy(model(x[index]), y[index])
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            total += loss.item() * len(index)
        losses.append(total / len(x))
    model.eval()
    return losses


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Top-1 accuracy of ``model`` (eval mode) on unshifted images."""
    model.eval()
    return float((model(x).argmax(1) == y).float().mean())
