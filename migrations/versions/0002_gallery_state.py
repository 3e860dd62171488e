"""gallery state: index generation and calibrated threshold per engine

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-24
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "gallery_state",
        sa.Column("engine", sa.String(64), primary_key=True),
        sa.Column("generation", sa.Integer(), nullable=False),
        sa.Column("threshold", sa.Float(), nullable=True),
        sa.Column("threshold_info", sa.JSON(), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
    )
    # A database of revision 0001 may already hold faces: give each engine a
    # state row so its index is rebuilt and checked on next open.
    # (PostgreSQL needs the NULL and the JSON literal typed; SQLite would turn a CAST to JSON into a number.)
    typed = op.get_bind().dialect.name == "postgresql"
    op.execute(
        "INSERT INTO gallery_state (engine, generation, threshold, threshold_info, updated_at) "
        + ("SELECT engine, 1, CAST(NULL AS FLOAT), CAST('{}' AS JSON), CURRENT_TIMESTAMP "
           "FROM (SELECT DISTINCT engine FROM faces) AS engines"
           if typed else "SELECT DISTINCT engine, 1, NULL, '{}', CURRENT_TIMESTAMP FROM faces")
    )


def downgrade() -> None:
    op.drop_table("gallery_state")
