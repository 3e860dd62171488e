"""`jointface serve`: every route in-process (FastAPI's test client), every error, every scope refusal."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from filelock import FileLock
from PIL import Image

from index import Gallery
from jointface.server import keys as api_keys
from jointface.server.app import ServeConfig, create_app
from jointface.server.uploads import UploadLimits


def make_server(home: Path, engine, **options):
    config = ServeConfig(home=home, **{"detect_timeout_s": 600, **options})
    app = create_app(config, engine)
    client = TestClient(app, raise_server_exceptions=False)
    with Gallery.open(home) as gallery:
        secrets = {scope: api_keys.create_key(gallery.store, f"test-{scope}", scope)[1]
                   for scope in api_keys.SCOPES}
    return app, client, secrets


@pytest.fixture
def server(knn_home_copy, dlib_engine):
    app, client, secrets = make_server(knn_home_copy, dlib_engine, keep_thumbnails=True)
    yield client, secrets, knn_home_copy
    app.state.service.close()


def auth(secret: str) -> dict:
    return {"Authorization": f"Bearer {secret}"}


def photo(path: Path, name: str | None = None):
    return ("photos", (name or path.name, path.read_bytes(), "image/jpeg"))


def error_code(response) -> str:
    return response.json()["error"]["code"]


def gallery_state(home: Path) -> dict:
    with Gallery.open(home) as gallery:
        return {person.name: person.faces_by_engine for person in gallery.people()}


def test_health_needs_no_key_and_every_other_route_does(server):
    client, secrets, _ = server
    assert client.get("/v1/health").json()["status"] == "ok"
    for method, url in [("get", "/v1/people"), ("get", "/v1/people/obama"), ("post", "/v1/search"),
                        ("post", "/v1/people/x/faces"), ("delete", "/v1/people/obama"),
                        ("post", "/v1/people/obama/rename"), ("post", "/v1/people/obama/merge"),
                        ("post", "/v1/calibrate"), ("get", "/v1/audit"), ("get", "/v1/faces/1/thumbnail")]:
        response = getattr(client, method)(url)
        assert response.status_code == 401, (method, url)
        assert error_code(response) == "unauthorized" and response.headers["www-authenticate"] == "Bearer"
        response = getattr(client, method)(url, headers=auth("jf_" + "x" * 43))
        assert response.status_code == 401, (method, url)
    assert client.get("/v1/people", headers={"Authorization": "Basic abc"}).status_code == 401
    assert "obama" in gallery_state(server[2])


def test_search_same_answer_as_the_cli_shape(server, knn_dir):
    client, secrets, _ = server
    response = client.post("/v1/search", headers=auth(secrets["read"]),
                           files=[photo(knn_dir / "test" / "obama_and_biden.jpg"), photo(knn_dir / "test" / "obama1.jpg")],
                           data={"top_k": "2"})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["engine"] == "dlib" and body["threshold"]["source"].startswith("engine default")
    first, second = body["results"]
    assert first["image"] == "obama_and_biden.jpg" and first["error"] is None
    assert {"obama", "biden"} <= {face["identity"] for face in first["faces"]}
    face = first["faces"][0]
    assert set(face) == {"box", "score", "identity", "similarity", "candidates"} and len(face["candidates"]) <= 2
    assert [f["identity"] for f in second["faces"]] == ["obama"]
    # a threshold of 1 names nobody
    strict = client.post("/v1/search", headers=auth(secrets["read"]), data={"threshold": "1"},
                         files=[photo(knn_dir / "test" / "obama1.jpg")]).json()
    assert strict["results"][0]["faces"][0]["identity"] is None and strict["threshold"]["source"] == "option"


def test_enrol_then_find_then_rename_merge_remove_with_audit(server, knn_dir):
    client, secrets, home = server
    response = client.post("/v1/people/Jon Snow/faces", headers=auth(secrets["write"]),
                           files=[photo(knn_dir / "test" / "johnsnow_test1.jpg")])
    assert response.status_code == 201, response.text
    enrolled = response.json()
    assert enrolled["person"] == "Jon Snow" and enrolled["faces"][0]["status"] == "enrolled"
    face_id = enrolled["faces"][0]["face_id"]
    again = client.post("/v1/people/Jon Snow/faces", headers=auth(secrets["write"]),
                        files=[photo(knn_dir / "test" / "johnsnow_test1.jpg")])
    assert again.status_code == 201 and again.json()["faces"][0]["status"] == "skipped"

    shown = client.get("/v1/people/Jon Snow", headers=auth(secrets["read"])).json()
    assert [f["id"] for f in shown["faces"]] == [face_id]
    assert shown["faces"][0]["image"] == "upload:johnsnow_test1.jpg"
    thumb = client.get(shown["faces"][0]["thumbnail"], headers=auth(secrets["read"]))
    assert thumb.status_code == 200 and thumb.headers["content-type"] == "image/jpeg"
    assert Image.open(io.BytesIO(thumb.content)).size[0] <= 128
    listing = client.get("/v1/people", headers=auth(secrets["read"])).json()["people"]
    assert {p["name"] for p in listing} == {"alex_lacamoire", "biden", "kit_harington", "obama", "rose_leslie",
                                            "Jon Snow"}

    renamed = client.post("/v1/people/Jon Snow/rename", headers=auth(secrets["admin"]), json={"new_name": "jon"})
    assert renamed.status_code == 200 and renamed.json()["name"] == "jon"
    merged = client.post("/v1/people/jon/merge", headers=auth(secrets["admin"]), json={"into": "kit_harington"})
    assert merged.status_code == 200 and merged.json()["moved"] == 1
    assert gallery_state(home)["kit_harington"] == {"dlib": 3}
    assert (home / "thumbnails" / f"{face_id}.jpg").is_file()  # moved with its face

    removed = client.delete("/v1/people/kit_harington", headers=auth(secrets["admin"]))
    assert removed.status_code == 200 and removed.json()["faces_removed"] == 3
    assert not (home / "thumbnails" / f"{face_id}.jpg").exists()
    assert "kit_harington" not in gallery_state(home)
    assert client.get(f"/v1/faces/{face_id}/thumbnail", headers=auth(secrets["read"])).status_code == 404

    entries = client.get("/v1/audit", headers=auth(secrets["admin"])).json()["entries"]
    actions = [(e["action"], e["target"], e["actor"]) for e in reversed(entries)]
    assert actions[:3] == [("key_create", "test-read", "cli"), ("key_create", "test-write", "cli"),
                           ("key_create", "test-admin", "cli")]
    assert actions[3:] == [("enrol", "Jon Snow", "key:test-write"), ("enrol", "Jon Snow", "key:test-write"),
                           ("rename", "Jon Snow", "key:test-admin"), ("merge", "jon", "key:test-admin"),
                           ("remove", "kit_harington", "key:test-admin")]
    assert entries[-4]["detail"]["faces"] == [face_id]


def test_each_scope_refused_where_it_must_be(server, knn_dir):
    client, secrets, home = server
    before = gallery_state(home)
    one = [photo(knn_dir / "test" / "obama1.jpg")]
    refused = {
        "read": [("post", "/v1/people/x/faces", {"files": one}), ("delete", "/v1/people/obama", {}),
                 ("post", "/v1/people/obama/rename", {"json": {"new_name": "y"}}),
                 ("post", "/v1/people/obama/merge", {"json": {"into": "biden"}}),
                 ("post", "/v1/calibrate", {"files": one}), ("get", "/v1/audit", {})],
        "write": [("delete", "/v1/people/obama", {}), ("post", "/v1/people/obama/rename", {"json": {"new_name": "y"}}),
                  ("post", "/v1/people/obama/merge", {"json": {"into": "biden"}}),
                  ("post", "/v1/calibrate", {"files": one}), ("get", "/v1/audit", {})],
    }
    for scope, calls in refused.items():
        for method, url, kwargs in calls:
            response = getattr(client, method)(url, headers=auth(secrets[scope]), **kwargs)
            assert response.status_code == 403, (scope, url, response.text)
            assert error_code(response) == "forbidden"
    assert gallery_state(home) == before
    # what each scope may do
    assert client.post("/v1/search", headers=auth(secrets["read"]), files=one).status_code == 200
    assert client.post("/v1/search", headers=auth(secrets["admin"]), files=one).status_code == 200
    assert client.post("/v1/people/x/faces", headers=auth(secrets["admin"]), files=one).status_code == 201


def test_revoked_key_is_refused_at_the_next_request(server):
    client, secrets, home = server
    assert client.get("/v1/people", headers=auth(secrets["read"])).status_code == 200
    with Gallery.open(home) as gallery:
        api_keys.revoke_key(gallery.store, "test-read")
        stored = [row.secret_sha256 for row in _key_rows(gallery)]
    assert client.get("/v1/people", headers=auth(secrets["read"])).status_code == 401
    assert secrets["read"] not in stored and api_keys.secret_hash(secrets["read"]) in stored  # only hashes


def _key_rows(gallery):
    from sqlalchemy import select

    from index.models import ApiKey

    with gallery.store.session() as session:
        return list(session.scalars(select(ApiKey)))


def test_errors_have_codes_statuses_and_change_nothing(server, knn_dir, tmp_path):
    client, secrets, home = server
    before = gallery_state(home)
    write, admin = auth(secrets["write"]), auth(secrets["admin"])
    blank = io.BytesIO()
    Image.new("RGB", (200, 200), (120, 120, 120)).save(blank, "PNG")

    def enrol_error(files, status, code, name="newcomer", **data):
        response = client.post(f"/v1/people/{name}/faces", headers=write, files=files, data=data)
        assert response.status_code == status, response.text
        assert error_code(response) == code, response.text
        assert response.json()["error"]["message"]
        return response.json()["error"]

    # no face / several faces: the whole request is refused, even the good photo in it
    good = photo(knn_dir / "test" / "obama1.jpg")
    error = enrol_error([good, ("photos", ("blank.png", blank.getvalue(), "image/png"))], 422, "no_face")
    assert error["detail"]["image"] == "blank.png"
    error = enrol_error([good, photo(knn_dir / "test" / "kit_with_rose.jpg")], 422, "several_faces")
    assert "largest" in error["message"]
    enrol_error([("photos", ("notes.jpg", b"just text", "image/jpeg"))], 415, "not_an_image")
    enrol_error([("photos", ("empty.jpg", b"", "image/jpeg"))], 415, "not_an_image")
    truncated = (knn_dir / "test" / "obama1.jpg").read_bytes()[:2000]
    enrol_error([("photos", ("cut.jpg", truncated, "image/jpeg"))], 415, "not_an_image")
    enrol_error([good], 422, "invalid_name", name="%20")
    assert gallery_state(home) == before

    # several faces with largest=true is accepted
    largest = client.post("/v1/people/newcomer/faces", headers=write, data={"largest": "true"},
                          files=[photo(knn_dir / "test" / "kit_with_rose.jpg")])
    assert largest.status_code == 201
    assert client.delete("/v1/people/newcomer", headers=admin).status_code == 200

    # unknown person
    for method, url, kwargs in [("get", "/v1/people/nobody", {}), ("delete", "/v1/people/nobody", {}),
                                ("post", "/v1/people/nobody/rename", {"json": {"new_name": "z"}}),
                                ("post", "/v1/people/nobody/merge", {"json": {"into": "obama"}}),
                                ("post", "/v1/people/obama/merge", {"json": {"into": "nobody"}})]:
        response = getattr(client, method)(url, headers=admin, **kwargs)
        assert response.status_code == 404 and error_code(response) == "unknown_person", (url, response.text)
    conflict = client.post("/v1/people/obama/rename", headers=admin, json={"new_name": "biden"})
    assert conflict.status_code == 409 and error_code(conflict) == "person_exists"
    itself = client.post("/v1/people/obama/merge", headers=admin, json={"into": "obama"})
    assert itself.status_code == 422
    bad_json = client.post("/v1/people/obama/rename", headers=admin, content=b"{not json",
                           headers_extra=None) if False else \
        client.post("/v1/people/obama/rename", headers={**admin, "content-type": "application/json"},
                    content=b"{not json")
    assert bad_json.status_code == 422 and error_code(bad_json) == "invalid_request"
    assert client.post("/v1/search", headers=admin).status_code == 422  # no photos
    assert error_code(client.post("/v1/search", headers=admin, files=[good], data={"top_k": "0"})) == \
        "invalid_request"
    assert error_code(client.get("/v1/nothing-here", headers=admin)) == "not_found"
    assert gallery_state(home) == before


def test_upload_limits_checked_before_decoding(knn_home_copy, dlib_engine, knn_dir, monkeypatch):
    limits = UploadLimits(max_file_bytes=200_000, max_files=2, max_pixels=1_000_000)
    app, client, secrets = make_server(knn_home_copy, dlib_engine, limits=limits)
    try:
        before = gallery_state(knn_home_copy)
        write = auth(secrets["write"])
        good = photo(knn_dir / "test" / "obama1.jpg")
        too_many = client.post("/v1/people/x/faces", headers=write, files=[good, good, good])
        assert too_many.status_code == 413 and error_code(too_many) == "too_many_files"
        heavy = client.post("/v1/search", headers=auth(secrets["read"]),
                            files=[("photos", ("big.jpg", b"\xff\xd8" + b"0" * 300_000, "image/jpeg"))])
        assert heavy.status_code == 413 and error_code(heavy) == "file_too_large"
        # a PNG header that declares 30000 x 30000 pixels: refused from its header, never decoded
        import struct
        import zlib

        header = struct.pack(">IIBBBBB", 30000, 30000, 8, 2, 0, 0, 0)
        bomb = b"\x89PNG\r\n\x1a\n" + b"".join(
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
            for kind, data in [(b"IHDR", header), (b"IDAT", zlib.compress(b"\0" * 64)), (b"IEND", b"")])
        decoded = []
        monkeypatch.setattr("jointface.server.uploads.load_image", lambda *a, **k: decoded.append(a) or None)
        refused = client.post("/v1/search", headers=auth(secrets["read"]),
                              files=[("photos", ("bomb.png", bomb, "image/png"))])
        assert refused.status_code == 413 and error_code(refused) == "image_too_large"
        assert "30000x30000" in refused.json()["error"]["message"] and decoded == []
        monkeypatch.undo()
        # the whole body is capped as well (declared or streamed)
        huge = client.post("/v1/search", headers={**auth(secrets["read"]), "content-type": "multipart/form-data"},
                           content=b"x" * (limits.max_request_bytes + 1))
        assert huge.status_code == 413 and error_code(huge) == "request_too_large"

        def chunks():
            for _ in range(limits.max_request_bytes // 65536 + 2):
                yield b"y" * 65536

        streamed = client.post("/v1/search", headers={**auth(secrets["read"]),
                                                      "content-type": "multipart/form-data; boundary=zz"},
                               content=chunks())
        assert streamed.status_code == 413 and error_code(streamed) == "request_too_large"
        assert gallery_state(knn_home_copy) == before
    finally:
        app.state.service.close()


def test_pixel_limit_from_the_environment(knn_home_copy, dlib_engine, knn_dir, monkeypatch):
    monkeypatch.setenv("JOINTFACE_MAX_PIXELS", "10000")
    app, client, secrets = make_server(knn_home_copy, dlib_engine)
    try:
        response = client.post("/v1/search", headers=auth(secrets["read"]), files=[photo(knn_dir / "test" / "obama1.jpg")])
        assert response.status_code == 413 and error_code(response) == "image_too_large"
    finally:
        app.state.service.close()


def test_gallery_busy_when_another_process_holds_the_lock(knn_home_copy, dlib_engine, knn_dir):
    app, client, secrets = make_server(knn_home_copy, dlib_engine, lock_timeout_s=0.5)
    try:
        before = gallery_state(knn_home_copy)
        holder = FileLock(str(knn_home_copy / "gallery.lock"))
        with holder:
            # flock locks belong to open files: the server's own lock waits for this one like another process's
            response = client.post("/v1/people/newbie/faces", headers=auth(secrets["write"]),
                                   files=[photo(knn_dir / "test" / "obama1.jpg")])
        assert response.status_code == 503 and error_code(response) == "gallery_busy", response.text
        assert response.headers["retry-after"]
        assert gallery_state(knn_home_copy) == before
        retry = client.post("/v1/people/newbie/faces", headers=auth(secrets["write"]),
                            files=[photo(knn_dir / "test" / "obama1.jpg")])
        assert retry.status_code == 201
    finally:
        app.state.service.close()


def test_changes_by_another_process_are_seen_by_the_next_request(server, run_cli, knn_dir):
    client, secrets, home = server
    read = auth(secrets["read"])
    one = [photo(knn_dir / "test" / "obama1.jpg")]
    assert client.post("/v1/search", headers=read, files=one).json()["results"][0]["faces"][0]["identity"] == "obama"
    result = run_cli("people", "rename", "obama", "barack", home=home)
    assert result.returncode == 0, result.stderr
    answer = client.post("/v1/search", headers=read, files=one).json()
    assert answer["results"][0]["faces"][0]["identity"] == "barack"
    result = run_cli("people", "remove", "--yes", "barack", home=home)
    assert result.returncode == 0, result.stderr
    answer = client.post("/v1/search", headers=read, files=one).json()
    assert answer["results"][0]["faces"][0]["identity"] != "barack"
    assert "barack" not in {p["name"] for p in client.get("/v1/people", headers=read).json()["people"]}


def test_calibrate(server, knn_dir, shared_data):
    client, secrets, home = server
    strangers = sorted((shared_data / "lfw").rglob("*.jpg"))[:6]
    response = client.post("/v1/calibrate", headers=auth(secrets["admin"]), data={"fpir": "0.2"},
                           files=[photo(path) for path in strangers])
    assert response.status_code == 200, response.text
    body = response.json()
    assert 0 < body["threshold"] <= 1 and body["faces"] >= 5
    with Gallery.open(home) as gallery:
        assert gallery.threshold("dlib")[0] == pytest.approx(body["threshold"])
    search = client.post("/v1/search", headers=auth(secrets["read"]), files=[photo(knn_dir / "test" / "obama1.jpg")])
    assert search.json()["threshold"]["source"] == "calibrated"
    bad = client.post("/v1/calibrate", headers=auth(secrets["admin"]), data={"fpir": "2"},
                      files=[photo(strangers[0])])
    assert bad.status_code == 422 and error_code(bad) == "invalid_request"


def test_openapi_document_lists_every_route(server):
    client, _, _ = server
    document = client.get("/openapi.json").json()
    paths = set(document["paths"])
    assert {"/v1/health", "/v1/search", "/v1/people", "/v1/people/{name}", "/v1/people/{name}/faces",
            "/v1/people/{name}/rename", "/v1/people/{name}/merge", "/v1/calibrate", "/v1/audit"} <= paths
    assert document["components"]["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"


def test_cors_closed_by_default_and_security_headers(server):
    client, secrets, _ = server
    response = client.get("/v1/people", headers={**auth(secrets["read"]), "Origin": "http://evil.example"})
    assert "access-control-allow-origin" not in response.headers
    preflight = client.options("/v1/people", headers={"Origin": "http://evil.example",
                                                      "Access-Control-Request-Method": "GET"})
    assert "access-control-allow-origin" not in preflight.headers
    assert response.headers["x-content-type-options"] == "nosniff" and response.headers["cache-control"] == "no-store"
    page = client.get("/")
    assert page.status_code == 200 and "default-src 'self'" in page.headers["content-security-policy"]


def test_keys_commands(run_cli, tmp_path):
    home = tmp_path / "home"
    created = run_cli("keys", "create", "door camera", "--scope", "write", home=home)
    assert created.returncode == 0, created.stderr
    secret = created.stdout.strip()
    assert secret.startswith("jf_") and len(secret) > 40
    assert run_cli("keys", "create", "door camera", home=home).returncode == 1  # duplicate name
    assert run_cli("keys", "create", "x", "--scope", "root", home=home).returncode == 1
    listing = run_cli("keys", "list", "--json", home=home)
    rows = [json.loads(line) for line in listing.stdout.splitlines()]
    assert [(r["name"], r["scope"], r["active"]) for r in rows] == [("door camera", "write", True)]
    assert secret not in listing.stdout and rows[0]["prefix"] == secret[:8]
    assert run_cli("keys", "revoke", "door camera", home=home).returncode == 0
    assert run_cli("keys", "revoke", "nobody", home=home).returncode == 1
    rows = [json.loads(line) for line in run_cli("keys", "list", "--json", home=home).stdout.splitlines()]
    assert rows[0]["active"] is False
    assert secret.encode() not in (home / "jointface.db").read_bytes()


def test_serve_command_end_to_end(run_cli, tmp_path):
    """`jointface serve` as its own process on 127.0.0.1: health without a key, people with one."""
    import os
    import socket
    import subprocess
    import time

    import httpx

    from conftest import REPO, jointface_command

    home = tmp_path / "home"
    created = run_cli("keys", "create", "reader", "--scope", "read", home=home)
    assert created.returncode == 0, created.stderr
    secret = created.stdout.strip()
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen([*jointface_command(), "--engine", "dlib", "serve", "--port", str(port)], cwd=REPO,
                              env={**os.environ, "JOINTFACE_HOME": str(home)}, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        for _ in range(3000):  # at most 300 s on a busy machine
            try:
                if httpx.get(url + "/v1/health", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert server.poll() is None, server.stderr.read()
            time.sleep(0.1)
        assert httpx.get(url + "/v1/people", timeout=30).status_code == 401
        answer = httpx.get(url + "/v1/people", headers=auth(secret), timeout=30)
        assert answer.status_code == 200 and answer.json() == {"people": []}
        assert httpx.get(url + "/", timeout=30).text.count("JointFace") >= 1
    finally:
        server.terminate()
        server.wait(60)
    assert "serving on http://127.0.0.1:" in server.stderr.read()


def test_concurrent_searches_share_the_engine_and_answer_as_one_at_a_time(knn_home_copy, dlib_engine, knn_dir):
    from concurrent.futures import ThreadPoolExecutor

    app, client, secrets = make_server(knn_home_copy, dlib_engine, max_wait_s=0.05)
    try:
        paths = sorted((knn_dir / "test").glob("*.jpg"))

        def ask(path):
            response = client.post("/v1/search", headers=auth(secrets["read"]), files=[photo(path)])
            assert response.status_code == 200, response.text
            return response.json()["results"][0]

        alone = [ask(path) for path in paths]
        with ThreadPoolExecutor(len(paths)) as pool:
            together = list(pool.map(ask, paths))
        assert together == alone
        assert app.state.service.engine.stats.photos == 2 * len(paths)  # each photo detected once
    finally:
        app.state.service.close()
