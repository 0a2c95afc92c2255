"""Tests of feature extraction: batch-size independence, resume, errors and baselines."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cytofm.cli.extract import main as extract_main
from cytofm.evaluation.bag_table import load_features
from cytofm.evaluation.config import FeatureSetConfig
from cytofm.evaluation.extract import extract_bags
from cytofm.evaluation.extractors import BackboneConfig, HandcraftedExtractor, build_extractor
from cytofm.evaluation.feature_store import (
    load_bag_features,
    read_index,
    read_meta,
    safe_file_name,
)
from cytofm.evaluation.handcrafted import DESCRIPTOR_DIM, colour_texture_descriptor
from cytofm.models.vit import build_vit

CPU = torch.device("cpu")
TINY = {"arch": "vit_small", "embed_dim": 32, "depth": 2, "num_heads": 2, "patch_size": 8}


@dataclass
class FakeBag:
    """A bag of in-memory tiles, with the interface of the data layer's BagSpec."""

    bag_id: str
    tiles: list[np.ndarray]
    label: str | None = "positive"
    group: str | None = None
    split: str | None = None
    reads: list[int] = field(default_factory=list)

    def iter_instances(self):
        self.reads.append(1)
        for index, tile in enumerate(self.tiles):
            height, width = tile.shape[:2]
            yield Image.fromarray(tile), (index * width, 0, (index + 1) * width, height)


def make_bags(sizes=(5, 9, 3, 1), side=32, seed=0):
    rng = np.random.default_rng(seed)
    return [
        FakeBag(
            f"slide {number}/region" if number % 2 else f"slide_{number}",
            [rng.integers(0, 256, (side, side, 3), dtype=np.uint8) for _ in range(size)],
            label="positive" if number % 2 else "negative",
            group=f"patient{number // 2}",
        )
        for number, size in enumerate(sizes)
    ]


def tiny_vit_extractor(patch_tokens=False, seed=0):
    torch.manual_seed(seed)
    model = build_vit(img_size=32, **TINY)
    from cytofm.models.loading import build_transform

    return build_extractor_from(model, build_transform(None), patch_tokens)


def build_extractor_from(model, transform, patch_tokens):
    from cytofm.evaluation.extractors import ViTExtractor

    return ViTExtractor(model, transform, device=CPU, patch_tokens=patch_tokens)


def demo_handcrafted_argv(demo: Path, out: Path) -> list[str]:
    """Arguments of cytofm-extract for handcrafted features of a demo set in 32-px tiles."""
    return [
        "bags.kind=image_tiles",
        f"bags.root={demo}",
        f"bags.labels_csv={demo / 'labels.csv'}",
        "bags.tile_size=32",
        "bags.background_threshold=1.0",
        "backbone.source=handcrafted",
        f"out={out}",
        "num_workers=0",
        "device=cpu",
    ]


def read_all(folder: Path) -> dict[str, dict[str, torch.Tensor]]:
    return {
        row.bag_id: load_bag_features(folder / "features" / row.file)
        for row in read_index(folder / "index.csv")
    }


@pytest.mark.parametrize("kind", ["vit", "handcrafted"])
def test_batch_size_does_not_change_files(tmp_path, kind):
    bags = make_bags()
    extractor = (
        tiny_vit_extractor() if kind == "vit" else HandcraftedExtractor(img_size=None, device=CPU)
    )
    extract_bags(bags, extractor, tmp_path / "b1", batch_size=1)
    extract_bags(bags, extractor, tmp_path / "b7", batch_size=7)
    for bag in bags:
        name = safe_file_name(bag.bag_id)
        first = (tmp_path / "b1" / "features" / name).read_bytes()
        second = (tmp_path / "b7" / "features" / name).read_bytes()
        assert first == second, bag.bag_id
    assert (tmp_path / "b1" / "index.csv").read_text() == (
        tmp_path / "b7" / "index.csv"
    ).read_text()


