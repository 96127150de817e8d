"""Toy faces: a procedural stand-in for CelebAMask-HQ with exact ground truth.

Every image is a function of its seed alone (parameters come from a per-seed RNG; the renderer is
vectorised over the batch), so "real" labeled images are unlimited and the same seed gives the
same pixels anywhere. Shapes are signed-distance layers composited back to front; coverage
alpha = clamp(0.5 - sdf / pixel, 0, 1) gives analytic anti-aliasing. The label of a pixel is the
topmost layer covering at least half of it.
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np
import torch

from .base import LabeledSample, LabelSchema

CLASSES = ("background", "skin", "hair", "eyes", "brows", "nose", "mouth", "ears", "glasses", "hat")
COLORS = (
    (0, 0, 0), (230, 180, 140), (120, 60, 20), (255, 255, 255), (80, 40, 10),
    (255, 120, 0), (220, 20, 60), (160, 100, 220), (0, 200, 255), (40, 200, 40),
)
KEYPOINTS = ("left_eye", "right_eye", "nose_tip", "mouth_left", "mouth_right")
SCHEMA = LabelSchema(CLASSES, COLORS, KEYPOINTS)
RARE_CLASSES = ("glasses", "hat")
# No class is a left/right one (both eyes are "eyes"): a mirrored face has the mirrored labels, so
# a mirrored prediction can be averaged in class for class (labelfoundry.refine.relabel's mirror).
MIRROR_CLASSES = tuple(range(len(CLASSES)))

_SPLIT_BASE = {"train": 0, "val": 1_000_000_000, "test": 2_000_000_000}
_SKIN = np.array([[255, 224, 196], [234, 192, 160], [198, 145, 110], [150, 100, 70], [95, 62, 42]], np.float32)
_HAIR = np.array([[25, 20, 18], [80, 50, 30], [140, 95, 55], [215, 180, 110], [160, 60, 30], [170, 170, 170]], np.float32)
_IRIS = np.array([[60, 40, 25], [50, 90, 150], [70, 110, 60], [30, 25, 20]], np.float32)

Style = Literal["photo", "flat"]
# style="flat": one fixed cartoon colour per part, so the look is out of domain (no background
# gradient/texture, no shading, no per-face tones) while geometry, masks and keypoints stay those of
# "photo". Parts are classes plus the unlabelled iris/pupil and the glasses lens (under the eyes).
FLAT_COLORS: dict[str, tuple[int, int, int]] = {
    "background": (120, 200, 230), "skin": (255, 214, 120), "ears": (245, 170, 90), "hair": (150, 40, 170),
    "eyes": (255, 255, 255), "iris": (0, 170, 120), "pupil": (0, 0, 0), "brows": (90, 20, 110),
    "nose": (250, 120, 80), "mouth": (230, 0, 80), "lens": (200, 240, 255), "glasses": (30, 30, 60),
    "hat": (40, 110, 255),
}


def split_seeds(split: str, n: int, offset: int = 0) -> list[int]:
    """Seeds of a fixed split; the splits are disjoint ranges, so no image is in two of them."""
    if split not in _SPLIT_BASE:
        raise ValueError(f"unknown split {split!r}; choose one of {sorted(_SPLIT_BASE)}")
    if offset + n > 1_000_000_000:
        raise ValueError("a split holds at most 1e9 images")
    base = _SPLIT_BASE[split]
    return [base + offset + i for i in range(n)]


def face_params(seed: int) -> dict[str, np.ndarray]:
    """One face's parameters (position, shape, colours, hair style, accessories), a function of its
    seed alone. The order of draws is fixed, so adding fields goes at the end."""
    r = np.random.default_rng(seed)
    u = r.uniform
    p: dict[str, np.ndarray] = {}
    p["bg0"] = u(30, 230, 3)
    p["bg1"] = np.clip(p["bg0"] + u(-70, 70, 3), 0, 255)
    p["bg_angle"] = u(0, 2 * math.pi)
    p["tex_f"] = u(2.0, 6.0, 2)
    p["tex_ph"] = u(0, 2 * math.pi, 2)
    p["tex_amp"] = u(3, 12)
    p["cx"], p["cy"] = u(-0.1, 0.1), u(0.0, 0.12)
    p["rx"] = u(0.44, 0.54)
    p["ry"] = p["rx"] * u(1.08, 1.24)
    p["rot"] = u(-0.22, 0.22)
    t = u(0, 4)
    i = int(t)
    p["skin"] = _SKIN[i] + (t - i) * (_SKIN[min(i + 1, 4)] - _SKIN[i]) + u(-8, 8, 3)
    p["hair"] = _HAIR[r.integers(len(_HAIR))] + u(-15, 15, 3)
    p["hair_style"] = r.integers(4)  # 0 short, 1 medium, 2 long, 3 bangs
    p["hair_line"] = u(-0.55, -0.25)
    p["hair_puff"] = u(1.04, 1.18)
    p["eye_dx"], p["eye_dy"] = u(0.32, 0.42), u(-0.12, 0.02)
    p["eye_w"], p["eye_h"] = u(0.11, 0.16), u(0.06, 0.09)
    p["iris"] = _IRIS[r.integers(len(_IRIS))]
    p["gaze"] = u(-0.35, 0.35, 2)
    p["brow_dy"], p["brow_tilt"] = u(0.13, 0.2), u(-0.25, 0.25)
    p["nose_y"], p["nose_w"], p["nose_h"] = u(0.15, 0.25), u(0.07, 0.11), u(0.12, 0.2)
    p["mouth_y"], p["mouth_w"], p["mouth_h"] = u(0.46, 0.58), u(0.16, 0.26), u(0.03, 0.08)
    p["mouth_col"] = np.array([u(150, 210), u(40, 80), u(50, 90)])
    p["ear_w"], p["ear_h"] = u(0.1, 0.14), u(0.18, 0.24)
    p["glasses"] = float(r.random() < 0.05)
    p["glasses_col"] = u(0, 80, 3) if r.random() < 0.7 else u(120, 220, 3)
    p["hat"] = float(r.random() < 0.03)
    p["hat_col"] = u(20, 235, 3)
    p["hat_h"] = u(0.45, 0.7)
    return p


def _stack(params: list[dict], device) -> dict[str, torch.Tensor]:
    return {
        k: torch.as_tensor(np.stack([np.asarray(p[k], np.float32) for p in params]), device=device)
        for k in params[0]
    }


def _ellipse_sdf(x, y, cx, cy, a, b):
    """Approximate signed distance to an axis-aligned ellipse (exact for circles)."""
    q = torch.sqrt(((x - cx) / a) ** 2 + ((y - cy) / b) ** 2 + 1e-12)
    return (q - 1.0) * torch.minimum(a, b) if torch.is_tensor(a) else (q - 1.0) * min(a, b)


def _b(v: torch.Tensor) -> torch.Tensor:
    """(B,) -> (B,1,1) for broadcasting against (B,H,W) grids."""
    return v.reshape(-1, 1, 1)


@torch.no_grad()
def render(
    seeds: list[int], resolution: int = 64, device: str | torch.device = "cpu", style: Style = "photo"
) -> dict[str, np.ndarray]:
    """Render faces for `seeds`; `style` changes only the colours (see FLAT_COLORS), never the labels.

    Returns image uint8 (B,H,W,3), mask int64 (B,H,W) in CLASSES ids, keypoints float32 (B,5,3)
    as (x, y, visible) in pixel units (pixel centres at integer coordinates), depth float32 (B,H,W)
    (distance from the camera: background plane at 10, the head a relief towards the camera),
    has_glasses / has_hat bool (B,).
    """
    if resolution < 8 or resolution & (resolution - 1):
        raise ValueError(f"resolution must be a power of two >= 8, got {resolution}")
    if len(seeds) == 0:
        raise ValueError("render() needs at least one seed")
    if style not in ("photo", "flat"):
        raise ValueError(f"unknown style {style!r}; choose 'photo' or 'flat'")
    flat = style == "flat"
    P = _stack([face_params(int(s)) for s in seeds], device)
    B, R = len(seeds), resolution
    px = 2.0 / R  # size of one pixel in normalised coordinates
    lin = (torch.arange(R, device=device, dtype=torch.float32) + 0.5) * px - 1.0
    gy, gx = torch.meshgrid(lin, lin, indexing="ij")
    gx, gy = gx.expand(B, R, R), gy.expand(B, R, R)

    # Head frame: rotate the grid into the head's local coordinates (y down, units of the canvas).
    cos, sin = torch.cos(_b(P["rot"])), torch.sin(_b(P["rot"]))
    dx, dy = gx - _b(P["cx"]), gy - _b(P["cy"])
    lx, ly = cos * dx + sin * dy, -sin * dx + cos * dy
    rx, ry = _b(P["rx"]), _b(P["ry"])

    def cov(sdf: torch.Tensor) -> torch.Tensor:
        return (0.5 - sdf / px).clamp(0.0, 1.0)

    if flat:
        flat_col = {k: torch.tensor(v, dtype=torch.float32, device=device) for k, v in FLAT_COLORS.items()}
        img = flat_col["background"].expand(B, R, R, 3)
    else:
        # Background: linear gradient + low-frequency texture.
        ang = _b(P["bg_angle"])
        t = (0.5 + 0.5 * (torch.cos(ang) * gx + torch.sin(ang) * gy) / math.sqrt(2)).unsqueeze(-1)
        img = P["bg0"].reshape(B, 1, 1, 3) * (1 - t) + P["bg1"].reshape(B, 1, 1, 3) * t
        f, ph = P["tex_f"], P["tex_ph"]
        tex = torch.sin(math.pi * _b(f[:, 0]) * gx + _b(ph[:, 0])) * torch.sin(math.pi * _b(f[:, 1]) * gy + _b(ph[:, 1]))
        img = img + (_b(P["tex_amp"]) * tex).unsqueeze(-1)
    mask = torch.zeros(B, R, R, dtype=torch.int64, device=device)

    def layer(alpha: torch.Tensor, color: torch.Tensor, cls: int | None, part: str | None = None) -> None:
        """Composite one part over `img`; `part` names its flat colour when it is not its class's."""
        nonlocal img, mask
        a = alpha.unsqueeze(-1)
        if flat:
            color = flat_col[part or CLASSES[cls]].expand(B, 3)
        col = color.reshape(B, 1, 1, 3) if color.ndim == 2 else color
        img = img * (1 - a) + col * a
        if cls is not None:
            mask = torch.where(alpha >= 0.5, torch.full_like(mask, cls), mask)

    skin, hair = P["skin"], P["hair"]
    style = _b(P["hair_style"])
    # Ears, behind everything of the head.
    ex = rx * 0.98
    ear = torch.minimum(
        _ellipse_sdf(lx, ly, -ex, ry * 0.02, _b(P["ear_w"]) * rx * 2, _b(P["ear_h"]) * ry),
        _ellipse_sdf(lx, ly, ex, ry * 0.02, _b(P["ear_w"]) * rx * 2, _b(P["ear_h"]) * ry),
    )
    layer(cov(ear), skin * 0.92, CLASSES.index("ears"))
    # Long hair falls behind the head, down to the jaw.
    back = _ellipse_sdf(lx, ly, 0.0, ry * 0.25, rx * 1.3, ry * 1.05)
    back = torch.maximum(back, ly - ry * 0.85)
    back = torch.where(style == 2, back, torch.full_like(back, 9.0))
    layer(cov(back), hair * 0.85, CLASSES.index("hair"))
    # Head, shaded as a sphere-ish relief.
    head_sdf = _ellipse_sdf(lx, ly, 0.0, 0.0, rx, ry)
    rr = ((lx / rx) ** 2 + (ly / ry) ** 2).clamp(max=1.0)
    shade = (1.0 - 0.25 * rr - 0.08 * (lx / rx)).unsqueeze(-1)
    layer(cov(head_sdf), skin.reshape(B, 1, 1, 3) * shade, CLASSES.index("skin"))
    # Hair on top: a puffed ellipse cut by a hairline (curved; bangs come lower in the middle).
    top = _ellipse_sdf(lx, ly, 0.0, -ry * 0.05, rx * _b(P["hair_puff"]), ry * 1.02 * _b(P["hair_puff"]))
    line = _b(P["hair_line"]) * ry + 0.35 * ry * (lx / rx) ** 2
    line = torch.where(style == 3, line + 0.25 * ry * (1 - (lx / rx).abs().clamp(max=1.0)), line)
    line = torch.where(style == 0, line - 0.12 * ry, line)
    hair_sdf = torch.maximum(top, ly - line)
    sides = torch.maximum(_ellipse_sdf(lx, ly, 0.0, 0.0, rx * 1.08, ry * 1.01), ly - ry * 0.05)
    sides = torch.maximum(sides, rx * 0.86 - lx.abs())
    hair_sdf = torch.where(style >= 1, torch.minimum(hair_sdf, sides), hair_sdf)
    hstreak = (1.0 + 0.06 * torch.sin(lx / rx * 25.0)).unsqueeze(-1)
    layer(cov(hair_sdf), hair.reshape(B, 1, 1, 3) * hstreak, CLASSES.index("hair"))

    glasses = _b(P["glasses"]) > 0.5
    edx, edy = _b(P["eye_dx"]) * rx * 2, _b(P["eye_dy"]) * ry
    ew, eh = _b(P["eye_w"]) * rx * 2, _b(P["eye_h"]) * ry
    # Glasses lenses (tinted, labelled glasses) go under the eyes, which stay visible through them.
    lens = torch.minimum(
        _ellipse_sdf(lx, ly, -edx, edy, ew * 1.55, eh * 2.4), _ellipse_sdf(lx, ly, edx, edy, ew * 1.55, eh * 2.4)
    )
    lens = torch.where(glasses, lens, torch.full_like(lens, 9.0))
    layer(cov(lens) * 0.999, (skin * 0.7 + P["glasses_col"] * 0.3), CLASSES.index("glasses"), "lens")
    # Eyes: sclera + iris/pupil, both labelled eyes.
    eyes = torch.minimum(_ellipse_sdf(lx, ly, -edx, edy, ew, eh), _ellipse_sdf(lx, ly, edx, edy, ew, eh))
    layer(cov(eyes), torch.tensor([245.0, 245.0, 240.0], device=device).expand(B, 3), CLASSES.index("eyes"))
    gx_off, gy_off = _b(P["gaze"][:, 0]) * ew * 0.5, _b(P["gaze"][:, 1]) * eh * 0.4
    ir = eh * 0.85
    iris = torch.minimum(
        _ellipse_sdf(lx, ly, -edx + gx_off, edy + gy_off, ir, ir), _ellipse_sdf(lx, ly, edx + gx_off, edy + gy_off, ir, ir)
    )
    iris = torch.maximum(iris, eyes)  # clipped to the eye opening
    layer(cov(iris), P["iris"], None, "iris")
    pupil = torch.maximum(
        torch.minimum(
            _ellipse_sdf(lx, ly, -edx + gx_off, edy + gy_off, ir * 0.45, ir * 0.45),
            _ellipse_sdf(lx, ly, edx + gx_off, edy + gy_off, ir * 0.45, ir * 0.45),
        ),
        eyes,
    )
    layer(cov(pupil), torch.full((B, 3), 10.0, device=device), None, "pupil")
    # Brows: thin tilted ellipses above the eyes.
    by = edy - _b(P["brow_dy"]) * ry
    tilt = _b(P["brow_tilt"])
    brows = None
    for side in (-1.0, 1.0):
        bx = lx - side * edx
        byy = ly - by - side * tilt * bx
        s = _ellipse_sdf(bx, byy, 0.0, 0.0, ew * 1.15, eh * 0.38)
        brows = s if brows is None else torch.minimum(brows, s)
    layer(cov(brows), hair * 0.6, CLASSES.index("brows"))
    # Nose: a small rounded triangle, a shade darker than skin.
    ny, nw, nh = _b(P["nose_y"]) * ry, _b(P["nose_w"]) * rx * 2, _b(P["nose_h"]) * ry
    rel = ((ly - (ny - nh)) / nh).clamp(0.0, 1.0)
    nose = torch.maximum(lx.abs() - nw * (0.35 + 0.65 * rel), (ly - ny).abs() - nh)
    nose = torch.maximum(nose, -(ly - (ny - nh)))
    layer(cov(nose), skin * 0.78, CLASSES.index("nose"))
    # Mouth: a lens-shaped ellipse, the lower lip slightly fuller.
    my, mw, mh = _b(P["mouth_y"]) * ry, _b(P["mouth_w"]) * rx * 2, _b(P["mouth_h"]) * ry
    mouth = _ellipse_sdf(lx, ly, 0.0, my, mw, mh)
    layer(cov(mouth), P["mouth_col"], CLASSES.index("mouth"))
    # Glasses frames and bridge on top of the face.
    ring = torch.minimum(
        (_ellipse_sdf(lx, ly, -edx, edy, ew * 1.55, eh * 2.4)).abs() - px * 0.9,
        (_ellipse_sdf(lx, ly, edx, edy, ew * 1.55, eh * 2.4)).abs() - px * 0.9,
    )
    bridge = torch.maximum(lx.abs() - (edx - ew * 1.5), (ly - edy).abs() - px * 0.9)
    frame = torch.where(glasses, torch.minimum(ring, bridge), torch.full_like(ring, 9.0))
    layer(cov(frame), P["glasses_col"], CLASSES.index("glasses"))
    # Hat: a dome over the top of the head plus a brim.
    hat_on = _b(P["hat"]) > 0.5
    hy = -ry * (1.0 - _b(P["hat_h"]))
    dome = torch.maximum(_ellipse_sdf(lx, ly, 0.0, -ry * 0.1, rx * 1.15, ry * 1.2), ly - hy)
    brim = torch.maximum((ly - hy).abs() - ry * 0.08, lx.abs() - rx * 1.45)
    hat = torch.where(hat_on, torch.minimum(dome, brim), torch.full_like(dome, 9.0))
    layer(cov(hat), P["hat_col"], CLASSES.index("hat"))

    # Depth: background plane at 10; the head an ellipsoid relief, nose and hat on top of it.
    head_in = (head_sdf < 0) | (mask == CLASSES.index("hair")) & (hair_sdf < 0)
    relief = 2.0 * torch.sqrt((1.0 - ((lx / (rx * 1.1)) ** 2 + (ly / (ry * 1.1)) ** 2)).clamp(min=0.0))
    nose_bump = 0.35 * torch.exp(-((lx / nw) ** 2 + ((ly - ny) / nh) ** 2) * 2.0)
    depth = torch.full((B, R, R), 10.0, device=device)
    depth = torch.where(head_in, 10.0 - relief - nose_bump, depth)
    depth = torch.where(mask == CLASSES.index("ears"), torch.full_like(depth, 9.2), depth)
    depth = torch.where(mask == CLASSES.index("hat"), 10.0 - relief.clamp(min=1.0) - 0.25, depth)

    # Keypoints in local coordinates, mapped back to pixels.
    kl = torch.stack(
        [
            torch.stack([-edx + gx_off, edy + gy_off], -1),
            torch.stack([edx + gx_off, edy + gy_off], -1),
            torch.stack([torch.zeros_like(ny), ny + nh * 0.9], -1),
            torch.stack([-mw, my], -1),
            torch.stack([mw, my], -1),
        ],
        dim=1,
    ).reshape(B, 5, 2)
    c1, s1 = torch.cos(P["rot"])[:, None], torch.sin(P["rot"])[:, None]
    kx = c1 * kl[..., 0] - s1 * kl[..., 1] + P["cx"][:, None]
    ky = s1 * kl[..., 0] + c1 * kl[..., 1] + P["cy"][:, None]
    kx_pix, ky_pix = (kx + 1.0) / px - 0.5, (ky + 1.0) / px - 0.5
    inside = (kx_pix >= 0) & (kx_pix <= R - 1) & (ky_pix >= 0) & (ky_pix <= R - 1)
    ix = kx_pix.round().long().clamp(0, R - 1)
    iy = ky_pix.round().long().clamp(0, R - 1)
    under = mask[torch.arange(B, device=device)[:, None], iy, ix]
    occluded = (under == CLASSES.index("hat")) | (under == CLASSES.index("hair"))
    vis = (inside & ~occluded).float()
    keypoints = torch.stack([kx_pix, ky_pix, vis], dim=-1)

    return {
        "image": img.round().clamp(0, 255).to(torch.uint8).cpu().numpy(),
        "mask": mask.cpu().numpy(),
        "keypoints": keypoints.cpu().numpy().astype(np.float32),
        "depth": depth.cpu().numpy().astype(np.float32),
        "has_glasses": (P["glasses"] > 0.5).cpu().numpy(),
        "has_hat": (P["hat"] > 0.5).cpu().numpy(),
    }


