"""Stable hashes: per-sample checksums and per-shard seeds.

Both must be identical across processes, machines and Python versions, so
they use :mod:`hashlib` and never Python's salted ``hash()``.
"""

from __future__ import annotations

import hashlib

import numpy as np

_SEED_DOMAIN = b"labelfoundry.shard_seed.v1"


def shard_seed(run_seed: int, shard_index: int) -> int:
    """Seed for generating shard ``shard_index`` of a run seeded with ``run_seed``.

    Derived with SHA-256 so a resumed or retried shard regenerates the same
    bytes; the result fits in a signed int64 (numpy, torch and parquet accept it).
    """
    if int(shard_index) < 0:
        raise ValueError(f"shard_index must be >= 0, got {shard_index}")
    message = _SEED_DOMAIN + b":" + str(int(run_seed)).encode() + b":" + str(int(shard_index)).encode()
    digest = hashlib.sha256(message).digest()
    return int.from_bytes(digest[:8], "little") & 0x7FFF_FFFF_FFFF_FFFF


def _update(h: "hashlib._Hash", name: str, array: np.ndarray) -> None:
    # Hash dtype and shape too, so a reinterpretation of the same bytes
    # (e.g. float16 read as uint8 pairs) cannot produce a matching checksum.
    little = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<"))
    h.update(f"{name}|{little.dtype.str}|{little.shape}|".encode())
    h.update(little.tobytes())


def sample_checksum(
    image: np.ndarray, label: np.ndarray, uncertainty: np.ndarray | None = None, **extra: np.ndarray
) -> str:
    """SHA-256 hex digest of one sample's image + label (+ uncertainty), then any `extra` arrays
    (a multi-label dataset's further labels and uncertainties) in the order given.

    This is the single definition used by the writer, ``verify`` and readers.
    """
    h = hashlib.sha256()
    _update(h, "image", np.asarray(image))
    _update(h, "label", np.asarray(label))
    if uncertainty is not None:
        _update(h, "uncertainty", np.asarray(uncertainty))
    for name, array in extra.items():
        _update(h, name, np.asarray(array))
    return h.hexdigest()


def shard_checksums(arrays: dict[str, np.ndarray], names: list[str] | None = None) -> list[str]:
    """Checksums of every sample in a stacked shard (``arrays[name][i]``) over ``names``
    (``Layout.checksum_arrays()``; default image, label, uncertainty)."""
    names = names or [n for n in ("image", "label", "uncertainty") if n in arrays]
    extra = [n for n in names if n not in ("image", "label", "uncertainty")]
    uncertainty = arrays.get("uncertainty") if "uncertainty" in names else None
    return [
        sample_checksum(
            arrays["image"][i],
            arrays["label"][i],
            None if uncertainty is None else uncertainty[i],
            **{n: arrays[n][i] for n in extra},
        )
        for i in range(len(arrays["image"]))
    ]
