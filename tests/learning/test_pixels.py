"""The one input pipeline: identical pixels for every consumer, uint8 batches in order, bad files alone.

Each behaviour is checked with both decoders (Pillow and OpenCV); where they differ on purpose
(the resize), the difference is measured and bounded.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from benchmarks.photos import photo
from tasks.common.errors import ConfigError
from tasks.learning import pixels as pipeline
from tasks.learning.pixels import (
    DECODERS,
    MAX_PIXELS,
    Decoder,
    ImageError,
    decode_image,
    read_image,
    resize_pixels,
    resolve_decoder,
)
from tests.imagegen import class_pixels, huge_png, image_bytes, short_data_jpeg, tall_png, truncated_jpeg

both = pytest.mark.parametrize("decoder", DECODERS)


def _jpeg(pixels: np.ndarray, quality: int = 95, **kwargs) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=quality, **kwargs)
    return buffer.getvalue()


def _mean_gap(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(int) - b.astype(int)).mean())


def test_auto_is_opencv_where_installed_and_a_named_decoder_must_be_installed(monkeypatch):
    assert resolve_decoder("auto") == "opencv"  # opencv-python-headless is a dependency of the project
    assert resolve_decoder("pillow") == "pillow" and resolve_decoder("opencv") == "opencv"
    with pytest.raises(ConfigError, match="--decoder"):
        resolve_decoder("turbojpeg")
    monkeypatch.setattr(pipeline, "_opencv", lambda: None)  # a host without OpenCV
    assert resolve_decoder("auto") == "pillow"
    with pytest.raises(ConfigError, match="pip install opencv-python-headless"):
        resolve_decoder("opencv")


@both
def test_decode_resizes_to_a_square_uint8_rgb_array(decoder):
    pixels = decode_image(image_bytes("cat", 1), 32, decoder=decoder)
    assert pixels.shape == (32, 32, 3) and pixels.dtype == np.uint8
    red, _, blue = pixels.reshape(-1, 3).mean(axis=0)
    assert red > blue  # cats are warm: the colours survive decoding and resizing (and OpenCV's BGR is turned)


@both
def test_at_native_size_the_pixels_are_the_jpeg_decode_itself(decoder):
    data = image_bytes("dog", 3, size=(32, 32))
    expected = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    np.testing.assert_array_equal(decode_image(data, 32, decoder=decoder), expected)  # one libjpeg-turbo decode


@both
def test_orientation_grey_cmyk_png_gif_16_bit_and_alpha_all_become_upright_rgb(decoder):
    upright = decode_image(image_bytes("cat", 1, size=(40, 20)), 16, decoder=decoder)
    rotated = decode_image(image_bytes("cat", 1, size=(40, 20), exif_orientation=6), 16, decoder=decoder)
    assert not np.array_equal(upright, rotated)  # orientation 6 turns the stored landscape upright
    for data in (image_bytes("dog", 2, mode="L"), image_bytes("dog", 2, mode="CMYK"), image_bytes("dog", 2, fmt="PNG"),
                 image_bytes("dog", 2, fmt="GIF"), image_bytes("dog", 2, fmt="PNG", mode="I;16"),
                 image_bytes("dog", 2, fmt="PNG", mode="RGBA")):
        assert decode_image(data, 16, decoder=decoder).shape == (16, 16, 3)
    transparent = io.BytesIO()
    Image.new("RGBA", (20, 20), (0, 0, 0, 0)).save(transparent, format="PNG")
    assert decode_image(transparent.getvalue(), 8, decoder=decoder).min() == 255  # transparency over white


@pytest.mark.parametrize("orientation", range(1, 9))
def test_opencv_applies_every_exif_orientation_as_pillow_does(orientation):
    """All eight EXIF orientations give the picture Pillow gives, at full and at reduced decode."""
    pixels = class_pixels("cat", 5, size=(120, 60))
    pixels[:20, :30] = (0, 255, 0)  # a green corner that a wrong turn or flip moves far away
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = _jpeg(pixels, exif=exif.tobytes())
    for size in (40, 24):  # 60 >= 2 x 24: the reduced decode (IMREAD_REDUCED_COLOR_2) must orient too
        pillow, opencv = (decode_image(data, size, decoder=name) for name in ("pillow", "opencv"))
        assert _mean_gap(pillow, opencv) < 4.0, (orientation, size)
        assert _mean_gap(pillow, decode_image(_jpeg(pixels), size, decoder="pillow")) > 8 or orientation == 1


@both
def test_large_jpegs_are_downscaled_while_decoding_and_match_a_full_decode(decoder, monkeypatch):
    big = np.kron(class_pixels("dog", 7, size=(64, 48)), np.ones((8, 8, 1), dtype=np.uint8))  # 512 x 384
    data = _jpeg(big)
    scales = []
    if decoder == "pillow":
        from PIL.JpegImagePlugin import JpegImageFile

        original = JpegImageFile.draft
        monkeypatch.setattr(JpegImageFile, "draft",
                            lambda self, mode, size: scales.append(original(self, mode, size)[1][2] and
                                                                   self.decoderconfig[0]))
    else:
        cv2 = pipeline._opencv()
        imdecode = cv2.imdecode
        reduced = {cv2.IMREAD_COLOR: 1, cv2.IMREAD_REDUCED_COLOR_2: 2, cv2.IMREAD_REDUCED_COLOR_4: 4,
                   cv2.IMREAD_REDUCED_COLOR_8: 8}
        monkeypatch.setattr(cv2, "imdecode", lambda buffer, flags: scales.append(reduced[flags]) or
                            imdecode(buffer, flags))
    fast = decode_image(data, 48, decoder=decoder)
    assert scales == [8]  # 384 >= 8 x 48: decoded at 64 x 48 in the DCT domain
    decode_image(_jpeg(class_pixels("cat", 8, size=(60, 60))), 48, decoder=decoder)
    assert scales in ([8], [8, 1])  # not for a source less than twice the target
    monkeypatch.undo()
    full = resize_pixels(np.asarray(Image.open(io.BytesIO(data)).convert("RGB")), 48, decoder=decoder)
    assert _mean_gap(fast, full) < 4.0  # the same picture, a few levels apart


def test_opencv_pixels_are_within_a_level_of_pillows_on_photos():
    """The two decoders differ only in the resize: measured on photo-like 500x375 JPEGs at 224 px and 32 px.

    Both decode with libjpeg-turbo (identical pixels before resizing, see the native-size test);
    OpenCV's bilinear shrink after a Gaussian of the spread of Pillow's antialiasing filter lands
    at a mean |difference| of ~0.45 (of 255) at 224 px and ~0.8 at 32 px. Plain INTER_LINEAR,
    which aliases, measures ~2.0 at 224 px and fails the bound below.
    """
    gaps, tails = {224: [], 32: []}, {224: [], 32: []}
    for seed in range(6):
        buffer = io.BytesIO()
        photo(seed).save(buffer, format="JPEG", quality=85)
        for size in gaps:
            pillow = decode_image(buffer.getvalue(), size, decoder="pillow").astype(int)
            opencv = decode_image(buffer.getvalue(), size, decoder="opencv").astype(int)
            gaps[size].append(np.abs(pillow - opencv).mean())
            tails[size].append(np.percentile(np.abs(pillow - opencv), 99))
    assert np.mean(gaps[224]) < 0.8 and max(tails[224]) <= 3, (gaps, tails)  # measured 0.44 and 2
    assert np.mean(gaps[32]) < 1.2 and max(tails[32]) <= 8, (gaps, tails)  # measured 0.82 and 7


@both
@pytest.mark.parametrize("data, words", [
    (b"", "empty"),
    (b"this is not an image", "not an image"),
    (truncated_jpeg(), "cannot be decoded"),
    (short_data_jpeg(), "holds less data than its header promises: the file is truncated"),  # not grey pixels
])
def test_bad_bytes_are_an_image_error_with_the_reason(decoder, data, words):
    with pytest.raises(ImageError, match=words):
        decode_image(data, 16, decoder=decoder)


def test_opencv_fails_a_truncated_jpeg_that_libjpeg_would_pad_with_grey():
    whole = _jpeg(class_pixels("cat", 3, size=(96, 96)), quality=90)
    exif = Image.Exif()
    exif[0x0112] = 1
    with_thumbnail_marker = _jpeg(class_pixels("cat", 3, size=(96, 96)), quality=90, exif=exif.tobytes())
    for data in (whole, with_thumbnail_marker):
        assert decode_image(data, 16, decoder="opencv").shape == (16, 16, 3)
        for cut in (len(data) - 2, len(data) * 3 // 4, len(data) // 3):
            with pytest.raises(ImageError, match="truncated"):
                decode_image(data[:cut], 16, decoder="opencv")
    assert decode_image(whole + b"trailing bytes after the end marker", 16, decoder="opencv").shape == (16, 16, 3)


@both
def test_an_oversized_image_is_refused_from_its_header(decoder):
    with pytest.raises(ImageError, match="above the limit"):
        decode_image(huge_png(6000, 5000), 32, decoder=decoder)  # 30 MP > 25 MP, refused before decoding
    assert MAX_PIXELS == 25_000_000
    # 2 KB and one megapixel, but a side of a million: minutes of OpenCV's smoothing, refused as the manifest does
    with pytest.raises(ImageError, match="a side longer than the limit of 20,000"):
        decode_image(tall_png(), 32, decoder=decoder)


def test_opencv_hands_a_shrink_past_its_filters_bound_to_pillows_resize():
    """Past MAX_OPENCV_SHRINK the OpenCV decoder's taps would grow with the shrink: Pillow's resize, exactly, instead."""
    array = np.random.default_rng(9).integers(0, 256, (2400, 60, 3), dtype=np.uint8)  # 2400 / 32 = 75 > 32
    png = io.BytesIO()
    Image.fromarray(array).save(png, format="PNG")
    pillow = decode_image(png.getvalue(), 32, decoder="pillow")
    np.testing.assert_array_equal(decode_image(png.getvalue(), 32, decoder="opencv"), pillow)
    np.testing.assert_array_equal(resize_pixels(array, 32, decoder="opencv"), pillow)
    assert pipeline.MAX_OPENCV_SHRINK * 32 < 2400 and 2400 <= pipeline.MAX_OPENCV_SHRINK * 224  # at 224 px: OpenCV's own
    assert _mean_gap(decode_image(png.getvalue(), 224, decoder="opencv"),
                     decode_image(png.getvalue(), 224, decoder="pillow")) > 0


@both
def test_resize_pixels_is_the_decoders_resize(decoder):
    array = class_pixels("cat", 4, size=(48, 40))
    via_pixels = resize_pixels(array, 24, decoder=decoder)
    png = io.BytesIO()
    Image.fromarray(array).save(png, format="PNG")  # lossless, so the decode is the array itself
    np.testing.assert_array_equal(via_pixels, decode_image(png.getvalue(), 24, decoder=decoder))
    if decoder == "pillow":
        np.testing.assert_array_equal(
            via_pixels, np.asarray(Image.fromarray(array).resize((24, 24), Image.Resampling.BILINEAR)))


@both
def test_a_missing_file_is_an_image_error(tmp_path, decoder):
    with pytest.raises(ImageError, match="cannot read"):
        read_image(tmp_path / "missing.jpg", 16, decoder=decoder)


@both
@pytest.mark.parametrize("processes", [False, True])
def test_decoder_yields_ordered_uint8_batches_and_fails_bad_files_alone(tmp_path, processes, decoder):
    paths = []
    for index in range(11):
        path = tmp_path / f"{index}.jpg"
        path.write_bytes(b"garbage" if index == 5 else image_bytes("cat" if index % 2 else "dog", index))
        paths.append(path)
    with Decoder(16, 4, decoder=decoder, workers=2, processes=processes) as batch_decoder:
        assert batch_decoder.decoder == decoder
        batches = [(batch.start, batch.pixels.copy(), list(batch.errors)) for batch in batch_decoder.batches(paths)]
        again = [batch.pixels.copy() for batch in batch_decoder.batches(paths[:3])]  # the workers are reused
    assert [start for start, _, _ in batches] == [0, 4, 8]
    assert [len(errors) for _, _, errors in batches] == [4, 4, 3]
    pixels = np.concatenate([p for _, p, _ in batches])
    errors = [e for _, _, batch_errors in batches for e in batch_errors]
    assert pixels.dtype == np.uint8 and pixels.shape == (11, 16, 16, 3)
    assert [bool(e) for e in errors] == [i == 5 for i in range(11)] and "not an image" in errors[5]
    assert not pixels[5].any()  # the failed row is zeros, the batch is not lost
    for index in (0, 3, 10):
        np.testing.assert_array_equal(pixels[index], read_image(paths[index], 16, decoder=decoder))
    np.testing.assert_array_equal(np.concatenate(again), pixels[:3])


def test_opencv_runs_one_thread_per_decode_worker():
    cv2 = pipeline._opencv()
    assert cv2.getNumThreads() == 1  # the workers are the parallelism, not OpenCV's own pool
