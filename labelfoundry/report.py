"""Pictures and tables for humans: sample grids, uncertainty histograms, per-class counts."""

from __future__ import annotations

import base64
import io
import math
import re
from pathlib import Path

import numpy as np
from PIL import Image


def colorize(mask: np.ndarray, colors) -> np.ndarray:
    """Class ids (H,W) -> RGB uint8 (H,W,3) with the schema's colours."""
    pal = np.asarray(colors, dtype=np.uint8)
    return pal[np.clip(mask.astype(np.int64), 0, len(pal) - 1)]


def heat(u: np.ndarray, vmax: float | None = None) -> np.ndarray:
    """Uncertainty (H,W) -> RGB uint8 via a perceptual colormap."""
    import matplotlib

    v = u.astype(np.float32) / (vmax if vmax else max(float(u.max()), 1e-6))
    return (matplotlib.colormaps["magma"](np.clip(v, 0, 1))[..., :3] * 255).astype(np.uint8)


def depth_colormap(depth: np.ndarray, vmin: float, vmax: float) -> np.ndarray:
    """Depth (H,W) -> RGB uint8 (H,W,3), near = bright: one fixed [vmin, vmax] for every map of a
    figure, so prediction and ground truth compare by colour."""
    import matplotlib

    v = (vmax - depth.astype(np.float32)) / max(vmax - vmin, 1e-6)
    return (matplotlib.colormaps["viridis"](np.clip(v, 0, 1))[..., :3] * 255).astype(np.uint8)


