"""labelfoundry: a labeled-dataset factory built on a pretrained StyleGAN2.

The core package is plain PyTorch; orchestration lives in ``tasks``/``flows``,
shard storage in ``storage``.
"""

__version__ = "0.1.0"
