"""``jointface cluster`` and ``jointface clusters ...``: group a photo library's faces, then name the groups.

Registered on the main app in ``cli/app.py``. The work is done by
:mod:`jointface.clustering`; this module parses and prints.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Optional

import typer

from cli.common import CliError, err, handle_errors, load_engine, open_gallery, out, progress_bar, settings

clusters_app = typer.Typer(help="Look at the clusters `jointface cluster` found; name, merge, split or ignore them.",
                           no_args_is_help=True)


def _engine_for(ctx: typer.Context, name: str | None):
    if name:
        ctx.obj = dataclasses.replace(settings(ctx), engine=name)
    return load_engine(ctx)


@handle_errors
def cluster(
    ctx: typer.Context,
    photos: list[Path] = typer.Argument(..., help="Photos or folders of photos (searched recursively)."),
    engine_name: Optional[str] = typer.Option(None, "--engine", help="Face engine (default: the global --engine, "
                                                                     "else the default engine)."),
    min_faces: int = typer.Option(2, "--min-faces", min=1, help="Smallest group called a cluster; faces in "
                                                                "smaller groups stay unclustered."),
    method: Optional[str] = typer.Option(None, "--method", help="chinese-whispers (default, chosen by "
                                                                "`jointface bench cluster`), dbscan or hdbscan."),
    threshold: Optional[float] = typer.Option(None, "--threshold", help="Cosine similarity at which two faces "
                                                                        "are linked (default: per engine, "
                                                                        "from the benchmark)."),
    batch_size: int = typer.Option(8, "--batch-size", min=1, max=256, help="Photos detected and committed "
                                                                          "together."),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as one JSON object."),
) -> None:
    """Find every face in a photo library and group them by person (resumable: seen photos are skipped)."""
    from jointface.clustering import DEFAULT_METHOD, METHODS, matching_threshold, recluster, scan
    from jointface.imageio import list_images

    method = method or DEFAULT_METHOD
    if method not in METHODS:
        raise typer.BadParameter(f"unknown method {method!r}; choose one of {', '.join(METHODS)}",
                                 param_hint="--method")
    if threshold is not None and not -1.0 <= threshold <= 1.0:
        raise typer.BadParameter("a cosine similarity lies between -1 and 1", param_hint="--threshold")
    paths = list_images(photos)
    if not paths:
        raise CliError("no images found in the given folders")
    engine = _engine_for(ctx, engine_name)
    failed = []
    with open_gallery(ctx) as gallery:
        with progress_bar("finding faces") as progress:
            task = progress.add_task("finding faces", total=len(paths), current="")
            done = [0]

            def on_progress(outcome) -> None:
                done[0] += 1
                progress.update(task, advance=1, current=outcome.path.name)
                if outcome.status == "failed":
                    failed.append(outcome.message)
                    err.print(f"failed: {outcome.message}", markup=False)
                if not err.is_terminal and done[0] % 500 == 0:
                    err.print(f"finding faces: {done[0]}/{len(paths)}", markup=False)

            try:
                report = scan(gallery, engine, paths, batch_size=batch_size, on_progress=on_progress)
            except KeyboardInterrupt:
                err.print(f"interrupted after {done[0]} of {len(paths)} photos; the photos done are saved: "
                               "run the same command again to go on", markup=False)
                raise typer.Exit(130)
        chosen = matching_threshold(gallery, engine)
        err.print(f"grouping the library's faces ({engine.name}) ...", markup=False)
        summary = recluster(gallery, engine.name, engine.version, method=method, threshold=threshold,
                            min_faces=min_faces, match_threshold=chosen.value)
    result = {"engine": engine.name, "photos": len(paths), "scanned": report.count("scanned"),
              "already_seen": report.count("seen"), "failed": report.count("failed"),
              "faces_found": report.faces_found, "library_faces": summary.faces, "clusters": summary.clusters,
              "named_clusters": summary.named_clusters, "ignored_clusters": summary.ignored_clusters,
              "unclustered": summary.unclustered, "matched_to_enrolled": summary.matched,
              "method": summary.method, "threshold": summary.threshold, "min_faces": summary.min_faces,
              "match_threshold": chosen.value, "errors": failed}
    if as_json:
        out.print(json.dumps(result, ensure_ascii=False), markup=False)
    else:
        threshold_text = "" if summary.threshold is None else f" at similarity {summary.threshold:.3f}"
        out.print(
            f"{len(paths)} photos: {result['scanned']} scanned, {result['already_seen']} seen before, "
            f"{result['failed']} failed; {report.faces_found} new faces.\n"
            f"library ({engine.name}): {summary.faces} faces in {summary.clusters} clusters "
            f"({summary.method}{threshold_text}, at least {min_faces} faces), {summary.named_clusters} named, "
            f"{summary.ignored_clusters} ignored, {summary.unclustered} unclustered; {summary.matched} faces "
            f"matched enrolled people (threshold {chosen.value:.3f}, {chosen.source}).\n"
            "next: `jointface clusters list`, `jointface clusters show ID --sheet DIR`, "
            "`jointface clusters name ID NAME`", markup=False)
    if failed:
        raise typer.Exit(1)


def _print_cluster_line(info) -> None:
    rep = info.representative
    who = info.person or (f"nearest: {info.nearest[0]} {info.nearest[1]:.3f}" if info.nearest else "nearest: -")
    box = ", ".join(f"{v:.0f}" for v in rep.box)
    out.print(f"#{info.id} {info.status} {info.engine}: {info.size} faces; {who}; representative "
                   f"{rep.path} [{box}]", markup=False)


def _write_sheets(gallery, infos, sheet: Path) -> int:
    """Write one contact sheet per cluster; returns how many photos were missing."""
    from jointface.clustering import cluster_detail, write_contact_sheet

    problems: list[str] = []
    for info in infos:
        detail = info if info.faces else cluster_detail(gallery, info.id)
        path = sheet / f"cluster-{info.id}.png"
        problems += write_contact_sheet(detail, path)
        err.print(f"contact sheet written: {path}", markup=False)
    for problem in dict.fromkeys(problems):
        err.print(f"warning: {problem}; its faces are drawn as grey tiles", markup=False)
    return len(set(problems))


@clusters_app.command("list")
@handle_errors
def clusters_list(
    ctx: typer.Context,
    as_json: bool = typer.Option(False, "--json", help="One JSON object per cluster per line."),
    sheet: Optional[Path] = typer.Option(None, "--sheet", help="Write one contact sheet PNG per cluster here."),
    include_ignored: bool = typer.Option(False, "--all", help="Also list ignored clusters."),
) -> None:
    """Every cluster, largest first: size, status or person, nearest enrolled person, a representative face."""
    from jointface.clustering import library_counts, list_clusters

    engine_name = settings(ctx).engine
    with open_gallery(ctx) as gallery:
        infos = list_clusters(gallery, engine_name, include_ignored=include_ignored)
        counts = library_counts(gallery, engine_name)
        missing = _write_sheets(gallery, infos, sheet) if sheet is not None else 0
    if as_json:
        for info in infos:
            out.print(json.dumps(info.to_json(), ensure_ascii=False), markup=False)
    elif not infos:
        out.print("no clusters yet: run `jointface cluster PHOTOS...`" if not counts.faces else
                       f"no clusters among {counts.faces} faces ({counts.unclustered} unclustered)", markup=False)
    else:
        for info in infos:
            _print_cluster_line(info)
        out.print(f"{len(infos)} clusters; {counts.faces} faces in {counts.photos} photos, "
                       f"{counts.unclustered} unclustered", markup=False)
    if missing:
        raise typer.Exit(1)


@clusters_app.command("show")
@handle_errors
def clusters_show(
    ctx: typer.Context,
    cluster_id: int = typer.Argument(..., metavar="ID"),
    as_json: bool = typer.Option(False, "--json", help="One JSON object with every face."),
    sheet: Optional[Path] = typer.Option(None, "--sheet", help="Write the cluster's contact sheet PNG here."),
) -> None:
    """One cluster's faces (nearest its centre first); --sheet DIR draws them."""
    from jointface.clustering import cluster_detail

    with open_gallery(ctx) as gallery:
        info = cluster_detail(gallery, cluster_id)
        missing = _write_sheets(gallery, [info], sheet) if sheet is not None else 0
    if as_json:
        out.print(json.dumps(info.to_json(with_faces=True), ensure_ascii=False), markup=False)
    else:
        _print_cluster_line(info)
        for face in info.faces:
            box = ", ".join(f"{v:.0f}" for v in face.box)
            gone = "" if Path(face.path).exists() else " (photo no longer on disk)"
            out.print(f"  face {face.id}: {face.path} [{box}] similarity to centre "
                           f"{face.similarity_to_centre:.3f}{gone}", markup=False)
    if missing:
        raise typer.Exit(1)


