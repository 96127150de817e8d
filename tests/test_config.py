"""Run-config validation (labelfoundry/config.py) and how the CLI reports it (flows/cli.py `run`).

Every error must name the offending key by its full dotted path; the CLI exits with code 2 and
prints it before starting Prefect. No flow runs here: the CLI's factory call is replaced.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from labelfoundry.config import ConfigError, RunConfig, load_config, parse_config


def write(tmp_path: Path, data, name: str = "run.yaml") -> Path:
    p = tmp_path / name
    p.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return p


def error_of(tmp_path: Path, data) -> str:
    with pytest.raises(ConfigError) as e:
        load_config(write(tmp_path, data))
    return str(e.value)


def bad_lines(message: str) -> list[str]:
    """The '  key: problem' lines of a ConfigError message."""
    return [line.strip() for line in message.splitlines()[1:]]


# ----------------------------------------------------------------------------- unknown keys
@pytest.mark.parametrize(
    "data, key",
    [
        ({"bogus": 1}, "bogus"),
        ({"generate": {"num_samplez": 5}}, "generate.num_samplez"),
        ({"inversion": {"stepz": 3}}, "inversion.stepz"),
        ({"filter": {"drop_tpo": 0.1}}, "filter.drop_tpo"),
        ({"runner": {"worker": 2}}, "runner.worker"),
        ({"downstream": {"max_step": 2}}, "downstream.max_step"),
        pytest.param({"labeler": {"memberz": 3}}, "labeler.memberz"),
    ],
)
def test_unknown_keys_are_named_by_their_full_path(tmp_path, data, key):
    msg = error_of(tmp_path, data)
    assert msg.startswith(str(tmp_path / "run.yaml"))
    assert any(line.startswith(f"{key}:") for line in bad_lines(msg)), msg
    assert "Extra inputs are not permitted" in msg


def test_every_bad_key_is_listed(tmp_path):
    msg = error_of(tmp_path, {"bogus": 1, "generate": {"num_samplez": 5, "batch": "big"}, "seed": "x"})
    keys = sorted(line.split(":")[0] for line in bad_lines(msg))
    assert keys == ["bogus", "generate.batch", "generate.num_samplez", "seed"]


# ----------------------------------------------------------------------------- wrong values
@pytest.mark.parametrize(
    "data, key",
    [
        ({"generate": {"num_samples": "many"}}, "generate.num_samples"),
        ({"generate": {"num_samples": 0}}, "generate.num_samples"),
        ({"filter": {"drop_top": 1.5}}, "filter.drop_top"),
        ({"filter": {"score": "entropy"}}, "filter.score"),
        ({"runner": {"kind": "mpi"}}, "runner.kind"),
        ({"runner": {"workers": 0}}, "runner.workers"),
        ({"labeled": {"num_images": 0}}, "labeled.num_images"),
        ({"device": "tpu"}, "device"),
        ({"downstream": {"baselines": ["oracle", "magic"]}}, "downstream.baselines.1"),
        ({"generate": [1, 2]}, "generate"),
        ({"labeler": {"method": "bogus"}}, "labeler"),
        pytest.param({"labeler": {"members": "ten"}}, "labeler.members"),
    ],
)
def test_wrong_types_and_values_are_named(tmp_path, data, key):
    msg = error_of(tmp_path, data)
    assert any(line.startswith(f"{key}:") for line in bad_lines(msg)), msg


def test_folder_source_needs_a_path(tmp_path):
    msg = error_of(tmp_path, {"labeled": {"source": "folder"}})
    assert "labeled.path is required" in msg
    cfg = load_config(write(tmp_path, {"labeled": {"source": "folder", "path": str(tmp_path)}}))
    assert cfg.labeled.path == str(tmp_path)


@pytest.mark.parametrize("text", ["- a\n- b\n", "just a string\n", "42\n"])
def test_a_yaml_that_is_not_a_mapping(tmp_path, text):
    msg = error_of(tmp_path, text)
    assert "must be a mapping" in msg and str(tmp_path / "run.yaml") in msg


def test_invalid_yaml(tmp_path):
    assert "not valid YAML" in error_of(tmp_path, "generate: {num_samples: 5\n")


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")


def test_config_error_is_a_value_error():
    with pytest.raises(ValueError):
        parse_config({"bogus": 1})


# ----------------------------------------------------------------------------- valid configs
def test_empty_file_and_no_file_give_the_defaults(tmp_path):
    assert load_config(write(tmp_path, "")) == RunConfig()
    assert load_config(None) == RunConfig()


def test_overrides_merge_into_the_file(tmp_path):
    p = write(tmp_path, {"generate": {"num_samples": 100, "batch": 4}, "name": "x"})
    cfg = load_config(p, {"generate": {"num_samples": 5}, "runner": {"kind": "dask"}})
    assert (cfg.generate.num_samples, cfg.generate.batch, cfg.name, cfg.runner.kind) == (5, 4, "x", "dask")
    with pytest.raises(ConfigError, match="generate.num_samplez"):
        load_config(p, {"generate": {"num_samplez": 5}})


def test_shipped_configs_validate():
    root = Path(__file__).resolve().parents[1]
    paths = sorted((root / "configs").glob("*.yaml"))
    assert paths
    for p in paths:
        load_config(p)


# ----------------------------------------------------------------------------- the CLI
@pytest.fixture
def cli(monkeypatch, tmp_path):
    """CliRunner on flows.cli.app with the factory flow replaced by a recorder (no Prefect, no work)."""
    import flows.cli
    import flows.factory

    calls = []

    def fake_factory(config=None, overrides=None, **kw):
        calls.append({"config": config, "overrides": overrides, **kw})
        return {"report": "r.md", "run_dir": str(tmp_path)}

    monkeypatch.setattr(flows.factory, "factory", fake_factory)
    monkeypatch.setattr(flows.cli, "configure_prefect_env", lambda: None)
    runner = CliRunner()
    return lambda *args: runner.invoke(flows.cli.app, [str(a) for a in args]), calls


def test_cli_run_bad_config_exits_2_naming_the_key(tmp_path, cli):
    invoke, calls = cli
    res = invoke("run", write(tmp_path, {"generate": {"num_samplez": 5}}))
    assert res.exit_code == 2, res.output
    assert "generate.num_samplez" in res.output
    assert calls == []  # nothing started


def test_cli_run_missing_config_exits_2(tmp_path, cli):
    invoke, calls = cli
    res = invoke("run", tmp_path / "nope.yaml")
    assert res.exit_code == 2 and "not found" in res.output and calls == []


def test_cli_set_overrides_are_parsed_and_validated(tmp_path, cli):
    invoke, calls = cli
    cfg = write(tmp_path, {"name": "x"})
    res = invoke("run", cfg, "--set", "generate.num_samples=5", "--set", "filter.drop_top=0.2",
                 "--set", "labeler.hidden=[8, 4]", "--set", "name=y")
    assert res.exit_code == 0, res.output
    assert calls == [{"config": str(cfg), "overrides": {
        "generate": {"num_samples": 5}, "filter": {"drop_top": 0.2}, "labeler": {"hidden": [8, 4]}, "name": "y"}}]
    cfg_obj = load_config(cfg, calls[0]["overrides"])
    assert cfg_obj.generate.num_samples == 5 and cfg_obj.name == "y"

    res = invoke("run", cfg, "--set", "generate.num_samplez=5")
    assert res.exit_code == 2 and "generate.num_samplez" in res.output
    res = invoke("run", cfg, "--set", "runner.kind=mpi")
    assert res.exit_code == 2 and "runner.kind" in res.output
    res = invoke("run", cfg, "--set", "generate.num_samples")  # no '='
    assert res.exit_code == 2 and "key.path=value" in res.output
    assert len(calls) == 1


def test_cli_generate_takes_set_overrides(tmp_path, cli, monkeypatch):
    """`labelfoundry generate --set`: validated before Prefect starts, passed to the flow, and the
    --num-samples / --run-dir shorthands win over a --set of the same key."""
    import flows.generate
    from flows.generate import _overrides

    invoke, _ = cli
    seen = []
    monkeypatch.setattr(flows.generate, "generate", lambda **kw: seen.append(kw) or {"report": "r.md"})
    cfg = write(tmp_path, {"name": "x"})
    res = invoke("generate", cfg, "--set", "generate.compile=on", "--set", "generate.num_samples=5", "--num-samples", "9")
    assert res.exit_code == 0, res.output
    assert seen[0]["overrides"] == {"generate": {"compile": True, "num_samples": 5}} and seen[0]["num_samples"] == 9  # YAML: on = true
    merged = load_config(cfg, _overrides(seen[0]["num_samples"], None, seen[0]["overrides"]))
    assert merged.generate.compile == "on" and merged.generate.num_samples == 9
    res = invoke("generate", cfg, "--set", "generate.compile=maybe")
    assert res.exit_code == 2 and "generate.compile" in res.output and len(seen) == 1


def test_cli_set_wins_over_full(tmp_path, cli, monkeypatch):
    import flows.cli

    monkeypatch.setattr(flows.cli, "headline", lambda *a, **k: "table", raising=False)  # --full's summary table
    invoke, calls = cli
    res = invoke("run", write(tmp_path, {}), "--full", "--set", "generate.num_samples=7")
    assert calls, res.output
    o, full = calls[0]["overrides"], flows.cli.FULL_OVERRIDES
    assert o["generate"]["num_samples"] == 7
    assert o["run_dir"] == full["run_dir"] and o["downstream"] == full["downstream"]


def test_parse_sets_types_values_as_yaml():
    from flows.cli import _parse_sets

    assert _parse_sets(["generate.num_samples=5", "generate.psi=0.7", "generate.store_w=false", "a.b.c=x=y"]) == {
        "generate": {"num_samples": 5, "psi": 0.7, "store_w": False}, "a": {"b": {"c": "x=y"}}}


def test_demo_yaml_spells_out_the_built_in_demo():
    """configs/demo.yaml is documented as the built-in demo written out: the two must not drift."""
    from pathlib import Path

    from labelfoundry.config import load_config

    demo = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"
    assert load_config(str(demo)).model_dump() == load_config(None).model_dump()
