"""Checkpoint loaders: our safetensors format, NVIDIA network pickles (restricted unpickling), rosinality .pt.

The fixtures are built here from our own random networks, mimicking each public format's structure:
NVIDIA pickles are written with plain `pickle` through objects whose `__reduce__` emits
`torch_utils.persistence._reconstruct_persistent_obj(meta)` exactly like NVIDIA's persistence module
(meta = {type, version, module_src, class_name, state}); the embedded `module_src` would write a marker
file if it were ever executed.
"""

from __future__ import annotations

import argparse
import collections
import io
import math
import os
import pickle
import subprocess
import sys
import types

import numpy as np
import pytest
import torch

from labelfoundry.generators import (
    Discriminator,
    Generator,
    StyleGAN2Config,
    UnsafeCheckpointError,
    convert_checkpoint,
    load_generator,
    load_networks,
    save_generator,
)
from labelfoundry.generators import loaders
from labelfoundry.generators.discriminator import DiscriminatorConfig
from labelfoundry.generators.loaders import UnsupportedNetworkError

RES = 16


def _randomise(G: Generator, seed: int) -> Generator:
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in G.named_parameters():
            if name.endswith("affine.bias"):
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            elif name.endswith("bias") or name.endswith("noise_strength"):
                p.copy_(0.3 * torch.randn_like(p))
        G.mapping.w_avg.copy_(0.5 * torch.randn(G.w_dim))
    return G.eval()


def make_pair(seed: int = 0, **kw) -> tuple[Generator, Discriminator]:
    torch.manual_seed(seed)
    cfg = dict(resolution=RES, z_dim=16, w_dim=16, map_layers=2, channel_base=128, channel_max=16)
    cfg.update(kw)
    G = _randomise(Generator(StyleGAN2Config(**cfg)), seed)
    D = Discriminator(DiscriminatorConfig(resolution=RES, channel_base=128, channel_max=16, conv_clamp=kw.get("conv_clamp")))
    with torch.no_grad():
        for name, p in D.named_parameters():
            if name.endswith("bias"):
                p.copy_(0.1 * torch.randn_like(p))
    return G, D.eval()


