"""The dataset layout: what ``dataset.json`` records and where every file lives.

Keeping key names and the layout dict in one module means the writer, the
readers and ``verify`` cannot disagree about paths.
"""

from __future__ import annotations

import json
import math
import posixpath
import re
from dataclasses import dataclass, field
from typing import Any

from labelfoundry.label_arrays import score_column, uncertainty_array  # noqa: F401 (re-exported)

FORMAT_NAME = "labelfoundry.shards"
FORMAT_VERSION = 1

DATASET_JSON = "dataset.json"
DATA_DIR = "data.zarr"
MANIFEST_DIR = "manifest"
FILTERS_DIR = "filters"

ARRAY_ORDER = ("image", "label", "uncertainty", "w")
LABEL_DTYPES = ("uint8", "float16")
LABEL_TASKS = ("segmentation", "keypoints", "depth")
COMPRESSIONS = ("zstd", "blosc", "none")

_PART_RE = re.compile(r"^shard-(\d{6,})\.parquet$")
_FILTER_NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")
# Keys that ``dataset.json`` may differ in without being a different layout.
_NON_LAYOUT_KEYS = ("provenance", "created_at", "created_with")


def manifest_part_name(index: int) -> str:
    """File name of shard ``index``'s manifest part (relative to ``manifest/``)."""
    return f"shard-{index:06d}.parquet"


def manifest_part_key(index: int) -> str:
    """Key of shard ``index``'s manifest part relative to the dataset root."""
    return f"{MANIFEST_DIR}/{manifest_part_name(index)}"


def parse_manifest_part_name(name: str) -> int | None:
    """Shard index of a manifest part file name, or None for other files (temp files)."""
    match = _PART_RE.match(name)
    return int(match.group(1)) if match else None


def filter_key(name: str) -> str:
    """Key of the flags file of filter ``name`` relative to the dataset root."""
    if not _FILTER_NAME_RE.match(name):
        raise ValueError(
            f"invalid filter name {name!r}: use letters, digits, '_', '-' or '.' "
            "(it becomes the file name filters/<name>.parquet)"
        )
    return f"{FILTERS_DIR}/{name}.parquet"


def fraction_column(class_name: str) -> str:
    """Manifest column holding the pixel fraction of ``class_name``."""
    return "frac_" + re.sub(r"\W+", "_", str(class_name)).strip("_")


def to_json_value(value: Any, what: str) -> Any:
    """Round-trip ``value`` through JSON so tuples/lists compare equal after reload."""
    try:
        return json.loads(json.dumps(value, sort_keys=True))
    except (TypeError, ValueError) as exc:
        raise ValueError(
            f"{what} must be JSON-serialisable (it is stored in {DATASET_JSON}): {exc}; "
            "convert values to str/int/float/bool/list/dict"
        ) from exc


