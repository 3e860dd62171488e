"""Alembic environment: the URL or an open connection comes from the caller.

:func:`index.store.alembic_config` puts an open connection in
``config.attributes["connection"]`` (so the upgrade runs inside JointFace's
own engine, with its SQLite settings); the ``alembic`` command line can
instead pass ``-x url=sqlite:///path/to/jointface.db``.
"""

from alembic import context
from sqlalchemy import create_engine

from index.models import Base

config = context.config
target_metadata = Base.metadata


def _url() -> str:
    """``-x url=...`` on the alembic command line, else the configuration's ``sqlalchemy.url``."""
    return context.get_x_argument(as_dictionary=True).get("url") or config.get_main_option("sqlalchemy.url")


def _run(**options) -> None:
    # render_as_batch: SQLite cannot ALTER most things, batch mode copies the table
    context.configure(target_metadata=target_metadata, render_as_batch=True, **options)
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_offline() -> None:
    _run(url=_url(), literal_binds=True)


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        _run(connection=connection, compare_type=True)
        return
    with create_engine(_url()).connect() as connection:
        _run(connection=connection, compare_type=True)


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