def assert_same_generator(G_src: Generator, G_dst: Generator, atol: float = 1e-5) -> None:
    z = torch.randn(3, G_src.z_dim, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ws = G_src.mapping(z)
        torch.testing.assert_close(G_dst.mapping(z), ws, atol=atol, rtol=0)
        torch.testing.assert_close(G_dst.w_avg, G_src.w_avg, atol=atol, rtol=0)
        for mode in ("const", "none"):
            a, b = G_src.synthesis(ws, noise_mode=mode), G_dst.synthesis(ws, noise_mode=mode)
            assert (a - b).abs().max().item() <= atol
        torch.testing.assert_close(G_dst.mapping(z, psi=0.7), G_src.mapping(z, psi=0.7), atol=atol, rtol=0)


def assert_same_discriminator(D_src: Discriminator, D_dst: Discriminator, atol: float = 1e-5) -> None:
    img = torch.randn(4, 3, RES, RES, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert (D_src(img) - D_dst(img)).abs().max().item() <= atol


# ---------------------------------------------------------------------------------------------
# NVIDIA network pickle fixture

IMPORTED = "_imported_module_0123456789abcdef0123456789abcdef"


@pytest.fixture
def nvidia_env(monkeypatch):
    """Fake `torch_utils.persistence`, `dnnlib.util` and a persistence-generated module, present only
    while the fixture pickles are *written* (pickle resolves globals by import)."""

    def _reconstruct_persistent_obj(meta):  # NVIDIA's version would exec meta["module_src"]
        raise AssertionError("the writer-side stand-in is never called")

    _reconstruct_persistent_obj.__module__ = "torch_utils.persistence"
    _reconstruct_persistent_obj.__qualname__ = "_reconstruct_persistent_obj"

    class EasyDict(dict):
        pass

    EasyDict.__module__, EasyDict.__qualname__ = "dnnlib.util", "EasyDict"
    mods = {
        "torch_utils": types.ModuleType("torch_utils"),
        "torch_utils.persistence": types.ModuleType("torch_utils.persistence"),
        "dnnlib": types.ModuleType("dnnlib"),
        "dnnlib.util": types.ModuleType("dnnlib.util"),
        IMPORTED: types.ModuleType(IMPORTED),
    }
    mods["torch_utils.persistence"]._reconstruct_persistent_obj = _reconstruct_persistent_obj
    mods["dnnlib.util"].EasyDict = EasyDict
    for name in ("FullyConnectedLayer", "MinibatchStdLayer"):  # plain (non-persistent) module classes
        cls = type(name, (), {"__module__": IMPORTED, "__qualname__": name})
        setattr(mods[IMPORTED], name, cls)
    for k, v in mods.items():
        monkeypatch.setitem(sys.modules, k, v)
    return types.SimpleNamespace(reconstruct=_reconstruct_persistent_obj, EasyDict=EasyDict, mods=mods)


class Persistent:
    """Pickles exactly like an object of a `@persistence.persistent_class`."""

    def __init__(self, env, class_name: str, state: dict, module_src: str):
        self.env, self.class_name, self.state, self.module_src = env, class_name, state, module_src

    def __reduce__(self):
        meta = dict(type="class", version=6, module_src=self.module_src, class_name=self.class_name, state=self.state)
        return (self.env.reconstruct, (meta,))


_NV_NAMES = {
    "Generator": "Generator", "MappingNetwork": "MappingNetwork", "SynthesisNetwork": "SynthesisNetwork",
    "SynthesisBlock": "SynthesisBlock", "SynthesisLayer": "SynthesisLayer", "ToRGB": "ToRGBLayer",
    "FullyConnected": "FullyConnectedLayer", "Discriminator": "Discriminator",
    "DiscriminatorBlock": "DiscriminatorBlock", "Conv2dLayer": "Conv2dLayer",
    "Epilogue": "DiscriminatorEpilogue", "MinibatchStd": "MinibatchStdLayer",
}


def _nv_attrs(m: torch.nn.Module, name: str) -> dict:
    """Attributes NVIDIA's modules carry besides their tensors (some as numpy scalars, as in the originals)."""
    if name == "FullyConnectedLayer":
        return {"activation": m.act, "weight_gain": np.float64(m.weight_gain), "bias_gain": m.bias_gain}
    if name == "SynthesisLayer":
        return {"resolution": m.resolution, "up": 2 if m.up else 1, "use_noise": True, "activation": "lrelu",
                "conv_clamp": m.conv_clamp, "padding": 1, "act_gain": np.float64(math.sqrt(2))}
    if name == "SynthesisBlock":
        return {"in_channels": m.in_ch, "resolution": m.resolution, "architecture": "skip", "use_fp16": m.use_fp16,
                "channels_last": False, "num_conv": m.num_conv, "num_torgb": 1}
    if name == "DiscriminatorBlock":
        return {"in_channels": m.in_ch, "architecture": "resnet", "use_fp16": False, "num_layers": 3}
    if name == "MinibatchStdLayer":
        return {"group_size": m.group_size, "num_channels": m.num_channels}
    if name == "MappingNetwork":
        return {"z_dim": m.z_dim, "c_dim": 0, "w_dim": m.w_dim, "num_ws": m.num_ws, "num_layers": m.num_layers,
                "w_avg_beta": m.w_avg_beta}
    return {}


def nv_tree(env, m: torch.nn.Module, module_src: str, init_kwargs: dict | None = None, extra: dict | None = None):
    """Our module -> an object that pickles like the corresponding NVIDIA network."""
    name = _NV_NAMES[type(m).__name__]
    buffers = collections.OrderedDict((k, v.detach().clone()) for k, v in m._buffers.items())
    if name == "DiscriminatorBlock":  # NVIDIA's block keeps its own filter buffer
        buffers["resample_filter"] = m.conv1.resample_filter.detach().clone()
    state = {
        "training": False,
        "_parameters": collections.OrderedDict(
            (k, torch.nn.Parameter(v.detach().clone(), requires_grad=False)) for k, v in m._parameters.items()
        ),
        "_buffers": buffers,
        "_non_persistent_buffers_set": set(),
        "_backward_pre_hooks": collections.OrderedDict(),
        "_backward_hooks": collections.OrderedDict(),
        "_is_full_backward_hook": None,
        "_forward_hooks": collections.OrderedDict(),
        "_forward_pre_hooks": collections.OrderedDict(),
        "_state_dict_hooks": collections.OrderedDict(),
        "_load_state_dict_pre_hooks": collections.OrderedDict(),
        "_modules": collections.OrderedDict(
            (k, nv_tree(env, c, module_src)) for k, c in m._modules.items() if c is not None
        ),
        "_init_args": (),
        "_init_kwargs": init_kwargs or {},
        **_nv_attrs(m, name),
        **(extra or {}),
    }
    if name in ("FullyConnectedLayer", "MinibatchStdLayer"):  # plain classes of the generated module
        cls = getattr(env.mods[IMPORTED], name)
        obj = cls.__new__(cls)
        obj.__dict__.update(state)
        return obj
    return Persistent(env, name, state, module_src)


def evil_src(marker) -> str:
    return f"import pathlib\npathlib.Path({str(marker)!r}).write_text('module_src was executed')\n"


def g_kwargs(env, G: Generator, layout: str) -> dict:
    c = G.cfg
    syn = dict(channel_base=c.channel_base, channel_max=c.channel_max, num_fp16_res=c.num_fp16_res, conv_clamp=c.conv_clamp)
    common = dict(c_dim=0, img_resolution=c.resolution, img_channels=c.img_channels)
    if layout == "ada":  # stylegan2-ada-pytorch: synthesis_kwargs nested
        return dict(z_dim=c.z_dim, w_dim=c.w_dim, mapping_kwargs=env.EasyDict(num_layers=c.map_layers),
                    synthesis_kwargs=env.EasyDict(syn), **common)
    # stylegan3 repo, training.networks_stylegan2: synthesis kwargs passed flat
    return dict(z_dim=c.z_dim, w_dim=c.w_dim, mapping_kwargs=env.EasyDict(num_layers=c.map_layers),
                fused_modconv_default="inference_only", **syn, **common)


def d_kwargs(env, D: Discriminator) -> dict:
    c = D.cfg
    return dict(c_dim=0, img_resolution=c.resolution, img_channels=c.img_channels, architecture="resnet",
                channel_base=c.channel_base, channel_max=c.channel_max, num_fp16_res=0, conv_clamp=c.conv_clamp,
                block_kwargs=env.EasyDict(), mapping_kwargs=env.EasyDict(),
                epilogue_kwargs=env.EasyDict(mbstd_group_size=c.mbstd_group_size))


def g_attrs(G: Generator) -> dict:
    return dict(z_dim=G.z_dim, c_dim=0, w_dim=G.w_dim, img_resolution=G.resolution, img_channels=3, num_ws=G.num_ws)


def write_nvidia_pickle(env, path, marker, G_ema, D=None, G_train=None, layout="ada", g_kwargs_override=None, protocol=4):
    src = evil_src(marker)
    kw = g_kwargs_override if g_kwargs_override is not None else g_kwargs(env, G_ema, layout)
    data = {"G": nv_tree(env, G_train or G_ema, src, kw, g_attrs(G_ema))}
    if D is not None:
        data["D"] = nv_tree(env, D, src, d_kwargs(env, D), dict(c_dim=0, img_resolution=RES, img_channels=3))
    data["G_ema"] = nv_tree(env, G_ema, src, kw, g_attrs(G_ema))
    data["augment_pipe"] = Persistent(env, "AugmentPipe", {
        "_parameters": collections.OrderedDict(), "_modules": collections.OrderedDict(),
        "_buffers": collections.OrderedDict(p=torch.zeros([]), Hz_geom=torch.randn(12)),
        "_init_kwargs": {"xflip": 1, "rotate90": 1}, "sym6": np.array([0.1, 0.2, 0.3]),
    }, src)
    data["training_set_kwargs"] = dict(class_name="training.dataset.ImageFolderDataset", path="faces.zip",
                                       resolution=RES, use_labels=False, max_size=100, xflip=False)
    with open(path, "wb") as f:
        pickle.dump(data, f, protocol=protocol)
    return path


@pytest.mark.parametrize("layout,protocol", [("ada", 4), ("ada", 2), ("sg3repo", 5)])
def test_nvidia_pickle_loads_exactly_without_running_embedded_code(tmp_path, nvidia_env, layout, protocol):
    marker = tmp_path / "marker"
    G_ema, D = make_pair(0, conv_clamp=256.0, num_fp16_res=2)
    G_train, _ = make_pair(1, conv_clamp=256.0, num_fp16_res=2)
    pkl = tmp_path / "network-snapshot-000100.pkl"
    write_nvidia_pickle(nvidia_env, pkl, marker, G_ema, D, G_train, layout, protocol=protocol)
    for k in list(nvidia_env.mods):  # the reader must not rely on any of these
        sys.modules.pop(k)
    G, D_G, extra_G = load_networks(pkl)
    assert not marker.exists()
    assert isinstance(G, Generator) and not G.training
    assert G.cfg.channels == G_ema.cfg.channels and G.cfg.map_layers == 2
    assert G.cfg.conv_clamp == 256.0 and G.cfg.num_fp16_res == 2
    assert_same_generator(G_ema, G)  # G_ema, not G, is loaded
    assert isinstance(D_G, Discriminator) and not D_G.training
    assert_same_discriminator(D, D_G)
    assert extra_G["source_format"] == "nvidia-pkl" and extra_G["network"] == "G_ema"
    assert not marker.exists()


def test_nvidia_fixture_would_run_its_source_with_an_unrestricted_loader(tmp_path, nvidia_env):
    """Control: the fixture really is dangerous when loaded the way NVIDIA's code loads it."""
    marker = tmp_path / "marker"
    G, _ = make_pair(0)
    pkl = write_nvidia_pickle(nvidia_env, tmp_path / "net.pkl", marker, G)

    def unsafe_reconstruct(meta):  # what torch_utils.persistence does: exec the embedded source
        exec(meta["module_src"], {})
        return meta

    unsafe_reconstruct.__module__ = "torch_utils.persistence"
    nvidia_env.mods["torch_utils.persistence"]._reconstruct_persistent_obj = unsafe_reconstruct
    with open(pkl, "rb") as f:
        pickle.load(f)
    assert marker.exists()


def test_nvidia_pickle_without_w_avg_estimates_it(tmp_path, nvidia_env):
    G_src, _ = make_pair(3)
    src = evil_src(tmp_path / "marker")
    tree = nv_tree(nvidia_env, G_src, src, g_kwargs(nvidia_env, G_src, "ada"), g_attrs(G_src))
    mapping = tree.state["_modules"]["mapping"]
    del mapping.state["_buffers"]["w_avg"]
    mapping.state["w_avg_beta"] = None
    path = tmp_path / "net.pkl"
    path.write_bytes(pickle.dumps({"G_ema": tree}))
    with pytest.warns(UserWarning, match="estimating it as the mean"):
        G, D_G, extra_G = load_networks(path)
    with torch.no_grad():
        ref = G_src.mapping(torch.randn(20000, G_src.z_dim))[:, 0]
    assert (G.w_avg - ref.mean(0)).abs().max().item() < 0.05 * ref.std(0).mean().item()
    assert D_G is None


def test_nvidia_refuses_unsupported_architectures(tmp_path, nvidia_env):
    G_src, D_src = make_pair(4)
    src = evil_src(tmp_path / "marker")

    def dump(name, data):
        p = tmp_path / name
        p.write_bytes(pickle.dumps(data))
        return p

    kw = g_kwargs(nvidia_env, G_src, "ada")
    cond = nv_tree(nvidia_env, G_src, src, {**kw, "c_dim": 10}, {**g_attrs(G_src), "c_dim": 10})
    with pytest.raises(UnsupportedNetworkError, match="c_dim=10"):
        load_generator(dump("cond.pkl", {"G_ema": cond}))

    resnet = nv_tree(nvidia_env, G_src, src, kw, g_attrs(G_src))
    resnet.state["_modules"]["synthesis"].state["_modules"]["b8"].state["architecture"] = "resnet"
    with pytest.raises(UnsupportedNetworkError, match="'resnet' is not supported"):
        load_generator(dump("resnet.pkl", {"G_ema": resnet}))

    sg3 = nv_tree(nvidia_env, G_src, src, kw, g_attrs(G_src))
    syn = sg3.state["_modules"]["synthesis"]
    syn.state["_modules"] = collections.OrderedDict(input=syn.state["_modules"]["b4"], L0_36_512=syn.state["_modules"]["b8"])
    with pytest.raises(UnsupportedNetworkError, match="StyleGAN3"):
        load_generator(dump("sg3.pkl", {"G_ema": sg3}))

    # An unsupported discriminator is skipped with a warning; the generator still loads.
    good = nv_tree(nvidia_env, G_src, src, kw, g_attrs(G_src))
    d_skip = nv_tree(nvidia_env, D_src, src, {**d_kwargs(nvidia_env, D_src), "architecture": "skip"}, {"c_dim": 0})
    for blk in d_skip.state["_modules"].values():
        blk.state.pop("architecture", None)
    with pytest.warns(UserWarning, match="discriminator not loaded.*'skip'"):
        G, D_G, extra_G = load_networks(dump("dskip.pkl", {"G_ema": good, "D": d_skip}))
    assert D_G is None
    assert_same_generator(G_src, G)


# ---------------------------------------------------------------------------------------------
# Malicious pickles


class Reduce:
    def __init__(self, func, args):
        self.func, self.args = func, args

    def __reduce__(self):
        return (self.func, self.args)


def _payloads(marker):
    return {
        "os.system": (Reduce(os.system, (f"touch {marker}",)), os.system.__module__ + ".system"),
        "builtins.eval": (Reduce(eval, (f"open({str(marker)!r}, 'w').write('x')",)), "builtins.eval"),
        "builtins.exec": (Reduce(exec, (f"open({str(marker)!r}, 'w').write('x')",)), "builtins.exec"),
        "subprocess.Popen": (Reduce(subprocess.Popen, (["touch", str(marker)],)), "subprocess.Popen"),
        "builtins.getattr": (Reduce(getattr, ("str", "upper")), "builtins.getattr"),
    }


def test_payload_control_runs_with_plain_pickle(tmp_path):
    marker = tmp_path / "control"
    payload, _ = _payloads(marker)["builtins.eval"]
    pickle.loads(pickle.dumps(payload))
    assert marker.exists()


@pytest.mark.parametrize("kind", ["os.system", "builtins.eval", "builtins.exec", "subprocess.Popen", "builtins.getattr"])
def test_malicious_pickle_top_level_is_refused(tmp_path, kind):
    marker = tmp_path / "marker"
    payload, global_name = _payloads(marker)[kind]
    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps({"G_ema": payload}))
    with pytest.raises(UnsafeCheckpointError) as ei:
        load_generator(path)
    msg = str(ei.value)
    assert str(path) in msg and global_name in msg and "cannot be loaded safely" in msg
    assert not marker.exists()


def test_malicious_reduce_nested_in_init_kwargs_is_refused(tmp_path, nvidia_env):
    marker = tmp_path / "marker"
    G_src, _ = make_pair(5)
    kw = g_kwargs(nvidia_env, G_src, "ada")
    kw["mapping_kwargs"]["num_layers"] = Reduce(os.system, (f"touch {marker}",))
    path = write_nvidia_pickle(nvidia_env, tmp_path / "evil.pkl", tmp_path / "src-marker", G_src, g_kwargs_override=kw)
    with pytest.raises(UnsafeCheckpointError, match="system"):
        load_generator(path)
    assert not marker.exists() and not (tmp_path / "src-marker").exists()


def test_malicious_object_inside_a_tensor_storage_blob_is_refused(tmp_path):
    marker = tmp_path / "marker"
    blob = io.BytesIO()
    torch.save(Reduce(os.system, (f"touch {marker}",)), blob, _use_new_zipfile_serialization=False)
    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps({"G_ema": Reduce(torch.storage._load_from_bytes, (blob.getvalue(),))}))
    with pytest.raises(UnsafeCheckpointError, match="storage"):
        load_generator(path)
    assert not marker.exists()


