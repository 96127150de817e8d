"""Several label types in one dataset from one generation pass (segmentation + keypoints + depth):
the layout, one synthesis pass giving the same labels as separate passes, the reader, verify, the
filter's combination rule, the factory end to end, and single-type datasets written before multi-label
support still reading."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import storage
from labelfoundry.filtering import combined_score
from labelfoundry.generation import generate_samples
from labelfoundry.labelers.base import FitData
from labelfoundry.labelers.handsoff import HandsOffConfig, HandsOffLabeler

OLD_DATASET = Path(__file__).with_name("data") / "single-type-v1"
TASKS = ("segmentation", "keypoints", "depth")


@pytest.fixture(scope="module")
def labelers(G16):
    """Three tiny HandsOff labelers (one per task) fitted on the same 4 latents."""
    torch.manual_seed(0)
    n, R = 4, G16.resolution
    ws = G16.mapping(torch.randn(n, G16.z_dim))
    rng = np.random.default_rng(0)
    data = FitData(
        masks=rng.integers(0, 3, (n, R, R)), keypoints=np.concatenate([rng.uniform(0, R - 1, (n, 5, 2)), np.ones((n, 5, 1))], -1),
        depth=rng.uniform(5, 10, (n, R, R)).astype(np.float32), latents=ws.detach(),
        schema={"class_names": ["bg", "a", "b"], "colors": [[0, 0, 0]] * 3, "keypoint_names": list("abcde")},
    )
    small = dict(members=2, hidden=(8, 4), min_steps=3, epochs=0.01, pixels_per_image=32)
    return {t: HandsOffLabeler.fit(G16, data, HandsOffConfig(task=t, **small)) for t in TASKS}


def multi_store(path: Path, G, n: int = 24, per_shard: int = 8) -> storage.ShardStore:
    R = G.resolution
    return storage.ShardStore.create(
        str(path), num_samples=n, image_shape=(R, R), label_shape=(R, R), label_dtype="uint8",
        schema={"class_names": ["bg", "a", "b"], "colors": [[0, 0, 0]] * 3, "keypoint_names": list("abcde")},
        samples_per_shard=per_shard, w_shape=(G.num_ws, G.w_dim), label_task="segmentation",
        extra_labels={"keypoints": ("keypoints", (5, R, R)), "depth": ("depth", (1, R, R))},
    )


def test_one_pass_gives_the_labels_of_separate_passes(G16, labelers):
    ids = list(range(10))
    multi, cols = generate_samples(G16, {"label": labelers["segmentation"], "keypoints": labelers["keypoints"],
                                         "depth": labelers["depth"]}, ids, 7, batch=4)
    for array, task in (("label", "segmentation"), ("keypoints", "keypoints"), ("depth", "depth")):
        single, single_cols = generate_samples(G16, labelers[task], ids, 7, batch=4)
        np.testing.assert_array_equal(multi["image"], single["image"])
        np.testing.assert_array_equal(multi[array], single["label"])
        np.testing.assert_array_equal(multi[storage.uncertainty_array(array)], single["uncertainty"])
        np.testing.assert_array_equal(cols[storage.score_column(array)], single_cols["score"])
        np.testing.assert_array_equal(cols[storage.score_column(array, top10=True)], single_cols["score_top10"])
    assert multi["keypoints"].shape == (10, 5, 16, 16) and multi["depth"].shape == (10, 1, 16, 16)
    assert multi["label"].dtype == np.uint8 and multi["keypoints"].dtype == np.float16


def test_multi_label_dataset_writes_verifies_and_reads_every_type(tmp_path, G16, labelers):
    from labelfoundry.generation import generate_shards

    store = multi_store(tmp_path / "ds", G16)
    labs = {"label": labelers["segmentation"], "keypoints": labelers["keypoints"], "depth": labelers["depth"]}
    generate_shards(G16, labs, store, range(store.num_shards), 3, batch=8)
    assert store.is_complete()
    info = json.loads((tmp_path / "ds" / "dataset.json").read_text())
    assert info["labels"] == {"label": "segmentation", "keypoints": "keypoints", "depth": "depth"}
    report = storage.verify(str(tmp_path / "ds"))
    assert report.ok, report

    opened = storage.open_dataset(str(tmp_path / "ds"), filter=None)
    assert opened.layout.label_arrays == info["labels"]
    m = opened.manifest
    for col in ("score", "score_keypoints", "score_depth", "score_top10_depth", "frac_a"):
        assert col in m and m[col].notna().all(), col
    sample = opened.dataset()[5]
    want = {"image": ((3, 16, 16), torch.uint8), "label": ((16, 16), torch.uint8), "uncertainty": ((16, 16), torch.float16),
            "keypoints": ((5, 16, 16), torch.float16), "uncertainty_keypoints": ((16, 16), torch.float16),
            "depth": ((1, 16, 16), torch.float16), "uncertainty_depth": ((16, 16), torch.float16)}
    for name, (shape, dtype) in want.items():
        assert tuple(sample[name].shape) == shape and sample[name].dtype == dtype, name
    streamed = next(iter(opened.iterable(seed=0)))
    assert set(want) <= set(streamed)


def test_a_damaged_extra_label_array_fails_verify(tmp_path, G16, labelers):
    """The checksum covers every label type: flipping bytes of the depth array is caught."""
    from labelfoundry.generation import generate_shards

    store = multi_store(tmp_path / "ds", G16, n=8)
    labs = {"label": labelers["segmentation"], "keypoints": labelers["keypoints"], "depth": labelers["depth"]}
    generate_shards(G16, labs, store, [0], 3, batch=8)
    store.close()
    with storage.ShardStore.open(str(tmp_path / "ds"), mode="a") as s:
        arrays = s._arrays_for_write()
        arrays["depth"][0:1] = np.zeros((1, 1, 16, 16), np.float16)
    report = storage.verify(str(tmp_path / "ds"))
    assert not report.ok and any("depth" in b.file or "checksum" in b.problem for b in report.bad)


def test_layout_refuses_ambiguous_label_sets(tmp_path):
    common = dict(num_samples=4, image_shape=(8, 8), label_shape=(8, 8), label_dtype="uint8",
                  schema={"class_names": ["a", "b"]}, w_shape=None)
    with pytest.raises(ValueError, match="label_task"):
        storage.ShardStore.create(str(tmp_path / "a"), extra_labels={"depth": ("depth", (1, 8, 8))}, **common)
    with pytest.raises(ValueError, match="one array per label type"):
        storage.ShardStore.create(str(tmp_path / "b"), label_task="segmentation", **common,
                                  extra_labels={"depth": ("depth", (1, 8, 8)), "d2": ("depth", (1, 8, 8))})
    with pytest.raises(ValueError, match="reserved"):
        storage.ShardStore.create(str(tmp_path / "c"), label_task="segmentation", **common,
                                  extra_labels={"uncertainty_x": ("depth", (1, 8, 8))})
    with pytest.raises(ValueError, match=r"\(K, 8, 8\)"):
        storage.ShardStore.create(str(tmp_path / "d"), label_task="segmentation", **common,
                                  extra_labels={"depth": ("depth", (1, 4, 4))})


def test_combined_score_rules():
    m = pd.DataFrame({"score": [0.1, 0.2, 0.3, 0.4], "score_depth": [40.0, 1.0, 2.0, 3.0]})
    cols = ["score", "score_depth"]
    np.testing.assert_allclose(combined_score(m, cols, "primary"), m["score"])
    np.testing.assert_allclose(combined_score(m, cols, "max_rank"), [1.0, 0.5, 0.75, 1.0])
    np.testing.assert_allclose(combined_score(m, cols, "mean_rank"), [0.625, 0.375, 0.625, 0.875])
    with pytest.raises(ValueError, match="unknown score combination"):
        combined_score(m, cols, "median")
    with pytest.raises(ValueError, match="no score column"):
        combined_score(m, ["score", "score_keypoints"], "max_rank")


def test_config_keeps_one_labeler_per_type():
    from labelfoundry.config import ConfigError, parse_config

    cfg = parse_config({"extra_labelers": [{"task": "keypoints"}, {"task": "depth"}]})
    assert {k: v.task for k, v in cfg.label_arrays().items()} == {"label": "segmentation", "keypoints": "keypoints", "depth": "depth"}
    with pytest.raises(ConfigError, match="labeled twice"):
        parse_config({"extra_labelers": [{"task": "depth"}, {"task": "depth"}]})
    with pytest.raises(ConfigError, match="must be the primary"):
        parse_config({"labeler": {"task": "depth"}, "extra_labelers": [{"task": "segmentation"}]})


def test_single_type_dataset_written_before_multi_label_still_reads(tmp_path):
    """tests/data/single-type-v1 was written by the code before this change (no `labels` key)."""
    path = tmp_path / "old"
    shutil.copytree(OLD_DATASET, path)
    assert "labels" not in json.loads((path / "dataset.json").read_text())
    assert storage.verify(str(path)).ok
    opened = storage.open_dataset(str(path), filter=None)
    assert opened.layout.label_arrays == {"label": "segmentation"}
    assert opened.layout.checksum_arrays() == ["image", "label", "uncertainty"]
    sample = opened.dataset()[0]
    assert set(sample) >= {"image", "label", "uncertainty"} and "keypoints" not in sample
    # resuming it with the same arguments is still a no-op (layout unchanged)
    info = json.loads((path / "dataset.json").read_text())
    storage.ShardStore.create(str(path), num_samples=info["num_samples"], image_shape=tuple(info["image_shape"]),
                              label_shape=tuple(info["arrays"]["label"]["shape"]), label_dtype="uint8", schema=info["schema"],
                              samples_per_shard=info["samples_per_shard"], w_shape=None, provenance=info["provenance"])


@pytest.mark.prefect
@pytest.mark.slow
def test_factory_writes_every_label_type_from_one_run(tmp_path, make_config):
    """A tiny run with keypoints and depth labelers beside segmentation: three fits on the same
    inverted images, one dataset whose samples carry all three (its segmentation labels refined),
    verified, filtered by the combined score,
    then each type's downstream networks trained on its array and scored with its own metrics."""
    from tests.test_flow import run_factory

    small = {"members": 2, "hidden": [8, 4], "min_steps": 10, "epochs": 0.01, "pixels_per_image": 64}
    cfg = make_config(tmp_path, tmp_path / "run", extra_labelers=[{"task": "keypoints", **small}, {"task": "depth", **small}],
                      generate={"num_samples": 32, "samples_per_shard": 16, "batch": 16}, filter={"drop_top": 0.25},
                      downstream={"max_steps": 3, "test_images": 8, "oracle_images": 16}, refine={"enabled": True})
    summary, _ = run_factory(cfg)
    assert set(summary["extra_labelers"]) == {"keypoints", "depth"}
    assert {Path(a["path"]).name for a in summary["extra_labelers"].values()} == {"labeler-keypoints.safetensors",
                                                                                  "labeler-depth.safetensors"}
    path = summary["dataset"]
    assert storage.verify(path).ok
    opened = storage.open_dataset(path)  # the "default" filter the flow wrote
    assert opened.layout.label_arrays == {"label": "segmentation", "keypoints": "keypoints", "depth": "depth"}
    assert len(opened) == 24 and summary["filter"]["dropped_uncertain"] == 8
    full = storage.open_dataset(path, filter=None).manifest
    ranked = full.assign(c=combined_score(full, ["score", "score_keypoints", "score_depth"], "max_rank"))
    dropped = set(ranked.sort_values(["c", "sample_id"], ascending=[False, True])["sample_id"][:8])
    assert dropped == set(full["sample_id"]) - set(opened.manifest["sample_id"])
    # refined: the segmentation labels are the refiners', every other array the generated store's
    source = storage.open_dataset(summary["unrefined_dataset"], filter=None)
    for name in ("image", "keypoints", "depth", "uncertainty_keypoints", "w"):
        np.testing.assert_array_equal(storage.open_dataset(path, filter=None).read_array(name), source.read_array(name))
    s = opened.dataset()[0]
    assert s["keypoints"].shape == (5, 16, 16) and s["depth"].shape == (1, 16, 16) and s["label"].shape == (16, 16)
    run = tmp_path / "run"
    for array, (file, task, key) in {"label": ("metrics.json", "segmentation", "miou"),
                                     "keypoints": ("metrics-keypoints.json", "keypoints", "pck@0.05"),
                                     "depth": ("metrics-depth.json", "depth", "rmse")}.items():
        metrics = json.loads((run / file).read_text())
        assert metrics["task"] == task and metrics["array"] == array and metrics["gap_closed_metric"] == key
        assert set(metrics["methods"]) == {"handsoff", "labeled_only", "oracle"}
        assert all(r[key] is not None and r[key] >= 0 for r in metrics["methods"].values())
        assert metrics["methods"]["handsoff"]["train_samples"] == 24  # the combined filter's kept samples
        assert (run / "report" / file.replace("metrics", "evaluation").replace(".json", ".md")).is_file()
    assert summary["extra_evaluations"]["depth"]["task"] == "depth"
