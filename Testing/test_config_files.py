"""Shipped configs (EchoFMEngine/configs, package data) and how a --config value finds one: a path, a name, or the
old Resources/configs/NAME.yaml path from anywhere."""
from __future__ import annotations

from pathlib import Path

import pytest

from EchoFMEngine.configs import CONFIG_DIR, find_config, names, shipped
from EchoFMEngine.training.config import load_config, read_yaml

REPO = Path(__file__).resolve().parents[1]


def test_every_shipped_config_is_package_data_and_loads():
    assert CONFIG_DIR == REPO / "EchoFMEngine" / "configs"
    assert {"demo", "finetune_view", "finetune_segment", "pretrain_vitl_paper"} <= set(names())
    for name in names():
        assert load_config(name)["task"] == read_yaml(shipped(name)).get("task", "pretrain"), name


def test_a_config_is_found_by_name_by_file_and_by_its_old_path_from_any_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)                        # no Resources/ here
    view = CONFIG_DIR / "finetune_view.yaml"
    assert find_config("finetune_view") == find_config("finetune_view.yaml") == view
    assert find_config("Resources/configs/finetune_view.yaml") == view
    assert find_config(tmp_path / "elsewhere" / "Resources" / "configs" / "finetune_view.yaml") == view
    own = tmp_path / "finetune_view.yaml"              # a file of that name in the cwd wins over the shipped one
    own.write_text("task: ef\n")
    assert find_config("finetune_view.yaml").resolve() == own and load_config("finetune_view.yaml")["task"] == "ef"
    assert find_config("finetune_view") == view        # a bare name without .yaml is the shipped config


def test_an_unknown_config_is_refused_naming_it_and_the_shipped_ones(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"finetune_viwe.*shipped configs: .*finetune_view"):
        load_config("finetune_viwe")
    with pytest.raises(FileNotFoundError, match="other/finetune_view.yaml"):
        find_config(tmp_path / "other" / "finetune_view.yaml")   # a path elsewhere is not guessed
    with pytest.raises(FileNotFoundError, match="Resources/configs/nothing.yaml"):
        find_config("Resources/configs/nothing.yaml")
