"""``jointface bench``: the protocols of ``PROTOCOLS.md`` run against engines.

Each protocol (listed in :mod:`jointface.bench.registry`) takes engines and
returns a results dict. :func:`write_results` stores a JSON
file (figures, configuration, engine versions, git commit, date, CPU,
threads), a Markdown table and PNG plots under ``benchmarks/results/``.

Detections are cached per engine version (see :mod:`jointface.bench.cache`)
so that reruns and interrupted runs are cheap; speed is measured separately,
on uncached calls.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

from jointface.engines import Engine

from . import registry
from .common import BenchContext, caching, engine_records, environment, json_default, protocol_markdown

__all__ = ["BenchContext", "check_engine_names", "markdown_for", "run_protocol", "write_results"]


def markdown_for(result: dict) -> str:
    protocol = registry.by_title(result["protocol"])
    return protocol.markdown(result) if protocol is not None else protocol_markdown(result)


def write_results(result: dict, engines: Sequence[Engine], out_dir: Path, tag: str | None = None) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = result["protocol"].lower() + (f"-{tag}" if tag else "")
    result = {**result, "engines": engine_records(engines), "environment": environment()}
    json_path = out_dir / f"{stem}.json"
    json_path.write_text(json.dumps(result, indent=2, default=json_default) + "\n")
    (out_dir / f"{stem}.md").write_text(markdown_for(result))
    return json_path


def check_engine_names(requested: Sequence[str], engines: Sequence[Engine]) -> None:
    """Refuse (``ValueError``) engines that share a name: a protocol keys its figures, plots and
    detection caches by engine name, so the second would silently replace the first. Two weights files
    of one file name (``runs/a/jointface.pt``, ``runs/b/jointface.pt``) are the usual cause."""
    seen: dict[str, str] = {}
    for asked, engine in zip(requested, engines):
        if engine.name in seen:
            first = seen[engine.name]
            why = "the same engine was asked for twice" if first == asked else \
                "their weights files have the same file name; link or copy one under another name"
            raise ValueError(f"engines {first!r} and {asked!r} are both named {engine.name!r} in the results "
                             f"({why})")
        seen[engine.name] = asked


def run_protocol(name: str, engines: Sequence[Engine], ctx: BenchContext, out_dir: Path) -> dict:
    """Run one protocol (``p1`` ... ``p6``, ``cluster``) over ``engines``."""
    protocol = registry.PROTOCOLS.get(name)
    if protocol is None:
        raise ValueError(f"unknown protocol {name!r}")
    if not protocol.cached:  # speed protocols time uncached calls
        return protocol.run(engines, ctx, out_dir)
    cached = caching(engines, ctx.cache_dir)
    try:
        return protocol.run(cached, ctx, out_dir)
    finally:
        for engine in cached:
            engine.close()
