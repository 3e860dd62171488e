"""gallery settings: which vector backend mirrors the faces (faiss, pgvector, milvus)

Revision ID: 0005_vector_backend
Revises: 0004_face_clusters
Create Date: 2026-11-30
"""

import sqlalchemy as sa
from alembic import op

revision = "0005_vector_backend"
down_revision = "0004_face_clusters"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # One row per setting. A gallery without a "vector_backend" row uses FAISS (as every gallery did before).
    op.create_table(
        "gallery_settings",
        sa.Column("key", sa.String(64), primary_key=True),
        sa.Column("value", sa.JSON(), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
    )


def downgrade() -> None:
    bind = op.get_bind()
    if bind.dialect.name == "postgresql":
        # pgvector tables (index/backends/pgvector.py) reference faces.id: drop them with the setting.
        tables = bind.execute(sa.text(
            "SELECT tablename FROM pg_tables WHERE schemaname = current_schema() AND tablename LIKE :pattern"
        ), {"pattern": "jf\\_vectors\\_%"}).scalars().all()
        for table in tables:
            op.drop_table(table)
    op.drop_table("gallery_settings")
