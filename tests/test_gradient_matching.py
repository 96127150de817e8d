"""Gradient-matching labeler (paper 001): Eq. 12 loss by hand, one annotator step, fit/label/save."""

import numpy as np
import pytest
import torch
from torch import nn

from labelfoundry.domains import toyfaces
from labelfoundry.domains.base import LabeledSample
from labelfoundry.features import TapSpec, generate_with_taps
from labelfoundry.labelers.base import FitData, GenBatch
from tests.conftest import schema_of
from labelfoundry.labelers.gradient_matching import (
    FPNAnnotator,
    GradientMatchingConfig,
    GradientMatchingLabeler,
    annotator_step,
    block_output_layers,
    gradient_matching_loss,
    layerwise_gradient_distance,
    matched_parameters,
    prepare_labeled,
)
from labelfoundry.segmenters import SegmenterConfig, build_segmenter

TINY = dict(segmenter_width=8, annotator_width=16, annotator_convs=1, batch_size=2)


@pytest.fixture(scope="module")
def G(G32):
    return G32


def _samples(seeds, res):
    r = toyfaces.render(seeds, res)
    return [LabeledSample(str(s), r["image"][i], r["mask"][i]) for i, s in enumerate(seeds)]


def test_layerwise_distance_matches_hand_computation_two_linear_layers():
    # y = W2 (W1 x), loss 0.5 ||y - t||²: dW2 = r h^T, dW1 = W2^T r x^T with h = W1 x, r = W2 h - t.
    W1 = np.array([[1.0, -2.0, 0.5], [0.0, 1.0, 3.0]])
    W2 = np.array([[2.0, 1.0], [-1.0, 0.5]])
    data = {"a": (np.array([1.0, 2.0, -1.0]), np.array([0.5, -1.0])), "b": (np.array([-2.0, 0.0, 1.0]), np.array([3.0, 1.0]))}

    def hand(x, t):
        h = W1 @ x
        r = W2 @ h - t
        return [np.outer(W2.T @ r, x), np.outer(r, h)]

    def cos_dist(A, B):  # Eq. 12: sum over output nodes (rows) of 1 - cos
        return sum(1 - a @ b / (np.linalg.norm(a) * np.linalg.norm(b)) for a, b in zip(A, B))

    ga, gb = hand(*data["a"]), hand(*data["b"])
    expected = (cos_dist(ga[0], gb[0]) + cos_dist(ga[1], gb[1])) / 2  # mean over the two layers

    net = nn.Sequential(nn.Linear(3, 2, bias=False), nn.Linear(2, 2, bias=False)).double()
    with torch.no_grad():
        net[0].weight.copy_(torch.from_numpy(W1))
        net[1].weight.copy_(torch.from_numpy(W2))
    grads = {}
    for k, (x, t) in data.items():
        loss = 0.5 * (net(torch.from_numpy(x)) - torch.from_numpy(t)).square().sum()
        grads[k] = torch.autograd.grad(loss, list(net.parameters()))
    for g, h in zip(grads["a"], ga):
        np.testing.assert_allclose(g.numpy(), h, rtol=1e-12)
    ours = layerwise_gradient_distance(list(grads["a"]), list(grads["b"]))
    assert ours.item() == pytest.approx(expected, rel=1e-10)
    # identical gradients: 0; opposite: 2 per row (4 rows over 2 layers -> mean 4)
    assert layerwise_gradient_distance(list(grads["a"]), list(grads["a"])).item() == pytest.approx(0.0, abs=1e-12)
    assert layerwise_gradient_distance(list(grads["a"]), [-g for g in grads["a"]]).item() == pytest.approx(4.0)


def test_matched_parameters_head_of_tiny_unet():
    seg = build_segmenter(SegmenterConfig(arch="tiny_unet", num_classes=3, tiny_width=4))
    names = [n for n, _ in matched_parameters(seg, "tiny_unet", "head")]
    assert names and all(n.startswith(("net.dec2.", "net.dec1.", "net.head.")) for n in names)
    assert "net.head.weight" in names and not any(n.endswith("bias") for n in names)
    assert [n for n, _ in matched_parameters(seg, "tiny_unet", "output")] == ["net.head.weight"]
    assert len(matched_parameters(seg, "tiny_unet", "all")) > len(names)


