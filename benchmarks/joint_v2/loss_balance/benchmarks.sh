#!/usr/bin/env bash
# The commands behind this folder's figures (fourteenth session). Needs runs/labels/lfw.jsonl and aaf.jsonl
# (README: jointface preprocess ... --all-faces) and the shipped weights ec4b54c1fe9d; about 45 minutes on 2 cores
# (each arm cuts its crop bank unless bank.npy/bank.npz of one are hard-linked into its run folder; copy bank.npz).
# The control arm is ../identity_stage2's (v2_stage2_ab_control).
set -eu
for arm in v2_balance_margin00 v2_balance_margin03 v2_balance_margin10 v2_balance_margin100 v2_grow_head; do
  jointface train-v2 jointface/configs/$arm.json
done
python benchmarks/joint_v2/face_size/sweep.py runs/v2_balance_margin10/jointface.pt runs/v2_balance_margin03/jointface.pt \
  runs/v2_balance_margin00/jointface.pt runs/v2_grow_head/jointface.pt runs/v2_balance_margin100/jointface.pt \
  --sizes 192 --out /tmp/balance_eval   # its results.json is eval.json here
python benchmarks/joint_v2/loss_balance/plot.py
