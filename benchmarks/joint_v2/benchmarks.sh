#!/usr/bin/env bash
# Every figure quoted for the v2 weights, in one go: P1, P2, P3, P6 and P4 with the engines of the
# README's tables (dlib, the shipped v2 weights on each runtime, the previous v1 weights side by side),
# then the README's results section and the weights card (`jointface bench report`).
#
#   benchmarks/joint_v2/benchmarks.sh LFW_LABELS V1_WEIGHTS.pt [CACHE_DIR]
#
# LFW_LABELS: the every-face LFW labels (`jointface preprocess ../shared/data/lfw --layout lfw --all-faces
# --out LABELS`); dlib's P2/P3 detections are read from them instead of being computed again
# (`bench --seed-dlib`). V1_WEIGHTS.pt: the previous shipped weights (git show 40c282c:jointface/weights/
# jointface.pt > v1.pt), engine jointface@v1. Run from the repository root after `jointface quantize`.
# P1 runs without dlib here (its dlib figure, 98.44%, was measured on 2026-11-26 and is in git history):
# dlib on 4,075 photos takes about 8 CPU-minutes this session did not have.
set -euo pipefail
: "${2:?usage: $0 LFW_LABELS V1_WEIGHTS.pt (run from the repository root)}"
labels=$1 v1=$2 cache=${3:-$HOME/.cache/jointface/bench}
jointface --threads 2 bench p2 -e dlib -e jointface -e jointface-flip -e "jointface@$v1" --seed-dlib "$labels" --cache "$cache"
jointface --threads 2 bench p3 -e dlib -e jointface -e jointface-flip -e "jointface@$v1" --cache "$cache"
jointface --threads 2 bench p6 -e dlib -e jointface -e "jointface@$v1" --cache "$cache"
jointface --threads 2 bench p1 -e jointface -e jointface-torch -e jointface-reference -e "jointface@$v1" --cache "$cache"
jointface --threads 2 bench p4 -e dlib -e jointface -e jointface-torch --cache "$cache"
jointface bench report