def test_persistence_internals_are_not_stubbed(tmp_path, monkeypatch):
    marker = tmp_path / "marker"
    mod = types.ModuleType("torch_utils.persistence")

    def _src_to_module(src):  # NVIDIA's helper that execs source
        exec(src, {})

    _src_to_module.__module__ = "torch_utils.persistence"
    _src_to_module.__qualname__ = "_src_to_module"
    mod._src_to_module = _src_to_module
    monkeypatch.setitem(sys.modules, "torch_utils", types.ModuleType("torch_utils"))
    monkeypatch.setitem(sys.modules, "torch_utils.persistence", mod)
    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps({"G_ema": Reduce(_src_to_module, (evil_src(marker),))}))
    with pytest.raises(UnsafeCheckpointError, match="torch_utils.persistence._src_to_module"):
        load_generator(path)
    assert not marker.exists()


# ---------------------------------------------------------------------------------------------
# rosinality stylegan2-pytorch fixture


def _fir(gain: float) -> torch.Tensor:
    k = torch.tensor([1.0, 3.0, 3.0, 1.0])
    k = torch.outer(k, k)
    return k / k.sum() * gain


def to_rosinality_g(G: Generator) -> dict:
    """Inverse of the loader's mapping, written independently: our G -> rosinality g_ema state dict."""
    sd = {k: v.detach().clone() for k, v in G.state_dict().items()}
    out = {}
    for i in range(G.cfg.map_layers):
        out[f"style.{i + 1}.weight"] = sd[f"mapping.fc{i}.weight"]
        out[f"style.{i + 1}.bias"] = sd[f"mapping.fc{i}.bias"]
    out["input.input"] = sd["synthesis.b4.const"][None]

    def modconv(dst, src, up):
        out[f"{dst}.conv.weight"] = sd[f"{src}.weight"][None]
        out[f"{dst}.conv.modulation.weight"] = sd[f"{src}.affine.weight"]
        out[f"{dst}.conv.modulation.bias"] = sd[f"{src}.affine.bias"]
        if up:
            out[f"{dst}.conv.blur.kernel"] = _fir(4.0)

    def styled(dst, src, up=False):
        modconv(dst, src, up)
        out[f"{dst}.noise.weight"] = sd[f"{src}.noise_strength"].reshape(1)
        out[f"{dst}.activate.bias"] = sd[f"{src}.bias"]

    def torgb(dst, src, up):
        modconv(dst, src, False)
        out[f"{dst}.bias"] = sd[f"{src}.bias"].reshape(1, -1, 1, 1)
        if up:
            out[f"{dst}.upsample.kernel"] = _fir(4.0)

    styled("conv1", "synthesis.b4.conv1")
    torgb("to_rgb1", "synthesis.b4.torgb", up=False)
    noises = [sd["synthesis.b4.conv1.noise_const"]]
    for k, r in enumerate(G.cfg.block_resolutions[1:]):
        styled(f"convs.{2 * k}", f"synthesis.b{r}.conv0", up=True)
        styled(f"convs.{2 * k + 1}", f"synthesis.b{r}.conv1")
        torgb(f"to_rgbs.{k}", f"synthesis.b{r}.torgb", up=True)
        noises += [sd[f"synthesis.b{r}.conv0.noise_const"], sd[f"synthesis.b{r}.conv1.noise_const"]]
    for i, n in enumerate(noises):
        out[f"noises.noise_{i}"] = n[None, None]
    return out


