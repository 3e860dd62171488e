#!/usr/bin/env bash
# The commands behind this experiment's figures (tenth session), in order. Needs the teacher labels of the
# README's `jointface preprocess ... --all-faces` commands in runs/labels/ (CelebA low-res left out) and
# ../shared/data. About 30 minutes of training, then about 35 minutes of benchmarks on 2 cores.
set -eu
B="jointface --threads 2 bench"; S="--seed-dlib runs/labels/lfw.jsonl"; C=runs/cand/slimfs.pt
mkdir -p runs/cand
# 1. identity's own stage 3: the backbone's stage 3 cut to 128 planes, then 2,000 steps on face crops
python benchmarks/joint_v2/slim_stage3/slim.py jointface/weights/jointface.pt runs/slim_shared3_128.pt --width 128 --from-shared
jointface train-v2 jointface/configs/v2_slim_from_shipped.json --max-steps 2000
cp runs/v2_slim_from_shipped/jointface.pt $C
# 2. the candidate's card: its version and the shipped detection operating point (its detection tensors are the
#    shipped ones: the script prints the largest difference)
python - <<'PY'
import json
from jointface.weights_file import load_weights
payload, version = load_weights("runs/cand/slimfs.pt")
shipped_payload, _ = load_weights("jointface/weights/jointface.pt")
card = json.load(open("jointface/weights/jointface.json"))
json.dump({"weights": "slimfs.pt", "version": version, "detection": card["detection"]},
          open("runs/cand/slimfs.json", "w"), indent=2)
a, b = payload["state_dict"], shipped_payload["state_dict"]
detection = [k for k in b if k.startswith(("backbone.", "detection_lateral.", "detection_smooth.", "heads."))]
print(version, "largest detection difference", max(float((a[k].float() - b[k].float()).abs().max()) for k in detection))
PY
# 3. int8 model and int8 identity head, calibrated on 64 of the P1 training photos
jointface quantize --weights $C --count 64 $(python -c "from jointface.datasets.protocols import p1_split
print(' '.join(str(i.path) for i in p1_split('../shared/data/lfw').train))")
# 4. P2 of both weights in one run (benchmarks/results/p2-v2_slim_from_shipped.*)
$B p2 -e dlib -e jointface -e jointface@$C $S --tag v2_slim_from_shipped
# 5. shipped: the previous weights kept for P4's same-run comparison, the candidate in their place, every benchmark
mkdir -p runs/cand/old
for f in jointface.pt jointface.int8.onnx jointface.int8-head.onnx jointface.json; do
  cp jointface/weights/$f runs/cand/old/${f/jointface/jointface_f52}; done
cp $C jointface/weights/jointface.pt; cp runs/cand/slimfs.int8.onnx jointface/weights/jointface.int8.onnx
cp runs/cand/slimfs.int8-head.onnx jointface/weights/jointface.int8-head.onnx
python -c "import json; c = json.load(open('runs/cand/slimfs.json')); c['weights'] = 'jointface.pt'
json.dump(c, open('jointface/weights/jointface.json', 'w'), indent=2)"
$B p2 -e dlib -e jointface $S
$B p3 -e dlib -e jointface $S
$B p1 -e jointface -e jointface-reference
$B p4 -e dlib -e jointface -e jointface@runs/cand/old/jointface_f52.pt
$B cluster -e dlib -e jointface $S   # then DEFAULT_THRESHOLDS (jointface/clustering.py) = the peak, and again
$B p6 -e dlib -e jointface
jointface bench report
