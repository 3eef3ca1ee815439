"""The params loader: a key that nothing reads is refused by name, never silently ignored."""

from __future__ import annotations

from pathlib import Path

import pytest

from gara.config import ConfigError, load_params

REPO = Path(__file__).resolve().parents[1]


def test_an_override_with_a_misspelt_section_or_key_is_refused_by_name():
    assert load_params(REPO / "params.yaml", {"train.lr": 0.1}).train.lr == 0.1
    with pytest.raises(ConfigError, match=r"trian: Extra inputs are not permitted"):
        load_params(REPO / "params.yaml", {"trian.lr": 0.1})  # was ignored: training ran on defaults
    with pytest.raises(ConfigError, match=r"train\.lrr: Extra inputs are not permitted"):
        load_params(REPO / "params.yaml", {"train.lrr": 0.1})


def test_an_unknown_section_in_a_params_file_is_refused_by_name(tmp_path: Path):
    path = tmp_path / "params.yaml"
    path.write_text("registry:\n  name: x\nregistri:\n  name: y\n", encoding="utf-8")
    refused = rf"(?s){path}: invalid parameters.*registri: Extra inputs are not permitted"
    with pytest.raises(ConfigError, match=refused):
        load_params(path)
