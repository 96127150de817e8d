"""Labels4Free labeler (paper 004): alpha network, suppressed background, training, fit + label, save/load."""

import pytest
import torch

from labelfoundry.features import TapSpec, generate_with_taps
from labelfoundry.generators import Discriminator
from labelfoundry.labelers.base import FitData, GenBatch, LabelBatch
from labelfoundry.labelers.labels4free import (
    AlphaNetwork,
    Labels4FreeConfig,
    Labels4FreeLabeler,
    alpha_losses,
    object_contrast,
    suppressed_background,
)

FAST = dict(steps=3, batch_size=4, r1_interval=2, train_discriminator=True, restarts=1)  # the joint-D path; restarts tested apart
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def G(G16):
    return G16


@pytest.fixture(scope="module")
def D(G):
    return Discriminator(resolution=16, channel_base=64, channel_max=16).eval()


@pytest.fixture(scope="module")
def fitted(G, D):
    return Labels4FreeLabeler.fit(G, FitData(discriminator=D), Labels4FreeConfig(**FAST))


def _batch(G, spec, n=5, seed=1):
    torch.manual_seed(seed)
    ws = G.mapping(torch.randn(n, G.z_dim))
    img, taps = generate_with_taps(G, ws, spec)
    return GenBatch(ws, img, taps)


def test_alpha_network_reads_every_tap_resolution(G):
    b = _batch(G, TapSpec())
    assert len({t.shape[-1] for t in b.taps}) == 3  # 4, 8, 16
    net = AlphaNetwork([t.shape[1] for t in b.taps], G.resolution, hidden=8, merge_convs=1)
    a = net(b.taps)
    assert a.shape == (5, 1, 16, 16) and ((a > 0) & (a < 1)).all()
    # every tap influences the mask (multi-layer features, App. A.1)
    a.sum().backward()
    assert all(p.weight.grad.abs().sum() > 0 for p in net.proj)
    with pytest.raises(ValueError, match="tap channels"):
        net(b.taps[:-1])


def test_suppressed_background_drops_coarse_features(G):
    ws = G.mapping(torch.randn(3, G.z_dim))
    # with nothing suppressed the re-implemented loop is exactly the generator's synthesis
    torch.testing.assert_close(suppressed_background(G, ws, cut_resolution=2), G.synthesis(ws), atol=1e-5, rtol=1e-5)
    bg = suppressed_background(G, ws, cut_resolution=4, mode="zero")
    assert bg.shape == (3, 3, 16, 16) and torch.isfinite(bg).all()
    assert not torch.allclose(bg, G.synthesis(ws))
    # the background no longer depends on the 4x4 features (where the object's layout lives)
    from tests.conftest import tiny_G

    G2 = tiny_G(16)
    with torch.no_grad():
        G2.synthesis.b4.const.normal_()
        G2.synthesis.b4.conv1.weight.normal_()
    torch.testing.assert_close(suppressed_background(G2, ws), bg)
    assert not torch.allclose(G2.synthesis(ws), G.synthesis(ws))
    # below the coarsest block nothing is suppressed: the plain synthesis
    torch.testing.assert_close(suppressed_background(G, ws, cut_resolution=2), G.synthesis(ws).detach())
    mean_bg = suppressed_background(G, ws, cut_resolution=8, mode="mean")
    assert torch.isfinite(mean_bg).all()


def test_loss_terms_by_hand():
    cfg = Labels4FreeConfig(area_min=0.25, area_max=0.75)
    logits = torch.zeros(2, 1)
    hard = torch.zeros(2, 1, 4, 4)
    hard[:, :, :2] = 1.0  # binary, 50% coverage
    t = alpha_losses(hard, logits, cfg)
    assert t["bin"].item() == 0.0 and t["area"].item() == 0.0
    assert t["adv"].item() == pytest.approx(torch.nn.functional.softplus(torch.tensor(0.0)).item())
    full = torch.ones(2, 1, 4, 4)  # 100% coverage: 0.25 over the maximum
    assert alpha_losses(full, logits, cfg)["area"].item() == pytest.approx(0.25)
    half = torch.full((2, 1, 4, 4), 0.5)
    assert alpha_losses(half, logits, cfg)["bin"].item() == pytest.approx(0.5)


def test_training_losses_finite_and_regularisers_fall(G, D):
    cfg = Labels4FreeConfig(steps=16, batch_size=4, lr=1e-2, r1_interval=4, seed=3, train_discriminator=True, restarts=1,
                            init_coverage=None)  # the paper's start, α ≈ 0.5: both regularisers have room to fall
    lab = Labels4FreeLabeler.fit(G, FitData(discriminator=D), cfg)
    h = lab.history
    assert len(h) == 16
    for rec in h:
        assert all(torch.isfinite(torch.tensor(v)) for v in rec.values())
    first = sum(r["bin"] + r["area"] for r in h[:4]) / 4
    last = sum(r["bin"] + r["area"] for r in h[-4:]) / 4
    assert last < first - 0.02
    assert sum(r["loss"] for r in h[-4:]) / 4 < sum(r["loss"] for r in h[:4]) / 4 + 0.1


def test_generator_discriminator_is_not_modified(G, D):
    before = {k: v.clone() for k, v in D.state_dict().items()}
    Labels4FreeLabeler.fit(G, FitData(discriminator=D), Labels4FreeConfig(**FAST))
    after = D.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_fit_and_label_end_to_end(G, fitted):
    b = _batch(G, fitted.tap_spec)
    out = fitted.label(b)
    assert isinstance(out, LabelBatch)
    n, R = 5, G.resolution
    assert out.label.shape == (n, R, R) and out.label.dtype == torch.uint8
    assert set(out.label.unique().tolist()) <= {0, 1}
    assert out.uncertainty.shape == (n, R, R) and out.uncertainty.dtype == torch.float32
    assert (out.uncertainty >= 0).all() and (out.uncertainty <= 1).all()
    assert out.score.shape == (n,) and out.score_top10.shape == (n,)
    a = fitted.alpha(b.taps)
    torch.testing.assert_close(out.uncertainty, 1 - (2 * a - 1).abs())
    assert torch.equal(out.label, (a > 0.5).to(torch.uint8))
    assert fitted.num_outputs == 2 and fitted.resolution == R