def _cluster_engine(ctx: typer.Context, gallery, cluster_id: int):
    """The engine a cluster was made with (loaded), or a clear error."""
    return _engine_for(ctx, gallery.library.cluster_engine(cluster_id))


@clusters_app.command("name")
@handle_errors
def clusters_name(ctx: typer.Context, cluster_id: int = typer.Argument(..., metavar="ID"),
                  name: str = typer.Argument(..., metavar="NAME")) -> None:
    """Enrol the cluster's faces for NAME (a new or existing person); faces already enrolled are skipped."""
    from jointface.clustering import name_cluster

    with open_gallery(ctx) as gallery:
        engine = _cluster_engine(ctx, gallery, cluster_id)
        report = name_cluster(gallery, cluster_id, name, engine)
    for path in report.missing_photos:
        err.print(f"note: {path}: photo no longer on disk; its face was enrolled from the stored embedding",
                       markup=False)
    err.print(f"cluster {report.cluster_id} named {report.person}: {report.enrolled} faces enrolled, "
                   f"{report.skipped} already enrolled", markup=False)


@clusters_app.command("merge")
@handle_errors
def clusters_merge(ctx: typer.Context, into: int = typer.Argument(..., metavar="A"),
                   source: int = typer.Argument(..., metavar="B")) -> None:
    """Move every face of cluster B into cluster A (enrolled when A or B is named)."""
    from jointface.clustering import merge_clusters

    with open_gallery(ctx) as gallery:
        named = gallery.library.named_count([into, source])
        engine = _cluster_engine(ctx, gallery, into) if named else None
        report = merge_clusters(gallery, into, source, engine)
    err.print(f"merged cluster {source} into {into}" + (
        f" ({report.person}: {report.enrolled} faces enrolled, {report.skipped} already enrolled)" if report else ""),
        markup=False)


