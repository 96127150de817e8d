"""Load a StyleGAN2 generator from any supported checkpoint into our own `Generator`.

Formats (chosen by name / extension):

* ``toyfaces-64`` (built-in name) -> ``labelfoundry/assets/toyfaces-64.safetensors`` in the package.
* ``*.safetensors`` -> our own format (`io.load_own`); tensors only, cannot run code.
* ``*.pkl`` -> NVIDIA stylegan2-ada-pytorch / stylegan3-repo (``networks_stylegan2``) network pickle,
  read with the restricted unpickler of `safe_pickle` (the code embedded in the pickle never runs).
* ``*.pt`` / ``*.pth`` -> rosinality stylegan2-pytorch checkpoint, read with
  ``torch.load(weights_only=True)``.

Our parameter names follow the NVIDIA layout, so NVIDIA state dicts load by name with
``strict=True``; rosinality names are mapped explicitly. The up-sampling 3x3 conv of all three
implementations is the same operation (NVIDIA passes ``flip_weight=False`` for ``up=2`` layers, i.e.
a transposed conv with the unflipped kernel, as does rosinality and our `ops.conv_up2`), so weights
are copied without flipping.
"""

from __future__ import annotations

import math
import os
import pickle
import re
import warnings
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from . import filecheck
from . import safe_pickle as sp
from .discriminator import Discriminator, DiscriminatorConfig
from .io import Networks, load_own, save_generator
from .ops import make_filter
from .safe_pickle import UnsafeCheckpointError
from .stylegan2 import Generator, StyleGAN2Config

__all__ = [
    "Networks",
    "ACCEPTED_FORMATS",
    "BUILTIN_MODELS",
    "UnsafeCheckpointError",
    "builtin_model_path",
    "check_checkpoint",
    "convert_checkpoint",
    "load_generator",
    "load_networks",
    "load_nvidia_pickle",
    "load_rosinality",
]

BUILTIN_MODELS = {"toyfaces-64": "toyfaces-64.safetensors"}
ACCEPTED_FORMATS = (
    "a built-in name (" + ", ".join(BUILTIN_MODELS) + "), a labelfoundry .safetensors file, "
    "an NVIDIA stylegan2-ada-pytorch / stylegan3 network .pkl, or a rosinality stylegan2-pytorch .pt/.pth"
)
W_AVG_SAMPLES = 10_000


class UnsupportedNetworkError(ValueError):
    """The checkpoint is readable but holds an architecture our StyleGAN2 cannot represent."""


# ---------------------------------------------------------------------------------------------
# Dispatch


def builtin_model_path(name: str) -> Path:
    """Path of a shipped model, or FileNotFoundError explaining how to produce it."""
    res = resources.files("labelfoundry").joinpath("assets", BUILTIN_MODELS[name])
    if not res.is_file():
        raise FileNotFoundError(
            f"the shipped model {name!r} is absent from this installation (expected "
            f"labelfoundry/assets/{BUILTIN_MODELS[name]}); train it with `labelfoundry train-generator` "
            "and place the resulting .safetensors there, or pass a checkpoint path instead"
        )
    return Path(str(res))


def resolve_generator_path(path_or_name: str | os.PathLike) -> Path:
    """A built-in name or a checkpoint path -> the file that holds the weights."""
    name = str(path_or_name)
    if name in BUILTIN_MODELS:
        return builtin_model_path(name)
    path = Path(path_or_name).expanduser()
    _check_is_file(path)
    if path.suffix.lower() == ".safetensors":  # the hash of a file reads its header: check it first
        filecheck.check_safetensors(path)
    return path


def _check_is_file(path: Path) -> None:
    if path.is_dir():
        inside = sorted(p.name for p in path.iterdir() if p.suffix.lower() in (".pkl", ".pt", ".pth", ".safetensors"))
        hint = f" (it holds {', '.join(inside[:3])}{', ...' if len(inside) > 3 else ''})" if inside else ""
        raise IsADirectoryError(f"{path}: is a directory; pass the checkpoint file inside it{hint}. Accepted: {ACCEPTED_FORMATS}")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such checkpoint file; accepted: {ACCEPTED_FORMATS}")


