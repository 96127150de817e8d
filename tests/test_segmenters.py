"""Downstream segmenters: model shapes, training, checkpoint/resume, augmentation."""

from __future__ import annotations

import logging

import pytest
import torch
from torch.utils.data import Dataset

from labelfoundry.segmenters.augment import augment_batch
from labelfoundry.segmenters.checkpoint import latest_checkpoint, list_checkpoints, load_checkpoint
from labelfoundry.segmenters.heatmaps import keypoint_heatmaps
from labelfoundry.segmenters.metrics import evaluate_segmenter
from labelfoundry.segmenters.models import SegmenterConfig, build_segmenter
from labelfoundry.segmenters.train import TrainConfig, train_segmenter

S = 32


class SquareDataset(Dataset):
    """n noisy 32x32 images, each with a bright square (class 1) on a dark background."""

    def __init__(self, n: int = 16, task: str = "segmentation", seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.items = []
        for _ in range(n):
            x0, y0 = torch.randint(0, S - 12, (2,), generator=g).tolist()
            side = int(torch.randint(8, 12, (1,), generator=g))
            mask = torch.zeros(S, S, dtype=torch.int64)
            mask[y0 : y0 + side, x0 : x0 + side] = 1
            noise = torch.randint(0, 60, (3, S, S), generator=g)
            image = (noise + 150 * mask).clamp(0, 255).to(torch.uint8)
            item = {"image": image}
            if task == "segmentation":
                item["label"] = mask
            elif task == "keypoints":
                kps = torch.tensor(
                    [[x0, y0, 1.0], [x0 + side - 1, y0 + side - 1, 1.0], [0.0, 0.0, 0.0]]
                )
                item["label"] = keypoint_heatmaps(kps, S, S, sigma=2.0)
                item["keypoints"] = kps
            else:
                item["label"] = 5.0 + 10.0 * mask.float()
                item["valid"] = torch.rand(S, S, generator=g) > 0.1
            self.items.append(item)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        return self.items[i]


def _tiny(task: str = "segmentation", **kw) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_segmenter(SegmenterConfig(arch="tiny_unet", task=task, tiny_width=8, **kw))


# ---------------------------------------------------------------------- models


def test_tiny_unet_output_shape_any_size():
    model = _tiny(num_classes=3).eval()
    assert model(torch.zeros(2, 3, 30, 34)).shape == (2, 3, 30, 34)


def test_deeplabv3_resnet50_shape_and_no_download(caplog, tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))  # empty local cache
    with caplog.at_level(logging.WARNING):
        model = build_segmenter(
            SegmenterConfig(arch="deeplabv3_resnet50", task="segmentation", num_classes=5)
        ).eval()
    assert "resnet50-" in caplog.text and "RANDOM" in caplog.text
    with torch.no_grad():
        assert model(torch.zeros(1, 3, S, S)).shape == (1, 5, S, S)


def _fake_hub_resnet(hub, monkeypatch, depth: int, conv1_value: float) -> None:
    """A torchvision-named ResNet file in a local hub cache, its conv1 filled to recognise it."""
    import torchvision

    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(hub))
    fake = getattr(torchvision.models, f"resnet{depth}")().state_dict()
    fake["conv1.weight"].fill_(conv1_value)
    name = getattr(torchvision.models, f"ResNet{depth}_Weights").IMAGENET1K_V1.url.rsplit("/", 1)[-1]
    (hub / "checkpoints").mkdir()
    torch.save(fake, hub / "checkpoints" / name)


def test_deeplab_loads_backbone_from_local_cache(tmp_path, monkeypatch):
    """A file in <hub>/checkpoints named like torchvision's is picked up (faked, resnet50)."""
    _fake_hub_resnet(tmp_path, monkeypatch, 50, 0.125)
    model = build_segmenter(SegmenterConfig(arch="deeplabv3_resnet50", num_classes=2))
    assert torch.all(model.net.backbone.conv1.weight == 0.125)


@pytest.mark.parametrize("task,channels", [("segmentation", 4), ("keypoints", 3), ("depth", 1)])
def test_smp_unet_heads_and_padding(task, channels):
    cfg = SegmenterConfig(
        arch="unet", task=task, num_classes=4, num_keypoints=3, pretrained_backbone=False
    )
    model = build_segmenter(cfg).eval()
    with torch.no_grad():
        assert model(torch.zeros(1, 3, 40, 36)).shape == (1, channels, 40, 36)


def test_keypoint_task_needs_keypoints():
    with pytest.raises(ValueError):
        SegmenterConfig(task="keypoints", num_keypoints=0)


