#!/usr/bin/env bash
# A candidate v2 weights file measured as the shipped weights are (P2, P6, P3, P1), beside dlib, before it is
# shipped. NAME is the file's name without .pt, or its folder's name for a run's jointface.pt; the engine is
# `jointface@NAME` and the results carry the tag NAME (benchmarks/results/p2-NAME.json, ...).
#
#   benchmarks/joint_v2/crops/evaluate.sh WEIGHTS LFW_LABELS CACHE_DIR
#
# WEIGHTS is copied to CACHE_DIR/candidate/NAME.pt and quantised there (int8 on 64 LFW P1 training photos,
# as the shipped weights were). LFW_LABELS seeds dlib's detections
# (`bench --seed-dlib`). Run from the repository root.
set -euo pipefail
: "${3:?usage: $0 WEIGHTS LFW_LABELS CACHE_DIR (run from the repository root)}"
weights=$1 labels=$2 cache=$3
name=$(basename "$weights" .pt)
[ "$name" = jointface ] && name=$(basename "$(dirname "$weights")")
mkdir -p "$cache/candidate"
candidate="$cache/candidate/$name.pt"
cp "$weights" "$candidate"
calibration=$(python - <<'PY'
from jointface.datasets.protocols import default_shared_data, p1_split
print("\n".join(str(image.path) for image in p1_split(default_shared_data() / "lfw").train))
PY
)
# shellcheck disable=SC2086
jointface quantize $calibration --weights "$candidate" --count 64
engine="jointface@$candidate"
jointface --threads 2 bench p2 -e dlib -e "$engine" --seed-dlib "$labels" --cache "$cache" --tag "$name"
jointface --threads 2 bench p6 -e dlib -e "$engine" --cache "$cache" --tag "$name"
jointface --threads 2 bench p3 -e dlib -e "$engine" --cache "$cache" --tag "$name"
jointface --threads 2 bench p1 -e "$engine" --cache "$cache" --tag "$name"