def to_rosinality_d(D: Discriminator) -> dict:
    sd = {k: v.detach().clone() for k, v in D.state_dict().items()}
    R = D.resolution
    out = {"convs.0.0.weight": sd[f"b{R}.fromrgb.weight"], "convs.0.1.bias": sd[f"b{R}.fromrgb.bias"]}
    for j, r in enumerate(D.block_resolutions):
        p = f"convs.{j + 1}"
        out[f"{p}.conv1.0.weight"], out[f"{p}.conv1.1.bias"] = sd[f"b{r}.conv0.weight"], sd[f"b{r}.conv0.bias"]
        out[f"{p}.conv2.0.kernel"] = _fir(1.0)
        out[f"{p}.conv2.1.weight"], out[f"{p}.conv2.2.bias"] = sd[f"b{r}.conv1.weight"], sd[f"b{r}.conv1.bias"]
        out[f"{p}.skip.0.kernel"], out[f"{p}.skip.1.weight"] = _fir(1.0), sd[f"b{r}.skip.weight"]
    out["final_conv.0.weight"], out["final_conv.1.bias"] = sd["b4.conv.weight"], sd["b4.conv.bias"]
    out["final_linear.0.weight"], out["final_linear.0.bias"] = sd["b4.fc.weight"], sd["b4.fc.bias"]
    out["final_linear.1.weight"], out["final_linear.1.bias"] = sd["b4.out.weight"], sd["b4.out.bias"]
    return out


