"""The benchmark protocols by name: what runs each, what writes its Markdown section, whether its detections
go through the cache.

``jointface bench NAME`` runs :data:`PROTOCOLS` ``[NAME]`` (see :func:`jointface.bench.run.run_protocol`); a
new protocol is a module with a run and a markdown function, and one line here.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from jointface.engines import Engine

from . import cluster, gallery_speed, lfw, p6, speed
from .common import BenchContext


@dataclass(frozen=True)
class Protocol:
    name: str  # as typed: ``jointface bench p1``
    title: str  # as in its results: ``{"protocol": "P1", ...}``
    run: Callable[[Sequence[Engine], BenchContext, Path], dict]
    markdown: Callable[[dict], str]
    cached: bool = True  # False for the speed protocols, which time uncached calls


PROTOCOLS: dict[str, Protocol] = {protocol.name: protocol for protocol in (
    Protocol("p1", "P1", lambda engines, ctx, out_dir: lfw.run_p1(engines, ctx), lfw.markdown_p1),
    Protocol("p2", "P2", lfw.run_p2, lfw.markdown_p2),
    Protocol("p3", "P3", lambda engines, ctx, out_dir: lfw.run_p3(engines, ctx), lfw.markdown_p3),
    Protocol("p4", "P4", speed.run_p4, speed.markdown_p4, cached=False),
    Protocol("p5", "P5", lambda engines, ctx, out_dir: gallery_speed.run_p5(ctx, out_dir), gallery_speed.markdown_p5,
             cached=False),
    Protocol("p6", "P6", p6.run_p6, p6.markdown_p6),
    Protocol("cluster", "CLUSTER", cluster.run_cluster, cluster.markdown_cluster),
)}


def by_title(title: str) -> Protocol | None:
    """The protocol whose results carry ``"protocol": title`` (``None`` for an unknown one)."""
    return next((protocol for protocol in PROTOCOLS.values() if protocol.title == title), None)
