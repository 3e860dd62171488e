"""Alembic migrations of the identity store (run through :mod:`index.store`)."""

from pathlib import Path

MIGRATIONS_DIR = Path(__file__).resolve().parent
