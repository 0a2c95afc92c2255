from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest
import yaml

from cytofm.config import ConfigError, load_config, save_config, to_dict


@dataclass
class OptimConfig:
    lr: float = 5e-4
    betas: tuple[float, float] = (0.9, 0.999)
    name: Literal["adamw", "sgd"] = "adamw"


@dataclass
class Source:
    path: Path = Path(".")
    weight: float = 1.0


@dataclass
class RunConfig:
    output_dir: Path = Path("runs/x")
    epochs: int = 10
    fused: bool | None = None
    optim: OptimConfig = field(default_factory=OptimConfig)
    sources: list[Source] = field(default_factory=list)


def test_yaml_and_overrides_typed(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("epochs: 3\noptim:\n  lr: 1\nsources:\n  - {path: a, weight: 2}\n")
    config = load_config(RunConfig, path, ["optim.betas=[0.8, 0.9]", "fused=true"])
    assert config.epochs == 3
    assert config.optim.lr == 1.0
    assert isinstance(config.optim.lr, float)
    assert config.optim.betas == (0.8, 0.9)
    assert config.fused is True
    assert config.sources == [Source(Path("a"), 2.0)]


def test_unknown_key_named(tmp_path):
    with pytest.raises(ConfigError, match="optim.lrr"):
        load_config(RunConfig, None, ["optim.lrr=1"])


def test_wrong_type_rejected():
    with pytest.raises(ConfigError, match="epochs: expected an integer"):
        load_config(RunConfig, None, ["epochs=1.5"])
    with pytest.raises(ConfigError, match="optim.name"):
        load_config(RunConfig, None, ["optim.name=lamb"])
    with pytest.raises(ConfigError, match="key=value"):
        load_config(RunConfig, None, ["epochs"])


def test_missing_file_named(tmp_path):
    with pytest.raises(ConfigError, match="nope.yaml"):
        load_config(RunConfig, tmp_path / "nope.yaml")


def test_saved_config_round_trip(tmp_path):
    config = load_config(RunConfig, None, ["sources=[{path: /data/x y, weight: 0.5}]"])
    save_config(config, tmp_path / "resolved.yaml")
    saved = yaml.safe_load((tmp_path / "resolved.yaml").read_text())
    assert saved == to_dict(config)
    assert load_config(RunConfig, tmp_path / "resolved.yaml") == config


def test_float_accepts_exponent_without_dot():
    config = load_config(RunConfig, None, ["optim.lr=1e-3"])
    assert config.optim.lr == 0.001
    with pytest.raises(ConfigError, match="optim.lr: expected a number, got 'fast'"):
        load_config(RunConfig, None, ["optim.lr=fast"])
