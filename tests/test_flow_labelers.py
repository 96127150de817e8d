"""Every labeler plugs into the same factory: fit -> generate -> filter -> evaluate, same shard format."""

import copy
import json

import numpy as np
import pytest
import yaml

import storage
from labelfoundry.generators import Discriminator, save_generator

from .conftest import TINY, tiny_G

pytestmark = pytest.mark.slow

FAST = {
    "gradient_matching": {"method": "gradient_matching", "steps": 3},
    "stylemix": {"method": "stylemix", "n_styles": 3, "niter": 5},
    "latent_direction": {"method": "latent_direction", "steps": 3, "batch_size": 4},
    "labels4free": {"method": "labels4free", "steps": 3, "batch_size": 4},
}


@pytest.fixture(scope="module")
def generator_with_d(tmp_path_factory) -> str:
    """Labels4Free needs the GAN's discriminator: a tiny G + D in one file."""
    G = tiny_G(16)
    D = Discriminator(resolution=16, channel_base=128, channel_max=16)
    path = tmp_path_factory.mktemp("gd") / "gd.safetensors"
    save_generator(path, G, D)
    return str(path)


@pytest.mark.parametrize("method", sorted(FAST))
def test_labeler_runs_through_the_factory(method, tmp_path, generator_with_d):
    from flows.factory import factory

    cfg = copy.deepcopy(TINY)
    cfg.update(run_dir=str(tmp_path / "run"), generator={"name": generator_with_d}, labeler=FAST[method])
    cfg["generate"] = {"num_samples": 32, "samples_per_shard": 16, "batch": 16}
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    summary = factory(config=str(path))

    store = storage.ShardStore.open(summary["dataset"])
    assert store.uncommitted_shards() == []
    m = store.manifest()
    assert len(m) == 32 and "keep" in m
    sample = store.read_sample(int(m.sample_id.iloc[0]))
    assert sample["image"].shape == (16, 16, 3) and sample["label"].shape == (16, 16)
    assert np.isfinite(sample["uncertainty"].astype(np.float32)).all() and (sample["uncertainty"] >= 0).all()
    supervised = method == "gradient_matching"
    n_classes = 10 if supervised else 2
    assert sample["label"].max() < n_classes
    assert store.info["schema"]["class_names"][0] == "background"
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["labeler"] == method
    assert set(metrics["methods"]) == {method, "labeled_only", "oracle"}
    assert len(metrics["class_names"]) == n_classes
    # unsupervised labelers skip inversion: no latents were optimised
    assert (tmp_path / "run" / "invert" / "inversion.pt").exists() is False