def check_checkpoint(path_or_name: str | os.PathLike) -> Path:
    """Cheap checks before any loading (reads a few bytes and a zip directory, unpacks nothing): the
    file exists, is what its extension says and is not a zip bomb. Raises with the file and the fix."""
    path = resolve_generator_path(path_or_name)
    suffix = path.suffix.lower()
    if suffix == ".pkl":
        _check_kind(path, "pickle")
    elif suffix in (".pt", ".pth"):
        _check_kind(path, "torch")
    elif suffix != ".safetensors":
        raise ValueError(f"{path}: unknown checkpoint format {suffix or '(no extension)'!r}; accepted: {ACCEPTED_FORMATS}")
    return path


def load_generator(path_or_name: str | os.PathLike, device: str | torch.device = "cpu") -> Generator:
    """Load any supported checkpoint's generator as our `Generator` (eval mode, on `device`)."""
    return load_networks(path_or_name, device).G


def load_networks(path_or_name: str | os.PathLike, device: str | torch.device = "cpu") -> Networks:
    """Load any supported checkpoint as `Networks` (G, D, extra), in eval mode on `device`.

    D is set when the file holds a discriminator we can represent; extra records where the
    weights came from.
    """
    name = str(path_or_name)
    if name in BUILTIN_MODELS:
        return load_own(builtin_model_path(name), device=device)
    path = Path(path_or_name).expanduser()
    if path.is_dir():
        _check_is_file(path)
    suffix = path.suffix.lower()
    loader = {".safetensors": None, ".pkl": load_nvidia_pickle, ".pt": load_rosinality, ".pth": load_rosinality}
    if suffix not in loader:
        raise ValueError(f"{path}: unknown checkpoint format {suffix or '(no extension)'!r}; accepted: {ACCEPTED_FORMATS}")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such checkpoint file; accepted: {ACCEPTED_FORMATS}")
    if suffix == ".safetensors":
        return load_own(path, device=device)
    return loader[suffix](path, device=device)


def convert_checkpoint(src: str | os.PathLike, dst: str | os.PathLike) -> Path:
    """Load any supported checkpoint (G and, when present, D) and save it in our safetensors format."""
    dst = Path(dst)
    if dst.suffix.lower() != ".safetensors":
        raise ValueError(f"{dst}: the converted checkpoint must be a .safetensors file")
    G, D, extra = load_networks(src, device="cpu")
    extra = dict(extra)
    extra.setdefault("converted_from", Path(str(src)).name)
    save_generator(dst, G, D, extra=extra)
    return dst


# ---------------------------------------------------------------------------------------------
# Shared helpers


def _check_filter(path: Path, key: str, t: torch.Tensor, gain: float = 1.0) -> None:
    ref = make_filter() * gain
    if tuple(t.shape) != tuple(ref.shape) or not torch.allclose(t.float().cpu(), ref, atol=1e-5):
        raise UnsupportedNetworkError(
            f"{path}: {key} is not the [1,3,3,1] resampling filter our StyleGAN2 uses; "
            "this checkpoint cannot be represented exactly"
        )


def _load_strict(path: Path, net: torch.nn.Module, sd: dict[str, torch.Tensor], what: str) -> None:
    expected = set(net.state_dict())
    missing, unexpected = sorted(expected - set(sd)), sorted(set(sd) - expected)
    if missing or unexpected:
        raise UnsupportedNetworkError(
            f"{path}: {what} tensors do not match our StyleGAN2 layout "
            f"(missing {missing[:8]}{'...' if len(missing) > 8 else ''}, "
            f"unexpected {unexpected[:8]}{'...' if len(unexpected) > 8 else ''})"
        )
    try:
        net.load_state_dict({k: v.float() for k, v in sd.items()}, strict=True)
    except RuntimeError as e:
        raise UnsupportedNetworkError(f"{path}: {what} tensor shapes do not match: {e}") from e


@torch.no_grad()
def _estimate_w_avg(G: Generator, path: Path, n: int = W_AVG_SAMPLES) -> None:
    warnings.warn(
        f"{path}: the checkpoint has no average latent (w_avg); estimating it as the mean of "
        f"mapping(z) over {n} random z. Truncated samples (psi < 1) will differ slightly from the original.",
        stacklevel=3,
    )
    gen = torch.Generator().manual_seed(0)
    acc = torch.zeros(G.w_dim, dtype=torch.float64)
    for start in range(0, n, 1000):
        z = torch.randn(min(1000, n - start), G.z_dim, generator=gen)
        acc += G.mapping(z)[:, 0].double().sum(0)
    G.mapping.w_avg.copy_((acc / n).float())


