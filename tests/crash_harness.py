"""Crash trials: SIGKILL a jointface process at a random moment, then check the gallery.

Used by ``tests/test_reliability.py`` (10 trials per operation in CI, 50 with
``pytest -m slow``) and runnable on its own::

    python tests/crash_harness.py --trials 50

After every kill the gallery is reopened and must satisfy:

* SQLite's integrity check passes, no orphan rows;
* every face row has exactly one vector and the index has no other vector
  (index ids == database ids), after the automatic repair on open;
* enrolment run again to completion leaves exactly the expected faces
  (nothing lost, nothing doubled).
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def jointface_command() -> list[str]:
    script = Path(sys.executable).with_name("jointface")
    return [str(script)] if script.exists() else [sys.executable, "-m", "cli.app"]


@dataclass
class TrialResult:
    operation: str
    killed_after_s: float
    finished_before_kill: bool
    repaired_on_open: bool
    faces_after_kill: int
    ok: bool
    problem: str = ""


def make_people_tree(lfw: Path, root: Path, people: int = 4, per_person: int = 6) -> int:
    """A --from-folders tree of LFW people with many photos; returns the number of images."""
    names = [p.name for p in sorted(lfw.iterdir()) if p.is_dir() and len(list(p.glob("*.jpg"))) >= per_person]
    count = 0
    for name in names[:people]:
        (root / name).mkdir(parents=True, exist_ok=True)
        for image in sorted((lfw / name).glob("*.jpg"))[:per_person]:
            shutil.copy(image, root / name / image.name)
            count += 1
    return count


def check_gallery(home: Path) -> tuple[bool, str, int, bool]:
    """(consistent, problem, faces, repaired): reopen the gallery and verify every invariant."""
    from index import Gallery
    from jointface.engines import get_engine

    engine = get_engine("dlib")
    notices: list[str] = []
    with Gallery.open(home, notify=notices.append) as gallery:
        problems = gallery.store.integrity_check()
        gallery.vectors(engine.space)  # opening repairs
        report = gallery.check_index(engine.name, engine.version)
        problems += list(report.problems)
        faces = report.db_faces
    return not problems, "; ".join(problems), faces, bool(notices)


def run_to_completion(args: list[str], home: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "JOINTFACE_HOME": str(home)}
    return subprocess.run([*jointface_command(), "--engine", "dlib", *args], env=env, capture_output=True,
                          text=True, timeout=600)


def kill_at_random(args: list[str], home: Path, rng: random.Random, window: tuple[float, float]) -> tuple[float, bool]:
    env = {**os.environ, "JOINTFACE_HOME": str(home)}
    process = subprocess.Popen([*jointface_command(), "--engine", "dlib", *args], env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    delay = rng.uniform(*window)
    try:
        process.wait(timeout=delay)
        return delay, True
    except subprocess.TimeoutExpired:
        process.send_signal(signal.SIGKILL)
        process.wait()
        return delay, False


def enroll_trials(lfw: Path, trials: int, seed: int = 0, log=print) -> list[TrialResult]:
    rng = random.Random(seed)
    results = []
    with tempfile.TemporaryDirectory(prefix="jointface-crash-") as scratch:
        tree = Path(scratch) / "people"
        make_people_tree(lfw, tree)
        command = ["enroll", "--largest", "--batch-size", "3", "--from-folders", str(tree)]
        clean = Path(scratch) / "clean"
        started = time.perf_counter()
        done = run_to_completion(command, clean)
        duration = time.perf_counter() - started
        assert done.returncode == 0, done.stderr
        expected = check_gallery(clean)[2]
        for trial in range(trials):
            home = Path(scratch) / f"home{trial}"
            delay, finished = kill_at_random(command, home, rng, (0.2 * duration, 1.05 * duration))
            ok, problem, faces, repaired = check_gallery(home)
            if ok:
                done = run_to_completion(command, home)
                ok2, problem2, faces_final, _ = check_gallery(home)
                if done.returncode != 0 or not ok2 or faces_final != expected:
                    ok, problem = False, f"after re-run: rc={done.returncode} faces={faces_final}/{expected} {problem2}"
            results.append(TrialResult("enroll", delay, finished, repaired, faces, ok, problem))
            log(f"enroll trial {trial + 1}/{trials}: killed after {delay:.2f}s, finished={finished}, "
                f"faces at kill={faces}, repaired={repaired}, ok={ok} {problem}")
            shutil.rmtree(home, ignore_errors=True)
    return results


def people_trials(lfw: Path, trials: int, seed: int = 1, log=print) -> list[TrialResult]:
    """Kill `people remove` / `people merge` at random moments."""
    rng = random.Random(seed)
    results = []
    with tempfile.TemporaryDirectory(prefix="jointface-crash-") as scratch:
        tree = Path(scratch) / "people"
        make_people_tree(lfw, tree)
        names = sorted(p.name for p in tree.iterdir())
        base = Path(scratch) / "base"
        done = run_to_completion(["enroll", "--largest", "--from-folders", str(tree)], base)
        assert done.returncode == 0, done.stderr
        for trial in range(trials):
            home = Path(scratch) / f"home{trial}"
            shutil.copytree(base, home, ignore=shutil.ignore_patterns("gallery.lock"))
            operation = ["people", "remove", names[0]] if trial % 2 == 0 else ["people", "merge", names[1], names[2]]
            delay, finished = kill_at_random(operation, home, rng, (0.2, 2.5))
            ok, problem, faces, repaired = check_gallery(home)
            if ok:  # the operation is all-or-nothing: either it happened or not, then it can be redone
                from index import Gallery

                with Gallery.open(home) as gallery:
                    counts = {p.name: p.face_count for p in gallery.people()}
                if trial % 2 == 0:
                    ok = names[0] not in counts and faces == 18 or names[0] in counts and faces == 24
                else:
                    ok = (names[1] not in counts and counts.get(names[2]) == 12) or \
                        (counts.get(names[1]) == 6 and counts.get(names[2]) == 6)
                    problem = "" if ok else f"partial merge: {counts}"
                redo = run_to_completion(operation, home)
                if not finished and redo.returncode not in (0, 1):
                    ok, problem = False, f"redo failed: {redo.stderr}"
            results.append(TrialResult(" ".join(operation[:2]), delay, finished, repaired, faces, ok, problem))
            log(f"{operation[1]} trial {trial + 1}/{trials}: killed after {delay:.2f}s, finished={finished}, "
                f"repaired={repaired}, ok={ok} {problem}")
            shutil.rmtree(home, ignore_errors=True)
    return results


def main() -> int:
    from jointface.bench.protocols import require_shared_data

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    options = parser.parse_args()
    lfw = require_shared_data("lfw")
    start = time.time()
    results = enroll_trials(lfw, options.trials, options.seed) + people_trials(lfw, options.trials, options.seed + 1)
    bad = [r for r in results if not r.ok]
    killed = sum(not r.finished_before_kill for r in results)
    repaired = sum(r.repaired_on_open for r in results)
    print(f"{len(results)} trials ({killed} killed mid-run, {repaired} repaired on open) in {time.time() - start:.0f}s: "
          f"{len(results) - len(bad)} consistent, {len(bad)} inconsistent")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
