"""Per-image inspection: every fault gets its reason, every oddity becomes a TF-decodable RGB JPEG."""

from __future__ import annotations

import io
import struct
import warnings
import zlib

import numpy as np
import pytest
from PIL import Image, ImageFile

from tasks.data import images
from tasks.common.files import sha256_bytes
from tasks.data.images import (
    MAX_PIXELS,
    MAX_SIDE,
    inspect_and_store,
    inspect_bytes,
    inspect_image,
    jpeg_frame_marker,
    jpeg_is_complete,
)
from tests.imagegen import FAULTS, ODDITIES, SIZE, image_bytes, long_jpeg


@pytest.fixture(scope="module")
def tf():
    """TensorFlow's own decoders are the judge of "decodable", so the tests use them."""
    import tensorflow

    return tensorflow


def _assert_tf_rgb(tf, data: bytes, width: int, height: int) -> None:
    """Both decoders the pipeline may use give (height, width, 3) without being asked for 3 channels."""
    for decoded in (tf.io.decode_jpeg(data), tf.io.decode_image(data, expand_animations=False)):
        assert tuple(decoded.shape) == (height, width, 3)


def _png(pixels: np.ndarray, **save) -> bytes:
    """PNG of an array; Pillow infers the mode (uint8 x4 -> RGBA, uint16 -> I;16)."""
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG", **save)
    return buffer.getvalue()


