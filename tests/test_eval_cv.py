"""Tests of splits, metrics and cross-validation on synthetic feature sets."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from cytofm.cli.eval_mil import main as eval_mil_main
from cytofm.config import load_config
from cytofm.evaluation.config import EvalConfig
from cytofm.evaluation.cross_validation import run_cross_validation
from cytofm.evaluation.feature_store import (
    FeatureSet,
    read_index,
    safe_file_name,
    save_bag_features,
)
from cytofm.evaluation.metrics import auroc, classification_metrics, summarize
from cytofm.evaluation.splits import cross_validation_folds, train_validation_split
from cytofm.evaluation.synthetic import planted_signal_bags, write_feature_set

FAST = [
    "folds=3",
    "model.hidden_dim=32",
    "model.attention_dim=16",
    "model.dropout=0.0",
    "train.lr=0.01",
    "train.epochs=30",
    "train.patience=10",
    "train.batch_size=8",
    "device=cpu",
]


def _config(tmp_path, folders, extra=()):
    overrides = [f"out={tmp_path / 'out'}"] + FAST + list(extra)
    sets = [{"name": name, "path": str(path)} for name, path in folders.items()]
    config = load_config(EvalConfig, None, overrides)
    config.feature_sets = load_config(EvalConfig, None, [f"feature_sets={sets}"]).feature_sets
    return config


def test_folds_never_share_group():
    rng = np.random.default_rng(0)
    groups = np.array([f"p{i}" for i in rng.integers(0, 30, size=120)])
    labels = rng.integers(0, 2, size=120)
    folds = cross_validation_folds(labels, groups, 5, seed=3)
    tested = np.concatenate([test for _, test in folds])
    assert sorted(tested.tolist()) == list(range(120))
    for train, test in folds:
        assert not set(groups[train]) & set(groups[test])
        inner, validation = train_validation_split(train, labels, groups, 0.2, seed=1)
        assert not set(groups[inner]) & set(groups[validation])
        assert sorted(np.concatenate([inner, validation]).tolist()) == sorted(train.tolist())


def test_folds_stratified_and_seeded():
    labels = np.array([0] * 40 + [1] * 10)
    folds = cross_validation_folds(labels, None, 5, seed=7)
    for _, test in folds:
        assert np.bincount(labels[test]).tolist() == [8, 2]
    again = cross_validation_folds(labels, None, 5, seed=7)
    other = cross_validation_folds(labels, None, 5, seed=8)
    assert all(np.array_equal(a[1], b[1]) for a, b in zip(folds, again))
    assert not all(np.array_equal(a[1], b[1]) for a, b in zip(folds, other))


def test_too_few_bags_per_class_raises():
    with pytest.raises(ValueError, match="class 1 has 2 bag"):
        cross_validation_folds(np.array([0] * 10 + [1] * 2), None, 3, seed=0)
    with pytest.raises(ValueError, match="only 2 groups"):
        cross_validation_folds(np.array([0, 1] * 4), np.array(["a", "b"] * 4), 3, seed=0)


def test_metrics_match_independent_values():
    y = np.array([0, 0, 1, 1, 2, 2])
    probs = np.array(
        [
            [0.8, 0.1, 0.1],
            [0.3, 0.6, 0.1],
            [0.2, 0.7, 0.1],
            [0.1, 0.2, 0.7],
            [0.1, 0.1, 0.8],
            [0.2, 0.2, 0.6],
        ]
    )
    metrics = classification_metrics(y, probs)
    # Predictions 0,1,1,2,2,2: per-class recall 1/2, 1/2, 1.
    assert metrics["balanced_accuracy"] == pytest.approx((0.5 + 0.5 + 1.0) / 3)
    assert metrics["accuracy"] == pytest.approx(4 / 6)
    one_vs_rest = [roc_auc_score(y == c, probs[:, c]) for c in range(3)]
    assert metrics["auroc"] == pytest.approx(np.mean(one_vs_rest))
    assert auroc(np.array([0, 0]), np.array([[0.4, 0.6], [0.9, 0.1]])) != auroc(
        np.array([0, 0]), np.array([[0.4, 0.6], [0.9, 0.1]])
    )  # NaN when a class is missing
    mean, std, count = summarize([0.5, 0.7, float("nan")])
    assert (mean, count) == (pytest.approx(0.6), 2)
    assert std == pytest.approx(np.std([0.5, 0.7], ddof=1))


def test_planted_signal_found_by_attention(tmp_path):
    data = planted_signal_bags(60, dim=4, marker=6.0, seed=1)
    folder = write_feature_set(tmp_path / "planted", data)
    config = _config(tmp_path, {"planted": folder})
    result = run_cross_validation(config, tmp_path / "out")
    aurocs = [fold.metrics["auroc"] for fold in result.rows[0].folds]
    assert np.mean(aurocs) > 0.95
    assert min(aurocs) > 0.9

    hits, positives = 0, 0
    for fold in range(3):
        attention = torch.load(
            tmp_path / "out" / "planted" / "abmil" / "seed0" / f"fold{fold}" / "attention.pt",
            weights_only=True,
        )
        for bag_id, marker in zip(data.bag_ids, data.marker_index):
            if marker is None or bag_id not in attention:
                continue
            positives += 1
            hits += int(attention[bag_id]["attention"].argmax()) == marker
    assert positives == 30
    assert hits >= 27


def test_random_labels_give_chance_auroc(tmp_path):
    data = planted_signal_bags(120, random_labels=True, seed=2)
    folder = write_feature_set(tmp_path / "random", data)
    config = _config(tmp_path, {"random": folder}, ["folds=4", "seeds=[0,1]"])
    result = run_cross_validation(config)
    aurocs = [fold.metrics["auroc"] for fold in result.rows[0].folds]
    assert len(aurocs) == 8
    assert 0.35 < np.mean(aurocs) < 0.65


def test_same_seed_same_results(tmp_path):
    folder = write_feature_set(tmp_path / "planted", planted_signal_bags(30, seed=3))
    config = _config(tmp_path, {"a": folder}, ["train.max_instances=6", "model.dropout=0.25"])
    first = run_cross_validation(config, tmp_path / "first")
    second = run_cross_validation(config, tmp_path / "second")
    assert [f.metrics for f in first.rows[0].folds] == [f.metrics for f in second.rows[0].folds]
    for fold in range(3):
        name = f"a/abmil/seed0/fold{fold}/predictions.csv"
        text = (tmp_path / "first" / name).read_text()
        assert text == (tmp_path / "second" / name).read_text()
    config.seeds = [1]
    third = run_cross_validation(config)
    assert [f.metrics for f in third.rows[0].folds] != [f.metrics for f in first.rows[0].folds]


def test_empty_bag_error_names_bag(tmp_path):
    data = planted_signal_bags(12, seed=4)
    folder = write_feature_set(tmp_path / "set", data)
    empty_id = data.bag_ids[5]
    save_bag_features(
        folder / "features" / safe_file_name(empty_id),
        torch.zeros(0, 16),
        torch.zeros(0, 4, dtype=torch.int64),
    )
    config = _config(tmp_path, {"set": folder}, ["folds=2"])
    with pytest.raises(ValueError, match="bag 'case 0005/slide' has no instances") as caught:
        run_cross_validation(config)
    assert "tile_size" in str(caught.value)
    assert "bags.background_threshold" in str(caught.value)


def test_missing_label_error_names_bag(tmp_path):
    data = planted_signal_bags(12, seed=5)
    folder = write_feature_set(tmp_path / "set", data)
    labels_csv = tmp_path / "labels.csv"
    with labels_csv.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["bag_id", "label"])
        for bag_id, label in list(zip(data.bag_ids, data.labels))[:-1]:
            writer.writerow([bag_id, label])
    config = _config(tmp_path, {"set": folder}, ["folds=2", f"labels.csv={labels_csv}"])
    with pytest.raises(ValueError, match="bag 'case 0011/slide' has no label"):
        run_cross_validation(config)
    config.labels.drop_unlabelled = True
    assert run_cross_validation(config).num_bags == 11


def test_label_mapping_merges_and_drops(tmp_path):
    data = planted_signal_bags(18, seed=6)
    data.labels = [["NILM", "LSIL", "HSIL"][i % 3] for i in range(18)]
    folder = write_feature_set(tmp_path / "set", data)
    mapping = "labels.mapping={NILM: normal, LSIL: null, HSIL: abnormal}"
    config = _config(tmp_path, {"set": folder}, ["folds=2", "train.epochs=2", mapping])
    result = run_cross_validation(config)
    assert result.class_names == ["abnormal", "normal"]
    assert result.num_bags == 12
    config.labels.mapping = {"NILM": "normal"}
    with pytest.raises(ValueError, match="label 'LSIL' of bag 'case 0001/slide'"):
        run_cross_validation(config)


def test_three_classes_give_ovr_auroc(tmp_path):
    data = planted_signal_bags(18, seed=9)
    data.labels = [["NILM", "LSIL", "HSIL"][i % 3] for i in range(18)]
    folder = write_feature_set(tmp_path / "set", data)
    config = _config(tmp_path, {"set": folder}, ["folds=2", "train.epochs=2"])
    result = run_cross_validation(config)
    assert result.class_names == ["HSIL", "LSIL", "NILM"]
    for fold in result.rows[0].folds:
        assert np.array(fold.confusion).shape == (3, 3)
        assert np.array(fold.confusion).sum() == fold.num_test
        assert 0.0 <= fold.metrics["auroc"] <= 1.0


def test_cli_writes_comparison_outputs(tmp_path):
    folder_a = write_feature_set(tmp_path / "a", planted_signal_bags(24, seed=7))
    folder_b = write_feature_set(tmp_path / "b", planted_signal_bags(24, marker=0.0, seed=7))
    config_file = tmp_path / "eval.yaml"
    config_file.write_text(
        "feature_sets:\n"
        f"  - {{name: marked, path: {folder_a}}}\n"
        f"  - {{name: plain, path: {folder_b}}}\n"
        "model:\n  heads: [abmil, mean]\n"
    )
    out = tmp_path / "out"
    code = eval_mil_main(
        ["--config", str(config_file), f"out={out}", *FAST, "train.epochs=3", "seeds=[0,1]"]
    )
    assert code == 0

    results = json.loads((out / "results.json").read_text())
    rows = [(row["feature_set"], row["head"]) for row in results["rows"]]
    assert rows == [("marked", "abmil"), ("marked", "mean"), ("plain", "abmil"), ("plain", "mean")]
    assert all(row["runs"] == 6 for row in results["rows"])
    confusion = np.array(results["rows"][0]["confusion"])
    assert confusion.sum() == 24 * 2  # every bag is tested once per seed
    with (out / "results.csv").open() as handle:
        assert len(list(csv.DictReader(handle))) == 4

    markdown = (out / "results.md").read_text()
    assert "| marked | abmil | 6 |" in markdown
    assert "±" in markdown
    assert (out / "config.yaml").is_file()
    assert "marked/abmil/seed1/fold2" in (out / "eval.log").read_text()

    predictions = out / "plain" / "mean" / "seed1" / "fold0" / "predictions.csv"
    with predictions.open() as handle:
        header = next(csv.reader(handle))
    assert header == ["bag_id", "group", "label", "predicted", "prob_negative", "prob_positive"]


def test_cli_bad_override_exit_code(tmp_path):
    assert eval_mil_main([f"out={tmp_path}", "folds=1"]) == 2
    assert eval_mil_main([f"out={tmp_path}", "no_such_key=1"]) == 2


def test_index_round_trip(tmp_path):
    data = planted_signal_bags(4, seed=8)
    folder = write_feature_set(tmp_path / "set", data, with_groups=False)
    rows = read_index(folder / "index.csv")
    assert [row.bag_id for row in rows] == data.bag_ids
    assert [row.group for row in rows] == [None] * 4
    assert [row.num_instances for row in rows] == [len(bag) for bag in data.bags]
    assert len({row.file for row in rows}) == 4
    assert all("/" not in row.file and " " not in row.file for row in rows)


def _write_labels(path, pairs):
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["bag_id", "label"])
        writer.writerows(pairs)
    return path


def test_labelled_bag_without_features_raises(tmp_path):
    data = planted_signal_bags(12, seed=9)
    folder = write_feature_set(tmp_path / "set", data)
    ghosts = [(f"ghost {i}", "positive") for i in range(7)]
    labels_csv = _write_labels(tmp_path / "labels.csv", [*zip(data.bag_ids, data.labels), *ghosts])
    config = _config(tmp_path, {"set": folder}, ["folds=2", f"labels.csv={labels_csv}"])
    with pytest.raises(ValueError, match="7 labelled bag") as caught:
        run_cross_validation(config)
    message = str(caught.value)
    assert "'ghost 0'" in message
    assert "'ghost 6'" not in message  # only the first few ids are listed
    assert str(folder) in message
    assert "labels.allow_missing_features" in message
    config.labels.allow_missing_features = True
    config.train.epochs = 2
    assert run_cross_validation(config).num_bags == 12


@pytest.mark.parametrize("smaller_first", [True, False])
def test_feature_sets_with_other_bags_raise(tmp_path, smaller_first):
    data = planted_signal_bags(12, seed=10)
    full = write_feature_set(tmp_path / "full", data)
    data.bag_ids, data.bags = data.bag_ids[:10], data.bags[:10]
    data.labels, data.groups = data.labels[:10], data.groups[:10]
    part = write_feature_set(tmp_path / "part", data)
    folders = {"part": part, "full": full} if smaller_first else {"full": full, "part": part}
    config = _config(tmp_path, folders, ["folds=2"])
    with pytest.raises(ValueError, match="'case 0010/slide'") as caught:
        run_cross_validation(config, tmp_path / "out")
    message = str(caught.value)
    assert "'full'" in message
    assert "'part'" in message
    assert not (tmp_path / "out" / "full").exists()  # raised before any training


def test_missing_second_feature_set_raises_first(tmp_path):
    folder = write_feature_set(tmp_path / "set", planted_signal_bags(12, seed=11))
    config = _config(tmp_path, {"set": folder, "gone": tmp_path / "gone"}, ["folds=2"])
    with pytest.raises(FileNotFoundError, match="gone"):
        run_cross_validation(config, tmp_path / "out")
    assert not (tmp_path / "out" / "set").exists()


def test_cli_error_has_no_stray_quotes(tmp_path, capsys):
    data = planted_signal_bags(12, seed=12)
    full = write_feature_set(tmp_path / "full", data)
    data.bag_ids, data.bags = data.bag_ids[:10], data.bags[:10]
    data.labels, data.groups = data.labels[:10], data.groups[:10]
    part = write_feature_set(tmp_path / "part", data)
    sets = f"feature_sets=[{{name: part, path: {part}}}, {{name: full, path: {full}}}]"
    out = tmp_path / "out"
    assert eval_mil_main([f"out={out}", *FAST, "folds=2", sets]) == 1
    assert capsys.readouterr().err.startswith("cytofm-eval-mil: feature sets 'part' (")
    assert not out.exists()  # the feature sets are checked before out is created


def test_non_finite_feature_names_bag_and_file(tmp_path):
    data = planted_signal_bags(12, seed=13)
    data.bags[4][2, 1] = float("nan")
    folder = write_feature_set(tmp_path / "set", data)
    config = _config(tmp_path, {"set": folder}, ["folds=2"])
    with pytest.raises(ValueError, match="bag 'case 0004/slide'") as caught:
        run_cross_validation(config)
    assert safe_file_name("case 0004/slide") in str(caught.value)


def test_truncated_feature_file_names_file(tmp_path):
    data = planted_signal_bags(12, seed=14)
    folder = write_feature_set(tmp_path / "set", data)
    path = folder / "features" / safe_file_name(data.bag_ids[3])
    path.write_bytes(path.read_bytes()[:100])
    config = _config(tmp_path, {"set": folder}, ["folds=2"])
    with pytest.raises(ValueError, match="overwrite=true") as caught:
        run_cross_validation(config)
    assert str(path) in str(caught.value)


def test_too_few_bags_names_class_label():
    labels = np.array([0] * 10 + [1] * 5)
    with pytest.raises(ValueError, match="class 'positive' has 5 bag"):
        cross_validation_folds(labels, None, 6, seed=0, class_names=["negative", "positive"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cli_cuda_without_gpu_fails_cleanly(tmp_path, capsys):
    folder = write_feature_set(tmp_path / "set", planted_signal_bags(12, seed=15))
    out = tmp_path / "out"
    sets = f"feature_sets=[{{name: set, path: {folder}}}]"
    assert eval_mil_main([f"out={out}", *FAST, "device=cuda", sets]) == 1
    assert capsys.readouterr().err == (
        "cytofm-eval-mil: CUDA requested but not available (device=cuda); use device=cpu or auto\n"
    )


def test_unknown_bag_error_without_quotes(tmp_path):
    folder = write_feature_set(tmp_path / "set", planted_signal_bags(4, seed=16))
    with pytest.raises(KeyError) as caught:
        FeatureSet(folder).row("nope")
    assert str(caught.value) == f"bag 'nope' not found in feature set {folder}"


def test_labels_csv_with_bom_read(tmp_path):
    from cytofm.evaluation.bag_table import load_label_table
    from cytofm.evaluation.config import LabelsConfig

    labels_csv = tmp_path / "labels.csv"
    # Excel's "CSV UTF-8" starts the file with a byte order mark.
    labels_csv.write_text("bag_id,label\na,pos\nb,neg\nc,pos\n", encoding="utf-8-sig")
    assert labels_csv.read_bytes().startswith(b"\xef\xbb\xbf")
    table = load_label_table(LabelsConfig(csv=labels_csv), tmp_path / "unused.csv", ["a", "b", "c"])
    assert table.bag_ids == ["a", "b", "c"]
    assert table.class_names == ["neg", "pos"]
    assert table.labels.tolist() == [1, 0, 1]


def test_index_with_bom_read(tmp_path):
    path = tmp_path / "index.csv"
    path.write_text(
        "bag_id,label,group,split,num_instances,file\na,pos,,,3,a.pt\n", encoding="utf-8-sig"
    )
    rows = read_index(path)
    assert [row.bag_id for row in rows] == ["a"]
    assert rows[0].num_instances == 3


def _write_earlier_run(out):
    """An earlier 3-fold run over feature sets a and b, plus files of the user's own."""
    for name in ("a", "b"):
        for fold in range(3):
            fold_dir = out / name / "abmil" / "seed0" / f"fold{fold}"
            fold_dir.mkdir(parents=True)
            (fold_dir / "predictions.csv").write_text("bag_id\n")
    (out / "results.json").write_text(json.dumps({"rows": [{"feature_set": "a"}]}))
    (out / "results.md").write_text("# old\n")
    (out / "config.yaml").write_text("feature_sets:\n- {name: a, path: x}\n- {name: b, path: y}\n")
    (out / "eval.log").write_text("old log\n")
    (out / "notes.txt").write_text("mine\n")
    (out / "figures").mkdir()


