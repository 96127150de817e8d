"""What a new user meets at the command line: bad input reported before Prefect starts, as one
short message naming the file and the fix; the traceback only with --debug."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

import flows.cli as cli


def invoke(*args):
    return CliRunner().invoke(cli.app, [str(a) for a in args])


def text(res) -> str:
    return " ".join(res.output.split())


@pytest.fixture
def no_prefect(monkeypatch):
    """Fail the test if the command gets as far as configuring Prefect."""

    def refuse() -> None:
        raise AssertionError("Prefect was configured before the input was checked")

    monkeypatch.setattr(cli, "configure_prefect_env", refuse)


@pytest.mark.parametrize("command", ["run", "generate"])
def test_missing_generator_reported_before_prefect(tmp_path, make_config, no_prefect, command):
    missing = tmp_path / "nope.pkl"
    cfg = make_config(tmp_path, tmp_path / "run", generator={"name": str(missing)})
    res = invoke(command, cfg)
    assert res.exit_code == 2, res.output
    assert "generator.name" in text(res) and "nope.pkl" in text(res) and "no such checkpoint" in text(res)
    assert "Traceback" not in res.output


def test_damaged_labeled_folder_reported_before_prefect(tmp_path, make_config, no_prefect):
    root = tmp_path / "labeled"
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    Image.new("RGB", (32, 32)).save(root / "images" / "a.png")
    Image.fromarray(np.zeros((32, 32), np.uint8)).save(root / "masks" / "a.png")
    Image.fromarray(np.zeros((32, 32), np.uint8)).save(root / "masks" / "zzz.png")
    cfg = make_config(tmp_path, tmp_path / "run", labeled={"source": "folder", "path": str(root)})
    res = invoke("run", cfg)
    assert res.exit_code == 2, res.output
    assert "masks/zzz.png" in text(res) and "no images/zzz" in text(res)


def test_convert_to_a_non_safetensors_path_is_one_line(tmp_path, tiny_generator):
    out = tmp_path / "g.pt"
    res = invoke("convert", tiny_generator, out)
    assert res.exit_code == 1
    assert "Traceback" not in res.output and len(res.output.strip().splitlines()) <= 2
    assert res.output.startswith("error:") and "g.pt" in text(res) and ".safetensors" in text(res)
    res = invoke("--debug", "convert", tiny_generator, out)
    assert isinstance(res.exception, ValueError) and "g.pt" in str(res.exception)


def test_prefect_banner_names_the_server_when_one_is_set(monkeypatch, capsys):
    monkeypatch.setattr(cli, "console", cli.Console(force_terminal=False, width=200))
    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:4200/api")
    cli._prefect_banner()
    out = capsys.readouterr().out
    assert "http://127.0.0.1:4200/api" in out and "ephemeral" not in out
    monkeypatch.delenv("PREFECT_API_URL")
    cli._prefect_banner()
    assert "local ephemeral API" in capsys.readouterr().out
