"""Checkpoint misuse gets one clear message naming the file and the fix, before anything is unpacked:
renamed files, torch.save'd or bare-pickled NVIDIA networks, zip bombs, damaged safetensors."""

from __future__ import annotations

import pickle
import zipfile

import pytest
import torch

from labelfoundry.generators import filecheck, load_generator, safe_pickle
from labelfoundry.generators.loaders import resolve_generator_path
from tasks.common import generator_hash
from tests.test_loaders import (  # noqa: F401  (nvidia_env is a fixture)
    g_attrs,
    g_kwargs,
    make_pair,
    nv_tree,
    nvidia_env,
    write_nvidia_pickle,
    write_rosinality,
)


def _no_torch_load(monkeypatch):
    def refuse(*a, **kw):
        raise AssertionError("torch.load was called")

    monkeypatch.setattr(torch, "load", refuse)


def test_zip_bomb_pt_is_refused_before_torch_load(tmp_path, monkeypatch):
    bomb = tmp_path / "bomb.pt"
    with zipfile.ZipFile(bomb, "w", compression=zipfile.ZIP_DEFLATED) as z:
        z.writestr("archive/data.pkl", pickle.dumps({"g_ema": {}}, protocol=2))
        z.writestr("archive/data/0", bytes(64 << 20))  # 64 MiB of zeros deflate to ~64 KiB
    assert bomb.stat().st_size < 1 << 20
    _no_torch_load(monkeypatch)
    with pytest.raises(ValueError) as ei:
        load_generator(bomb)
    msg = str(ei.value)
    assert str(bomb) in msg and "zip bomb" in msg and "not loaded" in msg


@pytest.mark.parametrize("content,what", [
    (b"", "empty"),
    ((1 << 60).to_bytes(8, "little") + b"garbage", "header length"),
    ((7).to_bytes(8, "little") + b"{nope!}" + b"\0" * 16, "not a JSON object"),
    ((2).to_bytes(8, "little") + b"[]", "not a JSON object"),
])
def test_damaged_safetensors_named_before_hashing(tmp_path, content, what):
    f = tmp_path / "gen.safetensors"
    f.write_bytes(content)
    for call in (resolve_generator_path, generator_hash, load_generator):
        with pytest.raises(ValueError) as ei:
            call(str(f))
        assert str(f) in str(ei.value) and what in str(ei.value) and "re-download" in str(ei.value)


def test_rosinality_pt_renamed_pkl(tmp_path):
    G, _ = make_pair(0)
    path = write_rosinality(tmp_path / "ffhq.pkl", G)
    with pytest.raises(ValueError) as ei:
        load_generator(path)
    msg = str(ei.value)
    assert str(path) in msg and "torch.save checkpoint" in msg and "rename it to .pt" in msg
    assert "persistent" not in msg


def test_nvidia_pkl_renamed_pt_never_suggests_unrestricted_load(tmp_path, nvidia_env, monkeypatch):
    G, D = make_pair(1)
    path = write_nvidia_pickle(nvidia_env, tmp_path / "snapshot.pt", tmp_path / "marker", G, D)
    _no_torch_load(monkeypatch)
    with pytest.raises(ValueError) as ei:
        load_generator(path)
    msg = str(ei.value)
    assert str(path) in msg and "rename it to .pkl" in msg and "weights_only" not in msg
    assert not (tmp_path / "marker").exists()


def test_torch_first_line_drops_the_unrestricted_load_advice(tmp_path):
    f = tmp_path / "p.bin"
    f.write_bytes(pickle.dumps({"a": frozenset([1])}, protocol=4))
    with pytest.raises(pickle.UnpicklingError) as ei, pytest.warns(UserWarning):
        torch.load(f, weights_only=True)
    assert "weights_only` set to `False`" in str(ei.value)  # what torch itself says
    reason = safe_pickle._first_line(ei.value)
    assert reason and "weights_only" not in reason and "False" not in reason


@pytest.mark.parametrize("suffix", [".pt", ".pkl"])
def test_torch_save_of_an_nvidia_network(tmp_path, nvidia_env, suffix):
    G, _ = make_pair(2)
    path = tmp_path / f"g_ema{suffix}"
    torch.save(nv_tree(nvidia_env, G, "raise SystemExit('ran')"), path)
    with pytest.raises(ValueError) as ei:
        load_generator(path)
    msg = str(ei.value)
    assert str(path) in msg and "torch.save of an NVIDIA network" in msg and "network-snapshot" in msg
    assert "Stub" not in msg


def test_bare_pickle_of_g_ema(tmp_path, nvidia_env):
    G, _ = make_pair(3)
    path = tmp_path / "g_ema.pkl"
    with open(path, "wb") as f:
        pickle.dump(nv_tree(nvidia_env, G, "raise SystemExit('ran')"), f)
    with pytest.raises(ValueError) as ei:
        load_generator(path)
    msg = str(ei.value)
    assert str(path) in msg and "single pickled network (Generator)" in msg and "network-snapshot" in msg
    assert "Stub" not in msg


def test_directory_is_named(tmp_path):
    d = tmp_path / "ckpts"
    d.mkdir()
    (d / "network-snapshot-000100.pkl").write_bytes(b"x")
    for call in (load_generator, resolve_generator_path):
        with pytest.raises(IsADirectoryError) as ei:
            call(d)
        msg = str(ei.value)
        assert str(d) in msg and "is a directory" in msg and "network-snapshot-000100.pkl" in msg


def test_pickle_with_only_g_warns_non_ema(tmp_path, nvidia_env):
    G, _ = make_pair(4)
    path = tmp_path / "only_g.pkl"
    with open(path, "wb") as f:
        pickle.dump({"G": nv_tree(nvidia_env, G, "", g_kwargs(nvidia_env, G, "ada"), g_attrs(G))}, f)
    with pytest.warns(UserWarning, match="no 'G_ema'; using the training network 'G'"):
        load_generator(path)


def test_sniff_kinds(tmp_path):
    G, _ = make_pair(5)
    pt = write_rosinality(tmp_path / "r.pt", G)
    assert filecheck.sniff(pt) == "zip"
    (tmp_path / "e").write_bytes(b"")
    assert filecheck.sniff(tmp_path / "e") == "empty"
    (tmp_path / "p").write_bytes(pickle.dumps({}, protocol=2))
    assert filecheck.sniff(tmp_path / "p") == "pickle"
