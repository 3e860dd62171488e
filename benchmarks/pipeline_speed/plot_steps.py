"""Where a photo's time goes, before and after (issue 15, ninth session): P4's step profiles as stacked bars.

    python benchmarks/pipeline_speed/plot_steps.py BEFORE.json AFTER.json OUT.png

Each file is a P4 result (`jointface bench p4`); the joint engine's batch-of-8
step profile is drawn for the single 320 px photos and the 2x2 mosaics, with
dlib's time per photo (two processes) from the same run as a line: the
figure P4's ratio divides by.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

STEPS = ("letterbox", "normalise", "network", "decode_nms", "to_faces", "gallery_search")


def main(before: Path, after: Path, out: Path) -> None:
    runs = {"before": json.loads(before.read_text()), "after": json.loads(after.read_text())}
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.5))
    for axis, inputs in zip(axes, ("single_320", "mosaic_640")):
        labels, bottoms = [], []
        for position, (label, run) in enumerate(runs.items()):
            steps = run["step_profile_ms_per_image"]["jointface"][inputs]
            bottom = 0.0
            for index, step in enumerate(STEPS):
                value = steps.get(step, 0.0)
                axis.bar(position, value, bottom=bottom, color=f"C{index}", label=step if position == 0 else None)
                bottom += value
            dlib = run["figures"][f"{inputs}: dlib, 2 processes"]["ms_per_image"]
            ratio = run["figures"][f"{inputs}: jointface, batch 8"]["ratio_to_dlib_2_processes"]
            axis.text(position, bottom, f"steps {bottom:.1f} ms\nP4 {ratio:.2f}x dlib ({dlib:.0f} ms)", ha="center",
                      va="bottom", fontsize=8)
            labels.append(label)
            bottoms.append(bottom)
        axis.set_xticks(range(len(labels)), labels)
        axis.set_ylim(0, max(bottoms) * 1.25)
        axis.set_title(f"{inputs}: ms per photo, batch of 8 (steps)")
    axes[0].legend(fontsize=8, loc="upper right")
    fig.suptitle("Joint engine pipeline, shipped weights, same machine (P4 step profiles)")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    print(f"written {out}")


if __name__ == "__main__":
    if len(sys.argv) != 4:
        raise SystemExit(__doc__.split("\n\n")[1])
    main(*(Path(arg) for arg in sys.argv[1:]))