def test_features_match_direct_forward(tmp_path):
    bags = make_bags(sizes=(4,))
    extractor = tiny_vit_extractor()
    extract_bags(bags, extractor, tmp_path / "set", batch_size=3)
    record = read_all(tmp_path / "set")[bags[0].bag_id]
    images = torch.stack([extractor.transform(Image.fromarray(tile)) for tile in bags[0].tiles])
    with torch.no_grad():
        expected = extractor.model(images)
    assert record["features"].dtype == torch.float32
    torch.testing.assert_close(record["features"], expected, rtol=0, atol=1e-6)
    assert record["coords"].tolist() == [[32 * i, 0, 32 * (i + 1), 32] for i in range(4)]


def test_workers_give_same_features(tmp_path):
    bags = make_bags(sizes=(3, 4, 2, 5, 1))
    extractor = HandcraftedExtractor(img_size=None, device=CPU)
    extract_bags(bags, extractor, tmp_path / "main", batch_size=4)
    extract_bags(bags, extractor, tmp_path / "workers", batch_size=4, num_workers=2)
    single, multi = read_all(tmp_path / "main"), read_all(tmp_path / "workers")
    assert list(single) == [bag.bag_id for bag in bags]
    assert list(multi) == list(single)
    for bag_id in single:
        assert torch.equal(single[bag_id]["features"], multi[bag_id]["features"])


def test_resume_skips_done_bags(tmp_path):
    bags = make_bags()
    extractor = HandcraftedExtractor(img_size=None, device=CPU)
    folder = tmp_path / "set"
    extract_bags(bags, extractor, folder, batch_size=4)
    index_before = (folder / "index.csv").read_text()
    (folder / "features" / safe_file_name(bags[1].bag_id)).unlink()
    (folder / "index.csv").unlink()
    extract_bags(bags, extractor, folder, batch_size=4)
    assert [len(bag.reads) for bag in bags] == [1, 2, 1, 1]
    assert (folder / "index.csv").read_text() == index_before
    extract_bags(bags, extractor, folder, batch_size=4, overwrite=True)
    assert [len(bag.reads) for bag in bags] == [2, 3, 2, 2]


def test_other_configuration_rejected(tmp_path):
    bags = make_bags(sizes=(2,))
    extractor = HandcraftedExtractor(img_size=None, device=CPU)
    extract_bags(bags, extractor, tmp_path / "set", meta={"backbone": {"source": "a"}})
    with pytest.raises(ValueError, match="another configuration"):
        extract_bags(bags, extractor, tmp_path / "set", meta={"backbone": {"source": "b"}})


def test_other_configuration_names_changes(tmp_path):
    bags = make_bags(sizes=(2,))
    extractor = HandcraftedExtractor(img_size=None, device=CPU)
    folder = tmp_path / "set"
    old = {"source": "a.pth", "pooling": "cls", "seed": 0, "arch": None}
    new = {"source": "b.pth", "pooling": "mean", "seed": 1, "arch": None}
    extract_bags(bags, extractor, folder, meta={"backbone": old, "precision": "auto"})
    with pytest.raises(ValueError) as raised:
        extract_bags(bags, extractor, folder, meta={"backbone": new, "precision": "fp32"})
    message = str(raised.value)
    assert f"{folder} contains features of another configuration" in message
    assert 'backbone.pooling: "cls" -> "mean"' in message
    assert "backbone.seed: 0 -> 1" in message
    assert 'backbone.source: "a.pth" -> "b.pth"' in message
    assert 'precision: "auto" -> "fp32"' in message
    assert "backbone.arch" not in message


def test_handcrafted_resume_ignores_vit_settings(tmp_path, capsys):
    from cytofm.data.demo import generate_demo_set

    demo = tmp_path / "demo"
    generate_demo_set(demo, num_images=2, image_size=64, seed=0)
    out = tmp_path / "features"
    argv = demo_handcrafted_argv(demo, out)
    assert extract_main(argv) == 0
    index = (out / "handcrafted" / "index.csv").read_text()
    vit_settings = ["backbone.pooling=mean", "backbone.seed=3", "precision=fp32"]
    assert extract_main([*argv, *vit_settings]) == 0
    assert (out / "handcrafted" / "index.csv").read_text() == index

    config_yaml = (out / "handcrafted" / "config.yaml").read_text()
    capsys.readouterr()
    assert extract_main([*argv, "backbone.img_size=16"]) == 1
    message = capsys.readouterr().err
    assert message.startswith(f"cytofm-extract: {out / 'handcrafted'} contains features of ")
    assert "backbone.img_size: null -> 16" in message
    assert (out / "handcrafted" / "config.yaml").read_text() == config_yaml


