"""Load run of `jointface serve` on loopback, bounded in requests and time; writes benchmarks/results/serve_load.json.

    .venv/bin/python benchmarks/serve_load.py --seconds 30

1. A gallery in a temporary folder with knn_examples/train enrolled (dlib).
2. `jointface serve` started as its own process on 127.0.0.1 (a free port).
3. Phase "1 client": one client searches the knn_examples/test photos in turn.
4. Phase "4 clients + 1 enrolling": four clients search while a fifth enrols
   LFW photos, one photo per request, under new names.
5. Afterwards: every enrolment the server answered 201 for is looked up in
   the database (lost = answered but absent), and `jointface index check`
   must pass.
6. The command line on the same photos: `jointface search` over the photos
   repeated, timed from start to end, and the time of one photo (its start-up).

Every loop stops at ``--seconds`` or ``--max-requests``, whichever comes
first. Only 127.0.0.1 is contacted.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

import httpx
import numpy as np

REPO = Path(__file__).resolve().parents[1]
HOST = "127.0.0.1"


def jointface_command() -> list[str]:
    script = Path(sys.executable).with_name("jointface")
    return [str(script)] if script.exists() else [sys.executable, "-m", "cli.app"]


def shared_data() -> Path:
    return Path(os.environ.get("JOINTFACE_SHARED_DATA", REPO.parent / "shared" / "data"))


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind((HOST, 0))
        return probe.getsockname()[1]


def percentiles(latencies: list[float]) -> dict:
    if not latencies:
        return {"p50_ms": None, "p99_ms": None}
    values = np.array(latencies) * 1000
    return {"p50_ms": round(float(np.percentile(values, 50)), 1), "p99_ms": round(float(np.percentile(values, 99)), 1)}


class Phase:
    """Clients running until a deadline or a request budget; latencies of successful requests."""

    def __init__(self, seconds: float, max_requests: int):
        self.deadline = time.monotonic() + seconds
        self.budget = max_requests
        self.lock = threading.Lock()
        self.search_latencies: list[float] = []
        self.search_photos = 0
        self.search_errors: list[str] = []
        self.enrolled: list[tuple[str, int]] = []
        self.enrol_refused = 0
        self.enrol_errors: list[str] = []
        self.started = time.monotonic()

    def take(self) -> bool:
        with self.lock:
            if self.budget <= 0 or time.monotonic() >= self.deadline:
                return False
            self.budget -= 1
            return True


def search_client(url: str, key: str, photos: list[Path], phase: Phase, offset: int) -> None:
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=120) as client:
        position = offset
        while phase.take():
            path = photos[position % len(photos)]
            position += 1
            start = time.monotonic()
            response = client.post("/v1/search", files=[("photos", (path.name, path.read_bytes(), "image/jpeg"))])
            elapsed = time.monotonic() - start
            with phase.lock:
                if response.status_code == 200:
                    phase.search_latencies.append(elapsed)
                    phase.search_photos += 1
                else:
                    phase.search_errors.append(f"{response.status_code} {response.text[:200]}")


def enrol_client(url: str, key: str, photos: list[tuple[str, Path]], phase: Phase) -> None:
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=120) as client:
        for name, path in photos:
            if not phase.take():
                return
            response = client.post(f"/v1/people/{name}/faces",
                                   files=[("photos", (path.name, path.read_bytes(), "image/jpeg"))])
            with phase.lock:
                if response.status_code == 201:
                    phase.enrolled.extend((name, face["face_id"]) for face in response.json()["faces"]
                                          if face["status"] == "enrolled")
                elif response.status_code == 422:  # no face or several faces: refused, as it should be
                    phase.enrol_refused += 1
                else:
                    phase.enrol_errors.append(f"{response.status_code} {response.text[:200]}")


def run_phase(url: str, keys: dict, search_photos: list[Path], *, clients: int, enrol_photos, seconds: float,
              max_requests: int) -> dict:
    phase = Phase(seconds, max_requests)
    threads = [threading.Thread(target=search_client, args=(url, keys["read"], search_photos, phase, i))
               for i in range(clients)]
    if enrol_photos:
        threads.append(threading.Thread(target=enrol_client, args=(url, keys["write"], enrol_photos, phase)))
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(seconds + 300)
    wall = time.monotonic() - phase.started
    return {"clients": clients, "enrolling_clients": 1 if enrol_photos else 0, "seconds": round(wall, 1),
            "search_requests": len(phase.search_latencies), "search_requests_per_s":
                round(len(phase.search_latencies) / wall, 2),
            "search_photos_per_s": round(phase.search_photos / wall, 2), **percentiles(phase.search_latencies),
            "search_errors": len(phase.search_errors), "search_error_examples": phase.search_errors[:5],
            "enrolled": len(phase.enrolled), "enrol_refused": phase.enrol_refused,
            "enrol_errors": len(phase.enrol_errors), "enrol_error_examples": phase.enrol_errors[:5],
            "_enrolled_faces": phase.enrolled}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=30.0, help="length of each phase (at most 120)")
    parser.add_argument("--max-requests", type=int, default=3000, help="request budget of each phase")
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--cli-repeats", type=int, default=2, help="times the photos are repeated for the CLI run")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "serve_load.json")
    args = parser.parse_args()
    seconds = min(args.seconds, 120.0)

    from index import Gallery
    from jointface.engines import get_engine
    from jointface.server import keys as api_keys
    from jointface.service import enroll, folder_items

    data = shared_data() / "knn_examples"
    search_photos = sorted((data / "test").glob("*.jpg"))
    lfw = shared_data() / "lfw"
    enrol_photos = [(f"load_{path.parent.name}", path)
                    for path in sorted(lfw.rglob("*.jpg"))[:: 7][:2000]]
    work = Path(tempfile.mkdtemp(prefix="jointface-load-"))
    home = work / "home"
    server = None
    try:
        with Gallery.open(home) as gallery:
            report = enroll(gallery, get_engine("dlib"), folder_items(data / "train"))
            assert report.ok
            keys = {scope: api_keys.create_key(gallery.store, f"load-{scope}", scope)[1] for scope in ("read", "write")}
        port = free_port()
        url = f"http://{HOST}:{port}"
        env = {**os.environ, "JOINTFACE_HOME": str(home), "JOINTFACE_ENGINE": "dlib"}
        server = subprocess.Popen([*jointface_command(), "serve", "--host", HOST, "--port", str(port)], env=env,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        for _ in range(1200):  # at most 120 s to start
            try:
                if httpx.get(url + "/v1/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if server.poll() is not None:
                raise SystemExit(f"the server stopped: {server.stderr.read()}")
            time.sleep(0.1)
        # warm-up: the first detections load the models
        run_phase(url, keys, search_photos, clients=1, enrol_photos=None, seconds=5, max_requests=5)
        one = run_phase(url, keys, search_photos, clients=1, enrol_photos=None, seconds=seconds,
                        max_requests=args.max_requests)
        many = run_phase(url, keys, search_photos, clients=args.clients, enrol_photos=enrol_photos,
                         seconds=seconds, max_requests=args.max_requests)
        server.terminate()
        server.wait(60)

        # every answered enrolment is in the database, and the index agrees with it
        enrolled = many.pop("_enrolled_faces")
        one.pop("_enrolled_faces")
        from sqlalchemy import select

        from index.models import FaceRow

        with Gallery.open(home) as gallery, gallery.store.session() as session:
            present = set(session.scalars(select(FaceRow.id)))
        lost = [face_id for _, face_id in enrolled if face_id not in present]
        check = subprocess.run([*jointface_command(), "--engine", "dlib", "index", "check"], env=env,
                               capture_output=True, text=True, timeout=600)

        # the command line on the same photos
        photos = [str(p) for p in search_photos]
        start = time.monotonic()
        single = subprocess.run([*jointface_command(), "search", "--json", photos[0]], env=env,
                                capture_output=True, text=True, timeout=600)
        single_s = time.monotonic() - start
        repeated = photos * args.cli_repeats
        start = time.monotonic()
        batch = subprocess.run([*jointface_command(), "search", "--json", *repeated], env=env,
                               capture_output=True, text=True, timeout=600)
        batch_s = time.monotonic() - start
        cli = {"photos": len(repeated), "seconds": round(batch_s, 2), "one_photo_seconds": round(single_s, 2),
               "photos_per_s_including_startup": round(len(repeated) / batch_s, 2),
               "photos_per_s_after_startup": round((len(repeated) - 1) / max(batch_s - single_s, 1e-6), 2),
               "ok": single.returncode == 0 and batch.returncode == 0}
        result = {
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "commit": subprocess.run(["git", "rev-parse", "--short=10", "HEAD"], cwd=REPO, capture_output=True,
                                     text=True).stdout.strip(),
            "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, load average "
                       f"{os.getloadavg()[0]:.1f} at the end",
            "engine": "dlib", "photos": [p.name for p in search_photos], "phase_seconds": seconds,
            "one_client": one, "clients_and_enrolling": many,
            "enrolments_answered": len(enrolled), "enrolments_lost": len(lost),
            "index_check_ok": check.returncode == 0, "index_check": check.stdout.strip()[-300:],
            "cli_search": cli,
        }
    finally:
        if server is not None and server.poll() is None:
            server.kill()
        shutil.rmtree(work, ignore_errors=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"| run | requests/s | photos/s | p50 ms | p99 ms | errors |\n|---|---|---|---|---|---|")
    for label, phase in (("serve, 1 client", one), (f"serve, {args.clients} clients + 1 enrolling", many)):
        print(f"| {label} | {phase['search_requests_per_s']} | {phase['search_photos_per_s']} | {phase['p50_ms']} | "
              f"{phase['p99_ms']} | {phase['search_errors']} |")
    print(f"| CLI `search`, {cli['photos']} photos in one run | - | {cli['photos_per_s_including_startup']} "
          f"({cli['photos_per_s_after_startup']} after start-up) | - | - | {0 if cli['ok'] else 'failed'} |")
    print(f"enrolments answered {len(enrolled)}, refused (no or several faces) {many['enrol_refused']}, "
          f"lost {len(lost)}; index check {'ok' if check.returncode == 0 else 'FAILED'}")
    print(f"written: {args.out}")
    return 0 if not lost and check.returncode == 0 and cli["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
