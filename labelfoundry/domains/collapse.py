"""Class-collapse mappings: many original dataset classes -> the few parts we train on.

Why: public part-segmentation datasets label finer parts (left/right eye, 24 clothing types) than
the paper trains on; HandsOff (App. B.2, Tab. 3) collapses them into 8-10 parts. A mapping lives
in a small YAML file so it can be read, diffed and cited instead of hiding in code::

    name: celebamask-hq-8
    source: HandsOff App. B.2, Tab. 3a
    classes:                 # collapsed ids are the list positions: 0, 1, 2, ...
      - name: background
        color: [0, 0, 0]     # optional; a default palette fills in missing colours
        ids: [0, 14, 15]     # original ids that become this class
      - name: skin
        ids: [1]
    ignore: [255]            # optional: original ids that become IGNORE_INDEX (255)

Ignored pixels get ``IGNORE_INDEX`` (255), the value the segmenter losses and metrics skip.
Presets ship in ``labelfoundry/presets/*.yaml`` and are read through ``importlib.resources`` so
they also work from an installed wheel.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from .base import LabelSchema

IGNORE_INDEX = 255
_PRESET_PACKAGE = "labelfoundry"
_PRESET_DIR = "presets"


class CollapseConfigError(ValueError):
    """A collapse YAML file (or preset name) cannot be used; the message names the file."""


class UnmappedIdsError(ValueError):
    """A mask holds original ids the mapping does not cover; ``ids`` lists them (sorted)."""

    def __init__(self, ids: list[int], mapping_name: str) -> None:
        self.ids = ids
        self.mapping_name = mapping_name
        shown = ", ".join(str(i) for i in ids[:20]) + (", ..." if len(ids) > 20 else "")
        super().__init__(f"ids {shown} are not in collapse mapping {mapping_name!r}")


class _ClassEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1)
    ids: list[int] = Field(min_length=1)
    color: tuple[int, int, int] | None = None

    @field_validator("color")
    @classmethod
    def _rgb(cls, c: tuple[int, int, int] | None) -> tuple[int, int, int] | None:
        if c is not None and not all(0 <= v <= 255 for v in c):
            raise ValueError(f"colour {list(c)} must be three integers in 0..255")
        return c


class _CollapseFile(BaseModel):
    """Schema of a collapse YAML file (unknown keys are typos, so they are refused)."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1)
    description: str = ""
    source: str = ""
    classes: list[_ClassEntry] = Field(min_length=1, max_length=IGNORE_INDEX)
    ignore: list[int] = Field(default_factory=list)


def default_palette(n: int) -> list[tuple[int, int, int]]:
    """n distinct colours, class 0 black: bits of the id spread over R, G, B from the top bit.

    Deterministic, so the same class keeps its colour across runs and machines.
    """
    colors = []
    for i in range(n):
        r = g = b = 0
        c = i
        for shift in range(7, -1, -1):
            r |= (c & 1) << shift
            g |= ((c >> 1) & 1) << shift
            b |= ((c >> 2) & 1) << shift
            c >>= 3
        colors.append((r, g, b))
    return colors


@dataclass(frozen=True)
class ClassCollapse:
    """original id -> collapsed id (or IGNORE_INDEX), plus the collapsed classes' names/colours."""

    name: str
    class_names: tuple[str, ...]
    colors: tuple[tuple[int, int, int], ...]
    mapping: dict[int, int]
    source: str = ""
    origin: str = ""  # the file it was read from, for error messages

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def has_ignore(self) -> bool:
        return IGNORE_INDEX in self.mapping.values()

    def schema(self, keypoint_names: tuple[str, ...] = ()) -> LabelSchema:
        """The LabelSchema of collapsed masks (ignored pixels are not a class)."""
        return LabelSchema(self.class_names, self.colors, tuple(keypoint_names))

    def unmapped_ids(self, mask: np.ndarray) -> list[int]:
        """Original ids present in ``mask`` that the mapping does not cover (sorted)."""
        return [int(v) for v in np.unique(mask) if int(v) not in self.mapping]

    def apply(self, mask: np.ndarray) -> np.ndarray:
        """Collapse an integer mask of original ids into int64 collapsed ids.

        Raises UnmappedIdsError naming every id the mapping lacks; the caller adds the file name.
        """
        mask = np.asarray(mask)
        if not np.issubdtype(mask.dtype, np.integer):
            raise TypeError(f"mask must hold integer class ids, got dtype {mask.dtype}")
        values, inverse = np.unique(mask, return_inverse=True)
        missing = [int(v) for v in values if int(v) not in self.mapping]
        if missing:
            raise UnmappedIdsError(missing, self.name)
        lut = np.array([self.mapping[int(v)] for v in values], dtype=np.int64)
        return lut[inverse].reshape(mask.shape)


