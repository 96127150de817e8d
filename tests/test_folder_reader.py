"""Labeled-folder reader and class-collapse presets: real decoding on small files built with PIL."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from labelfoundry.domains import folder as folder_mod
from labelfoundry.domains.collapse import (
    IGNORE_INDEX,
    CollapseConfigError,
    UnmappedIdsError,
    default_palette,
    list_presets,
    load_collapse,
)
from labelfoundry.domains.folder import LabeledDataError, LabeledFolderSpec, read_labeled_folder

W, H, R = 40, 30, 16  # 40x30 images -> center crop 30x30 at left=5 -> 16x16


# ----------------------------------------------------------------------------- helpers


def save(path: Path, im: Image.Image) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    im.save(path)
    return path


def rgb_image(color=(10, 120, 200), size=(W, H)) -> Image.Image:
    return Image.new("RGB", size, color)


def id_mask(arr: np.ndarray) -> Image.Image:
    return Image.fromarray(arr.astype(np.uint8), mode="L")


def stripes(size=(W, H)) -> np.ndarray:
    """Mask whose id is the 5-pixel column band: ids 0..7 over a 40-wide image."""
    w, h = size
    return np.tile(np.arange(w) // 5, (h, 1))


def make_basic(root: Path, ids=("a", "b")) -> Path:
    for i in ids:
        save(root / "images" / f"{i}.png", rgb_image())
        save(root / "masks" / f"{i}.png", id_mask(stripes()))
    return root


def write_json_kp(path: Path, rows, names=None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    d = {"keypoints": rows}
    if names is not None:
        d["names"] = names
    path.write_text(json.dumps(d))


def error_of(root: Path, **kw) -> LabeledDataError:
    kw.setdefault("resolution", R)
    with pytest.raises(LabeledDataError) as ei:
        read_labeled_folder(root, **kw)
    return ei.value


# ----------------------------------------------------------------------------- images


def test_image_modes_all_become_uint8_rgb(tmp_path):
    img = tmp_path / "images"
    save(img / "rgb.png", rgb_image((10, 120, 200)))
    rgba = np.zeros((H, W, 4), np.uint8)
    rgba[..., :3] = (255, 0, 0)
    rgba[:, : W // 2, 3] = 255  # left half opaque red, right half fully transparent
    save(img / "rgba.png", Image.fromarray(rgba, "RGBA"))
    save(img / "gray.png", Image.new("L", (W, H), 77))
    pal = Image.new("P", (W, H), 3)
    pal.putpalette([0, 0, 0] * 3 + [0, 200, 50] + [0, 0, 0] * 252)
    save(img / "pal.png", pal)
    g16 = Image.fromarray(np.full((H, W), 257 * 90, np.uint16))
    save(img / "gray16.png", g16)
    save(img / "photo.jpg", rgb_image((200, 30, 30)))

    out = {s.sample_id: s for s in read_labeled_folder(tmp_path, resolution=R)}
    assert set(out) == {"rgb", "rgba", "gray", "pal", "gray16", "photo"}
    for s in out.values():
        assert s.image.shape == (R, R, 3) and s.image.dtype == np.uint8
        assert s.mask is None and s.keypoints is None and s.depth is None
    assert np.all(np.abs(out["rgb"].image.astype(int) - (10, 120, 200)) <= 1)
    assert np.all(out["gray"].image == 77)
    assert np.all(np.abs(out["pal"].image.astype(int) - (0, 200, 50)) <= 1)
    assert np.all(np.abs(out["gray16"].image.astype(int) - 90) <= 1)
    assert np.all(np.abs(out["photo"].image.astype(int) - (200, 30, 30)) <= 6)  # JPEG loss
    # RGBA: transparent right part composited over white, opaque left part stays red
    left, right = out["rgba"].image[:, 0], out["rgba"].image[:, -1]
    assert np.all(np.abs(left.astype(int) - (255, 0, 0)) <= 1)
    assert np.all(right == 255)


def test_center_crop_keeps_middle_square(tmp_path):
    a = np.zeros((H, W, 3), np.uint8)
    a[:, :5] = (255, 0, 0)  # cropped away on the left
    a[:, 35:] = (0, 255, 0)  # cropped away on the right
    a[:, 5:35] = (0, 0, 255)
    save(tmp_path / "images" / "x.png", Image.fromarray(a))
    s = read_labeled_folder(tmp_path, resolution=R)[0]
    assert np.all(s.image == (0, 0, 255))  # no bleed from the cropped-away bands
    assert s.meta["crop"] == {"left": 5, "top": 0, "side": 30}
    assert s.meta["original_size"] == (W, H)


def test_tall_image_crops_vertically(tmp_path):
    a = np.zeros((40, 30), np.uint8)
    a[:5] = 9
    a[5:35] = 1
    a[35:] = 8
    save(tmp_path / "images" / "t.png", rgb_image(size=(30, 40)))
    save(tmp_path / "masks" / "t.png", id_mask(a))
    s = read_labeled_folder(tmp_path, resolution=R)[0]
    assert np.all(s.mask == 1)
    assert s.meta["crop"] == {"left": 0, "top": 5, "side": 30}


# ----------------------------------------------------------------------------- masks


def test_id_mask_nearest_resize_and_metadata(tmp_path):
    make_basic(tmp_path, ids=("a",))
    s = read_labeled_folder(tmp_path, resolution=R, num_classes=8)[0]
    assert s.sample_id == "a"
    assert s.mask.shape == (R, R) and s.mask.dtype == np.int64
    # columns 5..34 survive the crop: bands 1..6, never interpolated values
    assert set(np.unique(s.mask)) == {1, 2, 3, 4, 5, 6}
    assert np.all(s.mask == s.mask[0])  # every row identical
    assert np.all(np.diff(s.mask[0]) >= 0)  # bands keep their order
    assert s.mask[0, 0] == 1 and s.mask[0, -1] == 6
    assert s.meta["files"] == {"image": "images/a.png", "mask": "masks/a.png"}
    assert Path(s.meta["root"]) == tmp_path.resolve()


def test_palette_mode_mask_uses_indices(tmp_path):
    save(tmp_path / "images" / "a.png", rgb_image())
    arr = np.zeros((H, W), np.uint8)
    arr[:, 20:] = 4
    m = Image.fromarray(arr, "P")
    m.putpalette([9, 9, 9, 200, 0, 0, 0, 200, 0, 0, 0, 200, 123, 45, 67] + [0] * (256 * 3 - 15))
    save(tmp_path / "masks" / "a.png", m)
    s = read_labeled_folder(tmp_path, resolution=R, num_classes=5)[0]
    assert set(np.unique(s.mask)) == {0, 4}
    assert np.all(s.mask[:, :7] == 0) and np.all(s.mask[:, -7:] == 4)


def test_16bit_mask_ids(tmp_path):
    save(tmp_path / "images" / "a.png", rgb_image())
    arr = np.full((H, W), 300, np.uint16)
    arr[:, :20] = 2
    save(tmp_path / "masks" / "a.png", Image.fromarray(arr))
    y = tmp_path / "map.yaml"  # ids above 254 need a mapping (labels are uint8)
    y.write_text("name: m\nclasses:\n  - {name: bg, ids: [0]}\n  - {name: a, ids: [2]}\n  - {name: b, ids: [300]}\n")
    s = read_labeled_folder(tmp_path, resolution=R, collapse=str(y))[0]
    assert set(np.unique(s.mask)) == {1, 2}


def test_colour_mask_through_palette(tmp_path):
    save(tmp_path / "images" / "a.png", rgb_image())
    c = np.zeros((H, W, 3), np.uint8)
    c[:, 20:] = (255, 0, 0)
    c[:15, :20] = (0, 128, 255)
    save(tmp_path / "masks" / "a.png", Image.fromarray(c))
    pal = {(0, 0, 0): 0, "#ff0000": 2, "0, 128, 255": 1}
    s = read_labeled_folder(tmp_path, resolution=R, palette=pal, num_classes=3)[0]
    assert s.mask[0, 0] == 1 and s.mask[-1, 0] == 0 and s.mask[0, -1] == 2 and s.mask[-1, -1] == 2


def test_colour_mask_unknown_colour_and_missing_palette(tmp_path):
    save(tmp_path / "images" / "a.png", rgb_image())
    c = np.zeros((H, W, 3), np.uint8)
    c[:, 20:] = (1, 2, 3)
    save(tmp_path / "masks" / "a.png", Image.fromarray(c))
    err = error_of(tmp_path, palette={(0, 0, 0): 0})
    assert "masks/a.png" in str(err) and "(1, 2, 3)" in str(err)
    err = error_of(tmp_path)
    assert "masks/a.png" in str(err) and "no palette" in str(err)


def test_gray_rgb_mask_reads_as_ids(tmp_path):
    save(tmp_path / "images" / "a.png", rgb_image())
    c = np.repeat(stripes()[..., None], 3, axis=2).astype(np.uint8)
    save(tmp_path / "masks" / "a.png", Image.fromarray(c))
    s = read_labeled_folder(tmp_path, resolution=R)[0]
    assert set(np.unique(s.mask)) == {1, 2, 3, 4, 5, 6}


# ----------------------------------------------------------------------------- keypoints


def _marker_folder(root: Path, points: list[tuple[int, int]]) -> None:
    """8x6 image (upscaled to 16) whose mask marks each keypoint's pixel with its own id."""
    save(root / "images" / "k.png", rgb_image(size=(8, 6)))
    m = np.zeros((6, 8), np.uint8)
    for i, (x, y) in enumerate(points):
        m[y, x] = i + 1
    save(root / "masks" / "k.png", id_mask(m))


