"""The photo library of ``jointface cluster`` in the identity store: scanned photos, their faces, the clusters.

:mod:`jointface.clustering` decides (which photos to detect, how faces group, which group keeps which id);
this module reads and writes the three tables for it (``library_photos``, ``library_faces``,
``face_clusters``), one transaction a method. Methods that change clusters hold the gallery's lock, as the
gallery's own writes do. The rules a change needs at the moment it is written (the cluster exists, is in the
right state, was made with the engine at hand) are checked in its transaction and raise :class:`ClusterError`.

Use it as ``gallery.library``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, ContextManager, Sequence

import numpy as np
from sqlalchemy import delete, func, select, update

from .errors import ClusterError
from .models import FaceCluster, FaceRow, LibraryFace, LibraryPhoto, Person

OPEN, NAMED, IGNORED = "open", "named", "ignored"


@dataclass
class ScannedPhoto:
    """A photo detected by a scan, to store with its faces: ``faces`` as ``(box, embedding, score)``."""

    path: str
    sha256: str
    size_bytes: int
    mtime_ns: int
    width: int
    height: int
    faces: list[tuple[Sequence[float], np.ndarray, float]] = field(default_factory=list)


@dataclass
class Grouping:
    """What a reclustering decided, written by :meth:`PhotoLibrary.write_grouping` in one transaction.

    ``faces``: every library face id it writes, in order; a face in none of the maps ends unclustered.
    ``person``: face id -> the enrolled person it matched (it joins that person's named cluster, made when
    the person has none; a person removed meanwhile leaves the face unclustered). ``cluster``: face id -> the
    existing cluster it joins. ``new_open``: the face ids of each new open cluster, made in this order.
    ``reopened``: named clusters whose person was removed, open again.
    """

    faces: list[int]
    person: dict[int, str] = field(default_factory=dict)
    cluster: dict[int, int] = field(default_factory=dict)
    new_open: list[list[int]] = field(default_factory=list)
    reopened: list[int] = field(default_factory=list)


def _cluster(session, cluster_id: int) -> FaceCluster:
    cluster = session.get(FaceCluster, cluster_id)
    if cluster is None:
        raise ClusterError(f"no cluster with id {cluster_id} (see `jointface clusters list`)")
    return cluster


def _check_engine(cluster: FaceCluster, engine_name: str, engine_version: str) -> None:
    if engine_name != cluster.engine or engine_version != cluster.engine_version:
        raise ClusterError(f"cluster {cluster.id} was made with engine {cluster.engine} {cluster.engine_version}; "
                           f"the engine loaded is {engine_name} {engine_version} (run `jointface cluster` again "
                           "with the current engine)")


class PhotoLibrary:
    """The library tables of one gallery (``gallery.library``)."""

    def __init__(self, store, locked: Callable[[], ContextManager]):
        """``store``: the gallery's identity store; ``locked``: the gallery's write lock (``Gallery.locked``)."""
        self._store = store
        self._locked = locked

    # -- scanning ------------------------------------------------------------------------------

    def known_photos(self, engine_name: str, engine_version: str) -> tuple[dict, dict]:
        """The photos scanned with this engine version: ``{path: (size, mtime_ns, sha256)}`` and
        ``{sha256: (photo id, path)}``."""
        with self._store.session() as session:
            known_paths = {path: (size, mtime, sha) for path, size, mtime, sha in session.execute(
                select(LibraryPhoto.path, LibraryPhoto.size_bytes, LibraryPhoto.mtime_ns, LibraryPhoto.sha256)
                .where(LibraryPhoto.engine == engine_name, LibraryPhoto.engine_version == engine_version))}
            known_shas = {sha: (photo_id, path) for sha, photo_id, path in session.execute(
                select(LibraryPhoto.sha256, LibraryPhoto.id, LibraryPhoto.path)
                .where(LibraryPhoto.engine == engine_name, LibraryPhoto.engine_version == engine_version))}
        return known_paths, known_shas

    def record_scan(self, engine_name: str, engine_version: str, moved: Sequence[tuple[int, str, int, int]],
                    photos: Sequence[ScannedPhoto]) -> None:
        """One batch of a scan in one transaction: photos seen at a new path (``(photo id, path, size,
        mtime_ns)``) remembered there, new photos stored with their faces (unclustered)."""
        with self._store.session() as session:
            for photo_id, path, size, mtime in moved:
                session.execute(update(LibraryPhoto).where(LibraryPhoto.id == photo_id)
                                .values(path=path, size_bytes=size, mtime_ns=mtime))
            for scanned in photos:
                photo = LibraryPhoto(engine=engine_name, engine_version=engine_version, path=scanned.path,
                                     sha256=scanned.sha256, size_bytes=scanned.size_bytes,
                                     mtime_ns=scanned.mtime_ns, width=scanned.width, height=scanned.height,
                                     face_count=len(scanned.faces))
                session.add(photo)
                session.flush()
                session.add_all(_face_row(photo.id, engine_name, engine_version, box, embedding, score)
                                for box, embedding, score in scanned.faces)

    # -- grouping ------------------------------------------------------------------------------

    def faces_and_clusters(self, engine_name: str, engine_version: str) -> tuple[list, dict[int, tuple]]:
        """The engine version's library faces (rows: ``id, embedding, dim, cluster_id``, by id) and its
        clusters (``{id: (status, person id)}``)."""
        with self._store.session() as session:
            rows = session.execute(select(LibraryFace.id, LibraryFace.embedding, LibraryFace.dim,
                                          LibraryFace.cluster_id)
                                   .where(LibraryFace.engine == engine_name,
                                          LibraryFace.engine_version == engine_version)
                                   .order_by(LibraryFace.id)).all()
            clusters = {c.id: (c.status, c.person_id) for c in session.scalars(
                select(FaceCluster).where(FaceCluster.engine == engine_name,
                                          FaceCluster.engine_version == engine_version))}
        return rows, clusters

    def write_grouping(self, engine_name: str, engine_version: str, clusters: dict[int, tuple],
                       grouping: Grouping) -> None:
        """Write a reclustering (see :class:`Grouping`) under the gallery's lock; ``clusters`` as read by
        :meth:`faces_and_clusters` (reopened ones open). Clusters left empty, named ones aside, are deleted."""
        clusters = dict(clusters)
        with self._locked(), self._store.session() as session:
            people = {name: pid for name, pid in session.execute(select(Person.name, Person.id))}
            named_of_person: dict[int, int] = {}
            for cluster_id, (status, person_id) in sorted(clusters.items()):
                if status == NAMED and person_id is not None:
                    named_of_person.setdefault(person_id, cluster_id)

            def cluster_row(status: str, person_id: int | None = None) -> int:
                row = FaceCluster(engine=engine_name, engine_version=engine_version, status=status,
                                  person_id=person_id)
                session.add(row)
                session.flush()
                clusters[row.id] = (status, person_id)
                return row.id

            cluster_of: dict[int, int | None] = dict(grouping.cluster)
            person_of: dict[int, int | None] = {}
            for face_id in grouping.faces:
                if face_id not in grouping.person:
                    continue
                person_id = people.get(grouping.person[face_id])
                if person_id is None:  # removed meanwhile
                    continue
                if person_id not in named_of_person:
                    named_of_person[person_id] = cluster_row(NAMED, person_id)
                cluster_of[face_id], person_of[face_id] = named_of_person[person_id], person_id
            for members in grouping.new_open:
                target = cluster_row(OPEN)
                for face_id in members:
                    cluster_of[face_id] = target
            for face_id in grouping.faces:
                session.execute(update(LibraryFace).where(LibraryFace.id == face_id)
                                .values(cluster_id=cluster_of.get(face_id), person_id=person_of.get(face_id)))
            if grouping.reopened:
                session.execute(update(FaceCluster).where(FaceCluster.id.in_(grouping.reopened)).values(status=OPEN))
            used = set(session.scalars(select(LibraryFace.cluster_id).where(LibraryFace.cluster_id.is_not(None))
                                       .distinct()))
            empty = [cid for cid, (status, _) in clusters.items() if cid not in used and status != NAMED]
            if empty:
                session.execute(delete(FaceCluster).where(FaceCluster.id.in_(empty)))

    def summary_counts(self, engine_name: str, engine_version: str) -> tuple[int, int, dict[str, int]]:
        """``(faces, unclustered faces, {cluster status: clusters})`` of an engine version."""
        with self._store.session() as session:
            condition = (LibraryFace.engine == engine_name) & (LibraryFace.engine_version == engine_version)
            faces = session.scalar(select(func.count()).select_from(LibraryFace).where(condition))
            unclustered = session.scalar(select(func.count()).select_from(LibraryFace)
                                         .where(condition, LibraryFace.cluster_id.is_(None)))
            counts = dict(session.execute(select(FaceCluster.status, func.count()).where(
                FaceCluster.engine == engine_name, FaceCluster.engine_version == engine_version)
                .group_by(FaceCluster.status)).all())
        return int(faces), int(unclustered), counts

    # -- looking -------------------------------------------------------------------------------

    def clusters_with_faces(self, *, cluster_ids: Sequence[int] | None = None, engine_name: str | None = None,
                            include_ignored: bool = True) -> tuple[list, dict[int, list]]:
        """Clusters (``(FaceCluster, person name)``) and their faces (``{cluster id: rows}``, by face id; rows:
        ``id, cluster_id, embedding, dim, box_x1..box_y2, det_score, face_id, path, sha256``)."""
        with self._store.session() as session:
            query = select(FaceCluster, Person.name).outerjoin(Person, FaceCluster.person_id == Person.id)
            if cluster_ids is not None:
                query = query.where(FaceCluster.id.in_(list(cluster_ids)))
            if engine_name is not None:
                query = query.where(FaceCluster.engine == engine_name)
            if not include_ignored:
                query = query.where(FaceCluster.status != IGNORED)
            clusters = session.execute(query).all()
            faces: dict[int, list] = {}
            ids = [cluster.id for cluster, _ in clusters]
            for start in range(0, len(ids), 500):
                for row in session.execute(
                        select(LibraryFace.id, LibraryFace.cluster_id, LibraryFace.embedding, LibraryFace.dim,
                               LibraryFace.box_x1, LibraryFace.box_y1, LibraryFace.box_x2, LibraryFace.box_y2,
                               LibraryFace.det_score, LibraryFace.face_id, LibraryPhoto.path, LibraryPhoto.sha256)
                        .join(LibraryPhoto, LibraryFace.photo_id == LibraryPhoto.id)
                        .where(LibraryFace.cluster_id.in_(ids[start:start + 500])).order_by(LibraryFace.id)):
                    faces.setdefault(row.cluster_id, []).append(row)
        return clusters, faces

    def counts(self, engine_name: str | None = None) -> tuple[int, int, int]:
        """``(photos, faces, unclustered faces)`` of the library (of one engine, when given)."""
        with self._store.session() as session:
            photos = select(func.count()).select_from(LibraryPhoto)
            faces = select(func.count()).select_from(LibraryFace)
            if engine_name is not None:
                photos = photos.where(LibraryPhoto.engine == engine_name)
                faces = faces.where(LibraryFace.engine == engine_name)
            return (int(session.scalar(photos)), int(session.scalar(faces)),
                    int(session.scalar(faces.where(LibraryFace.cluster_id.is_(None)))))

    def faces_with_photos(self, engine_name: str) -> list:
        """Every library face of an engine with its photo (rows: ``embedding, dim, cluster_id, box_x1..box_y2,
        sha256, width, height``), by face id."""
        with self._store.session() as session:
            return session.execute(select(LibraryFace.embedding, LibraryFace.dim, LibraryFace.cluster_id,
                                          LibraryFace.box_x1, LibraryFace.box_y1, LibraryFace.box_x2,
                                          LibraryFace.box_y2, LibraryPhoto.sha256, LibraryPhoto.width,
                                          LibraryPhoto.height)
                                   .join(LibraryPhoto, LibraryFace.photo_id == LibraryPhoto.id)
                                   .where(LibraryFace.engine == engine_name).order_by(LibraryFace.id)).all()

    def cluster_engine(self, cluster_id: int) -> str:
        """The name of the engine a cluster was made with."""
        with self._store.session() as session:
            return _cluster(session, cluster_id).engine

    def named_count(self, cluster_ids: Sequence[int]) -> int:
        """How many of these clusters are named."""
        with self._store.session() as session:
            return session.query(FaceCluster).filter(FaceCluster.id.in_(list(cluster_ids)),
                                                     FaceCluster.status == NAMED).count()

    # -- acting --------------------------------------------------------------------------------

    def faces_to_name(self, cluster_id: int, name: str, engine_name: str, engine_version: str) -> list:
        """The faces of a cluster about to be named ``name`` (``(LibraryFace, path, sha256)``, by id, detached);
        refused when the cluster is of another engine or named for someone else."""
        with self._store.session() as session:
            cluster = _cluster(session, cluster_id)
            _check_engine(cluster, engine_name, engine_version)
            if cluster.status == NAMED and cluster.person_id is not None:
                current = session.get(Person, cluster.person_id)
                if current is not None and current.name != name:
                    raise ClusterError(f"cluster {cluster_id} is named {current.name} already (use `jointface "
                                       f"people rename` to rename the person)")
            rows = session.execute(select(LibraryFace, LibraryPhoto.path, LibraryPhoto.sha256)
                                   .join(LibraryPhoto, LibraryFace.photo_id == LibraryPhoto.id)
                                   .where(LibraryFace.cluster_id == cluster_id).order_by(LibraryFace.id)).all()
            session.expunge_all()
        return rows

    def mark_named(self, cluster_id: int, name: str, engine_name: str, engine_version: str,
                   faces: Sequence[tuple[int, str]]) -> int:
        """After the faces (``(library face id, photo sha256)``) were enrolled for ``name``: link each to its
        gallery face and the person, and name the cluster, or move its faces to the person's named cluster of
        this engine version when there is one (this cluster is then deleted). Returns the named cluster's id."""
        with self._locked(), self._store.session() as session:
            cluster = _cluster(session, cluster_id)
            person = session.scalar(select(Person).where(Person.name == name))
            if person is None:
                raise ClusterError(f"{name} was removed while the cluster was being named; nothing was changed")
            enrolled_ids = dict(session.execute(select(FaceRow.source_sha256, FaceRow.id).where(
                FaceRow.person_id == person.id, FaceRow.engine == engine_name)).all())
            target = session.scalar(select(FaceCluster.id).where(
                FaceCluster.person_id == person.id, FaceCluster.status == NAMED, FaceCluster.engine == engine_name,
                FaceCluster.engine_version == engine_version, FaceCluster.id != cluster_id).order_by(FaceCluster.id))
            for face_id, sha in faces:
                session.execute(update(LibraryFace).where(LibraryFace.id == face_id).values(
                    person_id=person.id, face_id=enrolled_ids.get(sha), cluster_id=target or cluster_id))
            if target is not None:
                session.delete(cluster)
            else:
                cluster.status, cluster.person_id = NAMED, person.id
        return target or cluster_id

    def merge_person(self, into: int, source: int) -> str | None:
        """The person two clusters about to be merged are named for (``None``: neither is named); refused
        for clusters of different engines or named for two people."""
        with self._store.session() as session:
            target, other = _cluster(session, into), _cluster(session, source)
            if (target.engine, target.engine_version) != (other.engine, other.engine_version):
                raise ClusterError(f"clusters {into} and {source} were made with different engines")
            people = {c.person_id for c in (target, other) if c.status == NAMED and c.person_id is not None}
            if len(people) > 1:
                names = [session.get(Person, pid).name for pid in sorted(people)]
                raise ClusterError(f"clusters {into} and {source} are named {names[0]} and {names[1]}: use "
                                   f"`jointface people merge` to join the two people")
            return session.get(Person, people.pop()).name if people else None

    def merge(self, into: int, source: int, person: str | None) -> None:
        """Move cluster ``source``'s faces into ``into`` and delete ``source``; an unnamed result is open,
        unless it joins an ignored cluster."""
        with self._locked(), self._store.session() as session:
            target, other = _cluster(session, into), _cluster(session, source)
            session.execute(update(LibraryFace).where(LibraryFace.cluster_id == source).values(cluster_id=into))
            session.delete(other)
            if target.status == IGNORED and person is None:
                pass  # faces joining an ignored cluster are ignored with it
            elif person is None:
                target.status = OPEN

    def open_cluster_faces(self, cluster_id: int) -> tuple[str, str, list]:
        """``(engine name, engine version, faces)`` of an open cluster (rows: ``id, embedding, dim``, by id);
        other clusters are refused."""
        with self._store.session() as session:
            cluster = _cluster(session, cluster_id)
            if cluster.status != OPEN:
                raise ClusterError(f"cluster {cluster_id} is {cluster.status}: only open (unnamed) clusters can be "
                                   "split")
            rows = session.execute(select(LibraryFace.id, LibraryFace.embedding, LibraryFace.dim)
                                   .where(LibraryFace.cluster_id == cluster_id).order_by(LibraryFace.id)).all()
            return cluster.engine, cluster.engine_version, rows

    def write_split(self, cluster_id: int, engine_name: str, engine_version: str, parts: Sequence[Sequence[int]],
                    loose: Sequence[int]) -> list[tuple[int, int]]:
        """The first part keeps ``cluster_id``, each other part becomes a new open cluster, ``loose`` faces
        are unclustered; returns ``[(cluster id, size), ...]``."""
        result: list[tuple[int, int]] = []
        with self._locked(), self._store.session() as session:
            for position, members in enumerate(parts):
                if position == 0:
                    target = cluster_id
                else:
                    row = FaceCluster(engine=engine_name, engine_version=engine_version, status=OPEN)
                    session.add(row)
                    session.flush()
                    target = row.id
                session.execute(update(LibraryFace).where(LibraryFace.id.in_(members)).values(cluster_id=target))
                result.append((target, len(members)))
            if loose:
                session.execute(update(LibraryFace).where(LibraryFace.id.in_(loose)).values(cluster_id=None))
        return result

    def set_ignored(self, cluster_id: int, *, undo: bool = False) -> None:
        """Mark a cluster ignored (``undo``: open again); named clusters are refused."""
        with self._locked(), self._store.session() as session:
            cluster = _cluster(session, cluster_id)
            if cluster.status == NAMED and cluster.person_id is not None:
                raise ClusterError(f"cluster {cluster_id} is named (its faces are enrolled): remove the person with "
                                   "`jointface people remove` first")
            if undo and cluster.status != IGNORED:
                raise ClusterError(f"cluster {cluster_id} is not ignored")
            cluster.status = OPEN if undo else IGNORED


def _face_row(photo_id: int, engine_name: str, engine_version: str, box: Sequence[float], embedding: np.ndarray,
              score: float) -> LibraryFace:
    vector = np.ascontiguousarray(embedding, dtype=np.float32).reshape(-1)
    return LibraryFace(photo_id=photo_id, engine=engine_name, engine_version=engine_version, dim=int(vector.size),
                       embedding=vector.tobytes(), box_x1=box[0], box_y1=box[1], box_x2=box[2], box_y2=box[3],
                       det_score=float(score))
