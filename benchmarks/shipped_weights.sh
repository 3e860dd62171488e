#!/usr/bin/env bash
# Every figure quoted for the shipped weights, in one go: P1, P2 (with the
# identity-head comparison, benchmarks/identity_heads.sh), P3 and P4 with the
# engines the README's tables show, then the README's results section and the
# weights card (`jointface bench report`).
#
#   benchmarks/shipped_weights.sh DATA_DIR [RUNS_DIR [MORE_WEIGHTS.pt ...]]
#
# DATA_DIR and RUNS_DIR as for benchmarks/identity_heads.sh (its head runs are
# trained first when RUNS_DIR lacks them: about 17 minutes each here). With
# them in place, about 30 minutes on this project's 2-core CPU. Run it after
# `jointface quantize` when the weights are new, from the repository root.
set -euo pipefail
: "${1:?usage: $0 DATA_DIR [RUNS_DIR [MORE_WEIGHTS.pt ...]] (run from the repository root)}"
jointface --threads 2 bench p1 -e dlib -e jointface -e jointface-flip -e jointface-torch -e jointface-reference
benchmarks/identity_heads.sh "$@"
jointface --threads 2 bench p3 -e dlib -e jointface -e jointface-flip
jointface --threads 2 bench p4 -e dlib -e jointface -e jointface-flip -e jointface-torch
jointface bench report
