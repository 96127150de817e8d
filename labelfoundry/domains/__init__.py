"""Labeled data sources: the built-in toy-faces domain and a user's labeled folder."""

from __future__ import annotations

from .base import LabeledSample, LabelSchema


def load_labeled(section, resolution: int) -> tuple[list[LabeledSample], LabelSchema]:
    """Read the labeled images a run config names, at the generator's resolution."""
    if section.source == "toyfaces":
        from . import toyfaces

        if resolution < 8:
            raise ValueError("toyfaces needs a generator resolution >= 8")
        samples = pick_toyfaces(section.num_images, resolution, section.offset, section.require_rare)
        return samples, toyfaces.SCHEMA
    from .collapse import load_collapse
    from .folder import read_labeled_folder

    samples = read_labeled_folder(
        section.path, resolution=resolution, num_classes=section.num_classes, collapse=section.collapse
    )
    if section.collapse:
        schema = load_collapse(section.collapse).schema()
    else:
        n = section.num_classes or int(max(int(s.mask.max()) for s in samples if s.mask is not None) + 1)
        from .collapse import default_palette

        schema = LabelSchema(tuple(f"class_{i}" for i in range(n)), tuple(tuple(c) for c in default_palette(n)))
    return samples, schema


def pick_toyfaces(n: int, resolution: int, offset: int = 0, require_rare: dict[str, int] | None = None) -> list[LabeledSample]:
    """The first `n` train-pool faces from `offset`; with `require_rare` ({class: k}), the first k
    faces containing each rare class are swapped in for ordinary ones (long-tail experiments)."""
    from . import toyfaces

    base = toyfaces.samples("train", n, resolution, offset)
    if not require_rare:
        return base
    cls_ids = {c: toyfaces.CLASSES.index(c) for c in require_rare}
    chosen: list[LabeledSample] = []
    taken: set[str] = set()
    pos = offset + n
    for cls, k in require_rare.items():
        have = [s for s in base if (s.mask == cls_ids[cls]).any()]
        chosen += [s for s in have[:k] if s.sample_id not in taken]
        taken |= {s.sample_id for s in have[:k]}
        while sum((s.mask == cls_ids[cls]).any() for s in chosen) < k:
            cand = toyfaces.samples("train", 256, resolution, pos)
            pos += 256
            for s in cand:
                if (s.mask == cls_ids[cls]).any() and s.sample_id not in taken:
                    chosen.append(s)
                    taken.add(s.sample_id)
                    if sum((c.mask == cls_ids[cls]).any() for c in chosen) >= k:
                        break
    rest = [s for s in base if s.sample_id not in taken]
    return (chosen + rest)[:n]
