"""SQLAlchemy 2 typed models of the identity store.

* ``people``: one row per person (unique name, free JSON metadata).
* ``faces``: one row per enrolled face: who, which engine (name + version),
  the L2-normalised float32 embedding as bytes, the box, the detection score,
  the source image path and its sha256.
* ``gallery_state``: one row per engine: a generation number bumped in the
  same transaction as every change to that engine's faces (the vector index
  file records the generation it mirrors, so a stale index is detected), and
  the calibrated rejection threshold.
* ``library_photos``, ``library_faces``, ``face_clusters`` (``jointface
  cluster``): every photo scanned for a photo library (so a rerun never
  detects it again), every face found in them (box, embedding, cluster), and
  the clusters: open (unnamed), named (linked to a person) or ignored.

The schema is owned by the Alembic migrations in ``migrations/``; these
classes must match them (a test compares the two).
"""

from __future__ import annotations

from datetime import datetime, timezone

import numpy as np
from sqlalchemy import JSON, BigInteger, DateTime, Float, ForeignKey, Integer, LargeBinary, String, UniqueConstraint
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


class Base(DeclarativeBase):
    pass


class Person(Base):
    __tablename__ = "people"
    __table_args__ = (UniqueConstraint("name", name="uq_people_name"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(255), nullable=False)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow, nullable=False)
    meta: Mapped[dict] = mapped_column(JSON, default=dict, nullable=False)

    faces: Mapped[list["FaceRow"]] = relationship(back_populates="person", cascade="all, delete-orphan",
                                                  passive_deletes=True)

    def __repr__(self) -> str:
        return f"Person(id={self.id}, name={self.name!r})"


class DetectedFace:
    """What an engine found for a face, shared by ``faces`` and ``library_faces`` rows: the embedding
    (float32 bytes, ``dim`` long), the box and the detection score."""

    dim: Mapped[int] = mapped_column(Integer, nullable=False)
    embedding: Mapped[bytes] = mapped_column(LargeBinary, nullable=False)
    box_x1: Mapped[float] = mapped_column(Float, nullable=False)
    box_y1: Mapped[float] = mapped_column(Float, nullable=False)
    box_x2: Mapped[float] = mapped_column(Float, nullable=False)
    box_y2: Mapped[float] = mapped_column(Float, nullable=False)
    det_score: Mapped[float] = mapped_column(Float, nullable=False)

    @property
    def vector(self) -> np.ndarray:
        return np.frombuffer(self.embedding, dtype=np.float32)

    @property
    def box(self) -> tuple[float, float, float, float]:
        return (self.box_x1, self.box_y1, self.box_x2, self.box_y2)


class FaceRow(DetectedFace, Base):
    __tablename__ = "faces"
    __table_args__ = (UniqueConstraint("person_id", "engine", "source_sha256", name="uq_faces_person_engine_image"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    person_id: Mapped[int] = mapped_column(ForeignKey("people.id", ondelete="CASCADE", name="fk_faces_person_id_people"), index=True, nullable=False)
    engine: Mapped[str] = mapped_column(String(64), index=True, nullable=False)
    engine_version: Mapped[str] = mapped_column(String(128), nullable=False)
    source_path: Mapped[str] = mapped_column(String(4096), nullable=False)
    source_sha256: Mapped[str] = mapped_column(String(64), nullable=False)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow, nullable=False)

    person: Mapped[Person] = relationship(back_populates="faces")


class GalleryState(Base):
    __tablename__ = "gallery_state"

    engine: Mapped[str] = mapped_column(String(64), primary_key=True)
    generation: Mapped[int] = mapped_column(Integer, default=0, nullable=False)
    threshold: Mapped[float | None] = mapped_column(Float, nullable=True)
    threshold_info: Mapped[dict] = mapped_column(JSON, default=dict, nullable=False)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow, onupdate=utcnow,
                                                 nullable=False)


