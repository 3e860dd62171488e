"""Grouping the faces of a photo library by person: ``jointface cluster`` and ``jointface clusters``.

Three steps, each usable on its own:

1. :func:`scan` finds every face in the photos (batched, resumable): each
   photo is remembered per engine version by its sha256 (and, to skip
   hashing, its path, size and modification time), so a rerun never detects
   it again. Photos are committed in batches, so an interrupted scan keeps
   what it did.
2. :func:`recluster` groups the library's faces: faces that match an enrolled
   person at the gallery's threshold join that person's (named) cluster; the
   others are grouped by :func:`cluster_embeddings` (a density / graph
   method that needs no number of clusters). Named and ignored clusters keep
   their ids and faces; open clusters keep their ids when most of their faces
   stay together.
3. Looking and acting: :func:`list_clusters`, :func:`cluster_detail`,
   :func:`write_contact_sheet`, :func:`name_cluster`, :func:`merge_clusters`,
   :func:`split_cluster`, :func:`ignore_cluster`.

Clusters are ``open`` (unnamed), ``named`` (their faces are enrolled for a
person, so ``search`` finds them) or ``ignored`` (strangers in the
background; new faces that group with them join them).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np

from index import Gallery
from index.errors import ClusterError
from index.gallery import NewFace, validate_person_name
from index.library import IGNORED, NAMED, OPEN, Grouping, ScannedPhoto
from index.space import EmbeddingSpace

from .engines import Engine
from .imageio import ImageLoadError, load_image, load_image_reduced
from .service import detect_grouped, file_sha256, resolve_threshold

#: Grouping methods (``--method``). Chosen by measurement, ``jointface bench cluster`` on the full protocol
#: (benchmarks/results/cluster.json, README): Chinese whispers leads DBSCAN for both engines. HDBSCAN scores
#: higher for dlib on LFW but has no similarity floor: on a small library it puts a lone face into the nearest
#: cluster (knn_examples: alex_lacamoire's only photo joins Obama's at cosine 0.86), so it is not the default.
METHODS = ("chinese-whispers", "dbscan", "hdbscan")
DEFAULT_METHOD = "chinese-whispers"
#: Cosine similarity at which two faces are linked, per engine family: the peak of pairwise F1 in the
#: Chinese-whispers sweep of the full ``jointface bench cluster`` (benchmarks/results/cluster_f1.png). dlib: 0.95
#: (0.93, chosen on a 151-image subset, merges 239 faces of many people into one cluster on the full set).
#: jointface: 0.75 for the eleventh session's weights (7fb32bf7ffd0, the margin term at 3.0: 10.00% against 9.34% at
#: 0.74 and 9.26% at 0.76; 2.76% at the old 0.85); 0.85 for the tenth session's (f19816222ec5: 5.49% against 5.30%
#: at 0.86; 0.86 for f52113662273 with the int8 identity head, 0.85 with it in torch: the F1 curve is flat there;
#: 0.86 for the fourth session's weights, 0.96 for the first v2 weights, 0.60 for v1's). Weights given as
#: jointface@PATH use the shipped weights' value: measure them with the benchmark.
DEFAULT_THRESHOLDS = {"dlib": 0.95, "dlib-cnn": 0.95, "jointface": 0.65, "jointface-flip": 0.65}
#: HDBSCAN's ``min_samples`` (its threshold-free method has this one knob besides the cluster size).
HDBSCAN_MIN_SAMPLES = 1
HDBSCAN_BRUTE_UP_TO = 8000
#: ``split`` links faces this much more strictly than the default (a share of the way to 1).
SPLIT_STRICTER = 0.35
#: Neighbours per face in the similarity graph (Chinese whispers).
GRAPH_NEIGHBOURS = 64


def default_threshold(engine_name: str, engine_default: float | None = None) -> float:
    if engine_name in DEFAULT_THRESHOLDS:
        return DEFAULT_THRESHOLDS[engine_name]
    family = engine_name.split("@", 1)[0]
    if family.startswith("jointface"):
        return DEFAULT_THRESHOLDS["jointface"]
    return engine_default if engine_default is not None else 0.5


# -- grouping embeddings ------------------------------------------------------------------------


def neighbours(vectors: np.ndarray, k: int = GRAPH_NEIGHBOURS) -> tuple[np.ndarray, np.ndarray]:
    """Each vector's ``k`` most similar others (cosine, exact search): ``(similarities, ids)``, -1 for none."""
    import faiss

    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    n = len(vectors)
    if n == 0:
        return np.zeros((0, 0), np.float32), np.zeros((0, 0), np.int64)
    index = faiss.IndexFlatIP(vectors.shape[1])
    index.add(vectors)
    sims, ids = index.search(vectors, min(n, k + 1))
    own = ids == np.arange(n)[:, None]
    sims[own], ids[own] = -np.inf, -1
    return sims, ids


