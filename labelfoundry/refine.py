"""Self-training refinement of generated segmentation labels.

The label generator sees one pixel's hypercolumn at a time and was fitted on a few inverted faces;
a segmenter trained on thousands of its labelled images, then fine-tuned on the real labeled
images, sees whole shapes and real pixels. Its ensemble's predictions on the same generated images
are better labels than the ones it learnt from (measured on the built-in domain: downstream parts
mIoU 0.583 -> 0.600 at 16 labels, docs/evaluation.md). A second round adds almost nothing, so one
round is the method. The members' disagreement (JS divergence, as the label generator's ensemble)
is the refined labels' uncertainty, so the filter keeps working on them.

Plain PyTorch: `tasks/refine.py` trains the members side by side and writes the refined store.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from .segmenters import SegmenterConfig, TrainConfig, build_segmenter, train_segmenter
from .segmenters.batch import images_to_input
from .segmenters.models import Arch, Segmenter
from .uncertainty import image_scores, js_from_logits


def build_member(arch: Arch, num_classes: int, seed: int) -> Segmenter:
    """A fresh refiner network; its weights follow `seed` alone."""
    return build_segmenter(SegmenterConfig(arch=arch, task="segmentation", num_classes=num_classes), seed=seed)


def train_member(generated: Dataset, labeled: Dataset, *, arch: Arch, num_classes: int, train_cfg: TrainConfig,
                 finetune_steps: int, out_dir: str | Path, device: str = "cpu",
                 progress: Callable[[dict], None] | None = None) -> Segmenter:
    """One ensemble member: trained on the generated images with their labels, then fine-tuned on
    the labeled real images. Both phases checkpoint under out_dir and resume from it.
    progress: train_segmenter's reports; the fine-tune's carry "phase": "fine-tune"."""
    model = build_member(arch, num_classes, train_cfg.seed)
    train_segmenter(model, generated, train_cfg, task="segmentation", out_dir=Path(out_dir) / "generated", device=device,
                    progress=progress)
    ft = train_cfg.model_copy(update={"max_steps": finetune_steps})
    train_segmenter(model, labeled, ft, task="segmentation", out_dir=Path(out_dir) / "finetune", device=device,
                    progress=progress and (lambda d: progress({"phase": "fine-tune", **d})))
    return model.eval()


@torch.no_grad()
def relabel(members: list[torch.nn.Module], images: np.ndarray, *, batch: int = 64, device: str | torch.device = "cpu",
            mirror: Sequence[int] | None = None) -> dict[str, np.ndarray]:
    """The ensemble's labels for uint8 images (N, H, W, 3): arg-max of the members' mean softmax
    (uint8), the members' JS divergence per pixel (float32) and the per-image scores of
    `image_scores` (sum, top-10% mean; float64), the same quantities the label generator stores.
    mirror: also predict each mirrored image and average it in, unmirrored, with class c of the
    mirrored prediction counted as class mirror[c] (list(range(K)) where no class is left/right;
    None: no mirrored pass). Each member's prediction is then its mean over the two."""
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
        raise ValueError(f"relabel expects uint8 images (N, H, W, 3), got {images.dtype} {images.shape}")
    if not members:
        raise ValueError("relabel needs at least one member network")
    out: dict[str, list[np.ndarray]] = {"label": [], "uncertainty": [], "score": [], "score_top10": []}
    for m in members:
        m.eval()
    for i in range(0, len(images), batch):
        x = images_to_input(torch.from_numpy(np.ascontiguousarray(images[i : i + batch])).permute(0, 3, 1, 2).to(device))
        logits = torch.stack([m(x).float() for m in members])  # (M, n, K, H, W)
        if mirror is not None:
            if sorted(mirror) != list(range(logits.shape[2])):
                raise ValueError(f"mirror must be a permutation of the {logits.shape[2]} class ids, got {list(mirror)}")
            back = torch.stack([m(x.flip(-1)).float() for m in members]).flip(-1)  # (M, n, K, H, W), unmirrored
            inverse = torch.as_tensor(np.argsort(mirror), device=back.device)  # out class j = mirrored class mirror^-1(j)
            p = 0.5 * (logits.softmax(2) + back.softmax(2).index_select(2, inverse))
            logits = p.clamp_min(1e-30).log()  # normalised already: log_softmax gives it back
        js, mean_p = js_from_logits(logits, member_dim=0, class_dim=2)
        score, top10 = image_scores(js)
        out["label"].append(mean_p.argmax(1).to(torch.uint8).cpu().numpy())
        out["uncertainty"].append(js.cpu().numpy().astype(np.float32))
        out["score"].append(score.double().cpu().numpy())
        out["score_top10"].append(top10.double().cpu().numpy())
    return {k: np.concatenate(v) for k, v in out.items()}
