"""photo library clustering: scanned photos, their faces, face clusters (``jointface cluster``)

Revision ID: 0004_face_clusters
Revises: 0003_api_keys_audit
Create Date: 2026-11-30
"""

import sqlalchemy as sa
from alembic import op

from migrations.helpers import create_indexes, drop_tables

revision = "0004_face_clusters"
down_revision = "0003_api_keys_audit"
branch_labels = None
depends_on = None

PHOTOS_INDEXES = {"ix_library_photos_path": ["path"]}
CLUSTERS_INDEXES = {"ix_face_clusters_engine": ["engine"], "ix_face_clusters_person_id": ["person_id"]}
FACES_INDEXES = {"ix_library_faces_photo_id": ["photo_id"], "ix_library_faces_engine": ["engine"],
                 "ix_library_faces_cluster_id": ["cluster_id"]}


def upgrade() -> None:
    op.create_table(
        "library_photos",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("engine", sa.String(64), nullable=False),
        sa.Column("engine_version", sa.String(128), nullable=False),
        sa.Column("path", sa.String(4096), nullable=False),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("size_bytes", sa.BigInteger(), nullable=False),
        sa.Column("mtime_ns", sa.BigInteger(), nullable=False),
        sa.Column("width", sa.Integer(), nullable=False),
        sa.Column("height", sa.Integer(), nullable=False),
        sa.Column("face_count", sa.Integer(), nullable=False),
        sa.Column("scanned_at", sa.DateTime(timezone=True), nullable=False),
        sa.UniqueConstraint("engine", "engine_version", "sha256", name="uq_library_photos_engine_sha"),
    )
    create_indexes("library_photos", PHOTOS_INDEXES)
    op.create_table(
        "face_clusters",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("engine", sa.String(64), nullable=False),
        sa.Column("engine_version", sa.String(128), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("person_id", sa.Integer(), sa.ForeignKey("people.id", ondelete="SET NULL",
                                                           name="fk_face_clusters_person_id_people"), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
    )
    create_indexes("face_clusters", CLUSTERS_INDEXES)
    op.create_table(
        "library_faces",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("photo_id", sa.Integer(), sa.ForeignKey("library_photos.id", ondelete="CASCADE",
                                                          name="fk_library_faces_photo_id_library_photos"),
                  nullable=False),
        sa.Column("engine", sa.String(64), nullable=False),
        sa.Column("engine_version", sa.String(128), nullable=False),
        sa.Column("dim", sa.Integer(), nullable=False),
        sa.Column("embedding", sa.LargeBinary(), nullable=False),
        sa.Column("box_x1", sa.Float(), nullable=False),
        sa.Column("box_y1", sa.Float(), nullable=False),
        sa.Column("box_x2", sa.Float(), nullable=False),
        sa.Column("box_y2", sa.Float(), nullable=False),
        sa.Column("det_score", sa.Float(), nullable=False),
        sa.Column("cluster_id", sa.Integer(), sa.ForeignKey("face_clusters.id", ondelete="SET NULL",
                                                            name="fk_library_faces_cluster_id_face_clusters"),
                  nullable=True),
        sa.Column("person_id", sa.Integer(), sa.ForeignKey("people.id", ondelete="SET NULL",
                                                           name="fk_library_faces_person_id_people"), nullable=True),
        sa.Column("face_id", sa.Integer(), sa.ForeignKey("faces.id", ondelete="SET NULL",
                                                         name="fk_library_faces_face_id_faces"), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    )
    create_indexes("library_faces", FACES_INDEXES)


def downgrade() -> None:
    drop_tables(("library_faces", FACES_INDEXES), ("face_clusters", CLUSTERS_INDEXES),
                ("library_photos", PHOTOS_INDEXES))
