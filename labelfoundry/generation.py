"""Mass generation: latents -> images, taps -> labels + uncertainty, as numpy arrays for one shard,
and the loop that commits shard after shard with the store write of one overlapping the
generation of the next.

A sample's latent depends only on (run seed, sample id), never on batch or shard boundaries, so
the same run gives the same bytes however it is split across tasks, workers or restarts (on one
kind of machine: `precision="auto"` resolves per device, see `labelfoundry.precision`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Protocol

import numpy as np
import torch

from .features import TapSpec, generate_with_taps
from .label_arrays import score_column, uncertainty_array
from .labelers.base import GenBatch
from .precision import resolve_precision


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
    precision: str = "fp32",
    compile_labels: bool = False,
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Generate and label `sample_ids`. Returns (arrays for the store, per-sample manifest columns).

    labeler: one labeler (its labels go to `label`), or a mapping {array name: labeler} for a
    multi-label dataset ("label" first, then e.g. "keypoints", "depth"): the generator runs once per
    batch and every labeler reads its taps from that one pass.
    precision: "fp32", "bf16" or "auto" (bf16 where the device runs it natively): the generator
    and the labelers run under the same autocast; latents, softmax and uncertainty stay fp32.
    compile_labels: labelers that can (`can_compile`) label with their torch.compile'd pass.

    arrays: image uint8 (n,R,R,3); label uint8 (n,R,R) or float16 (n,K,R,R); uncertainty float16
    (n,R,R); per extra label array `<name>` float16 (n,K,R,R) and `uncertainty_<name>`; w float32
    (n,num_ws,w_dim) when store_w. columns: seed, score, score_top10 (and score_<name>,
    score_top10_<name> per extra), rejected (any labeler refused the sample).
    """
    labelers: Mapping[str, Any] = labeler if isinstance(labeler, Mapping) else {"label": labeler}
    if "label" not in labelers:
        raise ValueError(f"labelers {sorted(labelers)}: one of them must write the primary 'label' array")
    dev = torch.device(device)
    seeds = [sample_seed(run_seed, s) for s in sample_ids]
    parts: dict[str, list] = {"image": [], "w": []}
    cols: dict[str, list] = {"rejected": []}
    amp = resolve_precision(precision, dev) == torch.bfloat16
    every_tap = TapSpec()
    for i in range(0, len(seeds), batch):
        z = G.z_from_seeds(seeds[i : i + batch], dev)
        ws = G.mapping(z, psi=psi)
        rejected = torch.zeros(len(ws), dtype=torch.bool)
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=amp):
            image, taps = generate_with_taps(G, ws, every_tap)  # one synthesis pass for every labeler
            outs = {name: lab.label(GenBatch(ws, image, lab.tap_spec.select(taps, image), G=G, z=z),
                                    **({"compiled": True} if compile_labels and getattr(lab, "can_compile", False) else {}))
                    for name, lab in labelers.items()}
        for name, out in outs.items():
            lab = out.label.cpu().numpy()
            parts.setdefault(name, []).append(lab if lab.dtype == np.uint8 else lab.astype(np.float16))
            parts.setdefault(uncertainty_array(name), []).append(out.uncertainty.cpu().numpy().astype(np.float16))
            cols.setdefault(score_column(name), []).append(out.score.cpu().numpy().astype(np.float64))
            cols.setdefault(score_column(name, top10=True), []).append(out.score_top10.cpu().numpy().astype(np.float64))
            if out.rejected is not None:
                rejected |= out.rejected.cpu().bool()
        image = image.float()
        parts["image"].append(((image.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy())
        if store_w:
            parts["w"].append(ws.cpu().numpy().astype(np.float32))
        cols["rejected"].append(rejected.numpy())
    arrays = {k: np.concatenate(v) for k, v in parts.items() if v}
    columns = {"seed": np.asarray(seeds, dtype=np.int64), **{k: np.concatenate(v) for k, v in cols.items()}}
    return arrays, columns


class ShardSink(Protocol):
    """What `generate_shards` writes into (storage.ShardStore meets it; the core never imports storage)."""

    def shard_range(self, index: int) -> range: ...

    def write_shard(self, index: int, samples: dict[str, np.ndarray], rows: dict[str, np.ndarray]) -> Any: ...


def generate_shards(
    G,
    labeler,
    store: ShardSink,
    shard_indices: Iterable[int],
    run_seed: int,
    *,
    psi: float = 1.0,
    batch: int = 32,
    store_w: bool = True,
    device: str | torch.device = "cpu",
    precision: str = "fp32",
    compile_labels: bool = False,
    on_commit: Callable[[int, int], None] | None = None,
) -> list[int]:
    """Generate, label and commit whole shards, in order. A writer thread commits shard k
    (compression, checksums, read-back, manifest part) while shard k+1 is generated; at most one
    shard waits for it, so memory stays at two shards. A failed write raises here, before the next
    shard is handed over. Options as in `generate_samples`; on_commit(index, n) after each commit.
    Returns the committed indices."""
    done: list[int] = []
    pending: tuple[int, Future] | None = None

    def wait() -> None:
        if pending is not None:
            idx, fut = pending
            fut.result()
            done.append(idx)
            if on_commit is not None:
                on_commit(idx, len(store.shard_range(idx)))

    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="shard-writer") as writer:
        for idx in shard_indices:
            arrays, cols = generate_samples(
                G, labeler, list(store.shard_range(idx)), run_seed,
                psi=psi, batch=batch, store_w=store_w, device=device, precision=precision, compile_labels=compile_labels,
            )
            wait()
            pending = (idx, writer.submit(store.write_shard, idx, arrays, cols))
        wait()
    return done
