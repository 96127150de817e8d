"""Targeted oversampling of generated data: draw rare classes as often as asked.

HandsOff §4.5 controls the long tail only through which images are labeled; with an unlimited,
per-sample-annotated dataset we can also choose how often the downstream segmenter *sees* a class.
Each target ``{class: t}`` asks that a fraction t of training draws contain that class (the
manifest's ``frac_<class>`` > 0). The weights come from the manifest alone, no pixel is read.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Mapping

import numpy as np
import pandas as pd


def fraction_column(class_name: str) -> str:
    """Manifest column of a class's pixel fraction (same naming as the shard store writes)."""
    return "frac_" + re.sub(r"\W+", "_", str(class_name)).strip("_")


def manifest_classes(manifest: pd.DataFrame) -> list[str]:
    """Class names with a pixel-fraction column in the manifest (for error messages)."""
    return [c[len("frac_"):] for c in manifest.columns if c.startswith("frac_")]


def oversample_weights(
    manifest: pd.DataFrame, targets: Mapping[str, float], *, rounds: int = 50, tol: float = 1e-6
) -> np.ndarray:
    """Per-row sampling weights (summing to 1, aligned with the manifest's rows) under which a
    fraction ``targets[c]`` of draws contain class ``c``.

    One class is matched exactly (positives share t, the rest share 1 - t). Several classes are
    matched by iterative proportional fitting, exact when the classes' samples allow it.
    A class no sample contains cannot be oversampled: it is skipped with a warning (at k = 0 in a
    long-tail sweep that is the expected case); an unknown class is an error.
    """
    n = len(manifest)
    if n == 0:
        raise ValueError("oversampling needs a non-empty manifest")
    masks: dict[str, np.ndarray] = {}
    for cls, t in targets.items():
        col = fraction_column(cls)
        if col not in manifest:
            raise ValueError(f"downstream.oversample: unknown class {cls!r}; valid classes: {manifest_classes(manifest)}")
        if not 0.0 <= float(t) <= 1.0:
            raise ValueError(f"downstream.oversample.{cls}: target fraction must be in [0, 1], got {t}")
        has = manifest[col].to_numpy(dtype=np.float64) > 0
        if not has.any() and t > 0:
            warnings.warn(f"downstream.oversample: no training sample contains {cls!r}; drawing it at {t:.0%} is "
                          "impossible, so it is not oversampled", RuntimeWarning, stacklevel=2)
            continue
        if has.all() and t < 1:
            warnings.warn(f"downstream.oversample: every training sample contains {cls!r}; it is drawn 100% of the time",
                          RuntimeWarning, stacklevel=2)
            continue
        masks[cls] = has
    w = np.full(n, 1.0 / n)
    for _ in range(rounds):
        worst = 0.0
        for cls, has in masks.items():
            t = float(targets[cls])
            p = w[has].sum()
            worst = max(worst, abs(p - t))
            if 0 < p < 1:
                w[has] *= t / p
                w[~has] *= (1 - t) / (1 - p)
            elif p == 0 and t > 0:  # an earlier class drove these to zero; reseed them
                w[has] = t / has.sum()
                w[~has] *= 1 - t
        if worst < tol:
            break
    return w / w.sum()


def drawn_fraction(manifest: pd.DataFrame, weights: np.ndarray, cls: str) -> float:
    """Expected fraction of draws containing ``cls`` under ``weights`` (for logs and reports)."""
    has = manifest[fraction_column(cls)].to_numpy() > 0
    return float(np.asarray(weights)[has].sum() / np.sum(weights))
