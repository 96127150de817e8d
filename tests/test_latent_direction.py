"""Latent-direction labeler (paper 002): loss terms by hand, refinement rules, fit + label, save/load."""

import dataclasses

import pytest
import torch

from labelfoundry.features import generate_with_taps
from labelfoundry.labelers.base import FitData, GenBatch, LabelBatch
from labelfoundry.labelers.latent_direction import (
    LatentDirectionConfig,
    LatentDirectionLabeler,
    brightness_loss,
    connected_components,
    direction_loss,
    radial_prior,
    refine,
    remove_small_components,
    sobel_consistency_loss,
    sobel_structure,
)



pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def G(G16):
    return G16


@pytest.fixture(scope="module")
def fitted(G):
    cfg = LatentDirectionConfig(steps=2, batch_size=4, scale_samples=64, min_brightness_change=0.0, max_mask_fraction=1.0)
    return LatentDirectionLabeler.fit(G, FitData(), cfg)


def _batch(G, lab, n=5, seed=1):
    torch.manual_seed(seed)
    ws = G.mapping(torch.randn(n, G.z_dim))
    img, taps = generate_with_taps(G, ws, lab.tap_spec)
    return GenBatch(ws, img, taps, G=G)


# ------------------------------------------------------------------ Eq. 1 terms
def test_sobel_consistency_zero_for_identical_images():
    x = torch.rand(2, 3, 8, 8) * 2 - 1
    assert sobel_consistency_loss(x, x.clone()).item() == 0.0


def test_sobel_consistency_of_a_shifted_edge_matches_hand_computation():
    # Rows are identical, so g^T*x = 0 and g*x = 4 * (x[j+1] - x[j-1]) (rows weighted 1,2,1; replicate border).
    # x  = [0,0,1,1] -> g*x = 4*[0,1,1,0] -> S = 16*[0,1,1,0]
    # x' = [0,1,1,1] -> g*x = 4*[1,1,0,0] -> S = 16*[1,1,0,0]
    # (S' - S)^2 = 256*[1,0,1,0] -> mean 128
    x = torch.tensor([0.0, 0.0, 1.0, 1.0]).expand(1, 1, 3, 4).contiguous()
    xs = torch.tensor([0.0, 1.0, 1.0, 1.0]).expand(1, 1, 3, 4).contiguous()
    torch.testing.assert_close(sobel_structure(x)[0, 0], torch.tensor([0.0, 16.0, 16.0, 0.0]))
    assert sobel_consistency_loss(x, xs).item() == pytest.approx(128.0, rel=1e-5)


def test_sobel_structure_matches_explicit_definition():
    torch.manual_seed(0)
    x = torch.rand(1, 3, 5, 6)
    g = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]])
    pad = torch.nn.functional.pad(x, (1, 1, 1, 1), mode="replicate")[0]
    want = torch.zeros(5, 6)
    for c in range(3):
        for i in range(5):
            for j in range(6):
                patch = pad[c, i : i + 3, j : j + 3]
                want[i, j] += (patch * g).sum() ** 2 + (patch * g.T).sum() ** 2
    torch.testing.assert_close(sobel_structure(x)[0], want, rtol=1e-5, atol=1e-4)


def test_radial_prior_and_bright_centre_lowers_brightness_loss():
    r = radial_prior(9, 9)
    assert r[4, 4].item() == pytest.approx(1.0)
    for corner in (r[0, 0], r[0, 8], r[8, 0], r[8, 8]):
        assert corner.item() == pytest.approx(-1.0)
    centre = (r > 0).float() * 2 - 1  # bright where the prior is positive
    centre_img = centre.expand(1, 3, 9, 9)
    border_img = -centre_img
    assert brightness_loss(centre_img) < brightness_loss(border_img)
    # lambda > 0 prefers the bright centre, lambda < 0 the bright border (v_l vs v_d, §3.1.1)
    same = torch.zeros(1, 3, 9, 9)
    assert direction_loss(same, centre_img, 5.0)[0] < direction_loss(same, border_img, 5.0)[0]
    assert direction_loss(same, centre_img, -5.0)[0] > direction_loss(same, border_img, -5.0)[0]


