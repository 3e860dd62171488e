"""Fuzz `jointface serve` against its own OpenAPI document (schemathesis): no request gets a 500.

Every operation is called with generated parameters and bodies, with an admin
key (so requests get past authentication into the routes) and, for a share of
them, without one. The count of cases and of 500s is written to
``test-artifacts/serve/fuzz.json``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import hypothesis
from hypothesis import HealthCheck, given, settings

from index import Gallery
from jointface.server import keys as api_keys
from jointface.server.app import ServeConfig, create_app

REPO = Path(__file__).resolve().parents[1]
EXAMPLES_PER_OPERATION = int(os.environ.get("JOINTFACE_FUZZ_EXAMPLES", "25"))


def test_no_server_errors_on_fuzzed_requests(tmp_path, dlib_engine, knn_dir):
    import schemathesis

    home = tmp_path / "home"
    app = create_app(ServeConfig(home=home, keep_thumbnails=True, detect_timeout_s=600), dlib_engine)
    with Gallery.open(home) as gallery:
        secret = api_keys.create_key(gallery.store, "fuzz", "admin")[1]
    try:
        # one person, so some generated names and face ids can hit real rows
        from fastapi.testclient import TestClient

        client = TestClient(app)
        enrolled = client.post("/v1/people/obama/faces", headers={"Authorization": f"Bearer {secret}"},
                               files=[("photos", ("o.jpg", (knn_dir / "train" / "obama" / "obama.jpg").read_bytes(),
                                                  "image/jpeg"))])
        assert enrolled.status_code == 201, enrolled.text

        schema = schemathesis.openapi.from_asgi("/openapi.json", app)
        tally = {"cases": 0, "server_errors": [], "by_operation": {}}
        operations = [result.ok() for result in schema.get_all_operations()]
        assert len(operations) >= 10
        for operation in operations:
            label = f"{operation.method.upper()} {operation.path}"
            tally["by_operation"][label] = 0

            @settings(max_examples=EXAMPLES_PER_OPERATION, deadline=None, derandomize=True, database=None,
                      suppress_health_check=list(HealthCheck),
                      phases=[hypothesis.Phase.explicit, hypothesis.Phase.generate])
            @given(case=operation.as_strategy(), with_key=hypothesis.strategies.booleans())
            def run(case, with_key):
                headers = {"Authorization": f"Bearer {secret}"} if with_key or case.operation.path == "/v1/health" \
                    else {}
                response = case.call(headers=headers)
                tally["cases"] += 1
                tally["by_operation"][label] += 1
                if response.status_code >= 500:
                    tally["server_errors"].append({"operation": label, "status": response.status_code,
                                                   "body": response.text[:300]})
                else:  # every answer is JSON, errors in the documented shape
                    content_type = response.headers.get("content-type") or ""
                    if isinstance(content_type, list):  # schemathesis keeps every value of a header
                        content_type = content_type[0] if content_type else ""
                    if content_type.startswith("application/json"):
                        body = response.json()
                        if response.status_code >= 400:
                            assert set(body) == {"error"} and body["error"]["code"], body

            run()
    finally:
        app.state.service.close()
    out = Path(os.environ.get("JOINTFACE_TEST_ARTIFACTS", REPO / "test-artifacts")) / "serve"
    out.mkdir(parents=True, exist_ok=True)
    (out / "fuzz.json").write_text(json.dumps({"cases": tally["cases"], "server_errors": len(tally["server_errors"]),
                                               "by_operation": tally["by_operation"],
                                               "examples": tally["server_errors"][:20]}, indent=2) + "\n")
    print(f"fuzz: {tally['cases']} cases, {len(tally['server_errors'])} server errors")
    assert tally["cases"] >= 10 * len(operations) // 2
    assert tally["server_errors"] == []
