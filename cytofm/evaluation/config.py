"""Config of ``cytofm-eval-mil``: feature sets, the label task, the MIL heads and training."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from cytofm.config import ConfigError


@dataclass
class FeatureSetConfig:
    """One set of extracted features to compare.

    Attributes:
        name: row name in the comparison table.
        path: folder written by ``cytofm-extract`` (contains ``index.csv``).
        instances: ``tiles`` uses one embedding per tile; ``patch_tokens`` uses every patch
            token of every tile as an instance (needs extraction with ``patch_tokens: true``),
            so that a single image can be a bag of its tokens.
    """

    name: str
    path: Path
    instances: Literal["tiles", "patch_tokens"] = "tiles"


@dataclass
class LabelsConfig:
    """Source of bag labels and groups, and the mapping of labels onto classes.

    Attributes:
        csv: table with one row per bag; None reads the first feature set's ``index.csv``.
        id_column: column with the bag id (as in the feature index).
        label_column: column with the raw label.
        group_column: column with the group (e.g. patient); folds keep each group whole.
            Ignored when the column is absent or empty for every bag.
        mapping: raw label to class name, e.g. ``{NILM: normal, HSIL: abnormal}``; a value of
            null leaves those bags out. Labels missing from a given mapping are an error.
        classes: class order for outputs; None sorts the class names.
        drop_unlabelled: leave out bags that have features but no label, instead of raising.
        allow_missing_features: leave out labelled bags of ``csv`` that have no features,
            instead of raising.
    """

    csv: Path | None = None
    id_column: str = "bag_id"
    label_column: str = "label"
    group_column: str | None = "group"
    mapping: dict | None = None
    classes: list[str] | None = None
    drop_unlabelled: bool = False
    allow_missing_features: bool = False


@dataclass
class ModelConfig:
    """Bag-level heads; each head in ``heads`` gets its own row per feature set.

    The sizes are those of the gated attention head; ``mean`` uses only ``dropout``.
    """

    heads: list[Literal["abmil", "mean"]] = field(default_factory=lambda: ["abmil"])
    hidden_dim: int = 512
    attention_dim: int = 256
    dropout: float = 0.25


@dataclass
class TrainConfig:
    """Optimisation of one fold.

    Attributes:
        lr: AdamW learning rate.
        weight_decay: AdamW weight decay.
        epochs: maximum number of epochs.
        patience: stop after this many epochs without a lower validation loss; the weights of
            the best epoch are kept.
        batch_size: bags per optimisation step (padded, with a mask).
        max_instances: random subsample of instances per bag and step during training (None
            keeps all); validation and test always use all instances.
        val_fraction: part of each training fold held out for early stopping.
        class_weighted: weight the cross-entropy by inverse class frequency of the training
            split, for imbalanced classes.
        standardize: z-score each feature with the mean and standard deviation of the
            training split's instances, so that feature sets of different scales train alike
            at one learning rate.
    """

    lr: float = 2e-4
    weight_decay: float = 1e-4
    epochs: int = 50
    patience: int = 10
    batch_size: int = 16
    max_instances: int | None = 512
    val_fraction: float = 0.2
    class_weighted: bool = True
    standardize: bool = True


@dataclass
class EvalConfig:
    """Everything ``cytofm-eval-mil`` reads.

    Attributes:
        feature_sets: the feature sets to compare; each must contain every labelled bag.
        labels: label task.
        out: output folder for the tables, predictions, attention, config and log.
        folds: number of cross-validation folds.
        seeds: one full cross-validation per seed (the seed sets the folds, the validation
            split, the initialisation and the batch order).
        model: bag-level heads.
        train: optimisation.
        device: ``auto`` (CUDA when available), ``cpu``, ``cuda`` or ``cuda:N``.
        num_threads: torch intra-op CPU threads; None keeps torch's default. The heads are
            small, so on a busy machine 1 thread can be several times faster than more.
        overwrite: when ``out`` contains an earlier evaluation, delete its results, config,
            log and feature-set folders first (other files are kept); without it such an
            ``out`` is an error.
    """

    feature_sets: list[FeatureSetConfig] = field(default_factory=list)
    labels: LabelsConfig = field(default_factory=LabelsConfig)
    out: Path = Path("outputs/eval_mil")
    folds: int = 5
    seeds: list[int] = field(default_factory=lambda: [0])
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    device: str = "auto"
    num_threads: int | None = None
    overwrite: bool = False

    def __post_init__(self) -> None:
        check_eval_config(self)


def check_eval_config(config: EvalConfig) -> None:
    """Raise ConfigError on values that would only fail later, naming the key."""
    problems: list[str] = []
    names = [feature_set.name for feature_set in config.feature_sets]
    if len(set(names)) != len(names):
        problems.append(f"feature_sets: names must be unique, got {names}")
    for name in names:
        if name in ("", ".", "..") or "/" in name or "\\" in name:
            problems.append(
                f"feature_sets: name {name!r} must be one folder name, because its results "
                "go to out/<name>; use a name without '/' or '\\' that is not '.' or '..'"
            )
    if config.folds < 2:
        problems.append(f"folds: must be at least 2, got {config.folds}")
    if config.num_threads is not None and config.num_threads < 1:
        problems.append(f"num_threads: must be positive or null, got {config.num_threads}")
    if not config.seeds:
        problems.append("seeds: give at least one seed")
    if not config.model.heads:
        problems.append("model.heads: give at least one of abmil, mean")
    if not 0.0 <= config.model.dropout < 1.0:
        problems.append(f"model.dropout: must be in [0, 1), got {config.model.dropout}")
    train: Any = config.train
    for key in ("epochs", "batch_size"):
        if getattr(train, key) < 1:
            problems.append(f"train.{key}: must be at least 1, got {getattr(train, key)}")
    if train.patience < 1:
        problems.append(f"train.patience: must be at least 1, got {train.patience}")
    if train.max_instances is not None and train.max_instances < 1:
        problems.append(
            f"train.max_instances: must be at least 1 or null, got {train.max_instances}"
        )
    if not 0.0 < train.val_fraction < 0.5:
        problems.append(f"train.val_fraction: must be in (0, 0.5), got {train.val_fraction}")
    if problems:
        raise ConfigError("; ".join(problems))
