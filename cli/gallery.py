"""Gallery commands, for the people who use JointFace: enroll, search, calibrate, people, index, db.

(``serve``/``keys`` and ``cluster``/``clusters`` are gallery commands too: ``cli/serve.py``,
``cli/cluster.py``.) ``cli/app.py`` registers them on the ``jointface`` app.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from cli.common import CliError, engine_name, err, handle_errors, load_engine, open_gallery, out, progress_bar, settings

people_app = typer.Typer(help="List, inspect, rename, remove and merge people.", no_args_is_help=True)
index_app = typer.Typer(help="Check or rebuild the vector indexes.", no_args_is_help=True)
db_app = typer.Typer(help="Database schema upgrades, backup and restore.", no_args_is_help=True)


# -- enroll ------------------------------------------------------------------------------------


@handle_errors
def enroll(
    ctx: typer.Context,
    name: Optional[str] = typer.Argument(None, help="The person's name (omit with --from-folders)."),
    images: Optional[list[Path]] = typer.Argument(None, help="Images or folders of images of this person."),
    from_folders: Optional[Path] = typer.Option(None, "--from-folders", help="A folder with one subfolder per "
                                                                               "person, named after them."),
    largest: bool = typer.Option(False, "--largest", help="In photos with several faces, enrol the biggest."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object per image."),
    batch_size: int = typer.Option(16, "--batch-size", min=1, max=10_000,
                                   help="Images per database transaction."),
) -> None:
    """Enrol faces: one face per photo (refused when there is none, or several without --largest)."""
    from jointface.imageio import list_images
    from jointface.service import FAILED, SKIPPED, enroll as enroll_items, folder_items

    if from_folders is not None:
        if name or images:
            raise typer.BadParameter("give either NAME IMAGE... or --from-folders DIR, not both")
        items = folder_items(from_folders)
        if not items:
            raise CliError(f"{from_folders}: no person folders with images inside")
    else:
        if not name or not images:
            raise typer.BadParameter("give a NAME and at least one IMAGE (or --from-folders DIR)")
        items = [(name, path) for path in list_images(images)]
        if not items:
            raise CliError("no images found in the given folders")
    engine = load_engine(ctx)
    with open_gallery(ctx) as gallery, progress_bar("enrolling") as progress:
        task = progress.add_task("enrolling", total=len(items), current="")

        def on_progress(outcome):
            progress.update(task, advance=1, current=outcome.path.name)
            if as_json:
                out.print(json.dumps({"person": outcome.person, "image": str(outcome.path), "status": outcome.status,
                                      "message": outcome.message or None, "face_id": outcome.face_id}),
                          markup=False)
            elif outcome.status == FAILED:
                err.print(f"failed: {outcome.path} ({outcome.person}): {outcome.message}", markup=False)
            elif outcome.status == SKIPPED:
                err.print(f"skipped: {outcome.path} ({outcome.person}): {outcome.message}", markup=False)

        report = enroll_items(gallery, engine, items, largest=largest, batch_size=batch_size,
                              on_progress=on_progress)
    people = len({o.person for o in report.outcomes if o.status == "enrolled"})
    err.print(f"{report.count('enrolled')} faces enrolled for {people} people with engine {engine.name}, "
              f"{report.count(SKIPPED)} skipped, {report.count(FAILED)} failed", markup=False)
    if not report.ok:
        raise typer.Exit(1)


# -- search ------------------------------------------------------------------------------------


@handle_errors
def search(
    ctx: typer.Context,
    images: list[Path] = typer.Argument(..., help="Photos or folders of photos."),
    top_k: int = typer.Option(3, "--top-k", min=1, max=100, help="Candidates listed per face."),
    threshold: Optional[float] = typer.Option(None, "--threshold", help="Similarity below which a face is "
                                                                        "unknown (default: calibrated, else "
                                                                        "the engine's)."),
    as_json: bool = typer.Option(False, "--json", help="One JSON object per image per line."),
    annotate: Optional[Path] = typer.Option(None, "--annotate", help="Write each photo with boxes and names "
                                                                     "into this folder."),
    batch_size: int = typer.Option(8, "--batch-size", min=1, max=256, help="Photos read ahead and detected "
                                                                          "together (same-size photos share "
                                                                          "one network pass)."),
) -> None:
    """Find every face in each photo and say who it is (or unknown)."""
    from jointface.imageio import list_images
    from jointface.service import resolve_threshold, search as search_images

    paths = list_images(images)
    if not paths:
        raise CliError("no images found in the given folders")
    engine = load_engine(ctx)
    failed = 0
    written: set[str] = set()
    with open_gallery(ctx) as gallery:
        chosen = resolve_threshold(gallery, engine, threshold)
        err.print(f"engine {engine.name}, threshold {chosen.value:.3f} ({chosen.source})", markup=False)
        with progress_bar("searching") as progress:
            task = progress.add_task("searching", total=len(paths), current="")
            for result, image in search_images(gallery, engine, paths, top_k=top_k, threshold=chosen.value,
                                               batch_size=batch_size, reduced_decoding=annotate is None):
                progress.update(task, advance=1, current=result.image.name)
                failed += result.error is not None
                if as_json:
                    out.print(json.dumps(result.to_json(), ensure_ascii=False), markup=False)
                else:
                    print_result(result)
                if annotate is not None and image is not None:
                    from jointface.draw import annotate as draw

                    name = result.image.stem
                    while name in written:
                        name += "_"
                    written.add(name)
                    draw(image, result.faces, annotate / f"{name}.jpg")
    if failed:
        err.print(f"{failed} of {len(paths)} images could not be searched", markup=False)
        raise typer.Exit(1)


def print_result(result) -> None:
    if result.error:
        out.print(f"{result.image}: error: {result.error}", markup=False)
        return
    if not result.faces:
        out.print(f"{result.image}: no face found", markup=False)
        return
    out.print(f"{result.image}: {len(result.faces)} face{'s' if len(result.faces) > 1 else ''}", markup=False)
    for face in result.faces:
        box = ", ".join(f"{v:.0f}" for v in face.box)
        who = face.identity or "unknown"
        sim = "" if face.similarity is None else f" (similarity {face.similarity:.3f})"
        if face.identity is None and face.candidates:  # the nearest person, under the threshold: say who
            sim = f" (nearest: {face.candidates[0][0]}, similarity {face.candidates[0][1]:.3f})"
        others = ", ".join(f"{name} {sim_:.3f}" for name, sim_ in face.candidates[1:])
        out.print(f"  [{box}] {who}{sim}" + (f"; next: {others}" if others else ""), markup=False)


# -- people ------------------------------------------------------------------------------------


@people_app.command("list")
@handle_errors
def people_list(ctx: typer.Context, as_json: bool = typer.Option(False, "--json")) -> None:
    """Everyone in the gallery, with their face counts per engine."""
    with open_gallery(ctx) as gallery:
        people = gallery.people()
    if as_json:
        for person in people:
            out.print(json.dumps({"name": person.name, "faces": person.faces_by_engine,
                                  "created_at": person.created_at.isoformat(), "meta": person.meta},
                                 ensure_ascii=False), markup=False)
        return
    if not people:
        out.print("the gallery is empty: add people with `jointface enroll`", markup=False)
        return
    table = Table("name", "faces", "engines", "enrolled since")
    for person in people:
        engines = ", ".join(f"{engine}: {count}" for engine, count in sorted(person.faces_by_engine.items()))
        table.add_row(person.name, str(person.face_count), engines, f"{person.created_at:%Y-%m-%d %H:%M}")
    out.print(table)
    out.print(f"{len(people)} people", markup=False)


@people_app.command("show")
@handle_errors
def people_show(ctx: typer.Context, name: str, as_json: bool = typer.Option(False, "--json")) -> None:
    """One person's enrolled faces."""
    with open_gallery(ctx) as gallery:
        person, faces = gallery.person(name)
    rows = [{"id": f.id, "engine": f.engine, "engine_version": f.engine_version, "box": list(f.box),
             "score": f.det_score, "image": f.source_path, "sha256": f.source_sha256,
             "created_at": f.created_at.isoformat()} for f in faces]
    if as_json:
        out.print(json.dumps({"name": person.name, "meta": person.meta, "faces": rows}, ensure_ascii=False),
                  markup=False)
        return
    out.print(f"{person.name}: {len(faces)} faces", markup=False)
    for row in rows:
        box = ", ".join(f"{v:.0f}" for v in row["box"])
        out.print(f"  #{row['id']} {row['engine']} [{box}] {row['image']}", markup=False)


