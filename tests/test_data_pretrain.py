"""Pretraining dataset: sources, bad-file handling, seeding, and the mixture sampler."""

from __future__ import annotations

import logging
import random

import numpy as np
import pytest
import torch
from PIL import Image

from cytofm.data.pretrain_dataset import (
    DataLoadingError,
    ImageSource,
    MixtureSampler,
    PretrainImageDataset,
    read_skipped_manifest,
)
from cytofm.data.sampler import split_by_weight


def _write_images(folder, count, size=(24, 16), start=0, suffix=".png"):
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for number in range(start, start + count):
        path = folder / f"img {number:03d}{suffix}"  # spaces on purpose
        Image.new("RGB", size, (number, 255 - number, 7)).save(path)
        paths.append(path)
    return paths


def _write_bad_files(folder):
    folder.mkdir(parents=True, exist_ok=True)
    full = folder / "full.jpg"
    noise = np.random.default_rng(1).integers(0, 256, size=(64, 64, 3), dtype=np.uint8)
    Image.fromarray(noise).save(full, quality=90)
    data = full.read_bytes()
    full.unlink()
    truncated = folder / "truncated.jpg"
    truncated.write_bytes(data[: len(data) // 2])
    empty = folder / "empty.png"
    empty.touch()
    text = folder / "readme.png"
    text.write_text("not an image")
    return {truncated, empty, text}


def _as_array(image):
    return np.asarray(image)


def test_bad_files_skipped_and_listed(tmp_path, caplog):
    good = _write_images(tmp_path / "images", 5)
    bad = _write_bad_files(tmp_path / "images")
    manifest = tmp_path / "run" / "skipped_files.csv"
    dataset = PretrainImageDataset(
        [ImageSource(tmp_path / "images")],
        _as_array,
        field_size=None,
        max_bad_fraction=1.0,
        skipped_manifest=manifest,
    )
    assert len(dataset) == 8

    good_colours = {tuple(np.asarray(Image.open(path))[0, 0]) for path in good}
    with caplog.at_level(logging.WARNING, logger="cytofm.data.pretrain_dataset"):
        for index in range(len(dataset)):
            pixels = dataset[(index, 123)]
            assert tuple(pixels[0, 0]) in good_colours

    listed = read_skipped_manifest(manifest)
    assert {path for path, _ in listed} == {str(path) for path in bad}
    assert all(reason for _, reason in listed)
    for path in bad:
        assert str(path) in caplog.text
    assert dataset.num_bad_files == 3
    assert dataset.failures >= 3


def test_bad_file_substitute_deterministic(tmp_path):
    _write_images(tmp_path / "images", 5)
    _write_bad_files(tmp_path / "images")
    kwargs = {"field_size": None, "max_bad_fraction": 1.0}
    first = PretrainImageDataset([ImageSource(tmp_path / "images")], _as_array, **kwargs)
    second = PretrainImageDataset([ImageSource(tmp_path / "images")], _as_array, **kwargs)
    bad_index = next(i for i in range(len(first)) if first.path(i).name == "empty.png")
    np.testing.assert_array_equal(first[(bad_index, 5)], second[(bad_index, 5)])
    np.testing.assert_array_equal(first[(bad_index, 5)], first[(bad_index, 5)])


def test_bad_share_over_limit_raises(tmp_path):
    _write_images(tmp_path / "images", 2)
    _write_bad_files(tmp_path / "images")
    dataset = PretrainImageDataset(
        [ImageSource(tmp_path / "images")], _as_array, max_bad_fraction=0.1, min_attempts=4
    )
    with pytest.raises(DataLoadingError, match="max_bad_fraction"):
        for index in range(len(dataset)):
            dataset[(index, 0)]


def test_all_bad_raises_clear_error(tmp_path):
    _write_bad_files(tmp_path / "images")
    dataset = PretrainImageDataset(
        [ImageSource(tmp_path / "images")], _as_array, max_bad_fraction=1.0
    )
    with pytest.raises(DataLoadingError, match="no readable image found"):
        dataset[(0, 0)]


def test_empty_source_raises(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match="contains no image files"):
        PretrainImageDataset([ImageSource(tmp_path / "empty")])
    with pytest.raises(FileNotFoundError, match="image source not found"):
        PretrainImageDataset([ImageSource(tmp_path / "missing")])


def test_recursive_listing_and_flag(tmp_path):
    _write_images(tmp_path / "root", 2)
    _write_images(tmp_path / "root" / "sub dir", 3, start=10, suffix=".jpg")
    (tmp_path / "root" / ".hidden").mkdir()
    _write_images(tmp_path / "root" / ".hidden", 1, start=50)
    assert len(PretrainImageDataset([ImageSource(tmp_path / "root")])) == 5
    flat = PretrainImageDataset([ImageSource(tmp_path / "root", recursive=False)])
    assert len(flat) == 2


def test_manifest_sources(tmp_path):
    paths = _write_images(tmp_path / "images", 3)
    text_manifest = tmp_path / "list.txt"
    text_manifest.write_text(f"# header comment\nimages/{paths[0].name}\n\n{paths[2]}\n")
    csv_manifest = tmp_path / "list.csv"
    csv_manifest.write_text(f"path,other\nimages/{paths[1].name},x\n")
    dataset = PretrainImageDataset(
        [ImageSource(text_manifest), ImageSource(csv_manifest)], field_size=None
    )
    assert len(dataset) == 3
    assert dataset.path(0) == paths[0]
    assert dataset.path(1) == paths[2]
    assert dataset.path(2) == paths[1]
    assert dataset[(2, 0)].size == (24, 16)

    bad_csv = tmp_path / "bad.csv"
    bad_csv.write_text("file\nx.png\n")
    with pytest.raises(ValueError, match="no 'path' column"):
        PretrainImageDataset([ImageSource(bad_csv)])


def test_large_field_cropped_not_resized(tmp_path):
    pixels = np.random.default_rng(0).integers(0, 256, size=(90, 130, 3), dtype=np.uint8)
    (tmp_path / "big").mkdir()
    Image.fromarray(pixels).save(tmp_path / "big" / "field.png")
    dataset = PretrainImageDataset([ImageSource(tmp_path / "big")], _as_array, field_size=40)
    crop = dataset[(0, 9)]
    assert crop.shape == (40, 40, 3)
    matches = [
        (y, x)
        for y in range(90 - 40 + 1)
        for x in range(130 - 40 + 1)
        if np.array_equal(pixels[y : y + 40, x : x + 40], crop)
    ]
    assert len(matches) == 1

    small = PretrainImageDataset([ImageSource(tmp_path / "big")], _as_array, field_size=100)
    assert small[(0, 9)].shape == (90, 100, 3)


def test_item_pure_function_of_key(tmp_path):
    _write_images(tmp_path / "images", 3, size=(64, 64))

    def noisy_transform(image):
        crop_x = random.randint(0, 10)
        return torch.rand(3) + np.random.rand() + crop_x

    dataset = PretrainImageDataset([ImageSource(tmp_path / "images")], noisy_transform)
    random.seed(1)
    torch.manual_seed(1)
    before = (random.random(), torch.rand(1).item())
    random.seed(1)
    torch.manual_seed(1)
    first = dataset[(1, 42)]
    second = dataset[(1, 42)]
    after = (random.random(), torch.rand(1).item())
    assert torch.equal(first, second)
    assert not torch.equal(first, dataset[(1, 43)])
    assert before == after  # caller's random streams untouched


def test_split_by_weight_exact():
    assert list(split_by_weight(10, [1, 1])) == [5, 5]
    assert list(split_by_weight(10, [3, 1])) == [8, 2]  # 7.5 / 2.5, tie goes to the first
    assert list(split_by_weight(7, [1, 1, 1])) == [3, 2, 2]
    assert sum(split_by_weight(1001, [0.2, 0.3, 0.5])) == 1001


class _Sizes:
    def __init__(self, sizes, weights):
        self.source_sizes = sizes
        self.source_weights = weights
        self.source_offsets = np.concatenate([[0], np.cumsum(sizes)])


def test_sampler_weighted_proportions():
    dataset = _Sizes([10, 400], [3.0, 1.0])
    sampler = MixtureSampler(dataset, samples_per_epoch=2000, seed=3)
    indices = [index for index, _ in sampler]
    from_first = sum(index < 10 for index in indices)
    assert len(indices) == 2000
    assert abs(from_first / 2000 - 0.75) <= 0.01
    # Each source is walked in permutations: counts of the small source differ by at most 1.
    counts = np.bincount([index for index in indices if index < 10], minlength=10)
    assert counts.max() - counts.min() <= 1


def test_sampler_proportions_over_epochs_and_datasets(tmp_path):
    _write_images(tmp_path / "a", 4)
    _write_images(tmp_path / "b", 12, start=100)
    dataset = PretrainImageDataset(
        [ImageSource(tmp_path / "a", weight=1.0), ImageSource(tmp_path / "b", weight=4.0)]
    )
    sampler = MixtureSampler(dataset, samples_per_epoch=333, seed=0)
    for epoch in range(3):
        sampler.set_epoch(epoch)
        share = np.mean([index < 4 for index, _ in sampler])
        assert abs(share - 0.2) < 0.01


def test_sampler_each_image_once_when_weights_match_sizes():
    dataset = _Sizes([5, 15], [5.0, 15.0])
    indices = sorted(index for index, _ in MixtureSampler(dataset, seed=1))
    assert indices == list(range(20))


def test_sampler_deterministic_and_epoch_dependent():
    dataset = _Sizes([7, 9], [1.0, 2.0])
    first = list(MixtureSampler(dataset, seed=5))
    second = list(MixtureSampler(dataset, seed=5))
    assert first == second
    other = MixtureSampler(dataset, seed=5)
    other.set_epoch(1)
    assert list(other) != first
    assert list(MixtureSampler(dataset, seed=6)) != first


def test_sampler_ranks_partition_global_order():
    dataset = _Sizes([7, 9], [1.0, 1.0])
    world = 3
    samplers = [MixtureSampler(dataset, seed=2, rank=r, world_size=world) for r in range(world)]
    per_rank = [list(sampler) for sampler in samplers]
    assert all(len(items) == 6 for items in per_rank)  # 16 padded to 18
    assert all(len(sampler) == 6 for sampler in samplers)
    interleaved = [per_rank[i % world][i // world] for i in range(18)]
    indices, seeds = samplers[0].global_order(0)
    assert [index for index, _ in interleaved] == indices.tolist()
    assert [seed for _, seed in interleaved] == seeds.tolist()


def test_sampler_set_start_resumes():
    dataset = _Sizes([10, 10], [1.0, 1.0])
    full = MixtureSampler(dataset, seed=0, rank=1, world_size=2)
    full.set_epoch(4)
    expected = list(full)[3:]
    resumed = MixtureSampler(dataset, seed=0, rank=1, world_size=2)
    resumed.set_epoch(4)
    resumed.set_start(3)
    assert len(resumed) == 7
    assert list(resumed) == expected
    resumed.set_epoch(5)
    assert len(resumed) == 10

    restored = MixtureSampler(dataset, seed=0, rank=1, world_size=2)
    state = {"seed": 0, "epoch": 4, "start": 3, "samples_per_epoch": 20, "world_size": 2}
    restored.load_state_dict(state)
    assert list(restored) == expected
    with pytest.raises(ValueError, match="seed differs"):
        restored.load_state_dict({**state, "seed": 1})


def test_dataloader_workers_skip_bad_files(tmp_path):
    _write_images(tmp_path / "images", 6, size=(16, 16))
    bad = _write_bad_files(tmp_path / "images")
    manifest = tmp_path / "run" / "skipped.csv"

    def to_tensor(image):
        return torch.from_numpy(np.asarray(image).copy())

    dataset = PretrainImageDataset(
        [ImageSource(tmp_path / "images")],
        to_tensor,
        max_bad_fraction=1.0,
        skipped_manifest=manifest,
    )
    sampler = MixtureSampler(dataset, samples_per_epoch=36, seed=0)
    loader = torch.utils.data.DataLoader(dataset, batch_size=6, sampler=sampler, num_workers=2)
    batches = list(loader)
    assert sum(batch.shape[0] for batch in batches) == 36
    listed = {path for path, _ in read_skipped_manifest(manifest)}
    assert listed == {str(path) for path in bad}