def _num(v: Any, cast=float):
    return None if v is None else cast(v)


# ---------------------------------------------------------------------------------------------
# NVIDIA network pickles

_G_POSITIONAL = ("z_dim", "c_dim", "w_dim", "img_resolution", "img_channels", "mapping_kwargs", "synthesis_kwargs")
_D_POSITIONAL = ("c_dim", "img_resolution", "img_channels")


def _init_kwargs(stub: Any, positional: tuple[str, ...]) -> dict:
    kw = dict(stub.init_kwargs) if isinstance(stub, sp.PersistentStub) else {}
    if isinstance(stub, sp.PersistentStub):
        for k, v in zip(positional, stub.init_args):
            kw.setdefault(k, v)
    return sp.plain(kw)


def load_nvidia_pickle(path: str | os.PathLike, device: str | torch.device = "cpu") -> Networks:
    """NVIDIA stylegan2-ada-pytorch / stylegan3-repo StyleGAN2 network pickle -> our (G, D).

    Uses ``G_ema`` (else ``G``) and ``D`` when present. Nothing from the pickle is executed: see
    `safe_pickle`. Conditional (c_dim > 0), non-'skip' generators and StyleGAN3 (alias-free)
    generators are refused; a discriminator we cannot represent is skipped with a warning.
    """
    path = Path(path)
    _check_kind(path, "pickle")
    data = sp.load_network_pickle(path)
    if isinstance(data, (sp.PersistentStub, sp.ModuleStub)):
        raise ValueError(
            f"{path}: holds a single pickled network ({data.class_name.rsplit('.', 1)[-1]}), not an NVIDIA "
            "network snapshot; give the network-snapshot-*.pkl that training wrote, or save the networks as "
            "pickle.dump({'G_ema': G_ema, 'D': D}, f)"
        )
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected an NVIDIA network pickle (a dict with 'G_ema'/'G'/'D'), got a "
                         f"{'list' if isinstance(data, list) else 'value'}; give the network-snapshot-*.pkl that training wrote")
    key = "G_ema" if data.get("G_ema") is not None else "G" if data.get("G") is not None else None
    if key is None:
        raise ValueError(f"{path}: no 'G_ema' or 'G' network in this pickle (keys: {sorted(map(str, data))})")
    if key == "G":
        warnings.warn(
            f"{path}: has no 'G_ema'; using the training network 'G' (not the moving average of its weights), "
            "whose samples are usually worse; give a snapshot that holds G_ema if you have one",
            stacklevel=2,
        )
    G = _nvidia_generator(data[key], path, key)
    D = None
    if data.get("D") is not None:
        try:
            D = _nvidia_discriminator(data["D"], path)
        except UnsupportedNetworkError as e:
            warnings.warn(f"discriminator not loaded, generator only: {e}", stacklevel=2)
    return Networks(G, D, {"source_format": "nvidia-pkl", "source": path.name, "network": key}).to(device)


def _nvidia_generator(stub: Any, path: Path, key: str) -> Generator:
    """A pickled NVIDIA StyleGAN2 generator stub -> our Generator: check that we can represent it,
    read its configuration, then load its tensors by name."""
    if not sp.is_module(stub):
        raise ValueError(f"{path}: {key!r} is not a pickled network (got {type(stub).__name__})")
    kids, syn_kids = _nvidia_networks(stub, path, key)
    sd = sp.module_state_dict(stub)
    G = Generator(_nvidia_config(stub, kids, syn_kids, sd, path))
    _load_nvidia_state(G, sd, path, key)
    return G


def _nvidia_kwargs(stub: Any):
    """get(name, default): an init kwarg of the stub, else its attribute, else default."""
    st = sp.stub_state(stub)
    kw = _init_kwargs(stub, _G_POSITIONAL)

    def get(name: str, default: Any = None) -> Any:
        v = kw.get(name, st.get(name, default))
        return default if v is None else v

    return kw, get