@people_app.command("rename")
@handle_errors
def people_rename(ctx: typer.Context, old: str, new: str) -> None:
    """Rename a person."""
    with open_gallery(ctx) as gallery:
        gallery.rename_person(old, new)
    err.print(f"renamed {old} to {new}", markup=False)


@people_app.command("remove")
@handle_errors
def people_remove(ctx: typer.Context, name: str,
                  yes: bool = typer.Option(False, "--yes", "-y", help="Do not ask for confirmation.")) -> None:
    """Remove a person, their faces and their vectors."""
    with open_gallery(ctx) as gallery:
        gallery.person(name)  # unknown name: clear error before asking
        if not yes and sys.stdin.isatty() and not typer.confirm(f"remove {name} and all their faces?"):
            raise typer.Exit(1)
        removed = gallery.remove_person(name)
    err.print(f"removed {name} ({removed} faces)", markup=False)


@people_app.command("merge")
@handle_errors
def people_merge(ctx: typer.Context, source: str = typer.Argument(..., metavar="FROM"),
                 target: str = typer.Argument(..., metavar="INTO")) -> None:
    """Move every face of FROM to INTO, then remove FROM."""
    with open_gallery(ctx) as gallery:
        moved = gallery.merge_people(source, target)
    err.print(f"merged {source} into {target} ({moved} faces moved)", markup=False)