@dataclass(frozen=True)
class ArraySpec:
    """Per-sample shape and dtype of one Zarr array (the leading N axis is implied)."""

    shape: tuple[int, ...]
    dtype: str
    dims: tuple[str, ...]

    def to_dict(self) -> dict[str, Any]:
        return {"shape": list(self.shape), "dtype": self.dtype, "dims": list(self.dims)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ArraySpec":
        return cls(tuple(int(s) for s in data["shape"]), str(data["dtype"]), tuple(data["dims"]))


@dataclass(frozen=True)
class Layout:
    """Everything that fixes the bytes on disk; stored in ``dataset.json``."""

    num_samples: int
    samples_per_shard: int
    arrays: dict[str, ArraySpec]
    schema: dict[str, Any]
    compression: dict[str, Any]
    provenance: dict[str, Any] = field(default_factory=dict)
    labels: dict[str, str] = field(default_factory=dict)  # label array -> task; {} = the single `label`

    @property
    def label_arrays(self) -> dict[str, str]:
        """Every label array and its task: {"label": task} for a single-type dataset; a multi-label
        dataset adds one array per extra task (`keypoints`, `depth`, ...)."""
        return dict(self.labels) if self.labels else {"label": self._single_task()}

    def _single_task(self) -> str:
        if self.is_segmentation:
            return "segmentation"
        task = self.provenance.get("task")
        if task in LABEL_TASKS:
            return str(task)
        return "depth" if self.arrays["label"].shape[0] == 1 else "keypoints"

    def checksum_arrays(self) -> list[str]:
        """Arrays covered by each sample's checksum, in hashing order: image, label, uncertainty,
        then each extra label array and its uncertainty (so single-type checksums never change)."""
        names = ["image", "label", "uncertainty"]
        for name in sorted(a for a in self.label_arrays if a != "label"):
            names += [name, uncertainty_array(name)]
        return [n for n in names if n in self.arrays]

    @property
    def num_shards(self) -> int:
        return math.ceil(self.num_samples / self.samples_per_shard)

    @property
    def is_segmentation(self) -> bool:
        """uint8 labels are class maps; per-class pixel fractions go in the manifest."""
        return self.arrays["label"].dtype == "uint8"

    @property
    def class_names(self) -> list[str]:
        return list(self.schema.get("class_names") or [])

    def fraction_columns(self) -> list[str]:
        return [fraction_column(c) for c in self.class_names] if self.is_segmentation else []

    def shard_range(self, index: int) -> range:
        start = index * self.samples_per_shard
        return range(start, min(start + self.samples_per_shard, self.num_samples))

    def shard_of(self, sample_id: int) -> int:
        return sample_id // self.samples_per_shard

    def shard_file_key(self, array: str, index: int) -> str:
        """Key (relative to the dataset root) of the Zarr shard file holding shard ``index``.

        Zarr v3 default chunk-key encoding with '/' separator: ``c/<i>/0/0...``.
        """
        zeros = "/0" * len(self.arrays[array].shape)
        return f"{DATA_DIR}/{array}/c/{index}{zeros}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "num_samples": self.num_samples,
            "samples_per_shard": self.samples_per_shard,
            "num_shards": self.num_shards,
            "image_shape": list(self.arrays["image"].shape[:2]),
            "label_dtype": self.arrays["label"].dtype,
            "arrays": {name: spec.to_dict() for name, spec in self.arrays.items()},
            "schema": self.schema,
            "compression": self.compression,
            "checksum": "sha256 over image|label|uncertainty (storage.sample_checksum)"
            + ("|" + "|".join(self.checksum_arrays()[3:]) if self.labels else ""),
            "provenance": self.provenance,
            **({"labels": self.labels} if self.labels else {}),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str) -> "Layout":
        """Parse ``dataset.json``; ``source`` names the file in error messages."""
        from .errors import FormatVersionError

        if data.get("format") != FORMAT_NAME:
            raise FormatVersionError(
                f"{source} is not a {FORMAT_NAME} dataset description "
                f"(format={data.get('format')!r}); point at the dataset root directory"
            )
        version = data.get("format_version")
        if version != FORMAT_VERSION:
            raise FormatVersionError(
                f"{source} has format_version={version!r} but this code reads version "
                f"{FORMAT_VERSION}; use the labelfoundry version that wrote it or regenerate the dataset"
            )
        return cls(
            num_samples=int(data["num_samples"]),
            samples_per_shard=int(data["samples_per_shard"]),
            arrays={k: ArraySpec.from_dict(v) for k, v in data["arrays"].items()},
            schema=data.get("schema") or {},
            compression=data.get("compression") or {},
            provenance=data.get("provenance") or {},
            labels={str(k): str(v) for k, v in (data.get("labels") or {}).items()},
        )

    def layout_diff(self, other: "Layout") -> list[str]:
        """Human-readable differences in the layout fields (provenance excluded)."""
        mine, theirs = self.to_dict(), other.to_dict()
        return [
            f"{key}: existing={theirs.get(key)!r} requested={mine.get(key)!r}"
            for key in sorted(set(mine) | set(theirs))
            if key not in _NON_LAYOUT_KEYS and mine.get(key) != theirs.get(key)
        ]


