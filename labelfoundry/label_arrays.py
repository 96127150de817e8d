"""Names of a dataset's label arrays and their companions, shared by generation and storage.

A single-type dataset holds `label` + `uncertainty` with manifest columns `score`, `score_top10`;
a multi-label dataset adds, per further label type, an array named by it (`keypoints`, `depth`)
with `uncertainty_<name>` and the columns `score_<name>`, `score_top10_<name>`.
"""

from __future__ import annotations


def uncertainty_array(label_array: str) -> str:
    """The uncertainty array of a label array."""
    return "uncertainty" if label_array == "label" else f"uncertainty_{label_array}"


def score_column(label_array: str, top10: bool = False) -> str:
    """The manifest column of a label array's image-level uncertainty (mean, or mean of the top 10%)."""
    base = "score_top10" if top10 else "score"
    return base if label_array == "label" else f"{base}_{label_array}"
