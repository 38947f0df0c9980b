"""Tiny models whose equivariance is known analytically (docs/semantics.md, "Known answers")."""
from __future__ import annotations

import os

import pytest
import torch
from torch import nn

os.environ.setdefault("SHIFTLAB_OFFLINE", "1")  # never try to download weights in tests
os.environ.setdefault("MPLBACKEND", "Agg")


def circular_conv(c_in: int, c_out: int, padding_mode: str = "circular") -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, 3, padding=1, padding_mode=padding_mode)


def conv_stack(padding_mode: str = "circular", channels: int = 8, depth: int = 2) -> list[nn.Module]:
    """[conv, BN, ReLU] * depth, no striding."""
    layers: list[nn.Module] = []
    c_in = 3
    for _ in range(depth):
        layers += [circular_conv(c_in, channels, padding_mode), nn.BatchNorm2d(channels), nn.ReLU()]
        c_in = channels
    return layers


def _randomise_bn(model: nn.Module, seed: int) -> nn.Module:
    generator = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.copy_(torch.randn(module.num_features, generator=generator) * 0.1)
            module.running_var.copy_(torch.rand(module.num_features, generator=generator) + 0.5)
    return model


def make_equivariant(seed: int = 0) -> nn.Module:
    """Known answer 2: circular convs + BN(eval) + ReLU without striding: exactly equivariant."""
    torch.manual_seed(seed)
    return _randomise_bn(nn.Sequential(*conv_stack()), seed).eval()


def make_maxpool(seed: int = 0) -> nn.Module:
    """Known answer 3: the stack then MaxPool2d(2): exact at even shifts only."""
    torch.manual_seed(seed)
    return _randomise_bn(nn.Sequential(*conv_stack(), nn.MaxPool2d(2)), seed).eval()


def make_global_pool(seed: int = 0) -> nn.Module:
    """Known answer 5: the stack then global average pooling and a linear classifier."""
    torch.manual_seed(seed)
    return _randomise_bn(nn.Sequential(*conv_stack(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                       nn.Linear(8, 4)), seed).eval()


def make_zero_padded(seed: int = 0) -> nn.Module:
    """Known answer 8: zero-padded convs without striding (equivariant away from the border)."""
    torch.manual_seed(seed)
    return _randomise_bn(nn.Sequential(*conv_stack("zeros")), seed).eval()


class Twice(nn.Module):
    """Known answer 7: one ReLU module called twice in one forward."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = circular_conv(3, 4)
        self.conv2 = circular_conv(4, 4)
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.conv2(self.relu(self.conv1(x))))


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread():
    """Under pytest-xdist (-n 2 on 2 cores) one torch thread per worker, not oversubscription."""
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def run_torchrun(arguments: list, cwd, timeout: float = 180, expect_success: bool = True) -> str:
    """Run ``python -m torch.distributed.run --nproc_per_node=2 ...`` on loopback; stderr back
    (``expect_success=False``: the run must fail instead).

    A session of its own, so that a hung rendezvous is killed with all its workers.
    """
    import signal
    import socket
    import subprocess
    import sys

    with socket.socket() as probe:  # a free loopback port for the rendezvous
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo", "MPLBACKEND": "Agg",
           "SHIFTLAB_OFFLINE": "1", "PYTHONPATH": root}
    env.pop("INTERRUPT_AT", None)
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
               "--master_addr=127.0.0.1", f"--master_port={port}", *map(str, arguments)]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env, start_new_session=True, cwd=str(cwd))
    try:
        _, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise AssertionError(f"torchrun did not finish in {timeout:.0f} s")
    assert (proc.returncode == 0) == expect_success, stderr[-2000:]
    return stderr


@pytest.fixture
def images() -> torch.Tensor:
    """Four seeded random 16x16 RGB images."""
    return torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(1))


def tiny_classifier() -> nn.Module:
    """A small stride-4 classifier for CLI tests: `tests/conftest.py:tiny_classifier`."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2),
        nn.Conv2d(8, 8, 3, padding=1, stride=2), nn.ReLU(inplace=True),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10)).eval()