def chinese_whispers(sims: np.ndarray, ids: np.ndarray, threshold: float, *, iterations: int = 100,
                     seed: int = 0) -> np.ndarray:
    """Chinese whispers (Biemann 2006, the graph method of dlib's face clustering example).

    The graph links each face to those of its neighbours (``sims``/``ids``
    from :func:`neighbours`) at cosine similarity >= ``threshold``, edges
    weighted by similarity. Every face starts as its own group; in each round
    (faces in a seeded random order, so the result is deterministic) a face
    takes the group with the largest total edge weight among its neighbours,
    until no face changes. Returns a group label per face (0, 1, ...).
    """
    n = len(ids)
    adjacency: list[list[tuple[int, float]]] = [[] for _ in range(n)]
    rows, cols = np.nonzero((sims >= threshold) & (ids >= 0))
    for row, col in zip(rows.tolist(), cols.tolist()):
        other, weight = int(ids[row, col]), float(sims[row, col])
        adjacency[row].append((other, weight))
        adjacency[other].append((row, weight))  # symmetric: a k-NN link goes both ways
    for edges in adjacency:  # a pair seen from both sides is one edge
        edges[:] = list({other: weight for other, weight in edges}.items())
    labels = list(range(n))
    rng = np.random.default_rng(seed)
    linked = [node for node in range(n) if adjacency[node]]
    for _ in range(iterations):
        changed = 0
        for node in rng.permutation(linked).tolist():
            totals: dict[int, float] = {}
            for other, weight in adjacency[node]:
                totals[labels[other]] = totals.get(labels[other], 0.0) + weight
            best = max(totals.items(), key=lambda item: (item[1], -item[0]))[0]
            if best != labels[node]:
                labels[node] = best
                changed += 1
        if not changed:
            break
    _, relabelled = np.unique(np.array(labels), return_inverse=True)
    return relabelled.astype(np.int64)


def _unit_distance(threshold: float) -> float:
    """Euclidean distance between unit vectors at cosine similarity ``threshold``."""
    return float(np.sqrt(max(0.0, 2.0 - 2.0 * threshold)))


