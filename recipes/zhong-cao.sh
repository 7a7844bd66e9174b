#!/usr/bin/env bash
# Zhong & Cao (IDRiD, referable vs non-referable): crop by the retina's border, 256 px,
# up-sampling of the minority class, TFRecords, the small ResNetV2 (16/32/64 filters),
# a grid over learning rate x batch size, Grad-CAM on examples.
#
#   SRC=/data/idrid LABELS="/data/idrid/IDRiD_Disease Grading_Training Labels.csv" \
#       bash recipes/zhong-cao.sh
#   SMALL=1 SRC=raw LABELS=raw/trainLabels.csv ID_COL=image LABEL_COL=level OUT=/tmp/zc \
#       bash recipes/zhong-cao.sh
source "$(dirname "$0")/_common.sh"
: "${SRC:?set SRC to the folder with the IDRiD photos}"
: "${LABELS:?set LABELS to the IDRiD grading CSV}"
ID_COL=${ID_COL:-Image name}
LABEL_COL=${LABEL_COL:-Retinopathy grade}
OUT=${OUT:-recipe-zhong-cao}
if [ "$SMALL" = 1 ]; then
  SIZE=32; EPOCHS=1; STEPS=(--steps-per-epoch 2); LRS=1e-3; BATCHES=2,4
else
  SIZE=256; EPOCHS=300; STEPS=(); LRS=1e-2,1e-3,1e-4,1e-5; BATCHES=2,4
fi

step "preprocess: retina crop, 256 px, no filter, sharded TFRecords"
run "$DRPIPE" preprocess --src "$SRC" --labels "$LABELS" --id-col "$ID_COL" \
    --label-col "$LABEL_COL" --out "$OUT/shards" --size "$SIZE" --filter none \
    --split train=0.7,val=0.15,test=0.15 --seed 0 "${WORKERS_OPT[@]}"

step "grid: learning rate x batch size, small ResNetV2 on the referable task"
run "$DRPIPE" tune --data "$OUT/shards" --out "$OUT/tune" --lr "$LRS" --batch-size "$BATCHES" \
    --model resnetv2-small --task referable --balance resample --augment full \
    --image-size "$SIZE" --epochs "$EPOCHS" "${STEPS[@]}" --checkpoint-every 5

step "the best point on the test split, and Grad-CAM on a few test photos"
# summary.csv is sorted by validation kappa; its run column is the point's directory.
BEST=$(python3 -c 'import csv, sys; print(next(csv.DictReader(open(sys.argv[1])))["run"])' \
    "$OUT/tune/summary.csv")
run "$DRPIPE" evaluate "$BEST" --split test --checkpoint best
mapfile -t EXAMPLES < <(python3 -c '
import csv, sys
rows = [r for r in csv.DictReader(open(sys.argv[1])) if r["status"] == "ok" and r["split"] == "test"]
print("\n".join(sys.argv[2] + "/" + r["path"] for r in rows[:4]))' \
    "$OUT/shards/data_manifest.csv" "$SRC")
run "$DRPIPE" explain "$BEST" "${EXAMPLES[@]}" --out "$OUT/gradcam"
