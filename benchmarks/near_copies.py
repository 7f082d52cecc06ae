"""What the data audit calls a near-copy, measured: generated scenes, their copies, and look-alikes.

    python benchmarks/near_copies.py [--scenes 120] [--backbones vgg16:32 resnet50:32 resnet50:96] [--weights imagenet]

For each backbone (random weights by default, as on machines without ImageNet weights) it computes the
features of N distinct photo-like scenes (tests/imagegen.py `scene_pixels`, 96x72), of a
near-copy of a quarter of them per kind (re-encoded at JPEG quality 50, resized to 75% and 50%,
cropped by 5% and 10% a side), and of N generated cats and dogs (`class_pixels`: one hue and
texture per class, so distinct images look alike). The audit's own functions then say, per kind:

    found        the share of copies the audit pairs with their original (its rules, default floor)
    similarity   the smallest cosine similarity of a copy to its original (standardised features)
    ratio        the largest ratio of a copy's cosine distance to its original over its distance to
                 its 10th nearest image (the local rule finds it at <= 0.1)

and for distinct images (scenes, and the look-alike cats and dogs) the largest similarity, the
smallest ratio of an image's nearest distance to its 10th, and how many pairs the audit calls
copies among them. Numbers, not verdicts: the README quotes them ("The data audit").
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

KINDS = {"re-encoded q50": {"quality": 50}, "resized 75%": {"scale": 0.75}, "resized 50%": {"scale": 0.5},
         "cropped 5%": {"crop": 0.05}, "cropped 10%": {"crop": 0.10}}


def copy_bytes(pixels: np.ndarray, quality: int = 90, scale: float = 1.0, crop: float = 0.0) -> bytes:
    from tests.imagegen import jpeg_bytes

    if crop:
        height, width = pixels.shape[:2]
        dy, dx = round(height * crop), round(width * crop)
        pixels = np.ascontiguousarray(pixels[dy:height - dy, dx:width - dx])
    return jpeg_bytes(pixels, quality=quality, scale=scale)


def features(backbone: str, size: int, blobs: list[bytes], weights: str | None = None) -> np.ndarray:
    import keras

    from tasks.learning.extractor import feature_model
    from tasks.learning.pixels import decode_image

    keras.utils.set_random_seed(0)
    model = feature_model(backbone, weights, size)
    pixels = np.stack([decode_image(blob, size) for blob in blobs])
    return np.asarray(model.predict(pixels, batch_size=32, verbose=0), dtype=np.float32)


def measure(backbone: str, size: int, scenes: int, weights: str | None = None) -> None:
    from tasks.learning.embedding import embed, unit_rows
    from tasks.learning.neighbours import NEIGHBOURS, near_copy_pairs, nearest
    from tests.imagegen import class_pixels, jpeg_bytes, scene_pixels

    originals = [scene_pixels(seed) for seed in range(scenes)]
    copied = list(range(0, scenes, 4))
    blobs = [jpeg_bytes(pixels) for pixels in originals]
    family = {}
    for kind, settings in KINDS.items():
        for index in copied:
            family[len(blobs)] = (kind, index)
            blobs.append(copy_bytes(originals[index], **settings))
    look_alikes = [jpeg_bytes(class_pixels(("cat", "dog")[i % 2], 5000 + i)) for i in range(scenes)]
    started = time.perf_counter()
    matrix = features(backbone, size, blobs + look_alikes, weights)
    took = time.perf_counter() - started
    mixed, alike = matrix[:len(blobs)], matrix[len(blobs):]

    vectors = embed(mixed)
    pairs = {(i, j) for i, j, _ in near_copy_pairs(nearest(vectors))}
    unit = unit_rows(vectors)
    similarity = unit @ unit.T
    np.fill_diagonal(similarity, -np.inf)
    print(f"\n{backbone} at {size} px, {weights or 'random'} weights ({len(blobs) + len(look_alikes)} images, "
          f"{took:.1f} s):")
    print(f"  {'kind':16s} {'found':>7s} {'similarity':>11s} {'ratio':>6s}")
    tenth = 1.0 - np.sort(similarity, axis=1)[:, -NEIGHBOURS]
    for kind in KINDS:
        members = [(copy, source) for copy, (name, source) in family.items() if name == kind]
        found = np.mean([(min(copy, source), max(copy, source)) in pairs for copy, source in members])
        to_original = np.array([similarity[copy, source] for copy, source in members])
        ratios = [(1 - similarity[copy, source]) / max(tenth[copy], 1e-9) for copy, source in members]
        print(f"  {kind:16s} {found:7.0%} {to_original.min():11.3f} {max(ratios):6.3f}")
    distinct = similarity[:scenes, :scenes]
    alike_vectors = embed(alike)
    alike_unit = unit_rows(alike_vectors)
    alike_similarity = alike_unit @ alike_unit.T
    np.fill_diagonal(alike_similarity, -np.inf)
    for name, block, count in (("distinct scenes", distinct, sum(1 for i, j in pairs if j < scenes)),
                               ("look-alikes", alike_similarity, len(near_copy_pairs(nearest(alike_vectors))))):
        ordered = np.sort(block, axis=1)[:, ::-1]
        ratio = ((1 - ordered[:, 0]) / (1 - ordered[:, NEIGHBOURS - 1])).min()
        print(f"  {name:16s} {'pairs ' + str(count):>7s} {block.max():11.3f} {ratio:6.3f}")

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenes", type=int, default=120)
    parser.add_argument("--backbones", nargs="+", default=["vgg16:32", "resnet50:32", "resnet50:96"],
                        help="backbone:input size pairs")
    parser.add_argument("--weights", default=None,
                        help="imagenet or a weights file (one backbone), where they can be loaded; random by default")
    args = parser.parse_args()
    for spec in args.backbones:
        name, size = spec.split(":")
        measure(name, int(size), args.scenes, args.weights)


if __name__ == "__main__":
    main()
