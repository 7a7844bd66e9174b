#!/usr/bin/env bash
# TensorFlow Datasets' diabetic_retinopathy_detection/btgraham-300 from drpipe options:
# the eye scaled to a radius of 300 px (a 600 px square: the retina spans the side), Ben
# Graham's filter (sigma = radius / 30), grey outside 90 % of the radius, JPEG quality 72.
#
#   SRC=/data/kaggle bash recipes/tfds-btgraham-300.sh
#   SMALL=1 SRC=raw OUT=/tmp/bt bash recipes/tfds-btgraham-300.sh
#
# Where it differs on purpose (docs/RECIPES.md): the retina is found by a circle fit, not
# assumed centred with its radius read off the middle row; where the frame clips the disc
# the blur does not average the black padding in; the square keeps the grey ring between
# 90 % and 100 % of the radius (TFDS crops it: 540 px wide).
source "$(dirname "$0")/_common.sh"
: "${SRC:?set SRC to a Kaggle-layout folder (train/ + trainLabels.csv)}"
OUT=${OUT:-recipe-tfds-btgraham-300}
SIZE=600; [ "$SMALL" = 1 ] && SIZE=64

step "preprocess: radius 300 px, Graham, 90 % mask, JPEG quality 72"
# TFDS keeps Kaggle's fixed train / validation (Public) / test (Private) split; drpipe
# splits by patient instead (TFDS's train and test share no patient only by Kaggle's design).
run "$DRPIPE" preprocess --src "$SRC" --out "$OUT/shards" --size "$SIZE" --filter graham \
    --quality 72 --split train=0.8,val=0.1,test=0.1 --seed 0 "${WORKERS_OPT[@]}"
