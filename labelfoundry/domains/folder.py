"""Read a folder of labeled real images into LabeledSamples at the generator's resolution.

Why: the label generator is trained on fewer than 50 real labeled images, so each one matters;
the reader checks the whole folder first and reports every problem at once (file, problem, fix)
instead of failing on the first or, worse, training on a silently misaligned mask.

Layout (``<id>`` is the file stem; ids are matched as strings, never parsed for numbers)::

    <root>/images/<id>.png|.jpg|.jpeg   RGB, RGBA/LA (composited over WHITE), grayscale
                                        (8/16-bit), palette -> uint8 RGB. EXIF rotation applied.
    <root>/masks/<id>.png               class ids: 8/16-bit single-channel PNG, or palette ("P")
                                        PNG whose *indices* are the ids, or an RGB colour mask
                                        decoded through ``palette={(r, g, b): id}`` (an RGB mask
                                        with R == G == B is read as ids without a palette).
    <root>/keypoints/<id>.json          {"keypoints": [[x, y, v], ...], "names": [...]?}
      or <root>/keypoints.csv           long format, header ``id,k,x,y,visible[,name]``: one row
                                        per (image, keypoint), k = 0-based keypoint index.
    <root>/depth/<id>.png | <id>.npy    16-bit PNG (depth = value * depth_scale, 0 = invalid) or
                                        float .npy (NaN / inf / <= 0 = invalid).

Keypoints are (x, y, v) in pixels of the original image with pixel centres at integer
coordinates (as in segmenters.heatmaps); v > 0 means labeled/visible (COCO 1/2 both kept as given).
For v = 0 rows, x / y may be null (JSON) or empty (CSV).

Each sample is center-cropped to a square and resized to ``resolution``: Lanczos (antialiased)
for images, nearest for masks, depth values and depth validity (nearest keeps depth from being
averaged across object edges). Keypoints go through the same transform and get v = 0 when the
crop removes them. Masks are collapsed (``collapse=``) before the ``num_classes`` check;
collapse ``ignore`` ids become 255, which the segmenter losses skip. Invalid depth pixels hold 0.

What is expected: masks when ``masks/`` exists or any of num_classes / collapse / palette is
given; keypoints when ``keypoints/`` or ``keypoints.csv`` exists; depth when ``depth/`` exists.
``masks=`` / ``keypoints=`` / ``depth=`` True requires them, False ignores them. ``limit`` keeps
the first N ids in sorted (string) order.

Refused up front, each as a problem naming the file: anything in images/ masks/ depth/ keypoints/
that is not a regular file (a FIFO or device would block or stream forever; it is never opened);
a mask, depth or keypoint file whose id has no image; an image whose shorter side is below
``MIN_IMAGE_SIDE`` pixels or below ``resolution / MAX_UPSCALE`` (it would be blown up into a blur);
an image over ``MAX_IMAGE_PIXELS`` pixels (a decompression bomb, refused from its header);
mask ids >= 255 after collapse (labels are stored as uint8 and 255 is the ignore index); and,
without ``num_classes`` or ``collapse``, mask ids >= ``MAX_CLASSES_WITHOUT_MAPPING`` (the class
count is max id + 1, so a stray 200 or 255 would silently create hundreds of classes).
"""

from __future__ import annotations

import csv
import json
import math
import re
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from .base import LabeledSample
from .collapse import IGNORE_INDEX, ClassCollapse, UnmappedIdsError, load_collapse

IMAGE_EXTS = (".png", ".jpg", ".jpeg")
MAX_LISTED_PROBLEMS = 20
MIN_IMAGE_SIDE = 4  # pixels; the shorter side of every image must reach it
MAX_UPSCALE = 8  # ... and also resolution / MAX_UPSCALE
MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS or 89_478_485  # PIL's own bomb threshold (~89.5 Mpx)
MAX_CLASSES_WITHOUT_MAPPING = 64  # largest class count inferred from mask ids alone
MAX_CLASS_ID = IGNORE_INDEX - 1  # 254: labels are uint8 and 255 means "ignore"
Color = tuple[int, int, int]
_SIXTEEN_BIT = ("I;16", "I;16B", "I;16L", "I")


# --------------------------------------------------------------------------- errors


@dataclass(frozen=True)
class Problem:
    """One thing wrong with the folder: which file, what is wrong, how to fix it."""

    file: str
    problem: str
    fix: str

    def __str__(self) -> str:
        return f"{self.file}: {self.problem} — {self.fix}"


class LabeledDataError(ValueError):
    """The labeled folder cannot be read; ``problems`` lists everything found (nothing was read)."""

    def __init__(self, root: Path | str, problems: list[Problem]) -> None:
        self.root = str(root)
        self.problems = list(problems)
        shown = [f"  {p}" for p in self.problems[:MAX_LISTED_PROBLEMS]]
        more = len(self.problems) - len(shown)
        if more > 0:
            shown.append(f"  ... and {more} more")
        n = len(self.problems)
        head = f"labeled folder {self.root}: {n} problem{'s' if n != 1 else ''}, nothing was read:"
        super().__init__("\n".join([head, *shown]))