def _nvidia_networks(stub: Any, path: Path, key: str) -> tuple[dict, dict]:
    """(children of G, children of G.synthesis), refusing conditional and StyleGAN3 generators."""
    _, get = _nvidia_kwargs(stub)
    c_dim = int(get("c_dim", 0))
    if c_dim != 0:
        raise UnsupportedNetworkError(
            f"{path}: conditional generator (c_dim={c_dim}); labelfoundry supports unconditional generators (c_dim=0) only"
        )
    kids = sp.children(stub)
    if "mapping" not in kids or "synthesis" not in kids:
        raise UnsupportedNetworkError(f"{path}: {key!r} has no mapping/synthesis networks ({sorted(kids)})")
    syn_kids = sp.children(kids["synthesis"])
    if "b4" not in syn_kids:
        if "input" in syn_kids or any(k.startswith("L0_") for k in syn_kids):
            raise UnsupportedNetworkError(
                f"{path}: this is a StyleGAN3 (alias-free, networks_stylegan3) generator; labelfoundry loads "
                "StyleGAN2 ('skip' architecture, stylegan2-ada-pytorch or stylegan3-repo networks_stylegan2) only"
            )
        raise UnsupportedNetworkError(f"{path}: unrecognised synthesis network (submodules {sorted(syn_kids)[:8]})")
    return kids, syn_kids


def _nvidia_config(stub: Any, kids: dict, syn_kids: dict, sd: dict, path: Path) -> StyleGAN2Config:
    """Our StyleGAN2Config from the stub's init kwargs, attributes and tensor shapes; refuses
    architectures our StyleGAN2 cannot represent."""
    kw, get = _nvidia_kwargs(stub)
    resolution = int(get("img_resolution"))
    img_channels = int(get("img_channels", 3))
    z_dim, w_dim = int(get("z_dim")), int(get("w_dim"))
    mapping_kwargs = dict(get("mapping_kwargs", {}) or {})
    # stylegan2-ada-pytorch nests these in synthesis_kwargs; the stylegan3 repo passes them flat.
    syn_kwargs = {k: v for k, v in kw.items() if k not in _G_POSITIONAL}
    syn_kwargs.update(dict(get("synthesis_kwargs", {}) or {}))
    block_res = [2**i for i in range(2, int(math.log2(resolution)) + 1)]
    if 2 ** int(math.log2(resolution)) != resolution or sorted(syn_kids) != sorted(f"b{r}" for r in block_res):
        raise UnsupportedNetworkError(f"{path}: synthesis blocks {sorted(syn_kids)} do not match img_resolution={resolution}")
    for r in block_res:
        arch = sp.stub_state(syn_kids[f"b{r}"]).get("architecture", syn_kwargs.get("architecture", "skip"))
        if arch != "skip":
            raise UnsupportedNetworkError(
                f"{path}: synthesis architecture {arch!r} is not supported; only 'skip' (StyleGAN2 config-f) is"
            )
    if mapping_kwargs.get("activation", "lrelu") != "lrelu":
        raise UnsupportedNetworkError(f"{path}: mapping activation {mapping_kwargs['activation']!r} is not supported")

    if any(k.startswith("mapping.embed.") for k in sd):
        raise UnsupportedNetworkError(f"{path}: the mapping network has a label embedding (conditional model)")
    map_layers = sum(1 for k in sd if re.fullmatch(r"mapping\.fc\d+\.weight", k))
    for i in range(map_layers):
        want = (w_dim, z_dim if i == 0 else w_dim)
        if tuple(sd[f"mapping.fc{i}.weight"].shape) != want:
            raise UnsupportedNetworkError(
                f"{path}: mapping.fc{i} has shape {tuple(sd[f'mapping.fc{i}.weight'].shape)}, expected {want} "
                "(mapping layer_features different from w_dim is not supported)"
            )
    fc0 = sp.stub_state(sp.children(kids["mapping"])["fc0"]) if map_layers else {}
    lr_mult = fc0.get("lr_multiplier", fc0.get("bias_gain", mapping_kwargs.get("lr_multiplier", 0.01)))
    map_state = sp.stub_state(kids["mapping"])
    w_avg_beta = map_state.get("w_avg_beta", mapping_kwargs.get("w_avg_beta", 0.995))
    conv_clamp = syn_kwargs.get("conv_clamp")
    b4_conv1 = sp.children(syn_kids["b4"]).get("conv1")
    if b4_conv1 is not None:
        conv_clamp = sp.stub_state(b4_conv1).get("conv_clamp", conv_clamp)

    num_fp16_res = syn_kwargs.get("num_fp16_res")
    if num_fp16_res is None:  # not recorded: count the blocks that were built for fp16
        num_fp16_res = sum(bool(sp.stub_state(syn_kids[f"b{r}"]).get("use_fp16")) for r in block_res)

    return StyleGAN2Config(
        resolution=resolution, z_dim=z_dim, w_dim=w_dim, img_channels=img_channels, map_layers=map_layers,
        mapping_lr_mult=float(lr_mult), channel_base=int(syn_kwargs.get("channel_base", 32768)),
        channel_max=int(syn_kwargs.get("channel_max", 512)), num_fp16_res=int(num_fp16_res),
        conv_clamp=_num(conv_clamp), w_avg_beta=float(w_avg_beta) if w_avg_beta is not None else 0.995,
        channels={r: int(sd[f"synthesis.b{r}.conv1.weight"].shape[0]) for r in block_res},
    )