def _png_header_only(width: int, height: int) -> bytes:
    """A valid PNG signature and IHDR claiming `width` x `height`, followed by garbage pixel data."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = lambda kind, body: struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", b"garbage") + chunk(b"IEND", b"")


@pytest.mark.parametrize("name", sorted(FAULTS))
def test_every_fault_gets_its_reason(tmp_path, name):
    factory, status, reason = FAULTS[name]
    data = factory()
    path = tmp_path / name
    path.write_bytes(data)

    row = inspect_image(path)

    assert (row["status"], row["reason"]) == (status, reason)
    assert (row["sha256"], row["bytes"]) == (sha256_bytes(data), len(data))
    assert row["converted_jpeg"] is None


@pytest.mark.parametrize("name", sorted(ODDITIES))
def test_every_oddity_is_converted_to_a_tf_decodable_rgb_jpeg(tmp_path, tf, name):
    data = ODDITIES[name]("dog")
    path = tmp_path / name
    path.write_bytes(data)

    row = inspect_image(path)

    assert (row["status"], row["reason"]) == ("ok", "")
    converted = row["converted_jpeg"]
    assert converted is not None
    with Image.open(io.BytesIO(converted)) as image:
        assert (image.format, image.mode, image.size) == ("JPEG", "RGB", (row["width"], row["height"]))
        assert images._orientation(image) == 1  # orientation applied once, not again by a reader
    _assert_tf_rgb(tf, converted, row["width"], row["height"])
    again = inspect_bytes(converted, "converted.jpg")  # the output is itself a plain JPEG
    assert (again["status"], again["converted_jpeg"]) == ("ok", None)


@pytest.mark.parametrize("name,fmt,mode", [
    ("png_bytes.jpg", "PNG", "RGB"), ("cmyk.jpg", "JPEG", "CMYK"),
    ("gray.jpg", "JPEG", "L"), ("rotated.jpg", "JPEG", "RGB"),
])
def test_format_and_mode_describe_the_source(name, fmt, mode):
    row = inspect_bytes(ODDITIES[name]("cat"), name)
    assert (row["format"], row["mode"]) == (fmt, mode)


def test_plain_jpeg_is_kept_as_it_is(tf):
    data = image_bytes("cat", 3)
    row = inspect_bytes(data, "cat.3.jpg")
    assert row["status"] == "ok" and row["converted_jpeg"] is None
    assert (row["format"], row["mode"], row["width"], row["height"]) == ("JPEG", "RGB", *SIZE)
    _assert_tf_rgb(tf, data, *SIZE)


def test_exif_rotation_swaps_width_and_height_and_turns_the_pixels():
    raw = ODDITIES["rotated.jpg"]("cat")  # orientation 6: stored 48x40, shown rotated 90 degrees clockwise
    with Image.open(io.BytesIO(raw)) as stored:
        assert stored.size == SIZE
        stored_pixels = np.asarray(stored.convert("RGB"), dtype=np.int16)

    row = inspect_bytes(raw, "rotated.jpg")

    assert (row["width"], row["height"]) == (SIZE[1], SIZE[0])
    upright = np.asarray(Image.open(io.BytesIO(row["converted_jpeg"])), dtype=np.int16)
    clockwise = np.rot90(stored_pixels, k=-1)
    assert np.abs(upright - clockwise).mean() < 8  # re-encoding noise only
    assert np.abs(upright - np.rot90(stored_pixels, k=1)).mean() > 20  # not the other way round


def test_bomb_is_refused_from_the_header_before_any_decoding(monkeypatch):
    decoded: list[str] = []
    original_load = ImageFile.ImageFile.load

    def recording_load(self):
        decoded.append(self.format)
        return original_load(self)

    monkeypatch.setattr(ImageFile.ImageFile, "load", recording_load)

    assert inspect_bytes(image_bytes("cat", 1), "control.jpg")["status"] == "ok"
    assert decoded == ["JPEG"]  # the spy sees real decodes

    decoded.clear()
    row = inspect_bytes(FAULTS["huge.png"][0](), "huge.png")
    assert (row["reason"], row["width"], row["height"]) == ("too_large", 5200, 5000)
    assert decoded == []


def test_bomb_with_garbage_pixels_is_too_large_not_undecodable():
    """Had the pixels been decoded first, this file would be 'undecodable'."""
    assert inspect_bytes(_png_header_only(20_000, 20_000), "bomb.png")["reason"] == "too_large"
    assert inspect_bytes(_png_header_only(64, 64), "small.png")["reason"] == "undecodable"


def test_pillow_bomb_guard_counts_as_too_large(monkeypatch):
    data = image_bytes("dog", 2)  # 48 x 40 = 1920 pixels
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 500)  # 2x exceeded: DecompressionBombError
    assert inspect_bytes(data, "a.jpg", max_pixels=10**12)["reason"] == "too_large"
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 1x exceeded: a warning, here an error
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        assert inspect_bytes(data, "a.jpg", max_pixels=10**12)["reason"] == "too_large"
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 2000)
    assert inspect_bytes(data, "a.jpg", max_pixels=10**12)["status"] == "ok"


def test_size_thresholds_are_inclusive_limits():
    data = image_bytes("cat", 4)  # 48 x 40
    assert inspect_bytes(data, "a.jpg", min_side=40)["status"] == "ok"
    assert inspect_bytes(data, "a.jpg", min_side=41)["reason"] == "too_small"
    assert inspect_bytes(data, "a.jpg", max_pixels=48 * 40)["status"] == "ok"
    assert inspect_bytes(data, "a.jpg", max_pixels=48 * 40 - 1)["reason"] == "too_large"
    assert inspect_bytes(data, "a.jpg", max_side=48)["status"] == "ok"
    assert inspect_bytes(data, "a.jpg", max_side=47)["reason"] == "too_large"
    assert inspect_bytes(long_jpeg(40, MAX_SIDE), "long.jpg")["status"] == "ok"  # 40 x 25,000 (FAULTS) is too_large


@pytest.mark.parametrize("mode, size, save", [
    ("RGB", (640, 480), {"quality": 1, "optimize": True}),  # a flat picture at the least data a JPEG can hold
    ("RGB", (640, 480), {"quality": 1, "progressive": True, "optimize": True}),
    ("RGB", (33, 17), {"quality": 95, "subsampling": 0}),
    ("L", (640, 480), {"quality": 1, "optimize": True}),
    ("CMYK", (64, 48), {"quality": 50}),
])
def test_whole_jpegs_of_every_kind_hold_the_data_their_header_promises(mode, size, save):
    """The floor that finds a JPEG cut short (FAULTS' short_data.jpg) is one bit per 8 x 8 block: whole files
    hold twice that even when flat (two bits: an empty DC difference and an end of block)."""
    buffer = io.BytesIO()
    Image.new(mode, size).save(buffer, format="JPEG", **save)
    assert jpeg_is_complete(buffer.getvalue())
    assert inspect_bytes(buffer.getvalue(), "whole.jpg", min_side=1)["status"] == "ok"


@pytest.mark.parametrize("name", ["readme.txt", "Thumbs.db", "script.py", "noextension"])
def test_image_bytes_under_a_non_image_name_are_not_images(name):
    assert inspect_bytes(image_bytes("cat", 5), name)["reason"] == "not_an_image"


def test_progressive_jpeg_is_converted_to_baseline(tf):
    buffer = io.BytesIO()
    Image.fromarray(np.full((40, 48, 3), 128, np.uint8)).save(buffer, format="JPEG", progressive=True)
    assert jpeg_frame_marker(buffer.getvalue()) == 0xC2

    row = inspect_bytes(buffer.getvalue(), "p.jpg")

    assert row["status"] == "ok" and jpeg_frame_marker(row["converted_jpeg"]) == 0xC0
    _assert_tf_rgb(tf, row["converted_jpeg"], 48, 40)


def test_jpeg_frame_marker_of_baseline_and_non_jpeg():
    assert jpeg_frame_marker(image_bytes("cat", 6)) == 0xC0
    assert jpeg_frame_marker(b"\xff\xd8garbage") is None
    assert jpeg_frame_marker(b"") is None


def test_transparency_is_composited_over_white(tf):
    pixels = np.zeros((40, 48, 4), np.uint8)
    pixels[..., 0] = 200
    pixels[:, 24:, 3] = 255  # left half fully transparent
    row = inspect_bytes(_png(pixels), "alpha.jpg")

    assert (row["status"], row["format"], row["mode"]) == ("ok", "PNG", "RGBA")
    out = np.asarray(Image.open(io.BytesIO(row["converted_jpeg"])))
    assert out[:, :20].mean() > 240  # white, not black
    assert out[:, 28:, 0].mean() > 180 and out[:, 28:, 1].mean() < 40
    _assert_tf_rgb(tf, row["converted_jpeg"], 48, 40)


def test_palette_gif_and_16_bit_png_are_converted(tf):
    gif = io.BytesIO()
    Image.fromarray(np.full((40, 48, 3), 90, np.uint8)).convert("P").save(gif, format="GIF")
    deep = _png(np.full((40, 48), 40_000, np.uint16))

    for data, fmt in ((gif.getvalue(), "GIF"), (deep, "PNG")):
        row = inspect_bytes(data, "odd.jpg")
        assert (row["status"], row["format"]) == ("ok", fmt)
        _assert_tf_rgb(tf, row["converted_jpeg"], 48, 40)
    grey = np.asarray(Image.open(io.BytesIO(inspect_bytes(deep, "d.png")["converted_jpeg"])))
    assert 140 < grey.mean() < 170  # 40000 / 257 ~ 156: scaled, not clipped to white


def test_inspect_and_store_writes_each_conversion_once(tmp_path):
    source = tmp_path / "gray.jpg"
    source.write_bytes(ODDITIES["gray.jpg"]("cat"))
    converted_dir = tmp_path / "converted"

    first = inspect_and_store((str(source), str(converted_dir), 32, MAX_PIXELS, MAX_SIDE))
    target = converted_dir / f"{first['sha256']}.jpg"
    assert first["converted_path"] == str(target) and "converted_jpeg" not in first
    stamp = target.stat().st_mtime_ns
    second = inspect_and_store((str(source), str(converted_dir), 32, MAX_PIXELS, MAX_SIDE))

    assert second == first and target.stat().st_mtime_ns == stamp
    assert [p.name for p in converted_dir.iterdir()] == [target.name]  # no temporary leftovers


def test_unreadable_file_is_a_per_image_fault(tmp_path):
    row = inspect_and_store((str(tmp_path / "vanished.jpg"), str(tmp_path / "converted"), 32, MAX_PIXELS, MAX_SIDE))
    assert (row["status"], row["reason"], row["converted_path"]) == ("quarantined", "undecodable", "")
    with pytest.raises(OSError):
        inspect_image(tmp_path / "vanished.jpg")
