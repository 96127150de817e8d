"""Typed run configuration: one pydantic model per stage, loaded from YAML.

Every model forbids unknown keys, so a typo fails up front with the key's full path. Each stage's
cache key includes only its own section (plus upstream artifact hashes), so editing one section
re-runs that stage and what follows, nothing before it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal, Union

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Discriminator, Field, Tag, ValidationError, model_validator

from .inversion.optimize import InversionConfig
from .labelers.registry import DEFAULT_METHOD, REGISTRY
from .segmenters.models import Arch


def _labeler_method(v) -> str:
    """`labeler.method` picks the labeler; HandsOff when omitted."""
    return (v.get("method") if isinstance(v, dict) else getattr(v, "method", None)) or DEFAULT_METHOD


# Built from the registry: a new labeler joins the config by its registry line alone.
LabelerConfig = Annotated[
    Union[tuple(Annotated[e.config_class(), Tag(m)] for m, e in REGISTRY.items())],  # type: ignore[misc]
    Discriminator(_labeler_method),
]


def _yaml_on_off(v):
    """YAML reads a bare on / off as true / false (`--set generate.compile=on` too): take them."""
    return {True: "on", False: "off"}.get(v, v) if isinstance(v, bool) else v


AutoOnOff = Annotated[Literal["auto", "on", "off"], BeforeValidator(_yaml_on_off)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class GeneratorSection(_Strict):
    name: str = Field("toyfaces-64", description="built-in name, or a .pkl / .pt / .safetensors path")


class LongtailSpec(_Strict):
    """A long-tail labeled set (HandsOff §4.5): exactly `k` images show the rare class `cls`, and no
    other image shows any rare class."""

    cls: str = Field("glasses", description="the rare class (toyfaces: glasses or hat)")
    k: int = Field(0, ge=0, description="images showing `cls`")
    mode: Literal["substitution", "addition"] = Field(
        "substitution", description="substitution: k of labeled.num_images show cls (fixed size); "
        "addition: k images with cls added to labeled.num_images without (num_images + k in total)"
    )


class LabeledSection(_Strict):
    """Where the few labeled real images come from."""

    source: Literal["toyfaces", "folder"] = "toyfaces"
    path: str | None = Field(None, description="folder of images/ masks/ ... (source: folder)")
    num_images: int = Field(16, ge=1, le=10_000)
    offset: int = Field(0, ge=0, description="first index in the toy-faces train pool")
    collapse: str | None = None
    num_classes: int | None = None
    require_rare: dict[str, int] = Field(default_factory=dict, description="toyfaces: min images containing a class")
    longtail: LongtailSpec | None = Field(
        None, description="toyfaces: exactly k images with a rare class, none elsewhere (HandsOff §4.5); "
        "replaces require_rare"
    )
    style: Literal["photo", "flat"] = Field(
        "photo", description="toyfaces look: 'flat' = cartoon colours, same labels (an out-of-domain labeled source)"
    )
    resolution: int | None = Field(
        None, description="toyfaces: render the labeled images at this power of two; None = the generator's"
    )

    @model_validator(mode="after")
    def _folder_needs_path(self) -> "LabeledSection":
        if self.source == "folder" and not self.path:
            raise ValueError("labeled.path is required when labeled.source is 'folder'")
        return self

    @model_validator(mode="after")
    def _longtail_toyfaces_only(self) -> "LabeledSection":
        """A long-tail set is picked from the toy-faces pool by its exact masks; checked before any work."""
        lt = self.longtail
        if lt is None:
            return self
        if self.source != "toyfaces":
            raise ValueError("labeled.longtail needs labeled.source 'toyfaces' (picked by exact masks); remove it")
        if self.require_rare:
            raise ValueError("labeled.longtail and labeled.require_rare both pick rare images; keep one")
        from .domains.longtail import check_longtail

        check_longtail(self.num_images, lt.cls, lt.k, lt.mode)
        return self

    @model_validator(mode="after")
    def _render_options_toyfaces_only(self) -> "LabeledSection":
        """style/resolution drive the toy-faces renderer; a folder's images are read as they are."""
        if self.source != "toyfaces":
            for key, default in (("style", "photo"), ("resolution", None)):
                if getattr(self, key) != default:
                    raise ValueError(
                        f"labeled.{key} applies only to labeled.source 'toyfaces' (a folder's images are used as "
                        f"they are, resized to the generator's resolution); remove labeled.{key}"
                    )
        r = self.resolution
        if r is not None and (r < 8 or r & (r - 1)):
            raise ValueError(f"labeled.resolution must be a power of two >= 8 (e.g. 32, 64, 128), got {r}; "
                             "or omit it to use the generator's resolution")
        return self


