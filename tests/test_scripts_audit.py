"""scripts/audit_crops.py: counting crops without a cell per class folder."""

from __future__ import annotations

import importlib.util

import numpy as np
from PIL import Image

from tests.pretrain_helpers import REPO_ROOT


def _load_script():
    spec = importlib.util.spec_from_file_location(
        "audit_crops", REPO_ROOT / "scripts" / "audit_crops.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _crop(path, nucleus: bool):
    pixels = np.full((40, 40, 3), 240, dtype=np.uint8)  # glass
    if nucleus:
        pixels[15:25, 15:25] = (60, 40, 90)  # a dark 10x10 nucleus: 6% of the pixels
    Image.fromarray(pixels).save(path)


def test_audit_counts_empty_crops(tmp_path, capsys):
    for name, nuclei in {"normal": [True, True, False], "tumour": [False, False]}.items():
        (tmp_path / name).mkdir()
        for number, nucleus in enumerate(nuclei):
            _crop(tmp_path / name / f"{number}.png", nucleus)

    assert _load_script().main([str(tmp_path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    # Every crop is over 90% glass; three of the five have no nucleus.
    assert "| normal | 3 | 3 (100%) | 1 (33%) |" in lines
    assert "| tumour | 2 | 2 (100%) | 2 (100%) |" in lines
    assert lines[-1] == "3 of 5 crops (60%) contain no dark nucleus."


def test_audit_lists_empty_crop_paths(tmp_path, capsys):
    (tmp_path / "a").mkdir()
    _crop(tmp_path / "a" / "full.png", True)
    _crop(tmp_path / "a" / "empty.png", False)
    _load_script().main([str(tmp_path), "--list-empty"])
    assert capsys.readouterr().out.splitlines() == [str(tmp_path / "a" / "empty.png")]