def cluster_embeddings(vectors: np.ndarray, *, method: str = DEFAULT_METHOD, threshold: float = 0.9,
                       min_faces: int = 2, min_samples: int = HDBSCAN_MIN_SAMPLES,
                       graph: tuple[np.ndarray, np.ndarray] | None = None) -> np.ndarray:
    """A group label per L2-normalised vector, -1 for faces left unclustered.

    * ``chinese-whispers``: :func:`chinese_whispers` at cosine ``threshold``;
    * ``dbscan``: scikit-learn's DBSCAN, ``eps`` the distance at ``threshold``,
      ``min_samples`` = ``min_faces``;
    * ``hdbscan``: scikit-learn's HDBSCAN (``min_cluster_size`` = ``min_faces``,
      ``min_samples``); needs no threshold.

    Groups with fewer than ``min_faces`` faces are left unclustered (-1).
    ``graph`` reuses :func:`neighbours` of the same vectors.
    """
    if method not in METHODS:
        raise ValueError(f"unknown clustering method {method!r}; choose one of {', '.join(METHODS)}")
    if min_faces < 1:
        raise ValueError("min_faces must be at least 1")
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    n = len(vectors)
    if n == 0:
        return np.zeros(0, np.int64)
    if method == "chinese-whispers":
        sims, ids = graph if graph is not None else neighbours(vectors)
        labels = chinese_whispers(sims, ids, threshold)
    elif method == "dbscan":
        from sklearn.cluster import DBSCAN

        labels = DBSCAN(eps=_unit_distance(threshold), min_samples=max(1, min_faces),
                        metric="euclidean").fit_predict(vectors)
    else:
        if n < 2:
            return np.full(n, -1, np.int64)
        from sklearn.cluster import HDBSCAN

        # brute force (all distances at once) is several times faster than trees at 128-512 dimensions; it
        # holds n x n float64 distances, so large libraries use the trees
        labels = HDBSCAN(min_cluster_size=max(2, min_faces), min_samples=max(1, min(min_samples, n - 1)),
                         metric="euclidean", algorithm="brute" if n <= HDBSCAN_BRUTE_UP_TO else "auto",
                         copy=True).fit_predict(vectors)
    labels = np.asarray(labels, dtype=np.int64)
    if min_faces > 1:
        groups, counts = np.unique(labels[labels >= 0], return_counts=True)
        labels[np.isin(labels, groups[counts < min_faces])] = -1
    return labels


# -- scanning photos -----------------------------------------------------------------------------


@dataclass
class ScanOutcome:
    path: Path
    status: str  # "scanned", "seen" (detected in an earlier run), "failed"
    faces: int = 0
    message: str = ""


@dataclass
class ScanReport:
    outcomes: list[ScanOutcome] = field(default_factory=list)

    def count(self, status: str) -> int:
        return sum(outcome.status == status for outcome in self.outcomes)

    @property
    def faces_found(self) -> int:
        return sum(outcome.faces for outcome in self.outcomes if outcome.status == "scanned")


Loader = Callable[[Path], np.ndarray]


def _stat(path: Path) -> tuple[int, int]:
    stat = path.stat()
    return int(stat.st_size), int(stat.st_mtime_ns)