def test_earlier_run_rejected_without_overwrite(tmp_path):
    from cytofm.evaluation.run_folder import EarlierRunError, prepare_run_folder

    out = tmp_path / "out"
    _write_earlier_run(out)
    with pytest.raises(EarlierRunError) as raised:
        prepare_run_folder(out, overwrite=False)
    message = str(raised.value)
    assert message.startswith(f"{out} already contains an evaluation (")
    assert "overwrite=true" in message
    assert (out / "a" / "abmil" / "seed0" / "fold2").is_dir()
    assert prepare_run_folder(tmp_path / "fresh", overwrite=False) == []


def test_overwrite_deletes_only_run_outputs(tmp_path):
    from cytofm.evaluation.run_folder import prepare_run_folder

    out = tmp_path / "out"
    _write_earlier_run(out)
    deleted = prepare_run_folder(out, overwrite=True)
    assert len(deleted) == 6  # 4 run files and the folders of feature sets a and b
    assert sorted(path.name for path in out.iterdir()) == ["figures", "notes.txt"]


def test_cli_overwrite_replaces_earlier_run(tmp_path, capsys):
    out = tmp_path / "out"
    _write_earlier_run(out)
    folder = write_feature_set(tmp_path / "set", planted_signal_bags(8, seed=9))
    sets = f"feature_sets=[{{name: a, path: {folder}}}]"
    argv = [f"out={out}", *FAST, "folds=2", "train.epochs=1", "num_threads=1", sets]
    assert eval_mil_main(argv) == 1
    assert capsys.readouterr().err.startswith(f"cytofm-eval-mil: {out} already contains")
    assert (out / "results.md").read_text() == "# old\n"

    assert eval_mil_main([*argv, "overwrite=true"]) == 0
    assert sorted(path.name for path in (out / "a" / "abmil" / "seed0").iterdir()) == [
        "fold0",
        "fold1",
    ]
    assert not (out / "b").exists()
    assert (out / "notes.txt").read_text() == "mine\n"
    assert json.loads((out / "results.json").read_text())["rows"][0]["runs"] == 2


