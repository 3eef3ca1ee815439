"""The params loader every command shares: one set of defaults, and nothing silently ignored
(a misspelt key, a missing file, an unreachable tracking server: one line naming it)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from gara.cli import app
from gara.config import ConfigError, Params, load_params
from tests.conftest import free_port

REPO = Path(__file__).resolve().parents[1]


def test_params_yaml_states_exactly_the_built_in_defaults():
    # One definition per default: params.yaml spells out gara/config.py's values, no others.
    assert load_params(REPO / "params.yaml") == Params()


def test_an_override_with_a_misspelt_section_or_key_is_refused_by_name():
    assert load_params(REPO / "params.yaml", {"train.lr": 0.1}).train.lr == 0.1
    with pytest.raises(ConfigError, match=r"--set trian\.lr: unknown key 'trian' in the top level"):
        load_params(REPO / "params.yaml", {"trian.lr": 0.1})  # was ignored: training ran on defaults
    with pytest.raises(ConfigError, match=r"--set train\.lrr: unknown key 'lrr' in train \(known: .*lr,"):
        load_params(REPO / "params.yaml", {"train.lrr": 0.1})
    with pytest.raises(ConfigError, match=r"--set train\.lr\.x: train\.lr is a value, not a section"):
        load_params(REPO / "params.yaml", {"train.lr.x": 0.1})


def test_an_unknown_section_in_a_params_file_is_refused_by_name(tmp_path: Path):
    path = tmp_path / "params.yaml"
    path.write_text("registry:\n  name: x\nregistri:\n  name: y\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=rf"^{path}: unknown key registri$"):
        load_params(path)


COMMANDS = {  # every command that reads params, with the least else it needs to start
    "corrupt": ["--data", "d", "--out", "o"],
    "train": [],
    "evaluate": ["--model", "base"],
    "register": ["--adapter", "a"],
    "promote": [],
    "publish": ["--adapter", "a"],
    "predict": ["--image", "{tmp}/x.png", "--box", "1,1,5,5"],  # the prompt is checked first
}


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_command_refuses_an_unknown_set_key_and_a_missing_params_file(command: str, tmp_path: Path):
    from PIL import Image

    Image.new("RGB", (8, 8)).save(tmp_path / "x.png")
    needs = [arg.format(tmp=tmp_path) for arg in COMMANDS[command]]
    runner = CliRunner()
    typo = runner.invoke(app, [command, *needs, "--set", "trian.lr=0.1"])
    assert typo.exit_code == 2
    assert typo.output.strip() == ("error: --set trian.lr: unknown key 'trian' in the top level "
                                   "(known: corrupt, model, train, evaluate, registry)")
    missing = runner.invoke(app, [command, *needs, "--params", str(tmp_path / "missing.yaml")])
    assert missing.exit_code == 2
    assert missing.output.strip() == f"error: params file {tmp_path / 'missing.yaml'} does not exist"


def test_an_unreachable_tracking_server_fails_in_seconds_naming_it(tmp_path: Path, monkeypatch):
    # Before: MLflow's client retried ~260 s and ended in five chained tracebacks.
    uri = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    runner = CliRunner()
    for command in (["train"], ["promote"]):
        started = time.monotonic()
        result = runner.invoke(app, command)
        assert result.exit_code == 2, result.output
        assert result.output.startswith(f"error: MLflow tracking server {uri} did not answer")
        assert len(result.output.strip().splitlines()) == 1
        assert time.monotonic() - started < 30