def scan(gallery: Gallery, engine: Engine, paths: Iterable[Path], *, batch_size: int = 8,
         loader: Loader | None = None, on_progress: Callable[[ScanOutcome], None] | None = None) -> ScanReport:
    """Detect every face of every photo not scanned before with this engine version; store them unclustered.

    A photo counts as seen when a photo of the same content (sha256) was
    scanned with this engine version; a file whose path, size and
    modification time are those recorded is taken as seen without hashing.
    Photos are detected ``batch_size`` at a time and each batch is committed
    with its faces, so an interrupted scan loses at most one batch.
    ``loader`` (benchmarks) turns a path into pixels; by default photos larger
    than the engine needs are decoded smaller (boxes are in full-size pixels).
    """
    report = ScanReport()
    known_paths, known_shas = gallery.library.known_photos(engine.name, engine.version)
    queued: list[tuple[ScanOutcome, np.ndarray, float, tuple[int, int], str, tuple[int, int]]] = []
    moved: list[tuple[int, str, int, int]] = []

    def finish(outcome: ScanOutcome) -> None:
        report.outcomes.append(outcome)
        if on_progress:
            on_progress(outcome)

    def flush() -> None:
        if not queued and not moved:
            return
        found = detect_grouped(engine, [image for _, image, *_ in queued]) if queued else []
        photos = []
        for (outcome, image, scale, (width, height), sha, (size, mtime)), faces in zip(queued, found):
            photos.append(ScannedPhoto(str(outcome.path), sha, size, mtime, width, height,
                                       [([float(v) * scale for v in face.box], face.embedding, float(face.score))
                                        for face in faces]))
            outcome.faces = len(faces)
        # the same photo at a new path (or touched) is remembered there; new photos are stored with their faces
        gallery.library.record_scan(engine.name, engine.version, moved, photos)
        for outcome, *_ in queued:
            finish(outcome)
        queued.clear()
        moved.clear()

    max_side = engine.max_useful_side if loader is None else None
    for path in paths:
        path = Path(path)
        outcome = ScanOutcome(path=path, status="failed")
        try:
            resolved = path.resolve()
            size, mtime = _stat(resolved)
            recorded = known_paths.get(str(resolved))
            if recorded is not None and recorded[:2] == (size, mtime):
                outcome.status = "seen"
                finish(outcome)
                continue
            sha = file_sha256(resolved)
            if sha in known_shas:
                outcome.status = "seen"
                recorded_photo = known_shas[sha]
                if recorded_photo is not None and (recorded_photo[1] == str(resolved)
                                                   or not Path(recorded_photo[1]).exists()):
                    # moved (or touched): remember where it is now; a copy elsewhere leaves the record alone
                    moved.append((recorded_photo[0], str(resolved), size, mtime))
                    known_shas[sha] = (recorded_photo[0], str(resolved))
                finish(outcome)
                continue
            if loader is not None:
                image = loader(resolved)
                full = (image.shape[1], image.shape[0])
            elif max_side:
                image, full = load_image_reduced(resolved, max_side)
            else:
                image = load_image(resolved)
                full = (image.shape[1], image.shape[0])
        except ImageLoadError as exc:
            outcome.message = str(exc)
            finish(outcome)
            continue
        except FileNotFoundError:
            outcome.message = f"{path}: no such file"
            finish(outcome)
            continue
        except (OSError, ValueError) as exc:
            outcome.message = f"{path}: {getattr(exc, 'strerror', None) or exc}"
            finish(outcome)
            continue
        known_shas[sha] = None  # the same content later in this run is seen (it is detected once)
        outcome.status, outcome.path = "scanned", resolved
        queued.append((outcome, image, full[0] / image.shape[1], full, sha, (size, mtime)))
        if len(queued) >= max(1, batch_size):
            flush()
    flush()
    return report


# -- clustering the library ----------------------------------------------------------------------


@dataclass
class ClusterSummary:
    faces: int
    clusters: int  # open clusters
    named_clusters: int
    ignored_clusters: int
    unclustered: int
    matched: int  # faces labelled with an enrolled person by the gallery search this time
    method: str
    threshold: float | None
    min_faces: int


def _vectors(rows: Sequence[bytes], dim: int) -> np.ndarray:
    if not rows:
        return np.zeros((0, dim), np.float32)
    return np.frombuffer(b"".join(rows), dtype=np.float32).reshape(len(rows), dim)


def _gallery_matches(gallery: Gallery, space: EmbeddingSpace, vectors: np.ndarray) -> list[tuple[str, float] | None]:
    """Best enrolled person and similarity per vector; all ``None`` when the gallery has none of this engine."""
    if gallery.engine_versions(space.name) != {space.version} or len(vectors) == 0:
        return [None] * len(vectors)
    hits = gallery.search(space, vectors, top_k=1)
    return [(row[0].name, row[0].similarity) if row else None for row in hits]