def _load_nvidia_state(G: Generator, sd: dict, path: Path, key: str) -> None:
    """Load the pickle's tensors into G by name (strict), filling what NVIDIA leaves implicit:
    absent noise (strength 0) and an absent w_avg (estimated from samples)."""
    for k, v in sd.items():
        if k.endswith("resample_filter"):
            _check_filter(path, k, v)
    # Layers built with use_noise=False have no noise: equivalent to strength 0.
    for k in G.state_dict():
        if k.endswith(".noise_strength") and k not in sd and k.replace("noise_strength", "noise_const") not in sd:
            sd[k] = torch.zeros([])
            sd[k.replace("noise_strength", "noise_const")] = G.state_dict()[k.replace("noise_strength", "noise_const")]
    has_w_avg = "mapping.w_avg" in sd
    if not has_w_avg:
        sd["mapping.w_avg"] = torch.zeros(G.w_dim)
    _load_strict(path, G, sd, f"generator {key!r}")
    if not has_w_avg:
        _estimate_w_avg(G, path)


def _nvidia_discriminator(stub: Any, path: Path) -> Discriminator:
    if not sp.is_module(stub):
        raise UnsupportedNetworkError(f"{path}: 'D' is not a pickled network")
    st = sp.stub_state(stub)
    kw = _init_kwargs(stub, _D_POSITIONAL)

    def get(name: str, default: Any = None) -> Any:
        v = kw.get(name, st.get(name, default))
        return default if v is None else v

    if int(get("c_dim", 0)) != 0:
        raise UnsupportedNetworkError(f"{path}: conditional discriminator (c_dim={get('c_dim')}) is not supported")
    arch = get("architecture", "resnet")
    kids = sp.children(stub)
    for name, child in kids.items():
        if name.startswith("b") and name != "b4":
            arch = sp.stub_state(child).get("architecture", arch)
    if arch != "resnet":
        raise UnsupportedNetworkError(f"{path}: discriminator architecture {arch!r} is not supported; only 'resnet' is")
    resolution, img_channels = int(get("img_resolution")), int(get("img_channels", 3))
    if "b4" not in kids:
        raise UnsupportedNetworkError(f"{path}: discriminator has no b4 epilogue")
    epi_kids = sp.children(kids["b4"])
    epi_kwargs = dict(get("epilogue_kwargs", {}) or {})
    if "mbstd" not in epi_kids:
        raise UnsupportedNetworkError(f"{path}: discriminator without minibatch-stddev layer is not supported")
    mb = sp.stub_state(epi_kids["mbstd"])
    group = mb.get("group_size", epi_kwargs.get("mbstd_group_size", 4))
    num_ch = int(mb.get("num_channels", epi_kwargs.get("mbstd_num_channels", 1)))
    sd = sp.module_state_dict(stub)
    block_res = [2**i for i in range(int(math.log2(resolution)), 2, -1)]
    for r in block_res:  # NVIDIA's DiscriminatorBlock keeps a filter buffer we do not have
        if f"b{r}.resample_filter" in sd:
            _check_filter(path, f"b{r}.resample_filter", sd.pop(f"b{r}.resample_filter"))
    for k, v in sd.items():
        if k.endswith("resample_filter"):
            _check_filter(path, k, v)
    try:
        channels = {r: int(sd[f"b{r}.conv0.weight"].shape[0]) for r in block_res}
        channels[4] = int(sd["b4.conv.weight"].shape[0])
    except KeyError as e:
        raise UnsupportedNetworkError(f"{path}: discriminator tensor {e} missing") from e
    conv_clamp = get("conv_clamp")
    cfg = DiscriminatorConfig(
        resolution=resolution, img_channels=img_channels, channel_base=int(get("channel_base", 32768)),
        channel_max=int(get("channel_max", 512)),
        mbstd_group_size=int(group) if group is not None else 1 << 30,  # None = whole batch
        mbstd_num_channels=num_ch, conv_clamp=_num(conv_clamp), channels=channels,
    )
    D = Discriminator(cfg)
    _load_strict(path, D, sd, "discriminator 'D'")
    return D.eval()


