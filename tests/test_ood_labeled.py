"""An out-of-domain labeled source (paper 001 §3.2/§4): toy faces in a flat cartoon style and at
another resolution, validated in the config and learnt from by the gradient-matching labeler."""

from __future__ import annotations

import copy
import hashlib
import json

import numpy as np
import pytest
import yaml

from labelfoundry.config import ConfigError, LabeledSection, parse_config
from labelfoundry.domains import check_for_inversion, load_labeled, pick_toyfaces, toyfaces
from labelfoundry.domains.base import resize_labeled
from labelfoundry.labelers import FitData
from labelfoundry.labelers.gradient_matching import GradientMatchingConfig, GradientMatchingLabeler

from .conftest import TINY, schema_of

# sha256 of render(range(8), R)["image"] before `style` existed: the shipped generator was trained on these pixels.
PHOTO_SHA = {
    32: "91ed986e6bdfec4a895784f2a8c04bcb9f4f18d0ac54b898389c332f7588496a",
    64: "0a0a4f0133e304a3a15615450472c9484bcc1da0889f0467ab51c2ed07dd218a",
}


def _sha(a: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()


@pytest.mark.parametrize("res", [32, 64])
def test_default_style_is_todays_photo_output(res):
    default = toyfaces.render(list(range(8)), res)
    photo = toyfaces.render(list(range(8)), res, style="photo")
    assert _sha(default["image"]) == _sha(photo["image"]) == PHOTO_SHA[res]
    for k in ("mask", "keypoints", "depth"):
        assert np.array_equal(default[k], photo[k])


def test_flat_style_same_labels_different_look():
    seeds = toyfaces.split_seeds("train", 300)
    photo, flat = toyfaces.render(seeds, 64), toyfaces.render(seeds, 64, style="flat")
    for k in ("mask", "keypoints", "depth", "has_glasses", "has_hat"):
        assert np.array_equal(photo[k], flat[k]), k
    assert photo["has_glasses"].any() and photo["has_hat"].any()  # the rare layers are covered too
    diff = np.abs(photo["image"].astype(np.float32) - flat["image"].astype(np.float32))
    assert diff.mean() > 40  # substantially different pixels
    # flat: the background is one colour (no gradient/texture) and each class interior has one colour (no shading)
    bg = flat["image"][flat["mask"] == 0]
    assert (bg == np.array(toyfaces.FLAT_COLORS["background"], np.uint8)).all(axis=-1).mean() > 0.97
    assert photo["image"][photo["mask"] == 0].std(axis=0).min() > 20
    skin = toyfaces.CLASSES.index("skin")
    core = (flat["mask"] == skin)
    core[:, 1:-1, 1:-1] &= (flat["mask"][:, :-2, 1:-1] == skin) & (flat["mask"][:, 2:, 1:-1] == skin)
    core[:, 1:-1, 1:-1] &= (flat["mask"][:, 1:-1, :-2] == skin) & (flat["mask"][:, 1:-1, 2:] == skin)
    # (> 0.9, not 1: thin parts covering under half a pixel tint their neighbours without labelling them)
    assert (flat["image"][core] == np.array(toyfaces.FLAT_COLORS["skin"], np.uint8)).all(axis=-1).mean() > 0.9
    assert photo["image"][core].std(axis=0).min() > 10
    with pytest.raises(ValueError, match="unknown style"):
        toyfaces.render([1], 32, style="cartoon")


def test_flat_samples_pick_the_same_faces():
    rare = {"glasses": 1}
    a = pick_toyfaces(6, 32, require_rare=rare)
    b = pick_toyfaces(6, 32, require_rare=rare, style="flat")
    assert [s.sample_id for s in a] == [s.sample_id for s in b]
    assert all(np.array_equal(x.mask, y.mask) for x, y in zip(a, b))
    assert not np.array_equal(a[0].image, b[0].image) and b[0].meta["style"] == "flat"


def test_load_labeled_at_its_own_resolution_and_style():
    section = LabeledSection(num_images=3, style="flat", resolution=32)
    samples, schema = load_labeled(section, 16)  # generator resolution 16, labeled set 32
    assert samples[0].image.shape == (32, 32, 3) and schema.class_names == toyfaces.CLASSES
    ref = toyfaces.render(toyfaces.split_seeds("train", 3), 32, style="flat")
    assert np.array_equal(np.stack([s.image for s in samples]), ref["image"])
    default, _ = load_labeled(LabeledSection(num_images=3), 16)
    assert default[0].image.shape == (16, 16, 3)


@pytest.mark.parametrize(
    "labeled, key, fix",
    [
        ({"source": "folder", "path": "x", "style": "flat"}, "labeled.style", "remove labeled.style"),
        ({"source": "folder", "path": "x", "resolution": 32}, "labeled.resolution", "remove labeled.resolution"),
        ({"resolution": 48}, "labeled.resolution", "power of two"),
        ({"resolution": 4}, "labeled.resolution", "power of two"),
    ],
)
def test_labeled_section_validation(labeled, key, fix):
    with pytest.raises(ConfigError) as e:
        parse_config({"labeled": labeled})
    assert key in str(e.value) and fix in str(e.value)


def test_config_accepts_the_ood_source():
    cfg = parse_config({"labeled": {"style": "flat", "resolution": 32}, "labeler": {"method": "gradient_matching"}})
    assert cfg.labeled.style == "flat" and cfg.labeled.resolution == 32
    assert parse_config({}).labeled.style == "photo" and parse_config({}).labeled.resolution is None
    with pytest.raises(ConfigError, match="labeled.style"):
        parse_config({"labeled": {"style": "cartoon"}})


def test_inversion_needs_the_generators_resolution_and_warns_on_style():
    with pytest.raises(ValueError) as e:
        check_for_inversion(LabeledSection(resolution=32), 16)
    msg = str(e.value)
    assert "labeled.resolution" in msg and "Remove labeled.resolution" in msg and "gradient_matching" in msg
    assert check_for_inversion(LabeledSection(resolution=16), 16) == []
    assert check_for_inversion(LabeledSection(), 16) == []
    (warning,) = check_for_inversion(LabeledSection(style="flat"), 16)
    assert "labeled.style" in warning and "gradient_matching" in warning


def test_resize_labeled_for_the_baselines():
    r = toyfaces.render([1, 2, 3], 32, style="flat")
    img, mask = resize_labeled(r["image"], r["mask"], 16)
    assert img.shape == (3, 16, 16, 3) and img.dtype == np.uint8 and mask.shape == (3, 16, 16)
    assert mask.dtype == r["mask"].dtype and set(np.unique(mask)) <= set(np.unique(r["mask"]))  # nearest: no new ids
    up_img, up_mask = resize_labeled(img, mask, 32)
    assert up_img.shape == (3, 32, 32, 3) and np.array_equal(up_mask[:, ::2, ::2], mask)
    same = resize_labeled(r["image"], r["mask"], 32)
    assert same[0] is r["image"] and same[1] is r["mask"]


def test_gradient_matching_learns_from_flat_labels_at_another_resolution(G16):
    G = G16
    r = toyfaces.render(toyfaces.split_seeds("train", 4), 32, style="flat")
    data = FitData(images=r["image"], masks=r["mask"], schema=schema_of(len(toyfaces.CLASSES)))
    cfg = GradientMatchingConfig(steps=3, segmenter_width=8, annotator_width=16, annotator_convs=1, batch_size=2)
    seen: list[dict] = []
    lab = GradientMatchingLabeler.fit(G, data, cfg, progress=seen.append)
    assert seen[-1]["step"] == 3 and np.isfinite(seen[-1]["loss"])
    assert lab.resolution == 16 and lab.num_outputs == len(toyfaces.CLASSES)


@pytest.mark.slow
@pytest.mark.prefect
def test_factory_with_a_flat_labeled_source_at_another_resolution(tmp_path, tiny_generator):
    """labeled: {style: flat, resolution: 32} with a 16-px generator: fit reads the 32-px flat set,
    the labeled_only baseline trains on it resized to 16 px, the test split stays photo."""
    from flows.factory import factory

    cfg = copy.deepcopy(TINY)
    cfg.update(run_dir=str(tmp_path / "run"), generator={"name": tiny_generator},
               labeler={"method": "gradient_matching", "steps": 3})
    cfg["labeled"] = {"source": "toyfaces", "num_images": 4, "style": "flat", "resolution": 32}
    cfg["generate"] = {"num_samples": 16, "samples_per_shard": 16, "batch": 16}
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    factory(config=str(path))
    data = np.load(tmp_path / "run" / "invert" / "labeled.npz")
    assert data["image"].shape == (4, 32, 32, 3)
    flat = toyfaces.render(toyfaces.split_seeds("train", 4), 32, style="flat")["image"]
    assert np.array_equal(data["image"], flat)
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert set(metrics["methods"]) == {"gradient_matching", "labeled_only", "oracle"}
    assert all(np.isfinite(m["miou"]) for m in metrics["methods"].values())

    # HandsOff inverts the labeled images: another resolution is refused with the fix in the message
    cfg["labeler"] = TINY["labeler"]
    cfg["run_dir"] = str(tmp_path / "run-handsoff")
    path.write_text(yaml.safe_dump(cfg))
    with pytest.raises(ValueError, match="labeled.resolution is 32"):
        factory(config=str(path))
