"""Labeled sets with an exact number of rare-class images (HandsOff §4.5 substitution / addition).

`require_rare` only guarantees *at least* k images with a class; a long-tail sweep needs exactly k,
and a base set with none, or the measured effect of k is blurred by chance occurrences.
The picker walks the toy-faces train pool in order from `offset`, so the same spec picks the same
ids, and a larger k keeps every rare image of a smaller k (the sweep's sets are nested).
"""

from __future__ import annotations

from typing import Literal

from .base import LabeledSample

Mode = Literal["substitution", "addition"]
_CHUNK = 256
_MAX_SCAN = 2_000_000


def contains(sample: LabeledSample, class_id: int) -> bool:
    """Whether the sample's mask (at the resolution it was rendered at) shows the class."""
    return bool((sample.mask == class_id).any())


def check_longtail(n: int, cls: str, k: int, mode: str) -> None:
    """Refuse a long-tail spec no labeled set can meet (the config model runs this at parse time)."""
    from .toyfaces import RARE_CLASSES

    if cls not in RARE_CLASSES:
        raise ValueError(f"labeled.longtail.cls: {cls!r} is not a rare toy-faces class; choose one of {list(RARE_CLASSES)}")
    if mode not in ("substitution", "addition"):
        raise ValueError(f"labeled.longtail.mode must be 'substitution' or 'addition', got {mode!r}")
    if k < 0:
        raise ValueError(f"labeled.longtail.k must be >= 0, got {k}")
    if mode == "substitution" and k > n:
        raise ValueError(f"labeled.longtail.k ({k}) exceeds labeled.num_images ({n}) in substitution mode")


def pick_longtail(
    n: int, resolution: int, cls: str, k: int, mode: Mode, offset: int = 0, style: str = "photo"
) -> list[LabeledSample]:
    """A labeled toy-faces set where exactly `k` images show `cls` and no other image shows any rare class.

    substitution: n images in total, k of them with `cls` (fixed size, varying composition).
    addition: a base of n images without rare classes plus k images with `cls` (n + k in total).
    The k rare images show no other rare class, so each experiment moves one class only.
    Base images come first, then the rare ones, each in pool order.
    """
    from . import toyfaces

    check_longtail(n, cls, k, mode)
    n_base = n - k if mode == "substitution" else n
    cid = toyfaces.CLASSES.index(cls)
    rare_ids = [toyfaces.CLASSES.index(c) for c in toyfaces.RARE_CLASSES]
    base: list[LabeledSample] = []
    rare: list[LabeledSample] = []
    pos = offset
    while len(base) < n_base or len(rare) < k:
        if pos - offset >= _MAX_SCAN:
            raise ValueError(f"found only {len(rare)} of {k} faces with {cls!r} at resolution {resolution} "
                             f"in {_MAX_SCAN} train faces; lower labeled.longtail.k or raise the resolution")
        for s in toyfaces.samples("train", _CHUNK, resolution, pos, style=style):
            shown = [r for r in rare_ids if contains(s, r)]
            if not shown and len(base) < n_base:
                base.append(s)
            elif shown == [cid] and len(rare) < k:
                rare.append(s)
        pos += _CHUNK
    return base + rare
