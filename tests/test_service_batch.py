"""Batched detection in `search`: same answers as one photo at a time, in input order, failures kept in place."""

from pathlib import Path

import numpy as np
import pytest

from index import Gallery
from jointface.engines import get_engine
from jointface.engines.base import Engine, Face
from jointface.imageio import load_image, resize_shorter_side
from jointface.service import detect_grouped, search


pytestmark = pytest.mark.usefixtures("one_torch_thread")


class CountingEngine(Engine):
    """Finds one 'face' per image whose embedding encodes the image's mean colour; counts the calls."""

    name, version, dim = "counting", "1", 4
    default_threshold = 0.5

    def __init__(self):
        self.batches: list[int] = []

    def detect(self, image):
        self.batches.append(1)
        return self._faces(image)

    def detect_batch(self, images):
        self.batches.append(len(images))
        return [self._faces(image) for image in images]

    def _faces(self, image):
        vector = np.array([*image.reshape(-1, 3).mean(axis=0), 1.0], dtype=np.float32)
        return [Face(box=(0.0, 0.0, float(image.shape[1]), float(image.shape[0])), score=0.9,
                     embedding=vector / np.linalg.norm(vector), engine=self.name, engine_version=self.version)]


def test_detect_grouped_batches_only_same_size_images_and_keeps_order():
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 255, shape, dtype=np.uint8) for shape in
              [(40, 30, 3), (50, 50, 3), (40, 30, 3), (40, 30, 3), (50, 50, 3), (20, 20, 3)]]
    engine = CountingEngine()
    grouped = detect_grouped(engine, images)
    assert sorted(engine.batches) == [1, 2, 3]  # sizes: three 40x30, two 50x50, one 20x20
    for image, faces in zip(images, grouped):
        assert faces[0].box[2:] == (image.shape[1], image.shape[0])
        assert np.allclose(faces[0].embedding, CountingEngine()._faces(image)[0].embedding)


def test_search_batched_equals_one_at_a_time_with_the_joint_engine(lfw_dir, tmp_path):
    people = sorted(p for p in lfw_dir.iterdir() if p.is_dir())[:60:6]
    paths = [sorted(p.glob("*.jpg"))[0] for p in people]
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not a jpeg")
    paths.insert(3, broken)
    small = tmp_path / "small.png"  # another size: its own batch
    from PIL import Image

    Image.fromarray(resize_shorter_side(load_image(paths[0]), 180)).save(small)
    paths.insert(6, small)
    engine = get_engine("jointface")
    with Gallery.open(tmp_path / "home") as gallery:
        one = list(search(gallery, engine, paths, threshold=0.5, batch_size=1))
        batched = list(search(gallery, engine, paths, threshold=0.5, batch_size=8))
    assert [r.image for r, _ in one] == [r.image for r, _ in batched] == [Path(p) for p in paths]
    for (single, _), (together, image) in zip(one, batched):
        assert (single.error is None) == (together.error is None)
        if single.error:
            assert "broken.jpg" in together.error and image is None
            continue
        assert len(single.faces) == len(together.faces) >= 1
        for a, b in zip(single.faces, together.faces):
            assert np.allclose(a.box, b.box, atol=0.5) and abs(a.score - b.score) < 1e-3


def test_enroll_batched_equals_one_at_a_time_and_keeps_input_order(lfw_dir, tmp_path):
    from jointface.service import ENROLLED, FAILED, SKIPPED, enroll

    people = sorted(p for p in lfw_dir.iterdir() if p.is_dir())[:45:5]
    items = [(p.name, sorted(p.glob("*.jpg"))[0]) for p in people]
    items.insert(2, ("Someone", tmp_path / "missing.jpg"))
    items.insert(5, items[4])  # the same photo twice in one detection group: the second is skipped
    engine = get_engine("jointface")
    reports, answers = {}, {}
    for detect_batch in (1, 8):
        with Gallery.open(tmp_path / f"home{detect_batch}") as gallery:
            reports[detect_batch] = enroll(gallery, engine, items, choice="best", detect_batch=detect_batch,
                                           batch_size=3)
            results = list(search(gallery, engine, [path for _, path in items if path.exists()], threshold=0.0,
                                  top_k=1))
            answers[detect_batch] = [(face.identity, round(face.similarity, 4)) for r, _ in results
                                     for face in r.faces[:1]]
    one, batched = reports[1], reports[8]
    assert [o.path for o in batched.outcomes] == [Path(path) for _, path in items]  # input order
    assert [o.status for o in one.outcomes] == [o.status for o in batched.outcomes]
    assert batched.outcomes[2].status == FAILED
    # the copy shares the fate of its original: skipped when that was enrolled, the same failure otherwise
    original, copy = batched.outcomes[4], batched.outcomes[5]
    assert (original.status, copy.status) in ((ENROLLED, SKIPPED), (FAILED, FAILED))
    assert [o.message for o in one.outcomes] == [o.message for o in batched.outcomes]
    assert answers[1] == answers[8]  # the same embeddings were stored


@pytest.mark.parametrize("orientation", [1, 6])
def test_reduced_decoding_gives_full_size_boxes(knn_dir, tmp_path, orientation):
    """A 3000 px camera-like JPEG searched with draft decoding: the same faces, boxes in full-size pixels."""
    from PIL import Image

    photo = Image.open(knn_dir / "test" / "obama_and_biden.jpg").convert("RGB")
    big = photo.resize((3000, round(3000 * photo.height / photo.width)), Image.Resampling.BICUBIC)
    if orientation == 6:  # stored rotated, with the EXIF tag saying so: upright is the original again
        big = big.transpose(Image.Transpose.ROTATE_90)
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = tmp_path / "big.jpg"
    big.save(path, quality=92, exif=exif)
    engine = get_engine("jointface")
    with Gallery.open(tmp_path / "home") as gallery:
        (full, full_image), = search(gallery, engine, [path], threshold=0.5)
        (reduced, reduced_image), = search(gallery, engine, [path], threshold=0.5, reduced_decoding=True)
    assert full_image.shape[1] == 3000 and max(reduced_image.shape[:2]) == engine.max_useful_side
    assert full.size == reduced.size == (full_image.shape[1], full_image.shape[0])
    assert len(full.faces) == len(reduced.faces) >= 2
    for a, b in zip(sorted(full.faces, key=lambda f: f.box), sorted(reduced.faces, key=lambda f: f.box)):
        width = a.box[2] - a.box[0]
        assert np.allclose(a.box, b.box, atol=0.05 * width)  # within 5% of the face size, in full-size pixels