# ---------------------------------------------------------------------------------------------
# rosinality stylegan2-pytorch


class RosinalityArgs:
    """Inert stand-in for the ``argparse.Namespace`` that rosinality's train.py stores as ``args``.

    It is allow-listed (only for the duration of one `torch.load`) under the name
    ``argparse.Namespace``; torch's weights_only unpickler then creates it with ``__new__`` and fills
    its ``__dict__`` from the pickled state, which must itself contain only weights_only-safe values.
    No foreign code runs, and the real ``argparse.Namespace`` is never allow-listed.
    """

    def __repr__(self) -> str:
        return f"RosinalityArgs({vars(self)})"


_NVIDIA_MARK = b"torch_utils.persistence"


def _check_kind(path: Path, want: str) -> None:
    """The file is what its extension promises (`want`: "pickle" for .pkl, "torch" for .pt/.pth), or
    an error naming what it really is and the fix. A zip is checked for its declared unpacked size
    (a zip bomb is refused before torch inflates anything)."""
    kind = filecheck.sniff(path)
    if kind == "empty":
        raise ValueError(f"{path}: the file is empty; re-download the checkpoint")
    if kind == "zip":
        filecheck.check_zip_sizes(path)
        if _NVIDIA_MARK in (filecheck.zip_member(path, "data.pkl") or b""):
            raise ValueError(
                f"{path}: is a torch.save of an NVIDIA network object, which cannot be loaded without running "
                "the code stored in it; give the network-snapshot-*.pkl that NVIDIA's training wrote, or save the "
                "networks as pickle.dump({'G_ema': G_ema, 'D': D}, f) to a .pkl"
            )
    if kind == "safetensors":
        raise ValueError(f"{path}: is a safetensors file, not a {want} checkpoint; rename it to .safetensors")
    if want == "pickle" and kind in ("zip", "torch-legacy"):
        raise ValueError(
            f"{path}: is a torch.save checkpoint (e.g. rosinality stylegan2-pytorch), not an NVIDIA network "
            "pickle; rename it to .pt"
        )
    if want == "torch" and kind == "pickle":
        raise ValueError(
            f"{path}: is a plain pickle, not a torch.save checkpoint; if it is an NVIDIA stylegan2-ada-pytorch / "
            "stylegan3 network snapshot, rename it to .pkl"
        )