def test_direction_step_lowers_loss(G):
    cfg = LatentDirectionConfig(steps=6, batch_size=8, lr=0.05)
    lab = LatentDirectionLabeler(cfg, G.w_dim, G.resolution)
    gen = torch.Generator().manual_seed(0)
    pool = lab.sample_latents(G, 8, gen)  # batch_size == pool: every step sees the same latents
    v, hist = lab.optimize_direction(G, +1.0, cfg.steps, gen, latents=pool)
    with torch.no_grad():
        final = direction_loss(lab.original_images(G, pool), lab.shifted_images(G, pool, v, cfg.epsilon), cfg.lam)[0]
    assert v.norm().item() == pytest.approx(1.0, abs=1e-5)
    assert final.item() < hist[0]


# ------------------------------------------------------------------ refinement (§3.2.1)
def test_connected_components_eight_connected():
    m = torch.zeros(1, 6, 6, dtype=torch.bool)
    m[0, 0, 0] = m[0, 1, 1] = m[0, 2, 2] = True  # diagonal chain: one component
    m[0, 4:6, 4:6] = True
    lab = connected_components(m)[0]
    assert lab[0, 0] == lab[1, 1] == lab[2, 2] != 0
    assert lab[4, 4] == lab[5, 5] != lab[0, 0]
    assert (lab[~m[0]] == 0).all()
    assert len(lab.unique()) == 3


def test_small_component_is_removed_and_large_kept():
    cfg = LatentDirectionConfig()
    diff = -torch.ones(1, 16, 16)
    diff[0, 4:10, 4:10] = 1.0  # 36 px object
    diff[0, 14, 14] = 1.0  # 1 px speck (< 0.2 x 36)
    mask, unc, rejected = refine(diff, cfg)
    assert mask[0, 4:10, 4:10].all() and not mask[0, 14, 14]
    assert int(mask.sum()) == 36
    assert unc[0, 14, 14] == 1.0  # label overrode the raw sign there
    assert not rejected[0]
    # a second component of comparable size survives
    diff[0, 12:15, 12:15] = 1.0  # 9 px > 0.2 x 36
    assert int(remove_small_components(diff > 0, 0.2).sum()) == 45


def test_too_large_mask_is_rejected():
    cfg = LatentDirectionConfig(max_mask_fraction=0.5)
    diff = torch.ones(2, 10, 10)
    diff[1, :, 7:] = -1.0  # 70% foreground in sample 1, 100% in sample 0
    diff[0, :, :] = -1.0
    diff[0, 3:6, 3:6] = 1.0  # sample 0 now 9% foreground
    mask, unc, rejected = refine(diff, cfg)
    assert rejected.tolist() == [False, True]
    assert (unc[1] == 1).all() and (unc[0] < 1).any()


def test_too_small_brightness_change_is_rejected():
    cfg = LatentDirectionConfig(min_brightness_change=0.05)
    diff = -torch.ones(2, 10, 10)
    diff[:, 3:6, 3:6] = 1.0
    diff[1] *= 0.01  # same mask, but the shift barely changed the brightness
    mask, unc, rejected = refine(diff, cfg)
    assert torch.equal(mask[0], mask[1])
    assert rejected.tolist() == [False, True]
    assert (unc[1] == 1).all()


def test_empty_mask_is_rejected_and_uncertainty_tracks_margin():
    cfg = LatentDirectionConfig(margin_quantile=1.0, threshold="zero")
    diff = -torch.ones(2, 8, 8)
    diff[1, 2:5, 2:5] = 1.0
    diff[1, 0, 0] = -0.25  # low margin background pixel
    _, unc, rejected = refine(diff, cfg)
    assert rejected.tolist() == [True, False]
    assert unc[1, 0, 0].item() == pytest.approx(0.75)
    assert unc[1, 3, 3].item() == pytest.approx(0.0)


def test_otsu_threshold_finds_an_unchanged_foreground_on_a_darkened_background():
    # What the directions do on toy faces: the background darkens (Δgray ~ -0.6), the face barely
    # changes (Δgray ~ ±0.02). Eq. 2's sign rule gives speckle; Otsu splits changed from unchanged.
    g = torch.Generator().manual_seed(0)
    diff = -0.6 + 0.05 * torch.randn(2, 16, 16, generator=g)
    diff[:, 4:12, 4:12] = 0.02 * torch.randn(2, 8, 8, generator=g)
    truth = torch.zeros(2, 16, 16, dtype=torch.bool)
    truth[:, 4:12, 4:12] = True
    otsu, _, rejected = refine(diff, LatentDirectionConfig(threshold="otsu", min_component_fraction=0.0))
    assert torch.equal(otsu, truth) and not rejected.any()
    zero, _, _ = refine(diff, LatentDirectionConfig(threshold="zero", min_component_fraction=0.0))
    assert 0 < int(zero.sum()) < 0.8 * int(truth.sum())
    # a constant difference has no foreground under either rule: rejected as an empty mask
    _, unc, rejected = refine(-torch.ones(1, 8, 8), LatentDirectionConfig(threshold="otsu"))
    assert rejected.all() and (unc == 1).all()


