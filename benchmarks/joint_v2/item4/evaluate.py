"""Issue 15 item 4's short-budget arms, measured on more people than their training validation saw.

    python benchmarks/joint_v2/item4/evaluate.py RUN_DIR [RUN_DIR ...] [--labels runs/labels/lfw.jsonl]
                                                 [--out benchmarks/joint_v2/item4]

Each RUN_DIR's ``jointface.pt`` (a v2 run's exported weights) embeds dlib's
landmark box of every photo of the LFW P2 people (2-5 photos each; never in
training), each photo letterboxed to 192 px as the runs' validation does, in
fp32 torch. Figures:

* ``rank1@150``: the runs' own validation proxy (first 150 people, first photo
  enrolled, the others probes), recomputed;
* ``rank1@all``: the same over every P2 person (a gallery about nine times
  larger, so nearer P2's own rank-1);
* ``tpir@fpir=0.01``: open set. The people of even index are enrolled (first
  photo) and probed with their other photos; every photo of the people of odd
  index is a stranger. The threshold is the stranger scores' 99th percentile.

Writes ``results.json``, ``results.md`` and ``results.png`` in --out and prints
the table; ``--replot`` redraws the table and plot from ``results.json`` alone.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np


def open_set(people: list[str], embeddings: np.ndarray, fpir: float = 0.01) -> dict:
    order = sorted(set(people))
    enrolled = {person for index, person in enumerate(order) if index % 2 == 0}
    gallery, names, mated, mated_names, strangers = [], [], [], [], []
    seen: set[str] = set()
    for person, vector in zip(people, embeddings):
        if person not in enrolled:
            strangers.append(vector)
        elif person in seen:
            mated.append(vector)
            mated_names.append(person)
        else:
            seen.add(person)
            gallery.append(vector)
            names.append(person)
    gallery = np.stack(gallery)
    stranger_best = (np.stack(strangers) @ gallery.T).max(axis=1)
    threshold = float(np.quantile(stranger_best, 1 - fpir))
    scores = np.stack(mated) @ gallery.T
    best = scores.argmax(axis=1)
    hits = [names[b] == name and scores[i, b] > threshold for i, (b, name) in enumerate(zip(best, mated_names))]
    return {"tpir": float(np.mean(hits)), "threshold": threshold, "enrolled": len(gallery), "mated": len(mated),
            "strangers": len(strangers)}


def arguments_or_replot(parser: argparse.ArgumentParser, argv: list[str] | None, write_outputs, out: Path
                        ) -> argparse.Namespace | None:
    """Add ``--labels``, ``--out`` (default ``out``) and ``--replot`` to a P2 figure script's parser and parse;
    with ``--replot`` redraw its outputs from ``results.json`` and return None."""
    parser.add_argument("--labels", default="runs/labels/lfw.jsonl")
    parser.add_argument("--out", type=Path, default=out)
    parser.add_argument("--replot", action="store_true", help="redraw results.md and results.png from results.json")
    args = parser.parse_args(argv)
    if args.replot:
        write_outputs(json.loads((args.out / "results.json").read_text()), args.out)
        return None
    return args


def p2_photos(labels: str) -> tuple[list[tuple[str, str, list[float]]], list[str], list]:
    """Every LFW P2 person's photos with 2-5 each (``(person, path, landmark box)``), their people and the
    decoded images, in the same order."""
    from jointface.imageio import load_image
    from jointface.train.v2 import p2_proxy_set

    photos = p2_proxy_set(labels, 100_000)
    people = [person for person, _, _ in photos]
    images = [load_image(path) for _, path, _ in photos]
    print(f"{len(set(people))} P2 people, {len(photos)} photos", flush=True)
    return photos, people, images


ARMS = ("distill", "no_distill", "lfw_only", "emb256", "roi12")


def write_outputs(results: dict, out: Path) -> None:
    """``results.md`` (the table, also printed) and ``results.png`` (rank-1 and open-set TPIR per arm)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = results["runs"]
    lines = ["| arm | rank-1, 150 people | rank-1, all P2 people | TPIR at FPIR 0.01 (open set) |", "|---|---|---|---|"]
    for name, f in runs.items():
        lines.append(f"| {name} | {f['rank1@150']:.2%} ({f['probes@150']} probes) | {f['rank1@all']:.2%} "
                     f"({f['probes@all']} probes) | {f['open_tpir']:.2%} |")
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    names = list(runs)
    x = np.arange(len(names))
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for axis, (key, title) in zip(axes, (("rank1@all", f"rank-1, all {results['people']} P2 people"),
                                         ("open_tpir", "open-set TPIR at FPIR 0.01"))):
        values = [100 * runs[name][key] for name in names]
        bars = axis.bar(x, values, color=["tab:blue" if name in ARMS else "tab:gray" for name in names])
        axis.bar_label(bars, fmt="%.1f%%", fontsize=8)
        axis.set_xticks(x, names, rotation=20, ha="right")
        axis.set_ylabel("%")
        axis.set_title(title)
    fig.suptitle("Issue 15 item 4: 300-step arms (blue) against the shipped network (grey), dlib's boxes, 192 px")
    fig.tight_layout()
    fig.savefig(out / "results.png", dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="*", type=Path)
    args = arguments_or_replot(parser, argv, write_outputs, Path(__file__).parent)
    if args is None:
        return 0
    if not args.runs:
        parser.error("give at least one RUN_DIR (or --replot)")

    import torch

    from jointface.train.v2 import embed_boxes, proxy_rank1, v2_network

    torch.set_num_threads(2)
    photos, people, images = p2_photos(args.labels)
    first150 = sorted(set(people))[:150]
    in150 = [person in set(first150) for person in people]
    results = {"labels": args.labels, "people": len(set(people)), "photos": len(photos), "runs": {}}
    for run in args.runs:
        model = v2_network(run / "jointface.pt")
        with torch.inference_mode():
            vectors = np.stack([embed_boxes(model, image, [box], 192)[0] for image, (_, _, box) in zip(images, photos)])
        rank150, probes150 = proxy_rank1([p for p, keep in zip(people, in150) if keep], vectors[np.array(in150)])
        rank_all, probes_all = proxy_rank1(people, vectors)
        figures = {"rank1@150": rank150, "probes@150": probes150, "rank1@all": rank_all, "probes@all": probes_all,
                   **{f"open_{k}": v for k, v in open_set(people, vectors).items()}}
        config = json.loads((run / "config.json").read_text())
        figures["notes"] = config.get("notes", "")
        results["runs"][run.name] = figures
        print(run.name, {k: round(v, 4) if isinstance(v, float) else v for k, v in figures.items() if k != "notes"},
              flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    write_outputs(results, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
