"""The one list of labelers. Adding a labeler: one module under `labelers/` (its config + class,
meeting `labelers.base.Labeler`) and one line here; the run config's union, `load_labeler` and
the stages all read this table. Modules load on first use, so reading it imports no torch."""

from __future__ import annotations

import importlib
from dataclasses import dataclass


@dataclass(frozen=True)
class LabelerEntry:
    module: str  # module under labelfoundry.labelers
    labeler: str  # class name of the labeler
    config: str  # class name of its pydantic config (its `method` field is the registry key)
    supervised: bool  # learns part labels from labeled images (else fg/bg, no labels)
    needs_inversion: bool  # fits on the labeled images inverted into W+ (FitData.latents)

    def _get(self, name: str):
        return getattr(importlib.import_module(f"labelfoundry.labelers.{self.module}"), name)

    def labeler_class(self):
        return self._get(self.labeler)

    def config_class(self):
        return self._get(self.config)


REGISTRY: dict[str, LabelerEntry] = {
    "handsoff": LabelerEntry("handsoff", "HandsOffLabeler", "HandsOffConfig", supervised=True, needs_inversion=True),
    "gradient_matching": LabelerEntry(
        "gradient_matching", "GradientMatchingLabeler", "GradientMatchingConfig", supervised=True, needs_inversion=False
    ),
    "stylemix": LabelerEntry("stylemix", "StyleMixLabeler", "StyleMixConfig", supervised=False, needs_inversion=False),
    "latent_direction": LabelerEntry(
        "latent_direction", "LatentDirectionLabeler", "LatentDirectionConfig", supervised=False, needs_inversion=False
    ),
    "labels4free": LabelerEntry("labels4free", "Labels4FreeLabeler", "Labels4FreeConfig", supervised=False, needs_inversion=False),
}
DEFAULT_METHOD = "handsoff"
SUPERVISED = frozenset(m for m, e in REGISTRY.items() if e.supervised)
NEEDS_INVERSION = frozenset(m for m, e in REGISTRY.items() if e.needs_inversion)


def entry(method: str) -> LabelerEntry:
    if method not in REGISTRY:
        raise ValueError(f"unknown labeler method {method!r}; choose one of {sorted(REGISTRY)}")
    return REGISTRY[method]