class LibraryPhoto(Base):
    """A photo scanned by ``jointface cluster`` with one engine (version): never detected again."""

    __tablename__ = "library_photos"
    __table_args__ = (UniqueConstraint("engine", "engine_version", "sha256", name="uq_library_photos_engine_sha"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    engine: Mapped[str] = mapped_column(String(64), nullable=False)
    engine_version: Mapped[str] = mapped_column(String(128), nullable=False)
    path: Mapped[str] = mapped_column(String(4096), index=True, nullable=False)
    sha256: Mapped[str] = mapped_column(String(64), nullable=False)
    size_bytes: Mapped[int] = mapped_column(BigInteger, nullable=False)
    mtime_ns: Mapped[int] = mapped_column(BigInteger, nullable=False)
    width: Mapped[int] = mapped_column(Integer, nullable=False)
    height: Mapped[int] = mapped_column(Integer, nullable=False)
    face_count: Mapped[int] = mapped_column(Integer, nullable=False)
    scanned_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow, nullable=False)


class FaceCluster(Base):
    """A group of library faces: ``open`` (unnamed), ``named`` (``person_id`` set) or ``ignored``."""

    __tablename__ = "face_clusters"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    engine: Mapped[str] = mapped_column(String(64), index=True, nullable=False)
    engine_version: Mapped[str] = mapped_column(String(128), nullable=False)
    status: Mapped[str] = mapped_column(String(16), nullable=False)
    person_id: Mapped[int | None] = mapped_column(
        ForeignKey("people.id", ondelete="SET NULL", name="fk_face_clusters_person_id_people"), index=True,
        nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow, nullable=False)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow, onupdate=utcnow,
                                                 nullable=False)


class LibraryFace(DetectedFace, Base):
    """A face found by ``jointface cluster``: where it is, its embedding, its cluster (``None``: unclustered).

    ``person_id``: the enrolled person it matched (or was named as); ``face_id``: its gallery row once
    enrolled by ``clusters name``.
    """

    __tablename__ = "library_faces"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    photo_id: Mapped[int] = mapped_column(
        ForeignKey("library_photos.id", ondelete="CASCADE", name="fk_library_faces_photo_id_library_photos"),
        index=True, nullable=False)
    engine: Mapped[str] = mapped_column(String(64), index=True, nullable=False)
    engine_version: Mapped[str] = mapped_column(String(128), nullable=False)
    cluster_id: Mapped[int | None] = mapped_column(
        ForeignKey("face_clusters.id", ondelete="SET NULL", name="fk_library_faces_cluster_id_face_clusters"),
        index=True, nullable=True)
    person_id: Mapped[int | None] = mapped_column(
        ForeignKey("people.id", ondelete="SET NULL", name="fk_library_faces_person_id_people"), nullable=True)
    face_id: Mapped[int | None] = mapped_column(
        ForeignKey("faces.id", ondelete="SET NULL", name="fk_library_faces_face_id_faces"), nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow, nullable=False)

    photo: Mapped[LibraryPhoto] = relationship()


class GallerySetting(Base):
    """Gallery-wide settings (revision 0005): ``vector_backend`` (``{"name": ..., "uri": ...}``), ``gallery_id``."""

    __tablename__ = "gallery_settings"

    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[dict] = mapped_column(JSON, nullable=False)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow, onupdate=utcnow,
                                                 nullable=False)


class ApiKey(Base):
    """A key of the HTTP service (``jointface serve``): only the sha256 of the secret is stored."""

    __tablename__ = "api_keys"
    __table_args__ = (UniqueConstraint("name", name="uq_api_keys_name"),
                      UniqueConstraint("secret_sha256", name="uq_api_keys_secret_sha256"))

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(255), nullable=False)
    scope: Mapped[str] = mapped_column(String(16), nullable=False)  # read, write or admin
    prefix: Mapped[str] = mapped_column(String(16), nullable=False)  # first characters, to recognise a key
    secret_sha256: Mapped[str] = mapped_column(String(64), nullable=False)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow, nullable=False)
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    last_used_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)


class AuditEntry(Base):
    """One change to the gallery or to the keys: when, by which key (or the command line), what."""

    __tablename__ = "audit_log"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow, index=True, nullable=False)
    key_id: Mapped[int | None] = mapped_column(Integer, nullable=True)  # no foreign key: entries outlive keys
    actor: Mapped[str] = mapped_column(String(255), nullable=False)  # "key:NAME" or "cli"
    action: Mapped[str] = mapped_column(String(32), nullable=False)
    target: Mapped[str] = mapped_column(String(255), nullable=False)
    detail: Mapped[dict] = mapped_column(JSON, default=dict, nullable=False)