# -------------------------------------------------------------------- training


def test_tiny_unet_loss_falls_and_learns_square(tmp_path):
    data = SquareDataset(16)
    model = _tiny(num_classes=2)
    cfg = TrainConfig(batch_size=8, max_steps=40, checkpoint_every=100, lr=1e-2)
    res = train_segmenter(model, data, cfg, task="segmentation", out_dir=tmp_path, device="cpu")
    assert res.step == 40 and len(res.losses) == 40
    assert sum(res.losses[-5:]) / 5 < 0.5 * sum(res.losses[:5]) / 5
    assert res.last_checkpoint == latest_checkpoint(tmp_path)  # final checkpoint written
    metrics = evaluate_segmenter(model, data, "segmentation", 2, "cpu")
    assert metrics["miou"] > 0.5


@pytest.mark.parametrize("task", ["keypoints", "depth"])
def test_continuous_tasks_train(task, tmp_path):
    data = SquareDataset(8, task=task)
    model = _tiny(task, num_keypoints=3)
    cfg = TrainConfig(batch_size=4, max_steps=6, checkpoint_every=100, lr=1e-2)
    res = train_segmenter(model, data, cfg, task=task, out_dir=tmp_path, device="cpu",
                          val_data=data)
    assert all(torch.isfinite(torch.tensor(res.losses)))
    assert res.losses[-1] < res.losses[0]
    assert res.val_metrics and res.val_metrics[-1]["step"] == 6


def test_checkpoint_resume_is_exact(tmp_path):
    data = SquareDataset(12)
    cfg = TrainConfig(batch_size=4, max_steps=5, checkpoint_every=2, keep_last=0, hflip=True,
                      flip_permutation=[0, 1], color_jitter=0.1)
    ref = _tiny(num_classes=2)
    full = train_segmenter(ref, data, cfg, task="segmentation", out_dir=tmp_path / "a",
                           device="cpu")
    assert [int(p.stem[5:]) for p in list_checkpoints(tmp_path / "a")] == [2, 4, 5]

    part = train_segmenter(_tiny(num_classes=2), data, cfg.model_copy(update={"max_steps": 3}),
                           task="segmentation", out_dir=tmp_path / "b", device="cpu")
    assert part.step == 3 and part.losses == full.losses[:3]
    torch.manual_seed(123)  # disturb global RNG; resume must restore it
    resumed_model = _tiny(num_classes=2)
    torch.manual_seed(456)
    resumed = train_segmenter(resumed_model, data, cfg, task="segmentation",
                              out_dir=tmp_path / "b", device="cpu")
    assert resumed.resumed_from == 3 and resumed.step == 5
    assert resumed.losses == full.losses
    for (k, a), b in zip(ref.state_dict().items(), resumed_model.state_dict().values()):
        assert torch.equal(a, b), k
    sa = load_checkpoint(latest_checkpoint(tmp_path / "a"))  # weights_only=True
    sb = load_checkpoint(latest_checkpoint(tmp_path / "b"))
    assert sa["step"] == sb["step"] == 5
    assert torch.equal(sa["rng"]["torch"], sb["rng"]["torch"])
    assert torch.equal(sa["rng"]["aug"], sb["rng"]["aug"])


@pytest.mark.parametrize("channels_last", [True, False])
def test_memory_format_is_the_configured_one_and_learns(tmp_path, channels_last):
    data = SquareDataset(8)
    model = _tiny(num_classes=2)
    cfg = TrainConfig(batch_size=4, max_steps=6, checkpoint_every=100, lr=1e-2, channels_last=channels_last)
    res = train_segmenter(model, data, cfg, task="segmentation", out_dir=tmp_path, device="cpu")
    convs = [p for p in model.parameters() if p.dim() == 4 and p.shape[-1] > 1]
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    assert convs and all(p.is_contiguous(memory_format=fmt) for p in convs)
    assert res.losses[-1] < res.losses[0]
    reloaded = _tiny(num_classes=2)  # a checkpoint loads into a fresh (contiguous) model either way
    reloaded.load_state_dict(load_checkpoint(latest_checkpoint(tmp_path))["model"])
    x = torch.randn(2, 3, 16, 16)
    torch.testing.assert_close(reloaded.eval()(x), model.eval()(x), rtol=1e-4, atol=1e-5)