def draw_keypoints(image: np.ndarray, pred_xy: np.ndarray | None, gt: np.ndarray, scale: int = 4) -> np.ndarray:
    """The image (H,W,3) upscaled `scale`x with keypoint peaks drawn: ground truth (K,3) rows of
    (x, y, visible) in pixels as green circles (visible ones only), predictions (K,2) (x, y) as red
    crosses. Pixel centres are at integer coordinates, as `segmenters.heatmaps` defines them."""
    from PIL import ImageDraw

    h, w = image.shape[:2]
    im = Image.fromarray(image).resize((w * scale, h * scale), Image.Resampling.NEAREST)
    draw = ImageDraw.Draw(im)
    r = max(2, scale)

    def at(x: float, y: float) -> tuple[float, float]:
        return (x + 0.5) * scale, (y + 0.5) * scale

    for x, y, vis in gt:
        if vis > 0:
            cx, cy = at(x, y)
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], outline=(0, 255, 0), width=max(1, scale // 3))
    for x, y in ([] if pred_xy is None else pred_xy):
        cx, cy = at(x, y)
        draw.line([cx - r, cy - r, cx + r, cy + r], fill=(255, 0, 0), width=max(1, scale // 3))
        draw.line([cx - r, cy + r, cx + r, cy - r], fill=(255, 0, 0), width=max(1, scale // 3))
    return np.asarray(im)


def sample_grid(images, labels=None, uncertainty=None, colors=None, max_rows: int = 8, scale: int = 2) -> np.ndarray:
    """Rows of [image | mask overlay | uncertainty] for up to `max_rows` samples, as one RGB array."""
    rows = []
    vmax = float(np.max(uncertainty[:max_rows])) if uncertainty is not None else None
    for i in range(min(max_rows, len(images))):
        img = images[i]
        cells = [img]
        if labels is not None and labels[i].ndim == 2:
            over = (0.45 * img + 0.55 * colorize(labels[i], colors)).astype(np.uint8)
            cells += [colorize(labels[i], colors), over]
        elif labels is not None:  # heatmaps / depth: show the channel maximum
            cells.append(heat(labels[i].max(0)))
        if uncertainty is not None:
            cells.append(heat(uncertainty[i].astype(np.float32), vmax))
        rows.append(np.concatenate(cells, axis=1))
    grid = np.concatenate(rows, axis=0)
    return np.kron(grid, np.ones((scale, scale, 1), dtype=np.uint8)) if scale > 1 else grid


def samples_grid(samples: list[dict], colors, max_rows: int = 8) -> np.ndarray:
    """`sample_grid` over samples as read from a store ({image, label, uncertainty?} dicts)."""
    unc = np.stack([x["uncertainty"] for x in samples]) if "uncertainty" in samples[0] else None
    return sample_grid(np.stack([x["image"] for x in samples]), np.stack([x["label"] for x in samples]), unc, colors, max_rows)


def save_png(array: np.ndarray, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path


def histogram_png(values: np.ndarray, path: str | Path, title: str, cut: float | None = None) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3), dpi=100)
    ax.hist(values, bins=40, color="#4477aa")
    if cut is not None:
        ax.axvline(cut, color="#cc3311", linestyle="--", label="filter cut")
        ax.legend()
    ax.set_title(title)
    ax.set_xlabel("image uncertainty score")
    ax.set_ylabel("samples")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path


def bar_png(names: list[str], series: dict[str, list[float]], path: str | Path, title: str, ylabel: str) -> Path:
    """Grouped bars, e.g. per-class IoU per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(5, len(names) * 0.8), 3.2), dpi=100)
    width = 0.8 / max(1, len(series))
    x = np.arange(len(names))
    for j, (label, vals) in enumerate(series.items()):
        ax.bar(x + j * width, [np.nan if v is None else v for v in vals], width, label=label)
    ax.set_xticks(x + 0.4 - width / 2, names, rotation=30, ha="right")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path


def fmt_number(v) -> str:
    """A number for people: 3 decimals, but a small non-zero value in scientific notation (a rare
    class's mean pixel fraction is 3.1e-04, not "0.000"); None / NaN as "—"."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "—"
    if isinstance(v, (bool, np.bool_)) or not isinstance(v, (float, np.floating)):
        return str(v)
    v = float(v)
    if v == 0:
        return "0"
    return f"{v:.1e}" if abs(v) < 0.01 else f"{v:.3f}"


def round_record(record: dict, digits: int = 4) -> dict:
    """Floats of a table-artifact row rounded to `digits` significant digits (other values kept)."""
    out = {}
    for k, v in record.items():
        if isinstance(v, (float, np.floating)) and math.isfinite(float(v)):
            v = float(f"{float(v):.{digits}g}")
        elif isinstance(v, (float, np.floating)):
            v = None
        out[k] = v
    return out


def markdown_table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(fmt_number(v) for v in r) + " |" for r in rows]
    return "\n".join(lines)


_IMAGE_LINK = re.compile(r"!\[([^\]]*)\]\(([^)\s]+)\)")


def image_data_uri(path: str | Path, max_side: int = 768, max_bytes: int = 150_000) -> str:
    """A PNG (or, when that is too large, JPEG) data URI of the image, downscaled so its longer side
    is at most `max_side` and its encoding at most ~`max_bytes`: browsers refuse file:// links in a
    web page, and the file may live on another machine (a worker pod)."""
    im = Image.open(path)
    im.load()
    im = im.convert("RGB")
    if max(im.size) > max_side:
        im.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
    while True:
        buf = io.BytesIO()
        im.save(buf, format="PNG", optimize=True)
        if buf.tell() <= max_bytes:
            return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")
        for quality in (85, 70, 50):
            buf = io.BytesIO()
            im.save(buf, format="JPEG", quality=quality)
            if buf.tell() <= max_bytes:
                return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")
        im.thumbnail((max(1, im.size[0] * 3 // 4), max(1, im.size[1] * 3 // 4)), Image.Resampling.LANCZOS)


def inline_images(markdown: str, base_dir: str | Path) -> str:
    """The markdown with every relative image link (``![alt](x.png)``, relative to `base_dir`)
    replaced by a data URI: the form a Prefect artifact shows in the UI. Links that are already
    URLs or data URIs are kept; a missing file keeps its text and says so."""

    def sub(m: re.Match) -> str:
        alt, target = m.group(1), m.group(2)
        if ":" in target.split("/")[0]:  # http:, https:, data:
            return m.group(0)
        path = Path(base_dir) / target
        if not path.is_file():
            return f"*({alt}: {target} is missing)*"
        return f"![{alt}]({image_data_uri(path)})"

    return _IMAGE_LINK.sub(sub, markdown)


def sweep_png(
    xs: list, panels: dict[str, dict[str, list]], path: str | Path, xlabel: str, title: str,
    reference: dict[str, dict[str, float | None]] | None = None,
) -> Path:
    """One panel per metric, one line per method over a swept setting (HandsOff Fig. 4);
    `reference`: per panel, constant lines (e.g. the oracle), drawn dashed. None values are gaps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(3.6 * len(panels), 3.2), dpi=100, squeeze=False)
    for ax, (name, series) in zip(axes[0], panels.items()):
        for label, ys in series.items():
            ax.plot(xs, [np.nan if y is None else y for y in ys], marker="o", label=label)
        for label, y in ((reference or {}).get(name) or {}).items():
            if y is not None:
                ax.axhline(y, color="gray", linestyle="--", linewidth=1, label=label)
        ax.set_title(name)
        ax.set_xlabel(xlabel)
        ax.set_xticks(xs[:: max(1, -(-len(xs) // 6))])  # at most 6 ticks: long sweeps stay legible
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("IoU")
    axes[0][-1].legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