def test_non_finite_features_name_bag(tmp_path):
    bags = make_bags(sizes=(2, 3))
    extractor = tiny_vit_extractor()
    with torch.no_grad():
        extractor.model.norm.weight.fill_(float("nan"))
    with pytest.raises(FloatingPointError, match="bag 'slide_0'"):
        extract_bags(bags, extractor, tmp_path / "set")


def test_empty_bag_indexed_with_warning(tmp_path, caplog):
    bags = make_bags(sizes=(2, 0, 1))
    folder = tmp_path / "set"
    rows = extract_bags(bags, HandcraftedExtractor(img_size=None, device=CPU), folder)
    assert [row.num_instances for row in rows] == [2, 0, 1]
    assert "bag 'slide 1/region' has no instances" in caplog.text
    record = read_all(folder)["slide 1/region"]
    assert record["features"].shape == (0, DESCRIPTOR_DIM)
    assert record["coords"].shape == (0, 4)
    with pytest.raises(ValueError, match="bag 'slide 1/region' has no instances"):
        load_features(FeatureSetConfig("set", folder), [bag.bag_id for bag in bags])


def test_safe_file_names_unique():
    ids = ["a/b", "a b", "a_b", "a\\b", "../../etc", "x" * 300, "ä/ö"]
    names = [safe_file_name(bag_id) for bag_id in ids]
    assert len(set(names)) == len(ids)
    for name in names:
        assert "/" not in name
        assert "\\" not in name
        assert " " not in name
        assert not name.startswith(".")
        assert len(name) < 120
    assert safe_file_name("a/b") == safe_file_name("a/b")


def test_patch_tokens_as_instances(tmp_path):
    bags = make_bags(sizes=(2, 3))
    extractor = tiny_vit_extractor(patch_tokens=True)
    folder = tmp_path / "set"
    extract_bags(bags, extractor, folder, batch_size=4)
    record = read_all(folder)["slide_0"]
    assert record["patch_tokens"].shape == (2, 16, 32)
    assert record["patch_grid"].tolist() == [4, 4]
    loaded = load_features(FeatureSetConfig("tokens", folder, "patch_tokens"), ["slide_0"])
    assert loaded.bags[0].shape == (32, 32)
    assert torch.equal(loaded.bags[0][16], record["patch_tokens"][1, 0])
    boxes = loaded.coords[0]
    assert boxes[0].tolist() == [0, 0, 8, 8]
    assert boxes[5].tolist() == [8, 8, 16, 16]  # row 1, column 1 of the first tile
    assert boxes[16].tolist() == [32, 0, 40, 8]  # first token of the second tile


def test_random_init_keeps_checkpoint_shape(tmp_path):
    torch.manual_seed(1)
    trained = build_vit(img_size=32, **TINY)
    path = tmp_path / "vit.pth"
    torch.save({k: v for k, v in trained.state_dict().items() if k != "mask_token"}, path)
    loaded = build_extractor(BackboneConfig(source=str(path), num_heads=2), device=CPU)
    random_a = build_extractor(
        BackboneConfig(source=str(path), random_init=True, seed=3), device=CPU
    )
    random_b = build_extractor(
        BackboneConfig(source=str(path), random_init=True, seed=3), device=CPU
    )
    reference = loaded.model.state_dict()
    state_a, state_b = random_a.model.state_dict(), random_b.model.state_dict()
    assert {k: v.shape for k, v in state_a.items()} == {k: v.shape for k, v in reference.items()}
    assert torch.equal(loaded.model.blocks[0].attn.qkv.weight, trained.blocks[0].attn.qkv.weight)
    assert not torch.equal(
        state_a["blocks.0.attn.qkv.weight"], reference["blocks.0.attn.qkv.weight"]
    )
    assert all(torch.equal(state_a[key], state_b[key]) for key in state_a)