def write_rosinality(path, G, D=None, latent_avg=True, args=True, extra_args=None):
    g = to_rosinality_g(G)
    ckpt = {"g_ema": g, "g": {k: v.clone() for k, v in g.items()}}
    if D is not None:
        d = to_rosinality_d(D)
        ckpt["d"] = d
        opt = torch.optim.Adam([torch.nn.Parameter(v.clone()) for v in list(d.values())[:3]])
        ckpt["d_optim"] = opt.state_dict()
    if latent_avg:
        ckpt["latent_avg"] = G.w_avg.detach().clone()
    if args:
        ns = argparse.Namespace(path="lmdb/ffhq", iter=800000, batch=16, size=G.resolution, r1=10.0,
                                channel_multiplier=2, n_sample=64, mixing=0.9, ckpt=None, lr=0.002, augment=False)
        for k, v in (extra_args or {}).items():
            setattr(ns, k, v)
        ckpt["args"] = ns
        ckpt["ada_aug_p"] = 0.0
    torch.save(ckpt, path)
    return path


def test_rosinality_training_checkpoint_with_args_namespace(tmp_path):
    G_src, D_src = make_pair(6)
    path = write_rosinality(tmp_path / "080000.pt", G_src, D_src)
    G, D_G, extra_G = load_networks(path)
    assert_same_generator(G_src, G)
    assert isinstance(D_G, Discriminator)
    assert_same_discriminator(D_src, D_G)
    assert G.cfg.channels == G_src.cfg.channels and G.cfg.map_layers == G_src.cfg.map_layers
    # the Namespace stand-in was only allowed for that one load
    names = {f"{getattr(g, '__module__', '')}.{getattr(g, '__qualname__', g)}" for g in torch.serialization.get_safe_globals()}
    assert not any("Namespace" in n or "RosinalityArgs" in n for n in names)


