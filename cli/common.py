"""What every ``jointface`` command shares: the consoles, the error handler, the gallery and the engine.

Imported by the command modules (``cli/gallery.py``, ``cli/research.py``,
``cli/cluster.py``, ``cli/serve.py``); imports none of them.
"""

from __future__ import annotations

import functools

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from jointface.config import Settings

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


def engine_name(ctx: typer.Context) -> str:
    """The engine asked for (--engine, $JOINTFACE_ENGINE), else the default one."""
    from jointface.engines import default_engine_name

    return settings(ctx).engine or default_engine_name()


def load_engine(ctx: typer.Context):
    from jointface.engines import get_engine

    settings(ctx).apply_threads()
    return get_engine(engine_name(ctx))


def progress_bar(description: str) -> Progress:
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    TimeRemainingColumn(), TextColumn("{task.fields[current]}"), console=err,
                    disable=not err.is_terminal, transient=False)
