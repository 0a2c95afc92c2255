"""Embedding maps: loading feature sets, reproducible projections, separation scores."""

from __future__ import annotations

import csv

import numpy as np
import pytest
from PIL import Image
from sklearn.neighbors import KNeighborsClassifier
from threadpoolctl import threadpool_limits

from cytofm.visualize.embeddings import (
    UNLABELLED,
    embed_2d,
    load_feature_points,
    run_embeddings,
    separation_score,
)
from tests.visualize_fixtures import write_feature_set


@pytest.fixture(autouse=True)
def single_thread():
    # t-SNE's OpenMP threads slow down badly on a shared machine; one thread keeps tests short.
    with threadpool_limits(limits=1):
        yield


def two_clusters(count: int = 30, dimensions: int = 16, distance: float = 20.0, seed: int = 0):
    generator = np.random.default_rng(seed)
    features = generator.normal(size=(count, dimensions))
    labels = np.array(["a", "b"] * (count // 2))
    # Opposite directions from the origin, so the clusters are apart in cosine distance too.
    features[:, 0] += np.where(labels == "b", distance / 2, -distance / 2)
    return features, labels


@pytest.mark.parametrize("method", ["tsne", "pca"])
def test_embed_2d_same_seed_same_map(method):
    features, _ = two_clusters()
    first = embed_2d(features, method=method, seed=3)
    second = embed_2d(features, method=method, seed=3)
    assert first.shape == (len(features), 2)
    np.testing.assert_array_equal(first, second)


def test_embed_2d_keeps_clusters_apart():
    features, labels = two_clusters()
    coordinates = embed_2d(features, method="tsne", seed=0)
    classifier = KNeighborsClassifier(n_neighbors=3).fit(coordinates, labels)
    # Leave-one-out would be stricter; training accuracy of 3-NN still fails for mixed clusters.
    assert classifier.score(coordinates, labels) == 1.0


def test_embed_2d_needs_three_points():
    with pytest.raises(ValueError, match="at least 3 points"):
        embed_2d(np.zeros((2, 4)), method="pca")


def test_embed_2d_umap_missing_is_clear():
    try:
        import umap  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="umap-learn"):
            embed_2d(np.zeros((5, 4)), method="umap")
    else:
        pytest.skip("umap-learn is installed")


def test_separation_score_values():
    features, labels = two_clusters()
    assert separation_score(features, labels) > 0.5
    shuffled = np.random.default_rng(0).permutation(labels)
    assert abs(separation_score(features, shuffled)) < 0.2
    assert np.isnan(separation_score(features, ["a"] * len(features)))
    assert np.isnan(separation_score(features, [UNLABELLED] * len(features)))


def test_load_feature_points_levels(tmp_path):
    generator = np.random.default_rng(0)
    bags = {
        "bag_a": ("negative", generator.normal(size=(4, 8))),
        "bag_b": ("positive", generator.normal(size=(6, 8))),
        "bag_c": ("", generator.normal(size=(2, 8))),
    }
    root = write_feature_set(tmp_path / "set", bags)

    per_bag = load_feature_points(root, level="bag")
    assert per_bag.bag_ids == ["bag_a", "bag_b", "bag_c"]
    assert per_bag.labels == ["negative", "positive", UNLABELLED]
    np.testing.assert_allclose(per_bag.features[1], bags["bag_b"][1].mean(axis=0), rtol=1e-5)
    assert per_bag.name == "set"

    per_instance = load_feature_points(root, level="instance")
    assert per_instance.features.shape == (12, 8)
    assert per_instance.labels.count("positive") == 6

    sampled = load_feature_points(root, level="instance", max_points=5, seed=1)
    assert sampled.features.shape == (5, 8)
    again = load_feature_points(root, level="instance", max_points=5, seed=1)
    np.testing.assert_array_equal(sampled.features, again.features)


def test_load_feature_points_missing_index(tmp_path):
    with pytest.raises(FileNotFoundError, match="index.csv"):
        load_feature_points(tmp_path)


def test_run_embeddings_writes_panels_and_csv(tmp_path):
    features, labels = two_clusters(count=12)
    bags = {
        f"bag{i}": (label, row[None, :]) for i, (label, row) in enumerate(zip(labels, features))
    }
    first = write_feature_set(tmp_path / "backbone_a", bags)
    second = write_feature_set(tmp_path / "backbone_b", bags)
    written = run_embeddings([first, second], tmp_path / "out", method="pca", names=["A", "B"])

    assert [path.name for path in written] == ["embeddings_bag_pca.png", "embeddings_bag_pca.csv"]
    with Image.open(written[0]) as figure:
        assert figure.format == "PNG"
    with written[1].open() as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 24
    assert {row["feature_set"] for row in rows} == {"A", "B"}
    assert rows[0]["bag_id"] == "bag0"
    assert rows[0]["label"] == labels[0]


def test_run_embeddings_rejects_name_count(tmp_path):
    with pytest.raises(ValueError, match="1 name"):
        run_embeddings([tmp_path / "a", tmp_path / "b"], tmp_path, names=["only"])
