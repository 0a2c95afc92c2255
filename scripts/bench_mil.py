"""Time a full ABMIL cross-validation against a one-bag-per-step loop, in the same run.

The batched side is ``cytofm.evaluation.cross_validation.run_cross_validation`` (padded
batches of bags with a mask). The baseline is the common loop of CLAM-style code, written out
here: one bag per forward pass and optimiser step, same head, same folds, same epochs. Early
stopping is off on both sides (patience = epochs), so both do the same number of epochs, and
all instances are used. Both report their AUROC, so speed is not bought with accuracy.

    python scripts/bench_mil.py --bags 200 --instances 500 --dim 384 --epochs 10
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from cytofm.config import load_config
from cytofm.evaluation.abmil import GatedAttentionMIL
from cytofm.evaluation.bag_table import load_features
from cytofm.evaluation.config import EvalConfig
from cytofm.evaluation.cross_validation import (
    build_splits,
    fold_seed,
    load_task,
    resolve_device,
    run_cross_validation,
)
from cytofm.evaluation.metrics import auroc
from cytofm.evaluation.synthetic import planted_signal_bags, write_feature_set
from cytofm.evaluation.train import class_weights

logger = logging.getLogger("bench_mil")


def one_bag_per_step(config: EvalConfig, device: torch.device) -> list[float]:
    """Cross-validate with one bag per step; returns the AUROC of every fold."""
    table = load_task(config)
    features = load_features(config.feature_sets[0], table.bag_ids)
    bags = [bag.to(device) for bag in features.bags]
    labels = torch.as_tensor(table.labels)
    num_classes = len(table.class_names)
    aurocs = []
    for seed, folds in build_splits(table, config).items():
        for fold, ((train, validation), test) in enumerate(folds):
            torch.manual_seed(fold_seed(seed, fold))
            model = GatedAttentionMIL(
                features.embed_dim,
                num_classes,
                hidden_dim=config.model.hidden_dim,
                attention_dim=config.model.attention_dim,
                dropout=config.model.dropout,
            ).to(device)
            weights = class_weights(table.labels[train], num_classes).to(device)
            criterion = nn.CrossEntropyLoss(weight=weights)
            optimizer = torch.optim.AdamW(
                model.parameters(), lr=config.train.lr, weight_decay=config.train.weight_decay
            )
            generator = np.random.default_rng(fold_seed(seed, fold))
            for _ in range(config.train.epochs):
                model.train()
                for position in generator.permutation(train):
                    logits = model(bags[position].unsqueeze(0)).logits
                    loss = criterion(logits, labels[position : position + 1].to(device))
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                model.eval()
                with torch.inference_mode():  # validation loss, as the batched side computes
                    for position in validation:
                        model(bags[position].unsqueeze(0))
            model.eval()
            with torch.inference_mode():
                probabilities = torch.cat(
                    [torch.softmax(model(bags[p].unsqueeze(0)).logits, 1) for p in test]
                )
            aurocs.append(auroc(table.labels[test], probabilities.cpu().numpy()))
    return aurocs


def main() -> None:
    """Run both sides and print a Markdown line with the figures."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bags", type=int, default=200, help="number of bags")
    parser.add_argument("--instances", type=int, default=500, help="maximum instances per bag")
    parser.add_argument("--dim", type=int, default=384, help="feature size")
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=16, help="bags per step, batched side")
    parser.add_argument("--lr", type=float, default=5e-4, help="AdamW learning rate, both sides")
    parser.add_argument(
        "--marker", type=float, default=4.0, help="shift of the planted instance's features"
    )
    parser.add_argument(
        "--marker-dims", type=int, default=8, help="number of features the marker shifts"
    )
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)

    with tempfile.TemporaryDirectory() as temporary:
        data = planted_signal_bags(
            args.bags,
            dim=args.dim,
            min_instances=args.instances // 2,
            max_instances=args.instances,
            marker=args.marker,
            marker_dims=args.marker_dims,
            seed=0,
        )
        folder = write_feature_set(Path(temporary) / "bench", data)
        overrides = [
            f"feature_sets=[{{name: bench, path: {folder}}}]",
            f"folds={args.folds}",
            f"train.epochs={args.epochs}",
            f"train.patience={args.epochs}",
            f"train.batch_size={args.batch_size}",
            f"train.lr={args.lr:.10f}",  # YAML reads 1e-05 as a string
            "train.max_instances=null",
            f"device={device}",
        ]
        config = load_config(EvalConfig, None, overrides)
        # The first optimiser built in a process imports torch._dynamo (seconds); keep that
        # one-off cost out of both timings.
        torch.optim.AdamW([torch.zeros(1, requires_grad=True)])

        start = time.perf_counter()
        result = run_cross_validation(config)
        batched_seconds = time.perf_counter() - start
        batched_auroc = float(np.mean([fold.metrics["auroc"] for fold in result.rows[0].folds]))

        start = time.perf_counter()
        baseline_auroc = float(np.mean(one_bag_per_step(config, device)))
        baseline_seconds = time.perf_counter() - start

    record = {
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} "
        f"threads, {device}",
        "bags": args.bags,
        "instances": f"{args.instances // 2}-{args.instances}",
        "dim": args.dim,
        "folds": args.folds,
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "marker": f"+{args.marker} on {args.marker_dims} features",
        "batched_s": round(batched_seconds, 2),
        "one_bag_per_step_s": round(baseline_seconds, 2),
        "speedup": round(baseline_seconds / batched_seconds, 2),
        "batched_auroc": round(batched_auroc, 3),
        "one_bag_per_step_auroc": round(baseline_auroc, 3),
    }
    print(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