class _Bad(Exception):
    """Raised by decoders; the caller turns it into a Problem that names the file."""

    def __init__(self, problem: str, fix: str) -> None:
        super().__init__(problem)
        self.problem = problem
        self.fix = fix


# --------------------------------------------------------------------------- options


def _parse_color(key: Any) -> Color:
    """A palette key: (r, g, b), "#rrggbb" or "r,g,b" (strings so YAML/JSON configs can hold it)."""
    if isinstance(key, str):
        s = key.strip()
        if s.startswith("#") and len(s) == 7:
            vals = [int(s[i : i + 2], 16) for i in (1, 3, 5)]
        else:
            vals = [int(v) for v in s.strip("()[] ").split(",")]
    else:
        vals = [int(v) for v in key]
    if len(vals) != 3 or not all(0 <= v <= 255 for v in vals):
        raise ValueError(f"palette colour {key!r} must be 3 values in 0..255")
    return (vals[0], vals[1], vals[2])


class LabeledFolderSpec(BaseModel):
    """Options of :func:`read_labeled_folder`, as a model so configs can carry them."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    path: Path
    resolution: int = Field(gt=0)
    num_classes: int | None = Field(default=None, gt=0, le=MAX_CLASS_ID + 1)  # labels are uint8, 255 = ignore
    collapse: str | None = None  # preset name or YAML path, see domains.collapse
    palette: dict[Color, int] | None = None  # colour -> ORIGINAL id (before collapse)
    masks: bool | None = None
    keypoints: bool | None = None
    depth: bool | None = None
    depth_scale: float = Field(default=1.0, gt=0)  # 16-bit PNG value * depth_scale = depth
    limit: int | None = Field(default=None, gt=0)

    @field_validator("collapse", mode="before")
    @classmethod
    def _collapse_str(cls, v: Any) -> Any:
        return str(v) if isinstance(v, Path) else v

    @field_validator("palette", mode="before")
    @classmethod
    def _palette_keys(cls, v: Any) -> Any:
        if v is None:
            return None
        if not isinstance(v, dict):
            raise ValueError("palette must be a dict {colour: class id}")
        out: dict[Color, int] = {}
        for key, cid in v.items():
            color = _parse_color(key)
            if color in out:
                raise ValueError(f"palette colour {color} is given twice")
            if isinstance(cid, bool) or not isinstance(cid, int) or cid < 0:
                raise ValueError(f"palette id for colour {color} must be an integer >= 0, got {cid!r}")
            out[color] = cid
        return out

    @model_validator(mode="after")
    def _consistent(self) -> "LabeledFolderSpec":
        if self.masks is False and (self.collapse or self.palette or self.num_classes):
            raise ValueError("masks=False but num_classes / collapse / palette were given; drop one")
        return self

    def check(self) -> list[Problem]:
        """Every problem with the folder (empty list = readable), without producing samples."""
        return _validate(_plan(self))

    def read(self) -> list[LabeledSample]:
        """Validate the whole folder, then read it; raises LabeledDataError listing all problems."""
        plan = _plan(self)
        problems = _validate(plan)
        if problems:
            raise LabeledDataError(plan.root, problems)
        return [_build(plan, e) for e in plan.entries]


def read_labeled_folder(
    path: str | Path,
    *,
    resolution: int,
    num_classes: int | None = None,
    collapse: str | None = None,
    palette: dict | None = None,
    keypoints: bool | None = None,
    depth: bool | None = None,
    limit: int | None = None,
    masks: bool | None = None,
    depth_scale: float = 1.0,
) -> list[LabeledSample]:
    """Read ``path`` (layout in the module docstring) into LabeledSamples, sorted by id.

    Everything is checked before anything is resized; all problems are raised together as one
    LabeledDataError. Option errors (bad palette, unknown collapse preset) raise immediately.
    """
    spec = LabeledFolderSpec(
        path=Path(path), resolution=resolution, num_classes=num_classes, collapse=collapse,
        palette=palette, masks=masks, keypoints=keypoints, depth=depth,
        depth_scale=depth_scale, limit=limit,
    )
    return spec.read()


# --------------------------------------------------------------------------- scanning


@dataclass
class _Entry:
    sample_id: str
    image: Path
    mask: Path | None = None
    keypoints: Path | None = None  # JSON file; CSV keypoints live in _Plan.keypoints
    depth: Path | None = None


@dataclass
class _Plan:
    """What will be read: the resolved options, the file of each sample and scan-time problems."""

    spec: LabeledFolderSpec
    root: Path
    collapse: ClassCollapse | None
    num_classes: int | None
    want_masks: bool = False
    want_keypoints: bool = False
    want_depth: bool = False
    keypoint_csv: Path | None = None
    entries: list[_Entry] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
    # id -> ((K, 3) float32 in original pixels, names or None, file label)
    keypoints: dict[str, tuple[np.ndarray, tuple[str, ...] | None, str]] = field(default_factory=dict)

    def rel(self, p: Path) -> str:
        try:
            return p.relative_to(self.root).as_posix()
        except ValueError:
            return str(p)


def _list_dir(plan: _Plan, sub: str, exts: tuple[str, ...], fix_type: str) -> dict[str, Path] | None:
    """stem -> file of ``root/sub`` (None if absent); odd extensions and duplicate stems are problems."""
    d = plan.root / sub
    if not d.is_dir():
        return None
    found: dict[str, list[Path]] = {}
    for p in sorted(d.iterdir()):
        if p.name.startswith(".") or p.is_dir():
            continue
        if not p.is_file():  # FIFO, socket, device, dangling link: opening it could block forever
            plan.problems.append(Problem(plan.rel(p), "not a regular file (a FIFO, socket, device or broken link)",
                                         f"replace it with a regular file or remove it from {sub}/"))
            continue
        if p.suffix.lower() not in exts:
            plan.problems.append(Problem(plan.rel(p), f"unsupported file type {p.suffix or '(none)'!r}", fix_type))
            continue
        found.setdefault(p.stem, []).append(p)
    out: dict[str, Path] = {}
    for stem, paths in found.items():
        if len(paths) > 1:
            names = ", ".join(q.name for q in paths)
            plan.problems.append(Problem(plan.rel(paths[0]), f"id {stem!r} has {len(paths)} files ({names})",
                                         f"keep exactly one file per id in {sub}/"))
        else:
            out[stem] = paths[0]
    return out


def _orphan_hint(files: dict[str, Path], image_ids: set[str], sub: str) -> str:
    orphans = sorted(s for s in files if s not in image_ids)
    if not orphans:
        return ""
    return (f" ({len(orphans)} file(s) in {sub}/ match no image, e.g. {files[orphans[0]].name!r}; "
            "names must equal the image's file stem exactly)")


def _plan(spec: LabeledFolderSpec) -> _Plan:
    """Resolve options and pair files by stem; folder-level problems are recorded, not raised."""
    collapse = load_collapse(spec.collapse) if spec.collapse else None
    num_classes = spec.num_classes
    if collapse is not None:
        if num_classes is not None and num_classes != collapse.num_classes:
            raise ValueError(f"num_classes={num_classes} but collapse {collapse.name!r} has "
                             f"{collapse.num_classes} classes; drop num_classes or fix it")
        num_classes = collapse.num_classes
    root = Path(spec.path)
    plan = _Plan(spec, root, collapse, num_classes)
    if not root.is_dir():
        plan.problems.append(Problem(str(root), "folder not found", "pass the folder that holds images/"))
        return plan

    images = _list_dir(plan, "images", IMAGE_EXTS, "images must be .png/.jpg/.jpeg; convert or move it")
    if images is None:
        loose = [p for p in root.iterdir() if p.suffix.lower() in IMAGE_EXTS]
        hint = f" ({len(loose)} images lie directly in the folder; move them into images/)" if loose else ""
        plan.problems.append(Problem("images/", "folder missing", f"put the images in images/<id>.png{hint}"))
        return plan
    if not images:
        plan.problems.append(Problem("images/", "no .png/.jpg/.jpeg images", "add images/<id>.png files"))
        return plan
    ids = sorted(images)
    if spec.limit is not None:
        ids = ids[: spec.limit]
    plan.entries = [_Entry(i, images[i]) for i in ids]
    all_ids = set(images)

    plan.want_masks = spec.masks if spec.masks is not None else (
        (root / "masks").is_dir() or bool(spec.num_classes or spec.collapse or spec.palette))
    if plan.want_masks:
        _pair(plan, "masks", (".png",), all_ids, "mask",
              "masks must be lossless PNG (JPEG blurs class ids at edges); re-save as PNG or move it",
              "or pass masks=False")
    plan.want_depth = spec.depth if spec.depth is not None else (root / "depth").is_dir()
    if plan.want_depth:
        _pair(plan, "depth", (".png", ".npy"), all_ids, "depth",
              "depth must be a 16-bit .png or a float .npy; convert or move it", "or pass depth=False")
    _plan_keypoints(plan, all_ids)
    return plan


def _pair(plan: _Plan, sub: str, exts: tuple[str, ...], all_ids: set[str], attr: str,
          fix_type: str, opt_out: str) -> None:
    """Attach ``root/sub/<id>.*`` to every entry; missing ones are problems."""
    files = _list_dir(plan, sub, exts, fix_type)
    if files is None:
        plan.problems.append(Problem(f"{sub}/", "folder missing", f"add {sub}/<id>{exts[0]} per image, {opt_out}"))
        return
    if not files:
        plan.problems.append(Problem(f"{sub}/", "folder is empty", f"add {sub}/<id>{exts[0]} per image, {opt_out}"))
        return
    hint = _orphan_hint(files, all_ids, sub)
    for stem in sorted(set(files) - all_ids):
        plan.problems.append(Problem(plan.rel(files[stem]), f"no images/{stem}.* for this {attr} file",
                                     f"add the image, rename the file to its image's stem, or remove it"))
    for e in plan.entries:
        if e.sample_id in files:
            setattr(e, attr, files[e.sample_id])
        else:
            plan.problems.append(Problem(plan.rel(e.image), f"no {sub}/{e.sample_id}{exts[0]} for this image",
                                         f"add it{hint}, {opt_out}"))


def _plan_keypoints(plan: _Plan, all_ids: set[str]) -> None:
    kp_dir, kp_csv = plan.root / "keypoints", plan.root / "keypoints.csv"
    spec = plan.spec
    plan.want_keypoints = spec.keypoints if spec.keypoints is not None else (kp_dir.is_dir() or kp_csv.is_file())
    if not plan.want_keypoints:
        return
    if kp_dir.is_dir() and kp_csv.is_file():
        plan.problems.append(Problem("keypoints.csv", "both keypoints/ and keypoints.csv exist",
                                     "keep one of them so there is one source of truth"))
        return
    if kp_csv.is_file():
        plan.keypoint_csv = kp_csv
        _read_keypoint_csv(plan, kp_csv)
        return
    _pair(plan, "keypoints", (".json",), all_ids, "keypoints",
          "keypoints must be <id>.json (or one keypoints.csv); move it", "or pass keypoints=False")


# --------------------------------------------------------------------------- keypoints


def _kp_row(x: Any, y: Any, v: Any) -> tuple[float, float, float]:
    """One (x, y, v) row; x/y may be missing only when v == 0."""
    try:
        vf = float(v)
    except (TypeError, ValueError):
        raise _Bad(f"visibility {v!r} is not a number", "use 0 (not labeled), 1 or 2 (labeled)") from None
    if not math.isfinite(vf) or vf < 0:
        raise _Bad(f"visibility {v!r} must be a finite number >= 0", "use 0 (not labeled), 1 or 2 (labeled)")
    if vf == 0 and (x in (None, "") or y in (None, "")):
        return 0.0, 0.0, 0.0
    try:
        xf, yf = float(x), float(y)
    except (TypeError, ValueError):
        raise _Bad(f"coordinates ({x!r}, {y!r}) are not numbers", "give x, y in pixels") from None
    if not (math.isfinite(xf) and math.isfinite(yf)):
        if vf == 0:
            return 0.0, 0.0, 0.0
        raise _Bad(f"labeled keypoint has non-finite coordinates ({x!r}, {y!r})",
                   "give finite pixel coordinates or set its visibility to 0")
    return xf, yf, vf


def _read_keypoint_json(path: Path) -> tuple[np.ndarray, tuple[str, ...] | None]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise _Bad(f"not readable JSON ({e})", "fix the JSON syntax") from None
    fmt = 'write {"keypoints": [[x, y, v], ...], "names": [...]}'
    if not isinstance(data, dict) or not isinstance(data.get("keypoints"), list):
        raise _Bad('no "keypoints" list at the top level', fmt)
    rows = []
    for i, row in enumerate(data["keypoints"]):
        if not isinstance(row, (list, tuple)) or len(row) != 3:
            raise _Bad(f"keypoint {i} is {row!r}, not [x, y, v]", fmt)
        try:
            rows.append(_kp_row(*row))
        except _Bad as b:
            raise _Bad(f"keypoint {i}: {b.problem}", b.fix) from None
    names = data.get("names")
    if names is not None:
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise _Bad('"names" is not a list of strings', 'write "names": ["left_eye", ...] or drop it')
        if len(names) != len(rows):
            raise _Bad(f'{len(names)} names but {len(rows)} keypoints', "give one name per keypoint")
        names = tuple(names)
    return np.array(rows, dtype=np.float32).reshape(-1, 3), names


def _read_keypoint_csv(plan: _Plan, path: Path) -> None:
    """Parse keypoints.csv into plan.keypoints; every malformed line is its own problem."""
    label = plan.rel(path)
    fix_fmt = "use header id,k,x,y,visible[,name] and one row per (image, keypoint)"
    try:
        with path.open(newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            header = [h.strip() for h in (reader.fieldnames or [])]
            missing = [c for c in ("id", "k", "x", "y", "visible") if c not in header]
            extra = [c for c in header if c not in ("id", "k", "x", "y", "visible", "name")]
            if missing or extra:
                what = (f"missing columns {missing}" if missing else "") + \
                       (f"{'; ' if missing else ''}unknown columns {extra}" if extra else "")
                plan.problems.append(Problem(label, what, fix_fmt))
                return
            reader.fieldnames = header
            rows: dict[str, dict[int, tuple[tuple[float, float, float], str | None, int]]] = {}
            for line_no, rec in enumerate(reader, start=2):
                sid = (rec["id"] or "").strip()
                try:
                    k = int((rec["k"] or "").strip())
                    if k < 0:
                        raise ValueError
                except ValueError:
                    plan.problems.append(Problem(f"{label} line {line_no}", f"k={rec['k']!r} is not an index >= 0",
                                                 "k is the 0-based keypoint index"))
                    continue
                try:
                    xyv = _kp_row((rec["x"] or "").strip(), (rec["y"] or "").strip(), (rec["visible"] or "").strip())
                except _Bad as b:
                    plan.problems.append(Problem(f"{label} line {line_no}", f"id {sid!r} k={k}: {b.problem}", b.fix))
                    continue
                per_id = rows.setdefault(sid, {})
                if k in per_id:
                    plan.problems.append(Problem(f"{label} line {line_no}",
                                                 f"id {sid!r} k={k} repeats line {per_id[k][2]}",
                                                 "keep one row per (id, k)"))
                    continue
                name = (rec.get("name") or "").strip() or None
                per_id[k] = (xyv, name, line_no)
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        plan.problems.append(Problem(label, f"not readable CSV ({e})", fix_fmt))
        return
    for e in plan.entries:
        per_id = rows.get(e.sample_id)
        if per_id is None:
            plan.problems.append(Problem(label, f"no rows for id {e.sample_id!r} ({plan.rel(e.image)})",
                                         "add its keypoints; ids must equal image file stems exactly"))
            continue
        ks = sorted(per_id)
        if ks != list(range(len(ks))):
            gaps = sorted(set(range(max(ks) + 1)) - set(ks))
            plan.problems.append(Problem(label, f"id {e.sample_id!r} lacks rows for k={gaps}",
                                         "list every keypoint k = 0..K-1 (visible=0 for unlabeled ones)"))
            continue
        arr = np.array([per_id[k][0] for k in ks], dtype=np.float32).reshape(-1, 3)
        names = [per_id[k][1] for k in ks]
        plan.keypoints[e.sample_id] = (arr, tuple(names) if all(names) else None, f"{label} (id {e.sample_id!r})")


def _check_keypoint_bounds(kp: np.ndarray, size: tuple[int, int]) -> None:
    w, h = size
    vis = kp[:, 2] > 0
    if not vis.any():
        return
    x, y = kp[vis, 0], kp[vis, 1]
    bad = np.flatnonzero(vis)[(x < -1) | (x > w) | (y < -1) | (y > h)]
    if bad.size:
        i = int(bad[0])
        raise _Bad(f"keypoint {i} at ({kp[i, 0]:g}, {kp[i, 1]:g}) lies outside the {w}x{h} image"
                   + (f" ({bad.size} such keypoints)" if bad.size > 1 else ""),
                   "give x, y in pixels of the original image (x = column, y = row) or set v = 0")
    in_unit = np.all((x >= 0) & (x <= 1) & (y >= 0) & (y <= 1))
    fractional = np.any((x > 0) & (x < 1)) or np.any((y > 0) & (y < 1))
    if vis.sum() >= 2 and min(w, h) >= 16 and in_unit and fractional:
        raise _Bad("all labeled keypoints lie in [0, 1]: coordinates look normalized",
                   "multiply x by the image width and y by its height (pixel units)")


def _check_keypoint_consistency(plan: _Plan) -> list[Problem]:
    """Every sample must list the same number of keypoints, with the same names where given."""
    probs: list[Problem] = []
    items = [(e.sample_id, plan.keypoints[e.sample_id]) for e in plan.entries if e.sample_id in plan.keypoints]
    if not items:
        return probs
    counts = Counter(kp.shape[0] for _, (kp, _, _) in items)
    ref = counts.most_common(1)[0][0]
    for sid, (kp, _, label) in items:
        if kp.shape[0] != ref:
            probs.append(Problem(label, f"has {kp.shape[0]} keypoints but {counts[ref]} other sample(s) have {ref}",
                                 "list the same keypoints in the same order everywhere (v = 0 for unlabeled)"))
    named = [(label, names) for _, (kp, names, label) in items if names is not None and kp.shape[0] == ref]
    if named:
        ref_names = Counter(n for _, n in named).most_common(1)[0][0]
        for label, names in named:
            if names != ref_names:
                diff = next(i for i, (a, b) in enumerate(zip(names, ref_names)) if a != b)
                probs.append(Problem(label, f"keypoint {diff} is named {names[diff]!r}, elsewhere {ref_names[diff]!r}",
                                     "use the same names in the same order in every file"))
    return probs


# --------------------------------------------------------------------------- decoding


def _bomb(size: tuple[int, int]) -> _Bad:
    return _Bad(f"declares {_size_text(size)} = {size[0] * size[1]:,} pixels, over the limit of "
                f"{MAX_IMAGE_PIXELS:,} (a decompression bomb, or a far too large image); it was not decoded",
                "downscale it (labeled images are resized to the generator's resolution anyway)")


def _open(path: Path) -> Image.Image:
    """Fully decode an image file (truncation shows up here), with EXIF rotation applied. The size
    in the header is checked before decoding, so a decompression bomb is refused unread."""
    if not path.is_file():
        raise _Bad("not a regular file (a FIFO, socket, device or broken link)", "replace it with a regular file")
    try:
        with warnings.catch_warnings():  # sizes between 1x and 2x PIL's limit: refused below, not warned
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(path)
        with im:
            if im.size[0] * im.size[1] > MAX_IMAGE_PIXELS:
                raise _bomb(im.size)
            im.load()
            out = ImageOps.exif_transpose(im)
            out.load()
            return out
    except Image.DecompressionBombError as e:  # PIL's own check in Image.open (header size)
        m = re.search(r"\((\d+) pixels\)", str(e))
        raise _Bad(f"{m.group(1) + ' pixels' if m else 'image size'} exceeds the decompression-bomb limit "
                   f"of {MAX_IMAGE_PIXELS:,} pixels; it was not decoded",
                   "downscale it (labeled images are resized to the generator's resolution anyway)") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        if "Decompressed Data Too Large" in str(e):  # a PNG text/ICC chunk that inflates without bound
            raise _Bad("a metadata chunk decompresses to more than PIL's limit (a decompression bomb)",
                       "re-save the image without its metadata (e.g. PIL: Image.open(f).save(g))") from None
        raise _Bad(f"cannot be decoded ({type(e).__name__}: {e})",
                   "the file is truncated or corrupt; re-export or re-download it") from None


def _to_rgb(im: Image.Image) -> np.ndarray:
    """uint8 (H, W, 3). Transparent pixels are composited over white (GAN training images have
    opaque, often white, backgrounds; the colour under alpha = 0 is arbitrary)."""
    if im.mode in _SIXTEEN_BIT:
        a = np.asarray(im).astype(np.float64)
        if im.mode.startswith("I;16") or a.max(initial=0) > 255:
            a = a / 257.0
        g = np.clip(np.rint(a), 0, 255).astype(np.uint8)
        return np.repeat(g[..., None], 3, axis=2)
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in im.info:
        rgba = np.asarray(im.convert("RGBA")).astype(np.uint32)
        a = rgba[..., 3:4]
        rgb = (rgba[..., :3] * a + 255 * (255 - a) + 127) // 255
        return rgb.astype(np.uint8)
    return np.asarray(im.convert("RGB"), dtype=np.uint8)


def _mask_ids(im: Image.Image, palette: dict[Color, int] | None) -> np.ndarray:
    """Integer (H, W) original class ids from a mask image (see module docstring for modes)."""
    mode = im.mode
    if mode in ("P", "L", "1") or mode in _SIXTEEN_BIT:
        return np.asarray(im).astype(np.int64)
    if mode in ("RGB", "RGBA"):
        rgb = np.asarray(im.convert("RGB")).astype(np.int64)
        if palette:
            return _decode_colors(rgb, palette)
        if np.array_equal(rgb[..., 0], rgb[..., 1]) and np.array_equal(rgb[..., 0], rgb[..., 2]):
            return rgb[..., 0]
        raise _Bad("RGB colour mask but no palette given",
                   "pass palette={(r, g, b): class_id, ...} or save class ids as a single-channel PNG")
    raise _Bad(f"unsupported mask mode {mode!r}",
               "save class ids as an 8/16-bit single-channel, palette ('P') or RGB colour PNG")


def _decode_colors(rgb: np.ndarray, palette: dict[Color, int]) -> np.ndarray:
    codes = (rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2]
    values, inverse = np.unique(codes, return_inverse=True)
    lut = {(r << 16) | (g << 8) | b: cid for (r, g, b), cid in palette.items()}
    unknown = [int(v) for v in values if int(v) not in lut]
    if unknown:
        cols = ", ".join(str(((v >> 16) & 255, (v >> 8) & 255, v & 255)) for v in unknown[:8])
        more = f" and {len(unknown) - 8} more" if len(unknown) > 8 else ""
        raise _Bad(f"colours {cols}{more} are not in the palette",
                   "add them to palette, or export the mask without anti-aliasing/compression")
    return np.array([lut[int(v)] for v in values], dtype=np.int64)[inverse].reshape(codes.shape)


def _ids_are(ids: list[int]) -> str:
    """'id 7 is' / 'ids 6, 7 are' (at most 20 listed)."""
    if len(ids) == 1:
        return f"id {ids[0]} is"
    more = ", ..." if len(ids) > 20 else ""
    return f"ids {', '.join(str(i) for i in ids[:20])}{more} are"


def _mask_classes(plan: _Plan, im: Image.Image) -> np.ndarray:
    """int64 (H, W) final class ids: decode, collapse, then check against num_classes."""
    ids = _mask_ids(im, plan.spec.palette)
    if plan.collapse is not None:
        try:
            ids = plan.collapse.apply(ids)
        except UnmappedIdsError as e:
            raise _Bad(f"{_ids_are(e.ids)} not in collapse mapping {plan.collapse.name!r}",
                       "fix the mask, or add the ids to the mapping (a class or its ignore list)") from None
    allowed_ignore = plan.collapse is not None and plan.collapse.has_ignore
    big = [int(v) for v in np.unique(ids) if v > MAX_CLASS_ID and not (allowed_ignore and v == IGNORE_INDEX)]
    if big:
        raise _Bad(f"{_ids_are(big)} above {MAX_CLASS_ID} (labels are stored as uint8 and 255 means 'ignore')",
                   "map the ids to 0..N-1 with collapse= (a YAML mapping; put void ids on its ignore list)")
    if plan.num_classes is None and plan.collapse is None:
        over = [int(v) for v in np.unique(ids) if v >= MAX_CLASSES_WITHOUT_MAPPING]
        if over:
            raise _Bad(f"{_ids_are(over)} >= {MAX_CLASSES_WITHOUT_MAPPING} with neither num_classes nor collapse "
                       f"given: the class count would be {max(over) + 1}",
                       "pass num_classes= (ids at or above it are refused) or map the ids with collapse=")
    if plan.num_classes is not None:
        vals = np.unique(ids)
        bad = [int(v) for v in vals if (v < 0 or v >= plan.num_classes) and not (allowed_ignore and v == IGNORE_INDEX)]
        if bad:
            raise _Bad(f"{_ids_are(bad)} >= num_classes={plan.num_classes}",
                       "fix the mask, raise num_classes, or map the ids with collapse=")
    return ids


def _depth(path: Path, scale: float) -> tuple[np.ndarray, np.ndarray]:
    """float32 depth (0 where invalid) and bool validity from a 16-bit PNG or float .npy."""
    if path.suffix.lower() == ".npy":
        try:
            raw = np.load(path, allow_pickle=False)
        except (OSError, ValueError, EOFError) as e:
            raise _Bad(f"cannot be read as .npy ({e})", "re-save it with numpy.save") from None
        if raw.ndim == 3 and raw.shape[2] == 1:
            raw = raw[..., 0]
        if raw.ndim != 2 or not (np.issubdtype(raw.dtype, np.floating) or np.issubdtype(raw.dtype, np.integer)):
            raise _Bad(f"array has shape {raw.shape} and dtype {raw.dtype}", "save a 2-D (H, W) float array")
        d = raw.astype(np.float32)
        valid = np.isfinite(d) & (d > 0)
    else:
        im = _open(path)
        if im.mode not in _SIXTEEN_BIT:
            raise _Bad(f"depth PNG has mode {im.mode!r}, not 16-bit single-channel",
                       "save depth as a 16-bit PNG (value * depth_scale = depth) or as a float .npy")
        raw16 = np.asarray(im)
        d = raw16.astype(np.float32) * np.float32(scale)
        valid = raw16 > 0
    d = np.where(valid, d, np.float32(0)).astype(np.float32)
    return d, valid


# --------------------------------------------------------------------------- geometry


@dataclass(frozen=True)
class _Crop:
    """Center square crop of a (w, h) image, then resize to r x r."""

    left: int
    top: int
    side: int
    r: int

    @classmethod
    def of(cls, size: tuple[int, int], r: int) -> "_Crop":
        w, h = size
        side = min(w, h)
        return cls((w - side) // 2, (h - side) // 2, side, r)

    def _index(self, offset: int) -> np.ndarray:
        # output pixel i covers source [i, i+1) * side / r; take the source pixel under its centre
        idx = np.floor((np.arange(self.r) + 0.5) * self.side / self.r).astype(np.int64)
        return offset + np.clip(idx, 0, self.side - 1)

    def nearest(self, a: np.ndarray) -> np.ndarray:
        return a[np.ix_(self._index(self.top), self._index(self.left))]

    def image(self, rgb: np.ndarray) -> np.ndarray:
        # crop first so the filter never pulls in pixels from outside the square
        sq = np.ascontiguousarray(rgb[self.top : self.top + self.side, self.left : self.left + self.side])
        if self.side == self.r:
            return sq.copy()
        out = Image.fromarray(sq).resize((self.r, self.r), Image.Resampling.LANCZOS)
        return np.asarray(out, dtype=np.uint8).copy()

    def keypoints(self, kp: np.ndarray) -> np.ndarray:
        """Pixel-centre convention: x' + 0.5 = (x - left + 0.5) * r / side; cropped-away -> v = 0."""
        s = self.r / self.side
        out = kp.astype(np.float32).copy()
        out[:, 0] = (kp[:, 0] - self.left + 0.5) * s - 0.5
        out[:, 1] = (kp[:, 1] - self.top + 0.5) * s - 0.5
        inside = (out[:, 0] >= -0.5) & (out[:, 0] < self.r - 0.5) & (out[:, 1] >= -0.5) & (out[:, 1] < self.r - 0.5)
        out[~inside, 2] = 0.0
        return out