def test_rosinality_args_with_code_is_refused(tmp_path):
    G_src, _ = make_pair(7)
    marker = tmp_path / "marker"
    path = write_rosinality(tmp_path / "evil.pt", G_src, extra_args={"hook": Reduce(os.system, (f"touch {marker}",))})
    with pytest.raises(UnsafeCheckpointError, match="cannot be loaded safely"):
        load_generator(path)
    assert not marker.exists()


def test_rosinality_without_latent_avg_warns_and_estimates(tmp_path):
    G_src, _ = make_pair(8)
    path = write_rosinality(tmp_path / "g.pth", G_src, latent_avg=False, args=False)
    with pytest.warns(UserWarning, match="10000 random z"):
        G, D_G, extra_G = load_networks(path)
    with torch.no_grad():
        ref = G_src.mapping(torch.randn(20000, G_src.z_dim))[:, 0]
        ws = G_src.mapping(torch.randn(2, G_src.z_dim))
        torch.testing.assert_close(G.synthesis(ws), G_src.synthesis(ws), atol=1e-5, rtol=0)
    assert (G.w_avg - ref.mean(0)).abs().max().item() < 0.05 * ref.std(0).mean().item()
    assert D_G is None


def test_rosinality_nonstandard_blur_kernel_is_refused(tmp_path):
    G_src, _ = make_pair(9)
    g = to_rosinality_g(G_src)
    k = torch.tensor([1.0, 2.0, 1.0])
    g["convs.0.conv.blur.kernel"] = torch.outer(k, k) / 4.0
    torch.save({"g_ema": g, "latent_avg": G_src.w_avg.clone()}, tmp_path / "blur.pt")
    with pytest.raises(UnsupportedNetworkError, match="resampling filter"):
        load_generator(tmp_path / "blur.pt")


