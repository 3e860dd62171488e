"""Benchmark figures (DET, CMC) and markdown result tables.

Figures are drawn on :class:`matplotlib.figure.Figure` objects and written
with the Agg renderer; pyplot and its global state are never touched, so this
works headless and inside test runs.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure


def _new_figure(size: tuple[float, float] = (6.0, 5.0)) -> Figure:
    figure = Figure(figsize=size, dpi=120)
    FigureCanvasAgg(figure)
    return figure


def _save(figure: Figure, path: str | os.PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, bbox_inches="tight")
    return path


def plot_det(
    systems: Mapping[str, tuple[Sequence[float], Sequence[float]]],
    path: str | os.PathLike,
    *,
    title: str = "Open-set identification (DET)",
    operating_points: Mapping[str, Sequence[tuple[float, float]]] | None = None,
    fpir_marks: Sequence[float] = (0.01, 0.1),
) -> Path:
    """Draw the DET curves of several systems on one figure and save it.

    ``systems``: name -> ``(fpir, fnir)`` arrays (as :func:`jointface.bench.metrics.det_curve`
    returns them). Both axes are logarithmic (FPIR on x, FNIR on y); points
    where either rate is 0 cannot be drawn on log axes and are left out.
    ``operating_points``: name -> ``[(fpir, fnir), ...]`` markers (e.g. the
    reported TPIR at FPIR = 0.01 / 0.1). ``fpir_marks`` draws faint vertical
    guides. Returns the written path (format from its suffix: .png, .svg, .pdf).
    """
    figure = _new_figure()
    axes = figure.add_subplot(1, 1, 1)
    smallest_fpir = smallest_fnir = 1.0
    for name, (fpir, fnir) in systems.items():
        fpir = np.asarray(fpir, dtype=np.float64)
        fnir = np.asarray(fnir, dtype=np.float64)
        if fpir.shape != fnir.shape:
            raise ValueError(f"{name}: fpir {fpir.shape} and fnir {fnir.shape} differ")
        drawable = (fpir > 0) & (fnir > 0)
        if drawable.any():
            smallest_fpir = min(smallest_fpir, float(fpir[drawable].min()))
            smallest_fnir = min(smallest_fnir, float(fnir[drawable].min()))
        (line,) = axes.step(fpir[drawable], fnir[drawable], where="post", label=name, linewidth=1.5)
        for point_fpir, point_fnir in (operating_points or {}).get(name, ()):
            if point_fpir > 0 and point_fnir > 0:
                axes.plot([point_fpir], [point_fnir], marker="o", color=line.get_color(), markersize=5)
    for mark in fpir_marks:
        axes.axvline(mark, color="0.8", linewidth=0.8, linestyle="--", zorder=0)
    axes.set_xscale("log")
    axes.set_yscale("log")
    decade_below = lambda value: 10 ** math.floor(math.log10(max(value, 1e-6)))  # noqa: E731
    axes.set_xlim(decade_below(min(smallest_fpir, min(fpir_marks, default=1.0))), 1.0)
    axes.set_ylim(decade_below(smallest_fnir), 1.0)  # each axis down to its own data
    axes.set_xlabel("FPIR (false positive identification rate)")
    axes.set_ylabel("FNIR (false negative identification rate)")
    axes.set_title(title)
    axes.grid(True, which="both", linewidth=0.3, alpha=0.6)
    if systems:
        axes.legend(loc="lower left", fontsize="small")
    return _save(figure, path)


def plot_cmc(
    systems: Mapping[str, Sequence[float]],
    path: str | os.PathLike,
    *,
    title: str = "Closed-set identification (CMC)",
    max_rank: int | None = None,
) -> Path:
    """Draw CMC curves (name -> ``curve`` with ``curve[k - 1]`` = rate at rank k) and save them."""
    figure = _new_figure()
    axes = figure.add_subplot(1, 1, 1)
    longest = 1
    for name, curve in systems.items():
        curve = np.asarray(curve, dtype=np.float64)
        if max_rank is not None:
            curve = curve[:max_rank]
        longest = max(longest, len(curve))
        axes.plot(np.arange(1, len(curve) + 1), curve, marker="o", markersize=3, label=name)
    axes.set_xlim(1, longest)
    axes.set_ylim(None, 1.0)
    axes.set_xlabel("rank")
    axes.set_ylabel("identification rate")
    axes.set_title(title)
    axes.grid(True, linewidth=0.3, alpha=0.6)
    if systems:
        axes.legend(loc="lower right", fontsize="small")
    return _save(figure, path)


def _format_cell(value: Any, formatter: Callable[[Any], str] | str | None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        text = "-"
    elif formatter is not None:
        text = formatter.format(value) if isinstance(formatter, str) else formatter(value)
    elif isinstance(value, (bool, np.bool_)):
        text = "yes" if value else "no"
    elif isinstance(value, (int, np.integer)):
        text = f"{int(value):,}"
    elif isinstance(value, (float, np.floating)):
        text = f"{float(value):.4f}"
    else:
        text = str(value)
    return text.replace("|", "\\|").replace("\n", " ")


def markdown_table(
    results: Mapping[str, Mapping[str, Any]],
    *,
    columns: Sequence[str] | None = None,
    formats: Mapping[str, Callable[[Any], str] | str] | None = None,
    row_header: str = "system",
    headers: Mapping[str, str] | None = None,
) -> str:
    """A GitHub markdown table from ``{row name: {column: value}}``.

    ``columns`` defaults to every column in first-seen order. ``formats``:
    column -> format string (``"{:.2%}"``) or callable. Defaults: ints with
    thousands separators, floats with 4 decimals, ``None``/NaN/missing as
    ``-``. ``headers`` renames columns in the header line. Ends with a newline.
    """
    if columns is None:
        columns = []
        for row in results.values():
            columns.extend(c for c in row if c not in columns)
    formats = formats or {}
    headers = headers or {}
    lines = [
        "| " + " | ".join([row_header, *(headers.get(c, c) for c in columns)]) + " |",
        "|" + "---|" * (len(columns) + 1),
    ]
    for name, row in results.items():
        cells = [_format_cell(name, None)] + [_format_cell(row.get(c), formats.get(c)) for c in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
