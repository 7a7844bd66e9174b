#!/usr/bin/env bash
# Barh (APTOS 2019): Ben Graham's preprocessing, a ResNeXt-class backbone with a regression
# head (MSE on the grade), two phases of 30 epochs (backbone frozen, then all unfrozen), and
# cut points between grades tuned for quadratic kappa on the validation split.
#
#   SRC=/data/aptos bash recipes/barh.sh          # APTOS layout: train.csv + train_images/
#   SMALL=1 SRC=raw OUT=/tmp/barh bash recipes/barh.sh
#
# Keras Applications has no ResNeXt. ResNet101 stands in: ResNeXt-101 is ResNet-101's
# layout (bottleneck stages of 3, 4, 23, 3 blocks) with each 3x3 convolution split into 32
# groups, so it is the same depth and shape of network without the cardinality.
source "$(dirname "$0")/_common.sh"
: "${SRC:?set SRC to an APTOS-layout folder (train.csv + train_images/)}"
OUT=${OUT:-recipe-barh}
if [ "$SMALL" = 1 ]; then
  SIZE=32; EPOCHS=1; FT_EPOCHS=1; STEPS=(--steps-per-epoch 2); BATCH=8; WEIGHTS=${WEIGHTS:-none}
else
  SIZE=224; EPOCHS=30; FT_EPOCHS=30; STEPS=(); BATCH=32; WEIGHTS=${WEIGHTS:-imagenet}
fi

step "preprocess: retina crop, Ben Graham's filter"
run "$DRPIPE" preprocess --src "$SRC" --out "$OUT/shards" --size "$SIZE" --filter graham \
    --split train=0.8,val=0.1,test=0.1 --seed 0 "${WORKERS_OPT[@]}"

step "ResNet101 regression: 30 epochs frozen, then 30 epochs all unfrozen"
run "$DRPIPE" train --data "$OUT/shards" --out "$OUT/run" --model resnet101 \
    --weights "$WEIGHTS" --image-size "$SIZE" --task regression --freeze all \
    --epochs "$EPOCHS" --fine-tune-epochs "$FT_EPOCHS" --lr 1e-4 --fine-tune-lr 1e-5 \
    --batch-size "$BATCH" "${STEPS[@]}"

step "test split, graded with the kappa-tuned cut points (metrics.json: thresholds)"
run "$DRPIPE" evaluate "$OUT/run" --split test
