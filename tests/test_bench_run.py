"""`jointface bench` and `jointface calibrate` end to end on small subsets."""

from __future__ import annotations

import json

import numpy as np
import pytest

from index import Gallery
from jointface.bench.protocols import list_lfw
from jointface.service import calibrate, resolve_threshold


def test_bench_p2_subset_writes_results(run_cli, tmp_path):
    out = tmp_path / "results"
    result = run_cli("bench", "p2", "--engine", "dlib", "--limit", "12", "--out", out, "--cache", tmp_path / "cache")
    assert result.returncode == 0, result.stderr
    data = json.loads((out / "p2.json").read_text())
    figures = data["figures"]["dlib"]
    assert data["protocol"] == "P2" and data["config"]["subset"] == 12
    assert figures["mated_probes"] == 12 and figures["nonmated_probes"] == 24
    for key in ("rank1", "rank5", "tpir@fpir=0.01", "tpir@fpir=0.1"):
        assert 0.0 <= figures[key] <= 1.0
    assert figures["rank5"] >= figures["rank1"] >= 0.75  # dlib on LFW: rank-1 is about 0.92
    assert data["engines"]["dlib"]["version"].startswith("dlib-resnet-v1-")
    assert data["environment"]["git_commit"] is None or len(data["environment"]["git_commit"]) == 40
    assert (out / "p2_det.png").stat().st_size > 5000 and (out / "p2.md").read_text().startswith("## P2")
    # calibration by gallery size: its whole-gallery row is P2's own calibration (same strangers, same halves)
    for fpir in ("0.1", "0.01"):
        rows = figures["by_gallery_size"][fpir]
        assert rows[-1]["people"] == figures["gallery_enrolled"] > rows[0]["people"] == 2
        assert rows[-1]["threshold"] == pytest.approx(figures["calibrated"][fpir]["threshold"])
        assert all(0.0 <= row["tpir"] <= 1.0 and 0.0 <= row["fpir_held_out"] <= 1.0 for row in rows)
    assert (out / "p2_gallery_size.png").stat().st_size > 5000 and "by gallery size" in (out / "p2.md").read_text()
    # A rerun hits the detection cache and gives the same figures.
    again = run_cli("bench", "p2", "--engine", "dlib", "--limit", "12", "--out", out, "--cache", tmp_path / "cache")
    assert json.loads((out / "p2.json").read_text())["figures"]["dlib"]["rank1"] == figures["rank1"]
    assert again.returncode == 0
    # a tagged run (a candidate) leaves the untagged results and plots alone: its plots go to OUT/TAG/
    shipped_plot = (out / "p2_det.png").read_bytes()
    tagged = run_cli("bench", "p2", "--engine", "dlib", "--limit", "6", "--out", out, "--cache", tmp_path / "cache",
                     "--tag", "candidate")
    assert tagged.returncode == 0, tagged.stderr
    assert json.loads((out / "p2-candidate.json").read_text())["config"]["subset"] == 6
    assert json.loads((out / "p2.json").read_text())["config"]["subset"] == 12
    assert (out / "p2_det.png").read_bytes() == shipped_plot and (out / "candidate" / "p2_det.png").is_file()


def test_calibrate_sets_the_threshold_search_uses(knn_home_copy, lfw_dir, dlib_engine, run_cli):
    listing = list_lfw(lfw_dir)
    strangers = [lfw_dir / p / listing[p][0] for p in sorted(listing) if len(listing[p]) == 1][:30]
    with Gallery.open(knn_home_copy) as gallery:
        result = calibrate(gallery, dlib_engine, strangers, fpir=0.1)
        assert result.faces >= 30 and result.reached_fpir <= 0.1
        chosen = resolve_threshold(gallery, dlib_engine, None)
        assert chosen.source == "calibrated" and chosen.value == result.threshold
        # The strangers' own best scores: at most 10% reach the threshold.
        from jointface.service import identify

        best = []
        for path in strangers:
            from jointface.imageio import load_image

            faces = dlib_engine.detect(load_image(path))
            best += [r.similarity for r in identify(gallery, dlib_engine, faces, top_k=1, threshold=np.inf)]
        assert np.mean(np.array(best) >= result.threshold) <= 0.1
    out = run_cli("--engine", "dlib", "search", lfw_dir / "George_W_Bush" / "George_W_Bush_0001.jpg",
                  home=knn_home_copy)
    assert f"threshold {result.threshold:.3f} (calibrated)" in out.stderr