def test_descriptor_on_constant_image():
    image = torch.full((1, 3, 16, 16), 0.0)
    image[:, 0] = 0.8
    image[:, 1] = 0.4
    image[:, 2] = 0.1
    features = colour_texture_descriptor(image)[0]
    assert features.shape == (DESCRIPTOR_DIM,)
    torch.testing.assert_close(features[0:3], torch.tensor([0.8, 0.4, 0.1]))
    torch.testing.assert_close(features[3:6], torch.zeros(3), atol=1e-6, rtol=0)
    red_histogram = features[6:22]
    assert red_histogram.argmax() == 12  # 0.8 * 16 = 12.8
    assert red_histogram[12] == 1.0
    density = features[54:57]
    torch.testing.assert_close(density, -torch.log(torch.tensor([0.8, 0.4, 0.1])))
    grey = 0.299 * 0.8 + 0.587 * 0.4 + 0.114 * 0.1  # 0.4816
    assert features[57:60].tolist() == [0.0, 1.0, 1.0]  # below 0.3, 0.5, 0.7
    assert grey < 0.5
    assert features[60] == 1.0  # all gradient magnitudes in the first bin
    assert features[68:76].sum() < 1e-6  # no gradient, no orientation weight
    lbp = features[76:86]
    assert lbp[8] == 1.0  # every neighbour equals the centre: pattern 0xFF, label 8


def test_descriptor_vertical_edge_orientation():
    image = torch.zeros(1, 3, 16, 16)
    image[..., 8:] = 1.0  # dark left half, bright right half: horizontal gradient
    orientation = colour_texture_descriptor(image)[0, 68:76]
    assert orientation.argmax() == 0
    assert orientation[1:].sum() == 0.0
    # Two columns straddle the edge, each with Sobel response 4/8 = 0.5 in 16 rows of 256 pixels.
    assert orientation[0] == pytest.approx(2 * 16 * 0.5 / 256)


def test_cli_extract_demo_handcrafted(tmp_path):
    from cytofm.data.demo import generate_demo_set

    demo = tmp_path / "demo"
    generate_demo_set(demo, num_images=3, image_size=64, seed=0)
    out = tmp_path / "features"
    argv = [
        *demo_handcrafted_argv(demo, out),
        "batch_size=3",
    ]
    assert extract_main(argv) == 0
    rows = read_index(out / "handcrafted" / "index.csv")
    assert [row.bag_id for row in rows] == ["demo_00000", "demo_00001", "demo_00002"]
    assert all(row.num_instances == 4 for row in rows)
    meta = read_meta(out / "handcrafted" / "meta.json")
    assert meta["embed_dim"] == DESCRIPTOR_DIM
    assert meta["backbone"]["source"] == "handcrafted"
    assert (out / "handcrafted" / "config.yaml").is_file()
    record = load_bag_features(out / "handcrafted" / "features" / rows[0].file)
    assert sorted(map(tuple, record["coords"].tolist())) == [
        (0, 0, 32, 32),
        (0, 32, 32, 64),
        (32, 0, 64, 32),
        (32, 32, 64, 64),
    ]


@pytest.mark.realdata
def test_real_class_folders_extract(tmp_path, shared_data):
    from cytofm.data.bags import BagConfig, build_bags

    config = BagConfig(
        kind="class_folders",
        root=shared_data / "rbc-diseases",
        tile_size=224,
        background_threshold=1.0,
    )
    bags = build_bags(config)
    first_per_class = {}
    for bag in bags:
        first_per_class.setdefault(bag.label, bag)
    chosen = list(first_per_class.values())
    assert len(chosen) == 5

    folder = tmp_path / "rbc"
    rows = extract_bags(chosen, HandcraftedExtractor(img_size=None, device=CPU), folder)
    assert any(" " in row.bag_id and "/" in row.bag_id for row in rows)
    for row in rows:
        record = load_bag_features(folder / "features" / row.file)
        assert row.num_instances == 9  # 640x480 with 224 px tiles and edge tiles: 3 x 3
        assert bool(torch.isfinite(record["features"]).all())
        assert int(record["coords"][:, 2].max()) == 640
        assert int(record["coords"][:, 3].max()) == 480


