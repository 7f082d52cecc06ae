"""Generated images and archives for tests: two visibly different classes and the real archive's faults.

Cats are warm (red/orange) with horizontal stripes, dogs are cool (blue/green) with a checker
texture, so even a tiny randomly initialised backbone plus a trained head separates them. Any
number of classes (`write_class_folders`) differ the same way: each its own hue and texture.
"""

from __future__ import annotations

import io
import tarfile
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image

SIZE = (48, 40)  # width, height: small and not square, so resizing is exercised


def class_pixels(label: str, seed: int, size: tuple[int, int] = SIZE) -> np.ndarray:
    """An RGB uint8 array whose colour and texture depend on the class; the seed varies the rest."""
    rng = np.random.default_rng(seed * 2 + (label == "dog"))
    width, height = size
    yy, xx = np.mgrid[0:height, 0:width]
    if label == "cat":
        base = np.array([200, 110, 40]) + rng.integers(-30, 30, 3)
        period = int(rng.integers(4, 8))
        pattern = ((yy // period) % 2)[..., None]
    else:
        base = np.array([40, 120, 200]) + rng.integers(-30, 30, 3)
        period = int(rng.integers(4, 8))
        pattern = (((yy // period) + (xx // period)) % 2)[..., None]
    pixels = base + pattern * 50 + rng.normal(0, 12, (height, width, 3))
    return np.clip(pixels, 0, 255).astype(np.uint8)


def image_bytes(label: str, seed: int, fmt: str = "JPEG", mode: str = "RGB",
                size: tuple[int, int] = SIZE, exif_orientation: int | None = None) -> bytes:
    """Encoded bytes of a class image in the given format and mode."""
    image = Image.fromarray(class_pixels(label, seed, size)).convert(mode)
    buffer = io.BytesIO()
    kwargs: dict = {}
    if exif_orientation is not None:
        exif = Image.Exif()
        exif[0x0112] = exif_orientation
        kwargs["exif"] = exif.tobytes()
    if fmt == "JPEG":
        kwargs["quality"] = 90
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def truncated_jpeg(label: str = "cat", seed: int = 999) -> bytes:
    data = image_bytes(label, seed, size=(96, 96))
    return data[: len(data) // 2]


def huge_png(width: int = 5200, height: int = 5000) -> bytes:
    """A PNG whose pixel count passes the default limit while the file stays tiny (a pixel bomb)."""
    buffer = io.BytesIO()
    Image.new("L", (width, height)).save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()


def tall_png(height: int = 1_000_000) -> bytes:
    """A one-pixel-wide PNG of 2 KB (for a million rows): under the pixel limit, a side far past the side limit.

    Resized as if it were a photo, it once cost minutes of CPU in the OpenCV decoder and a Pillow
    resize 224 rows of a million pixels; everywhere now it is refused from its header.
    """
    buffer = io.BytesIO()
    Image.new("L", (1, height)).save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()


def long_jpeg(width: int = 40, height: int = 25_000) -> bytes:
    """A valid JPEG one side of which is longer than the limit of 20,000 pixels (and the other above --min-side)."""
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (120, 80, 40)).save(buffer, format="JPEG", quality=75)
    return buffer.getvalue()


def short_data_jpeg(claimed: tuple[int, int] = (5000, 5000)) -> bytes:
    """A JPEG whose header says `claimed` pixels over the data of a 256 x 192 one, then its end marker.

    A file spliced or cut this way ends as a whole one does, so only its size gives it away:
    Pillow decodes it to a grey picture without a word (libjpeg pads what is missing).
    """
    data = bytearray(image_bytes("cat", 998, size=(256, 192)))
    frame = data.index(b"\xff\xc0")  # the baseline frame header: FF C0, length, precision, height, width
    data[frame + 5:frame + 9] = claimed[1].to_bytes(2, "big") + claimed[0].to_bytes(2, "big")
    return bytes(data)


# name -> (bytes factory, expected status, expected reason code or "" when ok)
FAULTS: dict[str, tuple] = {
    "empty.jpg": (lambda: b"", "quarantined", "empty_file"),
    "truncated.jpg": (truncated_jpeg, "quarantined", "undecodable"),
    "notes.jpg": (lambda: b"this is a text file, not a JPEG\n" * 4, "quarantined", "not_an_image"),
    "Thumbs.db": (lambda: b"\xd0\xcf\x11\xe0" + b"\x00" * 60, "quarantined", "not_an_image"),
    "tiny.jpg": (lambda: image_bytes("cat", 501, size=(8, 8)), "quarantined", "too_small"),
    "huge.png": (huge_png, "quarantined", "too_large"),
    "tall.png": (tall_png, "quarantined", "too_large"),
    "long.jpg": (long_jpeg, "quarantined", "too_large"),
    "short_data.jpg": (short_data_jpeg, "quarantined", "undecodable"),
}

# Decodable oddities: arranged after conversion to RGB JPEG.
ODDITIES: dict[str, callable] = {
    "png_bytes.jpg": lambda label: image_bytes(label, 601, fmt="PNG"),
    "cmyk.jpg": lambda label: image_bytes(label, 602, mode="CMYK"),
    "gray.jpg": lambda label: image_bytes(label, 603, mode="L"),
    "rotated.jpg": lambda label: image_bytes(label, 604, exif_orientation=6),
}


def write_petimages_tree(root: Path, per_class: int = 12, faults: bool = True, seed0: int = 0) -> Path:
    """Write `PetImages/{Cat,Dog}/N.jpg` under root, with the real archive's faults if asked.

    With faults: the FAULTS files and ODDITIES go into Cat/, one cat image is copied twice into
    Cat/ (a duplicate) and one image appears in both Cat/ and Dog/ (a label conflict).
    """
    pet = Path(root) / "PetImages"
    for label, folder in (("cat", "Cat"), ("dog", "Dog")):
        (pet / folder).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            (pet / folder / f"{i}.jpg").write_bytes(image_bytes(label, seed0 + i))
    if faults:
        for name, (factory, _, _) in FAULTS.items():
            (pet / "Cat" / name).write_bytes(factory())
        for name, factory in ODDITIES.items():
            (pet / "Dog" / name).write_bytes(factory("dog"))
        (pet / "Cat" / "dup_of_0.jpg").write_bytes((pet / "Cat" / "0.jpg").read_bytes())
        conflict = image_bytes("cat", 777)
        (pet / "Cat" / "conflict.jpg").write_bytes(conflict)
        (pet / "Dog" / "conflict.jpg").write_bytes(conflict)
    return pet


def write_kaggle_tree(root: Path, per_class: int = 12, unlabelled: int = 5, seed0: int = 0) -> Path:
    """Write the Kaggle competition layout: `train/cat.N.jpg`, `train/dog.N.jpg`, `test1/N.jpg`."""
    root = Path(root)
    (root / "train").mkdir(parents=True, exist_ok=True)
    (root / "test1").mkdir(parents=True, exist_ok=True)
    for label in ("cat", "dog"):
        for i in range(per_class):
            (root / "train" / f"{label}.{i}.jpg").write_bytes(image_bytes(label, seed0 + i))
    for i in range(unlabelled):
        (root / "test1" / f"{i + 1}.jpg").write_bytes(image_bytes("dog" if i % 2 else "cat", 5000 + i))
    return root


def write_presplit_tree(root: Path, per_class: dict[str, int] | None = None, seed0: int = 0) -> Path:
    """Write `cats_and_dogs_filtered`-style folders: `{train,validation}/{cats,dogs}/`."""
    per_class = per_class or {"train": 10, "validation": 4}
    root = Path(root)
    for split, n in per_class.items():
        for label in ("cat", "dog"):
            folder = root / split / f"{label}s"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                offset = 1000 if split == "validation" else 2000 if split == "test" else 0
                (folder / f"{label}.{seed0 + offset + i}.jpg").write_bytes(image_bytes(label, seed0 + offset + i))
    return root


def zip_tree(root: Path, archive: Path, prefix: str = "") -> Path:
    """Zip every file under root (names relative to root, optionally under `prefix/`)."""
    root = Path(root)
    with zipfile.ZipFile(archive, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for path in sorted(root.rglob("*")):
            if path.is_file():
                zf.write(path, (Path(prefix) / path.relative_to(root)).as_posix())
    return Path(archive)


def tar_tree(root: Path, archive: Path) -> Path:
    """Tar (gzip when the name ends in .gz) every file under root."""
    mode = "w:gz" if str(archive).endswith(".gz") else "w"
    with tarfile.open(archive, mode) as tf:
        for path in sorted(Path(root).rglob("*")):
            if path.is_file():
                tf.add(path, path.relative_to(root).as_posix())
    return Path(archive)


# --------------------------------------------------------------------------- any classes

_TEXTURES = ("stripes", "checker", "columns", "plain", "dots")


def indexed_class_pixels(index: int, n_classes: int, seed: int, size: tuple[int, int] = SIZE) -> np.ndarray:
    """Class `index` of `n_classes`: its own hue (spaced around the colour wheel) and texture."""
    import colorsys

    rng = np.random.default_rng(seed * 97 + index)
    width, height = size
    yy, xx = np.mgrid[0:height, 0:width]
    hue = (index / n_classes + rng.uniform(-0.03, 0.03)) % 1.0
    base = np.array(colorsys.hsv_to_rgb(hue, 0.8, 0.8)) * 200
    period = int(rng.integers(4, 8))
    texture = _TEXTURES[index % len(_TEXTURES)]
    pattern = {"stripes": (yy // period) % 2, "checker": ((yy // period) + (xx // period)) % 2,
               "columns": (xx // period) % 2, "plain": np.zeros_like(yy),
               "dots": ((yy % period == 0) & (xx % period == 0)).astype(int)}[texture][..., None]
    pixels = base + pattern * 50 + rng.normal(0, 10, (height, width, 3))
    return np.clip(pixels, 0, 255).astype(np.uint8)


def indexed_image_bytes(index: int, n_classes: int, seed: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(indexed_class_pixels(index, n_classes, seed)).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def write_class_folders(root: Path, folders: list[str], per_class: int = 12,
                        splits: dict[str, int] | None = None, seed0: int = 0) -> Path:
    """Write one folder per class (`root/<folder>/N.jpg`), or `root/<split>/<folder>/N.jpg` when `splits` is given.

    Class i of `folders` is drawn by `indexed_class_pixels(i, len(folders), ...)`, so a tiny
    random backbone plus a trained head tells them apart.
    """
    root = Path(root)
    places = {split: root / split for split in splits} if splits else {"": root}
    counts = splits or {"": per_class}
    for offset, (split, base) in enumerate(places.items()):
        for index, folder in enumerate(folders):
            (base / folder).mkdir(parents=True, exist_ok=True)
            for i in range(counts[split]):
                seed = seed0 + offset * 10_000 + i
                (base / folder / f"{i}.jpg").write_bytes(indexed_image_bytes(index, len(folders), seed))
    return root


# --------------------------------------------------------------------------- distinctive scenes and their near-copies


def scene_pixels(seed: int, size: tuple[int, int] = (96, 72)) -> np.ndarray:
    """A photo-like RGB scene of its own: a smooth colour field with a few discs and grain.

    Unlike `class_pixels`, two seeds never look alike, so a scene and its near-copy (re-encoded,
    resized) stand apart from every other image: what the data audit's near-copy tests need.
    """
    rng = np.random.default_rng(10_000 + seed)
    width, height = size
    coarse = Image.fromarray(rng.integers(0, 256, (3, 4, 3), dtype=np.uint8)).resize((width, height), Image.BILINEAR)
    pixels = np.asarray(coarse, dtype=np.float32)
    yy, xx = np.mgrid[0:height, 0:width]
    for _ in range(4):
        cx, cy, radius = rng.uniform(0, width), rng.uniform(0, height), rng.uniform(6, 20)
        disc = (np.hypot(xx - cx, yy - cy) < radius)[..., None]
        pixels = np.where(disc, rng.uniform(0, 255, 3), pixels)
    pixels += rng.normal(0, 6, pixels.shape)
    return np.clip(pixels, 0, 255).astype(np.uint8)


def jpeg_bytes(pixels: np.ndarray, quality: int = 90, scale: float = 1.0) -> bytes:
    """JPEG bytes of `pixels`, resized by `scale` first: near-copies are the same pixels re-encoded or resized."""
    image = Image.fromarray(pixels)
    if scale != 1.0:
        image = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))), Image.BILINEAR)
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


NEAR_COPIES: dict[str, dict] = {"re-encoded": {"quality": 50}, "resized": {"quality": 90, "scale": 0.75}}
"""How the audit's tests make near-copies of a scene: `jpeg_bytes` settings per kind."""


def blank_bytes(colour: tuple[int, int, int], size: tuple[int, int] = SIZE) -> bytes:
    """A blank frame of one colour (a photo of nothing, in the wrong class folder)."""
    return jpeg_bytes(np.full((size[1], size[0], 3), colour, dtype=np.uint8))


def night_shot_pixels(label: str, seed: int, size: tuple[int, int] = SIZE) -> np.ndarray:
    """The class image as another camera takes it at night: darker, tinted blue, grainier (a colour and texture drift)."""
    pixels = class_pixels(label, seed, size).astype(np.float64) * 0.45 + np.array([0, 15, 45])
    grain = np.random.default_rng(seed + 77).normal(0, 25, pixels.shape)
    return np.clip(pixels + grain, 0, 255).astype(np.uint8)


def night_shot_bytes(label: str, seed: int, size: tuple[int, int] = SIZE) -> bytes:
    """`night_shot_pixels` as a JPEG."""
    buffer = io.BytesIO()
    Image.fromarray(night_shot_pixels(label, seed, size)).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()
