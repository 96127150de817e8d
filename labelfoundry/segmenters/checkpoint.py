"""Training checkpoints that load with ``torch.load(weights_only=True)``.

A checkpoint is ``<out_dir>/ckpt_<step:08d>.pt`` holding a dict of: ``model``, ``optimizer``
and ``scaler`` state dicts, ``step`` (int), ``losses`` (float64 tensor, one per step) and
``rng`` -- every RNG state as a tensor (torch CPU, CUDA per device, the augmentation
generator, numpy's MT19937 and Python's ``random``), so resuming reproduces the run exactly.
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch

from ..atomic import atomic_path

_PREFIX, _SUFFIX = "ckpt_", ".pt"


def checkpoint_path(out_dir: Path, step: int) -> Path:
    """``<out_dir>/ckpt_<step:08d>.pt``."""
    return Path(out_dir) / f"{_PREFIX}{step:08d}{_SUFFIX}"


def list_checkpoints(out_dir: Path) -> list[Path]:
    """Checkpoints in ``out_dir`` sorted by step, oldest first."""
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        return []
    found = [p for p in out_dir.glob(f"{_PREFIX}*{_SUFFIX}") if p.stem[len(_PREFIX) :].isdigit()]
    return sorted(found, key=lambda p: int(p.stem[len(_PREFIX) :]))


def latest_checkpoint(out_dir: Path) -> Path | None:
    """The highest-step checkpoint in ``out_dir``, or None."""
    found = list_checkpoints(out_dir)
    return found[-1] if found else None


def capture_rng(aug_generator: torch.Generator) -> dict[str, torch.Tensor | list[torch.Tensor]]:
    """All RNG states as tensors."""
    np_state = np.random.get_state()
    py_version, py_internal, py_gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "aug": aug_generator.get_state(),
        "numpy_keys": torch.from_numpy(np.asarray(np_state[1], dtype=np.int64)),
        "numpy_pos": torch.tensor([np_state[2], np_state[3]], dtype=torch.int64),
        "numpy_gauss": torch.tensor([np_state[4]], dtype=torch.float64),
        "python": torch.tensor(list(py_internal), dtype=torch.int64),
        "python_meta": torch.tensor(
            [py_version, 0 if py_gauss is None else 1], dtype=torch.int64
        ),
        "python_gauss": torch.tensor([0.0 if py_gauss is None else py_gauss], dtype=torch.float64),
    }


def restore_rng(state: dict, aug_generator: torch.Generator) -> None:
    """Inverse of :func:`capture_rng`."""
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    aug_generator.set_state(state["aug"])
    pos, has_gauss = (int(v) for v in state["numpy_pos"])
    np.random.set_state(
        ("MT19937", state["numpy_keys"].numpy().astype(np.uint32), pos, has_gauss,
         float(state["numpy_gauss"][0]))
    )
    version, has_py_gauss = (int(v) for v in state["python_meta"])
    gauss = float(state["python_gauss"][0]) if has_py_gauss else None
    random.setstate((version, tuple(int(v) for v in state["python"]), gauss))


def save_checkpoint(path: Path, state: dict) -> Path:
    """Write ``state`` atomically (temp file + rename) and return ``path``."""
    with atomic_path(path) as tmp:
        torch.save(state, tmp)
    return Path(path)


def load_checkpoint(path: Path, map_location: torch.device | str = "cpu") -> dict:
    """Load a checkpoint with ``weights_only=True``."""
    return torch.load(path, map_location=map_location, weights_only=True)


def prune_checkpoints(out_dir: Path, keep_last: int) -> None:
    """Delete all but the ``keep_last`` newest checkpoints (keep_last <= 0 keeps all)."""
    if keep_last <= 0:
        return
    for p in list_checkpoints(out_dir)[:-keep_last]:
        p.unlink(missing_ok=True)
