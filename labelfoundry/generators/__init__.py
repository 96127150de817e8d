"""StyleGAN2 generators: our implementation, our checkpoint format, and loaders for public formats."""

from .discriminator import Discriminator, DiscriminatorConfig
from .io import Networks, load_own, save_generator
from .loaders import ACCEPTED_FORMATS, BUILTIN_MODELS, UnsupportedNetworkError, convert_checkpoint, load_generator, load_networks
from .safe_pickle import UnsafeCheckpointError
from .stylegan2 import Generator, StyleGAN2Config

__all__ = [
    "ACCEPTED_FORMATS",
    "BUILTIN_MODELS",
    "Discriminator",
    "DiscriminatorConfig",
    "Generator",
    "Networks",
    "StyleGAN2Config",
    "UnsafeCheckpointError",
    "UnsupportedNetworkError",
    "convert_checkpoint",
    "load_generator",
    "load_networks",
    "load_own",
    "save_generator",
]
