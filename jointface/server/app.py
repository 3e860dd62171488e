"""The HTTP API and the web page of ``jointface serve`` (one FastAPI app).

Every route but ``/v1/health`` (and the page's static files, which hold no
data) needs ``Authorization: Bearer KEY`` with a scope that allows it (see
:mod:`.keys`). The answers use the command line's JSON shapes; every error is
``{"error": {"code", "message", "detail"?}}`` with its HTTP status, and is
raised before anything is written, so a refused request changes nothing.

One engine serves every request (:class:`.batching.DetectionBatcher`), the
gallery is one :class:`index.Gallery` guarded by a thread lock in this
process and by the gallery's file lock across processes; each request reads
the database's index generation, so changes made by the command line or by
another server are seen by the next request.
"""

# no `from __future__ import annotations`: FastAPI reads the routes' annotations, some defined in create_app

import contextlib
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated

import anyio
from fastapi import Depends, FastAPI, File, Form, Path as PathParam, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from filelock import FileLock, Timeout as LockTimeout
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from index import Gallery
from index.errors import GalleryError, PersonExistsError, PersonNotFoundError, StoreError
from index.gallery import NewFace, validate_person_name
from jointface import __version__
from jointface.engines import Engine
from jointface.service import CHOICES, calibrate, choose_face, identify, resolve_threshold

from . import keys as api_keys
from .batching import BatcherBusy, DetectionBatcher
from .uploads import ApiError, Photo, UploadLimits, decode_photos

STATIC = Path(__file__).with_name("static")


@dataclass(frozen=True)
class ServeConfig:
    """How a server runs (``jointface serve`` options)."""

    home: Path
    db_url: str | None = None
    index_kind: str = "auto"
    limits: UploadLimits = field(default_factory=UploadLimits)
    keep_thumbnails: bool = False
    cors_origins: tuple[str, ...] = ()  # none: the browser refuses every cross-origin call
    read_timeout_s: float = 30.0  # to receive a whole request body
    detect_timeout_s: float = 60.0  # for the detector to answer (queue included)
    lock_timeout_s: float = 10.0  # for the gallery's write lock, held by another process
    max_batch: int = 8
    max_wait_s: float = 0.005


class Service:
    """What the routes share: the gallery, the batched engine, the settings."""

    def __init__(self, config: ServeConfig, engine: Engine):
        self.config = config
        self.gallery = Gallery.open(config.home, config.db_url, index_kind=config.index_kind)
        # A busy gallery is an answer (503 gallery_busy) after a few seconds, not a request hanging for minutes.
        # The gallery's own lock keeps its timeout per thread; requests run on many threads, one gallery call
        # at a time (self.guard), so one lock object shared by every thread replaces it.
        self.gallery._lock = FileLock(str(Path(self.gallery.home) / "gallery.lock"), timeout=config.lock_timeout_s,
                                      thread_local=False)
        self.engine = DetectionBatcher(engine, max_batch=config.max_batch, max_wait_s=config.max_wait_s)
        self.guard = threading.RLock()  # one gallery call at a time in this process (the index is shared)
        self.thumbnails = Path(config.home) / "thumbnails"
        self._sweep_thumbnails()

    def close(self) -> None:
        self.engine.close()
        self.gallery.close()

    # -- thumbnails ----------------------------------------------------------------------------

    def thumbnail_path(self, face_id: int) -> Path:
        return self.thumbnails / f"{int(face_id)}.jpg"

    def save_thumbnail(self, face_id: int, photo: Photo, box) -> None:
        from PIL import Image

        x1, y1, x2, y2 = box
        margin = 0.25 * max(x2 - x1, y2 - y1)
        height, width = photo.image.shape[:2]
        left, top = max(0, int(x1 - margin)), max(0, int(y1 - margin))
        right, bottom = min(width, int(x2 + margin) + 1), min(height, int(y2 + margin) + 1)
        crop = Image.fromarray(photo.image[top:bottom, left:right])
        crop.thumbnail((128, 128))
        self.thumbnails.mkdir(parents=True, exist_ok=True)
        crop.save(self.thumbnail_path(face_id), quality=85)

    def drop_thumbnails(self, face_ids) -> None:
        for face_id in face_ids:
            with contextlib.suppress(FileNotFoundError):
                self.thumbnail_path(face_id).unlink()

    def _sweep_thumbnails(self) -> None:
        """Thumbnails of faces removed while no server ran (by the command line): deleted at start."""
        if not self.thumbnails.is_dir():
            return
        alive = self.gallery.face_ids()
        for path in self.thumbnails.glob("*.jpg"):
            if not path.stem.isdigit() or int(path.stem) not in alive:
                path.unlink()


