#!/usr/bin/env bash
# Nyaupane & Sah: Gaussian (Ben Graham) filter, rescale, ResNet50/101/152 x frozen / half /
# unfrozen x heads [16, 5] and [32, 16, 5] with dropout 0.5 and L1+L2: one drpipe tune grid.
#
#   SRC=/data/kaggle bash recipes/nyaupane-sah.sh
#   SMALL=1 SRC=raw OUT=/tmp/ns bash recipes/nyaupane-sah.sh
source "$(dirname "$0")/_common.sh"
: "${SRC:?set SRC to a Kaggle-layout folder (train/ + trainLabels.csv)}"
OUT=${OUT:-recipe-nyaupane-sah}
LR=${LR:-1.5e-4}  # the paper also tried 7.5e-4 and 2.5e-5: LR=7.5e-4 for another grid
if [ "$SMALL" = 1 ]; then
  SIZE=32; EPOCHS=1; STEPS=(--steps-per-epoch 2); BATCH=8; WEIGHTS=${WEIGHTS:-none}
  MODELS=resnet50; FREEZE="all,none"
else
  SIZE=224; EPOCHS=100; STEPS=(); BATCH=32; WEIGHTS=${WEIGHTS:-imagenet}
  MODELS=resnet50,resnet101,resnet152; FREEZE="all,50%,none"
fi

step "preprocess: retina crop, Ben Graham's filter, 224 px (rescaling to [0, 1] is inside the model)"
run "$DRPIPE" preprocess --src "$SRC" --out "$OUT/shards" --size "$SIZE" --filter graham \
    --split train=0.8,val=0.1,test=0.1 --seed 0 "${WORKERS_OPT[@]}"

step "grid: backbone x freezing x head (L1 + L2, dropout 0.5)"
run "$DRPIPE" tune --data "$OUT/shards" --out "$OUT/tune" --lr "$LR" --batch-size "$BATCH" \
    --grid "model=$MODELS" --grid "freeze=$FREEZE" --grid "head=16;32,16" \
    --weights "$WEIGHTS" --image-size "$SIZE" --epochs "$EPOCHS" "${STEPS[@]}" \
    --dropout 0.5 --l1 1e-5 --l2 1e-4
