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

# ship OLD CAND: the shipped weights kept as runs/cand/old/jointface_OLD.* (P4 runs them beside the new ones), and
# runs/cand/CAND.* (weights, int8 model and head, card) in their place
ship() {
  mkdir -p runs/cand/old
  for f in jointface.pt jointface.int8.onnx jointface.int8-head.onnx; do
    cp jointface/weights/$f runs/cand/old/${f/jointface/jointface_$1}
    cp runs/cand/${f/jointface/$2} jointface/weights/$f; done
  python - "$1" "$2" <<'PY'
import json, sys
old, new = sys.argv[1:]
card = json.load(open("jointface/weights/jointface.json")); card["weights"] = f"jointface_{old}.pt"
json.dump(card, open(f"runs/cand/old/jointface_{old}.json", "w"), indent=2)
card = json.load(open(f"runs/cand/{new}.json")); card["weights"] = "jointface.pt"
json.dump(card, open("jointface/weights/jointface.json", "w"), indent=2)
PY
}

# candidate CONFIG NAME: train jointface/configs/CONFIG.json, its weights as runs/cand/NAME.pt with their card and int8
candidate() {
  jointface train-v2 jointface/configs/$1.json
  cp runs/$1/jointface.pt runs/cand/$2.pt; card runs/cand/$2.pt
  jointface quantize --weights runs/cand/$2.pt --count 64 $P1_TRAIN
}

# every benchmark of the shipped weights (each argument one protocol with its engines), then the report
bench_all() {
  for protocol in "$@"; do $B $protocol; done
  jointface bench report
}

# 1. the shipped weights trained on, same recipe, 3,200 steps (../slim_continue/)
candidate v2_slim_continue cont
$B p2 -e dlib -e jointface -e jointface@runs/cand/cont.pt $S --tag v2_slim_continue
$B p1 -e jointface@runs/cand/cont.pt --tag v2_slim_continue

# 2. CosFace 1.0 and 3.0 with half of each batch of known people, both from the continuation (run/, margin3/)
candidate v2_slim_margin margin
$B p2 -e dlib -e jointface -e jointface@runs/cand/cont.pt -e jointface@runs/cand/margin.pt $S --tag v2_slim_margin
$B p1 -e jointface@runs/cand/cont.pt -e jointface@runs/cand/margin.pt --tag v2_slim_margin
candidate v2_slim_margin3 margin3
$B p2 -e dlib -e jointface -e jointface@runs/cand/margin.pt -e jointface@runs/cand/margin3.pt $S --tag v2_slim_margin3
$B p1 -e jointface@runs/cand/margin.pt -e jointface@runs/cand/margin3.pt --tag v2_slim_margin3

# 3. shipped: the previous weights kept for P4's same-run comparison, CosFace 3.0 in their place, every benchmark
ship f198 margin3
# (cluster: then DEFAULT_THRESHOLDS in jointface/clustering.py set to its peak, and cluster run again)
bench_all "p2 -e dlib -e jointface $S" "p3 -e dlib -e jointface $S" "p1 -e jointface -e jointface-reference" \
    "p4 -e dlib -e jointface -e jointface@runs/cand/old/jointface_f198.pt" "cluster -e dlib -e jointface $S" \
    "p6 -e dlib -e jointface"

# 4. (not shipped) the same with CelebA low-res's people as 2,760 more margin classes (lowres/)
jointface preprocess DATA/celeba_lowres --layout celeba --all-faces --out runs/labels/celeba_lowres.jsonl
candidate v2_slim_lowres lowres
$B p2 -e dlib -e jointface -e jointface@runs/cand/lowres.pt $S --tag v2_slim_lowres
$B p1 -e jointface@runs/cand/lowres.pt --tag v2_slim_lowres

# 5. (twelfth session) the shipped weights trained on with their recipe, 3,200 steps (continue/), and 1,600 steps of
# the recipe with bank_contrast (bank/); both from 7fb32bf7ffd0, compared with it in one run
candidate v2_slim_margin3_continue m3cont
candidate v2_slim_bank bank
$B p2 -e dlib -e jointface -e jointface@runs/cand/m3cont.pt -e jointface@runs/cand/bank.pt $S --tag v2_slim_bank
$B p1 -e jointface -e jointface@runs/cand/m3cont.pt -e jointface@runs/cand/bank.pt --tag v2_slim_bank

# 6. (twelfth session) shipped: the continuation (ec4b54c1fe9d); the previous weights kept for P4's same-run comparison
ship 7fb m3cont
# (cluster: then DEFAULT_THRESHOLDS in jointface/clustering.py set to its peak, 0.65, and cluster run again)
bench_all "p2 -e dlib -e jointface $S" "p3 -e dlib -e jointface $S" \
    "p1 -e jointface -e jointface-reference -e jointface-compiled" \
    "p4 -e dlib -e jointface -e jointface-compiled -e jointface@runs/cand/old/jointface_7fb.pt" \
    "cluster -e dlib -e jointface $S" "p6 -e dlib -e jointface"

# 7. (not shipped) the recipe a third time from ec4b54c1fe9d, forward pass in bf16 (bf16/)
candidate v2_slim_bf16_continue bf16c
$B p2 -e dlib -e jointface -e jointface@runs/cand/bf16c.pt $S --tag v2_slim_bf16_continue
$B p1 -e jointface@runs/cand/bf16c.pt --tag v2_slim_bf16_continue