@clusters_app.command("split")
@handle_errors
def clusters_split(ctx: typer.Context, cluster_id: int = typer.Argument(..., metavar="ID"),
                   threshold: Optional[float] = typer.Option(None, "--threshold", help="Cosine similarity to link "
                                                                                       "faces (default: stricter "
                                                                                       "than clustering's)."),
                   min_faces: int = typer.Option(2, "--min-faces", min=1)) -> None:
    """Re-group one open cluster more strictly (the largest part keeps the id)."""
    from jointface.clustering import split_cluster

    with open_gallery(ctx) as gallery:
        parts = split_cluster(gallery, cluster_id, threshold=threshold, min_faces=min_faces)
    if len(parts) == 1:
        err.print(f"cluster {cluster_id} did not split ({parts[0][1]} faces stay together); try a higher "
                       "--threshold", markup=False)
    else:
        text = ", ".join(f"#{cid} ({size} faces)" for cid, size in parts) or "no group"
        err.print(f"cluster {cluster_id} split into {text}", markup=False)


@clusters_app.command("ignore")
@handle_errors
def clusters_ignore(ctx: typer.Context, cluster_id: int = typer.Argument(..., metavar="ID"),
                    undo: bool = typer.Option(False, "--undo", help="Make an ignored cluster open again.")) -> None:
    """Hide a cluster of strangers (new faces that group with it are hidden too)."""
    from jointface.clustering import ignore_cluster

    with open_gallery(ctx) as gallery:
        ignore_cluster(gallery, cluster_id, undo=undo)
    err.print(f"cluster {cluster_id} " + ("is open again" if undo else "ignored"), markup=False)
