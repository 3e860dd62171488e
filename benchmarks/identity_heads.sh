#!/usr/bin/env bash
# The study's Experiment 3 answered with figures (issue 4): the joint network
# trained with each identity head alone, and the shipped recipe with and
# without distillation, all at one equal budget (10 epochs from scratch,
# jointface/configs/p2_heads_resnet18_160_10ep.json), then P2 with every
# network, dlib and the shipped weights (plain and with flip test-time
# augmentation) in one run.
#
#   benchmarks/identity_heads.sh DATA_DIR [RUNS_DIR [MORE_WEIGHTS.pt ...]]
#
# DATA_DIR is the output of `jointface organize` (see the README's training
# section). Runs are resumable: rerun after an interruption. On this 2-core CPU
# each run takes about 17 minutes. Weights files after RUNS_DIR join the P2 run
# as engines jointface@FILE.
set -euo pipefail
data=${1:?usage: $0 DATA_DIR [RUNS_DIR]}
runs=${2:-$HOME/.cache/jointface/identity-heads}
shift $(( $# < 2 ? $# : 2 ))
config=jointface/configs/p2_heads_resnet18_160_10ep.json
engines=(-e dlib -e jointface -e jointface-flip)
mkdir -p "$runs"
for heads in cosface cosface,distill distill classifier arcface triplet; do
  label=heads-${heads/,/+}
  if [ ! -f "$runs/$label.pt" ]; then
    echo "=== training $label ($(date -u +%H:%M))" >&2
    jointface train --config "$config" --data "$data" --out "$runs/$label" --heads "$heads" \
      --export "$runs/$label.pt" > "$runs/$label.log"
  fi
  engines+=(-e "jointface@$runs/$label.pt")
done
for more in "$@"; do engines+=(-e "jointface@$more"); done
jointface bench p2 "${engines[@]}"