def test_rosinality_missing_g_ema(tmp_path):
    torch.save({"g": {}}, tmp_path / "x.pt")
    with pytest.raises(ValueError, match="g_ema"):
        load_generator(tmp_path / "x.pt")


# ---------------------------------------------------------------------------------------------
# Own format, conversion, dispatch


def test_own_format_round_trip(tmp_path):
    G_src, D_src = make_pair(10, conv_clamp=64.0)
    save_generator(tmp_path / "g.safetensors", G_src, D_src)
    G, D_G, extra_G = load_networks(tmp_path / "g.safetensors")
    assert not G.training
    assert_same_generator(G_src, G, atol=0)
    assert_same_discriminator(D_src, D_G, atol=0)


def test_convert_checkpoint_from_nvidia_and_rosinality(tmp_path, nvidia_env):
    G_src, D_src = make_pair(11)
    pkl = write_nvidia_pickle(nvidia_env, tmp_path / "net.pkl", tmp_path / "marker", G_src, D_src)
    out = convert_checkpoint(pkl, tmp_path / "from_pkl.safetensors")
    G, D_G, extra_G = load_networks(out)
    assert_same_generator(G_src, G)
    assert_same_discriminator(D_src, D_G)
    assert extra_G["source_format"] == "nvidia-pkl" and extra_G["converted_from"] == "net.pkl"
    assert not (tmp_path / "marker").exists()

    pt = write_rosinality(tmp_path / "r.pt", G_src, D_src)
    G2, D_G2, extra_G2 = load_networks(convert_checkpoint(pt, tmp_path / "from_pt.safetensors"))
    assert_same_generator(G_src, G2)
    assert_same_discriminator(D_src, D_G2)
    # converting a loaded own-format file again works too (D is kept out of the G.* tensors)
    G3, D_G3, extra_G3 = load_networks(convert_checkpoint(tmp_path / "from_pt.safetensors", tmp_path / "again.safetensors"))
    assert_same_generator(G_src, G3)
    assert_same_discriminator(D_src, D_G3)
    with pytest.raises(ValueError, match=".safetensors"):
        convert_checkpoint(pt, tmp_path / "out.pt")