# --------------------------------------------------------------------------- validate / build


def _size_text(size: tuple[int, int]) -> str:
    return f"{size[0]}x{size[1]}"


def _validate(plan: _Plan) -> list[Problem]:
    """All problems of the folder: scan-time ones plus a full decode of every selected file."""
    problems = list(plan.problems)
    for e in plan.entries:
        problems.extend(_validate_entry(plan, e))
    problems.extend(_check_keypoint_consistency(plan))
    return problems


def _validate_entry(plan: _Plan, e: _Entry) -> list[Problem]:
    probs: list[Problem] = []
    img_file = plan.rel(e.image)
    try:
        size = _open(e.image).size
        need = max(MIN_IMAGE_SIDE, math.ceil(plan.spec.resolution / MAX_UPSCALE))
        if min(size) < need:
            raise _Bad(f"is {_size_text(size)}: its shorter side is below the minimum of {need} px "
                       f"(at least {MIN_IMAGE_SIDE} px and 1/{MAX_UPSCALE} of the {plan.spec.resolution} px output)",
                       "use the full-size image (it is cropped and resized to the generator's resolution) or remove it")
    except _Bad as b:
        probs.append(Problem(img_file, b.problem, b.fix))
        size = None
    if e.mask is not None:
        try:
            im = _open(e.mask)
            if size is not None and im.size != size:
                raise _Bad(f"mask is {_size_text(im.size)} but {img_file} is {_size_text(size)} (WxH)",
                           "export the mask at its image's pixel size")
            _mask_classes(plan, im)
        except _Bad as b:
            probs.append(Problem(plan.rel(e.mask), b.problem, b.fix))
    if e.depth is not None:
        try:
            d, valid = _depth(e.depth, plan.spec.depth_scale)
            dsize = (d.shape[1], d.shape[0])
            if size is not None and dsize != size:
                raise _Bad(f"depth is {_size_text(dsize)} but {img_file} is {_size_text(size)} (WxH)",
                           "save depth at its image's pixel size")
            if not valid.any():
                raise _Bad("no valid depth pixels (all 0, NaN, inf or <= 0)",
                           "check the file; 16-bit PNG 0 and non-positive .npy values mean invalid")
        except _Bad as b:
            probs.append(Problem(plan.rel(e.depth), b.problem, b.fix))
    if e.keypoints is not None:
        try:
            kp, names = _read_keypoint_json(e.keypoints)
            plan.keypoints[e.sample_id] = (kp, names, plan.rel(e.keypoints))
        except _Bad as b:
            probs.append(Problem(plan.rel(e.keypoints), b.problem, b.fix))
    if e.sample_id in plan.keypoints and size is not None:
        kp, _, label = plan.keypoints[e.sample_id]
        try:
            _check_keypoint_bounds(kp, size)
        except _Bad as b:
            probs.append(Problem(label, b.problem, b.fix))
    return probs