# -- request and answer bodies -------------------------------------------------------------------


class RenameRequest(BaseModel):
    new_name: str = Field(min_length=1, max_length=255)


class MergeRequest(BaseModel):
    into: str = Field(min_length=1, max_length=255)


ERROR_CODES = {
    400: "bad_request", 401: "unauthorized", 403: "forbidden", 404: "not_found", 405: "method_not_allowed",
    408: "request_timeout", 409: "conflict", 413: "too_large", 415: "not_an_image", 422: "invalid_request",
    503: "busy",
}


def error_response(status: int, code: str, message: str, headers: dict | None = None, **detail) -> JSONResponse:
    return JSONResponse(ApiError(status, code, message, **detail).to_json(), status_code=status, headers=headers)


# -- the request body guard (size and time) ---------------------------------------------------------

BODY_PROBLEM = "jointface.body_problem"


class _BodyProblem(Exception):
    pass


class BodyGuard:
    """Refuses bodies over ``max_bytes`` (declared or received) and bodies not received within ``timeout_s``.

    A problem found while the routes read the body is marked in the request
    scope, and the error handler answers 413 or 408 instead of FastAPI's
    generic 400.
    """

    def __init__(self, app, max_bytes: int, timeout_s: float):
        self.app = app
        self.max_bytes = max_bytes
        self.timeout_s = timeout_s

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None:
            try:
                too_big = int(declared) > self.max_bytes
            except ValueError:
                too_big = False
            if too_big:
                await error_response(413, "request_too_large", f"request body over {self.max_bytes:,} bytes",
                                     limit=self.max_bytes)(scope, receive, send)
                return
        received = 0
        deadline = time.monotonic() + self.timeout_s

        async def guarded_receive():
            nonlocal received
            remaining = deadline - time.monotonic()
            try:
                with anyio.fail_after(max(remaining, 0.0)):
                    message = await receive()
            except TimeoutError:
                scope[BODY_PROBLEM] = (408, "request_timeout",
                                       f"the request body was not received within {self.timeout_s:.0f} s")
                raise _BodyProblem() from None
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    scope[BODY_PROBLEM] = (413, "request_too_large", f"request body over {self.max_bytes:,} bytes")
                    raise _BodyProblem()
            return message

        await self.app(scope, guarded_receive, send)


class SecurityHeaders:
    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message):
            if message["type"] == "http.response.start":
                headers = list(message.get("headers") or [])
                headers += [(b"x-content-type-options", b"nosniff"), (b"x-frame-options", b"DENY"),
                            (b"referrer-policy", b"no-referrer"),
                            (b"content-security-policy", b"default-src 'self'; img-src 'self' blob: data:; "
                                                         b"object-src 'none'; frame-ancestors 'none'; "
                                                         b"base-uri 'none'; form-action 'self'")]
                if scope["path"].startswith("/v1/"):
                    headers.append((b"cache-control", b"no-store"))
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_with_headers)


# -- the app ---------------------------------------------------------------------------------------


