"""Generator training: the bf16 step agrees with fp32, and a resumed run continues the same run."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from labelfoundry.generators.train import (
    GeneratorTrainConfig, _real_batch, build_state, d_loss, g_loss, init_from_export, load_state, save_state, train_generator,
    train_step,
)

TINY = GeneratorTrainConfig(resolution=16, z_dim=16, w_dim=16, map_layers=2, channel_base=128, channel_max=16,
                            d_channel_base=64, batch=4, real_pool=100, r1_interval=1)
DEV = torch.device("cpu")


def test_bf16_losses_match_fp32_within_tolerance(one_thread):
    """Same networks, same batch: bf16 autocast moves D's loss (R1 included, r1_interval=1) and G's
    loss by less than 0.05 absolute (they are ~1.4 and ~0.7 at init)."""
    st = build_state(TINY, DEV)
    real = _real_batch(TINY, np.random.default_rng(0), DEV)
    z = torch.randn(TINY.batch, TINY.z_dim, generator=torch.Generator().manual_seed(1))
    losses = {}
    for amp in (False, True):
        ld = d_loss(st, TINY, real, z, torch.Generator().manual_seed(2), amp)
        lg = g_loss(st, TINY, z, torch.Generator().manual_seed(3), amp)
        assert ld.dtype == lg.dtype == torch.float32 and torch.isfinite(ld) and torch.isfinite(lg)
        losses[amp] = (ld.item(), lg.item())
    assert losses[True][0] == pytest.approx(losses[False][0], abs=0.05)
    assert losses[True][1] == pytest.approx(losses[False][1], abs=0.05)
    assert losses[True] != losses[False]  # autocast really changed the arithmetic


def test_bf16_training_steps_run_and_track_fp32(one_thread):
    """Three full steps (D, R1, G, EMA) from the same init in each precision: finite, close losses."""
    runs = {}
    for amp in (False, True):
        st = build_state(TINY, DEV)
        runs[amp] = [tuple(x.item() for x in train_step(st, TINY, DEV, amp)) for _ in range(3)]
        assert st.step == 3 and st.nimg == 3 * TINY.batch
    for (d32, g32), (d16, g16) in zip(runs[False], runs[True]):
        assert d16 == pytest.approx(d32, abs=0.1) and g16 == pytest.approx(g32, abs=0.1)


def test_resume_continues_the_same_run(tmp_path, one_thread):
    straight = build_state(TINY, DEV)
    for _ in range(2):
        train_step(straight, TINY, DEV, amp=False)
    first = build_state(TINY, DEV)
    train_step(first, TINY, DEV, amp=False)
    save_state(first, TINY, tmp_path)
    resumed = build_state(TINY.model_copy(update={"seed": 0}), DEV)
    load_state(resumed, tmp_path / "checkpoint.pt", DEV)
    assert resumed.step == 1
    train_step(resumed, TINY, DEV, amp=False)
    for a, b in zip(straight.G_ema.state_dict().values(), resumed.G_ema.state_dict().values()):
        assert torch.equal(a, b)
    assert (tmp_path / "generator.safetensors").is_file()


def test_lr_ramp_down_is_constant_then_cosine_to_the_final_rate():
    cfg = TINY.model_copy(update={"lr": 0.002, "total_kimg": 10.0, "lr_decay_from_kimg": 6.0, "lr_final": 0.25})
    assert cfg.lr_at(0) == cfg.lr_at(6000) == pytest.approx(0.002)
    assert cfg.lr_at(8000) == pytest.approx(0.002 * (0.25 + 0.75 * 0.5))  # halfway down the cosine
    assert cfg.lr_at(10_000) == cfg.lr_at(12_000) == pytest.approx(0.0005)
    rates = [cfg.lr_at(n) for n in range(6000, 10_001, 250)]
    assert all(a > b for a, b in zip(rates, rates[1:]))
    assert TINY.lr_at(10**9) == TINY.lr  # no schedule: constant


def test_resumed_run_takes_the_new_schedule_over_the_checkpoints_rate(tmp_path, one_thread):
    """A checkpoint written at the constant rate, resumed with a ramp-down already under way: the
    optimisers step at the scheduled rates (D's with the lazy-R1 correction), not the stored ones."""
    st = build_state(TINY, DEV)
    train_step(st, TINY, DEV, amp=False)
    save_state(st, TINY, tmp_path)
    decay = TINY.model_copy(update={"total_kimg": 0.012, "lr_decay_from_kimg": 0.0, "lr_final": 0.1})
    resumed = build_state(decay, DEV)
    load_state(resumed, tmp_path / "checkpoint.pt", DEV)
    assert resumed.opt_g.param_groups[0]["lr"] == pytest.approx(TINY.lr)  # the stored rate
    train_step(resumed, decay, DEV, amp=False)
    want = decay.lr_at(TINY.batch)  # set from the image count before the step
    assert want < TINY.lr
    assert resumed.opt_g.param_groups[0]["lr"] == pytest.approx(want)
    assert resumed.opt_d.param_groups[0]["lr"] == pytest.approx(want * decay.r1_lazy_c())


def test_d_lr_sets_ds_rate_under_the_same_schedule(one_thread):
    """`d_lr` moves D's rate alone (lazy-R1 corrected), and the ramp-down scales it with G's."""
    cfg = TINY.model_copy(update={"lr": 0.002, "d_lr": 0.0005, "total_kimg": 0.064, "lr_decay_from_kimg": 0.0,
                                  "lr_final": 0.5})
    st = build_state(cfg, DEV)
    assert st.opt_d.param_groups[0]["lr"] == pytest.approx(0.0005 * cfg.r1_lazy_c())
    train_step(st, cfg, DEV, amp=False)
    train_step(st, cfg, DEV, amp=False)  # the second step's rates: set from nimg = one batch, mid-ramp
    g, d = st.opt_g.param_groups[0]["lr"], st.opt_d.param_groups[0]["lr"]
    assert g == pytest.approx(cfg.lr_at(TINY.batch)) and 0.001 < g < 0.002
    assert d == pytest.approx(g / 4 * cfg.r1_lazy_c())
    same = TINY.model_copy(update={"d_lr": None})
    assert same.d_lr_at(123) == same.lr_at(123)


def test_warm_start_from_an_exported_snapshot(tmp_path, one_thread):
    """A fresh directory started from an exported G_ema + D: G and G_ema are the exported G_ema, D is
    the exported D, the image count continues from the file's kimg, and training goes on from there.
    A directory that already resumes exactly refuses the warm start; a mismatched model is named."""
    st = build_state(TINY, DEV)
    for _ in range(2):
        train_step(st, TINY, DEV, amp=False)
    save_state(st, TINY, tmp_path / "first")
    exported = tmp_path / "first" / "generator.safetensors"
    cfg = TINY.model_copy(update={"total_kimg": 3 * TINY.batch / 1000, "lr_decay_from_kimg": 0.0})
    warm = build_state(cfg, DEV)
    init_from_export(warm, exported, cfg)
    assert warm.nimg == 2 * TINY.batch and warm.step == 2
    for a, b, c in zip(warm.G.state_dict().values(), warm.G_ema.state_dict().values(), st.G_ema.state_dict().values()):
        assert torch.equal(a, c) and torch.equal(b, c)
    for a, b in zip(warm.D.state_dict().values(), st.D.state_dict().values()):
        assert torch.equal(a, b)
    out = train_generator(cfg, tmp_path / "warm", init_from=exported)
    back = torch.load(tmp_path / "warm" / "checkpoint.pt", weights_only=True)
    assert back["nimg"] == 3 * TINY.batch and out.is_file()  # one step on from the snapshot's count
    with pytest.raises(ValueError, match="already holds a checkpoint"):
        train_generator(cfg, tmp_path / "warm", init_from=exported)
    other = TINY.model_copy(update={"channel_max": 8})
    with pytest.raises(ValueError, match="does not match this training configuration"):
        init_from_export(build_state(other, DEV), exported, other)


def test_mbstd_group_sets_which_samples_d_compares(tmp_path, one_thread):
    """`mbstd_group` reaches D: with groups of 4 a sample's logit depends on the other three, with
    groups of 1 it does not; and a warm start may change it (the layer holds no weights)."""
    x = torch.randn(4, 3, 16, 16)
    y = x.clone()
    y[1:] = torch.randn(3, 3, 16, 16)
    for group, depends in ((4, True), (1, False)):
        D = build_state(TINY.model_copy(update={"mbstd_group": group}), DEV).D
        with torch.no_grad():
            moved = not torch.allclose(D(x)[0], D(y)[0])
        assert moved == depends, group
    st = build_state(TINY, DEV)
    save_state(st, TINY, tmp_path / "a")
    wide = TINY.model_copy(update={"mbstd_group": 2})
    warm = build_state(wide, DEV)
    init_from_export(warm, tmp_path / "a" / "generator.safetensors", wide)
    assert warm.D.b4.mbstd.group_size == 2
    for a, b in zip(warm.D.state_dict().values(), st.D.state_dict().values()):
        assert torch.equal(a, b)


def test_prerendered_pool_gives_the_same_batches_and_steps(one_thread):
    """The pool (rendered in two spawned processes, in chunks) holds exactly the renders drawn on the
    fly, so a step from it is the same step; a pool of the wrong size is refused."""
    from labelfoundry.generators.train import RealPool

    pool = RealPool.render(TINY, DEV, workers=2, chunk=40)
    assert pool.images.shape == (TINY.real_pool, 16, 16, 3) and pool.images.dtype == torch.uint8
    a = _real_batch(TINY, np.random.default_rng(5), DEV)
    b = _real_batch(TINY, np.random.default_rng(5), DEV, pool)
    assert torch.equal(a, b)
    plain, pooled = build_state(TINY, DEV), build_state(TINY, DEV)
    for _ in range(2):
        la = train_step(plain, TINY, DEV, amp=False)
        lb = train_step(pooled, TINY, DEV, amp=False, pool=pool)
        assert [x.item() for x in la] == [x.item() for x in lb]
    with pytest.raises(ValueError, match="real pool holds"):
        _real_batch(TINY.model_copy(update={"real_pool": 50}), np.random.default_rng(0), DEV, pool)


def test_ema_half_life_scales_with_the_batch_unless_set():
    assert TINY.model_copy(update={"batch": 32}).ema_half_life_kimg() == 10.0
    assert TINY.model_copy(update={"batch": 128}).ema_half_life_kimg() == 40.0
    assert TINY.model_copy(update={"batch": 128, "ema_kimg": 5.0}).ema_half_life_kimg() == 5.0