def test_calibrate_cli_errors(run_cli, tmp_path, lfw_dir):
    empty_home = tmp_path / "empty"
    result = run_cli("--engine", "dlib", "calibrate", "--unknowns", lfw_dir / "Aaron_Eckhart", home=empty_home)
    assert result.returncode == 1 and "gallery is empty" in result.stderr
    assert run_cli("calibrate", "--fpir", "2", "--unknowns", lfw_dir, home=empty_home).returncode == 2


def test_bench_p1_subset_and_readme_report(run_cli, tmp_path, lfw_dir):
    out = tmp_path / "results"
    result = run_cli("bench", "p1", "--engine", "dlib", "--limit", "3", "--out", out, "--cache", tmp_path / "cache")
    assert result.returncode == 0, result.stderr
    figures = json.loads((out / "p1.json").read_text())["figures"]["dlib"]
    from jointface.bench.protocols import p1_split
    from jointface.bench.common import subset as _subset

    split = p1_split(lfw_dir)
    people = set(_subset(split.people, 3))
    assert figures["test_images"] == sum(image.person in people for image in split.test)
    assert figures["top1_nearest_train"] >= 0.8 and 0.5 <= figures["mean_iou"] <= 1.0
    assert figures["images_per_second"] > 0

    from jointface.bench.report import END, START, update_readme

    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n\n{START}\nold\n{END}\n\nrest\n")
    assert update_readme(readme, out)
    text = readme.read_text()
    assert "old" not in text and "## P1" in text and "| dlib |" in text and text.endswith("rest\n")
    assert not update_readme(readme, out)  # idempotent


def test_bench_refuses_two_engines_of_one_name(run_cli, tmp_path):
    """Results are keyed by engine name: two weights files of one file name (or one engine asked twice)
    would overwrite each other's figures, so the run is refused before any work, with a message."""
    from jointface.engines.joint_engine import default_weights_path

    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "jointface.pt").symlink_to(default_weights_path())
    out = tmp_path / "results"
    result = run_cli("bench", "p1", "-e", f"jointface-torch@{tmp_path / 'a' / 'jointface.pt'}",
                     "-e", f"jointface-torch@{tmp_path / 'b' / 'jointface.pt'}", "--limit", "1", "--out", out)
    assert result.returncode != 0 and "both named 'jointface-torch@jointface'" in result.stderr
    assert "same file name" in result.stderr and not out.exists()
    twice = run_cli("bench", "p1", "-e", "dlib", "-e", "dlib", "--limit", "1", "--out", out)
    assert twice.returncode != 0 and "asked for twice" in twice.stderr and not out.exists()


def test_bench_p4_subset_profiles_the_joint_engine_steps(run_cli, tmp_path):
    out = tmp_path / "results"
    result = run_cli("--threads", "1", "bench", "p4", "--engine", "jointface", "--limit", "4", "--out", out,
                     "--cache", tmp_path / "cache")
    assert result.returncode == 0, result.stderr
    data = json.loads((out / "p4.json").read_text())
    assert data["config"]["single_images"] == 16 and data["config"]["mosaics"] == 4
    rates = {name: row["images_per_second"] for name, row in data["figures"].items()}
    assert set(rates) == {f"{kind}: jointface, {mode}" for kind in ("single_320", "mosaic_640")
                          for mode in ("single image", "batch 8")}
    assert all(rate > 0 for rate in rates.values())
    profile = data["step_profile_ms_per_image"]["jointface"]
    for steps in profile.values():
        assert set(steps) == {"letterbox", "network", "decode_nms", "to_faces", "gallery_search"}
        assert steps["network"] > 0 and all(value >= 0 for value in steps.values())
    # the 640 px mosaics run the network at 320 px input: their network step costs more than a single photo's
    assert profile["mosaic_640"]["network"] > profile["single_320"]["network"]
    assert "milliseconds per image in each step" in (out / "p4.md").read_text()
    decoding = data["camera_photo_decoding"]
    assert decoding["full_ms"] > decoding["reduced_ms"] > 0 and decoding["max_side"] == 1280