def recluster(gallery: Gallery, engine_name: str, engine_version: str, *, method: str = DEFAULT_METHOD,
              threshold: float | None = None, min_faces: int = 2, match_threshold: float | None = None,
              min_samples: int = HDBSCAN_MIN_SAMPLES) -> ClusterSummary:
    """Group every library face of an engine version (see the module's docstring for the rules).

    ``match_threshold``: faces whose best enrolled person reaches it join
    that person's named cluster (``None``: no matching). ``threshold``: the
    grouping method's cosine similarity (default :func:`default_threshold`).
    """
    threshold = default_threshold(engine_name) if threshold is None and method != "hdbscan" else threshold
    rows, clusters = gallery.library.faces_and_clusters(engine_name, engine_version)
    # a named cluster whose person was removed is open again
    orphans = [cid for cid, (status, person_id) in clusters.items() if status == NAMED and person_id is None]
    clusters.update({cid: (OPEN, None) for cid in orphans})
    if not rows:
        return ClusterSummary(0, 0, 0, 0, 0, 0, method, threshold, min_faces)
    dim = rows[0].dim
    face_ids = np.array([row.id for row in rows], np.int64)
    vectors = _vectors([row.embedding for row in rows], dim)
    old_cluster = [row.cluster_id for row in rows]

    def frozen(cluster_id) -> bool:
        if cluster_id not in clusters:
            return False
        status, person_id = clusters[cluster_id]
        return status == IGNORED or (status == NAMED and person_id is not None)

    is_frozen = np.array([frozen(c) for c in old_cluster], bool)
    open_positions = np.flatnonzero(~is_frozen)
    matches = [None] * len(rows)
    if match_threshold is not None and len(open_positions):
        space = EmbeddingSpace(engine_name, engine_version, dim)
        for position, hit in zip(open_positions, _gallery_matches(gallery, space, vectors[open_positions])):
            if hit is not None and hit[1] >= match_threshold:
                matches[position] = hit
    matched = np.array([m is not None for m in matches], bool)
    # Group the open, unmatched faces together with the ignored ones (new faces of an ignored stranger join them).
    ignored = np.array([c in clusters and clusters[c][0] == IGNORED for c in old_cluster], bool)
    grouped = np.flatnonzero((~is_frozen & ~matched) | ignored)
    labels = cluster_embeddings(vectors[grouped], method=method, threshold=threshold if threshold else 0.0,
                                min_faces=1, min_samples=min_samples)

    # faces that matched a person join that person's named cluster; groups holding ignored faces join the
    # ignored cluster most of them are in; open groups keep the open cluster id most of their faces had
    # (largest groups choose first), or get a new one
    grouping = Grouping(faces=[int(face_ids[p]) for p in np.flatnonzero(~is_frozen)], reopened=orphans)
    for position in np.flatnonzero(matched):
        grouping.person[int(face_ids[position])] = matches[position][0]
    by_label: dict[int, list[int]] = {}
    for position, label in zip(grouped.tolist(), labels.tolist()):
        by_label.setdefault(label, []).append(position)
    open_groups: list[list[int]] = []
    for label, members in by_label.items():
        if label < 0:  # noise (HDBSCAN): unclustered
            continue
        ignored_ids = [old_cluster[p] for p in members if ignored[p]]
        newcomers = [p for p in members if not ignored[p]]
        if ignored_ids:
            target = max(sorted(set(ignored_ids)), key=ignored_ids.count)
            grouping.cluster.update((int(face_ids[p]), target) for p in newcomers)
        elif len(newcomers) >= min_faces:
            open_groups.append(newcomers)
    open_groups.sort(key=lambda members: (-len(members), members[0]))
    taken: set[int] = set()
    for members in open_groups:
        previous = [old_cluster[p] for p in members
                    if old_cluster[p] is not None and clusters.get(old_cluster[p], (None,))[0] == OPEN
                    and old_cluster[p] not in taken]
        if previous:
            target = max(sorted(set(previous)), key=previous.count)
            taken.add(target)
            grouping.cluster.update((int(face_ids[p]), target) for p in members)
        else:
            grouping.new_open.append([int(face_ids[p]) for p in members])
    gallery.library.write_grouping(engine_name, engine_version, clusters, grouping)
    return _summary(gallery, engine_name, engine_version, int(matched.sum()), method, threshold, min_faces)


def _summary(gallery: Gallery, engine_name: str, engine_version: str, matched: int, method: str,
             threshold: float | None, min_faces: int) -> ClusterSummary:
    faces, unclustered, counts = gallery.library.summary_counts(engine_name, engine_version)
    return ClusterSummary(faces, counts.get(OPEN, 0), counts.get(NAMED, 0), counts.get(IGNORED, 0),
                          int(unclustered), matched, method, threshold, min_faces)


