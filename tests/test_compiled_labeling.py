"""The torch.compile'd labeling pass (labelers/handsoff_compiled.py) against the eager tiled one."""

import pytest
import torch

from labelfoundry.config import COMPILE_FROM_SAMPLES, GenerateSection
from labelfoundry.features import TapSpec, generate_with_taps
from labelfoundry.labelers import FitData, GenBatch
from labelfoundry.labelers import handsoff as handsoff_mod
from labelfoundry.labelers.handsoff import HandsOffConfig, HandsOffLabeler
from labelfoundry.labelers.handsoff_compiled import CompiledLabeling
from tests.conftest import fit_data


@pytest.fixture(scope="module")
def batch(G32):
    torch.manual_seed(3)
    ws = G32.mapping(torch.randn(3, G32.z_dim))
    img, taps = generate_with_taps(G32, ws, TapSpec())
    return GenBatch(ws, img, taps)


def _masks(img):  # three classes from the image's own colours: learnable from the taps
    g = img.mean(1)
    return (g > -0.2).long() + (g > 0.3).long()


def test_compiled_labels_match_the_tiled_path(G32, batch):
    """Segmentation and depth: the same classes and JS / mean and variance as the eager tiled pass
    (float rounding only); under bf16 autocast within the bf16 bar (>= 99% of pixels the same class,
    JS within 0.02 nats). Skipped where this machine cannot compile."""
    seg = HandsOffLabeler.fit(G32, fit_data(_masks(batch.image), 3, latents=batch.ws),
                              HandsOffConfig(members=3, hidden=(16, 8), min_steps=60, pixels_per_image=256, tile_pixels=200))
    depth = HandsOffLabeler.fit(G32, FitData(depth=batch.image[:, 0].detach() + 5.0, latents=batch.ws),
                                HandsOffConfig(task="depth", members=2, hidden=(8, 4), min_steps=30, pixels_per_image=128))
    for lab in (seg, depth):
        eager = lab.label(batch)
        compiled = lab.label(batch, compiled=True)
        if handsoff_mod.COMPILED.failed is not None:
            pytest.skip(f"torch.compile unavailable here: {handsoff_mod.COMPILED.failed}")
        if lab is seg:
            assert (compiled.label == eager.label).float().mean() >= 0.999
            assert eager.uncertainty.max() > 0.01  # the members disagree somewhere: the JS check is not vacuous
        else:
            torch.testing.assert_close(compiled.label, eager.label, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(compiled.uncertainty, eager.uncertainty, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(compiled.score, eager.score, atol=1e-3, rtol=1e-4)
    # under bf16 autocast (generation's precision where bf16 is native): the bf16 bar of the eager path
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bf16 = seg.label(batch, compiled=True)
    fp32 = seg.label(batch)
    assert (bf16.label == fp32.label).float().mean() >= 0.99
    assert (bf16.uncertainty - fp32.uncertainty).abs().max() <= 0.02
    assert len(handsoff_mod.COMPILED._warm) >= 3  # all three graphs ran compiled, not the eager fallback


def test_a_failed_compilation_warns_once_and_labels_eagerly(G32, batch, monkeypatch):
    lab = HandsOffLabeler.fit(G32, fit_data(_masks(batch.image), 3, latents=batch.ws),
                              HandsOffConfig(members=2, hidden=(8, 4), min_steps=5, pixels_per_image=64))
    fresh = CompiledLabeling()
    monkeypatch.setattr(handsoff_mod, "COMPILED", fresh)

    def no_compiler(*a, **k):
        raise RuntimeError("no C++ compiler found")

    monkeypatch.setattr(torch, "compile", no_compiler)
    eager = lab.label(batch)
    with pytest.warns(RuntimeWarning, match="no C\\+\\+ compiler"):
        out = lab.label(batch, compiled=True)
    assert fresh.failed is not None and "no C++ compiler" in fresh.failed
    assert torch.equal(out.label, eager.label) and torch.equal(out.uncertainty, eager.uncertainty)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no second warning, no second attempt
        assert torch.equal(lab.label(batch, compiled=True).label, eager.label)


def test_compile_auto_turns_on_for_long_runs_only():
    assert not GenerateSection(num_samples=2000).compile_labels
    assert GenerateSection(num_samples=COMPILE_FROM_SAMPLES).compile_labels
    assert GenerateSection(num_samples=10, compile="on").compile_labels
    assert not GenerateSection(num_samples=1_000_000, compile="off").compile_labels
    assert GenerateSection(compile=True).compile == "on" and GenerateSection(compile=False).compile == "off"  # YAML's on/off
    with pytest.raises(ValueError, match="compile"):
        GenerateSection(compile="sometimes")


def test_labelers_wider_than_max_width_stay_on_the_tiled_path(G32, batch, monkeypatch):
    """The compiled pass is only used where it was measured faster (M*H1 <= max_width)."""
    lab = HandsOffLabeler.fit(G32, fit_data(_masks(batch.image), 3, latents=batch.ws),
                              HandsOffConfig(members=2, hidden=(8, 4), min_steps=5, pixels_per_image=64))
    fresh = CompiledLabeling()
    fresh.max_width = 15  # this labeler's first layer is 2 x 8 = 16 wide
    monkeypatch.setattr(handsoff_mod, "COMPILED", fresh)
    assert not fresh.applies(32 * 32, 16) and fresh.applies(32 * 32, 15)
    out = lab.label(batch, compiled=True)
    assert torch.equal(out.uncertainty, lab.label(batch).uncertainty)
    assert fresh._fns == {} and fresh._warm == set()  # nothing compiled, nothing called


def test_bf16_pass_mixing_both_upsampling_forms_keeps_the_labels(G32, batch, monkeypatch):
    """Under bf16 the compiled pass gathers the groups whose vertical pass is small and interpolates
    the rest (at 256², both in one image): with the limit between this generator's group sizes, the
    labels stay within the bf16 bar of the fp32 tiled pass."""
    from labelfoundry.labelers import handsoff_compiled

    lab = HandsOffLabeler.fit(G32, fit_data(_masks(batch.image), 3, latents=batch.ws),
                              HandsOffConfig(members=3, hidden=(16, 8), min_steps=60, pixels_per_image=256))
    mh, R = 3 * 16, 32
    low = sorted({t.shape[-1] for t in lab.tap_spec.select(batch.taps, batch.image)} - {R})
    assert len(low) >= 2
    limit = R * low[0] * mh  # the smallest group gathered, every larger one interpolated
    monkeypatch.setattr(handsoff_compiled, "GATHER_MAX_VALUES", limit)
    fresh = CompiledLabeling()
    monkeypatch.setattr(handsoff_mod, "COMPILED", fresh)
    fp32 = lab.label(batch)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = lab.label(batch, compiled=True)
    if fresh.failed is not None:
        pytest.skip(f"torch.compile unavailable here: {fresh.failed}")
    assert fresh._warm  # labelled by the compiled pass
    assert (mixed.label == fp32.label).float().mean() >= 0.99
    assert (mixed.uncertainty - fp32.uncertainty).abs().max() <= 0.02