def create_app(config: ServeConfig, engine: Engine) -> FastAPI:
    service = Service(config, engine)

    @contextlib.asynccontextmanager
    async def lifespan(_app):
        yield
        service.close()

    app = FastAPI(title="JointFace", version=__version__, lifespan=lifespan,
                  description="Face enrolment and search. Every route but /v1/health needs "
                              "`Authorization: Bearer KEY` (`jointface keys create`).")
    app.state.service = service
    bearer = HTTPBearer(auto_error=False, description="An API key from `jointface keys create NAME --scope ...`")

    def require(scope: str):
        def check(credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]) -> api_keys.KeyInfo:
            if credentials is None:
                raise ApiError(401, "unauthorized", "an API key is needed: Authorization: Bearer KEY")
            key = api_keys.verify(service.gallery.store, credentials.credentials)
            if key is None:
                raise ApiError(401, "unauthorized", "unknown or revoked API key")
            if not api_keys.scope_allows(key.scope, scope):
                raise ApiError(403, "forbidden", f"this key has scope {key.scope!r}; this needs {scope!r}",
                               needed=scope, scope=key.scope)
            return key

        return check

    Reader = Annotated[api_keys.KeyInfo, Depends(require("read"))]
    Writer = Annotated[api_keys.KeyInfo, Depends(require("write"))]
    Admin = Annotated[api_keys.KeyInfo, Depends(require("admin"))]
    Photos = Annotated[list[UploadFile], File(description="One or more photos (JPEG, PNG, ...)")]
    Name = Annotated[str, PathParam(min_length=1, max_length=255, description="A person's name")]

    def actor(key: api_keys.KeyInfo) -> dict:
        return {"actor": f"key:{key.name}", "key_id": key.id}

    def detect(photos: list[Photo]):
        return service.engine.detect_many([photo.image for photo in photos], timeout=config.detect_timeout_s)

    def clean_name(name: str) -> str:
        try:
            return validate_person_name(name)
        except GalleryError as exc:
            raise ApiError(422, "invalid_name", str(exc)) from exc

    # -- errors ----------------------------------------------------------------------------------

    @app.exception_handler(ApiError)
    async def on_api_error(_request, exc: ApiError):
        headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
        return JSONResponse(exc.to_json(), status_code=exc.status, headers=headers)

    @app.exception_handler(PersonNotFoundError)
    async def on_unknown_person(_request, exc: PersonNotFoundError):
        return error_response(404, "unknown_person", f"no person named {exc.name!r} in the gallery", name=exc.name)

    @app.exception_handler(PersonExistsError)
    async def on_person_exists(_request, exc: PersonExistsError):
        return error_response(409, "person_exists", f"a person named {exc.name!r} already exists", name=exc.name)

    @app.exception_handler(GalleryError)
    async def on_gallery_error(_request, exc: GalleryError):
        if isinstance(exc.__cause__, LockTimeout):
            return error_response(503, "gallery_busy", "the gallery is being changed by another process; "
                                  "try again", headers={"Retry-After": "2"})
        if isinstance(exc, StoreError):
            return error_response(503, "gallery_busy", f"the database is not available: {exc}",
                                  headers={"Retry-After": "2"})
        return error_response(422, "invalid_request", str(exc))

    @app.exception_handler(BatcherBusy)
    async def on_busy(_request, exc: BatcherBusy):
        return error_response(503, "busy", f"the server is busy: {exc}", headers={"Retry-After": "2"})

    @app.exception_handler(RequestValidationError)
    async def on_invalid(request: Request, exc: RequestValidationError):
        problem = request.scope.get(BODY_PROBLEM)
        if problem:
            return error_response(*problem)
        errors = [{"where": ".".join(str(part) for part in error.get("loc", ())), "problem": str(error.get("msg"))}
                  for error in exc.errors()]
        message = "; ".join(f"{error['where']}: {error['problem']}" for error in errors) or "invalid request"
        return error_response(422, "invalid_request", message, errors=errors)

    @app.exception_handler(StarletteHTTPException)
    async def on_http(request: Request, exc: StarletteHTTPException):
        problem = request.scope.get(BODY_PROBLEM)
        if problem:
            return error_response(*problem)
        code = ERROR_CODES.get(exc.status_code, "error")
        return error_response(exc.status_code, code, str(exc.detail), headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def on_unexpected(request: Request, exc: Exception):
        problem = request.scope.get(BODY_PROBLEM)
        if problem:
            return error_response(*problem)
        return error_response(500, "internal_error", f"unexpected error: {exc.__class__.__name__}")

    # -- routes ----------------------------------------------------------------------------------

    @app.get("/v1/health", tags=["service"])
    def health() -> dict:
        """Is the service up? (no key needed; says nothing about the gallery's contents)"""
        return {"status": "ok", "version": __version__, "engine": service.engine.name}

    @app.post("/v1/search", tags=["search"])
    def search(key: Reader, photos: Photos,
               top_k: Annotated[int, Form(ge=1, le=100, description="Candidates per face")] = 3,
               threshold: Annotated[float | None, Form(ge=-1.0, le=1.0, description="Similarity below which a "
                                                                                  "face is unknown")] = None) -> dict:
        """Every face of every photo, with its best candidates (the shape of `jointface search --json`)."""
        decoded = decode_photos(photos, config.limits)
        found = detect(decoded)
        with service.guard:
            chosen = resolve_threshold(service.gallery, service.engine, threshold)
            identified = iter(identify(service.gallery, service.engine, [face for faces in found for face in faces],
                                       top_k=top_k, threshold=chosen.value))
        results = []
        for photo, faces in zip(decoded, found):
            faces_json = [next(identified).to_json() for _ in faces]
            results.append({"image": photo.filename, "faces": faces_json, "error": None})
        return {"engine": service.engine.name, "threshold": {"value": chosen.value, "source": chosen.source},
                "results": results}

    @app.post("/v1/people/{name:path}/faces", status_code=201, tags=["people"])
    def enrol(key: Writer, name: Name, photos: Photos,
              largest: Annotated[bool, Form(description="In photos with several faces, take the biggest")] = False
              ) -> dict:
        """Enrol photos of one person: one face each. Any refused photo refuses the request (nothing enrolled)."""
        person = clean_name(name)
        decoded = decode_photos(photos, config.limits)
        found = detect(decoded)
        chosen = []
        for photo, faces in zip(decoded, found):
            face, problem = choose_face(faces, "largest" if largest else CHOICES[0])
            if face is None:
                code = "no_face" if not faces else "several_faces"
                message = problem.replace("use --largest", "send largest=true")
                raise ApiError(422, code, f"{photo.filename}: {message}; nothing was enrolled",
                               image=photo.filename, faces=len(faces))
            chosen.append((photo, face))
        new_faces = [NewFace(person=person, embedding=face.embedding, box=face.box, score=face.score,
                             source_path=f"upload:{photo.filename}", source_sha256=photo.sha256)
                     for photo, face in chosen]
        with service.guard:
            face_ids = service.gallery.add_faces(service.engine.space,
                                                 new_faces)
            added = [face_id for face_id in face_ids if face_id is not None]
            if config.keep_thumbnails:
                for (photo, face), face_id in zip(chosen, face_ids):
                    if face_id is not None:
                        service.save_thumbnail(face_id, photo, face.box)
            api_keys.record(service.gallery.store, action="enrol", target=person, **actor(key),
                            detail={"faces": added, "engine": service.engine.name,
                                    "skipped": sum(face_id is None for face_id in face_ids)})
        outcomes = [{"image": photo.filename, "status": "skipped" if face_id is None else "enrolled",
                     "face_id": face_id, "box": [round(float(v), 1) for v in face.box],
                     "message": "already enrolled for this person" if face_id is None else None}
                    for (photo, face), face_id in zip(chosen, face_ids)]
        return {"person": person, "engine": service.engine.name, "faces": outcomes}

    @app.get("/v1/people", tags=["people"])
    def people(key: Reader) -> dict:
        """Everyone, with their face counts per engine (the lines of `jointface people list --json`)."""
        with service.guard:
            listing = service.gallery.people()
        return {"people": [{"name": person.name, "faces": person.faces_by_engine,
                            "created_at": person.created_at.isoformat(), "meta": person.meta} for person in listing]}

    @app.get("/v1/people/{name:path}", tags=["people"])
    def person(key: Reader, name: Name) -> dict:
        """One person's faces (`jointface people show --json`), with thumbnail links when thumbnails are kept."""
        with service.guard:
            found, faces = service.gallery.person(name)
        rows = []
        for face in faces:
            thumbnail = service.thumbnail_path(face.id)
            rows.append({"id": face.id, "engine": face.engine, "engine_version": face.engine_version,
                         "box": list(face.box), "score": face.det_score, "image": face.source_path,
                         "sha256": face.source_sha256, "created_at": face.created_at.isoformat(),
                         "thumbnail": f"/v1/faces/{face.id}/thumbnail" if thumbnail.is_file() else None})
        return {"name": found.name, "meta": found.meta, "faces": rows}

    @app.get("/v1/faces/{face_id}/thumbnail", tags=["people"], response_class=Response,
             responses={200: {"content": {"image/jpeg": {}}}})
    def thumbnail(key: Reader, face_id: Annotated[int, PathParam(ge=1, le=2**62)]):
        """The face's thumbnail (kept only with `jointface serve --keep-thumbnails`)."""
        path = service.thumbnail_path(face_id)
        if not path.is_file():
            raise ApiError(404, "no_thumbnail", f"no thumbnail for face {face_id}")
        return FileResponse(path, media_type="image/jpeg")

    @app.post("/v1/people/{name:path}/rename", tags=["people"])
    def rename(key: Admin, name: Name, body: RenameRequest) -> dict:
        new = clean_name(body.new_name)
        with service.guard:
            service.gallery.rename_person(name, new)
            api_keys.record(service.gallery.store, action="rename", target=name, detail={"new_name": new},
                            **actor(key))
        return {"name": new, "previous_name": name}

    @app.post("/v1/people/{name:path}/merge", tags=["people"])
    def merge(key: Admin, name: Name, body: MergeRequest) -> dict:
        """Move every face of NAME to INTO and remove NAME (duplicate photos are dropped)."""
        with service.guard:
            before = _face_ids(service, name)
            moved = service.gallery.merge_people(name, body.into)
            dropped = before - _face_ids(service, body.into)
            service.drop_thumbnails(dropped)
            api_keys.record(service.gallery.store, action="merge", target=name,
                            detail={"into": body.into, "moved": moved, "dropped": len(dropped)}, **actor(key))
        return {"name": body.into, "merged": name, "moved": moved}

    @app.delete("/v1/people/{name:path}", tags=["people"])
    def remove(key: Admin, name: Name) -> dict:
        """Remove a person, their faces, vectors and thumbnails."""
        with service.guard:
            face_ids = _face_ids(service, name)
            removed = service.gallery.remove_person(name)
            service.drop_thumbnails(face_ids)
            api_keys.record(service.gallery.store, action="remove", target=name, detail={"faces": removed},
                            **actor(key))
        return {"name": name, "faces_removed": removed}

    @app.post("/v1/calibrate", tags=["gallery"])
    def calibrate_threshold(key: Admin, photos: Photos,
                            fpir: Annotated[float, Form(gt=0.0, lt=1.0, description="Share of strangers "
                                                                                    "accepted")] = 0.01) -> dict:
        """Set the rejection threshold from photos of people who are NOT enrolled (`jointface calibrate`)."""
        decoded = decode_photos(photos, config.limits)
        found = detect(decoded)
        engine = _Precomputed(service.engine, [photo.image for photo in decoded], found)
        with service.guard:
            try:
                result = calibrate(service.gallery, engine, [Path(str(i)) for i in range(len(decoded))], fpir=fpir,
                                   loader=engine.image_for)
            except ValueError as exc:
                raise ApiError(422, "cannot_calibrate", str(exc)) from exc
            api_keys.record(service.gallery.store, action="calibrate", target=service.engine.name, **actor(key),
                            detail={"threshold": result.threshold, "fpir": fpir, "faces": result.faces})
        return {"engine": service.engine.name, "threshold": result.threshold, "target_fpir": result.target_fpir,
                "reached_fpir": result.reached_fpir, "faces": result.faces, "images": result.images}

    @app.get("/v1/audit", tags=["gallery"])
    def audit(key: Admin, limit: Annotated[int, Query(ge=1, le=1000)] = 100) -> dict:
        """The latest changes: when, which key, what."""
        return {"entries": api_keys.audit_entries(service.gallery.store, limit)}

    # -- the page ----------------------------------------------------------------------------------

    @app.get("/", include_in_schema=False)
    def page():
        return FileResponse(STATIC / "index.html", media_type="text/html")

    @app.get("/static/{file_name}", include_in_schema=False)
    def static(file_name: str):
        path = STATIC / file_name
        if file_name not in _STATIC_FILES:
            raise ApiError(404, "not_found", "no such file")
        return FileResponse(path, media_type=_STATIC_FILES[file_name])

    if config.cors_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=list(config.cors_origins), allow_credentials=False,
                           allow_methods=["GET", "POST", "DELETE"], allow_headers=["Authorization"])
    app.add_middleware(BodyGuard, max_bytes=config.limits.max_request_bytes, timeout_s=config.read_timeout_s)
    app.add_middleware(SecurityHeaders)
    return app


_STATIC_FILES = {"app.js": "text/javascript", "style.css": "text/css"}


def _face_ids(service: Service, name: str) -> set[int]:
    _, faces = service.gallery.person(name)
    return {face.id for face in faces}


class _Precomputed:
    """The batched engine, answering ``detect`` for photos already detected (so calibration holds no detector)."""

    def __init__(self, engine, images, found):
        self._engine = engine
        self._images = images
        self._found = {id(image): faces for image, faces in zip(images, found)}
        self.name, self.version, self.dim, self.space = engine.name, engine.version, engine.dim, engine.space

    def image_for(self, path: Path):
        return self._images[int(path.name)]

    def detect(self, image):
        return self._found[id(image)]
