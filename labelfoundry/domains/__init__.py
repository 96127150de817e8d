"""Labeled data sources: the built-in toy-faces domain and a user's labeled folder."""

from __future__ import annotations

from .base import LabeledSample, LabelSchema


def load_labeled(section, resolution: int) -> tuple[list[LabeledSample], LabelSchema]:
    """Read the labeled images a run config names, at the generator's `resolution` (toy faces: at
    `section.resolution` when set, in `section.style`)."""
    if section.source == "toyfaces":
        from . import toyfaces

        res = section.resolution or resolution
        if res < 8:
            raise ValueError("toyfaces needs a resolution >= 8")
        style, lt = section.style, section.longtail
        if lt is not None:  # exactly k rare images (long-tail sweeps)
            from .longtail import pick_longtail

            return pick_longtail(section.num_images, res, lt.cls, lt.k, lt.mode, section.offset, style=style), toyfaces.SCHEMA
        samples = pick_toyfaces(section.num_images, res, section.offset, section.require_rare, style=style)
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


def pick_toyfaces(
    n: int, resolution: int, offset: int = 0, require_rare: dict[str, int] | None = None, style: str = "photo"
) -> list[LabeledSample]:
    """The first `n` train-pool faces from `offset`; with `require_rare` ({class: k}), the first k
    faces containing each rare class are swapped in for ordinary ones (long-tail experiments).
    `style` changes only the look, so the same faces are picked in either style."""
    from . import toyfaces

    base = toyfaces.samples("train", n, resolution, offset, style=style)
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
            cand = toyfaces.samples("train", 256, resolution, pos, style=style)
            pos += 256
            for s in cand:
                if (s.mask == cls_ids[cls]).any() and s.sample_id not in taken:
                    chosen.append(s)
                    taken.add(s.sample_id)
                    if sum((c.mask == cls_ids[cls]).any() for c in chosen) >= k:
                        break
    rest = [s for s in base if s.sample_id not in taken]
    return (chosen + rest)[:n]


def check_for_inversion(section, generator_resolution: int) -> list[str]:
    """Labeled-set options that inversion (HandsOff) cannot or should not use: raises for a
    resolution other than the generator's (the images are reconstructed by it, pixel for pixel);
    returns warnings for an out-of-domain style (the generator must then reconstruct a look it never made)."""
    res = section.resolution
    if res is not None and res != generator_resolution:
        raise ValueError(
            f"labeled.resolution is {res} but the generator makes {generator_resolution}x{generator_resolution} "
            "images, and HandsOff inverts the labeled images into the generator, so they must be at its resolution. "
            f"Remove labeled.resolution (or set it to {generator_resolution}), or use labeler.method: "
            "gradient_matching, which learns from labeled images of any resolution and look"
        )
    if section.style != "photo":
        return [
            f"labeled.style is {section.style!r}: HandsOff inverts these out-of-domain images into a generator "
            "trained on photo-style faces, so reconstructions (and the labeler fitted on them) may be poor; "
            "labeler.method: gradient_matching is built for an out-of-domain labeled source"
        ]
    return []