def test_label_chunks_do_not_change_results(G, fitted):
    b = _batch(G, fitted.tap_spec)
    small = Labels4FreeLabeler(fitted.cfg.model_copy(update={"label_chunk": 2}), fitted.tap_channels, fitted.resolution)
    small.load_state_dict(fitted.state_dict())
    torch.testing.assert_close(small.label(b).uncertainty, fitted.label(b).uncertainty)


def test_alpha_starts_near_init_coverage(G):
    b = _batch(G, TapSpec())
    chans = [t.shape[1] for t in b.taps]
    torch.manual_seed(0)
    small = AlphaNetwork(chans, G.resolution, hidden=8, merge_convs=1, init_coverage=0.1)(b.taps)
    torch.manual_seed(0)
    plain = AlphaNetwork(chans, G.resolution, hidden=8, merge_convs=1)(b.taps)
    assert abs(small.mean().item() - 0.1) < 0.05 and abs(plain.mean().item() - 0.5) < 0.1


def test_object_contrast_is_high_on_the_object_and_low_off_it():
    """The object is where the image differs from its object-free background."""
    bg = torch.zeros(2, 3, 8, 8)
    fg = bg.clone()
    fg[:, :, 2:6, 2:6] = 1.0  # the object: a square; |F - B| = 1 there, 0 elsewhere
    on = torch.zeros(2, 1, 8, 8)
    on[:, :, 2:6, 2:6] = 0.9
    half = torch.zeros(2, 1, 8, 8)
    half[:, :, :, :4] = 0.9  # an image-independent left half: half the object, a quarter of the background
    torch.testing.assert_close(object_contrast(on, fg, bg), torch.ones(2))
    torch.testing.assert_close(object_contrast(half, fg, bg), torch.full((2,), 8 / 32 - 8 / 32))
    assert (object_contrast(torch.zeros(2, 1, 8, 8), fg, bg) < object_contrast(on, fg, bg)).all()  # empty mask: finite
    assert torch.isfinite(object_contrast(torch.ones(2, 1, 8, 8), fg, bg)).all()


def test_restarts_keep_the_highest_contrast_fit_and_each_follows_its_seed(G, D):
    # α ≈ 0.5 at the start (not init_coverage's 0.1), so two steps already give the restarts different masks
    cfg = Labels4FreeConfig(steps=2, batch_size=4, restarts=3, select_samples=8, seed=5, init_coverage=None)
    lab = Labels4FreeLabeler.fit(G, FitData(discriminator=D), cfg)
    contrasts, chosen = lab.meta["object_contrast"], lab.meta["chosen_restart"]
    assert lab.meta["restart_seeds"] == [5, 6, 7] and len(contrasts) == 3
    assert contrasts[chosen] == max(contrasts)
    # the kept network is exactly a single fit with the chosen restart's seed (initialisation included)
    alone = Labels4FreeLabeler.fit(G, FitData(discriminator=D), cfg.model_copy(update={"restarts": 1, "seed": 5 + chosen}))
    assert alone.meta["object_contrast"] == [contrasts[chosen]] and alone.meta["chosen_restart"] == 0
    for (k, a), b in zip(lab.state_dict().items(), alone.state_dict().values()):
        assert torch.equal(a, b), k
    assert len({round(c, 6) for c in contrasts}) > 1  # the restarts differ


def test_missing_discriminator_is_a_clear_error(G):
    with pytest.raises(ValueError, match="discriminator"):
        Labels4FreeLabeler.fit(G, FitData(), Labels4FreeConfig(**FAST))


def test_independent_background_and_frozen_d_variants(G, D):
    cfg = Labels4FreeConfig(steps=2, batch_size=4, bg_latent="independent", bg_mode="mean", train_discriminator=False,
                            tap_layers=(0, 2, 4))
    lab = Labels4FreeLabeler.fit(G, FitData(discriminator=D), cfg)
    out = lab.label(_batch(G, lab.tap_spec, n=2))
    assert out.label.shape == (2, 16, 16)
    assert len(lab.tap_channels) == 3
    # a frozen D has no loss: the history reports none rather than NaN
    assert all("d_loss" not in rec and all(v == v for v in rec.values()) for rec in lab.history)


def test_save_load_gives_identical_labels(G, fitted, tmp_path):
    path = tmp_path / "l4f.safetensors"
    fitted.save(path)
    assert [p.name for p in tmp_path.iterdir()] == ["l4f.safetensors"]  # no temp file left behind
    loaded = Labels4FreeLabeler.load(path)
    assert loaded.cfg == fitted.cfg and loaded.meta == fitted.meta
    b = _batch(G, fitted.tap_spec, seed=9)
    a, c = fitted.label(b), loaded.label(b)
    for k in ("label", "uncertainty", "score", "score_top10"):
        assert torch.equal(getattr(a, k), getattr(c, k)), k
    with pytest.raises(ValueError, match="not a labelfoundry-labels4free file"):
        from labelfoundry.labelers.latent_direction import LatentDirectionConfig, LatentDirectionLabeler

        LatentDirectionLabeler(LatentDirectionConfig(), G.w_dim, G.resolution).save(tmp_path / "ld.safetensors")
        Labels4FreeLabeler.load(tmp_path / "ld.safetensors")
