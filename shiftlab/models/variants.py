"""Model variants for comparisons: ``NAME[+aaK][@WEIGHTS]``, e.g. ``resnet50+aa4@lpf4.pth``.

``+aaK`` converts the model with ``antialias(filt_size=K)``; ``@WEIGHTS`` gives its weights
(a checkpoint for the converted model, or a torchvision weights name for the baseline, which
are then copied into the converted model).
"""
from __future__ import annotations

import dataclasses
import re
from typing import Optional

from .antialias import antialias as blurpool_version  # the parameter below is named antialias
from .checkpoints import is_checkpoint_path
from ..checks import check_filter_size
from ..errors import UsageError
from .zoo import LoadedModel, load_checkpoint, load_model

# NAME is a model spec: [TARGET:]FACTORY, where TARGET is a .py path or a dotted module name.
# A .py path may hold '@' and '+aaK' (ci/workspace@2/model.py:factory), so the '@' that starts
# WEIGHTS is the first one after FACTORY; WEIGHTS itself may hold '@' (runs@2/ckpt.pth).
_VARIANT = re.compile(
    r"^(?P<base>(?:(?:[A-Za-z]:)?[^:]*\.py:|[A-Za-z_][\w.]*:)?[^@+]+?)"
    r"(?:\+aa(?P<filt>\d+))?(?:@(?P<weights>.+))?$"
)


def parse_variant(text: str) -> tuple[str, Optional[int], Optional[str]]:
    """Split ``NAME[+aaK][@WEIGHTS]`` into (NAME, K or None, WEIGHTS or None).

    >>> parse_variant("resnet50+aa4@lpf4.pth")
    ('resnet50', 4, 'lpf4.pth')
    >>> parse_variant("ci/workspace@2/model.py:factory@w.pth")
    ('ci/workspace@2/model.py:factory', None, 'w.pth')
    """
    match = _VARIANT.match(text.strip()) if isinstance(text, str) else None
    if not match:
        raise UsageError(f"cannot read model spec {text!r}; use NAME, NAME+aa4 or NAME+aa4@weights.pth")
    filt = check_filter_size(int(match["filt"])) if match["filt"] else None
    return match["base"], filt, match["weights"]


def load_variant(text: str, weights: str = "auto", antialias: Optional[int] = None,
                 trust_checkpoint: bool = False, num_classes: Optional[int] = None,
                 weights_key: Optional[str] = None) -> LoadedModel:
    """Load ``NAME[+aaK][@WEIGHTS]``; ``antialias`` (a filter size) antialiases even without ``+aaK``.

    ``NAME+aaK@FILE`` loads the checkpoint into the converted model (a published
    antialiased-cnns file); any other weights belong to the baseline and are copied over.
    ``weights_key`` picks the entry of a checkpoint dict, as in :func:`load_model`.

    Example:
        >>> loaded = load_variant("resnet18+aa4", weights="none")
        >>> loaded.name, loaded.weights, type(loaded.model.maxpool[1]).__name__
        ('resnet18+aa4', 'random init', 'BlurPool')
    """
    base, spec_filt, spec_weights = parse_variant(text)
    filt = spec_filt if spec_filt is not None else antialias
    weights = spec_weights or weights
    if filt is None:
        return load_model(base, weights, trust_checkpoint=trust_checkpoint, num_classes=num_classes,
                          weights_key=weights_key)
    # with --antialias K (no +aaK in the spec) the weights belong to the baseline and are copied
    if spec_filt is not None and spec_weights is not None and is_checkpoint_path(weights):
        loaded = load_model(base, "none", num_classes=num_classes)
        model = blurpool_version(loaded.model, filt_size=filt, copy_weights=False)
        load_checkpoint(model, weights, trust_checkpoint, name=f"{loaded.name}+aa{filt}",
                        weights_key=weights_key)
        description = weights
    else:  # baseline weights, copied into the converted model
        loaded = load_model(base, weights, trust_checkpoint=trust_checkpoint, num_classes=num_classes,
                            weights_key=weights_key)
        model = blurpool_version(loaded.model, filt_size=filt, copy_weights=True)
        description = loaded.weights
    return dataclasses.replace(loaded, model=model.eval(), name=f"{loaded.name}+aa{filt}",
                               weights=description)