def build_layout(
    *,
    num_samples: int,
    image_shape: tuple[int, int],
    label_shape: tuple[int, ...],
    label_dtype: str,
    schema: dict[str, Any],
    samples_per_shard: int,
    with_uncertainty: bool,
    w_shape: tuple[int, int] | None,
    provenance: dict[str, Any] | None,
    compression: str,
    level: int,
    label_task: str | None = None,
    extra_labels: dict[str, tuple[str, tuple[int, ...]]] | None = None,
) -> Layout:
    """Validate ``ShardStore.create`` arguments and turn them into a :class:`Layout`.

    extra_labels: a multi-label dataset's further label arrays, name -> (task, per-sample shape),
    each float16 (keypoint heatmaps (K,H,W), depth (1,H,W)) with its own uncertainty array;
    label_task names the primary `label` array's task (required with extra_labels)."""
    if int(num_samples) < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    if int(samples_per_shard) < 1:
        raise ValueError(f"samples_per_shard must be >= 1, got {samples_per_shard}")
    if len(image_shape) != 2 or min(image_shape) < 1:
        raise ValueError(f"image_shape must be (H, W), got {image_shape!r}")
    h, w = (int(s) for s in image_shape)
    if label_dtype not in LABEL_DTYPES:
        raise ValueError(f"label_dtype must be one of {LABEL_DTYPES}, got {label_dtype!r}")
    label_shape = tuple(int(s) for s in label_shape)
    schema = to_json_value(dict(schema or {}), "schema")
    if label_dtype == "uint8":
        if label_shape != (h, w):
            raise ValueError(
                f"uint8 (segmentation) labels must have per-sample shape (H, W)={(h, w)}, "
                f"got {label_shape}; use label_dtype='float16' for (K, H, W) heatmaps/depth"
            )
        names = schema.get("class_names")
        if not names or not all(isinstance(n, str) for n in names):
            raise ValueError(
                "segmentation datasets need schema['class_names'] (list of str) to compute "
                "the frac_<class> manifest columns"
            )
        cols = [fraction_column(n) for n in names]
        if len(set(cols)) != len(cols):
            raise ValueError(f"class names {names} collide after sanitising to columns {cols}; rename them")
        label_dims: tuple[str, ...] = ("y", "x")
    else:
        if len(label_shape) not in (2, 3):
            raise ValueError(f"float16 labels must be (H, W) or (K, H, W), got {label_shape}")
        label_dims = ("channel", "y", "x")[-len(label_shape):]
    if compression not in COMPRESSIONS:
        raise ValueError(f"compression must be one of {COMPRESSIONS}, got {compression!r}")
    arrays = {
        "image": ArraySpec((h, w, 3), "uint8", ("y", "x", "rgb")),
        "label": ArraySpec(label_shape, label_dtype, label_dims),
    }
    if with_uncertainty:
        arrays["uncertainty"] = ArraySpec((h, w), "float16", ("y", "x"))
    labels: dict[str, str] = {}
    if extra_labels:
        if label_task not in LABEL_TASKS:
            raise ValueError(f"label_task must be one of {LABEL_TASKS} when extra_labels are given, got {label_task!r}")
        labels = {"label": label_task}
        for name, (task, shape) in extra_labels.items():
            if task not in LABEL_TASKS or task == "segmentation":
                raise ValueError(f"extra label {name!r}: task must be keypoints or depth (segmentation is the "
                                 f"primary `label` array), got {task!r}")
            if name in arrays or name in ("w", "uncertainty") or name.startswith("uncertainty") or not name.isidentifier():
                raise ValueError(f"extra label array name {name!r} is reserved or invalid; name it by its task")
            if task in labels.values():
                raise ValueError(f"two label arrays with task {task!r}; a dataset holds one array per label type")
            shape = tuple(int(s) for s in shape)
            if len(shape) != 3 or shape[1:] != (h, w):
                raise ValueError(f"extra label {name!r} must have per-sample shape (K, {h}, {w}), got {shape}")
            labels[name] = task
            arrays[name] = ArraySpec(shape, "float16", ("channel", "y", "x"))
            if with_uncertainty:
                arrays[uncertainty_array(name)] = ArraySpec((h, w), "float16", ("y", "x"))
    if w_shape is not None:
        if len(w_shape) != 2 or min(w_shape) < 1:
            raise ValueError(f"w_shape must be (num_ws, w_dim), got {w_shape!r}")
        arrays["w"] = ArraySpec(tuple(int(s) for s in w_shape), "float32", ("ws", "w_dim"))
    return Layout(
        num_samples=int(num_samples),
        samples_per_shard=int(samples_per_shard),
        arrays=arrays,
        schema=schema,
        compression={"name": compression, "level": int(level)},
        provenance=to_json_value(dict(provenance or {}), "provenance"),
        labels=labels,
    )


def datasets_below(root: Any, max_entries: int = 200) -> list[str]:
    """Datasets one level below `root` or in its `datasets/` folder (a factory run directory), for
    the error that a path is not a dataset: users often give the folder that holds them."""
    found = []
    for sub in ("", "datasets"):
        names = root.list_names(sub)[:max_entries]
        found += [posixpath.join(sub, n) for n in names if root.exists(posixpath.join(sub, n, DATASET_JSON))]
    return found


def read_layout(root: Any) -> tuple[Layout, dict[str, Any]]:
    """Load ``dataset.json`` of the dataset at ``root`` (a `fsio.Root`): the one place writer and
    reader agree on what a dataset is. Clear errors for non-datasets and wrong versions."""
    from .errors import NotADatasetError

    try:
        raw = root.read_bytes(DATASET_JSON)
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError) as exc:
        try:
            inside = datasets_below(root)
        except OSError:  # an unlistable folder: the plain message
            inside = []
        hint = (f"It holds {len(inside)} dataset(s): {', '.join(root.describe(d) for d in inside[:5])}"
                f"{' ...' if len(inside) > 5 else ''}; give one of those" if inside else
                "Check the path; `labelfoundry generate` (or storage.ShardStore.create) makes one")
        raise NotADatasetError(f"{root.describe(DATASET_JSON)} not found: {root.url} is not a labelfoundry dataset. {hint}") from exc
    try:
        info = json.loads(raw)
    except ValueError as exc:
        raise NotADatasetError(
            f"{root.describe(DATASET_JSON)} is not valid JSON ({exc}); restore it or recreate the dataset"
        ) from exc
    return Layout.from_dict(info, root.describe(DATASET_JSON)), info


def index_runs(indices: list[int], sep: str = ", ", most: int | None = None) -> str:
    """Shard indices as sorted runs, '5-9, 12, 20-3906': one line a reader can take in, also for the
    thousands of shards a large dataset has. Past `most` runs, a count of the rest."""
    runs: list[tuple[int, int]] = []
    for i in sorted(int(i) for i in indices):
        if runs and i == runs[-1][1] + 1:
            runs[-1] = (runs[-1][0], i)
        else:
            runs.append((i, i))
    shown = runs if most is None else runs[:most]
    text = sep.join(f"{a}" if a == b else f"{a}-{b}" for a, b in shown)
    return text + (f"{sep}and {len(runs) - most} more runs" if most is not None and len(runs) > most else "")
