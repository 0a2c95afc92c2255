"""``cytofm-visualize`` command line: each subcommand, its log and its errors."""

from __future__ import annotations

import numpy as np
import pytest
from threadpoolctl import threadpool_limits

from cytofm.cli.visualize import LOG_NAME, main
from tests.test_visualize_mil import HEIGHT, WIDTH, make_run
from tests.visualize_fixtures import write_feature_set, write_noise_image, write_tiny_checkpoint


def test_attention_command_writes_figure_and_log(tmp_path):
    checkpoint = write_tiny_checkpoint(tmp_path / "tiny.pt")
    image = write_noise_image(tmp_path / "cell.png", 36, 52)
    out = tmp_path / "out"
    code = main(["attention", str(image), "--checkpoint", str(checkpoint), "--out", str(out)])
    assert code == 0
    assert (out / "cell_attention.png").is_file()
    assert f"wrote {out / 'cell_attention.png'}" in (out / LOG_NAME).read_text()


def test_attention_command_unreadable_image(tmp_path):
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8 not really a jpeg")
    out = tmp_path / "out"
    code = main(["attention", str(broken), "--checkpoint", "x.pt", "--out", str(out)])
    assert code == 1
    assert f"cannot decode image {broken}" in (out / LOG_NAME).read_text()


def test_attention_command_rejects_bad_share(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["attention", "a.png", "--checkpoint", "c.pt", "--share", "1.5", "--out", "o"])
    assert exit_info.value.code == 2
    assert "share in (0, 1]" in capsys.readouterr().err


def test_mil_command_writes_figures(tmp_path):
    run = make_run(tmp_path / "run")
    image = write_noise_image(tmp_path / "slide.png", HEIGHT, WIDTH)
    out = tmp_path / "out"
    args = ["mil", "--run", str(run), "--bag", "slide_7", "--image", str(image)]
    assert main([*args, "--out", str(out), "--scale", "percentile"]) == 0
    assert (out / "slide_7_mil_heatmap.png").is_file()
    assert (out / "slide_7_mil_tiles.png").is_file()


def test_mil_command_unknown_bag(tmp_path):
    run = make_run(tmp_path / "run")
    image = write_noise_image(tmp_path / "slide.png", HEIGHT, WIDTH)
    out = tmp_path / "out"
    args = ["mil", "--run", str(run), "--bag", "nope", "--image", str(image)]
    assert main([*args, "--out", str(out)]) == 1
    assert "bag 'nope' not found" in (out / LOG_NAME).read_text()


def test_embeddings_command(tmp_path):
    generator = np.random.default_rng(0)
    bags = {f"bag{i}": ("ab"[i % 2], generator.normal(size=(3, 8))) for i in range(10)}
    feature_set = write_feature_set(tmp_path / "vit_small", bags)
    out = tmp_path / "out"
    with threadpool_limits(limits=1):
        code = main(["embeddings", str(feature_set), "--method", "tsne", "--out", str(out)])
    assert code == 0
    assert (out / "embeddings_bag_tsne.png").is_file()
    assert (out / "embeddings_bag_tsne.csv").is_file()


def test_out_below_a_file_fails_cleanly(tmp_path, capsys):
    image = write_noise_image(tmp_path / "cell.png", 36, 52)
    out = image / "x"
    code = main(["attention", str(image), "--checkpoint", "c.pt", "--out", str(out)])
    assert code == 1
    assert capsys.readouterr().err == (
        f"cytofm-visualize: cannot create output folder {out}: {image} is a file, not a "
        "folder; choose another output path\n"
    )
