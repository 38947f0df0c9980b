"""torchvision pretrained weights: torch hub's cache, downloads with a time limit, offline mode.

:func:`load_pretrained` builds a torchvision model with a weights enum member, from torch hub's
cache or by downloading. When the weights are not cached and cannot be downloaded (offline, no
network, a corrupt download) it raises :class:`PretrainedUnavailable`, so the caller decides
between a random-init fallback (``weights='auto'``) and an error (``weights='DEFAULT'``).

Example:
    >>> from torchvision.models import ResNet18_Weights
    >>> cache_file(ResNet18_Weights.DEFAULT).name
    'resnet18-f37072fd.pth'
"""
from __future__ import annotations

import contextlib
import http.client
import os
import socket
import threading
import urllib.request
from pathlib import Path
from typing import Any, Iterator, Optional
from urllib.parse import urlparse

import torch
import torchvision
from torch import nn

from .. import config
from ..errors import WeightsError, one_line

__all__ = [
    "DOWNLOAD_TIMEOUT_S",
    "OFFLINE_ENV",
    "PretrainedUnavailable",
    "PretrainedUnavailableWarning",
    "cache_file",
    "load_pretrained",
    "offline",
]

#: Seconds allowed to reach the download server, and for each socket operation during a
#: download. On a machine without internet, ``weights='auto'`` gives up after at most this long.
DOWNLOAD_TIMEOUT_S: float = 5.0

#: Set this environment variable to ``1`` to never try to download weights.
OFFLINE_ENV: str = "SHIFTLAB_OFFLINE"


class PretrainedUnavailableWarning(UserWarning):
    """``weights='auto'`` could not get pretrained weights and fell back to random init.

    Carries its parts, so the command line can say the same in its own words (``cli_text``).

    >>> str(PretrainedUnavailableWarning("vgg16", "not cached", "save URL into DIR/"))
    "vgg16: random init (not cached); for pretrained weights save URL into DIR/, or pass weights='none' to silence this"
    >>> PretrainedUnavailableWarning("vgg16", "not cached", "save URL into DIR/").cli_text()
    'vgg16 has random weights (not cached); for pretrained weights save URL into DIR/; --weights none silences this'
    """

    def __init__(self, model: str, reason: str, fix: str, cli_fix: Optional[str] = None) -> None:
        self.model, self.reason, self.fix = model, reason, fix
        self.cli_fix = cli_fix or fix
        super().__init__(f"{model}: random init ({reason}); for pretrained weights {fix},"
                         " or pass weights='none' to silence this")

    def cli_text(self) -> str:
        """The warning for command-line users (options, not Python arguments)."""
        return (f"{self.model} has random weights ({self.reason}); for pretrained weights"
                f" {self.cli_fix}; --weights none silences this")


class PretrainedUnavailable(Exception):
    """Pretrained weights are not cached and cannot be downloaded; the message says why.

    ``reason`` is the short cause without the file (the fallback warning names the fix).
    Not a ``ShiftlabError``: the caller turns it into a fallback warning or a ``WeightsError``.
    """

    def __init__(self, reason: str, cached_file: Optional[Path] = None) -> None:
        self.reason = reason
        super().__init__(f"{cached_file} is {reason}" if cached_file else reason)


def offline() -> bool:
    """True when ``SHIFTLAB_OFFLINE`` forbids downloads (``1``, ``true``, ``yes`` or ``on``;
    ``0``, ``false``, ``no``, ``off`` or unset allow them; anything else is a UsageError: see
    :mod:`shiftlab.config`).

    Example:
        >>> offline() in (True, False)
        True
    """
    return config.flag(OFFLINE_ENV)


def cache_file(chosen: Any) -> Path:
    """The file torch hub reads and writes for the torchvision weights ``chosen``.

    Example:
        >>> from torchvision.models import ResNet18_Weights
        >>> cache_file(ResNet18_Weights.DEFAULT).parent.name
        'checkpoints'
    """
    # The same path torch.hub.load_state_dict_from_url uses.
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(chosen.url).path)


