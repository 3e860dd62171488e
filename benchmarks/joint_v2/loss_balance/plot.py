"""The loss-balance arms against the CosFace weight, one figure and one table:
``python benchmarks/joint_v2/loss_balance/plot.py`` -> arms.png, arms.md

Every arm: 800 bf16 steps from the shipped weights on LFW P1 + All-Age-Faces (the thirteenth session's control
recipe, ``../identity_stage2/control``, is the arm at weight 3.0). Training losses are means over steps 601-800;
P2 figures come from ``face_size/sweep.py --sizes 192`` (``eval.json`` here, ``../identity_stage2/eval.json`` for
the control)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

HERE = Path(__file__).parent
#: arm folder -> (CosFace weight, label); the control lives with the stage-2 arms
ARMS = {"margin00": (0.0, "CosFace 0"), "margin03": (0.3, "CosFace 0.3"), "margin10": (1.0, "CosFace 1"),
        "../identity_stage2/control": (3.0, "CosFace 3 (the shipped recipe)"), "margin100": (10.0, "CosFace 10")}
GROWN = {"grow_head": (3.0, "CosFace 3, head grown to 384 + 512")}


def arm_figures(folder: str) -> dict | None:
    path = HERE / folder
    if not (path / "steps.csv").exists():
        return None
    steps = [row for row in csv.DictReader((path / "steps.csv").open()) if 600 < int(row["step"]) <= 800]
    validation = list(csv.DictReader((path / "validation.csv").open()))[-1]
    evaluation = path.parent / "eval.json" if folder.startswith("..") else HERE / "eval.json"
    runs = json.loads(evaluation.read_text())["weights"]
    run_name = json.loads((path / "config.json").read_text())["out_dir"] + "/jointface.pt"
    p2 = runs[run_name][0]
    return {"distill": float(np.mean([float(r["distill"]) for r in steps])),
            "margin": float(np.mean([float(r["identity_margin"]) for r in steps])),
            "holdout_cos": float(validation["holdout_cos"]), "proxy": float(validation["p2proxy_rank1"]),
            "p2_teacher_cos": p2["teacher_cos"], "rank1": p2["rank1@all"], "tpir": p2["open_tpir"]}


def main() -> None:
    rows = {}
    for folder, (weight, label) in {**ARMS, **GROWN}.items():
        figures = arm_figures(folder)
        if figures is not None:
            rows[label] = {"weight": weight, "grown": folder in GROWN, **figures}
    lines = ["| arm | CosFace weight | training distillation (1 - cos) | training CosFace | held-out AAF cosine | "
             "P2 proxy rank-1 | P2 cosine to teacher | P2 rank-1, all people | P2 TPIR at FPIR 0.01 |",
             "|---|---|---|---|---|---|---|---|---|"]
    for label, r in rows.items():
        lines.append(f"| {label} | {r['weight']:g} | {r['distill']:.3f} | {r['margin']:.2f} | {r['holdout_cos']:.3f} | "
                     f"{r['proxy']:.1%} | {r['p2_teacher_cos']:.3f} | {r['rank1']:.2%} | {r['tpir']:.2%} |")
    (HERE / "arms.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    line = [r for r in rows.values() if not r["grown"]]
    x = [max(r["weight"], 0.1) for r in line]  # CosFace 0 drawn at 0.1 on the log axis
    for axis, keys, title in ((axes[0], ("distill",), "training distillation loss (1 - cos), steps 601-800"),
                              (axes[1], ("holdout_cos", "p2_teacher_cos"), "cosine to the teacher, held-out faces"),
                              (axes[2], ("rank1", "tpir"), "P2, all 1,369 people (%)")):
        for key in keys:
            scale = 100 if key in ("rank1", "tpir") else 1
            names = {"distill": "training", "holdout_cos": "held-out All-Age-Faces", "p2_teacher_cos": "all P2 photos",
                     "rank1": "rank-1", "tpir": "TPIR at FPIR 0.01"}
            axis.plot(x, [scale * r[key] for r in line], "o-", label=names[key])
            for r in rows.values():
                if r["grown"]:
                    axis.plot([r["weight"]], [scale * r[key]], "k*", markersize=10)
        axis.set_xscale("log")
        axis.set_xticks(x, ["0" if r["weight"] == 0 else f"{r['weight']:g}" for r in line])
        axis.set_xlabel("CosFace weight (distillation and relational: 6 each)", fontsize=9)
        axis.set_title(title, fontsize=10)
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    fig.suptitle("800 bf16 steps from the shipped weights, LFW P1 + All-Age-Faces: the CosFace weight against "
                 "distillation (star: the head grown to 384 + 512 channels)")
    fig.tight_layout()
    fig.savefig(HERE / "arms.png", dpi=110)


if __name__ == "__main__":
    main()