# -- looking at clusters -------------------------------------------------------------------------


@dataclass
class LibraryFaceInfo:
    id: int
    path: str
    sha256: str
    box: tuple[float, float, float, float]
    score: float
    similarity_to_centre: float
    enrolled_face_id: int | None

    def to_json(self) -> dict:
        return {"face_id": self.id, "image": self.path, "box": [round(v, 1) for v in self.box],
                "score": round(self.score, 4), "similarity_to_centre": round(self.similarity_to_centre, 4),
                "enrolled_face_id": self.enrolled_face_id}


@dataclass
class ClusterInfo:
    id: int
    engine: str
    engine_version: str
    status: str
    person: str | None
    size: int
    representative: LibraryFaceInfo
    nearest: tuple[str, float] | None  # the nearest enrolled person (and similarity), for clusters not named
    faces: list[LibraryFaceInfo] = field(default_factory=list)

    def to_json(self, with_faces: bool = False) -> dict:
        data = {"id": self.id, "engine": self.engine, "status": self.status, "person": self.person,
                "size": self.size, "representative": self.representative.to_json(),
                "nearest_person": None if self.nearest is None else
                {"name": self.nearest[0], "similarity": round(self.nearest[1], 4)}}
        if with_faces:
            data["faces"] = [face.to_json() for face in self.faces]
        return data


def _load_clusters(gallery: Gallery, *, cluster_ids: Sequence[int] | None = None, engine_name: str | None = None,
                   with_faces: bool = False, include_ignored: bool = True) -> list[ClusterInfo]:
    clusters, faces = gallery.library.clusters_with_faces(cluster_ids=cluster_ids, engine_name=engine_name,
                                                          include_ignored=include_ignored)
    infos = []
    pending_nearest: list[tuple[ClusterInfo, np.ndarray, int]] = []
    for cluster, person in clusters:
        members = faces.get(cluster.id, [])
        if not members:
            continue
        vectors = _vectors([row.embedding for row in members], members[0].dim)
        centre = vectors.mean(axis=0)
        centre /= max(float(np.linalg.norm(centre)), 1e-12)
        sims = vectors @ centre
        details = [LibraryFaceInfo(row.id, row.path, row.sha256, (row.box_x1, row.box_y1, row.box_x2, row.box_y2),
                                   row.det_score, float(sim), row.face_id) for row, sim in zip(members, sims)]
        details.sort(key=lambda face: -face.similarity_to_centre)
        info = ClusterInfo(cluster.id, cluster.engine, cluster.engine_version, cluster.status,
                           person if cluster.status == NAMED else None, len(members), details[0], None,
                           details if with_faces else [])
        infos.append(info)
        if info.person is None:
            pending_nearest.append((info, centre, members[0].dim))
    for (engine_name_, version), group in _by_engine(pending_nearest).items():
        hits = _gallery_matches(gallery, EmbeddingSpace(engine_name_, version, group[0][2]),
                                np.stack([c for _, c, _ in group]))
        for (info, _, _), hit in zip(group, hits):
            info.nearest = hit
    infos.sort(key=lambda info: (-info.size, info.id))
    return infos


def _by_engine(items):
    groups: dict[tuple[str, str], list] = {}
    for item in items:
        groups.setdefault((item[0].engine, item[0].engine_version), []).append(item)
    return groups


def list_clusters(gallery: Gallery, engine_name: str | None = None, *, include_ignored: bool = False,
                  with_faces: bool = False) -> list[ClusterInfo]:
    """Every cluster (of one engine, when given), largest first."""
    return _load_clusters(gallery, engine_name=engine_name, include_ignored=include_ignored, with_faces=with_faces)