def test_json_keypoints_follow_the_pixels(tmp_path):
    pts = [(1, 0), (4, 2), (6, 5)]  # crop of 8x6 is columns 1..6
    _marker_folder(tmp_path, pts)
    write_json_kp(tmp_path / "keypoints" / "k.json",
                  [[x, y, 2] for x, y in pts] + [[0, 3, 2], [7, 1, 1], [None, None, 0]],
                  names=["p0", "p1", "p2", "off_left", "off_right", "unlabeled"])
    s = read_labeled_folder(tmp_path, resolution=R)[0]
    kp = s.keypoints
    assert kp.shape == (6, 3) and kp.dtype == np.float32
    for i in range(3):
        x, y = int(round(kp[i, 0])), int(round(kp[i, 1]))
        assert kp[i, 2] == 2
        assert s.mask[y, x] == i + 1  # the keypoint lands on its own marker pixel
    # exact transform: x' = (x - left + 0.5) * r / side - 0.5
    np.testing.assert_allclose(kp[1, :2], [(4 - 1 + 0.5) * 16 / 6 - 0.5, (2 + 0.5) * 16 / 6 - 0.5], rtol=1e-6)
    assert kp[3, 2] == 0 and kp[4, 2] == 0  # columns 0 and 7 are cropped away
    assert kp[5, 2] == 0
    assert s.meta["keypoint_names"] == ["p0", "p1", "p2", "off_left", "off_right", "unlabeled"]
    assert s.meta["files"]["keypoints"] == "keypoints/k.json"


