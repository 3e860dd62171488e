"""What the revisions share: creating a table's indexes and dropping tables after their indexes.

Mechanism only, never a column or a type: each revision keeps its own copy of the schema it wrote, so an
edit here cannot change what an old revision did to a database. A table's indexes are named once, in a
``{index name: columns}`` dict used by both ``upgrade`` and ``downgrade``.
"""

from __future__ import annotations

from alembic import op


def create_indexes(table: str, indexes: dict[str, list[str]]) -> None:
    """Create each index of ``table``, in order."""
    for name, columns in indexes.items():
        op.create_index(name, table, columns)


def drop_tables(*tables: tuple[str, dict[str, list[str]]]) -> None:
    """Drop each ``(table, its indexes)`` in the order given: its indexes first, the last created first."""
    for table, indexes in tables:
        for name in reversed(list(indexes)):
            op.drop_index(name, table_name=table)
        op.drop_table(table)
