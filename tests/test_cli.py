"""The `labelfoundry` tools around the main job: verify, show, sample (typer CliRunner, in process).

The dataset is written directly with storage.ShardStore (same format the flow writes, no Prefect).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

SCHEMA = {"class_names": ["background", "skin", "hair"], "colors": [[0, 0, 0], [230, 180, 140], [120, 60, 20]]}


def invoke(*args):
    from flows.cli import app

    return CliRunner().invoke(app, [str(a) for a in args])


def text(res) -> str:
    """The command's output with Rich's line wrapping undone."""
    return " ".join(res.output.split())


def exited_cleanly(res) -> bool:
    """Exited through typer.Exit / normal return, not by an unhandled exception."""
    return res.exception is None or isinstance(res.exception, SystemExit)



@pytest.fixture
def dataset(tmp_path) -> Path:
    """12 samples of 16x16 in 3 shards, with uncertainty, latents and filter flags."""
    import pandas as pd

    import storage

    path = tmp_path / "ds"
    store = storage.ShardStore.create(
        str(path), num_samples=12, image_shape=(16, 16), label_shape=(16, 16), label_dtype="uint8",
        schema=SCHEMA, samples_per_shard=4, with_uncertainty=True, w_shape=(2, 8),
    )
    rng = np.random.default_rng(0)
    for i in range(store.num_shards):
        n = len(store.shard_range(i))
        arrays = {
            "image": rng.integers(0, 256, (n, 16, 16, 3), dtype=np.uint8),
            "label": rng.integers(0, 3, (n, 16, 16), dtype=np.uint8),
            "uncertainty": rng.random((n, 16, 16)).astype(np.float16),
            "w": rng.normal(size=(n, 2, 8)).astype(np.float32),
        }
        store.write_shard(i, arrays, {"seed": np.arange(n) + 4 * i, "score": rng.random(n), "score_top10": rng.random(n)})
    m = store.manifest()
    store.write_flags(pd.DataFrame({"sample_id": m["sample_id"], "keep": m["score"] < 0.8}), name="default")
    return path


def flip_bytes(path: Path, n: int = 8) -> None:
    data = bytearray(path.read_bytes())
    mid = len(data) // 2
    for k in range(mid, min(mid + n, len(data))):
        data[k] ^= 0xFF
    path.write_bytes(bytes(data))


def test_verify_good_dataset_exits_0(dataset):
    res = invoke("verify", dataset)
    assert res.exit_code == 0 and exited_cleanly(res), res.output
    assert "3 committed shard(s) checked, 0 bad, 0 uncommitted of 3" in text(res)


@pytest.mark.parametrize("array", ["image", "label", "uncertainty"])
def test_verify_corrupted_shard_file_exits_1(dataset, array):
    import storage

    shard_file = Path(storage.ShardStore.open(str(dataset)).shard_file(array, 1))
    assert shard_file.is_file()
    flip_bytes(shard_file)
    assert storage.verify(str(dataset)).bad_shards == [1]
    res = invoke("verify", dataset)
    assert res.exit_code == 1, res.output


def test_verify_missing_shard_file_exits_1(dataset):
    import storage

    Path(storage.ShardStore.open(str(dataset)).shard_file("label", 2)).unlink()
    assert storage.verify(str(dataset)).bad_shards == [2]
    assert invoke("verify", dataset).exit_code == 1


def test_verify_prints_the_bad_shard_and_its_file(dataset):
    import storage

    shard_file = Path(storage.ShardStore.open(str(dataset)).shard_file("image", 1))
    flip_bytes(shard_file)
    res = invoke("verify", dataset)
    assert res.exit_code == 1 and exited_cleanly(res), repr(res.exception)
    out = text(res)
    assert "1 bad" in out and "shard 1:" in out and "shard 0:" not in out
    assert str(shard_file) in res.output.replace("\n", "")


def assert_png(path: Path, min_size: int = 16) -> tuple[int, int]:
    assert path.is_file()
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(path) as im:
        im.load()
        assert min(im.size) >= min_size
        return im.size


def test_show_writes_a_png_grid(dataset, tmp_path):
    out = tmp_path / "x.png"
    res = invoke("show", dataset, "--out", out, "--n", 4)
    assert res.exit_code == 0, res.output
    w, h = assert_png(out)
    assert h >= 4 * 16  # one row per sample
    assert "12 committed of 12 samples in 3 shards" in text(res)
    assert "kept by filter" in text(res)


def test_sample_writes_a_png_grid(tiny_generator, tmp_path):
    out = tmp_path / "g.png"
    res = invoke("sample", tiny_generator, "--n", 4, "--out", out, "--real")
    assert res.exit_code == 0, res.output
    assert_png(out)
    assert_png(tmp_path / "g-real.png")
    with Image.open(out) as im:
        first = np.asarray(im.convert("RGB"))
    res = invoke("sample", tiny_generator, "--n", 4, "--out", tmp_path / "g2.png")  # seeded: same grid
    assert res.exit_code == 0, res.output
    with Image.open(tmp_path / "g2.png") as im:
        assert np.array_equal(first, np.asarray(im.convert("RGB")))


def test_headline_table_has_the_variants_trained_and_a_reason_without_a_gap():
    from flows.cli import headline
    from labelfoundry.evaluation import summarize_seeds

    def summary(**miou):  # one seed per method, as the evaluate stage writes it
        return {"evaluation": {"methods": {m: summarize_seeds([{"miou": v, "per_class_iou": [v]}]) for m, v in miou.items()}}}

    s16 = summary(handsoff=0.30, unfiltered=0.33, unrefined=0.29, finetuned=0.41, labeled_only=0.40, oracle=0.54)
    s50 = summary(handsoff=0.32, unfiltered=0.30, labeled_only=0.58)  # no finetuned run: an empty cell
    rows = [r for r in headline(s16, s50).splitlines() if r.startswith("| 16") or r.startswith("| 50")]
    cells16, cells50 = [c.strip() for c in rows[0].split("|")[1:-1]], [c.strip() for c in rows[1].split("|")[1:-1]]
    assert cells16[3] == "0.290" and cells16[4] == "0.410" and float(cells16[-1]) == pytest.approx(1 / 14, abs=1e-3)
    assert float(cells16[-2]) == pytest.approx(-10 / 14, abs=1e-3)
    assert cells50[3] == "—" and cells50[-1] == "—" and cells50[-2].startswith("undefined: labeled-only (0.580) already reaches the oracle")

    three = {"evaluation": {"methods": {m: summarize_seeds([{"miou": v + d, "per_class_iou": [v]} for d in (-0.01, 0, 0.01)])
                                       for m, v in dict(handsoff=0.5, unfiltered=0.4, labeled_only=0.4, oracle=0.6).items()}}}
    table = headline(three, three)
    row = [c.strip() for c in table.splitlines()[2].split("|")[1:-1]]
    assert row[1] == "0.500 ± 0.010" and row[5] == "0.500 ± 0.000"  # mean ± std over seeds; seed-paired gap
    assert "unrefined" not in table and "fine-tune" not in table  # neither run trained them: no empty columns


def test_train_generator_takes_the_batch_and_snapshot_schedule(tmp_path):
    """--batch and --snapshot-kimg reach the run: 64 images at 16 per step are 4 steps, a snapshot is
    kept (named by whole kimg, so these small ones share one name), the exported file records the
    batch and leaves G_ema's half-life to scale with it; --export copies the final G_ema + D."""
    import json

    import torch
    from safetensors import safe_open

    out, exported = tmp_path / "gen", tmp_path / "final.safetensors"
    res = invoke("train-generator", "--out", out, "--kimg", 0.064, "--batch", 16, "--snapshot-kimg", 0.016,
                 "--device", "cpu", "--export", exported)
    assert res.exit_code == 0, res.output
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    assert (state["step"], state["nimg"]) == (4, 64)
    with safe_open(str(exported), "pt") as f:
        extra = json.loads(f.metadata()["extra"])
    assert extra["kimg"] == 0.064 and extra["train_config"]["batch"] == 16
    assert extra["train_config"]["ema_kimg"] is None  # the default: scaled with the batch
    assert sorted(p.name for p in out.glob("generator-*k.safetensors")) == ["generator-000000k.safetensors"]