def test_finetune_is_a_second_call(tmp_path):
    model = _tiny(num_classes=2)
    cfg = TrainConfig(batch_size=4, max_steps=2, checkpoint_every=100)
    train_segmenter(model, SquareDataset(8), cfg, task="segmentation", out_dir=tmp_path,
                    device="cpu")
    ft = train_segmenter(model, SquareDataset(4, seed=1), cfg, task="segmentation",
                         out_dir=tmp_path / "finetune", device="cpu")
    assert ft.resumed_from == 0 and ft.step == 2


def test_hflip_opt_in_swaps_left_right_classes():
    x = torch.zeros(1, 3, 2, 4)
    x[..., 0] = 1.0
    label = torch.tensor([[[1, 0, 0, 2], [1, 255, 0, 2]]])  # 1 = left thing, 2 = right thing
    g = torch.Generator().manual_seed(0)
    targets = {"label": label.clone()}
    assert torch.equal(augment_batch(x, targets, "segmentation", g), x)  # default: no flip
    assert torch.equal(targets["label"], label)
    flipped = None
    for _ in range(20):  # p=0.5 per call
        targets = {"label": label.clone()}
        out = augment_batch(x, targets, "segmentation", g, hflip=True,
                            flip_permutation=[0, 2, 1])
        if not torch.equal(out, x):
            flipped = (out, targets["label"])
            break
    assert flipped is not None
    assert torch.equal(flipped[0][..., 3], x[..., 0])
    assert flipped[1].tolist() == [[[1, 0, 0, 2], [1, 0, 255, 2]]]


def test_blur_and_noise_leave_labels_and_stay_in_range():
    g = torch.Generator().manual_seed(0)
    x = torch.zeros(64, 3, 16, 16)
    x[..., 8:] = 1.0  # a vertical edge
    label = torch.zeros(64, 16, 16, dtype=torch.int64)
    label[..., 8:] = 1
    targets = {"label": label.clone()}
    out = augment_batch(x, targets, "segmentation", g, blur_sigma=1.0)
    assert torch.equal(targets["label"], label)  # degradations never touch the labels
    blurred = ~(out == x).all(dim=(1, 2, 3))
    assert 16 <= int(blurred.sum()) <= 48  # about half the samples
    assert torch.equal(out[~blurred], x[~blurred])
    edge = out[blurred][..., 0, 8, 7]  # the pixel left of the edge takes some of its right neighbour
    assert bool((edge > 0).all()) and bool((edge < 0.5).all())
    noisy = augment_batch(x, {"label": label.clone()}, "segmentation", g, pixel_noise=0.1)
    assert noisy.min() >= -1 and noisy.max() <= 1
    resid = (noisy - x)[..., :8]  # away from the clamp at +1
    std = resid.flatten(1).std(1)
    assert float(std.max()) <= 0.12 and float(std.mean()) > 0.03  # per-sample std drawn in [0, 0.1]
    again = augment_batch(x, {"label": label.clone()}, "segmentation", torch.Generator().manual_seed(0), blur_sigma=1.0)
    assert torch.equal(again, out)  # the generator decides everything


@pytest.mark.skipif(not torch.cuda.is_available(), reason="AMP runs on CUDA only")
@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_amp_on_cuda(amp, tmp_path):
    model = _tiny(num_classes=2)
    cfg = TrainConfig(batch_size=8, max_steps=4, checkpoint_every=2, amp=amp, lr=1e-2)
    res = train_segmenter(model, SquareDataset(16), cfg, task="segmentation",
                          out_dir=tmp_path, device="cuda")
    assert all(torch.isfinite(torch.tensor(res.losses)))
    assert "scale" in load_checkpoint(latest_checkpoint(tmp_path))["scaler"] or amp == "bf16"


def test_dataloader_input_and_segmentation_validation(tmp_path):
    from torch.utils.data import DataLoader

    data = SquareDataset(8)
    loader = DataLoader(data, batch_size=4, shuffle=False)
    cfg = TrainConfig(max_steps=3, checkpoint_every=2, keep_last=0)
    full = train_segmenter(_tiny(num_classes=2), loader, cfg, task="segmentation",
                           out_dir=tmp_path / "a", device="cpu", val_data=data)
    assert full.steps_per_epoch == 2 and 0 <= full.val_metrics[-1]["miou"] <= 1
    train_segmenter(_tiny(num_classes=2), loader, cfg.model_copy(update={"max_steps": 2}),
                    task="segmentation", out_dir=tmp_path / "b", device="cpu")
    resumed = train_segmenter(_tiny(num_classes=2), loader, cfg, task="segmentation",
                              out_dir=tmp_path / "b", device="cpu")
    assert resumed.resumed_from == 2 and resumed.losses == full.losses