def test_one_annotator_step_lowers_the_matching_loss(G):
    torch.manual_seed(0)
    r = toyfaces.render([1, 2], 32)
    real_x = torch.as_tensor(r["image"]).permute(0, 3, 1, 2).float() / 127.5 - 1
    real_y = torch.as_tensor(r["mask"])
    spec = TapSpec(block_output_layers(len(G.tap_channels)))
    img, taps = generate_with_taps(G, G.mapping(torch.randn(2, G.z_dim)), spec)
    seg = build_segmenter(SegmenterConfig(arch="tiny_unet", num_classes=10, tiny_width=8))
    params = [p for _, p in matched_parameters(seg, "tiny_unet", "head")]
    ann = FPNAnnotator(spec.channels(G.tap_channels), 10, 32, width=16, convs=1, fuse_res=128)
    opt = torch.optim.SGD(ann.parameters(), lr=1e-3, momentum=0.9)  # App. B
    before = annotator_step(ann, opt, seg, params, real_x, real_y, img, taps)
    after = gradient_matching_loss(seg, params, real_x, real_y, img, ann(taps).softmax(1))
    assert torch.isfinite(before) and after.item() < before.item() - 1e-3
    assert all(p.grad is None for p in seg.parameters())  # only ω is updated by the matching step


def test_fit_label_save_load_with_labels_of_another_resolution(G, tmp_path):
    labeled = _samples([1, 2, 3], 64)  # generator makes 32x32
    cfg = GradientMatchingConfig(steps=3, seg_interval=1, **TINY)
    seen = []
    lab = GradientMatchingLabeler.fit(G, FitData.from_samples(labeled, schema_of(10)), cfg, progress=seen.append)
    assert seen and seen[-1]["step"] == 3 and np.isfinite(seen[-1]["loss"])
    assert lab.name == "gradient_matching" and lab.num_outputs == 10 and lab.resolution == 32
    assert lab.tap_spec.layers == block_output_layers(len(G.tap_channels))
    ws = G.mapping(torch.randn(3, G.z_dim, generator=torch.Generator().manual_seed(5)))
    img, taps = generate_with_taps(G, ws, lab.tap_spec)
    out = lab.label(GenBatch(ws, img, taps))
    assert out.label.shape == (3, 32, 32) and out.label.dtype == torch.uint8 and int(out.label.max()) < 10
    assert out.uncertainty.shape == (3, 32, 32) and out.uncertainty.dtype == torch.float32
    assert (out.uncertainty >= 0).all() and (out.uncertainty <= np.log(10) + 1e-4).all()
    assert out.score.shape == (3,) and out.score_top10.shape == (3,)

    path = tmp_path / "gm.safetensors"
    lab.save(path)
    back = GradientMatchingLabeler.load(path)
    again = back.label(GenBatch(ws, img, taps))
    assert torch.equal(again.label, out.label) and torch.equal(again.uncertainty, out.uncertainty)
    assert back.tap_spec == lab.tap_spec and back.cfg == lab.cfg
    # same seed -> same annotator
    lab2 = GradientMatchingLabeler.fit(G, FitData.from_samples(labeled, schema_of(10)), cfg)
    assert torch.equal(lab2.label(GenBatch(ws, img, taps)).label, out.label)


def test_labeled_images_of_any_resolution_are_resized():
    mixed = _samples([1], 64) + _samples([2], 16) + _samples([3], 32)
    x, y, k = prepare_labeled(mixed, 32, None)
    assert x.shape == (3, 3, 32, 32) and y.shape == (3, 32, 32) and y.dtype == torch.int64
    assert x.min() >= -1 and x.max() <= 1 and k == int(y.max()) + 1
    assert set(y[0].unique().tolist()) <= set(np.unique(mixed[0].mask).tolist())  # nearest: no new ids
    with pytest.raises(ValueError, match="outside"):
        prepare_labeled(mixed, 32, 2)
    with pytest.raises(ValueError, match="no mask"):
        prepare_labeled([LabeledSample("x", mixed[0].image)], 32, 10)