def test_all_bags_empty_raises(tmp_path, caplog):
    bags = make_bags(sizes=(0, 0))
    with pytest.raises(ValueError, match="all 2 bags have no instances") as caught:
        extract_bags(bags, HandcraftedExtractor(img_size=None, device=CPU), tmp_path / "set")
    assert "tile_size" in str(caught.value)
    assert "bags.background_threshold" in str(caught.value)


def test_cli_extract_tile_larger_than_image_fails(tmp_path, caplog):
    from cytofm.data.demo import generate_demo_set

    demo = tmp_path / "demo"
    generate_demo_set(demo, num_images=2, image_size=64, seed=0)
    out = tmp_path / "features"
    argv = [
        "bags.kind=image_tiles",
        f"bags.root={demo}",
        f"bags.labels_csv={demo / 'labels.csv'}",
        "bags.tile_size=512",
        "backbone.source=handcrafted",
        f"out={out}",
        "device=cpu",
    ]
    assert extract_main(argv) == 1
    log = (out / "handcrafted" / "extract.log").read_text()
    assert "extraction failed: all 2 bags have no instances" in log
    assert "features ready" not in log


def test_truncated_file_on_rerun_names_file(tmp_path):
    bags = make_bags(sizes=(2, 3))
    extractor = HandcraftedExtractor(img_size=None, device=CPU)
    folder = tmp_path / "set"
    extract_bags(bags, extractor, folder)
    path = folder / "features" / safe_file_name("slide_0")
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(ValueError, match="overwrite=true") as caught:
        extract_bags(bags, extractor, folder)
    assert str(path) in str(caught.value)
    rows = extract_bags(bags, extractor, folder, overwrite=True)
    assert [row.num_instances for row in rows] == [2, 3]


def _save_tiny_checkpoint(path, seed):
    torch.manual_seed(seed)
    model = build_vit(img_size=32, **TINY)
    torch.save({k: v for k, v in model.state_dict().items() if k != "mask_token"}, path)


def _extract_with_checkpoint(bags, path, folder, overwrite=False):
    config = BackboneConfig(source=str(path), num_heads=2)
    extractor = build_extractor(config, device=CPU)
    meta = {"backbone": {"source": str(path)}}
    return extract_bags(bags, extractor, folder, overwrite=overwrite, meta=meta)


def test_changed_checkpoint_stops_resume(tmp_path):
    bags = make_bags(sizes=(2, 3))
    checkpoint = tmp_path / "vit.pth"
    folder = tmp_path / "set"
    _save_tiny_checkpoint(checkpoint, seed=0)
    _extract_with_checkpoint(bags, checkpoint, folder)
    identity = read_meta(folder / "meta.json")["weights"]
    assert identity["kind"] == "file"
    assert identity["size"] == checkpoint.stat().st_size
    assert identity["mtime_ns"] == checkpoint.stat().st_mtime_ns
    assert identity["path"] == str(checkpoint.resolve())

    _save_tiny_checkpoint(checkpoint, seed=1)  # same path and size, other weights
    (folder / "features" / safe_file_name("slide_0")).unlink()
    with pytest.raises(ValueError, match="contains features of other weights") as raised:
        _extract_with_checkpoint(bags, checkpoint, folder)
    message = str(raised.value)
    assert str(folder) in message
    assert "name= or out=" in message
    assert "overwrite=true" in message
    assert [len(bag.reads) for bag in bags] == [1, 1]

    rows = _extract_with_checkpoint(bags, checkpoint, folder, overwrite=True)
    assert [row.num_instances for row in rows] == [2, 3]
    new_identity = read_meta(folder / "meta.json")["weights"]
    assert new_identity["sha256_first_last_mib"] != identity["sha256_first_last_mib"]