# -- index and db ------------------------------------------------------------------------------


def _engines_to_check(ctx, gallery) -> list:
    from jointface.engines import get_engine

    config = settings(ctx)
    names = [config.engine] if config.engine else (gallery.engines_in_store() or [engine_name(ctx)])
    return [get_engine(name) for name in names]


@index_app.command("check")
@handle_errors
def index_check(ctx: typer.Context) -> None:
    """Compare each engine's index with the database (exit 1 if they disagree)."""
    bad = 0
    with open_gallery(ctx) as gallery:
        for engine in _engines_to_check(ctx, gallery):
            report = gallery.check_index(engine.name, engine.version)
            status = "ok" if report.healthy else "PROBLEM"
            out.print(f"{engine.name}: {status}: database {report.db_faces} faces (generation "
                      f"{report.db_generation}), index {report.index_faces} faces (generation "
                      f"{report.index_generation})", markup=False)
            for problem in report.problems:
                out.print(f"  {problem}", markup=False)
            bad += not report.healthy
    if bad:
        err.print("run `jointface index rebuild` to rebuild from the database", markup=False)
        raise typer.Exit(1)


@index_app.command("rebuild")
@handle_errors
def index_rebuild(ctx: typer.Context) -> None:
    """Rebuild the vector indexes from the database."""
    with open_gallery(ctx) as gallery:
        for engine in _engines_to_check(ctx, gallery):
            count = gallery.rebuild_index(engine.space)
            out.print(f"{engine.name}: index rebuilt with {count} faces", markup=False)


@db_app.command("upgrade")
@handle_errors
def db_upgrade(ctx: typer.Context) -> None:
    """Bring the database schema to the newest revision."""
    from index.store import head_revision

    with open_gallery(ctx, upgrade=True) as gallery:
        out.print(f"database at revision {gallery.store.current_revision()} (head {head_revision()})",
                  markup=False)


@db_app.command("backup")
@handle_errors
def db_backup(ctx: typer.Context, path: Path) -> None:
    """Copy the database to PATH (safe while others use it)."""
    with open_gallery(ctx) as gallery:
        gallery.backup(path)
    err.print(f"backup written to {path}", markup=False)


@db_app.command("restore")
@handle_errors
def db_restore(ctx: typer.Context, path: Path,
               yes: bool = typer.Option(False, "--yes", "-y", help="Do not ask for confirmation.")) -> None:
    """Replace the database with a backup (the current one is kept as *.before-restore)."""
    if not yes and sys.stdin.isatty() and not typer.confirm("replace the current gallery with this backup?"):
        raise typer.Exit(1)
    with open_gallery(ctx) as gallery:
        gallery.restore(path)
    err.print(f"restored from {path}; indexes will be rebuilt on next use", markup=False)


# -- calibrate ---------------------------------------------------------------------------------


@handle_errors
def calibrate(
    ctx: typer.Context,
    fpir: float = typer.Option(0.01, "--fpir", help="False-positive identification rate wanted: the share of "
                                                     "strangers who may be matched to someone."),
    unknowns: list[Path] = typer.Option(..., "--unknowns", help="Photos (or folders) of people who are NOT in "
                                                                 "the gallery; repeat the option for several."),
) -> None:
    """Set the gallery's rejection threshold from photos of strangers; `search` then uses it."""
    from jointface.imageio import list_images
    from jointface.service import calibrate as run_calibration

    if not 0 < fpir < 1:
        raise typer.BadParameter("--fpir must be between 0 and 1")
    paths = list_images(unknowns)
    if not paths:
        raise CliError("no images found among --unknowns")
    engine = load_engine(ctx)
    with open_gallery(ctx) as gallery, progress_bar("calibrating") as progress:
        task = progress.add_task("calibrating", total=len(paths), current="")
        try:
            result = run_calibration(gallery, engine, paths, fpir=fpir,
                                     on_progress=lambda p: progress.update(task, advance=1, current=p.name))
        except ValueError as exc:
            raise CliError(str(exc)) from exc
    for message in result.failed_images:
        err.print(f"failed: {message}", markup=False)
    out.print(f"engine {engine.name}: threshold {result.threshold:.4f} stored (FPIR {result.reached_fpir:.4f} on "
              f"{result.faces} stranger faces from {result.images} images; asked for {fpir})", markup=False)
    if result.faces < 1 / fpir:
        err.print(f"warning: {result.faces} stranger faces are too few to measure an FPIR of {fpir} reliably "
                  f"(use at least {int(10 / fpir)})", markup=False)
