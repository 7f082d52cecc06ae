"""The one input pipeline: identical pixels for every consumer, uint8 batches in order, bad files alone."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from tasks.learning.pixels import MAX_PIXELS, Decoder, ImageError, decode_image, read_image, resize_pixels
from tests.imagegen import class_pixels, huge_png, image_bytes, truncated_jpeg



def _jpeg(pixels: np.ndarray, quality: int = 95) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def test_decode_resizes_to_a_square_uint8_rgb_array():
    pixels = decode_image(image_bytes("cat", 1), 32)
    assert pixels.shape == (32, 32, 3) and pixels.dtype == np.uint8
    red, _, blue = pixels.reshape(-1, 3).mean(axis=0)
    assert red > blue  # cats are warm: the colours survive decoding and resizing


def test_at_native_size_the_pixels_are_pillows_decode():
    data = image_bytes("dog", 3, size=(32, 32))
    expected = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    np.testing.assert_array_equal(decode_image(data, 32), expected)


def test_orientation_grey_cmyk_png_and_alpha_all_become_upright_rgb():
    upright = decode_image(image_bytes("cat", 1, size=(40, 20)), 16)
    rotated = decode_image(image_bytes("cat", 1, size=(40, 20), exif_orientation=6), 16)
    assert not np.array_equal(upright, rotated)  # orientation 6 turns the stored landscape upright
    for data in (image_bytes("dog", 2, mode="L"), image_bytes("dog", 2, mode="CMYK"), image_bytes("dog", 2, fmt="PNG")):
        assert decode_image(data, 16).shape == (16, 16, 3)
    transparent = io.BytesIO()
    Image.new("RGBA", (20, 20), (0, 0, 0, 0)).save(transparent, format="PNG")
    assert decode_image(transparent.getvalue(), 8).min() == 255  # transparency over white, as training saw it


def test_large_jpegs_are_downscaled_in_the_dct_domain_and_match_a_full_decode(monkeypatch):
    big = np.kron(class_pixels("dog", 7, size=(64, 48)), np.ones((8, 8, 1), dtype=np.uint8))  # 512 x 384
    data = _jpeg(big)
    drafted = []
    from PIL.JpegImagePlugin import JpegImageFile

    original = JpegImageFile.draft
    monkeypatch.setattr(JpegImageFile, "draft", lambda self, mode, size: drafted.append(original(self, mode, size)))
    fast = decode_image(data, 48)
    assert drafted and drafted[0] is not None  # the decoder really scaled by 1/2..1/8 while decoding
    decode_image(_jpeg(class_pixels("cat", 8, size=(60, 60))), 48)
    assert len(drafted) == 1  # not for a source less than twice the target
    monkeypatch.undo()
    full = np.asarray(Image.open(io.BytesIO(data)).convert("RGB").resize((48, 48), Image.Resampling.BILINEAR))
    assert np.abs(fast.astype(int) - full.astype(int)).mean() < 4.0  # the same picture, a few levels apart


@pytest.mark.parametrize("data, words", [
    (b"", "empty"),
    (b"this is not an image", "not an image"),
    (truncated_jpeg(), "cannot be decoded"),
])
def test_bad_bytes_are_an_image_error_with_the_reason(data, words):
    with pytest.raises(ImageError, match=words):
        decode_image(data, 16)


def test_an_oversized_image_is_refused_from_its_header():
    with pytest.raises(ImageError, match="above the limit"):
        decode_image(huge_png(6000, 5000), 32)  # 30 MP > 25 MP, refused before decoding
    assert MAX_PIXELS == 25_000_000


def test_resize_pixels_is_the_same_resize():
    array = class_pixels("cat", 4, size=(48, 40))
    via_pixels = resize_pixels(array, 24)
    via_bytes = np.asarray(Image.fromarray(array).resize((24, 24), Image.Resampling.BILINEAR))
    np.testing.assert_array_equal(via_pixels, via_bytes)


def test_a_missing_file_is_an_image_error(tmp_path):
    with pytest.raises(ImageError, match="cannot read"):
        read_image(tmp_path / "missing.jpg", 16)


@pytest.mark.parametrize("processes", [False, True])
def test_decoder_yields_ordered_uint8_batches_and_fails_bad_files_alone(tmp_path, processes):
    paths = []
    for index in range(11):
        path = tmp_path / f"{index}.jpg"
        path.write_bytes(b"garbage" if index == 5 else image_bytes("cat" if index % 2 else "dog", index))
        paths.append(path)
    with Decoder(16, 4, workers=2, processes=processes) as decoder:
        batches = [(batch.start, batch.pixels.copy(), list(batch.errors)) for batch in decoder.batches(paths)]
        again = [batch.pixels.copy() for batch in decoder.batches(paths[:3])]  # the workers are reused
    assert [start for start, _, _ in batches] == [0, 4, 8]
    assert [len(errors) for _, _, errors in batches] == [4, 4, 3]
    pixels = np.concatenate([p for _, p, _ in batches])
    errors = [e for _, _, batch_errors in batches for e in batch_errors]
    assert pixels.dtype == np.uint8 and pixels.shape == (11, 16, 16, 3)
    assert [bool(e) for e in errors] == [i == 5 for i in range(11)] and "not an image" in errors[5]
    assert not pixels[5].any()  # the failed row is zeros, the batch is not lost
    for index in (0, 3, 10):
        np.testing.assert_array_equal(pixels[index], read_image(paths[index], 16))
    np.testing.assert_array_equal(np.concatenate(again), pixels[:3])