def cluster_detail(gallery: Gallery, cluster_id: int) -> ClusterInfo:
    """One cluster with its faces (nearest the cluster's centre first)."""
    found = _load_clusters(gallery, cluster_ids=[cluster_id], with_faces=True)
    if not found:
        raise ClusterError(f"no cluster with id {cluster_id} (see `jointface clusters list`)")
    return found[0]


@dataclass
class LibraryCounts:
    photos: int
    faces: int
    unclustered: int


def library_counts(gallery: Gallery, engine_name: str | None = None) -> LibraryCounts:
    return LibraryCounts(*gallery.library.counts(engine_name))


# -- contact sheets ------------------------------------------------------------------------------

THUMB_PX = 112
SHEET_COLUMNS = 8


def photo_problem(path: str, sha256: str) -> str | None:
    """Why a clustered photo cannot be read back as it was (``None`` when it can)."""
    file = Path(path)
    if not file.exists():
        return f"{path}: photo no longer on disk (deleted or moved since it was clustered)"
    try:
        if file_sha256(file) != sha256:
            return f"{path}: photo changed since it was clustered (different content)"
    except OSError as exc:
        return f"{path}: cannot read ({exc.strerror or exc})"
    return None


def face_thumbnail(image: np.ndarray, box: Sequence[float], size: int = THUMB_PX, margin: float = 0.25):
    """A square crop around ``box`` (with a margin), resized to ``size`` pixels (a PIL image)."""
    from PIL import Image

    x1, y1, x2, y2 = box
    side = max(x2 - x1, y2 - y1) * (1 + 2 * margin)
    cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
    crop = (int(round(cx - side / 2)), int(round(cy - side / 2)), int(round(cx + side / 2)),
            int(round(cy + side / 2)))
    return Image.fromarray(image).crop(crop).resize((size, size), Image.Resampling.BILINEAR)