def test_image_centre_maps_to_output_centre(tmp_path):
    save(tmp_path / "images" / "c.png", rgb_image())
    write_json_kp(tmp_path / "keypoints" / "c.json", [[19.5, 14.5, 1], [34, 29, 1]])
    kp = read_labeled_folder(tmp_path, resolution=R)[0].keypoints
    np.testing.assert_allclose(kp[0], [7.5, 7.5, 1], atol=1e-5)
    assert kp[1, 2] == 1 and kp[1, 0] < R - 0.5  # last kept pixel stays visible


def test_csv_keypoints(tmp_path):
    pts = [(1, 0), (4, 2)]
    _marker_folder(tmp_path, pts)
    (tmp_path / "keypoints.csv").write_text(
        "id,k,x,y,visible,name\n"
        "k,1,4,2,1,nose\n"
        "k,0,1,0,2,eye\n"
        "k,2,,,0,chin\n"
        "k,3,0,0,2,corner\n"
        "other,0,1,1,1,eye\n"  # rows for ids without an image are ignored
    )
    s = read_labeled_folder(tmp_path, resolution=R)[0]
    kp = s.keypoints
    assert kp.shape == (4, 3)
    assert list(kp[:, 2]) == [2, 1, 0, 0]  # k=3 at column 0 is cropped away
    for i in range(2):
        assert s.mask[int(round(kp[i, 1])), int(round(kp[i, 0]))] == i + 1
    assert s.meta["keypoint_names"] == ["eye", "nose", "chin", "corner"]
    assert s.meta["files"]["keypoints"] == "keypoints.csv"


def test_csv_keypoint_problems_name_lines(tmp_path):
    save(tmp_path / "images" / "a.png", rgb_image())
    save(tmp_path / "images" / "b.png", rgb_image())
    (tmp_path / "keypoints.csv").write_text("id,k,x,y,visible\na,0,1,1,1\na,0,2,2,1\na,x,1,1,1\n")
    err = error_of(tmp_path)
    msg = str(err)
    assert "keypoints.csv line 3" in msg and "repeats line 2" in msg
    assert "keypoints.csv line 4" in msg
    assert "no rows for id 'b'" in msg