COMPILE_FROM_SAMPLES = 20_000  # auto: a run this large amortises the compilation (~20 s per worker)


class GenerateSection(_Strict):
    num_samples: int = Field(2000, ge=1)
    samples_per_shard: int = Field(64, ge=1)
    shards_per_task: int = Field(1, ge=1)
    batch: int = Field(32, ge=1)
    psi: float = Field(1.0, description="truncation; 1.0 = none")
    store_w: bool = True
    compression_level: int = 3
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "fp32", description="generator + labeler compute precision; auto = bf16 where the device runs it natively "
        "(CUDA, CPUs with AVX512-BF16/AMX), else fp32. Softmax and uncertainty are fp32 either way. HandsOff "
        "is checked against fp32 in bf16 (tests/test_handsoff.py); the other labelers are not yet, hence fp32 by default"
    )
    compile: AutoOnOff = Field(
        "auto", description="label with the torch.compile'd pass (HandsOff; labelfoundry.labelers.handsoff_compiled): "
        "1.06-1.5x the labeled samples/s at 64² on CPU with the default 3 x 128 labeler (README; labelers wider than "
        "handsoff_compiled's max_width, measured slower, stay eager), for one compilation per worker process (~15-25 s, needs a C++ "
        "compiler on CPU, Triton on CUDA; without one it warns and labels eagerly). auto = on from "
        f"{COMPILE_FROM_SAMPLES:,} samples, where the compilation pays for itself"
    )

    @property
    def compile_labels(self) -> bool:
        """Whether this run labels with the compiled pass (`compile`, auto resolved by the run's size)."""
        return self.compile == "on" or (self.compile == "auto" and self.num_samples >= COMPILE_FROM_SAMPLES)


class FilterSection(_Strict):
    drop_top: float = Field(0.1, ge=0.0, lt=1.0, description="fraction of most uncertain samples to drop")
    score: Literal["score", "score_top10"] = "score"
    combine: Literal["max_rank", "mean_rank", "primary"] = Field(
        "max_rank", description="multi-label datasets: how the label types' scores (each ranked, as their scales "
        "differ) make one: max_rank = a sample is as uncertain as its most uncertain type; mean_rank = the mean "
        "rank; primary = the `labeler` type's score alone (labelfoundry.filtering.combined_score)"
    )
    dedup: Literal["none", "latent", "image"] = "none"
    dedup_threshold: float = Field(0.05, description="L2 distance (per dim, normalised) under which a sample is a duplicate")
    class_balance: dict[str, float] = Field(default_factory=dict, description="class name -> min kept fraction of samples containing it")


class RefinerTraining(_Strict):
    """What a refiner's weights depend on (its cache key): not how many there are, nor how they run."""

    arch: Arch
    steps: int
    finetune_steps: int
    batch_size: int
    lr: float


