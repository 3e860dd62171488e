"""JointFace: face enrollment and search.

The package is split in three:

* :mod:`jointface` - images, engines (dlib baseline, joint network), the
  operations behind the CLI (enroll, search, people management);
* :mod:`index` - the identity store (SQLite via SQLAlchemy, Alembic
  migrations) and the FAISS vector index that mirrors it;
* :mod:`cli` - the ``jointface`` command, a thin typer layer.
"""

__version__ = "0.1.0"
