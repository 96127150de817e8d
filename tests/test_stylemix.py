"""Style-mix clustering labeler (paper 003): clustering on a hand-made summary, label end to end."""

import pytest
import torch

from labelfoundry.labelers import FitData
from labelfoundry.labelers.base import GenBatch
from labelfoundry.labelers.stylemix import (
    StyleMixConfig,
    StyleMixLabeler,
    cluster_summary,
    corner_background,
    default_cutoff,
    margin_uncertainty,
    saliency_foreground,
)

TINY = dict(n_styles=4, k=3, niter=10, render_batch=8)


@pytest.fixture(scope="module")
def G(G16):
    return G16


def _two_regions(R=16, n=6, seed=0):
    """A summary (R,R,3n) where a centre square and the rest vary differently across n variants."""
    g = torch.Generator().manual_seed(seed)
    centre = torch.zeros(R, R, dtype=torch.bool)
    centre[R // 4 : 3 * R // 4, R // 4 : 3 * R // 4] = True
    a, b = torch.rand(3 * n, generator=g) * 100, torch.rand(3 * n, generator=g) * 100
    s = torch.where(centre[..., None], a, b) + torch.randn(R, R, 3 * n, generator=g)
    return s, centre


def test_clustering_separates_two_regions_and_corner_minority_picks_the_centre():
    s, centre = _two_regions()
    clusters, dist = cluster_summary(s, k=2, niter=10, seed=0)
    assert clusters.shape == centre.shape and dist.shape == (*centre.shape, 2)
    c_in, c_out = clusters[centre].unique(), clusters[~centre].unique()
    assert len(c_in) == 1 and len(c_out) == 1 and c_in.item() != c_out.item()
    fg = corner_background(clusters, 2, size=0.125, threshold=0.5)
    assert fg.tolist() == [i == c_in.item() for i in range(2)]
    assert saliency_foreground(clusters, 2, sigma=0.25, threshold=0.5).tolist() == fg.tolist()
    unc = margin_uncertainty(dist, fg)
    assert (unc >= 0).all() and (unc <= 1).all() and unc.max() < 0.2  # every pixel sits near its centroid
    # z-scored summaries give the same partition
    clusters_z, _ = cluster_summary(s, k=2, niter=10, seed=0, normalize="zscore")
    assert len(clusters_z[centre].unique()) == 1 and len(clusters_z[~centre].unique()) == 1


def test_margin_uncertainty_bounds():
    d = torch.tensor([[[1.0, 3.0, 1.0]]])  # nearest 1, next 1 (same label), other label 3
    fg = torch.tensor([True, False, True])
    assert margin_uncertainty(d, fg, "cluster").item() == pytest.approx(1.0)
    assert margin_uncertainty(d, fg, "label").item() == pytest.approx(0.5)  # 2*1/(1+3)
    assert margin_uncertainty(torch.zeros(1, 1, 3), fg).item() == 1.0


def test_default_cutoff_maps_the_paper_cutoff_proportionally():
    assert [default_cutoff(n) for n in (6, 8, 10, 12, 14, 16, 18)] == [3, 4, 4, 5, 6, 7, 8]


def test_label_end_to_end_deterministic_and_save_load(G, tmp_path):
    cfg = StyleMixConfig(**TINY)
    lab = StyleMixLabeler.fit(G, FitData(), cfg)
    assert lab.name == "stylemix" and lab.num_outputs == 2 and lab.resolution == 16
    assert lab.cutoff == default_cutoff(G.num_ws) and lab.tap_spec.layers == ()
    ws = G.mapping(torch.randn(3, G.z_dim, generator=torch.Generator().manual_seed(1)))
    img = G.synthesis(ws).detach()
    out = lab.label(GenBatch(ws, img, [], G=G))
    assert out.label.shape == (3, 16, 16) and out.label.dtype == torch.uint8
    assert set(out.label.unique().tolist()) <= {0, 1}
    assert out.uncertainty.shape == (3, 16, 16) and out.uncertainty.dtype == torch.float32
    assert (out.uncertainty >= 0).all() and (out.uncertainty <= 1).all()
    assert out.score.shape == (3,) and out.score_top10.shape == (3,)
    raw = lab.cluster(G, ws)
    assert raw.clusters.shape == (3, 16, 16) and raw.foreground.shape == (3, 3) and int(raw.clusters.max()) < 3

    # labels come from batch.ws only (inverted real photos pass their ws): image/taps are ignored
    assert torch.equal(lab.label(GenBatch(ws, torch.zeros_like(img), [], G=G)).label, out.label)
    # deterministic: a second fit with the same seed, and independent of batch composition (to float
    # rounding: a CPU's kernels may split a batch of one differently from a batch of three; an
    # Intel Xeon with AMX gave uncertainties 1.6e-6 apart)
    again = StyleMixLabeler.fit(G, FitData(), cfg).label(GenBatch(ws[1:2], img[1:2], [], G=G))
    assert torch.equal(again.label[0], out.label[1])
    torch.testing.assert_close(again.uncertainty[0], out.uncertainty[1], rtol=0, atol=1e-5)

    path = tmp_path / "sm.safetensors"
    lab.save(path)
    back = StyleMixLabeler.load(path)
    res = back.label(GenBatch(ws, img, [], G=G))
    assert torch.equal(res.label, out.label) and torch.equal(res.uncertainty, out.uncertainty)
    assert back.cfg == cfg and back.cutoff == lab.cutoff


def test_labeler_file_holds_no_generator_and_refuses_another_one(G, tmp_path):
    from safetensors import safe_open

    from tests.conftest import tiny_G

    lab = StyleMixLabeler.fit(G, FitData(), StyleMixConfig(**TINY))
    lab.save(tmp_path / "sm.safetensors")
    with safe_open(str(tmp_path / "sm.safetensors"), framework="pt") as f:
        assert list(f.keys()) == ["style_ws"]  # no generator tensors: G is named by its fingerprint
    back = StyleMixLabeler.load(tmp_path / "sm.safetensors")
    ws = G.mapping(torch.randn(1, G.z_dim))
    img = G.synthesis(ws)
    with pytest.raises(ValueError, match="build the GenBatch with G="):
        back.label(GenBatch(ws, img, []))
    with pytest.raises(ValueError, match="refit the labeler on this generator"):
        back.label(GenBatch(ws, img, [], G=tiny_G(16, seed=1)))