def test_cli_out_below_a_file_fails_cleanly(tmp_path, capsys):
    blocker = tmp_path / "cell.png"
    blocker.write_bytes(b"not a folder")
    folder = write_feature_set(tmp_path / "set", planted_signal_bags(8, seed=9))
    sets = f"feature_sets=[{{name: a, path: {folder}}}]"
    assert eval_mil_main([f"out={blocker / 'x'}", *FAST, sets]) == 1
    assert capsys.readouterr().err == (
        f"cytofm-eval-mil: cannot create output folder {blocker / 'x'}: {blocker} is a file, "
        "not a folder; choose another output path\n"
    )


def _snapshot(folder):
    """Map every file below ``folder`` to its bytes."""
    return {
        path.relative_to(folder): path.read_bytes()
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


def test_cli_rejects_out_holding_feature_set(tmp_path, capsys):
    out = tmp_path / "ev2"
    folder = write_feature_set(out / "cls", planted_signal_bags(8, seed=9))
    (out / "results.json").write_text(json.dumps({"rows": [{"feature_set": "cls"}]}))
    (out / "results.md").write_text("# old\n")
    before = _snapshot(out)
    sets = f"feature_sets=[{{name: cls, path: {folder}}}]"
    for overwrite in ("overwrite=false", "overwrite=true"):
        assert eval_mil_main([f"out={out}", *FAST, "folds=2", sets, overwrite]) == 1
        message = capsys.readouterr().err
        assert message.startswith(f"cytofm-eval-mil: out={out}: "), overwrite
        assert f"feature set 'cls' ({folder})" in message
        assert "Choose another out=" in message
        assert _snapshot(out) == before, overwrite


def test_cli_rejects_feature_set_below_eval_folder(tmp_path, capsys):
    out = tmp_path / "eval"
    folder = write_feature_set(out / "cls" / "features_v1", planted_signal_bags(8, seed=9))
    sets = f"feature_sets=[{{name: cls, path: {folder}}}]"
    assert eval_mil_main([f"out={out}", *FAST, "folds=2", sets, "overwrite=true"]) == 1
    message = capsys.readouterr().err
    assert f"writes or deletes {out / 'cls'}, which is or contains the feature set" in message
    assert (folder / "meta.json").is_file()
    assert not (out / "config.yaml").exists()


def test_earlier_eval_folder_with_features_kept(tmp_path):
    from cytofm.evaluation.run_folder import OutputConflictError, prepare_run_folder

    out = tmp_path / "out"
    _write_earlier_run(out)
    nested = write_feature_set(out / "b" / "copy", planted_signal_bags(4, seed=9))
    with pytest.raises(OutputConflictError) as raised:
        prepare_run_folder(out, overwrite=True, names=["a"])
    message = str(raised.value)
    assert f"writes or deletes {out / 'b'}, which contains the feature folder {nested}" in message
    assert "(meta.json and index.csv of cytofm-extract)" in message
    assert (nested / "index.csv").is_file()
    assert (out / "results.md").read_text() == "# old\n"


def test_labels_table_below_eval_folder_rejected(tmp_path):
    from cytofm.evaluation.run_folder import OutputConflictError, check_run_folder

    out = tmp_path / "out"
    labels = out / "a" / "labels.csv"
    labels.parent.mkdir(parents=True)
    labels.write_text("bag_id,label\n")
    with pytest.raises(OutputConflictError, match="contains the labels table"):
        check_run_folder(out, True, names=["a"], inputs={"labels table": labels})
    assert check_run_folder(out, True, names=["b"], inputs={"labels table": labels}) == []


@pytest.mark.parametrize("overwrite", ["overwrite=false", "overwrite=true"])
def test_cli_rejects_feature_folder_as_out(tmp_path, capsys, overwrite):
    folder = write_feature_set(tmp_path / "features" / "cls", planted_signal_bags(8, seed=9))
    (folder / "config.yaml").write_text("backbone: {source: handcrafted}\n")
    before = _snapshot(folder)
    sets = f"feature_sets=[{{name: cls, path: {folder}}}]"
    assert eval_mil_main([f"out={folder}", *FAST, "folds=2", sets, overwrite]) == 1
    message = capsys.readouterr().err
    assert message.startswith(f"cytofm-eval-mil: out={folder} is a feature folder of ")
    assert "(it contains meta.json and index.csv)" in message
    assert "already contains an evaluation" not in message
    assert _snapshot(folder) == before


def test_cli_overwrite_with_bad_path_keeps_run(tmp_path, capsys):
    out = tmp_path / "out"
    _write_earlier_run(out)
    before = _snapshot(out)
    folder = write_feature_set(tmp_path / "set", planted_signal_bags(8, seed=9))
    typo = tmp_path / "sett"
    argv = [f"out={out}", *FAST, "folds=2", "overwrite=true"]
    assert eval_mil_main([*argv, f"feature_sets=[{{name: a, path: {typo}}}]"]) == 1
    assert capsys.readouterr().err == f"cytofm-eval-mil: feature set folder not found: {typo}\n"
    assert _snapshot(out) == before

    sets = f"feature_sets=[{{name: a, path: {folder}}}]"
    missing_labels = tmp_path / "labels.csv"
    assert eval_mil_main([*argv, sets, f"labels.csv={missing_labels}"]) == 1
    assert capsys.readouterr().err == (
        f"cytofm-eval-mil: labels table not found: {missing_labels}; check labels.csv\n"
    )
    assert _snapshot(out) == before


def test_cli_early_warnings_reach_log(tmp_path):
    data = planted_signal_bags(9, seed=9)
    folder = write_feature_set(tmp_path / "set", data)
    labels_csv = tmp_path / "labels.csv"
    rows = ["bag_id,label"] + [f"{b},{label}" for b, label in zip(data.bag_ids, data.labels)]
    labels_csv.write_text("\n".join(rows[:-1]) + "\n")
    out = tmp_path / "out"
    argv = [
        f"out={out}",
        *FAST,
        "folds=2",
        "train.epochs=1",
        f"feature_sets=[{{name: a, path: {folder}}}]",
        f"labels.csv={labels_csv}",
        "labels.drop_unlabelled=true",
    ]
    assert eval_mil_main(argv) == 0
    log = (out / "eval.log").read_text()
    assert f"bag {data.bag_ids[-1]!r} has no label in {labels_csv}; left out" in log


@pytest.mark.parametrize("name", ["..", "a/b", ""])
def test_feature_set_name_must_be_folder_name(name):
    from cytofm.config import ConfigError

    with pytest.raises(ConfigError, match="must be one folder name"):
        load_config(EvalConfig, None, [f"feature_sets=[{{name: '{name}', path: x}}]"])
