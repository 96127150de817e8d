"""Mass generation: latents -> images, taps -> labels + uncertainty, as numpy arrays for one shard.

A sample's latent depends only on (run seed, sample id), never on batch or shard boundaries, so
the same run gives the same bytes however it is split across tasks, workers or restarts.
"""

from __future__ import annotations

import hashlib

import numpy as np
import torch

from .features import generate_with_taps
from .labelers.base import GenBatch


def sample_seed(run_seed: int, sample_id: int) -> int:
    """Stable 63-bit seed of one sample (hashlib, not Python's salted hash())."""
    h = hashlib.sha256(f"labelfoundry:{int(run_seed)}:{int(sample_id)}".encode()).digest()
    return int.from_bytes(h[:8], "little") & (2**63 - 1)


@torch.no_grad()
def generate_samples(
    G,
    labeler,
    sample_ids: list[int],
    run_seed: int,
    *,
    psi: float = 1.0,
    batch: int = 32,
    store_w: bool = True,
    device: str | torch.device = "cpu",
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Generate and label `sample_ids`. Returns (arrays for the store, per-sample manifest columns).

    arrays: image uint8 (n,R,R,3); label uint8 (n,R,R) or float16 (n,K,R,R); uncertainty float16
    (n,R,R); w float32 (n,num_ws,w_dim) when store_w. columns: seed, score, score_top10, rejected (the labeler refused the sample).
    """
    dev = torch.device(device)
    seeds = [sample_seed(run_seed, s) for s in sample_ids]
    parts: dict[str, list] = {"image": [], "label": [], "uncertainty": [], "w": []}
    score, top10, rejected = [], [], []
    for i in range(0, len(seeds), batch):
        z = G.z_from_seeds(seeds[i : i + batch], dev)
        ws = G.mapping(z, psi=psi)
        image, taps = generate_with_taps(G, ws, labeler.tap_spec)
        out = labeler.label(GenBatch(ws, image, taps, G=G, z=z))
        parts["image"].append(((image.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy())
        lab = out.label.cpu().numpy()
        parts["label"].append(lab if lab.dtype == np.uint8 else lab.astype(np.float16))
        parts["uncertainty"].append(out.uncertainty.cpu().numpy().astype(np.float16))
        if store_w:
            parts["w"].append(ws.cpu().numpy().astype(np.float32))
        score.append(out.score.cpu().numpy())
        top10.append(out.score_top10.cpu().numpy())
        rejected.append(np.zeros(len(ws), bool) if out.rejected is None else out.rejected.cpu().numpy().astype(bool))
    arrays = {k: np.concatenate(v) for k, v in parts.items() if v}
    cols = {
        "seed": np.asarray(seeds, dtype=np.int64),
        "score": np.concatenate(score).astype(np.float64),
        "score_top10": np.concatenate(top10).astype(np.float64),
        "rejected": np.concatenate(rejected),
    }
    return arrays, cols