def _torch_load_safe(path: Path) -> Any:
    """``torch.load(weights_only=True)`` that also accepts rosinality's training-checkpoint ``args``.

    Approach: a scoped `torch.serialization.safe_globals` entry maps the global
    ``argparse.Namespace`` to `RosinalityArgs` (an empty class), rather than allow-listing
    argparse.Namespace itself or falling back to an unrestricted load. Anything else weights_only
    refuses raises `UnsafeCheckpointError`.
    """
    _check_kind(path, "torch")
    try:
        with torch.serialization.safe_globals([(RosinalityArgs, "argparse.Namespace")]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise UnsafeCheckpointError(
            f"{path}: torch's weights_only loader refuses this file ({sp._first_line(e)}); "
            "it references code outside the tensors, so this file cannot be loaded safely"
        ) from e
    except (RuntimeError, EOFError, OSError) as e:
        raise ValueError(f"{path}: cannot read this torch checkpoint ({e})") from e


def load_rosinality(
    path: str | os.PathLike, device: str | torch.device = "cpu", lr_mlp: float = 0.01
) -> Networks:
    """rosinality stylegan2-pytorch checkpoint (``g_ema`` required; ``latent_avg``, ``d`` optional).

    The architecture (size, channels, n_mlp, style_dim) is read from tensor shapes; ``lr_mlp`` is
    rosinality's mapping learning-rate multiplier (not stored in checkpoints; 0.01 by default there).
    Without ``latent_avg`` the average latent is estimated from 10k samples (with a warning).
    """
    path = Path(path)
    ckpt = _torch_load_safe(path)
    if not isinstance(ckpt, dict) or "g_ema" not in ckpt:
        keys = sorted(map(str, ckpt)) if isinstance(ckpt, dict) else type(ckpt).__name__
        raise ValueError(f"{path}: not a rosinality stylegan2-pytorch checkpoint (no 'g_ema'; found {keys})")
    G = _rosinality_generator(ckpt["g_ema"], path, lr_mlp)
    if ckpt.get("latent_avg") is not None:
        G.mapping.w_avg.copy_(torch.as_tensor(ckpt["latent_avg"]).reshape(-1).float())
    else:
        _estimate_w_avg(G, path)
    D = None
    if isinstance(ckpt.get("d"), dict):
        try:
            D = _rosinality_discriminator(ckpt["d"], path)
        except UnsupportedNetworkError as e:
            warnings.warn(f"discriminator not loaded, generator only: {e}", stacklevel=2)
    return Networks(G, D, {"source_format": "rosinality-pt", "source": path.name}).to(device)


def _rosinality_generator(g: dict, path: Path, lr_mlp: float) -> Generator:
    def t(k: str) -> torch.Tensor:
        if k not in g:
            raise UnsupportedNetworkError(f"{path}: g_ema has no {k!r}; not a rosinality StyleGAN2 generator")
        return g[k]

    n_mlp = sum(1 for k in g if re.fullmatch(r"style\.\d+\.weight", k))
    n_up = sum(1 for k in g if re.fullmatch(r"to_rgbs\.\d+\.conv\.weight", k))
    if n_mlp == 0:
        raise UnsupportedNetworkError(f"{path}: g_ema has no style.* mapping layers")
    w_dim, z_dim = t("style.1.weight").shape
    resolution = 4 * 2**n_up
    const = t("input.input")
    if const.ndim != 4 or const.shape[2:] != (4, 4):
        raise UnsupportedNetworkError(f"{path}: input.input has shape {tuple(const.shape)}, expected (1, C, 4, 4)")
    channels = {4: int(const.shape[1])}
    for k in range(n_up):
        channels[8 * 2**k] = int(t(f"convs.{2 * k}.conv.weight").shape[1])
    img_channels = int(t("to_rgb1.conv.weight").shape[1])
    for key, v in g.items():
        if key.endswith("blur.kernel") or key.endswith("upsample.kernel"):
            _check_filter(path, key, v, gain=4.0)  # rosinality scales upsampling kernels by factor**2
    cfg = StyleGAN2Config(
        resolution=resolution, z_dim=int(z_dim), w_dim=int(w_dim), img_channels=img_channels,
        map_layers=n_mlp, mapping_lr_mult=lr_mlp, channels=channels,
        channel_base=channels[4] * 4, channel_max=max(channels.values()),
    )
    G = Generator(cfg)
    sd: dict[str, torch.Tensor] = {k: v for k, v in G.state_dict().items() if k.endswith("resample_filter")}
    for i in range(1, n_mlp + 1):
        sd[f"mapping.fc{i - 1}.weight"] = t(f"style.{i}.weight")
        sd[f"mapping.fc{i - 1}.bias"] = t(f"style.{i}.bias")
    sd["mapping.w_avg"] = torch.zeros(int(w_dim))  # set by the caller
    sd["synthesis.b4.const"] = const[0]

    def modconv(src: str, dst: str) -> None:
        sd[f"{dst}.weight"] = t(f"{src}.conv.weight")[0]
        sd[f"{dst}.affine.weight"] = t(f"{src}.conv.modulation.weight")
        sd[f"{dst}.affine.bias"] = t(f"{src}.conv.modulation.bias")

    def styled(src: str, dst: str) -> None:
        modconv(src, dst)
        sd[f"{dst}.noise_strength"] = t(f"{src}.noise.weight").reshape(())
        sd[f"{dst}.bias"] = t(f"{src}.activate.bias").reshape(-1)

    def torgb(src: str, dst: str) -> None:
        modconv(src, dst)
        sd[f"{dst}.bias"] = t(f"{src}.bias").reshape(-1)

    styled("conv1", "synthesis.b4.conv1")
    torgb("to_rgb1", "synthesis.b4.torgb")
    noise_dst = ["synthesis.b4.conv1"]
    for k in range(n_up):
        r = 8 * 2**k
        styled(f"convs.{2 * k}", f"synthesis.b{r}.conv0")
        styled(f"convs.{2 * k + 1}", f"synthesis.b{r}.conv1")
        torgb(f"to_rgbs.{k}", f"synthesis.b{r}.torgb")
        noise_dst += [f"synthesis.b{r}.conv0", f"synthesis.b{r}.conv1"]
    missing_noise = [i for i in range(len(noise_dst)) if f"noises.noise_{i}" not in g]
    if missing_noise:
        warnings.warn(f"{path}: g_ema has no constant noise buffers {missing_noise}; using fresh random ones", stacklevel=3)
    own = G.state_dict()
    for i, dst in enumerate(noise_dst):
        n = g.get(f"noises.noise_{i}")
        sd[f"{dst}.noise_const"] = n.reshape(n.shape[-2:]) if n is not None else own[f"{dst}.noise_const"]
    _load_strict(path, G, sd, "generator 'g_ema'")
    return G


def _rosinality_discriminator(d: dict, path: Path) -> Discriminator:
    """rosinality Discriminator -> ours: same ops (ResBlock = our resnet DiscriminatorBlock, stddev
    group 4 / 1 channel, final_conv + 2 EqualLinear = our b4 epilogue), different names."""

    def t(k: str) -> torch.Tensor:
        if k not in d:
            raise UnsupportedNetworkError(f"{path}: d has no {k!r}; not a rosinality StyleGAN2 discriminator")
        return d[k]

    n_blocks = sum(1 for k in d if re.fullmatch(r"convs\.\d+\.conv1\.0\.weight", k))
    resolution = 4 * 2**n_blocks
    block_res = [resolution // 2**j for j in range(n_blocks)]
    for key, v in d.items():
        if key.endswith(".kernel"):
            _check_filter(path, key, v)
    channels = {r: int(t(f"convs.{j + 1}.conv1.0.weight").shape[0]) for j, r in enumerate(block_res)}
    channels[4] = int(t("final_conv.0.weight").shape[0])
    img_channels = int(t("convs.0.0.weight").shape[1])
    cfg = DiscriminatorConfig(
        resolution=resolution, img_channels=img_channels, channel_base=channels[4] * 4,
        channel_max=max(channels.values()), mbstd_group_size=4, mbstd_num_channels=1, channels=channels,
    )
    D = Discriminator(cfg)
    sd = {k: v for k, v in D.state_dict().items() if k.endswith("resample_filter")}
    sd[f"b{resolution}.fromrgb.weight"] = t("convs.0.0.weight")
    sd[f"b{resolution}.fromrgb.bias"] = t("convs.0.1.bias")
    for j, r in enumerate(block_res):
        src = f"convs.{j + 1}"
        sd[f"b{r}.conv0.weight"] = t(f"{src}.conv1.0.weight")
        sd[f"b{r}.conv0.bias"] = t(f"{src}.conv1.1.bias")
        sd[f"b{r}.conv1.weight"] = t(f"{src}.conv2.1.weight")
        sd[f"b{r}.conv1.bias"] = t(f"{src}.conv2.2.bias")
        sd[f"b{r}.skip.weight"] = t(f"{src}.skip.1.weight")
    sd["b4.conv.weight"] = t("final_conv.0.weight")
    sd["b4.conv.bias"] = t("final_conv.1.bias")
    sd["b4.fc.weight"], sd["b4.fc.bias"] = t("final_linear.0.weight"), t("final_linear.0.bias")
    sd["b4.out.weight"], sd["b4.out.bias"] = t("final_linear.1.weight"), t("final_linear.1.bias")
    _load_strict(path, D, sd, "discriminator 'd'")
    return D.eval()
