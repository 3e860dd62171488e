"""The P2 proxy (first 150 LFW P2 people, first photo enrolled, the others probes) read four ways, to see what the
training run's validation leaves out: dlib's landmark boxes on the photo letterboxed to 192 or 256 px (the
validation's way is 192), and the engine's own detections (the face nearest the landmark box) at its automatic
input size or at a fixed one.

    python benchmarks/joint_v2/crops/proxy_paths.py WEIGHTS [LFW_LABELS]

Prints one line of rank-1 figures (LFW_LABELS: the every-face labels of `jointface preprocess --all-faces`,
default runs/labels/lfw.jsonl).
"""

from __future__ import annotations

import sys

import numpy as np
import torch

from jointface.engines.joint_engine import JointEngine
from jointface.imageio import load_image
from jointface.train.v2 import embed_boxes, p2_proxy_set, proxy_rank1


def rank1(proxy, embeddings) -> float:
    return proxy_rank1([person for person, _, _ in proxy], embeddings)[0]


def engine_embeddings(engine: JointEngine, images, proxy) -> list[np.ndarray]:
    out = []
    for image, (_, _, box) in zip(images, proxy):
        faces = engine.detect(image)
        if not faces:
            out.append(np.zeros(engine.dim, dtype=np.float32))  # a miss counts as wrong
            continue
        centre = (np.array(box[:2]) + np.array(box[2:])) / 2
        nearest = min(faces, key=lambda f: np.linalg.norm((np.array(f.box[:2]) + np.array(f.box[2:])) / 2 - centre))
        out.append(nearest.embedding)
    return out


def main(argv: list[str]) -> None:
    weights = argv[0]
    labels = argv[1] if len(argv) > 1 else "runs/labels/lfw.jsonl"
    torch.set_num_threads(1)
    proxy = p2_proxy_set(labels, 150)
    images = [load_image(path) for _, path, _ in proxy]
    auto = JointEngine(weights, runtime="torch")
    figures = {f"landmark boxes @{size}": rank1(proxy, [embed_boxes(auto.model, image, [box], size)[0]
                                                        for image, (_, _, box) in zip(images, proxy)])
               for size in (192, 256)}
    figures[f"engine @auto ({auto.network_input_size(250)} for LFW)"] = rank1(proxy, engine_embeddings(auto, images, proxy))
    figures["engine @192"] = rank1(proxy, engine_embeddings(JointEngine(weights, runtime="torch", input_size=192),
                                                            images, proxy))
    print(weights, {k: round(v, 3) for k, v in figures.items()})


if __name__ == "__main__":
    main(sys.argv[1:])