def write_contact_sheet(info: ClusterInfo, out_path: Path, *, max_faces: int = 64,
                        thumb: int = THUMB_PX, columns: int = SHEET_COLUMNS) -> list[str]:
    """One PNG of the cluster's faces (nearest its centre first); returns the problems (missing photos).

    A face whose photo is gone or changed gets a grey tile marked ``missing``.
    """
    from PIL import Image, ImageDraw

    from .draw import _font

    faces = info.faces[:max_faces]
    columns = max(4, min(columns, len(faces)))
    rows = max(1, -(-len(faces) // columns))
    header = 28
    sheet = Image.new("RGB", (columns * thumb, header + rows * thumb), (245, 245, 245))
    draw = ImageDraw.Draw(sheet)
    title = f"cluster {info.id}: {info.person or info.status}, {info.size} faces"
    if info.size > len(faces):
        title += f" (first {len(faces)})"
    draw.text((6, 6), title, fill=(20, 20, 20), font=_font(14))
    problems: list[str] = []
    by_photo: dict[tuple[str, str], list[int]] = {}
    for slot, face in enumerate(faces):
        by_photo.setdefault((face.path, face.sha256), []).append(slot)
    for (path, sha), slots in by_photo.items():
        problem = photo_problem(path, sha)
        image = None
        if problem is None:
            try:
                image = load_image(path)
            except ImageLoadError as exc:
                problem = str(exc)
        if problem:
            problems.append(problem)
        for slot in slots:
            x, y = (slot % columns) * thumb, header + (slot // columns) * thumb
            if image is None:
                draw.rectangle([x + 1, y + 1, x + thumb - 2, y + thumb - 2], fill=(160, 160, 160))
                draw.text((x + 8, y + thumb // 2 - 8), "missing", fill=(255, 255, 255), font=_font(14))
            else:
                sheet.paste(face_thumbnail(image, faces[slot].box, thumb), (x, y))
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(out_path)
    return problems


# -- acting on clusters --------------------------------------------------------------------------


@dataclass
class NameReport:
    cluster_id: int
    person: str
    enrolled: int
    skipped: int
    missing_photos: list[str]


def name_cluster(gallery: Gallery, cluster_id: int, name: str, engine: Engine) -> NameReport:
    """Enrol the cluster's faces for person ``name`` (created if new); the cluster becomes named.

    Faces already enrolled (the same photo for this person and engine) are
    skipped. A face whose photo has since left the disk is still enrolled
    from its stored embedding (and listed in ``missing_photos``). When the
    person already has a cluster of this engine, this cluster's faces join it.
    """
    name = validate_person_name(name)
    rows = gallery.library.faces_to_name(cluster_id, name, engine.name, engine.version)
    if not rows:
        raise ClusterError(f"cluster {cluster_id} has no faces")
    missing = [path for path in dict.fromkeys(path for _, path, _ in rows) if not Path(path).exists()]
    new_faces = [NewFace(person=name, embedding=face.vector, box=face.box, score=face.det_score, source_path=path,
                         source_sha256=sha) for face, path, sha in rows]
    added = gallery.add_faces(engine.space, new_faces)
    named = gallery.library.mark_named(cluster_id, name, engine.name, engine.version,
                                       [(face.id, sha) for face, _, sha in rows])
    return NameReport(named, name, sum(i is not None for i in added),
                      sum(i is None for i in added), missing)


def merge_clusters(gallery: Gallery, into: int, source: int, engine: Engine | None = None) -> NameReport | None:
    """Move every face of cluster ``source`` into cluster ``into`` and delete ``source``.

    When one of them is named the result is named, and the faces joining
    it are enrolled (that needs ``engine``); two clusters named for different
    people are refused.
    """
    if into == source:
        raise ClusterError("cannot merge a cluster with itself")
    person = gallery.library.merge_person(into, source)
    if person is not None and engine is None:
        raise ClusterError("merging into a named cluster enrols faces: an engine is needed")
    gallery.library.merge(into, source, person)
    if person is not None:
        return name_cluster(gallery, into, person, engine)
    return None


def split_cluster(gallery: Gallery, cluster_id: int, *, threshold: float | None = None,
                  method: str = DEFAULT_METHOD, min_faces: int = 2) -> list[tuple[int, int]]:
    """Re-group one open cluster more strictly; returns ``[(cluster id, size), ...]`` of its parts.

    ``threshold`` defaults to :data:`SPLIT_STRICTER` of the way from the
    engine's default threshold to 1. The largest part keeps the id; parts
    smaller than ``min_faces`` are left unclustered.
    """
    engine_name, engine_version, rows = gallery.library.open_cluster_faces(cluster_id)
    if not rows:
        raise ClusterError(f"cluster {cluster_id} has no faces")
    if threshold is None:
        base = default_threshold(engine_name)
        threshold = base + SPLIT_STRICTER * (1.0 - base)
    labels = cluster_embeddings(_vectors([row.embedding for row in rows], rows[0].dim), method=method,
                                threshold=threshold, min_faces=min_faces)
    parts: dict[int, list[int]] = {}
    for row, label in zip(rows, labels.tolist()):
        parts.setdefault(label, []).append(row.id)
    grouped = sorted((members for label, members in parts.items() if label >= 0), key=lambda m: (-len(m), m[0]))
    if not grouped:
        raise ClusterError(f"cluster {cluster_id} does not split at similarity {threshold:.3f}: no group of "
                           f"{min_faces} faces would be left; nothing was changed (try a lower --threshold)")
    return gallery.library.write_split(cluster_id, engine_name, engine_version, grouped, parts.get(-1, []))


def ignore_cluster(gallery: Gallery, cluster_id: int, *, undo: bool = False) -> None:
    """Mark a cluster as strangers (``undo``: make it open again). Named clusters are refused."""
    gallery.library.set_ignored(cluster_id, undo=undo)


def matching_threshold(gallery: Gallery, engine: Engine):
    """The threshold at which a library face is labelled with an enrolled person: ``search``'s own."""
    return resolve_threshold(gallery, engine, None)

