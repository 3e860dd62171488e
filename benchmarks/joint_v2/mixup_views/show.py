"""A contact sheet of mixup views: each view between the two bank faces it blends, with its weight and
dlib's distance from the view's descriptor to each face's. ``python benchmarks/joint_v2/mixup_views/show.py
RUN_DIR`` (a run folder holding ``bank.npy`` and ``views.npy``/``views.npz``) -> views.png here."""

from __future__ import annotations

import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def main(run: Path, rows: int = 6) -> None:
    bank, meta = np.load(run / "bank.npy", mmap_mode="r"), np.load(run / "bank.npz")
    views, view_meta = np.load(run / "views.npy", mmap_mode="r"), np.load(run / "views.npz")
    pairs, weights, teachers = view_meta["pairs"], view_meta["weights"], view_meta["teachers"]
    fig, axes = plt.subplots(rows, 3, figsize=(7, 2.4 * rows))
    for row in range(rows):
        a, b = pairs[row]
        far_a = np.linalg.norm(teachers[row] - meta["teachers"][a])
        far_b = np.linalg.norm(teachers[row] - meta["teachers"][b])
        for axis, image, title in ((axes[row, 0], bank[a], f"face {a}: weight {weights[row]:.2f}"),
                                   (axes[row, 1], views[row], f"view: dlib distance {far_a:.2f} / {far_b:.2f}"),
                                   (axes[row, 2], bank[b], f"face {b}: weight {1 - weights[row]:.2f}")):
            axis.imshow(image)
            axis.set_title(title, fontsize=8)
            axis.axis("off")
    fig.suptitle("Mixup views and dlib's descriptor of each (distance to the first / second face's)", fontsize=9)
    fig.tight_layout()
    fig.savefig(Path(__file__).parent / "views.png", dpi=60)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
