"""The arms' training distillation loss (1 - cosine to the teacher, 100-step rolling mean) and validation, one
figure: ``python benchmarks/joint_v2/identity_stage2/plot.py`` -> arms.png"""

from __future__ import annotations

import csv
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

HERE = Path(__file__).parent
ARMS = {"control": "shipped layout [3]", "stage2": "own stage 2 [2, 3]", "nojitter": "no box jitter",
        "lr1e3": "lr 1e-3", "fit2000": "fit test: 2,000 faces, each ~19 times",
        "fit2000_fresh": "fit test, head afresh (192, 256)", "fit2000_wide": "fit test, head afresh (512, 512)"}


def main() -> None:
    fig, axes = plt.subplots(1, 4, figsize=(19, 4))
    for arm, label in ARMS.items():
        steps = list(csv.DictReader((HERE / arm / "steps.csv").open()))
        x = np.array([int(row["step"]) for row in steps])
        loss = np.array([float(row["distill"]) for row in steps])
        smooth = np.convolve(loss, np.ones(10) / 10, mode="valid")
        axes[0].plot(x[9:], smooth, label=label)
        margin = np.array([float(row["identity_margin"]) for row in steps])
        axes[3].plot(x[9:], np.convolve(margin, np.ones(10) / 10, mode="valid"), label=label)
        validation = list(csv.DictReader((HERE / arm / "validation.csv").open()))
        at = [int(row["step"]) for row in validation]
        axes[1].plot(at, [float(row["holdout_cos"]) for row in validation], "o-", label=label)
        axes[2].plot(at, [100 * float(row["p2proxy_rank1"]) for row in validation], "o-", label=label)
    for axis, title in zip(axes, ("training distillation loss (1 - cos), 100-step mean",
                                  "held-out All-Age-Faces: cosine to the teacher",
                                  "P2 proxy rank-1, 150 people (%), +-3 points",
                                  "training CosFace loss (known people), 100-step mean")):
        axis.set_title(title, fontsize=10)
        axis.set_xlabel("step")
        axis.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle("800 bf16 steps from the shipped weights, LFW P1 + All-Age-Faces: arms of the shipped recipe")
    fig.tight_layout()
    fig.savefig(HERE / "arms.png", dpi=110)


if __name__ == "__main__":
    main()