def test_dispatch_errors(tmp_path):
    odd = tmp_path / "model.onnx"
    odd.write_bytes(b"x")
    with pytest.raises(ValueError) as ei:
        load_generator(odd)
    assert str(odd) in str(ei.value) and ".pkl" in str(ei.value) and ".safetensors" in str(ei.value)
    missing = tmp_path / "nope.pkl"
    with pytest.raises(FileNotFoundError) as ei:
        load_generator(missing)
    assert str(missing) in str(ei.value) and ".pt" in str(ei.value)
    garbage = tmp_path / "garbage.pkl"
    garbage.write_bytes(b"\x80\x04not a pickle")
    with pytest.raises(ValueError, match="garbage.pkl"):
        load_generator(garbage)


def test_builtin_model_missing_says_how_to_train_it(monkeypatch):
    monkeypatch.setitem(loaders.BUILTIN_MODELS, "toyfaces-64", "no-such-file.safetensors")
    with pytest.raises(FileNotFoundError) as ei:
        load_generator("toyfaces-64")
    assert "labelfoundry train-generator" in str(ei.value) and "toyfaces-64" in str(ei.value)


def test_builtin_model_loads_when_shipped():
    try:
        path = loaders.builtin_model_path("toyfaces-64")
    except FileNotFoundError:
        pytest.skip("toyfaces-64 is not shipped in this checkout")
    G = load_generator("toyfaces-64")
    assert isinstance(G, Generator) and not G.training and path.suffix == ".safetensors"
    with torch.no_grad():
        assert G(torch.randn(1, G.z_dim)).shape == (1, 3, G.resolution, G.resolution)
