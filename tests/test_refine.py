"""Label refinement (labelfoundry.refine, tasks/refine.py): the ensemble's relabeling, the derived
store, and the factory stage end to end (cached, resumable, the source store never written)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from labelfoundry.refine import build_member, relabel
from labelfoundry.uncertainty import js_from_logits


class Fixed(torch.nn.Module):
    """A 'network' that returns the same logits for every image: (K, H, W)."""

    def __init__(self, logits: torch.Tensor):
        super().__init__()
        self.logits = logits

    def forward(self, x):
        return self.logits.expand(x.shape[0], *self.logits.shape)


def test_relabel_takes_the_members_mean_and_their_js_divergence():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(4, 8, 8, generator=g) * 3, torch.randn(4, 8, 8, generator=g) * 3
    images = np.random.default_rng(0).integers(0, 256, (5, 8, 8, 3), dtype=np.uint8)
    out = relabel([Fixed(a), Fixed(b)], images, batch=2)
    js, mean_p = js_from_logits(torch.stack([a, b]), member_dim=0, class_dim=1)
    assert out["label"].dtype == np.uint8 and out["label"].shape == (5, 8, 8)
    assert (out["label"] == mean_p.argmax(0).numpy()).all()
    np.testing.assert_allclose(out["uncertainty"], js.expand(5, 8, 8).numpy(), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(out["score"], js.sum().item(), rtol=1e-5)
    assert out["score"].shape == (5,) and (out["score_top10"] >= js.mean().item()).all()
    same = relabel([Fixed(a), Fixed(a)], images)
    assert np.abs(same["uncertainty"]).max() < 1e-5  # agreeing members: no uncertainty


def test_the_mirrored_pass_averages_each_member_with_its_unmirrored_mirror_image():
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(3, 6, 6, generator=g) * 3, torch.randn(3, 6, 6, generator=g) * 3
    images = np.zeros((2, 6, 6, 3), np.uint8)  # the fixed members ignore the image: only the mirroring acts

    def member_probs(z, perm):
        back = z.flip(-1).softmax(0)  # what the member says about the mirrored image, unmirrored
        return 0.5 * (z.softmax(0) + back[torch.as_tensor(np.argsort(perm))])

    for perm in ([0, 1, 2], [0, 2, 1]):  # no left/right class; classes 1 and 2 a left/right pair
        out = relabel([Fixed(a), Fixed(b)], images, mirror=perm)
        p = torch.stack([member_probs(a, perm), member_probs(b, perm)])
        js, mean_p = js_from_logits(p.log(), member_dim=0, class_dim=1)
        assert (out["label"] == mean_p.argmax(0).numpy()).all()
        np.testing.assert_allclose(out["uncertainty"][0], js.numpy(), rtol=1e-4, atol=1e-6)
    swapped = relabel([Fixed(a)], images, mirror=[0, 2, 1])["label"][0]
    plain = relabel([Fixed(a)], images, mirror=[0, 1, 2])["label"][0]
    assert (swapped != plain).any()  # the permutation is applied
    with pytest.raises(ValueError, match="permutation of the 3 class ids"):
        relabel([Fixed(a)], images, mirror=[0, 1, 1])


def test_relabel_rejects_what_is_not_uint8_nhwc():
    net = build_member("tiny_unet", 3, seed=0)
    with pytest.raises(ValueError, match=r"uint8 images \(N, H, W, 3\)"):
        relabel([net], np.zeros((2, 3, 16, 16), np.uint8))
    with pytest.raises(ValueError, match="uint8"):
        relabel([net], np.zeros((2, 16, 16, 3), np.float32))
    with pytest.raises(ValueError, match="at least one member"):
        relabel([], np.zeros((2, 16, 16, 3), np.uint8))


def test_create_like_copies_the_layout_with_its_own_provenance(tmp_path):
    import storage

    src = storage.ShardStore.create(str(tmp_path / "src"), num_samples=8, image_shape=(4, 4), label_shape=(4, 4),
                                    label_dtype="uint8", schema={"class_names": ["bg", "fg"]}, samples_per_shard=4,
                                    provenance={"run": 1})
    dst = storage.ShardStore.create_like(src, str(tmp_path / "dst"), provenance={"refined_from": "src"})
    assert dst.layout.arrays == src.layout.arrays and dst.layout.schema == src.layout.schema
    assert dst.num_shards == 2 and dst.uncommitted_shards() == [0, 1]
    assert storage.ShardStore.open(str(tmp_path / "dst")).layout.provenance == {"refined_from": "src"}
    assert src.layout.provenance == {"run": 1}
    # resuming with the same provenance reopens it; another provenance is refused
    storage.ShardStore.create_like(src, str(tmp_path / "dst"), provenance={"refined_from": "src"})
    with pytest.raises(storage.LayoutMismatchError):
        storage.ShardStore.create_like(src, str(tmp_path / "dst"), provenance={"refined_from": "other"})


# ------------------------------------------------------------------------------ the stage, end to end
@pytest.fixture(scope="module")
def refined(tmp_path_factory, make_config):
    from tests.test_flow import run_factory

    d = tmp_path_factory.mktemp("refined")
    cfg = make_config(d, d / "run", refine={"enabled": True}, downstream={"baselines": ["unrefined"]})
    summary, fid = run_factory(cfg)
    return {"config": cfg, "run_dir": d / "run", "summary": summary, "flow_run_id": fid}


@pytest.mark.prefect
@pytest.mark.slow
def test_the_refined_store_holds_the_ensembles_labels_beside_the_source(refined):
    import storage
    from tasks.common import Artifact
    from tasks.refine import load_members

    s = refined["summary"]
    src_path, dst_path = s["unrefined_dataset"], s["dataset"]
    assert dst_path.startswith(src_path + "-refined-")
    src, dst = storage.open_dataset(src_path, filter=None), storage.open_dataset(dst_path, filter=None)
    assert storage.verify(dst_path).ok and storage.verify(src_path).ok
    assert len(dst) == len(src) == 64
    for name in ("image", "w"):  # the same samples
        np.testing.assert_array_equal(dst.read_array(name), src.read_array(name))
    members = sorted((refined["run_dir"] / "refine").glob("member-*/member.safetensors"))
    assert len(members) == 2
    from tasks.common import file_hash

    nets = load_members([Artifact(path=str(p), hash=file_hash(p)) for p in members], "tiny_unet", 10, "cpu")
    with torch.no_grad():
        out = relabel(nets, src.read_array("image"), mirror=list(range(10)))  # the built-in domain: mirrored pass on
    labels = dst.read_array("label")
    assert (labels == out["label"]).mean() > 0.999  # the ensemble's labels (member order does not matter)
    assert (labels != src.read_array("label")).any()  # and not the labeler's
    np.testing.assert_allclose(dst.read_array("uncertainty").astype(np.float32), out["uncertainty"], atol=2e-3, rtol=2e-3)
    m, m0 = dst.manifest.sort_values("sample_id"), src.manifest.sort_values("sample_id")
    np.testing.assert_array_equal(m["seed"], m0["seed"])
    np.testing.assert_allclose(m["score_unrefined"], m0["score"])
    np.testing.assert_allclose(m["score"], out["score"], rtol=1e-4)
    # the filter ran on the refined store: its flags are there, the source has none
    assert "keep" in storage.ShardStore.open(dst_path).manifest().columns
    assert storage.ShardStore.open(src_path).filter_names() == []
    assert s["filter"]["total"] == 64
    report = (refined["run_dir"] / "report" / "dataset.md").read_text()  # the report says whose labels these are
    assert f"Labels refined by 2 self-trained segmenters (with the mirrored pass) from the labeler's labels in `{src_path}`" in report
    # downstream: ours on the refined store's kept samples, the control on every sample with the labeler's labels
    methods = s["evaluation"]["methods"]
    assert methods["handsoff"]["train_samples"] == s["filter"]["kept"] < 64
    assert methods["unrefined"]["train_samples"] == 64


@pytest.mark.prefect
@pytest.mark.slow
def test_refine_reruns_from_cache_and_relabels_a_lost_or_damaged_shard(refined, make_config):
    import storage
    from tests.test_flow import run_factory, task_states

    dst = refined["summary"]["dataset"]
    src_files = {p: os.stat(p).st_mtime_ns for p in Path(refined["summary"]["unrefined_dataset"]).rglob("*") if p.is_file()}
    before = storage.ShardStore.open(dst).manifest().sort_values("sample_id")
    (Path(dst) / "manifest" / "shard-000002.parquet").unlink()  # a refined shard lost its commit
    damaged = Path(storage.ShardStore.open(dst).shard_file("label", 1))
    damaged.write_bytes(damaged.read_bytes()[:-7])  # and another's label file was truncated

    # how many refiners run side by side is not what they learn: their cache holds
    d = Path(refined["config"]).parent
    again = make_config(d, refined["run_dir"], name="again.yaml", refine={"enabled": True, "workers": 2},
                        downstream={"baselines": ["unrefined"]})
    summary, fid = run_factory(again)

    states = task_states(fid, 4 + 4 + 2 + 2 + 2)  # invert, fit, filter, report, shards, members, 2 relabels, 2 trainings
    assert states["refine-member"] == ["Cached", "Cached"], states
    assert states["refine-shards"] == ["Completed"] * 2, states  # the lost and the damaged shard, one per worker
    assert states["generate-shards"] == ["Cached"] * 4, states
    assert summary["dataset"] == dst
    after = storage.ShardStore.open(dst).manifest().sort_values("sample_id")
    np.testing.assert_array_equal(after["checksum"], before["checksum"])  # the same bytes again
    assert storage.verify(dst).ok
    assert {p: os.stat(p).st_mtime_ns for p in src_files} == src_files  # the source store never written


@pytest.mark.prefect
@pytest.mark.slow
def test_the_unrefined_baseline_says_why_it_is_skipped_without_refinement(tmp_path, make_config):
    from tests.test_flow import run_factory

    cfg = make_config(tmp_path, tmp_path / "run", downstream={"baselines": ["unrefined"]})  # refine off (TINY)
    summary, _ = run_factory(cfg)
    assert "unrefined_dataset" not in summary
    assert set(summary["evaluation"]["methods"]) == {"handsoff"}
    assert "did not refine" in summary["evaluation"]["skipped"]["unrefined"]


def test_the_mirrored_pass_is_on_for_the_built_in_domain_only_unless_asked():
    from labelfoundry.config import RefineSection

    assert RefineSection().resolved_mirror("toyfaces", 10) == list(range(10))
    assert RefineSection().resolved_mirror("folder", 3) is None  # a folder's classes may be left/right ones
    assert RefineSection(mirror="on", mirror_classes=[0, 2, 1]).resolved_mirror("folder", 3) == [0, 2, 1]
    assert RefineSection(mirror="off").resolved_mirror("toyfaces", 10) is None
    with pytest.raises(ValueError, match="permutation of the 3 class ids"):
        RefineSection(mirror="on", mirror_classes=[0, 1]).resolved_mirror("folder", 3)


def test_refine_is_skipped_where_it_does_not_apply():
    from labelfoundry.config import load_config
    from tasks.refine import refine_skipped

    assert "enabled is false" in refine_skipped(load_config())  # the demo does not refine (the headline does)
    assert refine_skipped(load_config(overrides={"refine": {"enabled": True}})) is None
    why = refine_skipped(load_config(overrides={"refine": {"enabled": True}, "labeler": {"method": "labels4free"}}))
    assert why is not None and "foreground" in why


def test_refiners_train_on_every_sample_the_labeler_did_not_refuse():
    import pandas as pd

    from tasks.refine import not_refused

    m = pd.DataFrame({"sample_id": [0, 1, 2], "rejected": [False, True, False]})
    np.testing.assert_array_equal(not_refused(m), [True, False, True])
    np.testing.assert_array_equal(not_refused(m.drop(columns="rejected")), [True, True, True])  # a labeler that refuses none