def test_touched_checkpoint_still_resumes(tmp_path):
    import os

    bags = make_bags(sizes=(2, 3))
    checkpoint = tmp_path / "vit.pth"
    folder = tmp_path / "set"
    _save_tiny_checkpoint(checkpoint, seed=0)
    _extract_with_checkpoint(bags, checkpoint, folder)
    stat = checkpoint.stat()
    os.utime(checkpoint, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    _extract_with_checkpoint(bags, checkpoint, folder)
    assert [len(bag.reads) for bag in bags] == [1, 1]


def test_random_init_identity_is_seed_and_shape(tmp_path):
    bags = make_bags(sizes=(2,))
    checkpoint = tmp_path / "vit.pth"
    _save_tiny_checkpoint(checkpoint, seed=0)
    folder = tmp_path / "set"
    for seed in (3, 4):
        config = BackboneConfig(source=str(checkpoint), num_heads=2, random_init=True, seed=seed)
        extractor = build_extractor(config, device=CPU)
        assert extractor.weights["kind"] == "random_init"
        assert extractor.weights["seed"] == seed
        assert extractor.weights["spec"]["embed_dim"] == 32
        if seed == 3:
            extract_bags(bags, extractor, folder)
    with pytest.raises(ValueError, match="other weights"):
        extract_bags(bags, extractor, folder)
    random_vit = build_extractor(BackboneConfig(source="random", arch="vit_tiny"), device=CPU)
    assert random_vit.weights["kind"] == "random"
    assert random_vit.weights["spec"]["embed_dim"] == 192
    assert HandcraftedExtractor(img_size=None, device=CPU).weights == {
        "kind": "handcrafted",
        "embed_dim": DESCRIPTOR_DIM,
    }


def test_overwrite_deletes_earlier_feature_files(tmp_path):
    folder = tmp_path / "set"
    extractor = HandcraftedExtractor(img_size=None, device=CPU)
    extract_bags(make_bags(sizes=(2, 3)), extractor, folder)
    stale = folder / "features" / safe_file_name("slide 1/region")
    assert stale.is_file()
    extract_bags(make_bags(sizes=(2,)), extractor, folder, overwrite=True)
    assert not stale.exists()
    assert sorted(path.name for path in (folder / "features").iterdir()) == [
        safe_file_name("slide_0")
    ]


@dataclass
class BrokenBag:
    bag_id: str = "b1.png"
    label: str | None = "negative"
    group: str | None = None
    split: str | None = None

    def iter_instances(self):
        from cytofm.data.decode import ImageDecodeError

        raise ImageDecodeError("data/b1.png", "cannot decode the image")
        yield  # a generator, like the real bags


@pytest.mark.parametrize("num_workers", [0, 1])
def test_unreadable_bag_keeps_earlier_and_hints(tmp_path, num_workers):
    bags = [*make_bags(sizes=(2,)), BrokenBag()]
    folder = tmp_path / "set"
    with pytest.raises(RuntimeError) as raised:
        extract_bags(
            bags,
            HandcraftedExtractor(img_size=None, device=CPU),
            folder,
            batch_size=4,
            num_workers=num_workers,
        )
    message = str(raised.value)
    assert message.startswith("reading bag 'b1.png' failed: ")
    assert "\n" not in message
    assert "Fix or replace the file" in message
    assert "remove the bag from the labels CSV (bags.labels_csv)" in message
    assert "Bags already extracted are kept" in message
    record = load_bag_features(folder / "features" / safe_file_name("slide_0"))
    assert record["features"].shape == (2, DESCRIPTOR_DIM)


def test_default_num_workers_follows_affinity(monkeypatch):
    import os

    from cytofm.evaluation.extract import ExtractConfig

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    assert ExtractConfig().num_workers == 2
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)), raising=False)
    assert ExtractConfig().num_workers == 4


