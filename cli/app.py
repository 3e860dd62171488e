"""``jointface``: enroll people, search photos, manage the gallery.

Exit status: 0 when everything went well, 1 when some inputs failed (the
others were done) or the gallery could not be used, 2 for usage errors.

This module assembles the app: the global options (:func:`main_options`)
and, in one place below, every command from the modules that hold them:
gallery commands (``cli/gallery.py``, ``cli/cluster.py``, ``cli/serve.py``)
and research commands (``cli/research.py``). ``python -m cli.app`` and the
``jointface`` entry point both run :func:`main`.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer

from cli import cluster, gallery, research, serve
from cli.common import err, out
from jointface import __version__
from jointface.config import Settings

app = typer.Typer(help="JointFace: enroll faces, then find who is in your photos.", no_args_is_help=True,
                  add_completion=False, pretty_exceptions_enable=False)


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


# -- the commands, in the order `jointface --help` lists them ----------------------------------

app.command()(gallery.enroll)
app.command()(gallery.search)
app.command()(gallery.calibrate)
app.command()(research.bench)
app.command()(research.preprocess)
app.command()(research.organize)
app.command()(research.train)
app.command("train-v2")(research.train_v2)
app.command()(research.quantize)
app.command()(cluster.cluster)
app.command()(serve.serve)
app.add_typer(gallery.people_app, name="people")
app.add_typer(gallery.index_app, name="index")
app.add_typer(gallery.db_app, name="db")
app.add_typer(cluster.clusters_app, name="clusters")
app.add_typer(serve.keys_app, name="keys")


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


def main() -> None:
    app(args=hoist_global_options(sys.argv[1:]), prog_name="jointface")


if __name__ == "__main__":
    main()