# ------------------------------------------------------------------ fit + label, save/load
def test_fit_and_label_end_to_end(G, fitted):
    assert fitted.v_light.norm().item() == pytest.approx(1.0, abs=1e-5)
    assert fitted.v_dark.norm().item() == pytest.approx(1.0, abs=1e-5)
    assert fitted.latent_scale.item() > 0
    b = _batch(G, fitted)
    assert b.taps == []  # the labeler needs no feature taps
    out = fitted.label(b)
    assert isinstance(out, LabelBatch)
    n, R = 5, G.resolution
    assert out.label.shape == (n, R, R) and out.label.dtype == torch.uint8
    assert set(out.label.unique().tolist()) <= {0, 1}
    assert out.uncertainty.shape == (n, R, R) and out.uncertainty.dtype == torch.float32
    assert (out.uncertainty >= 0).all() and (out.uncertainty <= 1).all()
    assert out.rejected.shape == (n,) and out.rejected.dtype == torch.bool
    assert out.score.shape == (n,) and out.score_top10.shape == (n,)
    assert fitted.num_outputs == 2 and fitted.resolution == R


def test_rejected_samples_have_full_uncertainty(G, fitted):
    strict = LatentDirectionLabeler(fitted.cfg.model_copy(update={"min_brightness_change": 1e9}), G.w_dim, G.resolution,
                                    fitted.meta)
    strict.load_state_dict(fitted.state_dict())
    out = strict.label(_batch(G, strict))
    assert out.rejected.all()
    assert (out.uncertainty == 1).all()
    assert torch.allclose(out.score, torch.full_like(out.score, G.resolution**2))


def test_save_load_gives_identical_labels(G, fitted, tmp_path):
    path = tmp_path / "ld.safetensors"
    fitted.save(path)
    assert [p.name for p in tmp_path.iterdir()] == ["ld.safetensors"]  # no temp file left behind
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:  # the directions only: G is named by its fingerprint
        assert sorted(f.keys()) == ["latent_scale", "v_dark", "v_light"]
    loaded = LatentDirectionLabeler.load(path)
    assert loaded.cfg == fitted.cfg and loaded.meta == fitted.meta
    b = _batch(G, fitted, seed=7)
    a, c = fitted.label(b), loaded.label(b)
    for f in dataclasses.fields(a):
        assert torch.equal(getattr(a, f.name), getattr(c, f.name)), f.name


def test_load_rejects_other_formats(tmp_path):
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(1)}, str(tmp_path / "x.safetensors"), metadata={"format": "labelfoundry-handsoff"})
    with pytest.raises(ValueError, match="not a labelfoundry-latent_direction file"):
        LatentDirectionLabeler.load(tmp_path / "x.safetensors")


def test_z_space_needs_z_latents(G):
    cfg = LatentDirectionConfig(space="z", directions="light", steps=1, batch_size=2, max_mask_fraction=1.0)
    lab = LatentDirectionLabeler.fit(G, FitData(), cfg)
    assert lab.latent_scale.item() == 1.0 and lab.v_light.numel() == G.z_dim
    b = _batch(G, lab, n=2)
    with pytest.raises(ValueError, match="z space"):
        lab.label(b)
    z = torch.randn(2, G.z_dim)
    out = lab.label_latents(G, z)
    with torch.no_grad():
        ws = G.mapping(z)
        batch = GenBatch(ws, G.synthesis(ws, noise_mode="const"), [], G=G, z=z)
    assert torch.equal(lab.label(batch).label, out.label)  # the batch's z reaches the labeler
    assert out.label.shape == (2, G.resolution, G.resolution)


def test_config_rejects_unknown_fields():
    with pytest.raises(Exception):
        LatentDirectionConfig(lambda_=3)
    assert LatentDirectionConfig().method == "latent_direction"
