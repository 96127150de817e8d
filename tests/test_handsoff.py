"""HandsOff core: factorized features == naive hypercolumn, inversion, fit + label end to end."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from labelfoundry.features import (
    FactorizedProjection, TapSpec, TiledProjection, gather_taps, generate_with_taps, naive_hypercolumn, pixel_grid,
)
from labelfoundry.generators import Generator
from labelfoundry.inversion.optimize import InversionConfig, InversionResult, invert, load_lpips
from labelfoundry.labelers import FitData, GenBatch, load_labeler
from labelfoundry.labelers.handsoff import HandsOffConfig, HandsOffLabeler
from tests.conftest import fit_data


@pytest.fixture(scope="module")
def G(G32):
    return G32


@pytest.fixture(scope="module")
def batch(G):
    torch.manual_seed(1)
    ws = G.mapping(torch.randn(4, G.z_dim))
    img, taps = generate_with_taps(G, ws, TapSpec())
    return ws, img, taps


def _all_pixels(n, R):
    ys, xs = torch.meshgrid(torch.arange(R), torch.arange(R), indexing="ij")
    return ys.reshape(1, -1).expand(n, -1), xs.reshape(1, -1).expand(n, -1)


def test_factorized_first_layer_equals_naive_hypercolumn(G, batch):
    _, _, taps = batch
    proj = FactorizedProjection([t.shape[1] for t in taps], members=3, hidden=8)
    with torch.no_grad():
        proj.bias.normal_()
    R = G.resolution
    hc = naive_hypercolumn(taps, R)  # (N, C, R, R): the papers' materialised hypercolumn
    naive = torch.einsum("oc,nchw->nhwo", proj.weight, hc) + proj.bias
    # the labeling path: per-image row tiles of any height, rolling bands of any chunk, projected
    # then upsampled (resolutions <= small_res by the matmul, larger ones by lerps)
    ch, res = [t.shape[1] for t in taps], [t.shape[-1] for t in taps]
    # One workspace serves all four images, as in HandsOffLabeler.label: a band that kept the last
    # image's rows (a whole low resolution fits in one chunk at chunk_px 512) would leak them into the next.
    for rows, chunk_px, small_res in ((1, 8, 16), (5, 40, 4), (3, 512, 8), (R, 512, 16)):
        tp = TiledProjection(proj.weight, proj.bias, ch, res, R, tile_rows=rows, chunk_px=chunk_px, small_res=small_res)
        work = tp.workspace(taps[0].device)
        tiles = [torch.cat([h.clone().view(y1 - y0, R, -1) for y0, y1, h in tp.image(taps, n, work)]) for n in range(4)]
        torch.testing.assert_close(torch.stack(tiles), naive, atol=1e-5, rtol=1e-5)
        # bands sized tight (the equality above shows they are not too tight): never more rows than
        # the map has (the old sizing gave a 16-row map a 19-row band at chunk_px 512)
        assert all(b.shape[0] <= g.res for g, b in zip(tp.low, work.bands))
    # the fitting path (gather the features, then project) is the same function
    ys, xs = _all_pixels(4, R)
    grid = pixel_grid(ys, xs, R)
    feats = gather_taps(taps, grid).reshape(4, 1, R * R, -1).expand(-1, 3, -1, -1)
    fit_path = proj.project_features(feats).permute(0, 2, 1, 3).reshape(4, R, R, -1)
    torch.testing.assert_close(fit_path, naive, atol=1e-5, rtol=1e-5)


def test_tapspec_channel_subset_and_rgb(G, batch):
    ws, img, taps = batch
    spec = TapSpec(layers=(0, 2), max_channels=8, include_rgb=True)
    sel = spec.select(taps, img)
    assert [t.shape[1] for t in sel] == spec.channels(G.tap_channels) == [8, 8, 3]


def test_inversion_lowers_loss_and_respects_constraint(G):
    torch.manual_seed(3)
    with torch.no_grad():
        target = G.synthesis(G.mapping(torch.randn(2, G.z_dim)))
    cfg0 = InversionConfig(steps=0, c_reg=0.05)
    cfg = InversionConfig(steps=40, lr=0.05, c_reg=0.05)
    before = invert(G, target, cfg0)
    after = invert(G, target, cfg)
    assert (after.loss < before.loss).all()
    start = G.w_avg.reshape(1, 1, -1)
    msd = (after.ws - start).square().mean(dim=[1, 2])
    assert (msd <= 0.05 + 1e-5).all()
    assert after.recon.shape == (2, 32, 32, 3) and after.recon.dtype == np.uint8


def test_inversion_result_round_trip(tmp_path, G):
    res = invert(G, torch.zeros(2, 3, 32, 32), InversionConfig(steps=2), ids=["a", "b"])
    res.save(tmp_path / "inv.pt")
    back = InversionResult.load(tmp_path / "inv.pt")
    assert back.ids == ["a", "b"] and torch.equal(back.ws, res.ws)


def test_inversion_rejects_wrong_resolution(G):
    with pytest.raises(ValueError, match="resize"):
        invert(G, np.zeros((1, 16, 16, 3), np.uint8), InversionConfig(steps=1))


def test_lpips_offline_error_names_the_file(monkeypatch, tmp_path):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    with pytest.raises(FileNotFoundError, match="vgg16-397923af.pth"):
        load_lpips("vgg", "cpu")


def _masks(img):
    return (img[:, 0] > 0).long() + (img[:, 1] > 0.2).long()


def test_fit_and_label_end_to_end(tmp_path, G, batch):
    ws, img, taps = batch
    masks = _masks(img)
    cfg = HandsOffConfig(members=3, hidden=(16, 8), min_steps=120, pixels_per_image=256)
    lab = HandsOffLabeler.fit(G, fit_data(masks, 3, latents=ws), cfg)
    out = lab.label(GenBatch(ws, img, taps))
    acc = (out.label.long() == masks).float().mean().item()
    assert acc > 0.8
    assert out.uncertainty.shape == (4, 32, 32) and (out.uncertainty >= 0).all()
    assert torch.allclose(out.score, out.uncertainty.flatten(1).sum(1))
    # tiles: the same labels with a tiny tile budget
    lab.cfg.tile_pixels = 40
    out2 = lab.label(GenBatch(ws, img, taps))
    assert torch.equal(out.label, out2.label)
    lab.save(tmp_path / "l.safetensors")
    back = load_labeler(tmp_path / "l.safetensors")
    assert torch.equal(back.label(GenBatch(ws, img, taps)).label, out2.label)


def test_tile_size_follows_precision_unless_set(G, batch):
    """tile_pixels None: 1024 px in fp32, bf16 tiles sized to ~2M first-layer values (never fewer
    than 1024 px), at least 64k px on CUDA; an explicit size is kept. The tiling never changes the
    labels, in either precision."""
    ws, img, taps = batch
    cfg = HandsOffConfig(members=2, hidden=(8, 4), min_steps=5, pixels_per_image=64)
    lab = HandsOffLabeler.fit(G, fit_data(_masks(img), 3, latents=ws), cfg)
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert lab._tile_pixels(cpu, torch.float32) == 1024
    assert lab._tile_pixels(cpu, torch.bfloat16) == 2**21 // 16
    assert lab._tile_pixels(cuda, torch.bfloat16) == 65536
    wide = HandsOffLabeler(HandsOffConfig(members=10, hidden=(256, 32)), lab.tap_channels, lab.resolution, lab.num_outputs)
    assert wide._tile_pixels(cpu, torch.bfloat16) == 1024  # 2^21 / 2560 is under the floor
    for dtype in (torch.float32, torch.bfloat16):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            lab.cfg.tile_pixels = None
            auto = lab.label(GenBatch(ws, img, taps))
            lab.cfg.tile_pixels = 64  # two rows of 32 per tile
            assert lab._tile_pixels(cpu, dtype) == 64
            tiled = lab.label(GenBatch(ws, img, taps))
        assert torch.equal(auto.label, tiled.label)
        assert torch.allclose(auto.uncertainty, tiled.uncertainty, atol=1e-6 if dtype == torch.float32 else 1e-2)


def test_labeling_plan_is_reused_until_the_weights_change(G, batch):
    """The folded weights are cached across label() calls, and rebuilt after any in-place write
    (an optimiser step, load_state_dict): the labels always follow the current weights."""
    ws, img, taps = batch
    cfg = HandsOffConfig(members=2, hidden=(8, 4), min_steps=5, pixels_per_image=64)
    lab = HandsOffLabeler.fit(G, fit_data(_masks(img), 3, latents=ws), cfg)
    first = lab.label(GenBatch(ws, img, taps))
    plan = lab._plan
    assert torch.equal(lab.label(GenBatch(ws, img, taps)).uncertainty, first.uncertainty) and lab._plan is plan
    with torch.no_grad():
        lab.net.b3[:, 0] += 5.0  # every member now favours class 0
    moved = lab.label(GenBatch(ws, img, taps))
    assert lab._plan is not plan and not torch.equal(moved.uncertainty, first.uncertainty)
    fresh = HandsOffLabeler(lab.cfg, lab.tap_channels, lab.resolution, lab.num_outputs, lab.meta)
    fresh.load_state_dict(lab.state_dict())
    assert torch.equal(fresh.eval().label(GenBatch(ws, img, taps)).uncertainty, moved.uncertainty)


def test_fit_continuous_tasks(G, batch):
    ws, img, taps = batch
    depth = img[:, 0].detach() * 2 + 5
    cfg = HandsOffConfig(task="depth", members=2, hidden=(8, 4), min_steps=30, pixels_per_image=128)
    lab = HandsOffLabeler.fit(G, FitData(depth=depth, latents=ws), cfg)
    out = lab.label(GenBatch(ws, img, taps))
    assert out.label.shape == (4, 1, 32, 32) and out.label.dtype == torch.float32
    kp = torch.tensor([[[5.0, 6.0, 1.0], [20.0, 20.0, 1.0]]]).repeat(4, 1, 1)
    cfg = HandsOffConfig(task="keypoints", members=2, hidden=(8, 4), min_steps=20, pixels_per_image=128)
    out = HandsOffLabeler.fit(G, FitData(keypoints=kp, latents=ws), cfg).label(GenBatch(ws, img, taps))
    assert out.label.shape == (4, 2, 32, 32)


def test_depth_is_fitted_standardised_and_labeled_in_depth_units(tmp_path, G, batch):
    """Depth far from 0 (here ~10 ± 1): a short fit already labels at the right level, because the
    members regress standardised depth; the affine survives save/load and scales the variance too."""
    ws, img, taps = batch
    depth = img[:, 0].detach() + 10.0  # the image's red channel in [-1, 1], offset like toy-face depth
    cfg = HandsOffConfig(task="depth", members=2, hidden=(8, 4), min_steps=40, pixels_per_image=256)
    lab = HandsOffLabeler.fit(G, FitData(depth=depth, latents=ws), cfg)
    assert lab.meta["target_shift"] == pytest.approx(float(depth.mean()), abs=1e-4)
    out = lab.label(GenBatch(ws, img, taps))
    assert abs(out.label.mean().item() - depth.mean().item()) < 0.5  # the level: raw outputs start near 0, not 10
    err = (out.label[:, 0] - depth).abs().mean().item()
    assert err < (depth - depth.mean()).abs().mean().item()  # and the image's variation: better than the mean depth
    lab.save(tmp_path / "d.safetensors")
    back = load_labeler(tmp_path / "d.safetensors").label(GenBatch(ws, img, taps))
    torch.testing.assert_close(back.label, out.label)
    unit = HandsOffLabeler(lab.cfg, lab.tap_channels, lab.resolution, lab.num_outputs,
                           {**lab.meta, "target_shift": 0.0, "target_scale": 1.0})
    unit.load_state_dict(lab.state_dict())
    raw = unit.eval().label(GenBatch(ws, img, taps))
    s = lab.meta["target_scale"]
    torch.testing.assert_close(out.label, raw.label * s + lab.meta["target_shift"], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out.uncertainty, raw.uncertainty * s * s, atol=1e-5, rtol=1e-3)


def test_fit_rejects_bad_labels(G, batch):
    ws, img, _ = batch
    with pytest.raises(ValueError, match="outside"):
        HandsOffLabeler.fit(G, fit_data(torch.full((4, 32, 32), 7), 3, latents=ws), HandsOffConfig(min_steps=1))
    with pytest.raises(ValueError, match="generator makes"):
        HandsOffLabeler.fit(G, fit_data(torch.zeros(4, 16, 16, dtype=torch.long), 3, latents=ws), HandsOffConfig(min_steps=1))
    with pytest.raises(ValueError, match="needs FitData.latents"):
        HandsOffLabeler.fit(G, fit_data(torch.zeros(4, 32, 32, dtype=torch.long), 3), HandsOffConfig(min_steps=1))


def test_class_balanced_sampling_weights(G, batch):
    ws, img, _ = batch
    masks = torch.zeros(4, 32, 32, dtype=torch.long)
    masks[:, :2, :2] = 1  # a rare class: 4 of 1024 pixels
    cfg = HandsOffConfig(members=2, hidden=(8, 4), min_steps=60, class_balanced=True, pixels_per_image=128)
    lab = HandsOffLabeler.fit(G, fit_data(masks, 2, latents=ws), cfg)
    _, _, taps = batch
    out = lab.label(GenBatch(ws, img, taps))
    assert (out.label[:, :2, :2] == 1).float().mean() > 0.5  # the rare class is learned, not drowned


def test_partial_class_balance_weights():
    """class_balanced=p weights each labeled pixel by its class frequency^-p: p = 0.5 sits between
    as-labeled and equal classes; a bad exponent is refused when the config is made, before any fit."""
    from labelfoundry.labelers.base import FitData
    from labelfoundry.labelers.handsoff import _fit_targets

    masks = torch.zeros(1, 8, 8, dtype=torch.long)
    masks[0, 0, :4] = 1  # 4 of 64 pixels
    data = FitData(masks=masks, schema={"class_names": ["a", "b"]})
    share = {}
    for p in (False, 0.5, True):
        _, w, _ = _fit_targets(HandsOffConfig(class_balanced=p), data, 8)
        share[p] = float(w[0, 0, :4].sum() / w.sum())  # the rare class's share of the draws
    assert share[False] == pytest.approx(4 / 64)
    assert share[True] == pytest.approx(0.5)
    assert share[False] < share[0.5] < share[True]
    assert share[0.5] == pytest.approx(4 * 4**-0.5 / (4 * 4**-0.5 + 60 * 60**-0.5))
    with pytest.raises(ValueError, match="class_balanced"):
        _fit_targets(HandsOffConfig(class_balanced=2.0), data, 8)


def test_bf16_labeling_agrees_with_fp32(G, batch):
    """The bf16 path (what generation runs under bf16 autocast) against fp32 on the same taps:
    >= 99% of pixels the same class; JS within 0.02 nats per pixel (max) and 2e-3 (mean)."""
    ws, img, taps = batch
    cfg = HandsOffConfig(members=4, hidden=(32, 8), min_steps=100, pixels_per_image=256, tile_pixels=200)
    lab = HandsOffLabeler.fit(G, fit_data(_masks(img), 3, latents=ws), cfg)
    fp32 = lab.label(GenBatch(ws, img, taps))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bf16 = lab.label(GenBatch(ws, img, taps))
    assert not torch.equal(fp32.uncertainty, bf16.uncertainty)  # it did run in reduced precision
    assert bf16.uncertainty.dtype == torch.float32 and (bf16.uncertainty >= 0).all()
    assert (fp32.label == bf16.label).float().mean() >= 0.99
    diff = (fp32.uncertainty - bf16.uncertainty).abs()
    assert diff.max() <= 0.02 and diff.mean() <= 2e-3
    assert fp32.uncertainty.max() > 0.05  # the members disagree somewhere: the JS check is not vacuous
