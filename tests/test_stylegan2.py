"""Our StyleGAN2 generator: shapes, W+ layout, style mixing, taps, truncation, noise, clamping, fp16,
and an independent naive reference implementation of the published (stylegan2-ada-pytorch) forward
pass that our optimised synthesis must match."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from labelfoundry.generators import Generator, StyleGAN2Config
from labelfoundry.generators.ops import modulated_conv2d

SQRT2 = math.sqrt(2.0)


def tiny_generator(resolution: int = 16, seed: int = 0, **kw) -> Generator:
    """Small generator with every parameter randomised (biases/noise strengths are zero at init)."""
    torch.manual_seed(seed)
    cfg = dict(resolution=resolution, z_dim=16, w_dim=16, map_layers=2, channel_base=8 * resolution, channel_max=16)
    cfg.update(kw)
    G = Generator(StyleGAN2Config(**cfg)).eval()
    with torch.no_grad():
        for name, p in G.named_parameters():
            if name.endswith("affine.bias"):
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            elif name.endswith("bias") or name.endswith("noise_strength"):
                p.copy_(0.3 * torch.randn_like(p))
        G.mapping.w_avg.copy_(torch.randn(G.w_dim) * 0.5)
    return G


# ---------------------------------------------------------------------------------------------
# Independent reference: written from the published definitions, deliberately naive.
#  * modulated conv: explicit per-sample weights w'[n,o,i,k] = w[o,i,k] * s[n,i], demodulated by
#    1/sqrt(sum_{i,k} w'^2 + 1e-8), executed as a grouped conv (one group per sample);
#  * 2x upsampling conv: explicit zero insertion, [1,3,3,1] FIR (gain 4) padded by (3, 2), then the
#    3x3 conv. NVIDIA's SynthesisLayer passes flip_weight=False for up=2 layers, i.e. a true
#    convolution (kernel flipped w.r.t. F.conv2d's cross-correlation); same for rosinality;
#  * skip image upsampling: zero insertion, pad (2, 1), FIR with gain 4;
#  * lrelu slope 0.2 times sqrt(2), clamp after the activation gain; equalised-lr gains.


def ref_fir(x: torch.Tensor, gain: float, pad: tuple[int, int]) -> torch.Tensor:
    taps = torch.tensor([1.0, 3.0, 3.0, 1.0])
    f = torch.outer(taps, taps)
    f = f / f.sum() * gain
    x = F.pad(x, [pad[0], pad[1], pad[0], pad[1]])
    c = x.shape[1]
    return F.conv2d(x, f.flip([0, 1])[None, None].repeat(c, 1, 1, 1), groups=c)


def ref_zero_insert(x: torch.Tensor) -> torch.Tensor:
    n, c, h, w = x.shape
    out = torch.zeros(n, c, 2 * h, 2 * w, dtype=x.dtype)
    out[:, :, ::2, ::2] = x
    return out


def ref_modconv(x, weight, styles, demodulate=True, up=False):
    n, i, h, w = x.shape
    o, _, k, _ = weight.shape
    wts = weight[None] * styles[:, None, :, None, None]  # (N, O, I, k, k)
    if demodulate:
        wts = wts / torch.sqrt(wts.square().sum(dim=[2, 3, 4], keepdim=True) + 1e-8)
    if up:
        x = ref_fir(ref_zero_insert(x), gain=4.0, pad=(3, 2))
        wts = wts.flip([3, 4])
        pad = 0
    else:
        pad = k // 2
    out = F.conv2d(x.reshape(1, n * i, *x.shape[2:]), wts.reshape(n * o, i, k, k), padding=pad, groups=n)
    return out.reshape(n, o, *out.shape[2:])


def ref_fc(x, weight, bias, lr_mult=1.0, act=False):
    y = x @ (weight * (lr_mult / math.sqrt(weight.shape[1]))).t() + bias * lr_mult
    return F.leaky_relu(y, 0.2) * SQRT2 if act else y


def ref_mapping(sd, z, num_layers, lr_mult=0.01):
    x = z / torch.sqrt(z.square().mean(dim=1, keepdim=True) + 1e-8)
    for i in range(num_layers):
        x = ref_fc(x, sd[f"mapping.fc{i}.weight"], sd[f"mapping.fc{i}.bias"], lr_mult, act=True)
    return x


def ref_synthesis(sd, ws, resolution, conv_clamp=None, noise=True):
    """stylegan2-ada-pytorch 'skip' synthesis from an NVIDIA-named state dict."""

    def layer(p, x, w, up):
        styles = ref_fc(w, sd[p + "affine.weight"], sd[p + "affine.bias"])
        x = ref_modconv(x, sd[p + "weight"], styles, up=up)
        if noise:
            x = x + sd[p + "noise_const"] * sd[p + "noise_strength"]
        x = F.leaky_relu(x + sd[p + "bias"].reshape(1, -1, 1, 1), 0.2) * SQRT2
        return x.clamp(-conv_clamp, conv_clamp) if conv_clamp is not None else x

    def torgb(p, x, w):
        styles = ref_fc(w, sd[p + "affine.weight"], sd[p + "affine.bias"]) / math.sqrt(x.shape[1])
        y = ref_modconv(x, sd[p + "weight"], styles, demodulate=False) + sd[p + "bias"].reshape(1, -1, 1, 1)
        return y.clamp(-conv_clamp, conv_clamp) if conv_clamp is not None else y

    n = ws.shape[0]
    x = sd["synthesis.b4.const"][None].repeat(n, 1, 1, 1)
    x = layer("synthesis.b4.conv1.", x, ws[:, 0], up=False)
    img = torgb("synthesis.b4.torgb.", x, ws[:, 1])
    for j, r in enumerate(2**i for i in range(3, int(math.log2(resolution)) + 1)):
        row = 1 + 2 * j
        p = f"synthesis.b{r}."
        x = layer(p + "conv0.", x, ws[:, row], up=True)
        x = layer(p + "conv1.", x, ws[:, row + 1], up=False)
        img = ref_fir(ref_zero_insert(img), gain=4.0, pad=(2, 1)) + torgb(p + "torgb.", x, ws[:, row + 2])
    return img


# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("resolution", [16, 32, 64])
def test_shapes_and_num_ws(resolution):
    G = tiny_generator(resolution, channel_max=8, channel_base=4 * resolution)
    assert G.num_ws == 2 * int(math.log2(resolution)) - 2
    z = torch.randn(2, G.z_dim)
    ws = G.mapping(z)
    assert ws.shape == (2, G.num_ws, G.w_dim)
    img = G.synthesis(ws)
    assert img.shape == (2, 3, resolution, resolution) and img.dtype == torch.float32
    assert torch.isfinite(img).all()
    assert G(z).shape == img.shape


@pytest.mark.parametrize("resolution", [16, 32])
def test_synthesis_matches_reference(resolution):
    G = tiny_generator(resolution, seed=resolution)
    sd = {k: v.detach() for k, v in G.state_dict().items()}
    z = torch.randn(3, G.z_dim)
    with torch.no_grad():
        w = G.mapping(z)
        torch.testing.assert_close(w[:, 0], ref_mapping(sd, z, G.cfg.map_layers), atol=1e-5, rtol=1e-5)
        ws = w + 0.5 * torch.randn_like(w)  # distinct rows exercise the W+ layout
        ours = G.synthesis(ws, noise_mode="const")
        ref = ref_synthesis(sd, ws, resolution)
        assert (ours - ref).abs().max().item() < 1e-4
        ours_nn = G.synthesis(ws, noise_mode="none")
        assert (ours_nn - ref_synthesis(sd, ws, resolution, noise=False)).abs().max().item() < 1e-4


def test_upsampling_conv_is_not_the_correlation_variant():
    """Guard the kernel orientation: the reference without the flip must *not* match."""
    G = tiny_generator(16, seed=3)
    sd = {k: v.detach() for k, v in G.state_dict().items()}
    ws = torch.randn(2, G.num_ws, G.w_dim)
    bad = dict(sd)
    for k in list(bad):
        if k.endswith("conv0.weight"):
            bad[k] = bad[k].flip([2, 3])
    with torch.no_grad():
        ours = G.synthesis(ws)
        assert (ours - ref_synthesis(bad, ws, 16)).abs().max().item() > 1e-2


def test_conv_clamp_matches_reference_and_bounds_taps():
    clamp = 0.25
    G = tiny_generator(16, seed=5, conv_clamp=clamp)
    sd = {k: v.detach() for k, v in G.state_dict().items()}
    ws = torch.randn(2, G.num_ws, G.w_dim)
    with torch.no_grad():
        img, taps = G.synthesis(ws, taps=True)
        assert (img - ref_synthesis(sd, ws, 16, conv_clamp=clamp)).abs().max().item() < 1e-4
    # Each SynthesisLayer output is bias -> lrelu * sqrt(2) -> clamp(+-conv_clamp): taps are bounded
    # by conv_clamp exactly, and with this small clamp it is active.
    for t in taps:
        assert t.abs().max().item() <= clamp + 1e-6
    assert any((t.abs() >= clamp - 1e-6).any() for t in taps)


def test_taps_match_declared_channels_and_resolutions():
    G = tiny_generator(32, channel_base=128, channel_max=16)
    img, taps = G.synthesis(torch.randn(2, G.num_ws, G.w_dim), taps=True)
    assert len(taps) == len(G.tap_channels) == len(G.tap_resolutions) == 2 * 4 - 1
    for t, c, r in zip(taps, G.tap_channels, G.tap_resolutions):
        assert t.shape == (2, c, r, r) and t.dtype == torch.float32
    assert G.tap_resolutions == [4, 8, 8, 16, 16, 32, 32]
    assert G.tap_channels == [16, 16, 16, 8, 8, 4, 4]


def test_style_mixing_takes_rows_from_the_right_source():
    G = tiny_generator(16, seed=7)
    ws_a = torch.randn(2, G.num_ws, G.w_dim)
    ws_b = torch.randn(2, G.num_ws, G.w_dim)
    cutoff = 3
    mixed = G.mix(ws_a, ws_b, cutoff)
    assert torch.equal(mixed[:, :cutoff], ws_a[:, :cutoff]) and torch.equal(mixed[:, cutoff:], ws_b[:, cutoff:])
    with torch.no_grad():
        img = G.synthesis(mixed)
        b2 = ws_b.clone()
        b2[:, :cutoff] = torch.randn(2, cutoff, G.w_dim)  # early rows of b are not used
        a2 = ws_a.clone()
        a2[:, cutoff:] = torch.randn(2, G.num_ws - cutoff, G.w_dim)  # late rows of a are not used
        torch.testing.assert_close(G.synthesis(G.mix(a2, b2, cutoff)), img)
        a3 = ws_a.clone()
        a3[:, 0] += 1.0  # an early row of a is used
        assert not torch.allclose(G.synthesis(G.mix(a3, ws_b, cutoff)), img)


def test_truncation_psi_zero_gives_w_avg():
    G = tiny_generator(16)
    z = torch.randn(4, G.z_dim)
    ws = G.mapping(z, psi=0.0)
    torch.testing.assert_close(ws, G.w_avg.expand_as(ws))
    half = G.mapping(z, psi=0.5)
    torch.testing.assert_close(half, G.w_avg.lerp(G.mapping(z), 0.5))


def test_noise_modes():
    G = tiny_generator(16, seed=11)
    ws = torch.randn(2, G.num_ws, G.w_dim)
    with torch.no_grad():
        c1, c2 = G.synthesis(ws, noise_mode="const"), G.synthesis(ws, noise_mode="const")
        r1, r2 = G.synthesis(ws, noise_mode="random"), G.synthesis(ws, noise_mode="random")
        n1, n2 = G.synthesis(ws, noise_mode="none"), G.synthesis(ws, noise_mode="none")
    assert torch.equal(c1, c2) and torch.equal(n1, n2)
    assert not torch.allclose(r1, r2)
    assert not torch.allclose(c1, n1) and not torch.allclose(c1, r1)
    with pytest.raises(ValueError):
        G.synthesis(ws, noise_mode="bogus")


def test_fp16_block_on_cpu_matches_fp32():
    """num_fp16_res>0 only switches to fp16 on CUDA; on CPU we force the fp16 dtype through one block's
    layers (CPU half convs work in this torch) and compare with the fp32 result."""
    G = tiny_generator(16, seed=13, num_fp16_res=2)
    assert G.synthesis.b16.use_fp16 and G.synthesis.b8.use_fp16 and not G.synthesis.b4.use_fp16
    G32 = tiny_generator(16, seed=13)
    ws = torch.randn(2, G.num_ws, G.w_dim)
    with torch.no_grad():
        torch.testing.assert_close(G.synthesis(ws), G32.synthesis(ws))  # CPU path stays fp32
        _, taps = G.synthesis(ws, taps=True)
        block = G.synthesis.b8
        x_in = taps[0]  # output of b4.conv1 (fp32)
        w0, w1, w2 = ws[:, 1], ws[:, 2], ws[:, 3]
        ref = block.conv1(block.conv0(x_in, w0), w1)
        half = block.conv1(block.conv0(x_in.half(), w0), w1)
        assert half.dtype == torch.float16
        scale = ref.abs().max().item()
        assert (half.float() - ref).abs().max().item() < 1e-2 * max(scale, 1.0)
        rgb_half = block.torgb(half, w2).float()
        rgb_ref = block.torgb(ref, w2)
        assert (rgb_half - rgb_ref).abs().max().item() < 2e-2 * max(rgb_ref.abs().max().item(), 1.0)


def test_modulated_conv2d_fp16_prenormalisation_avoids_overflow():
    torch.manual_seed(0)
    x = torch.randn(2, 8, 8, 8)
    weight = torch.randn(6, 8, 3, 3) * 300.0
    styles = torch.randn(2, 8) * 300.0  # un-normalised this would exceed fp16 range (65504)
    ref = modulated_conv2d(x, weight, styles)
    out = modulated_conv2d(x.half(), weight, styles)
    assert out.dtype == torch.float16 and torch.isfinite(out).all()
    assert (out.float() - ref).abs().max().item() < 1e-2 * ref.abs().max().item()
