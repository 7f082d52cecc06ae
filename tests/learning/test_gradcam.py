"""Grad-CAM looks where the class is decided, on each backend with its own gradient API, through the served wrappers."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from tasks.learning.gradcam import GradCam, explain_files, region_mass
from tests.fake_training import REGION, region_model, region_pixels

pytestmark = pytest.mark.backends  # runs on TensorFlow and again on JAX (see README's test command)


@pytest.fixture(scope="module")
def model():
    return region_model()


def test_the_heatmap_mass_lies_in_the_deciding_region(model):
    from tasks.learning.layers import wrap

    labels = ["dog", "cat", "dog", "cat"]
    pixels = np.stack([region_pixels(label, seed) for seed, label in enumerate(labels)])
    classes = np.array([label == "dog" for label in labels], dtype=int)
    served = wrap(model, tta=True, temperature=1.7)  # the served shape: the core explained inside it
    for explained in (model, served):
        heat = GradCam(explained).heatmaps(pixels, classes)
        assert heat.shape == (4, 32, 32) and heat.max() == pytest.approx(1.0)
        masses = [region_mass(one, *REGION) for one in heat]
        assert min(masses) >= 0.6, masses
    # asked about the other class, the region holds nothing for it: the map is empty, not made up
    assert GradCam(model).heatmaps(pixels[:1], np.array([0])).max() == 0.0


def test_explained_files_get_overlays_and_an_unreadable_one_its_reason(model, tmp_path):
    paths = []
    for index, label in enumerate(["dog", "cat"]):
        path = tmp_path / f"{index}.png"
        Image.fromarray(region_pixels(label, 10 + index)).save(path)
        paths.append(path)
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not an image")
    rows = explain_files(model, [*paths, broken], tmp_path / "explained")
    assert [row["predicted"] for row in rows[:2]] == ["dog", "cat"] and rows[0]["probability"] > 0.5
    for row in rows[:2]:
        with Image.open(row["overlay"]) as overlay:
            assert overlay.size == (192, 192) and overlay.mode == "RGB"
    assert rows[2]["overlay"] == "" and rows[2]["error"]


def test_a_model_without_a_backbone_is_refused_with_a_reason():
    import keras

    inputs = keras.Input(shape=(8, 8, 3))
    flat = keras.Model(inputs, keras.layers.Dense(1)(keras.layers.GlobalAveragePooling2D()(inputs)))
    with pytest.raises(ValueError, match="no backbone"):
        GradCam(flat)
