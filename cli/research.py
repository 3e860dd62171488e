"""Research commands, for the people who build JointFace: bench, preprocess, organize, train, train-v2,
quantize. ``cli/app.py`` registers them on the ``jointface`` app.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer

from cli.common import CliError, err, handle_errors, out, progress_bar, settings


# -- bench -------------------------------------------------------------------------------------


PROTOCOLS = ("p1", "p2", "p3", "p4", "p5", "p6", "cluster", "all", "report")


@handle_errors
def bench(
    ctx: typer.Context,
    protocol: str = typer.Argument(..., help="p1, p2, p3, p4, p5, p6, cluster or all (see ../shared/PROTOCOLS.md); report "
                                             "rewrites the README's results section from the JSON files."),
    engines: Optional[list[str]] = typer.Option(None, "--engine", "-e", help="Engines to compare (repeat); "
                                                                             "default: every available one. "
                                                                             "jointface@PATH adds a network "
                                                                             "trained elsewhere."),
    limit: Optional[int] = typer.Option(None, "--limit", min=1, help="Run on an evenly spread subset (quick "
                                                                     "checks); figures are then not the "
                                                                     "protocol's."),
    out_dir: Path = typer.Option(Path("benchmarks/results"), "--out", help="Where results are written."),
    cache_dir: Optional[Path] = typer.Option(None, "--cache", help="Detection cache (default: "
                                                                   "~/.cache/jointface/bench)."),
    tag: Optional[str] = typer.Option(None, "--tag", help="Suffix for the result file names."),
    seed_dlib: Optional[Path] = typer.Option(None, "--seed-dlib", help="Every-face LFW labels (`preprocess "
                                                                       "--all-faces`): fill the dlib engine's "
                                                                       "detection cache from them first."),
) -> None:
    """Run the benchmark protocols and write JSON, Markdown and plots."""
    from jointface.bench import run as bench_run
    from jointface.bench.protocols import require_shared_data
    from jointface.engines import get_engine

    protocol = protocol.lower()
    if protocol not in PROTOCOLS:
        raise typer.BadParameter(f"unknown protocol {protocol!r}; choose one of {', '.join(PROTOCOLS)}")
    if protocol == "report":  # regenerate the README's results section from the JSON files
        from jointface.bench.report import update_readme, write_weights_card

        try:
            changed = update_readme(Path("README.md"), out_dir)
            card = write_weights_card(out_dir)
        except (OSError, ValueError) as exc:
            raise CliError(str(exc)) from exc
        err.print("README.md results " + ("updated" if changed else "already up to date"), markup=False)
        if card is not None:
            err.print(f"weights card written: {card}", markup=False)
        return
    settings(ctx).apply_threads()
    names = engines or _benchmark_engines()
    chosen = [get_engine(name) for name in names]
    try:
        bench_run.check_engine_names(names, chosen)
    except ValueError as exc:
        raise CliError(str(exc)) from exc
    cache = cache_dir or Path.home() / ".cache" / "jointface" / "bench"
    if seed_dlib is not None:
        from jointface.bench.cache import seed_dlib_cache

        if not seed_dlib.is_file():
            raise CliError(f"{seed_dlib}: no such labels file")
        with progress_bar("seeding the dlib cache") as progress:
            task = progress.add_task("seeding the dlib cache", total=None, current="")
            counts = seed_dlib_cache(seed_dlib, cache, get_engine("dlib"),
                                     progress=lambda done, total: progress.update(task, completed=done, total=total))
        err.print(f"dlib cache seeded from {seed_dlib}: {counts}", markup=False)
    with progress_bar("bench") as progress:
        tasks: dict[str, int] = {}

        def report(stage: str, done: int, total: int) -> None:
            if stage not in tasks:
                tasks[stage] = progress.add_task(stage, total=total, current="")
            progress.update(tasks[stage], completed=done)
            if not err.is_terminal and (done == total or done % 500 == 0):
                err.print(f"{stage}: {done}/{total}", markup=False)

        ctx_ = bench_run.BenchContext(lfw_root=require_shared_data("lfw"), cache_dir=cache, progress=report,
                                      limit=limit)
        wanted = ["p1", "p2", "p3", "p4", "p5", "p6"] if protocol == "all" else [protocol]
        # a tagged run (a candidate beside the shipped results) draws its plots in OUT/TAG/, not over the shipped ones
        plots_dir = out_dir / tag if tag else out_dir
        for name in wanted:
            result = bench_run.run_protocol(name, chosen, ctx_, plots_dir)
            path = bench_run.write_results(result, chosen, out_dir, tag=tag)
            out.print(bench_run.markdown_for(result), markup=False)
            err.print(f"written: {path}", markup=False)
        if not tag and out_dir == Path("benchmarks/results") and Path("README.md").exists():
            from jointface.bench.report import update_readme

            update_readme(Path("README.md"), out_dir)


# -- training ----------------------------------------------------------------------------------


@handle_errors
def preprocess(
    root: Path = typer.Argument(..., help="The collection's folder."),
    layout: str = typer.Option("folder", "--layout", help="lfw, folder (one subfolder per person), fei, caltech, "
                                                          "gt (Georgia Tech); with --all-faces also aaf "
                                                          "(All-Age-Faces), utkface, celeba."),
    labels_out: Path = typer.Option(..., "--out", help="Labels file (JSON lines); rerun to continue."),
    limit: Optional[int] = typer.Option(None, "--limit", min=1, help="Label only the first N images."),
    all_faces: bool = typer.Option(False, "--all-faces", help="Label every face of every photo (training data of "
                                                              "the v2 network; writes a manifest)."),
    workers: int = typer.Option(2, "--workers", min=1, help="Worker processes (with --all-faces)."),
) -> None:
    """Label a face collection with the dlib engine (box, identity, landmark box, teacher descriptor)."""
    from jointface.train.labels import LAYOUTS, preprocess as run_preprocess

    if all_faces:
        _preprocess_all_faces(root, layout, labels_out, limit, workers)
        return
    if layout not in LAYOUTS:
        raise typer.BadParameter(f"unknown layout {layout!r}; choose one of {', '.join(LAYOUTS)}")
    if not root.is_dir():
        raise CliError(f"{root}: not a folder")
    try:
        summary = run_preprocess(root, layout, labels_out, progress=err.is_terminal, limit=limit)
    except ValueError as exc:
        raise CliError(str(exc)) from exc
    for key in ("no_face", "several_faces", "unreadable", "unlabelled"):
        entries = summary.get(key) or []
        if entries:
            err.print(f"{len(entries)} images {key.replace('_', ' ')}:", markup=False)
            for entry in entries[:20]:
                err.print(f"  {entry}", markup=False)
            if len(entries) > 20:
                err.print(f"  ... and {len(entries) - 20} more (see {labels_out})", markup=False)
    labels_out.with_suffix(".summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    counts = {k: v for k, v in summary.items() if isinstance(v, (int, float, str))}
    out.print(json.dumps(counts, indent=2), markup=False)


def _preprocess_all_faces(root: Path, layout: str, labels_out: Path, limit: Optional[int], workers: int) -> None:
    from jointface.datasets.collections import LAYOUTS as ALL_LAYOUTS, CollectionError
    from jointface.datasets.teacher import LabelsBusy, LabelsMismatch, label_collection

    if layout not in ALL_LAYOUTS:
        raise typer.BadParameter(f"unknown layout {layout!r}; choose one of {', '.join(ALL_LAYOUTS)}")
    try:
        manifest = label_collection(root, layout, labels_out, workers=workers, limit=limit,
                                    progress=err.is_terminal)
    except (CollectionError, LabelsMismatch, LabelsBusy) as exc:
        raise CliError(str(exc)) from exc
    except KeyboardInterrupt:
        err.print(f"interrupted: every finished photo is in {labels_out}; run the same command to continue",
                  markup=False)
        raise typer.Exit(130)
    unreadable = manifest.get("unreadable") or []
    if unreadable:
        err.print(f"{len(unreadable)} photos could not be read:", markup=False)
        for path, reason in unreadable[:20]:
            err.print(f"  {path}: {reason}", markup=False)
    out.print(json.dumps({k: v for k, v in manifest.items() if k != "unreadable"}, indent=2), markup=False)


@handle_errors
def organize(
    labels: Path = typer.Argument(..., help="Labels file written by `jointface preprocess`."),
    out_dir: Path = typer.Argument(..., help="Where the resized images and the split go."),
    layout: Optional[str] = typer.Option(None, "--layout", help="Defaults to the layout the labels were made "
                                                                "with."),
) -> None:
    """Resize to a shorter side of 320 px and split into train / test (P1 exactly, for LFW)."""
    from jointface.train.labels import organize as run_organize

    if not labels.is_file():
        raise CliError(f"{labels}: no such labels file (run `jointface preprocess` first)")
    try:
        summary = run_organize(labels, out_dir, layout, progress=err.is_terminal)
    except ValueError as exc:
        raise CliError(str(exc)) from exc
    out.print(json.dumps({k: v for k, v in summary.items() if not isinstance(v, list)}, indent=2, default=str),
              markup=False)


@handle_errors
def train(
    ctx: typer.Context,
    config_path: Optional[Path] = typer.Option(None, "--config", help="A JSON training config (see "
                                                                      "jointface/configs/)."),
    data_dir: Optional[Path] = typer.Option(None, "--data", help="Output folder of `jointface organize`."),
    out_dir: Optional[Path] = typer.Option(None, "--out", help="Run folder (checkpoints, logs, curves); an "
                                                              "interrupted run resumes from it."),
    backbone: Optional[str] = typer.Option(None, "--backbone", help="resnet18, resnet34 or resnet50."),
    input_size: Optional[int] = typer.Option(None, "--input-size", help="Network input in pixels (320: 10x10 "
                                                                        "grid, 160: 5x5)."),
    epochs: Optional[int] = typer.Option(None, "--epochs", min=1),
    heads: Optional[str] = typer.Option(None, "--heads", help="Comma-separated identity heads: classifier, "
                                                              "arcface or cosface, triplet, distill."),
    init: Optional[Path] = typer.Option(None, "--init", help="torchvision ResNet weights to start from."),
    init_weights: Optional[Path] = typer.Option(None, "--init-weights", help="JointFace weights (or a training "
                                                                              "checkpoint) to continue from, "
                                                                              "with a fresh schedule."),
    bf16: Optional[bool] = typer.Option(None, "--bf16/--no-bf16", help="bf16 autocast."),
    export: Optional[Path] = typer.Option(None, "--export", help="Also copy the final weights here."),
    nproc: int = typer.Option(1, "--nproc", min=1, help="Data-parallel training processes on this machine "
                                                        "(torch.distributed: gloo on CPU, nccl on GPU); the "
                                                        "global batch stays the config's."),
) -> None:
    """Train the joint detection + identification network (resumes from --out)."""
    import os
    import shlex
    import shutil
    import subprocess

    from jointface.train.config import TrainConfig
    from jointface.train.loop import train as run_training

    config = TrainConfig.load(config_path) if config_path else TrainConfig()
    changes = {"data_dir": str(data_dir) if data_dir else None, "out_dir": str(out_dir) if out_dir else None,
               "backbone": backbone, "input_size": input_size, "epochs": epochs,
               "init": str(init) if init else None, "bf16": bf16,
               "init_weights": str(init_weights) if init_weights else None,
               "identity_heads": [h.strip() for h in heads.split(",") if h.strip()] if heads else None,
               "num_threads": settings(ctx).threads}
    config = config.replace(**{k: v for k, v in changes.items() if v is not None})
    if not config.data_dir or not config.out_dir:
        raise typer.BadParameter("--data and --out (or a --config that sets data_dir and out_dir) are required")
    if not Path(config.data_dir, "train.jsonl").is_file():
        raise CliError(f"{config.data_dir} has no train.jsonl: run `jointface organize` first")
    if nproc > 1 and "WORLD_SIZE" not in os.environ:
        from jointface.train.distributed import launch_command

        if config.batch_size % nproc:
            raise CliError(f"a batch of {config.batch_size} photos cannot be split over {nproc} processes: make "
                           "people_per_batch x images_per_person a multiple of --nproc")
        raise typer.Exit(subprocess.call(launch_command(nproc, sys.argv[1:])))
    config = config.replace(training_command="jointface " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
                            progress=err.is_terminal)
    try:
        result = run_training(config)
    except FloatingPointError as exc:
        raise CliError(str(exc)) from exc
    out.print(json.dumps({"weights": str(result.weights), "step": result.step, "epoch": result.epoch,
                          "metrics": result.metrics}, indent=2, default=str), markup=False)
    if export is not None:
        export.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(result.weights, export)
        err.print(f"weights copied to {export}", markup=False)


@handle_errors
def train_v2(
    ctx: typer.Context,
    config_path: Path = typer.Argument(..., help="A v2 training config (jointface/configs/v2_*.json)."),
    out_dir: Optional[Path] = typer.Option(None, "--out", help="Run folder (default: the config's out_dir); "
                                                              "an interrupted run there resumes."),
    max_steps: Optional[int] = typer.Option(None, "--max-steps", min=1, help="Train until this step."),
) -> None:
    """Train the v2 joint network on teacher-labelled collections (`preprocess --all-faces`); resumes."""
    from dataclasses import replace

    from jointface.train.modes import run_for
    from jointface.train.v2 import TrainConfigV2

    if not config_path.is_file():
        raise CliError(f"{config_path}: no such config file")
    try:
        config = TrainConfigV2.load(config_path)
    except (ValueError, TypeError) as exc:
        raise CliError(f"{config_path}: not a v2 training config ({exc})") from exc
    config = replace(config, **{k: v for k, v in {"out_dir": str(out_dir) if out_dir else None,
                                                  "max_steps": max_steps,
                                                  "num_threads": settings(ctx).threads}.items() if v is not None})
    if "lfw" not in config.labels:
        raise CliError(f"{config_path}: its labels must include lfw (the leak guard's reference)")
    try:
        result = run_for(config).run()
    except KeyboardInterrupt:
        raise typer.Exit(130)
    except FloatingPointError as exc:
        raise CliError(str(exc)) from exc
    out.print(json.dumps(result, indent=2, default=str), markup=False)


@handle_errors
def quantize(
    photos: list[Path] = typer.Argument(..., help="Photos (or folders) of faces to calibrate on: training "
                                                  "photos, never test ones. A `jointface organize` output "
                                                  "folder gives its training photos only."),
    weights: Optional[Path] = typer.Option(None, "--weights", help="Weights file (default: the shipped or "
                                                                   "$JOINTFACE_WEIGHTS weights)."),
    count: int = typer.Option(64, "--count", min=8, help="How many photos to calibrate on (evenly spaced)."),
    out_path: Optional[Path] = typer.Option(None, "--out", help="Where to write the model (default: beside the "
                                                                "weights, NAME.int8.onnx, where "
                                                                "--engine jointface-int8 finds it); a v2 "
                                                                "network's identity head goes beside it, "
                                                                "NAME.int8-head.onnx."),
    size: Optional[list[str]] = typer.Option(None, "--size", help="Calibration size, repeatable: a shorter side "
                                                                  "in px the photos are resized to, or 'photo' "
                                                                  "for the photos as they are (default: "
                                                                  "jointface.engines.joint_engine."
                                                                  "CALIBRATION_SIZES)."),
) -> None:
    """Quantise the joint network to int8 for --engine jointface-int8 (calibrated on photos of faces)."""
    from jointface.engines.joint_engine import CALIBRATION_SIZES, quantize_weights
    from jointface.imageio import list_images

    sizes: list[int | None] = []
    for given in size or []:
        if given == "photo":
            sizes.append(None)
        elif given.isdigit() and 32 <= int(given) <= 4096:
            sizes.append(int(given))
        else:
            raise CliError(f"--size {given!r}: give a shorter side in px (32-4096) or 'photo'")

    paths = []
    for given in photos:
        listing = given / "train.jsonl"
        if given.is_dir() and listing.is_file():  # organised training data: its train split, never its test one
            from jointface.train.data import load_class_names, load_records

            try:
                paths += [record.image_path for record in load_records(given, "train", load_class_names(given))]
            except (OSError, ValueError, KeyError, TypeError) as exc:
                raise CliError(f"{listing}: not a `jointface organize` listing ({exc})") from exc
        else:
            paths += list_images([given])
    if not paths:
        raise CliError("no images found among the calibration photos")
    with progress_bar("calibrating") as progress:
        task = progress.add_task("calibrating", total=min(count, len(paths)), current="")
        try:
            summary = quantize_weights(weights, paths, count=count, out=out_path,
                                       sizes=tuple(sizes) or CALIBRATION_SIZES,
                                       progress=lambda done, total: progress.update(task, completed=done,
                                                                                    total=total))
        except ValueError as exc:
            raise CliError(str(exc)) from exc
    for message in summary["skipped"]:
        err.print(f"skipped: {message}", markup=False)
    out.print(f"int8 model of {summary['weights']} (version {summary['weights_version']}) written to "
              f"{summary['path']}: {summary['bytes'] / 1e6:.1f} MB, calibrated on {summary['photos']} photos "
              f"(sizes: {', '.join(map(str, summary['sizes']))}) at input sizes {summary['input_sizes']}",
              markup=False)
    head = summary.get("head")
    if head:
        out.print(f"its identity head's int8 model written to {head['path']}: {head['bytes'] / 1e6:.1f} MB, "
                  f"calibrated on the {head['faces']} faces found in those photos", markup=False)
    elif "head" in summary:
        err.print("no face found in the calibration photos: the identity head has no int8 model and runs in "
                  "fp32 torch", markup=False)


def _benchmark_engines() -> list[str]:
    from jointface.engines import default_engine_name

    return ["dlib", "jointface"] if default_engine_name() == "jointface" else ["dlib"]