def _demo_argv(tmp_path, *extra):
    from cytofm.data.demo import generate_demo_set

    demo = tmp_path / "demo"
    generate_demo_set(demo, num_images=2, image_size=64, seed=0)
    return [
        f"bags.root={demo}",
        f"bags.labels_csv={demo / 'labels.csv'}",
        "bags.tile_size=32",
        "device=cpu",
        "num_workers=0",
        *extra,
    ]


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("backbone.img_size=60", "backbone.img_size=60 is not a multiple of the patch size 8"),
        ("backbone.num_heads=3", "num_heads=3 does not divide the width embed_dim=32"),
        ("backbone.arch=vit_base", "arch='vit_base' (width 768, depth 12) does not match"),
    ],
)
def test_cli_checkpoint_errors_one_line(tmp_path, override, expected):
    checkpoint = tmp_path / "vit.pth"
    _save_tiny_checkpoint(checkpoint, seed=0)
    argv = _demo_argv(tmp_path, f"backbone.source={checkpoint}", f"out={tmp_path / 'f'}")
    assert extract_main([*argv, override]) == 1
    log = (tmp_path / "f" / "vit" / "extract.log").read_text().splitlines()
    errors = [line for line in log if " ERROR " in line]
    assert len(errors) == 1
    assert expected in errors[0]
    assert errors[0] == log[-1]  # no traceback lines follow


def test_cli_folder_source_lists_checkpoints(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    _save_tiny_checkpoint(run / "teacher.pth", seed=0)
    argv = _demo_argv(tmp_path, f"backbone.source={run}", f"out={tmp_path / 'f'}")
    assert extract_main(argv) == 1
    log = (tmp_path / "f" / "run" / "extract.log").read_text()
    assert "backbone checkpoint not found" not in log
    assert f"backbone.source: {run} is a folder, not a checkpoint file" in log
    assert str(run / "teacher.pth") in log


def test_cli_out_below_a_file_fails_cleanly(tmp_path, capsys):
    blocker = tmp_path / "cell.png"
    blocker.write_bytes(b"not a folder")
    argv = _demo_argv(tmp_path, "backbone.source=handcrafted", f"out={blocker / 'x'}")
    capsys.readouterr()  # drop the demo set's progress bar
    assert extract_main(argv) == 1
    error = capsys.readouterr().err
    assert error == (
        f"cytofm-extract: cannot create output folder {blocker / 'x' / 'handcrafted'}: "
        f"{blocker} is a file, not a folder; choose another output path\n"
    )


@pytest.mark.parametrize("pooling", ["mean", "cls+mean"])
def test_pooling_matches_direct_tokens(tmp_path, pooling):
    from cytofm.evaluation.extractors import ViTExtractor
    from cytofm.models.loading import build_transform

    torch.manual_seed(0)
    model = build_vit(img_size=32, reg_tokens=1, **TINY)
    extractor = ViTExtractor(model, build_transform(None), device=CPU, pooling=pooling)
    bags = make_bags(sizes=(3,))
    extract_bags(bags, extractor, tmp_path / "set", batch_size=2)
    features = read_all(tmp_path / "set")[bags[0].bag_id]["features"]

    images = torch.stack([extractor.transform(Image.fromarray(tile)) for tile in bags[0].tiles])
    with torch.no_grad():
        tokens = model.forward_tokens(images)
    patch_mean = tokens[:, 2:].mean(dim=1)  # CLS and one register token come first
    expected = patch_mean if pooling == "mean" else torch.cat([tokens[:, 0], patch_mean], 1)
    assert extractor.embed_dim == expected.shape[1]
    torch.testing.assert_close(features, expected, rtol=0, atol=1e-6)


def test_pooling_rejects_unknown_value():
    from cytofm.evaluation.extractors import ViTExtractor
    from cytofm.models.loading import build_transform

    model = build_vit(img_size=32, **TINY)
    with pytest.raises(ValueError, match="backbone.pooling must be 'cls', 'mean' or 'cls\\+mean'"):
        ViTExtractor(model, build_transform(None), device=CPU, pooling="max")
