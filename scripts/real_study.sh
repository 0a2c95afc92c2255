#!/usr/bin/env bash
# The real-data study: iBOT pretraining on the unlabelled public cytology pool, then three
# ABMIL tasks (four evaluations) comparing the pretrained ViT, a randomly initialised ViT of
# the same shape and a handcrafted descriptor. Every step skips work already done, so the
# script can be rerun after an interruption.
# Usage: bash scripts/real_study.sh DATA_DIR [OUT_DIR, default outputs/real] [EXTRA ...]
#   DATA_DIR contains rbc-smears/, pbc/, cric/ and rbc-diseases/ (see docs/results.md).
#   EXTRA feature sets, e.g. uni=/models/uni.bin, are extracted with load_backbone and added
#   to every table.
set -euo pipefail
cd "$(dirname "$0")/.."
data=${1:?usage: bash scripts/real_study.sh DATA_DIR [OUT_DIR] [name=checkpoint ...]}
out=${2:-outputs/real}
shift $(( $# >= 2 ? 2 : 1 ))
export PATH="$PWD/.venv/bin:$PATH"
export PYTHONUNBUFFERED=1
log() { echo "== $(date +%H:%M:%S) $*"; }

log "pretraining (configs/pretrain/real_cpu.yaml) -> runs/real_cpu"
cytofm-pretrain --config configs/pretrain/real_cpu.yaml "data.root=$data" \
    run.output_dir=runs/real_cpu run.progress_bar=false
checkpoint=$(ls runs/real_cpu/checkpoints/checkpoint-*.pt | tail -n 1)
log "pretrained checkpoint: $checkpoint"

# task name, extraction config, data subfolder
tasks=("rbc_diseases rbc_diseases_extract rbc-diseases"
       "pbc_celltype pbc_celltype_extract pbc/labeled"
       "cric cric_extract cric/labeled")
for task in "${tasks[@]}"; do
    read -r name extract_config folder <<<"$task"
    common=(--config "configs/eval/$extract_config.yaml" "bags.root=$data/$folder"
            "out=$out/features/$name")
    log "features for $name"
    cytofm-extract "${common[@]}" name=pretrained "backbone.source=$checkpoint"
    cytofm-extract "${common[@]}" name=random_init "backbone.source=$checkpoint" \
        backbone.random_init=true
    cytofm-extract "${common[@]}" name=handcrafted backbone.source=handcrafted
    for extra in "$@"; do
        cytofm-extract "${common[@]}" "name=${extra%%=*}" "backbone.source=${extra#*=}" \
            backbone.img_size=224
    done
done

# evaluation config, feature folder
evaluations=("rbc_diseases rbc_diseases" "pbc_celltype pbc_celltype"
             "cric_bethesda cric" "cric_abnormal cric")
for evaluation in "${evaluations[@]}"; do
    read -r config features <<<"$evaluation"
    sets="{name: pretrained, path: $out/features/$features/pretrained},"
    sets+="{name: random_init, path: $out/features/$features/random_init},"
    sets+="{name: handcrafted, path: $out/features/$features/handcrafted}"
    for extra in "$@"; do
        sets+=",{name: ${extra%%=*}, path: $out/features/$features/${extra%%=*}}"
    done
    log "ABMIL cross-validation: $config"
    cytofm-eval-mil --config "configs/eval/$config.yaml" "feature_sets=[$sets]" \
        "out=$out/eval/$config" overwrite=true
done

log "figures -> $out/figures"
for features in rbc_diseases pbc_celltype cric; do
    cytofm-visualize embeddings "$out/features/$features/pretrained" \
        "$out/features/$features/random_init" "$out/features/$features/handcrafted" \
        --out "$out/figures/embeddings_$features" --threads 1
done
python scripts/plot_results.py "$out/eval" --out "$out/figures/results.png"
for config in rbc_diseases pbc_celltype cric_bethesda cric_abnormal; do
    log "$config"
    cat "$out/eval/$config/results.md"
done
