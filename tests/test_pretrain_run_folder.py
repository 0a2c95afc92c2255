"""The resolved config of a run folder and the earlier versions kept on resume."""

from __future__ import annotations

import logging

from cytofm.pretrain.config import load_pretrain_config
from cytofm.pretrain.run_folder import save_resolved_config, unused_path


def test_unused_path_numbers_taken_names(tmp_path):
    path = tmp_path / "config.before-step5.yaml"
    assert unused_path(path) == path
    path.write_text("a")
    assert unused_path(path) == tmp_path / "config.before-step5-2.yaml"
    (tmp_path / "config.before-step5-2.yaml").write_text("b")
    assert unused_path(path) == tmp_path / "config.before-step5-3.yaml"


def test_unused_path_keeps_double_suffix(tmp_path):
    path = tmp_path / "checkpoint-000000196.pt.unreadable"
    path.write_bytes(b"")
    expected = tmp_path / "checkpoint-000000196-2.pt.unreadable"
    assert unused_path(path, suffix=".pt.unreadable") == expected


def test_invalid_yaml_config_kept_aside(tmp_path, caplog):
    broken = "run:\n  output_dir: [runs/x\n"
    (tmp_path / "config.yaml").write_text(broken)
    config = load_pretrain_config(None, ["optim.lr=0.001"])

    with caplog.at_level(logging.WARNING, logger="cytofm.pretrain.run_folder"):
        backup = save_resolved_config(config, tmp_path, step=7)
    assert backup == tmp_path / "config.before-step7.yaml"
    assert backup.read_text() == broken
    assert load_pretrain_config(tmp_path / "config.yaml").optim.lr == 0.001
    assert f"{tmp_path / 'config.yaml'} is not valid YAML" in caplog.text
    assert "kept it as config.before-step7.yaml" in caplog.text


def test_same_config_not_rewritten(tmp_path):
    config = load_pretrain_config(None, ["optim.lr=0.001"])
    save_resolved_config(config, tmp_path, step=0)
    with (tmp_path / "config.yaml").open("a") as handle:
        handle.write("# note added by hand\n")
    written = (tmp_path / "config.yaml").read_text()

    assert save_resolved_config(config, tmp_path, step=5) is None
    assert (tmp_path / "config.yaml").read_text() == written
    assert sorted(path.name for path in tmp_path.iterdir()) == ["config.yaml"]


def test_earlier_configs_never_overwritten(tmp_path):
    versions = [load_pretrain_config(None, [f"optim.lr={lr}"]) for lr in (0.001, 0.002, 0.003)]
    save_resolved_config(versions[0], tmp_path, step=0)
    first = (tmp_path / "config.yaml").read_text()

    backup = save_resolved_config(versions[1], tmp_path, step=5)
    assert backup == tmp_path / "config.before-step5.yaml"
    second = (tmp_path / "config.yaml").read_text()
    # A second change at the same step, e.g. after a start that failed before its first step.
    second_backup = save_resolved_config(versions[2], tmp_path, step=5)
    assert second_backup == tmp_path / "config.before-step5-2.yaml"

    assert (tmp_path / "config.before-step5.yaml").read_text() == first
    assert (tmp_path / "config.before-step5-2.yaml").read_text() == second
    assert load_pretrain_config(tmp_path / "config.yaml").optim.lr == 0.003