def _build(plan: _Plan, e: _Entry) -> LabeledSample:
    """Decode and transform one already-validated sample."""
    try:
        return _build_unchecked(plan, e)
    except _Bad as b:  # the file changed after validation
        raise LabeledDataError(plan.root, [Problem(plan.rel(e.image), b.problem, b.fix)]) from None


def _build_unchecked(plan: _Plan, e: _Entry) -> LabeledSample:
    im = _open(e.image)
    crop = _Crop.of(im.size, plan.spec.resolution)
    files = {"image": plan.rel(e.image)}
    meta: dict[str, Any] = {"root": str(plan.root.resolve()), "files": files, "original_size": im.size,
                            "crop": {"left": crop.left, "top": crop.top, "side": crop.side}}
    sample = LabeledSample(e.sample_id, crop.image(_to_rgb(im)), meta=meta)
    if e.mask is not None:
        files["mask"] = plan.rel(e.mask)
        sample.mask = crop.nearest(_mask_classes(plan, _open(e.mask))).astype(np.int64)
        if plan.collapse is not None:
            meta["collapse"] = plan.collapse.name
    if e.sample_id in plan.keypoints:
        kp, names, label = plan.keypoints[e.sample_id]
        files["keypoints"] = plan.rel(e.keypoints) if e.keypoints is not None else plan.rel(plan.keypoint_csv)
        sample.keypoints = crop.keypoints(kp)
        if names is not None:
            meta["keypoint_names"] = list(names)
    if e.depth is not None:
        files["depth"] = plan.rel(e.depth)
        d, valid = _depth(e.depth, plan.spec.depth_scale)
        sample.depth = crop.nearest(d).astype(np.float32)
        sample.depth_valid = crop.nearest(valid).astype(bool)
    return sample