def test_keypoints_out_of_image_or_normalized(tmp_path):
    save(tmp_path / "images" / "a.png", rgb_image())
    save(tmp_path / "images" / "b.png", rgb_image())
    write_json_kp(tmp_path / "keypoints" / "a.json", [[300, 5, 2], [1, 1, 2]])
    write_json_kp(tmp_path / "keypoints" / "b.json", [[0.2, 0.5, 2], [0.7, 0.1, 2]])
    msg = str(error_of(tmp_path))
    assert "keypoints/a.json" in msg and "outside the 40x30 image" in msg
    assert "keypoints/b.json" in msg and "normalized" in msg


# ----------------------------------------------------------------------------- depth


def test_depth_png16_with_scale_and_invalid(tmp_path):
    save(tmp_path / "images" / "d.png", rgb_image())
    raw = np.full((H, W), 1500, np.uint16)
    raw[:, 20:] = 0  # invalid right half
    save(tmp_path / "depth" / "d.png", Image.fromarray(raw))
    s = read_labeled_folder(tmp_path, resolution=R, depth_scale=0.001)[0]
    assert s.depth.dtype == np.float32 and s.depth_valid.dtype == bool
    assert s.depth.shape == s.depth_valid.shape == (R, R)
    assert np.allclose(s.depth[s.depth_valid], 1.5)
    assert np.all(s.depth[~s.depth_valid] == 0)
    assert s.depth_valid[:, 0].all() and not s.depth_valid[:, -1].any()
    assert s.meta["files"]["depth"] == "depth/d.png"


def test_depth_npy_invalid_values(tmp_path):
    save(tmp_path / "images" / "d.png", rgb_image())
    d = np.full((H, W), 2.25, np.float32)
    d[:, 5:10] = np.nan
    d[:, 10:15] = np.inf
    d[:, 15:20] = -1.0
    d[:, 20:25] = 0.0
    (tmp_path / "depth").mkdir()
    np.save(tmp_path / "depth" / "d.npy", d)
    s = read_labeled_folder(tmp_path, resolution=R, depth=True)[0]
    assert np.all(np.isfinite(s.depth))
    assert np.allclose(s.depth[s.depth_valid], 2.25)
    assert np.all(s.depth[~s.depth_valid] == 0)
    # crop columns 5..34: invalid bands 5..24 -> the left two thirds of the output
    cols = s.depth_valid[0]
    assert not cols[:10].any() and cols[-5:].all()


def test_depth_problems(tmp_path):
    for i in ("a", "b", "c"):
        save(tmp_path / "images" / f"{i}.png", rgb_image())
    save(tmp_path / "depth" / "a.png", Image.fromarray(np.ones((H + 2, W), np.uint16)))
    save(tmp_path / "depth" / "b.png", Image.new("L", (W, H), 3))  # 8-bit
    np.save(tmp_path / "depth" / "c.npy", np.zeros((H, W), np.float32))
    msg = str(error_of(tmp_path))
    assert "depth/a.png" in msg and "40x32" in msg
    assert "depth/b.png" in msg and "16-bit" in msg
    assert "depth/c.npy" in msg and "no valid depth" in msg


# ----------------------------------------------------------------------------- bad input


def test_missing_or_empty_folders(tmp_path):
    err = error_of(tmp_path / "nope")
    assert "nope" in str(err) and "not found" in str(err)
    err = error_of(tmp_path)
    assert "images/" in str(err) and "missing" in str(err)
    (tmp_path / "images").mkdir()
    err = error_of(tmp_path)
    assert "images/" in str(err) and "no .png" in str(err)
    save(tmp_path / "loose.png", rgb_image())
    (tmp_path / "images").rmdir()
    assert "move them into images/" in str(error_of(tmp_path))


def test_image_without_mask_names_both_files(tmp_path):
    make_basic(tmp_path, ids=("a",))
    save(tmp_path / "images" / "b.png", rgb_image())
    save(tmp_path / "masks" / "img_b.png", id_mask(stripes()))
    err = error_of(tmp_path)
    assert len(err.problems) == 2  # the image without its mask, and the mask without its image
    msg = str(err)
    assert "images/b.png" in msg and "masks/b.png" in msg and "'img_b.png'" in msg
    assert "masks/img_b.png: no images/img_b.* for this mask file" in msg


