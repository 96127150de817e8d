"""Long-tail experiments (HandsOff §4.5): exact rare counts in the labeled set, targeted oversampling
in the segmenter loop, the long-tail metrics, and one tiny end-to-end `longtail` sweep."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
import torch

from labelfoundry.config import ConfigError, LabeledSection, parse_config
from labelfoundry.domains import load_labeled, pick_toyfaces, toyfaces
from labelfoundry.domains.longtail import pick_longtail
from labelfoundry.evaluation import longtail_metrics
from labelfoundry.sampling import drawn_fraction, oversample_weights
from labelfoundry.segmenters.train import TrainConfig, _batch_stream, train_segmenter

RARE = [toyfaces.CLASSES.index(c) for c in toyfaces.RARE_CLASSES]


def shows(sample, cls: str) -> bool:
    return bool((sample.mask == toyfaces.CLASSES.index(cls)).any())


def any_rare(sample) -> bool:
    return bool(np.isin(sample.mask, RARE).any())


# ------------------------------------------------------------------ exact rare counts
@pytest.mark.parametrize("cls", ["glasses", "hat"])
def test_substitution_has_exactly_k_rare_images_and_fixed_size(cls):
    prev = None
    for k in (0, 1, 3, 16):
        s = pick_longtail(16, 16, cls, k, "substitution")
        assert len(s) == 16
        assert sum(shows(x, cls) for x in s) == k
        assert sum(any_rare(x) for x in s) == k  # the others show no rare class at all
        assert not any(shows(x, c) for x in s for c in toyfaces.RARE_CLASSES if c != cls)
        assert len({x.sample_id for x in s}) == 16
        rare_ids = [x.sample_id for x in s if shows(x, cls)]
        if prev is not None:  # nested sweep: a larger k keeps the smaller k's rare images
            assert rare_ids[: len(prev)] == prev
        prev = rare_ids


def test_addition_adds_k_rare_images_to_a_fixed_base():
    base_ids = None
    for k in (0, 2, 5):
        s = pick_longtail(8, 16, "glasses", k, "addition")
        assert len(s) == 8 + k
        assert sum(shows(x, "glasses") for x in s) == k and sum(any_rare(x) for x in s) == k
        ids = [x.sample_id for x in s[:8]]
        assert not any(any_rare(x) for x in s[:8])
        base_ids = base_ids or ids
        assert ids == base_ids  # the same base images at every k


def test_picking_is_deterministic_and_goes_through_the_config():
    a = pick_longtail(16, 16, "hat", 3, "substitution", offset=100)
    b = pick_longtail(16, 16, "hat", 3, "substitution", offset=100)
    assert [x.sample_id for x in a] == [x.sample_id for x in b]
    assert all(np.array_equal(x.image, y.image) for x, y in zip(a, b))
    section = LabeledSection(num_images=16, offset=100, longtail={"cls": "hat", "k": 3, "mode": "substitution"})
    c, schema = load_labeled(section, 16)
    assert [x.sample_id for x in c] == [x.sample_id for x in a] and "hat" in schema.class_names


def test_require_rare_still_guarantees_at_least_k():
    s = pick_toyfaces(16, 16, require_rare={"glasses": 2})
    assert len(s) == 16 and sum(shows(x, "glasses") for x in s) >= 2
    section = LabeledSection(num_images=16, require_rare={"glasses": 2})
    assert [x.sample_id for x in load_labeled(section, 16)[0]] == [x.sample_id for x in s]


@pytest.mark.parametrize("labeled, needle", [
    ({"longtail": {"cls": "skin", "k": 1}}, "not a rare toy-faces class"),
    ({"longtail": {"cls": "glasses", "k": 17}}, "exceeds labeled.num_images"),
    ({"longtail": {"k": 1}, "require_rare": {"hat": 1}}, "keep one"),
    ({"source": "folder", "path": "x", "longtail": {"k": 1}}, "needs labeled.source 'toyfaces'"),
    ({"longtail": {"k": 1, "mode": "swap"}}, "labeled.longtail.mode"),
])
def test_longtail_config_errors_name_the_key(labeled, needle):
    with pytest.raises(ConfigError, match=needle):
        parse_config({"labeled": labeled})


def test_addition_k_may_exceed_num_images():
    assert parse_config({"labeled": {"num_images": 4, "longtail": {"k": 8, "mode": "addition"}}}).labeled.longtail.k == 8


# ------------------------------------------------------------------ targeted oversampling
def _manifest(n: int = 1000, glasses: int = 30, hat: int = 10) -> pd.DataFrame:
    m = pd.DataFrame({"sample_id": np.arange(n), "frac_background": 0.5, "frac_glasses": 0.0, "frac_hat": 0.0})
    m.loc[: glasses - 1, "frac_glasses"] = 0.02
    m.loc[glasses - 5 : glasses + hat - 6, "frac_hat"] = 0.05  # 5 samples show both
    return m


def test_oversampling_hits_the_target_fraction_when_drawing():
    m = _manifest()
    w = oversample_weights(m, {"glasses": 0.25})
    assert drawn_fraction(m, w, "glasses") == pytest.approx(0.25)
    draws = torch.multinomial(torch.as_tensor(w), 20_000, replacement=True, generator=torch.Generator().manual_seed(0))
    share = (m["frac_glasses"].to_numpy()[draws.numpy()] > 0).mean()
    assert abs(share - 0.25) < 0.015  # ~5 standard deviations at n = 20k
    both = oversample_weights(m, {"glasses": 0.3, "hat": 0.2})
    assert drawn_fraction(m, both, "glasses") == pytest.approx(0.3, abs=1e-4)
    assert drawn_fraction(m, both, "hat") == pytest.approx(0.2, abs=1e-4)


def test_oversampling_errors_on_unknown_class_and_warns_when_unreachable():
    m = _manifest()
    with pytest.raises(ValueError, match=r"unknown class 'glases'.*valid classes: \['background', 'glasses', 'hat'\]"):
        oversample_weights(m, {"glases": 0.2})
    none = _manifest(glasses=0, hat=0)
    with pytest.warns(RuntimeWarning, match="no training sample contains 'glasses'"):
        w = oversample_weights(none, {"glasses": 0.2})
    assert np.allclose(w, 1 / len(none))  # falls back to uniform draws


class _Marked(torch.utils.data.Dataset):
    """16x16 items whose label is 1 everywhere for 'rare' items (ids < n_rare), else 0."""

    def __init__(self, n: int = 40, n_rare: int = 2) -> None:
        self.n, self.n_rare = n, n_rare

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict:
        rare = int(i < self.n_rare)
        g = torch.Generator().manual_seed(i)
        return {"image": torch.randint(0, 255, (3, 16, 16), generator=g, dtype=torch.uint8),
                "label": torch.full((16, 16), rare, dtype=torch.int64)}


def test_training_loop_draws_by_the_weights():
    data = _Marked()
    m = pd.DataFrame({"frac_rare": [1.0 if i < data.n_rare else 0.0 for i in range(data.n)]})
    w = oversample_weights(m, {"rare": 0.5})
    stream = _batch_stream(data, TrainConfig(batch_size=8, seed=0), 0, torch.as_tensor(w))
    labels = torch.cat([next(stream)["label"][:, 0, 0] for _ in range(200)])
    assert abs(float(labels.float().mean()) - 0.5) < 0.05  # 1,600 draws; uniform would give 0.05
    with pytest.raises(ValueError, match="one per item"):
        train_segmenter(torch.nn.Conv2d(3, 2, 1), data, TrainConfig(max_steps=1), task="segmentation",
                        out_dir="unused", sample_weights=w[:-1])


def test_weighted_training_resumes_exactly(tmp_path):
    from labelfoundry.segmenters.models import SegmenterConfig, build_segmenter

    def tiny():
        torch.manual_seed(0)
        return build_segmenter(SegmenterConfig(arch="tiny_unet", task="segmentation", tiny_width=8, num_classes=2))

    data = _Marked(12, 1)
    w = oversample_weights(pd.DataFrame({"frac_rare": [1.0] + [0.0] * 11}), {"rare": 0.5})
    cfg = TrainConfig(batch_size=4, max_steps=5, checkpoint_every=2, keep_last=0)
    full = train_segmenter(tiny(), data, cfg, task="segmentation", out_dir=tmp_path / "a", device="cpu", sample_weights=w)
    train_segmenter(tiny(), data, cfg.model_copy(update={"max_steps": 3}), task="segmentation",
                    out_dir=tmp_path / "b", device="cpu", sample_weights=w)
    resumed = train_segmenter(tiny(), data, cfg, task="segmentation", out_dir=tmp_path / "b", device="cpu", sample_weights=w)
    assert resumed.resumed_from == 3 and resumed.losses == full.losses
    uniform = train_segmenter(tiny(), data, cfg, task="segmentation", out_dir=tmp_path / "c", device="cpu")
    assert uniform.losses != full.losses


# ------------------------------------------------------------------ long-tail metrics
def test_longtail_metrics_on_hand_computed_numbers():
    names = ["background", "skin", "eyes", "glasses", "hat"]
    iou = [0.9, 0.6, float("nan"), 0.2, 0.0]
    m = longtail_metrics(iou, names, ["glasses"])
    assert m["long_tail_iou"] == pytest.approx(0.2)
    assert m["non_long_tail_miou"] == pytest.approx((0.9 + 0.6 + 0.0) / 3)  # NaN left out
    assert m["miou"] == pytest.approx((0.9 + 0.6 + 0.2 + 0.0) / 4)
    m = longtail_metrics([0.9, 0.6, None, 0.2, 0.0], names, ["glasses"], ignore=["hat"])
    assert m["non_long_tail_miou"] == pytest.approx(0.75) and m["miou"] == pytest.approx(0.425)
    assert longtail_metrics(iou, names, ["eyes"])["long_tail_iou"] is None
    assert longtail_metrics(iou, names, ["glasses", "hat"])["long_tail_iou"] == pytest.approx(0.1)
    with pytest.raises(ValueError, match="unknown classes"):
        longtail_metrics(iou, names, ["glases"])


# ------------------------------------------------------------------ the CLI
def test_cli_longtail_passes_its_options_and_validates_first(tmp_path, monkeypatch):
    import yaml
    from typer.testing import CliRunner

    import flows.cli
    import flows.longtail

    calls = []

    def fake_longtail(**kw):
        calls.append(kw)
        root = tmp_path / "longtail"
        root.mkdir(exist_ok=True)
        (root / f"{kw['cls']}-{kw['mode']}.md").write_text("| k | method |")
        return {"settings": [{"run_dir": str(root / "x-k0")}]}

    monkeypatch.setattr(flows.longtail, "longtail", fake_longtail)
    monkeypatch.setattr(flows.cli, "configure_prefect_env", lambda: None)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({"name": "x"}))
    run = lambda *a: CliRunner().invoke(flows.cli.app, ["longtail", str(cfg), *a])  # noqa: E731
    res = run("--cls", "hat", "--mode", "addition", "--ks", "0,2,8", "--oversample", "0.3", "--set", "generate.num_samples=9")
    assert res.exit_code == 0, res.output
    assert calls == [{"config": str(cfg), "overrides": {"generate": {"num_samples": 9}}, "cls": "hat", "mode": "addition",
                      "ks": [0, 2, 8], "oversample": 0.3, "drop_top": 0.0}]
    for bad, needle in ((["--cls", "skin"], "not a rare toy-faces class"), (["--ks", "0,20"], "exceeds labeled.num_images"),
                        (["--ks", "a"], "comma-separated"), (["--set", "generate.num_samplez=1"], "generate.num_samplez"),
                        (["--mode", "swap"], "labeled.longtail.mode"), (["--oversample", "1.5"], "downstream.oversample")):
        res = run(*bad)
        assert res.exit_code == 2 and needle in " ".join(res.output.split()), res.output
    assert len(calls) == 1


# ------------------------------------------------------------------ end to end
@pytest.mark.slow
@pytest.mark.prefect
def test_longtail_flow_tiny_sweep(tmp_path, make_config):
    from flows.longtail import longtail

    run_dir = tmp_path / "run"
    cfg = make_config(tmp_path, run_dir, generate={"num_samples": 32, "samples_per_shard": 16, "batch": 16},
                      downstream={"max_steps": 3, "test_images": 8, "oracle_images": 16})
    result = longtail(config=str(cfg), cls="glasses", mode="substitution", ks=[0, 1], oversample=0.5)
    root = run_dir.resolve() / "longtail"
    for k in (0, 1):
        labeled = np.load(root / f"glasses-substitution-k{k}" / "invert" / "labeled.npz")
        assert len(labeled["mask"]) == 4
        assert sum(bool((m == toyfaces.CLASSES.index("glasses")).any()) for m in labeled["mask"]) == k
    data = json.loads((root / "glasses-substitution.json").read_text())
    methods = ["HandsOff", "HandsOff+oversample", "labeled-only"]
    assert sorted((r["k"], r["method"]) for r in data["rows"]) == sorted((k, m) for k in (0, 1) for m in methods)
    assert data == json.loads(json.dumps(result))
    assert data["oracle"] is not None and data["ignored_classes"] == ["hat"]
    for r in data["rows"]:
        assert r["miou"] is None or 0 <= r["miou"] <= 1
        assert r["non_long_tail_miou"] is None or not math.isnan(r["non_long_tail_miou"])
    md = (root / "glasses-substitution.md").read_text()
    table_rows = [line for line in md.splitlines() if line.startswith("| ") and line.split("|")[1].strip() in ("0", "1")
                  and line.split("|")[2].strip() in methods]
    assert len(table_rows) == 6
    png = root / "glasses-substitution.png"
    assert png.stat().st_size > 1000 and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the oracle was trained once: only the first setting has it
    assert "oracle" in json.loads((root / "glasses-substitution-k0" / "metrics.json").read_text())["methods"]
    assert "oracle" not in json.loads((root / "glasses-substitution-k1" / "metrics.json").read_text())["methods"]
