"""``jointface``: enroll people, search photos, manage the gallery.

Exit status: 0 when everything went well, 1 when some inputs failed (the
others were done) or the gallery could not be used, 2 for usage errors.
"""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from jointface import __version__
from jointface.config import Settings

app = typer.Typer(help="JointFace: enroll faces, then find who is in your photos.", no_args_is_help=True,
                  add_completion=False, pretty_exceptions_enable=False)
people_app = typer.Typer(help="List, inspect, rename, remove and merge people.", no_args_is_help=True)
index_app = typer.Typer(help="Check or rebuild the vector indexes.", no_args_is_help=True)
db_app = typer.Typer(help="Database schema upgrades, backup and restore.", no_args_is_help=True)
app.add_typer(people_app, name="people")
app.add_typer(index_app, name="index")
app.add_typer(db_app, name="db")

out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)


class CliError(Exception):
    """A failure reported as ``error: message`` with exit status 1."""


def handle_errors(func):
    """Turn the library's errors into a message on stderr and exit status 1."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        from index.errors import GalleryError
        from jointface.engines import UnknownEngineError
        from jointface.imageio import ImageLoadError

        try:
            return func(*args, **kwargs)
        except (CliError, GalleryError, UnknownEngineError, ImageLoadError, FileNotFoundError,
                NotADirectoryError) as exc:
            err.print(f"error: {exc}", markup=False)
            raise typer.Exit(1)
        except PermissionError as exc:
            err.print(f"error: permission denied: {exc.filename or exc}", markup=False)
            raise typer.Exit(1)
        except OSError as exc:
            err.print(f"error: {exc.strerror or exc}" + (f": {exc.filename}" if exc.filename else ""), markup=False)
            raise typer.Exit(1)
        except ValueError as exc:  # bad values that got past parsing (a NUL byte in a path, ...)
            err.print(f"error: {exc}", markup=False)
            raise typer.Exit(1)

    return wrapper


def settings(ctx: typer.Context) -> Settings:
    return ctx.obj


def open_gallery(ctx: typer.Context, *, upgrade: bool = True):
    from index import Gallery

    config = settings(ctx)
    return Gallery.open(config.home, config.db_url, notify=lambda message: err.print(f"note: {message}",
                                                                                      markup=False),
                        upgrade=upgrade, index_kind=config.index_kind, vectors=config.vectors)


def load_engine(ctx: typer.Context):
    from jointface.engines import get_engine

    config = settings(ctx)
    config.apply_threads()
    return get_engine(config.engine_name())


def progress_bar(description: str) -> Progress:
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    TimeRemainingColumn(), TextColumn("{task.fields[current]}"), console=err,
                    disable=not err.is_terminal, transient=False)


def version_callback(value: bool) -> None:
    if value:
        out.print(f"jointface {__version__}")
        raise typer.Exit()


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """Python warnings (a stale int8 model, say) as one `warning: ...` line, without source lines."""
    err.print(f"warning: {message}", markup=False)


@app.callback()
def main_options(
    ctx: typer.Context,
    home: Optional[Path] = typer.Option(None, "--home", help="Gallery folder (default: $JOINTFACE_HOME or a "
                                                             "per-user data folder)."),
    db_url: Optional[str] = typer.Option(None, "--db-url", help="SQLAlchemy database URL (default: SQLite in the "
                                                                "home folder; $JOINTFACE_DB_URL)."),
    engine: Optional[str] = typer.Option(None, "--engine", help="Face engine: jointface or dlib (default: "
                                                                "jointface when its shipped weights' card shows "
                                                                "it as good as dlib on P2 and P6, else dlib); "
                                                                "jointface@PATH runs other weights."),
    threads: Optional[int] = typer.Option(None, "--threads", min=1, help="CPU threads for the network."),
    index_kind: Optional[str] = typer.Option(None, "--index-kind", help="Vector index: auto (exact search below "
                                                                        "100,000 faces, IVF above), flat, ivf or "
                                                                        "hnsw ($JOINTFACE_INDEX_KIND)."),
    vectors: Optional[str] = typer.Option(None, "--vectors", help="Vector backend: faiss (default), pgvector "
                                                                  "(needs a PostgreSQL --db-url), milvus (Milvus "
                                                                  "Lite in the home folder), milvus:FILE.db or "
                                                                  "milvus:http://HOST:19530; recorded in the "
                                                                  "gallery ($JOINTFACE_VECTORS)."),
    version: bool = typer.Option(False, "--version", callback=version_callback, is_eager=True,
                                 help="Print the version and exit."),
) -> None:
    import warnings

    from index.vectors import INDEX_KINDS

    warnings.showwarning = _show_warning
    if index_kind is not None and index_kind not in INDEX_KINDS:
        raise typer.BadParameter(f"unknown index kind {index_kind!r}; choose one of {', '.join(INDEX_KINDS)}",
                                 param_hint="--index-kind")
    if vectors is not None:
        from index.backends import parse_backend
        from index.errors import GalleryError

        try:
            parse_backend(vectors)
        except GalleryError as exc:
            raise typer.BadParameter(str(exc), param_hint="--vectors")
    ctx.obj = Settings.resolve(home=home, db_url=db_url, engine=engine, threads=threads, index_kind=index_kind,
                               vectors=vectors)


# -- enroll ------------------------------------------------------------------------------------


@app.command()
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


@app.command()
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
    names = [config.engine] if config.engine else (gallery.engines_in_store() or [config.engine_name()])
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
            count = gallery.rebuild_index(engine.name, engine.version, engine.dim)
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


# -- calibrate and bench ------------------------------------------------------------------------


@app.command()
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


PROTOCOLS = ("p1", "p2", "p3", "p4", "p5", "p6", "cluster", "all", "report")


@app.command()
@handle_errors
def bench(
    ctx: typer.Context,
    protocol: str = typer.Argument(..., help="p1, p2, p3, p4, p5, p6, cluster or all (see ../shared/PROTOCOLS.md); report "
                                             "rewrites the README's results section from the JSON files."),
    engines: Optional[list[str]] = typer.Option(None, "--engine", "-e", help="Engines to compare (repeat); "
                                                                             "default: every available one. "
                                                                             "jointface@PATH adds a network "
                                                                             "trained elsewhere."),
    limit: Optional[int] = typer.Option(None, "--limit", min=1, help="Run on an evenly spread subset (quick "
                                                                     "checks); figures are then not the "
                                                                     "protocol's."),
    out_dir: Path = typer.Option(Path("benchmarks/results"), "--out", help="Where results are written."),
    cache_dir: Optional[Path] = typer.Option(None, "--cache", help="Detection cache (default: "
                                                                   "~/.cache/jointface/bench)."),
    tag: Optional[str] = typer.Option(None, "--tag", help="Suffix for the result file names."),
    seed_dlib: Optional[Path] = typer.Option(None, "--seed-dlib", help="Every-face LFW labels (`preprocess "
                                                                       "--all-faces`): fill the dlib engine's "
                                                                       "detection cache from them first."),
) -> None:
    """Run the benchmark protocols and write JSON, Markdown and plots."""
    from jointface.bench import run as bench_run
    from jointface.bench.protocols import require_shared_data
    from jointface.engines import get_engine

    protocol = protocol.lower()
    if protocol not in PROTOCOLS:
        raise typer.BadParameter(f"unknown protocol {protocol!r}; choose one of {', '.join(PROTOCOLS)}")
    if protocol == "report":  # regenerate the README's results section from the JSON files
        from jointface.bench.report import update_readme, write_weights_card

        try:
            changed = update_readme(Path("README.md"), out_dir)
            card = write_weights_card(out_dir)
        except (OSError, ValueError) as exc:
            raise CliError(str(exc)) from exc
        err.print("README.md results " + ("updated" if changed else "already up to date"), markup=False)
        if card is not None:
            err.print(f"weights card written: {card}", markup=False)
        return
    settings(ctx).apply_threads()
    names = engines or _benchmark_engines()
    chosen = [get_engine(name) for name in names]
    cache = cache_dir or Path.home() / ".cache" / "jointface" / "bench"
    if seed_dlib is not None:
        from jointface.bench.cache import seed_dlib_cache

        if not seed_dlib.is_file():
            raise CliError(f"{seed_dlib}: no such labels file")
        with progress_bar("seeding the dlib cache") as progress:
            task = progress.add_task("seeding the dlib cache", total=None, current="")
            counts = seed_dlib_cache(seed_dlib, cache, get_engine("dlib"),
                                     progress=lambda done, total: progress.update(task, completed=done, total=total))
        err.print(f"dlib cache seeded from {seed_dlib}: {counts}", markup=False)
    with progress_bar("bench") as progress:
        tasks: dict[str, int] = {}

        def report(stage: str, done: int, total: int) -> None:
            if stage not in tasks:
                tasks[stage] = progress.add_task(stage, total=total, current="")
            progress.update(tasks[stage], completed=done)
            if not err.is_terminal and (done == total or done % 500 == 0):
                err.print(f"{stage}: {done}/{total}", markup=False)

        ctx_ = bench_run.BenchContext(lfw_root=require_shared_data("lfw"), cache_dir=cache, progress=report,
                                      limit=limit)
        wanted = ["p1", "p2", "p3", "p4", "p5", "p6"] if protocol == "all" else [protocol]
        for name in wanted:
            result = bench_run.run_protocol(name, chosen, ctx_, out_dir)
            path = bench_run.write_results(result, chosen, out_dir, tag=tag)
            out.print(bench_run.markdown_for(result), markup=False)
            err.print(f"written: {path}", markup=False)
        if out_dir == Path("benchmarks/results") and Path("README.md").exists():
            from jointface.bench.report import update_readme

            update_readme(Path("README.md"), out_dir)


# -- training ----------------------------------------------------------------------------------


@app.command()
@handle_errors
def preprocess(
    root: Path = typer.Argument(..., help="The collection's folder."),
    layout: str = typer.Option("folder", "--layout", help="lfw, folder (one subfolder per person), fei, caltech, "
                                                          "gt (Georgia Tech); with --all-faces also aaf "
                                                          "(All-Age-Faces), utkface, celeba."),
    labels_out: Path = typer.Option(..., "--out", help="Labels file (JSON lines); rerun to continue."),
    limit: Optional[int] = typer.Option(None, "--limit", min=1, help="Label only the first N images."),
    all_faces: bool = typer.Option(False, "--all-faces", help="Label every face of every photo (training data of "
                                                              "the v2 network; writes a manifest)."),
    workers: int = typer.Option(2, "--workers", min=1, help="Worker processes (with --all-faces)."),
) -> None:
    """Label a face collection with the dlib engine (box, identity, landmark box, teacher descriptor)."""
    from jointface.train.labels import LAYOUTS, preprocess as run_preprocess

    if all_faces:
        _preprocess_all_faces(root, layout, labels_out, limit, workers)
        return
    if layout not in LAYOUTS:
        raise typer.BadParameter(f"unknown layout {layout!r}; choose one of {', '.join(LAYOUTS)}")
    if not root.is_dir():
        raise CliError(f"{root}: not a folder")
    try:
        summary = run_preprocess(root, layout, labels_out, progress=err.is_terminal, limit=limit)
    except ValueError as exc:
        raise CliError(str(exc)) from exc
    for key in ("no_face", "several_faces", "unreadable", "unlabelled"):
        entries = summary.get(key) or []
        if entries:
            err.print(f"{len(entries)} images {key.replace('_', ' ')}:", markup=False)
            for entry in entries[:20]:
                err.print(f"  {entry}", markup=False)
            if len(entries) > 20:
                err.print(f"  ... and {len(entries) - 20} more (see {labels_out})", markup=False)
    labels_out.with_suffix(".summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    counts = {k: v for k, v in summary.items() if isinstance(v, (int, float, str))}
    out.print(json.dumps(counts, indent=2), markup=False)


def _preprocess_all_faces(root: Path, layout: str, labels_out: Path, limit: Optional[int], workers: int) -> None:
    from jointface.datasets.collections import LAYOUTS as ALL_LAYOUTS, CollectionError
    from jointface.datasets.teacher import LabelsBusy, LabelsMismatch, label_collection

    if layout not in ALL_LAYOUTS:
        raise typer.BadParameter(f"unknown layout {layout!r}; choose one of {', '.join(ALL_LAYOUTS)}")
    try:
        manifest = label_collection(root, layout, labels_out, workers=workers, limit=limit,
                                    progress=err.is_terminal)
    except (CollectionError, LabelsMismatch, LabelsBusy) as exc:
        raise CliError(str(exc)) from exc
    except KeyboardInterrupt:
        err.print(f"interrupted: every finished photo is in {labels_out}; run the same command to continue",
                  markup=False)
        raise typer.Exit(130)
    unreadable = manifest.get("unreadable") or []
    if unreadable:
        err.print(f"{len(unreadable)} photos could not be read:", markup=False)
        for path, reason in unreadable[:20]:
            err.print(f"  {path}: {reason}", markup=False)
    out.print(json.dumps({k: v for k, v in manifest.items() if k != "unreadable"}, indent=2), markup=False)


@app.command()
@handle_errors
def organize(
    labels: Path = typer.Argument(..., help="Labels file written by `jointface preprocess`."),
    out_dir: Path = typer.Argument(..., help="Where the resized images and the split go."),
    layout: Optional[str] = typer.Option(None, "--layout", help="Defaults to the layout the labels were made "
                                                                "with."),
) -> None:
    """Resize to a shorter side of 320 px and split into train / test (P1 exactly, for LFW)."""
    from jointface.train.labels import organize as run_organize

    if not labels.is_file():
        raise CliError(f"{labels}: no such labels file (run `jointface preprocess` first)")
    try:
        summary = run_organize(labels, out_dir, layout, progress=err.is_terminal)
    except ValueError as exc:
        raise CliError(str(exc)) from exc
    out.print(json.dumps({k: v for k, v in summary.items() if not isinstance(v, list)}, indent=2, default=str),
              markup=False)


@app.command()
@handle_errors
def train(
    ctx: typer.Context,
    config_path: Optional[Path] = typer.Option(None, "--config", help="A JSON training config (see "
                                                                      "jointface/configs/)."),
    data_dir: Optional[Path] = typer.Option(None, "--data", help="Output folder of `jointface organize`."),
    out_dir: Optional[Path] = typer.Option(None, "--out", help="Run folder (checkpoints, logs, curves); an "
                                                              "interrupted run resumes from it."),
    backbone: Optional[str] = typer.Option(None, "--backbone", help="resnet18, resnet34 or resnet50."),
    input_size: Optional[int] = typer.Option(None, "--input-size", help="Network input in pixels (320: 10x10 "
                                                                        "grid, 160: 5x5)."),
    epochs: Optional[int] = typer.Option(None, "--epochs", min=1),
    heads: Optional[str] = typer.Option(None, "--heads", help="Comma-separated identity heads: classifier, "
                                                              "arcface or cosface, triplet, distill."),
    init: Optional[Path] = typer.Option(None, "--init", help="torchvision ResNet weights to start from."),
    init_weights: Optional[Path] = typer.Option(None, "--init-weights", help="JointFace weights (or a training "
                                                                              "checkpoint) to continue from, "
                                                                              "with a fresh schedule."),
    bf16: Optional[bool] = typer.Option(None, "--bf16/--no-bf16", help="bf16 autocast."),
    export: Optional[Path] = typer.Option(None, "--export", help="Also copy the final weights here."),
    nproc: int = typer.Option(1, "--nproc", min=1, help="Data-parallel training processes on this machine "
                                                        "(torch.distributed: gloo on CPU, nccl on GPU); the "
                                                        "global batch stays the config's."),
) -> None:
    """Train the joint detection + identification network (resumes from --out)."""
    import os
    import shlex
    import shutil
    import subprocess

    from jointface.train.config import TrainConfig
    from jointface.train.loop import train as run_training

    config = TrainConfig.load(config_path) if config_path else TrainConfig()
    changes = {"data_dir": str(data_dir) if data_dir else None, "out_dir": str(out_dir) if out_dir else None,
               "backbone": backbone, "input_size": input_size, "epochs": epochs,
               "init": str(init) if init else None, "bf16": bf16,
               "init_weights": str(init_weights) if init_weights else None,
               "identity_heads": [h.strip() for h in heads.split(",") if h.strip()] if heads else None,
               "num_threads": settings(ctx).threads}
    config = config.replace(**{k: v for k, v in changes.items() if v is not None})
    if not config.data_dir or not config.out_dir:
        raise typer.BadParameter("--data and --out (or a --config that sets data_dir and out_dir) are required")
    if not Path(config.data_dir, "train.jsonl").is_file():
        raise CliError(f"{config.data_dir} has no train.jsonl: run `jointface organize` first")
    if nproc > 1 and "WORLD_SIZE" not in os.environ:
        from jointface.train.distributed import launch_command

        if config.batch_size % nproc:
            raise CliError(f"a batch of {config.batch_size} photos cannot be split over {nproc} processes: make "
                           "people_per_batch x images_per_person a multiple of --nproc")
        raise typer.Exit(subprocess.call(launch_command(nproc, sys.argv[1:])))
    config = config.replace(training_command="jointface " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
                            progress=err.is_terminal)
    try:
        result = run_training(config)
    except FloatingPointError as exc:
        raise CliError(str(exc)) from exc
    out.print(json.dumps({"weights": str(result.weights), "step": result.step, "epoch": result.epoch,
                          "metrics": result.metrics}, indent=2, default=str), markup=False)
    if export is not None:
        export.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(result.weights, export)
        err.print(f"weights copied to {export}", markup=False)


@app.command("train-v2")
@handle_errors
def train_v2(
    ctx: typer.Context,
    config_path: Path = typer.Argument(..., help="A v2 training config (jointface/configs/v2_*.json)."),
    out_dir: Optional[Path] = typer.Option(None, "--out", help="Run folder (default: the config's out_dir); "
                                                              "an interrupted run there resumes."),
    max_steps: Optional[int] = typer.Option(None, "--max-steps", min=1, help="Train until this step."),
) -> None:
    """Train the v2 joint network on teacher-labelled collections (`preprocess --all-faces`); resumes."""
    from dataclasses import replace

    from jointface.train.v2 import TrainConfigV2, run_for

    if not config_path.is_file():
        raise CliError(f"{config_path}: no such config file")
    try:
        config = TrainConfigV2.load(config_path)
    except (ValueError, TypeError) as exc:
        raise CliError(f"{config_path}: not a v2 training config ({exc})") from exc
    config = replace(config, **{k: v for k, v in {"out_dir": str(out_dir) if out_dir else None,
                                                  "max_steps": max_steps,
                                                  "num_threads": settings(ctx).threads}.items() if v is not None})
    if "lfw" not in config.labels:
        raise CliError(f"{config_path}: its labels must include lfw (the leak guard's reference)")
    try:
        result = run_for(config).run()
    except KeyboardInterrupt:
        raise typer.Exit(130)
    except FloatingPointError as exc:
        raise CliError(str(exc)) from exc
    out.print(json.dumps(result, indent=2, default=str), markup=False)


@app.command()
@handle_errors
def quantize(
    photos: list[Path] = typer.Argument(..., help="Photos (or folders) of faces to calibrate on: training "
                                                  "photos, never test ones. A `jointface organize` output "
                                                  "folder gives its training photos only."),
    weights: Optional[Path] = typer.Option(None, "--weights", help="Weights file (default: the shipped or "
                                                                   "$JOINTFACE_WEIGHTS weights)."),
    count: int = typer.Option(64, "--count", min=8, help="How many photos to calibrate on (evenly spaced)."),
    out_path: Optional[Path] = typer.Option(None, "--out", help="Where to write the model (default: beside the "
                                                                "weights, NAME.int8.onnx, where "
                                                                "--engine jointface-int8 finds it)."),
) -> None:
    """Quantise the joint network to int8 for --engine jointface-int8 (calibrated on photos of faces)."""
    from jointface.engines.joint_engine import quantize_weights
    from jointface.imageio import list_images

    paths = []
    for given in photos:
        listing = given / "train.jsonl"
        if given.is_dir() and listing.is_file():  # organised training data: its train split, never its test one
            from jointface.train.data import load_class_names, load_records

            try:
                paths += [record.image_path for record in load_records(given, "train", load_class_names(given))]
            except (OSError, ValueError, KeyError, TypeError) as exc:
                raise CliError(f"{listing}: not a `jointface organize` listing ({exc})") from exc
        else:
            paths += list_images([given])
    if not paths:
        raise CliError("no images found among the calibration photos")
    with progress_bar("calibrating") as progress:
        task = progress.add_task("calibrating", total=min(count, len(paths)), current="")
        try:
            summary = quantize_weights(weights, paths, count=count, out=out_path,
                                       progress=lambda done, total: progress.update(task, completed=done,
                                                                                    total=total))
        except ValueError as exc:
            raise CliError(str(exc)) from exc
    for message in summary["skipped"]:
        err.print(f"skipped: {message}", markup=False)
    out.print(f"int8 model of {summary['weights']} (version {summary['weights_version']}) written to "
              f"{summary['path']}: {summary['bytes'] / 1e6:.1f} MB, calibrated on {summary['photos']} photos "
              f"at input sizes {summary['input_sizes']}", markup=False)


def _benchmark_engines() -> list[str]:
    from jointface.engines import default_engine_name

    return ["dlib", "jointface"] if default_engine_name() == "jointface" else ["dlib"]


def hoist_global_options(argv: list[str]) -> list[str]:
    """Move the global options a user typed after the command (``jointface search --engine dlib x.jpg``) in
    front of it, where the group parses them; a command's own option of the same name (``bench -e``) stays."""
    import click

    group = typer.main.get_command(app)
    global_params = {opt: param for param in group.params for opt in param.opts if opt.startswith("--")}

    def span(position: int) -> int:  # how many tokens the global option at `position` takes
        token = argv[position]
        return 1 if "=" in token or global_params[token.split("=", 1)[0]].is_flag else 2

    front, path, hoisted, rest = [], [], [], []
    command, position = group, 0
    while position < len(argv):
        token = argv[position]
        name = token.split("=", 1)[0]
        if token == "--":
            rest += argv[position:]
            break
        if not path and name in global_params:  # already in front of the command
            front += argv[position:position + span(position)]
            position += span(position)
        elif isinstance(command, click.Group) and token in command.commands and not rest:
            path.append(token)
            command = command.commands[token]
            position += 1
        elif path and name in global_params and name != "--version" and \
                name not in {opt for param in command.params for opt in getattr(param, "opts", [])}:
            hoisted += argv[position:position + span(position)]
            position += span(position)
        else:
            rest.append(token)
            position += 1
    return front + hoisted + path + rest


if __name__ != "__main__":  # run as `python -m cli.app`, the commands are registered on the imported module's app
    from cli.cluster import register as _register_cluster  # noqa: E402  (`cluster` and `clusters`)

    _register_cluster(app)

if __name__ != "__main__":
    from cli import serve as _serve  # noqa: E402  (`jointface serve` and `jointface keys`)

    _serve.register(app)


def main() -> None:
    app(args=hoist_global_options(sys.argv[1:]), prog_name="jointface")


if __name__ == "__main__":
    from cli.app import main as _main  # the module (with every command registered), not this __main__ copy

    _main()