def load_pretrained(name: str, chosen: Any, allow_download: bool | None = None) -> nn.Module:
    """Build torchvision model ``name`` with the weights ``chosen``, cached or downloaded.

    Args:
        name: a torchvision model name (``'resnet18'``).
        chosen: a member of its weights enum (``ResNet18_Weights.IMAGENET1K_V1``).
        allow_download: may fetch weights that are not cached; None means "unless offline()".

    Returns:
        The model with the weights loaded, as torchvision's builder makes it (it knows
        per-weights settings such as ViT's image size).

    Raises:
        PretrainedUnavailable: not cached, and downloading is forbidden, impossible or corrupt.
        WeightsError: the cached file cannot be read or loaded.

    Example:
        >>> from torchvision.models import ResNet18_Weights
        >>> model = load_pretrained("resnet18", ResNet18_Weights.DEFAULT)   # doctest: +SKIP
    """
    if allow_download is None:
        allow_download = not offline()
    cached_file = cache_file(chosen)
    cached = cached_file.is_file()
    if not cached:
        if not allow_download:
            raise PretrainedUnavailable(f"not cached; {OFFLINE_ENV}=1 forbids downloads",
                                        cached_file)
        reason = _unreachable_reason(chosen.url, DOWNLOAD_TIMEOUT_S)
        if reason is not None:
            raise PretrainedUnavailable(f"not cached, and the download failed: {reason}", cached_file)
    try:
        return _download_pretrained(name, chosen)
    except (OSError, http.client.HTTPException) as exc:
        if cached:
            raise WeightsError(
                f"cannot read cached weights {cached_file} ({one_line(exc)}); check its permissions"
            ) from None
        raise PretrainedUnavailable(
            f"not cached, and the download failed: {one_line(exc)}", cached_file) from None
    except Exception as exc:  # torch.load raises many types for a broken file
        if cached:
            raise WeightsError(
                f"cached weights {cached_file} cannot be loaded ({one_line(exc)}); delete it so it is "
                "downloaded again, or replace it with a good copy"
            ) from None
        if "hash" in str(exc).lower():
            raise PretrainedUnavailable(f"the download of {chosen.url} was corrupt ({one_line(exc)})") from None
        raise WeightsError(f"building {name} with {chosen} failed: {type(exc).__name__}: {one_line(exc)}") from exc


def _download_pretrained(name: str, chosen: Any) -> nn.Module:
    """Build ``name`` with ``chosen`` weights; torch hub takes them from its cache or downloads them."""
    # The builder knows per-weights settings (inception's transform_input, ViT's image size),
    # so it loads the weights rather than us calling load_state_dict.
    with _socket_timeout(DOWNLOAD_TIMEOUT_S):
        return torchvision.models.get_model(name, weights=chosen)


@contextlib.contextmanager
def _socket_timeout(seconds: float) -> Iterator[None]:
    """Bound every socket operation in the block; torch.hub's download has no timeout parameter."""
    previous = socket.getdefaulttimeout()
    if previous is None or previous > seconds:
        socket.setdefaulttimeout(seconds)
    try:
        yield
    finally:
        socket.setdefaulttimeout(previous)


def _unreachable_reason(url: str, timeout: float) -> str | None:
    """Return why ``url``'s server (or its proxy) cannot be reached within ``timeout``, else None.

    A socket timeout alone does not bound the wait: name lookup ignores it, and a connection
    tries every address of the host in turn. So the probe runs in a daemon thread and we wait
    ``timeout`` seconds at most.
    """
    parts = urlparse(url)
    host, port = parts.hostname or "", parts.port or (443 if parts.scheme == "https" else 80)
    proxy = urllib.request.getproxies().get(parts.scheme)
    if proxy and not urllib.request.proxy_bypass(host):
        proxy_parts = urlparse(proxy if "://" in proxy else "http://" + proxy)
        host, port = proxy_parts.hostname or host, proxy_parts.port or 80
    outcome: dict[str, str] = {}

    def probe() -> None:
        try:
            addresses = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
            if not addresses:
                raise OSError(f"no address found for {host}")
            family, kind, proto, _, address = addresses[0]
            with socket.socket(family, kind, proto) as connection:
                connection.settimeout(timeout)
                connection.connect(address)
        except Exception as exc:  # any failure here means "cannot download", never a crash
            outcome["error"] = one_line(exc)
        else:
            outcome["ok"] = ""

    thread = threading.Thread(target=probe, name="shiftlab-download-probe", daemon=True)
    thread.start()
    thread.join(timeout)
    if "ok" in outcome:
        return None
    return f"cannot reach {host}:{port} ({outcome.get('error', f'no answer within {timeout:g} s')})"
