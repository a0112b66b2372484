#!/bin/bash
# Byte-identity check: the offline recipe trained (metis_robust, and round updates folded in the
# core space at a searched scale), then `metis-hf merge` of its task adapters in each space.
# usage: scripts/byte_identity.sh REPO OUT   (REPO: a checkout; compare OUT/sha256.txt of two checkouts)
# SKIP_TRAIN=1 redoes the merges only. Takes about 12 minutes on 2 cores.
set -euo pipefail
REPO=$1; OUT=$2
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONHASHSEED=0 PYTHONPATH=$REPO
MH=${METIS_HF:-metis-hf}
cd "$REPO"
if [ -z "${SKIP_TRAIN:-}" ]; then
if [ -e "$OUT" ]; then echo "$OUT exists: give a new folder" >&2; exit 1; fi
mkdir -p "$OUT"
$MH train recipes/offline/cpu-3tasks.yaml --no-eval --output-dir "$OUT/default" --set training.save_task_adapters=true
$MH train recipes/offline/cpu-3tasks.yaml --no-eval --output-dir "$OUT/fold" \
  --set training.merge_method=task_arithmetic --set "training.merge_params={scale: auto}" \
  --set training.merge_round_updates=true --set training.merge_space=core --set training.round_lr_schedule=linear_across_rounds
fi
A="$OUT/default/merged/task_adapters"
for spec in "ties lora {density: 0.5}" "tsv_m core {}" "task_arithmetic dense {scale: 0.5}"; do
  set -- $spec; method=$1; space=$2; params="${@:3}"
  cat > "$OUT/merge-$space.yaml" <<YAML
merge_method: $method
space: $space
parameters: $params
models:
$(for t in $(ls -d "$A"/*/); do echo "  - model: ${t%/}"; done)
YAML
  rm -rf "$OUT/merge-$space"; $MH merge "$OUT/merge-$space.yaml" "$OUT/merge-$space"
done
cd "$OUT" && find . -type f \( -name '*.safetensors' -o -name 'rounds.jsonl' -o -name 'adapter_config.json' \) -not -path '*/checkpoint-*' | sort | xargs sha256sum > "$OUT/sha256.txt"