def test_masks_expected_when_num_classes_given(tmp_path):
    save(tmp_path / "images" / "a.png", rgb_image())
    err = error_of(tmp_path, num_classes=3)
    assert "masks/" in str(err) and "missing" in str(err)


def test_mask_size_mismatch(tmp_path):
    save(tmp_path / "images" / "a.png", rgb_image())
    save(tmp_path / "masks" / "a.png", id_mask(np.zeros((W, H))))  # transposed 30x40
    err = error_of(tmp_path)
    assert "masks/a.png" in str(err) and "30x40" in str(err) and "40x30" in str(err)


def test_mask_ids_above_num_classes_named(tmp_path):
    make_basic(tmp_path, ids=("a",))
    err = error_of(tmp_path, num_classes=6)
    msg = str(err)
    assert "masks/a.png" in msg and "ids 6, 7 are >= num_classes=6" in msg


def test_truncated_png_and_jpeg(tmp_path):
    make_basic(tmp_path, ids=("ok",))
    noise = np.random.default_rng(0).integers(0, 255, (H, W, 3), dtype=np.uint8)
    for name in ("bad_png.png", "bad_jpg.jpg"):
        p = save(tmp_path / "images" / name, Image.fromarray(noise))
        data = p.read_bytes()
        p.write_bytes(data[: len(data) // 2])
        save(tmp_path / "masks" / f"{Path(name).stem}.png", id_mask(stripes()))
    err = error_of(tmp_path)
    files = sorted(p.file for p in err.problems)
    assert files == ["images/bad_jpg.jpg", "images/bad_png.png"]
    assert "truncated or corrupt" in str(err)


def test_keypoint_count_mismatch_names_odd_file(tmp_path):
    for i in ("a", "b", "c"):
        save(tmp_path / "images" / f"{i}.png", rgb_image())
    write_json_kp(tmp_path / "keypoints" / "a.json", [[1, 1, 1], [2, 2, 1]])
    write_json_kp(tmp_path / "keypoints" / "b.json", [[1, 1, 1], [2, 2, 1]])
    write_json_kp(tmp_path / "keypoints" / "c.json", [[1, 1, 1]])
    err = error_of(tmp_path)
    assert [p.file for p in err.problems] == ["keypoints/c.json"]
    assert "has 1 keypoints but 2 other sample(s) have 2" in str(err)


def test_keypoint_names_mismatch_and_bad_json(tmp_path):
    for i in ("a", "b", "c", "d"):
        save(tmp_path / "images" / f"{i}.png", rgb_image())
    write_json_kp(tmp_path / "keypoints" / "a.json", [[1, 1, 1]], names=["eye"])
    write_json_kp(tmp_path / "keypoints" / "b.json", [[1, 1, 1]], names=["eye"])
    write_json_kp(tmp_path / "keypoints" / "c.json", [[1, 1, 1]], names=["nose"])
    (tmp_path / "keypoints" / "d.json").write_text("{not json")
    files = {p.file for p in error_of(tmp_path).problems}
    assert files == {"keypoints/c.json", "keypoints/d.json"}


def test_all_problems_collected_in_one_error(tmp_path):
    make_basic(tmp_path, ids=("a", "b", "c", "d"))
    save(tmp_path / "masks" / "a.png", id_mask(np.zeros((10, 10))))  # size mismatch
    (tmp_path / "masks" / "b.png").unlink()  # missing mask
    (tmp_path / "images" / "c.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")  # corrupt image
    save(tmp_path / "masks" / "e.jpg", rgb_image())  # lossy mask format
    err = error_of(tmp_path, num_classes=7)  # the stripes of c and d hold id 7
    files = sorted(p.file for p in err.problems)
    assert files == ["images/b.png", "images/c.png", "masks/a.png", "masks/c.png", "masks/d.png", "masks/e.jpg"]
    lines = str(err).splitlines()
    assert lines[0].startswith(f"labeled folder {tmp_path}: 6 problems")
    assert all(" — " in ln for ln in lines[1:])  # "<file>: <problem> — <fix>"


def test_many_problems_are_truncated(tmp_path):
    for i in range(25):
        save(tmp_path / "images" / f"{i:02d}.png", rgb_image())
    save(tmp_path / "masks" / "zz.png", id_mask(stripes()))
    err = error_of(tmp_path)
    assert len(err.problems) == 26  # 25 images without a mask, 1 mask without an image
    assert str(err).splitlines()[-1] == "  ... and 6 more"


def test_validation_happens_before_any_sample_is_built(tmp_path, monkeypatch):
    make_basic(tmp_path, ids=("a", "b", "z"))
    save(tmp_path / "masks" / "z.png", id_mask(np.zeros((5, 5))))
    built = []
    monkeypatch.setattr(folder_mod, "_build", lambda plan, e: built.append(e) or None)
    error_of(tmp_path)
    assert built == []


def test_duplicate_stems_and_odd_files(tmp_path):
    save(tmp_path / "images" / "a.png", rgb_image())
    save(tmp_path / "images" / "a.jpg", rgb_image())
    save(tmp_path / "images" / "b.bmp", rgb_image())
    (tmp_path / "images" / ".DS_Store").write_bytes(b"x")  # hidden files are skipped
    msg = str(error_of(tmp_path))
    assert "'a' has 2 files" in msg and "images/b.bmp" in msg and ".DS_Store" not in msg


# ----------------------------------------------------------------------------- ids, limit, options


def test_ids_are_stems_not_numbers(tmp_path):
    for i in ("7", "007", "10", "2"):
        save(tmp_path / "images" / f"{i}.png", rgb_image())
    ids = [s.sample_id for s in read_labeled_folder(tmp_path, resolution=R)]
    assert ids == ["007", "10", "2", "7"]  # string order, "7" and "007" stay distinct
    assert [s.sample_id for s in read_labeled_folder(tmp_path, resolution=R, limit=2)] == ["007", "10"]


def test_limit_skips_problems_in_unselected_samples(tmp_path):
    make_basic(tmp_path, ids=("a", "b"))
    save(tmp_path / "masks" / "b.png", id_mask(np.zeros((5, 5))))
    assert len(read_labeled_folder(tmp_path, resolution=R, limit=1)) == 1


def test_masks_false_ignores_masks_and_spec_model(tmp_path):
    make_basic(tmp_path, ids=("a",))
    save(tmp_path / "masks" / "a.png", id_mask(np.zeros((5, 5))))
    assert read_labeled_folder(tmp_path, resolution=R, masks=False)[0].mask is None
    spec = LabeledFolderSpec(path=tmp_path, resolution=R)
    assert [p.file for p in spec.check()] == ["masks/a.png"]
    with pytest.raises(ValueError):
        LabeledFolderSpec(path=tmp_path, resolution=0)
    with pytest.raises(ValueError):
        LabeledFolderSpec(path=tmp_path, resolution=R, masks=False, num_classes=3)
    with pytest.raises(ValueError):
        LabeledFolderSpec(path=tmp_path, resolution=R, palette={"#12345": 1})
    with pytest.raises(ValueError):
        LabeledFolderSpec(path=tmp_path, resolution=R, unknown_option=1)


def test_required_keypoints_and_depth_missing(tmp_path):
    save(tmp_path / "images" / "a.png", rgb_image())
    files = {p.file for p in error_of(tmp_path, keypoints=True, depth=True).problems}
    assert files == {"keypoints/", "depth/"}


# ----------------------------------------------------------------------------- collapse presets

CELEBA_EXPECTED = [0, 1, 2, 3, 3, 3, 4, 4, 5, 5, 6, 6, 6, 7, 0, 0, 0, 0, 0]


def test_presets_cover_every_original_id():
    assert list_presets() == ["car-parts-10", "celebamask-hq-8", "cityscapes-8",
                              "deepfashion-mm-10", "deepfashion-mm-8"]
    expect = {"celebamask-hq-8": (8, range(19)), "car-parts-10": (10, range(19)),
              "deepfashion-mm-10": (10, range(24)), "deepfashion-mm-8": (8, range(24)),
              "cityscapes-8": (8, [-1, *range(34)])}
    for name, (n, ids) in expect.items():
        c = load_collapse(name)
        assert c.num_classes == n and len(c.colors) == n
        assert sorted(c.mapping) == sorted(ids), name
        assert set(c.mapping.values()) == set(range(n)), name  # no empty class, no ignore
        assert c.schema().num_classes == n


def test_preset_contents_follow_the_paper():
    celeba = load_collapse("celebamask-hq-8")
    assert celeba.apply(np.arange(19)).tolist() == CELEBA_EXPECTED
    car = load_collapse("car-parts-10")
    assert car.class_names[car.mapping[2]] == "back_window"
    assert car.class_names[car.mapping[3]] == "doors"
    df10, df8 = load_collapse("deepfashion-mm-10"), load_collapse("deepfashion-mm-8")
    for c in (df10, df8):
        assert {i for i, v in c.mapping.items() if c.class_names[v] == "face"} == {8, 14, 22}
        assert {i for i, v in c.mapping.items() if c.class_names[v] == "skin"} == {9, 15, 16, 17, 19, 20}
    assert df8.class_names[df8.mapping[2]] == "top" and df8.mapping[12] == 0
    assert df10.class_names[df10.mapping[12]] == "bags"
    city = load_collapse("cityscapes-8")
    assert [city.class_names[city.mapping[i]] for i in (8, 9, 10, 7, 26, -1)] == \
        ["void", "void", "void", "road", "vehicle", "vehicle"]


def test_celeba_mask_collapses_through_reader(tmp_path):
    save(tmp_path / "images" / "f.png", rgb_image(size=(19, 19)))
    orig = np.tile(np.arange(19), (19, 1))
    save(tmp_path / "masks" / "f.png", id_mask(orig))
    s = read_labeled_folder(tmp_path, resolution=19, collapse="celebamask-hq-8")[0]
    assert s.mask[0].tolist() == CELEBA_EXPECTED
    assert s.meta["collapse"] == "celebamask-hq-8"


def test_collapse_unknown_ids_name_the_ids(tmp_path):
    with pytest.raises(UnmappedIdsError) as ei:
        load_collapse("celebamask-hq-8").apply(np.array([[0, 19], [42, 1]]))
    assert ei.value.ids == [19, 42] and "19, 42" in str(ei.value)
    save(tmp_path / "images" / "f.png", rgb_image())
    m = np.zeros((H, W))
    m[0, 0], m[1, 1] = 19, 42
    save(tmp_path / "masks" / "f.png", id_mask(m))
    msg = str(error_of(tmp_path, collapse="celebamask-hq-8"))
    assert "masks/f.png" in msg and "ids 19, 42" in msg and "celebamask-hq-8" in msg


def test_unknown_preset_lists_presets(tmp_path):
    with pytest.raises(CollapseConfigError) as ei:
        load_collapse("celeba")
    assert "celebamask-hq-8" in str(ei.value) and "cityscapes-8" in str(ei.value)
    with pytest.raises(CollapseConfigError) as ei:
        load_collapse(tmp_path / "missing.yaml")
    assert "missing.yaml" in str(ei.value)


def test_custom_yaml_default_palette_and_ignore(tmp_path):
    y = tmp_path / "mine.yaml"
    y.write_text("name: mine\nclasses:\n  - {name: bg, ids: [0]}\n  - {name: fg, ids: [1, 2]}\n"
                 "  - {name: rare, ids: [9], color: [1, 2, 3]}\nignore: [255, 7]\n")
    c = load_collapse(y)
    assert c.colors == (default_palette(3)[0], default_palette(3)[1], (1, 2, 3))
    assert c.colors[0] == (0, 0, 0) and len(set(default_palette(64))) == 64
    assert c.apply(np.array([0, 1, 2, 9, 7, 255])).tolist() == [0, 1, 1, 2, IGNORE_INDEX, IGNORE_INDEX]
    # ignored pixels pass the num_classes check in the reader
    save(tmp_path / "d" / "images" / "a.png", rgb_image())
    m = np.zeros((H, W))
    m[:, 20:] = 7
    save(tmp_path / "d" / "masks" / "a.png", id_mask(m))
    s = read_labeled_folder(tmp_path / "d", resolution=R, collapse=str(y), num_classes=3)[0]
    assert set(np.unique(s.mask)) == {0, IGNORE_INDEX}
    with pytest.raises(ValueError, match="num_classes=5"):
        read_labeled_folder(tmp_path / "d", resolution=R, collapse=str(y), num_classes=5)


def test_bad_collapse_yaml_names_file(tmp_path):
    dup = tmp_path / "dup.yaml"
    dup.write_text("name: x\nclasses:\n  - {name: a, ids: [0, 1]}\n  - {name: b, ids: [1]}\n")
    with pytest.raises(CollapseConfigError, match=r"dup\.yaml: original id 1 is listed under both 'a' and 'b'"):
        load_collapse(dup)
    typo = tmp_path / "typo.yaml"
    typo.write_text("name: x\nclases: []\n")
    with pytest.raises(CollapseConfigError, match=r"typo\.yaml"):
        load_collapse(typo)


def test_exif_rotation_applied_before_size_checks(tmp_path):
    a = np.zeros((W, H, 3), np.uint8)  # stored 30 wide x 40 tall
    a[:5] = 255  # top rows white in storage
    exif = Image.Exif()
    exif[0x0112] = 6  # display rotated 90 degrees clockwise -> 40 wide x 30 tall
    (tmp_path / "images").mkdir()
    Image.fromarray(a).save(tmp_path / "images" / "r.jpg", exif=exif, quality=95)
    save(tmp_path / "masks" / "r.png", id_mask(np.zeros((H, W))))  # annotated on the displayed image
    s = read_labeled_folder(tmp_path, resolution=R, num_classes=1)[0]
    assert s.meta["original_size"] == (W, H)
    # the stored top rows end up on the right after rotation, and the 5-column band is cropped away
    assert s.image.max() < 40


# ----------------------------------------------------------------------------- hostile input


def test_fifo_named_like_an_image_is_refused_unopened(tmp_path, monkeypatch):
    import os

    make_basic(tmp_path, ids=("b",))
    os.mkfifo(tmp_path / "images" / "a.png")  # opening it for reading would block forever
    opened: list[str] = []
    real_open = folder_mod.Image.open

    def spy(fp, *a, **kw):
        opened.append(str(fp))
        if Path(fp).name == "a.png":
            raise AssertionError("the FIFO was opened")
        return real_open(fp, *a, **kw)

    monkeypatch.setattr(folder_mod.Image, "open", spy)
    err = error_of(tmp_path)
    assert "images/a.png: not a regular file" in str(err)
    assert not any(o.endswith("a.png") for o in opened)


def test_mask_without_image_is_named(tmp_path):
    make_basic(tmp_path, ids=("a",))
    save(tmp_path / "masks" / "zzz.png", id_mask(stripes()))
    err = error_of(tmp_path)
    assert len(err.problems) == 1
    assert "masks/zzz.png: no images/zzz.* for this mask file" in str(err)


@pytest.mark.parametrize("size", [(1, 1), (3, 40)])
def test_tiny_image_is_refused(tmp_path, size):
    save(tmp_path / "images" / "t.png", rgb_image(size=size))
    err = error_of(tmp_path)
    assert "images/t.png" in str(err) and "below the minimum" in str(err)
    # 1/MAX_UPSCALE of a large output resolution is required too
    save(tmp_path / "images" / "t.png", rgb_image(size=(20, 20)))
    assert read_labeled_folder(tmp_path, resolution=R)[0].image.shape == (R, R, 3)
    err = error_of(tmp_path, resolution=256)
    assert "minimum of 32 px" in str(err)


def test_16bit_mask_ids_above_uint8_refused_up_front(tmp_path):
    save(tmp_path / "images" / "a.png", rgb_image())
    m = stripes().astype(np.uint16)
    m[0, 0] = 300
    save(tmp_path / "masks" / "a.png", Image.fromarray(m))
    for kw in ({}, {"num_classes": 255}):
        msg = str(error_of(tmp_path, **kw))
        assert "masks/a.png" in msg and "id 300 is above 254" in msg and "collapse=" in msg


def test_large_ids_without_mapping_refused(tmp_path):
    save(tmp_path / "images" / "a.png", rgb_image())
    m = stripes()
    m[0, 0] = 200
    save(tmp_path / "masks" / "a.png", id_mask(m))
    msg = str(error_of(tmp_path))
    assert "masks/a.png" in msg and "class count would be 201" in msg and "num_classes=" in msg
    with pytest.raises(ValueError, match="less than or equal to 255"):
        read_labeled_folder(tmp_path, resolution=R, num_classes=256)


def _png_bomb(path: Path, side: int) -> None:
    """A few hundred bytes that declare a side x side 8-bit grey PNG (never fully decodable)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    idat = zlib.compress(b"\0" * 1024)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b""))


@pytest.mark.parametrize("side", [100_000, 12_000])  # over 2x PIL's limit (its error) and between 1x and 2x
def test_decompression_bomb_says_what_it_is(tmp_path, side):
    _png_bomb(tmp_path / "images" / "bomb.png", side)
    msg = str(error_of(tmp_path))
    assert "images/bomb.png" in msg and "decompression-bomb" in msg.replace("decompression bomb", "decompression-bomb")
    assert "truncated or corrupt" not in msg and "downscale" in msg