def _fail(origin: str, problem: str, fix: str) -> CollapseConfigError:
    return CollapseConfigError(f"{origin}: {problem} — {fix}")


def parse_collapse(data: object, origin: str) -> ClassCollapse:
    """Validate parsed YAML ``data`` into a ClassCollapse; errors name ``origin``."""
    try:
        spec = _CollapseFile.model_validate(data)
    except ValidationError as e:
        lines = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or '<top>'}: {err['msg']}" for err in e.errors()
        )
        raise _fail(origin, f"invalid collapse mapping ({lines})",
                    "see the format in labelfoundry/domains/collapse.py") from None
    names = [c.name for c in spec.classes]
    dup_names = sorted({n for n in names if names.count(n) > 1})
    if dup_names:
        raise _fail(origin, f"class names {dup_names} appear more than once", "give each class a unique name")
    mapping: dict[int, int] = {}
    owner: dict[int, str] = {}
    targets = [(c.name, i, c.ids) for i, c in enumerate(spec.classes)] + [("ignore", IGNORE_INDEX, spec.ignore)]
    for cname, new_id, ids in targets:
        for oid in ids:
            if oid in mapping:
                raise _fail(origin, f"original id {oid} is listed under both {owner[oid]!r} and {cname!r}",
                            "list each original id under exactly one class (or under ignore)")
            mapping[oid] = new_id
            owner[oid] = cname
    palette = default_palette(len(spec.classes))
    colors = tuple(c.color if c.color is not None else palette[i] for i, c in enumerate(spec.classes))
    return ClassCollapse(spec.name, tuple(names), colors, mapping, spec.source, origin)


def list_presets() -> list[str]:
    """Names of the collapse presets shipped with the package (file stems in presets/)."""
    root = resources.files(_PRESET_PACKAGE).joinpath(_PRESET_DIR)
    if not root.is_dir():
        return []
    return sorted(p.name[: -len(".yaml")] for p in root.iterdir() if p.name.endswith(".yaml"))


def _load_yaml_text(text: str, origin: str) -> ClassCollapse:
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise _fail(origin, f"not valid YAML ({e})", "fix the YAML syntax") from None
    return parse_collapse(data, origin)


def _looks_like_path(name_or_path: str | Path) -> bool:
    if isinstance(name_or_path, Path):
        return True
    s = str(name_or_path)
    return "/" in s or "\\" in s or s.lower().endswith((".yaml", ".yml"))


def load_collapse(name_or_path: str | Path) -> ClassCollapse:
    """Load a preset by name (e.g. ``"celebamask-hq-8"``) or a YAML file by path.

    Anything that is a Path, contains a path separator, or ends in .yaml/.yml is a path; any
    other string is a preset name, so the current directory never changes what a name means.
    """
    if _looks_like_path(name_or_path):
        path = Path(name_or_path)
        if not path.is_file():
            raise _fail(str(path), "collapse file not found",
                        f"check the path, or use a preset name: {', '.join(list_presets())}")
        return _load_yaml_text(path.read_text(encoding="utf-8"), str(path))
    name = str(name_or_path)
    presets = list_presets()
    if name not in presets:
        raise CollapseConfigError(
            f"unknown collapse preset {name!r} — use one of: {', '.join(presets) or '(none shipped)'}, "
            "or pass the path of a collapse YAML file"
        )
    res = resources.files(_PRESET_PACKAGE).joinpath(_PRESET_DIR).joinpath(f"{name}.yaml")
    return _load_yaml_text(res.read_text(encoding="utf-8"), f"preset {name} ({_PRESET_DIR}/{name}.yaml)")