def test_p2_markdown_shows_training_calibration_and_transfer_per_engine():
    from jointface.bench.run import markdown_for

    calibrated = {"0.01": {"threshold": 0.9, "fpir_held_out": 0.012, "tpir": 0.5},
                  "0.1": {"threshold": 0.8, "fpir_held_out": 0.09, "tpir": 0.7}}
    row = {"rank1": 0.6, "rank5": 0.8, "tpir@fpir=0.01": 0.5, "threshold@fpir=0.01": 0.9, "tpir@fpir=0.1": 0.7,
           "threshold@fpir=0.1": 0.8, "calibrated": calibrated,
           "transfer": {"people": 12, "nearest_neighbour_accuracy": 0.75, "retrained_classifier_accuracy": 0.8}}
    result = {"protocol": "P2", "figures": {"dlib": row, "jointface@heads-triplet": row},
              "engines": {"dlib": {"version": "a"},
                          "jointface@heads-triplet": {"version": "b", "identity_heads": ["triplet"],
                                                      "training_steps": 1470, "continued_from": None,
                                                      "validation": {"top1_nearest": 0.25}}}}
    text = markdown_for(result)
    assert "| jointface@heads-triplet | triplet | from scratch | 1,470 | 25.00% |" in text
    assert "| dlib | 0.900 | 1.20% | 50.00% | 0.800 | 9.00% | 70.00% |" in text
    assert "| jointface@heads-triplet | 12 | 75.00% | 80.00% |" in text
    assert "dlib | cosface" not in text  # dlib was not trained here: no training row
    result["engines"]["jointface@heads-triplet"]["continued_from"] = "runs/cand/cont.pt"
    assert "| jointface@heads-triplet | triplet | from cont.pt | 1,470 | 25.00% |" in markdown_for(result)


def test_a_v2_networks_start_is_the_first_file_of_its_init_state():
    from jointface.engines.joint_engine import _start_weights

    assert _start_weights({"init_weights": "v1.pt", "init_state": [["v2.pt", ["backbone."]]]}) == "v1.pt"
    assert _start_weights({"init_state": [["shipped.pt", ["backbone."]], ["other.pt", ["heads."]]]}) == "shipped.pt"
    assert _start_weights({"init_state": []}) is None and _start_weights({}) is None


def test_benchmark_outputs_do_not_mark_a_run_as_uncommitted():
    """Results, the README and the weights card are the benchmarks' own output; code changes are listed."""
    from jointface.bench.report import _uncommitted
    from jointface.bench.common import changed_sources

    porcelain = (" M README.md\n M benchmarks/results/p1.json\nM  benchmarks/results/p2_det.png\n"
                 " M jointface/weights/jointface.json\n")
    assert changed_sources(porcelain) == []
    porcelain += " M jointface/engines/joint_engine.py\nR  old.py -> jointface/new.py\n M jointface/weights/jointface.pt\n"
    changed = changed_sources(porcelain)
    assert changed == ["jointface/engines/joint_engine.py", "jointface/new.py", "jointface/weights/jointface.pt"]
    assert changed_sources(" M benchmarks/results_old/x.json\n") == ["benchmarks/results_old/x.json"]
    assert _uncommitted({"git_dirty": False}) == ""
    assert _uncommitted({"git_dirty": True}) == " (uncommitted changes)"  # results written before the list
    assert _uncommitted({"git_dirty": True, "git_changed": changed}) == (
        " (uncommitted changes: jointface/engines/joint_engine.py, jointface/new.py, jointface/weights/jointface.pt)")
    assert _uncommitted({"git_dirty": True, "git_changed": changed + ["a.py"]}).endswith("and 1 more)")


def test_dlib_cache_seeded_from_teacher_labels_answers_like_dlib(tmp_path, lfw_dir, dlib_engine):
    import shutil

    from jointface.bench.cache import CachingEngine, seed_dlib_cache
    from jointface.datasets.teacher import label_collection
    from jointface.imageio import load_image

    root = tmp_path / "lfw"
    for person in ("Aaron_Peirsol", "Abdullah_Gul"):
        shutil.copytree(lfw_dir / person, root / person)
    labels = tmp_path / "lfw.jsonl"
    label_collection(root, "lfw", labels, workers=1, limit=3, progress=False)
    counts = seed_dlib_cache(labels, tmp_path / "cache", dlib_engine)
    assert counts["photos"] == 3
    cached = CachingEngine(dlib_engine, tmp_path / "cache")
    try:
        for path in sorted(root.glob("*/*.jpg"))[:3]:
            image = load_image(path)
            seeded, fresh = cached.detect(image), dlib_engine.detect(image)
            assert [f.box for f in seeded] == [f.box for f in fresh]
            for a, b in zip(seeded, fresh):
                assert abs(a.score - b.score) < 1e-3 and float(np.dot(a.embedding, b.embedding)) > 0.99999
        assert cached.hits == 3 and cached.misses == 0
    finally:
        cached.close()
