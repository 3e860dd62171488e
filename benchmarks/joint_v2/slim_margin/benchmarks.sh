#!/usr/bin/env bash
# The commands behind this experiment's figures and the shipment of 7fb32bf7ffd0 (tenth and eleventh sessions), in
# order. Needs the teacher labels of the README's `jointface preprocess ... --all-faces` commands in runs/labels/
# (CelebA low-res only for step 4; the other configs name the four other collections), the shipped weights
# f19816222ec5 (commit a59e3a7) in jointface/weights/, and ../shared/data. About 100 minutes of training, then
# about 70 minutes of benchmarks on 2 cores.
set -eu
B="jointface --threads 2 bench"; S="--seed-dlib runs/labels/lfw.jsonl"
P1_TRAIN=$(python -c "from jointface.datasets.protocols import p1_split
print(' '.join(str(i.path) for i in p1_split('../shared/data/lfw').train))")
mkdir -p runs/cand

# a candidate's card: its version and the shipped detection operating point (detection is not trained here)
card() {
  python - "$1" <<'PY'
import json, sys
from pathlib import Path
from jointface.weights_file import load_weights
path = Path(sys.argv[1])
_, version = load_weights(path)
card = json.load(open("jointface/weights/jointface.json"))
json.dump({"weights": path.name, "version": version, "detection": card["detection"]},
          open(path.with_suffix(".json"), "w"), indent=2)
PY
}

# 1. the shipped weights trained on, same recipe, 3,200 steps (../slim_continue/)
jointface train-v2 jointface/configs/v2_slim_continue.json
cp runs/v2_slim_continue/jointface.pt runs/cand/cont.pt; card runs/cand/cont.pt
jointface quantize --weights runs/cand/cont.pt --count 64 $P1_TRAIN
$B p2 -e dlib -e jointface -e jointface@runs/cand/cont.pt $S --tag v2_slim_continue
$B p1 -e jointface@runs/cand/cont.pt --tag v2_slim_continue

# 2. CosFace 1.0 and 3.0 with half of each batch of known people, both from the continuation (run/, margin3/)
jointface train-v2 jointface/configs/v2_slim_margin.json
cp runs/v2_slim_margin/jointface.pt runs/cand/margin.pt; card runs/cand/margin.pt
jointface quantize --weights runs/cand/margin.pt --count 64 $P1_TRAIN
$B p2 -e dlib -e jointface -e jointface@runs/cand/cont.pt -e jointface@runs/cand/margin.pt $S --tag v2_slim_margin
$B p1 -e jointface@runs/cand/cont.pt -e jointface@runs/cand/margin.pt --tag v2_slim_margin
jointface train-v2 jointface/configs/v2_slim_margin3.json
cp runs/v2_slim_margin3/jointface.pt runs/cand/margin3.pt; card runs/cand/margin3.pt
jointface quantize --weights runs/cand/margin3.pt --count 64 $P1_TRAIN
$B p2 -e dlib -e jointface -e jointface@runs/cand/margin.pt -e jointface@runs/cand/margin3.pt $S --tag v2_slim_margin3
$B p1 -e jointface@runs/cand/margin.pt -e jointface@runs/cand/margin3.pt --tag v2_slim_margin3

# 3. shipped: the previous weights kept for P4's same-run comparison, CosFace 3.0 in their place, every benchmark
mkdir -p runs/cand/old
for f in jointface.pt jointface.int8.onnx jointface.int8-head.onnx; do
  cp jointface/weights/$f runs/cand/old/${f/jointface/jointface_f198}; done
python -c "import json; c = json.load(open('jointface/weights/jointface.json')); c['weights'] = 'jointface_f198.pt'
json.dump(c, open('runs/cand/old/jointface_f198.json', 'w'), indent=2)"
cp runs/cand/margin3.pt jointface/weights/jointface.pt; cp runs/cand/margin3.int8.onnx jointface/weights/jointface.int8.onnx
cp runs/cand/margin3.int8-head.onnx jointface/weights/jointface.int8-head.onnx
python -c "import json; c = json.load(open('runs/cand/margin3.json')); c['weights'] = 'jointface.pt'
json.dump(c, open('jointface/weights/jointface.json', 'w'), indent=2)"
# (cluster: then DEFAULT_THRESHOLDS in jointface/clustering.py set to its peak, and cluster run again)
for protocol in "p2 -e dlib -e jointface $S" "p3 -e dlib -e jointface $S" "p1 -e jointface -e jointface-reference" \
    "p4 -e dlib -e jointface -e jointface@runs/cand/old/jointface_f198.pt" "cluster -e dlib -e jointface $S" \
    "p6 -e dlib -e jointface"; do
  $B $protocol
done
jointface bench report

# 4. (not shipped) the same with CelebA low-res's people as 2,760 more margin classes (lowres/)
jointface preprocess DATA/celeba_lowres --layout celeba --all-faces --out runs/labels/celeba_lowres.jsonl
jointface train-v2 jointface/configs/v2_slim_lowres.json
cp runs/v2_slim_lowres/jointface.pt runs/cand/lowres.pt; card runs/cand/lowres.pt
jointface quantize --weights runs/cand/lowres.pt --count 64 $P1_TRAIN
$B p2 -e dlib -e jointface -e jointface@runs/cand/lowres.pt $S --tag v2_slim_lowres
$B p1 -e jointface@runs/cand/lowres.pt --tag v2_slim_lowres