def test_imagenet_weights_file_names_the_file_to_place(tmp_path, monkeypatch):
    import torchvision

    from labelfoundry.segmenters.models import imagenet_weights_file

    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    found, expected = imagenet_weights_file("deeplabv3_resnet101")
    name = torchvision.models.ResNet101_Weights.IMAGENET1K_V1.url.rsplit("/", 1)[-1]
    assert found is None and expected == tmp_path / "checkpoints" / name
    expected.parent.mkdir()
    expected.write_bytes(b"x")
    assert imagenet_weights_file("deeplabv3_resnet101")[0] == expected
    assert imagenet_weights_file("unet", "resnet18")[1].name.startswith("resnet18-")
    with pytest.raises(ValueError, match="no ImageNet backbone"):
        imagenet_weights_file("tiny_unet")


def test_smp_unet_loads_its_resnet_encoder_from_local_cache(tmp_path, monkeypatch):
    """Regression: smp's encoder load_state_dict returns None, which crashed the key check."""
    _fake_hub_resnet(tmp_path, monkeypatch, 18, 0.25)
    model = build_segmenter(SegmenterConfig(arch="unet", num_classes=2, unet_encoder="resnet18"))
    assert torch.all(model.net.encoder.conv1.weight == 0.25)


@pytest.mark.parametrize("ok", [True, False])
def test_bf16_autocast_on_cpu_follows_bf16_autocast_ok(ok, tmp_path, monkeypatch):
    import labelfoundry.segmenters.train as train_mod

    monkeypatch.setattr(train_mod, "bf16_autocast_ok", lambda device: ok)
    amp = train_mod.autocast_settings("bf16", torch.device("cpu"))
    assert amp.enabled is ok and amp.dtype == torch.bfloat16
    assert not train_mod.autocast_settings("fp16", torch.device("cpu")).enabled  # fp16: CUDA only
    assert not train_mod.autocast_settings("none", torch.device("cpu")).enabled
    seen = []
    model = _tiny(num_classes=2)
    model.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    cfg = TrainConfig(batch_size=8, max_steps=15, checkpoint_every=100, lr=1e-2)
    res = train_segmenter(model, SquareDataset(16), cfg, task="segmentation", out_dir=tmp_path, device="cpu")
    assert set(seen) == {torch.bfloat16 if ok else torch.float32}
    assert all(torch.isfinite(torch.tensor(res.losses))) and res.losses[-1] < res.losses[0]


def test_seeded_build_ignores_and_keeps_the_global_rng():
    cfg = SegmenterConfig(arch="tiny_unet", tiny_width=8)
    torch.manual_seed(1)
    a = build_segmenter(cfg, seed=3)
    state = torch.get_rng_state()
    torch.manual_seed(2)
    b = build_segmenter(cfg, seed=3)
    c = build_segmenter(cfg, seed=4)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert not all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), c.state_dict().values()))
    torch.manual_seed(1)
    assert torch.equal(torch.get_rng_state(), state)  # the seeded build drew nothing from the global RNG


def test_epoch_orders_of_distinct_seeds_do_not_overlap():
    from labelfoundry.segmenters.train import epoch_seed

    seeds = {epoch_seed(s, e) for s in range(3) for e in range(1000)}
    assert len(seeds) == 3000 and epoch_seed(0, 5) == 5


def test_training_progress_reaches_the_callback_with_totals(tmp_path, caplog):
    """Every log_every steps and at the last step, to the caller's callback (the flow's run logger)
    or, without one, as a readable line on this module's logger."""
    data = SquareDataset(8)
    cfg = TrainConfig(batch_size=4, max_steps=5, log_every=2, checkpoint_every=100)
    seen: list[dict] = []
    res = train_segmenter(_tiny(num_classes=2), data, cfg, task="segmentation", out_dir=tmp_path / "a", device="cpu",
                          progress=seen.append)
    assert [(d["step"], d["steps"]) for d in seen] == [(2, 5), (4, 5), (5, 5)]
    assert seen[-1]["loss"] == res.losses[-1] and seen[-1]["seconds"] >= seen[0]["seconds"] >= 0
    with caplog.at_level(logging.INFO, logger="labelfoundry.segmenters.train"):
        train_segmenter(_tiny(num_classes=2), data, cfg, task="segmentation", out_dir=tmp_path / "b", device="cpu")
    lines = [r.getMessage() for r in caplog.records if r.name == "labelfoundry.segmenters.train"]
    assert len(lines) == 3 and lines[-1].startswith("step 5/5 loss ") and lines[-1].endswith(" s)")
