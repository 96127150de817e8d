"""Our own checkpoint format: one safetensors file, architecture JSON in its metadata.

safetensors holds only tensors, so loading can never execute code; the JSON header carries the
generator (and optional discriminator) configuration.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import NamedTuple

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..atomic import atomic_path
from .discriminator import Discriminator, DiscriminatorConfig
from .filecheck import check_safetensors
from .stylegan2 import Generator, StyleGAN2Config

FORMAT = "labelfoundry-stylegan2"
FORMAT_VERSION = "1"


class Networks(NamedTuple):
    """A checkpoint's networks side by side, as a training snapshot keeps them: G (the one used for
    sampling: G_ema where the file has it), D when the file holds one we can represent, and where
    the weights came from."""

    G: Generator
    D: Discriminator | None = None
    extra: dict = {}

    def to(self, device: str | torch.device) -> "Networks":
        """Both networks on `device`, in eval mode."""
        D = None if self.D is None else self.D.to(device).eval()
        return Networks(self.G.to(device).eval(), D, self.extra)


def save_generator(path: str | os.PathLike, G: Generator, D: Discriminator | None = None, extra: dict | None = None) -> None:
    """Write G (and D) atomically: a crash mid-write never leaves a half file under `path`."""
    tensors = {f"G.{k}": v.detach().to("cpu").contiguous() for k, v in G.state_dict().items()}
    meta = {"format": FORMAT, "version": FORMAT_VERSION, "G": json.dumps(G.cfg.to_json())}
    if D is not None:
        tensors.update({f"D.{k}": v.detach().to("cpu").contiguous() for k, v in D.state_dict().items()})
        meta["D"] = json.dumps(D.cfg.to_json())
    if extra:
        meta["extra"] = json.dumps(extra)
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=meta)


def load_own(path: str | os.PathLike, device: str | torch.device = "cpu") -> Networks:
    """Load the networks saved by `save_generator` (D is None when the file has none)."""
    path = Path(path)
    check_safetensors(path)
    try:
        with safe_open(str(path), framework="pt", device=str(device)) as f:
            meta = f.metadata() or {}
            if meta.get("format") != FORMAT:
                raise ValueError(
                    f"{path}: not a labelfoundry generator file (format={meta.get('format')!r}); "
                    "convert it with `labelfoundry convert` or pass an NVIDIA .pkl / rosinality .pt instead"
                )
            state = {k: f.get_tensor(k) for k in f.keys()}
    except (OSError, RuntimeError) as e:  # safetensors reports a corrupt header as RuntimeError-like errors
        raise ValueError(f"{path}: cannot read safetensors file ({e}); re-download or re-export it") from e
    G = Generator(StyleGAN2Config.from_json(json.loads(meta["G"])))
    G.load_state_dict({k[2:]: v for k, v in state.items() if k.startswith("G.")})
    D = None
    if "D" in meta:
        D = Discriminator(DiscriminatorConfig.from_json(json.loads(meta["D"])))
        D.load_state_dict({k[2:]: v for k, v in state.items() if k.startswith("D.")})
    return Networks(G, D, json.loads(meta.get("extra", "{}"))).to(device)
