#!/usr/bin/env bash
# The commands behind this folder's figures (thirteenth session). Needs runs/labels/lfw.jsonl and aaf.jsonl
# (README: jointface preprocess ... --all-faces) and the shipped weights ec4b54c1fe9d; about 25 minutes on 2 cores.
set -eu
for arm in v2_stage2_ab_control v2_stage2_ab v2_stage2_ab_nojitter v2_stage2_ab_lr1e3 v2_stage2_ab_fit2000 \
    v2_stage2_ab_fit2000_fresh v2_stage2_ab_fit2000_wide v2_wide_head; do
  jointface train-v2 jointface/configs/$arm.json
done
python benchmarks/joint_v2/face_size/sweep.py runs/v2_stage2_ab_control/jointface.pt runs/v2_stage2_ab/jointface.pt \
  runs/v2_stage2_ab_nojitter/jointface.pt runs/v2_stage2_ab_lr1e3/jointface.pt --sizes 192 --out /tmp/stage2_eval
python benchmarks/joint_v2/identity_stage2/cost.py
python benchmarks/joint_v2/identity_stage2/plot.py
