#!/usr/bin/env bash
# Every figure quoted for the v2 weights, in one go: P2, P6, P3, P4 and P1 against dlib, then the README's
# results section and the weights card (`jointface bench report`).
#
#   benchmarks/joint_v2/benchmarks.sh LFW_LABELS [CACHE_DIR]
#
# LFW_LABELS: the every-face LFW labels (`jointface preprocess ../shared/data/lfw --layout lfw --all-faces
# --out LABELS`); dlib's P2/P3 detections are read from them instead of being computed again
# (`bench --seed-dlib`). Run from the repository root after `jointface quantize`.
# P1 runs without dlib here (its dlib figure, 98.44%, was measured on 2026-11-26 and is in git history):
# dlib on 4,075 photos takes about 8 CPU-minutes this session did not have. P6's dlib detections and CNN
# reference come from the cache of the P6 run committed with P6 (copied into CACHE_DIR). The v1 weights
# side by side (`-e jointface@V1.pt` on each line) were left out on 2026-11-30 for time; v1's figures of
# 2026-11-26 (same protocols, same data) are in git history (benchmarks/results/ at 40c282c), and v1's P6
# of 2026-11-30 in benchmarks/results/p6.json at db25de5.
set -euo pipefail
: "${1:?usage: $0 LFW_LABELS [CACHE_DIR] (run from the repository root)}"
labels=$1 cache=${2:-$HOME/.cache/jointface/bench}
jointface --threads 2 bench p2 -e dlib -e jointface --seed-dlib "$labels" --cache "$cache"
jointface --threads 2 bench p6 -e dlib -e jointface --cache "$cache"
jointface --threads 2 bench p3 -e dlib -e jointface --cache "$cache"
jointface --threads 2 bench p4 -e dlib -e jointface -e jointface-torch --cache "$cache"
jointface --threads 2 bench p1 -e jointface --cache "$cache"
jointface bench report
