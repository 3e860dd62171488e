"""The README's results section, generated from ``benchmarks/results/*.json`` (never typed by hand).

``jointface bench report`` rewrites the part of README.md between
``<!-- results:start -->`` and ``<!-- results:end -->``.
"""

from __future__ import annotations

import json
from pathlib import Path

from .run import markdown_for

START, END = "<!-- results:start -->", "<!-- results:end -->"
ORDER = ("p1", "p2", "p3", "p4", "p5", "p6", "cluster")


def _uncommitted(env: dict) -> str:
    """`` (uncommitted changes: a.py, b.py)`` when the run's sources differed from its commit, else ``""``."""
    if not env.get("git_dirty"):
        return ""
    changed = env.get("git_changed") or []  # absent in results written before the list was recorded
    names = ", ".join(changed[:3]) + (f" and {len(changed) - 3} more" if len(changed) > 3 else "")
    return f" (uncommitted changes: {names})" if names else " (uncommitted changes)"


def results_markdown(results_dir: Path) -> str:
    parts = []
    for stem in ORDER:
        path = results_dir / f"{stem}.json"
        if not path.exists():
            continue
        result = json.loads(path.read_text())
        env = result.get("environment", {})
        engines = ", ".join(f"{name} `{record.get('version')}`" for name, record in result.get("engines", {}).items())
        commit = (env.get("git_commit") or "?")[:10] + _uncommitted(env)
        parts.append(markdown_for(result).rstrip() + "\n\n"
                     f"<sub>{path.as_posix()}: {env.get('date')}, commit {commit}, {env.get('cpu')} "
                     f"({env.get('cpu_count')} cores, {env.get('torch_threads')} torch threads); engines: "
                     f"{engines}</sub>\n")
        for name, plot in (result.get("plots") or {}).items():
            parts.append(f"![{result['protocol']} {name}]({Path(plot).as_posix()})\n")
    return "\n".join(parts) if parts else "No results yet: run `jointface bench all`.\n"


def update_readme(readme: Path, results_dir: Path) -> bool:
    text = readme.read_text()
    if START not in text or END not in text:
        raise ValueError(f"{readme} has no {START} ... {END} section")
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    new = f"{head}{START}\n{results_markdown(results_dir)}{END}{tail}"
    changed = new != text
    readme.write_text(new)
    return changed


#: The shipped weights' default threshold is P2's calibrated threshold at this FPIR.
DEFAULT_THRESHOLD_FPIR = "0.1"


def write_weights_card(results_dir: Path) -> Path | None:
    """The shipped weights' sidecar (``jointface.json``): their P1 figures, from ``p1.json``.

    With a ``p2.json`` of the same weights it also carries their P2 figures and
    a default rejection threshold (P2's calibration at FPIR 0.1), which the
    joint engine uses when no gallery calibration or option says otherwise.

    Written only when ``p1.json`` measured exactly the shipped file (same
    version hash); :func:`jointface.engines.default_engine_name` reads it.
    """
    from jointface.weights_file import default_weights_path, load_weights

    weights = default_weights_path()
    p1_path = results_dir / "p1.json"
    if weights is None or not p1_path.exists():
        return None
    p1 = json.loads(p1_path.read_text())
    payload, version = load_weights(weights)
    record = p1.get("engines", {}).get("jointface")
    if not record or record.get("version") != version:
        return None
    card = {"weights": weights.name, "version": version, "p1": p1["figures"]["jointface"],
            "p1_results": p1_path.as_posix(), "measured": p1.get("environment", {}).get("date"),
            "training": {k: payload.get("training", {}).get(k) for k in ("step", "epoch", "metrics")},
            "backbone": payload["record"].get("backbone"), "input_size": payload["record"].get("input_size"),
            "training_command": payload["record"].get("training_command")}
    p2_path = results_dir / "p2.json"
    if p2_path.exists():  # the default rejection threshold: P2's held-out calibration of these very weights
        p2 = json.loads(p2_path.read_text())
        if p2.get("engines", {}).get("jointface", {}).get("version") == version:
            figures = p2["figures"]["jointface"]
            calibrated = figures["calibrated"][DEFAULT_THRESHOLD_FPIR]
            card["p2"] = {key: figures.get(key) for key in ("rank1", "rank5", "tpir@fpir=0.01",
                                                              "tpir@fpir=0.1", "calibrated")}
            dlib_figures = p2["figures"].get("dlib")
            if dlib_figures:  # the reference of the default-engine rule, measured in the same run
                card["p2"]["dlib_tpir@fpir=0.01"] = dlib_figures.get("tpir@fpir=0.01")
            card["default_threshold"] = calibrated["threshold"]
            card["default_threshold_source"] = (
                f"P2 calibration (FPIR {DEFAULT_THRESHOLD_FPIR} on held-out strangers against a gallery of "
                f"{figures.get('gallery_enrolled')} people; smaller galleries accept fewer strangers)")
            rows = (figures.get("by_gallery_size") or {}).get(DEFAULT_THRESHOLD_FPIR)
            if rows:  # the default for the gallery at hand (JointEngine.default_threshold_for)
                card["thresholds_by_gallery_size"] = {
                    "fpir": float(DEFAULT_THRESHOLD_FPIR), "people": [row["people"] for row in rows],
                    "threshold": [row["threshold"] for row in rows],
                    "source": f"P2 calibration at FPIR {DEFAULT_THRESHOLD_FPIR} in random sub-galleries of P2's "
                              f"{figures.get('gallery_enrolled')} people ({p2_path.as_posix()})"}
    p6_card = _p6b_card(results_dir / "p6.json", version)
    if p6_card:
        card["p6b"] = p6_card
    training = payload.get("training") or {}
    if training.get("data"):  # v2 weights name the collections they were trained on, with counts
        card["training_data"] = training["data"]
    from jointface.engines import default_engine_decision

    out = weights.with_suffix(".json")
    detection = _detection_point(out, version)
    if detection:  # chosen before the benchmarks ran (they measured it): kept as it was
        card["detection"] = detection
    card["default_engine"] = default_engine_decision(card)
    out.write_text(json.dumps(card, indent=2, default=str) + "\n")
    return out


def _detection_point(card_path: Path, version: str) -> dict | None:
    """The ``detection`` section of the card at ``card_path`` when that card describes ``version``."""
    from jointface.weights_file import read_card

    detection = read_card(card_path, version).get("detection")
    return detection if isinstance(detection, dict) else None


def _p6b_card(path: Path, version: str) -> dict | None:
    """P6b recall per face width for the shipped weights and dlib, from ``p6.json`` of these weights."""
    if not path.exists():
        return None
    p6 = json.loads(path.read_text())
    if p6.get("engines", {}).get("jointface", {}).get("version") != version:
        return None
    recall = {}
    for engine in ("jointface", "dlib"):
        sweep = (p6.get("figures", {}).get(engine) or {}).get("p6b") or {}
        recall[engine] = {str(size): figures.get("recall") for size, figures in
                          (sweep.get("by_size") or sweep).items() if isinstance(figures, dict)}
    return {"recall": recall["jointface"], "dlib_recall": recall["dlib"]}