class _Attention(nn.Module):
    """Single-head self-attention over tokens (N, L, D): permutation-equivariant."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        weights = torch.softmax(q @ k.transpose(1, 2) / q.shape[-1] ** 0.5, dim=-1)
        return self.proj(weights @ v)


class TinyViT(nn.Module):
    """A ViT without position embeddings: patchify (stride 4), a class token, attention + MLP.

    Attention without position embeddings is permutation-equivariant, so a circular shift by a
    multiple of the patch size rolls the patch tokens exactly and leaves the class token (and
    the logits read from it) unchanged. ``fixed_size`` makes it refuse other input sizes, as
    torchvision's ViT does.
    """

    def __init__(self, dim: int = 8, fixed_size: int | None = None, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.fixed_size = fixed_size
        self.patchify = nn.Conv2d(3, dim, 4, stride=4)
        self.cls = nn.Parameter(torch.randn(1, 1, dim))
        self.norm1 = nn.LayerNorm(dim)
        self.attention = _Attention(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))
        self.head = nn.Linear(dim, 10)
        self.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fixed_size is not None and x.shape[-1] != self.fixed_size:
            raise ValueError(f"expected {self.fixed_size} px, got {x.shape[-1]}")
        tokens = self.patchify(x).flatten(2).transpose(1, 2)  # (N, h·w, D), row-major
        tokens = torch.cat([self.cls.expand(len(x), -1, -1), tokens], dim=1)
        tokens = tokens + self.attention(self.norm1(tokens))
        tokens = tokens + self.mlp(self.norm2(tokens))
        return self.head(tokens[:, 0])


class Permute(nn.Module):
    def __init__(self, *dims: int) -> None:
        super().__init__()
        self.dims = dims

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.permute(*self.dims)


def make_channels_last(seed: int = 0, pool: bool = False) -> nn.Module:
    """A ConvNeXt-like block: circular conv, then LayerNorm/Linear/GELU channels-last (N, H, W, C).

    Without ``pool`` nothing strides: exactly equivariant under circular shifts (known answer 2).
    With ``pool`` a MaxPool2d(2) comes first: exact at even shifts only (known answer 3).
    """
    torch.manual_seed(seed)
    return nn.Sequential(
        circular_conv(3, 8), *([nn.MaxPool2d(2)] if pool else []), Permute(0, 2, 3, 1),
        nn.LayerNorm(8), nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 8), Permute(0, 3, 1, 2),
        circular_conv(8, 8)).eval()


def random_png_folder(folder, count: int = 4, side: int = 24):
    """``folder`` filled with ``count`` seeded random RGB PNGs (0.png, 1.png, ...); returns it."""
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for index in range(count):
        Image.fromarray(rng.integers(0, 255, (side, side, 3), dtype=np.uint8)).save(folder / f"{index}.png")
    return folder


# A stride-4, 3-class classifier whose forward number INTERRUPT_AT raises KeyboardInterrupt (a
# Ctrl-C at a known point of a run). Written into a factory file by the resume tests; its
# ``build`` takes (and ignores) ``num_classes`` so that ``--num-classes 3`` works too.
INTERRUPTIBLE_FACTORY = """
import os, torch
from torch import nn

class Net(nn.Module):
    \"\"\"A stride-4 classifier that raises KeyboardInterrupt on forward INTERRUPT_AT.\"\"\"
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                                  nn.Conv2d(4, 4, 3, padding=1, stride=2), nn.ReLU(),
                                  nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))
        self.calls = 0
    def forward(self, x):
        self.calls += 1
        if self.calls == int(os.environ.get("INTERRUPT_AT", "0")):
            raise KeyboardInterrupt
        return self.body(x)

def build(num_classes=3):
    return Net().eval()
"""


# A torchvision-free model with both kinds of downsampling antialias() rewrites:
# conv, relu, MaxPool2d(2), conv(stride 2), relu, global pool, flatten, linear. Written into a
# factory file by the tests that load models by spec.
ANTIALIAS_FACTORY_SOURCE = """
    from torch import nn


    def factory():
        return nn.Sequential(
            nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(4, 4, 3, padding=1, stride=2), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))
"""


def assert_holds(model, state) -> None:
    """``model``'s state dict has exactly the keys of ``state``, each tensor equal."""
    import torch

    got = model.state_dict()
    assert set(got) == set(state)
    for key, value in state.items():
        assert torch.equal(got[key], value), key