def render_images(seeds: list[int], resolution: int = 64, chunk: int = 512, style: Style = "photo") -> np.ndarray:
    """Images only, rendered in chunks to bound memory: uint8 (B, H, W, 3)."""
    out = [render(seeds[i : i + chunk], resolution, style=style)["image"] for i in range(0, len(seeds), chunk)]
    return np.concatenate(out)


def samples(split: str, n: int, resolution: int = 64, offset: int = 0, style: Style = "photo") -> list[LabeledSample]:
    """`n` labeled images of a split as LabeledSamples: the built-in domain as a labeled source
    (style="flat": the same faces and labels in an out-of-domain look)."""
    seeds = split_seeds(split, n, offset)
    out: list[LabeledSample] = []
    for i in range(0, n, 512):
        batch = seeds[i : i + 512]
        r = render(batch, resolution, style=style)
        for j, s in enumerate(batch):
            out.append(
                LabeledSample(
                    sample_id=f"toyfaces-{split}-{s - _SPLIT_BASE[split]:07d}",
                    image=r["image"][j],
                    mask=r["mask"][j],
                    keypoints=r["keypoints"][j],
                    depth=r["depth"][j],
                    depth_valid=np.ones_like(r["depth"][j], dtype=bool),
                    meta={"seed": s, "has_glasses": bool(r["has_glasses"][j]), "has_hat": bool(r["has_hat"][j]), "style": style},
                )
            )
    return out
