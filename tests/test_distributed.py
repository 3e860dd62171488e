"""Data-parallel training (torch.distributed, gloo on CPU): 2 processes against 1 with the same global batch.

Real training runs of the tiny config on a few LFW photos (the shared data
must be present: without it these tests fail). The 2-process runs go
through ``jointface train --nproc 2`` (torchrun).
"""

from __future__ import annotations

import csv
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from jointface.train import distributed
from jointface.train.config import tiny_config
from jointface.train.distributed import DistContext
from test_train import lfw_split, mini_lfw, organised  # noqa: F401  (module fixtures: the organised photos)

STEPS = 8


def losses(run_dir) -> dict[int, float]:
    with open(run_dir / "steps.csv", newline="") as handle:
        return {int(row["step"]): float(row["total"]) for row in csv.DictReader(handle)}


def train_cli(tmp_path, data_dir, out_dir, nproc: int, max_steps: int) -> subprocess.CompletedProcess:
    # No mosaics: every photo holds one face, so each rank's per-face means average to the global mean.
    # All steps inside the linear warm-up: the learning rate of a step does not depend on max_steps, so a run
    # stopped by max_steps=4 and resumed to 8 follows the same schedule as a straight run to 8 (the cosine
    # part's length is taken from the first run's max_steps, in one process too).
    config = tiny_config(people_per_batch=4, images_per_person=2, max_steps=max_steps, validate=False,
                         warmup_steps=2 * STEPS, epochs=4, mosaic_probability=0.0)
    path = tmp_path / f"config-{out_dir.name}-{max_steps}.json"
    config.save(path)
    command = [sys.executable, "-m", "cli.app", "--threads", "1", "train", "--config", str(path),
               "--data", str(data_dir), "--out", str(out_dir)]
    if nproc > 1:
        command += ["--nproc", str(nproc)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, capture_output=True, text=True, timeout=900, env=env,
                            cwd=os.path.dirname(os.path.dirname(__file__)))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def test_two_processes_follow_one_process_and_resume(organised, tmp_path):  # noqa: F811
    data_dir, _, _ = organised
    one = tmp_path / "one"
    two = tmp_path / "two"
    train_cli(tmp_path, data_dir, one, 1, STEPS)
    result = train_cli(tmp_path, data_dir, two, 2, STEPS)
    # Averaged gradients keep every rank's weights identical (rank 0 prints the checksum spread at the end).
    spread = float(result.stdout.split("ranks in sync: largest parameter checksum difference over 2 processes ")[1]
                   .split()[0])
    assert spread < 1e-6, spread
    single, double = losses(one), losses(two)
    assert sorted(single) == sorted(double) == list(range(1, STEPS + 1))
    a = np.array([single[s] for s in sorted(single)])
    b = np.array([double[s] for s in sorted(double)])
    difference = np.abs(a - b) / np.abs(a)
    print(f"\n1 process: {np.round(a, 3).tolist()}\n2 processes: {np.round(b, 3).tolist()}\n"
          f"relative difference per step: {np.round(difference, 3).tolist()}")
    # Same images, same start, averaged gradients: the trajectories agree up to per-shard BatchNorm statistics
    # and per-shard triplet mining.
    assert difference[0] < 0.10 and difference.mean() < 0.15, difference
    # One writer: only rank 0's files, one exported weights file that loads.
    for name in ("config.json", "model_record.json", "steps.csv", "checkpoints/last.pt", "jointface.pt"):
        assert (two / name).is_file(), name
    weights = torch.load(two / "jointface.pt", weights_only=True)
    assert weights["training"]["step"] == STEPS

    # Resume: 2 processes stopped at step 4 then resumed to 8 give the straight 2-process losses.
    resumed = tmp_path / "resumed"
    train_cli(tmp_path, data_dir, resumed, 2, STEPS // 2)
    train_cli(tmp_path, data_dir, resumed, 2, STEPS)
    again = losses(resumed)
    assert sorted(again) == list(range(1, STEPS + 1))
    assert [again[s] for s in range(1, STEPS + 1)] == pytest.approx([double[s] for s in range(1, STEPS + 1)],
                                                                       rel=1e-4, abs=1e-5)


def _linear_worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      GLOO_SOCKET_IFNAME="lo")
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    context = DistContext(rank, world)
    _train_linear(context, out if rank == 0 else None)
    # the product's teardown: a barrier, then destroy (destroying at once let one rank tear gloo down while
    # the other still used it: "terminate called without an active exception", SIGABRT, 1 run in 3 here)
    distributed.cleanup(context)


def _train_linear(context: DistContext, out: str | None) -> None:
    """5 SGD steps of a linear model on fixed batches of 8, sharded over the ranks."""
    torch.manual_seed(0)
    model = torch.nn.Linear(6, 3)
    if context.rank:  # a different start on rank 1: the broadcast must fix it
        torch.nn.init.normal_(model.weight)
    distributed.broadcast_parameters([model], context)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    data = torch.randn(5, 8, 6, generator=torch.Generator().manual_seed(1))
    target = torch.randn(5, 8, 3, generator=torch.Generator().manual_seed(2))
    for step in range(5):
        [rows] = distributed.shard([list(range(8))], context)
        loss = ((model(data[step, rows]) - target[step, rows]) ** 2).mean()
        optimizer.zero_grad()
        loss.backward()
        distributed.average_gradients(model.parameters(), context)
        optimizer.step()
    if out:
        torch.save({k: v.clone() for k, v in model.state_dict().items()}, out)


def test_sharding_and_gradient_averaging_equal_one_process(tmp_path):
    """Exact: for a mean loss, 2 ranks on half batches with averaged gradients = 1 process on the whole batch."""
    single = tmp_path / "single.pt"
    _train_linear(DistContext(), str(single))
    double = tmp_path / "double.pt"
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    torch.multiprocessing.spawn(_linear_worker, args=(2, port, str(double)), nprocs=2, join=True)
    a, b = torch.load(single), torch.load(double)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6)
    # The shards of a batch are disjoint, in order, and together the batch.
    batch = [[(i, 100 + i) for i in range(8)]]
    parts = [distributed.shard(batch, DistContext(r, 2))[0] for r in range(2)]
    assert parts[0] + parts[1] == batch[0]
    with pytest.raises(ValueError, match="multiple of --nproc"):
        distributed.shard([[1, 2, 3]], DistContext(0, 2))
