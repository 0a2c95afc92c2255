#!/usr/bin/env bash
# The whole CytoFM path on the embedded synthetic demo set, from a fresh clone:
# set up .venv, generate the demo set, pretrain a small ViT with iBOT, extract features with
# the pretrained ViT, a randomly initialised ViT of the same shape and a handcrafted
# descriptor, cross-validate ABMIL on each, and print the comparison table.
# Usage: bash scripts/quickstart.sh [output folder, default runs/quickstart]
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-runs/quickstart}
start=$(date +%s)

bash scripts/setup_env.sh
export PATH="$PWD/.venv/bin:$PATH"
export PYTHONUNBUFFERED=1

echo "== 1/4 demo set -> $out/demo"
cytofm-demo-data "$out/demo" --num-images 240 --seed 0

echo "== 2/4 iBOT pretraining (configs/pretrain/demo_cpu.yaml) -> $out/pretrain"
cytofm-pretrain --config configs/pretrain/demo_cpu.yaml \
    "data.sources=[{path: $out/demo/images}]" "run.output_dir=$out/pretrain" \
    run.progress_bar=false
checkpoint=$(ls "$out"/pretrain/checkpoints/checkpoint-*.pt | tail -n 1)

echo "== 3/4 feature extraction -> $out/features"
bags=(--config configs/eval/demo_extract.yaml "bags.root=$out/demo"
      "bags.labels_csv=$out/demo/labels.csv" "out=$out/features")
cytofm-extract "${bags[@]}" name=pretrained "backbone.source=$checkpoint"
cytofm-extract "${bags[@]}" name=random_init "backbone.source=$checkpoint" \
    backbone.random_init=true
cytofm-extract "${bags[@]}" name=handcrafted backbone.source=handcrafted

echo "== 4/4 ABMIL cross-validation -> $out/eval"
cytofm-eval-mil --config configs/eval/demo.yaml "labels.csv=$out/demo/labels.csv" \
    "feature_sets=[{name: pretrained, path: $out/features/pretrained},
                   {name: random_init, path: $out/features/random_init},
                   {name: handcrafted, path: $out/features/handcrafted}]" \
    "out=$out/eval" overwrite=true

echo
sed -n '/^| feature set/,/^$/p' "$out/eval/results.md"
echo "Does the ABMIL attention find the abnormal cells (test folds, positive bags)?"
python -m cytofm.cli.score_attention "$out/eval" "$out/demo/cells.csv"
echo "Full report with confusion matrices: $out/eval/results.md"
echo
echo "Finished in $(( $(date +%s) - start )) s. Outputs in $out/."