class RefineSection(_Strict):
    """Self-training of the generated labels (labelfoundry.refine): `members` segmenters trained on the
    generated images with the labeler's labels, each fine-tuned on the labeled images, relabel every
    sample; their mean prediction becomes `label`, their JS divergence `uncertainty` (and the scores
    the filter ranks by), in a refined copy of the dataset. Applies to supervised segmentation
    labelers; other label types and fg/bg labelers skip it (the run's log says so)."""

    enabled: bool = Field(False, description="refine the labels: +0.023 downstream parts mIoU in the 16-label headline "
                          "(--full turns it on; docs/evaluation.md). Off by default because it pays only with refiners "
                          "trained to their plateau: at the demo's budget (2 x 500 steps) it cost 0.043")
    members: int = Field(3, ge=1, le=16, description="ensemble size (seeds run seed + i); 1 gives no uncertainty "
                         "(all zeros), so the filter then drops arbitrary samples")
    steps: int = Field(2000, ge=1, description="training steps of each member on the generated samples (the "
                       "plateau rule's answer at 64², docs/evaluation.md: +0.004 downstream over 1,000 in the 16-label "
                       "headline; far fewer leave the thin classes out of the labels)")
    finetune_steps: int | None = Field(None, ge=1, description="steps on the labeled images after that (None: "
                                       "max(50, steps / 5), as the finetuned baseline)")
    arch: Arch = "tiny_unet"
    batch_size: int = Field(32, ge=1)
    lr: float = Field(1e-3, gt=0)
    workers: int = Field(2, ge=1, le=64, description="members trained side by side in this many spawned processes "
                         "(one thread each; the labels do not depend on it)")
    batch: int = Field(64, ge=1, description="images per relabeling forward pass")
    mirror: AutoOnOff = Field(
        "auto", description="also predict each mirrored image and average it in (test-time flip): auto = on for "
        "the built-in domain, whose classes have no left/right, off for a labeled folder; on needs mirror_classes "
        "when a class is a left/right one. Off for domains that are not mirror-symmetric (text, for example)")
    mirror_classes: list[int] | None = Field(None, description="class id each class becomes in a mirrored image "
                                             "(e.g. [0, 2, 1] when classes 1 and 2 are left and right); None: itself")

    @property
    def training(self) -> RefinerTraining:
        """Each member's training (fine-tune steps resolved: None is max(50, steps / 5))."""
        return RefinerTraining(arch=self.arch, steps=self.steps, finetune_steps=self.finetune_steps or max(50, self.steps // 5),
                               batch_size=self.batch_size, lr=self.lr)

    def resolved_mirror(self, source: str, num_classes: int) -> list[int] | None:
        """The class permutation of the mirrored pass (None: no mirrored pass) for a labeled source."""
        if self.mirror == "off" or (self.mirror == "auto" and source != "toyfaces"):
            return None
        if self.mirror_classes is not None:
            perm = list(self.mirror_classes)
        elif source == "toyfaces":
            from .domains.toyfaces import MIRROR_CLASSES

            perm = list(MIRROR_CLASSES)
        else:
            perm = list(range(num_classes))
        if sorted(perm) != list(range(num_classes)):
            raise ValueError(f"refine.mirror_classes must be a permutation of the {num_classes} class ids, got {perm}")
        return perm


class DownstreamSection(_Strict):
    """Downstream training + evaluation: the same segmenter trained on each label source."""

    enabled: bool = True
    seeds: int = Field(1, ge=1, le=20, description="trainings per method (seed i = run seed + i: init, data order, "
                       "augmentation); the report gives mean ± std over them. The headline (--full) uses 3")
    torch_threads: int = Field(1, ge=1, description="intra-op threads while training/evaluating; fixed, so the same "
                               "run gives the same numbers whatever ran before in the process")
    workers: int = Field(2, ge=1, le=64, description="train-evaluate tasks run side by side in this many spawned "
                         "processes (each with torch_threads); 1 runs them one after another in the flow's process. "
                         "Each training is seeded and single-threaded, so the numbers do not depend on it")
    arch: Arch = "tiny_unet"
    epochs: int = 10
    max_steps: int | None = Field(500, description="training steps per method (None: epochs). 500: as far up the "
                                  "learning curves (docs/evaluation.md) as the demo's 10 minutes allow; the "
                                  "headline (--full) trains 2,000, where the plateau rule stops")
    oracle_steps: int | None = Field(None, ge=1, description="the oracle's training steps (None: max_steps). The "
                                     "reference learns slowest: its small parts appear late (docs/evaluation.md), so "
                                     "the headline (--full) trains it 3,000 steps")
    batch_size: int = 32
    lr: float = 1e-3
    test_images: int = 500
    oracle_images: int = Field(5000, description="real labeled images for the oracle baseline (built-in domain)")
    baselines: list[Literal["labeled_only", "oracle", "unfiltered", "unrefined", "no_oversample", "imagenet_transfer",
                             "finetuned"]] = Field(
        default_factory=lambda: ["labeled_only", "oracle"],
        description="unfiltered: every generated sample; unrefined: every generated sample with the labeler's own "
        "labels (the refine stage's control; skipped when the run does not refine); no_oversample: the generated-data method without downstream.oversample (its control); "
        "finetuned: the generated-data method, then fine-tuned on the labeled images (HandsOff's Cityscapes step); "
        "imagenet_transfer: transfer_arch with its ImageNet backbone, fine-tuned on the labeled images (skipped, "
        "with the missing file named in metrics.json, when the weights are not in the local torch hub cache)",
    )
    transfer_arch: Arch = Field("deeplabv3_resnet50", description="segmenter of the imagenet_transfer baseline")
    examples: int = Field(4, ge=0, le=32, description="real test images shown with every method's prediction in the report")
    oversample: dict[str, Annotated[float, Field(ge=0.0, le=1.0)]] = Field(
        default_factory=dict, description="class name -> target fraction of training draws whose label contains "
        "it (generated-data methods only; labeled_only/oracle draw uniformly)"
    )
    finetune_on_labeled: bool = Field(False, description="fine-tune the generated-data method on the labeled images "
                                      "after training (max(50, max_steps/5) steps); the finetuned baseline does both")


class RunnerSection(_Strict):
    kind: Literal["threads", "dask", "ray"] = "threads"
    workers: int = Field(2, ge=1)
    torch_threads: int = Field(1, ge=1, description="intra-op threads per generation task (fixed: same bytes everywhere)")


class RunConfig(_Strict):
    """The whole factory run. `run_dir` holds every artifact, cache record and report."""

    name: str = "demo"
    run_dir: str = "runs/demo"
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    generator: GeneratorSection = GeneratorSection()
    labeled: LabeledSection = LabeledSection()
    inversion: InversionConfig = InversionConfig(steps=300)
    labeler: LabelerConfig = REGISTRY[DEFAULT_METHOD].config_class()()
    extra_labelers: list[LabelerConfig] = Field(
        default_factory=list, description="further label types written into the same samples (one generation "
        "pass; arrays named by task: keypoints, depth), each fitted on the same inverted images as `labeler`"
    )
    generate: GenerateSection = GenerateSection()
    refine: RefineSection = RefineSection()
    filter: FilterSection = FilterSection()
    downstream: DownstreamSection = DownstreamSection()
    runner: RunnerSection = RunnerSection()

    @model_validator(mode="after")
    def _extra_labelers_distinct(self) -> "RunConfig":
        """One array per label type: extra labelers add keypoints / depth to the primary `labeler`."""
        tasks = [self.labeler.task]
        for i, extra in enumerate(self.extra_labelers):
            if extra.task == "segmentation":
                raise ValueError(f"extra_labelers[{i}]: task segmentation must be the primary `labeler` (the "
                                 "`label` array); extra labelers add keypoints or depth")
            if extra.task in tasks:
                raise ValueError(f"extra_labelers[{i}]: task {extra.task!r} is labeled twice; one labeler per label type")
            tasks.append(extra.task)
        return self

    def label_arrays(self) -> dict[str, "LabelerConfig"]:
        """Array name -> labeler config: `label` for `labeler`, the task's name for each extra."""
        return {"label": self.labeler, **{e.task: e for e in self.extra_labelers}}

    def resolved_device(self) -> str:
        if self.device != "auto":
            return self.device
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"


class ConfigError(ValueError):
    """A run config that does not validate; the message lists every bad key by its full path."""


def parse_config(data: dict | None, origin: str = "<config>") -> RunConfig:
    try:
        return RunConfig.model_validate(data or {})
    except ValidationError as e:
        lines = []
        for err in e.errors():
            loc = list(err["loc"])
            if len(loc) > 1 and loc[0] == "labeler" and loc[1] in REGISTRY:  # hide the union's tag
                del loc[1]
            key = ".".join(str(p) for p in loc) or "<root>"
            lines.append(f"  {key}: {err['msg']}")
        raise ConfigError(f"{origin}: invalid run config\n" + "\n".join(lines)) from None


def load_config(path: str | Path | None = None, overrides: dict | None = None) -> RunConfig:
    """YAML file (or the built-in demo when None) + nested overrides -> validated RunConfig."""
    data: dict = {}
    origin = "<demo>"
    if path is not None:
        p = Path(path)
        if not p.exists():
            raise ConfigError(f"{p}: config file not found")
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{p}: not valid YAML ({e})") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{p}: the top level must be a mapping of sections")
        origin = str(p)
    if overrides:
        data = deep_merge(data, overrides)
    return parse_config(data, origin)


def deep_merge(a: dict, b: dict) -> dict:
    """Nested dict update: b's values win, sub-dicts merge key by key."""
    out = dict(a)
    for k, v in b.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out
