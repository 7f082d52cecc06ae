"""Extract: real generated archives, friendly and hostile; nothing may escape or be left half-built.

Every hostile case asserts three things: the error names the archive and the member, nothing
appeared anywhere outside extracted_root (the test's whole tmp folder is compared), and
extracted_root holds no folder, finished or temporary.
"""

from __future__ import annotations

import io
import os
import stat
import tarfile
import warnings
import zipfile
from pathlib import Path

import pytest

from tasks.data import extract as ex
from tasks.common import files
from tasks.common.files import DIGEST_CACHE_NAME
from tasks.data import steps
from tasks.common.errors import DiskFullError, InputError, UnsafeArchiveError, retry_unless_input_error
from tests.smalldisk import small_disk
from tests.imagegen import image_bytes, tar_tree, write_kaggle_tree, write_presplit_tree, zip_tree


def _tree(root: Path) -> dict[str, tuple[int, int, int]]:
    """Every path under root with (inode, mtime_ns, size): any write or replacement changes it."""
    return {str(p.relative_to(root)): (p.lstat().st_ino, p.lstat().st_mtime_ns, p.lstat().st_size)
            for p in sorted(root.rglob("*"))}


def _files(root: Path) -> dict[str, bytes]:
    """The extracted members and their bytes (the folder's own member index left out)."""
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and p.name != ex.INDEX_NAME}


def _zip(path: Path, members: dict[str, bytes], *, attrs: dict[str, int] | None = None) -> Path:
    """A zip with exactly these member names (no sanitising) and optional Unix modes."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name, data in members.items():
            info = zipfile.ZipInfo(name, date_time=(2020, 1, 2, 3, 4, 6))
            info.compress_type = zipfile.ZIP_DEFLATED
            if attrs and name in attrs:
                info.external_attr = attrs[name] << 16
                info.create_system = 3
            zf.writestr(info, data)
    with zipfile.ZipFile(path) as zf:  # the hostile name really is in the archive
        assert [i.filename for i in zf.infolist()] == list(members)
    return path


def _tar(path: Path, members: list[tarfile.TarInfo], data: dict[str, bytes] | None = None) -> Path:
    data = data or {}
    with tarfile.open(path, "w:gz" if path.name.endswith(".gz") else "w") as tf:
        for info in members:
            body = data.get(info.name, b"")
            if info.isreg():
                info.size = len(body)
            tf.addfile(info, io.BytesIO(body) if info.isreg() else None)
    return path


def _info(name: str, kind: bytes = tarfile.REGTYPE, linkname: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = linkname
    info.mtime = 1_600_000_000
    return info


@pytest.fixture
def place(tmp_path):
    """(archive folder, extracted_root, snapshot of tmp_path before extraction)."""
    work = tmp_path / "work"
    work.mkdir()
    return work, tmp_path / "data" / "extracted"


def _assert_refused(archive: Path, root: Path, tmp_path: Path, member: str, words: str, **kwargs) -> None:
    before = set(_tree(tmp_path))
    with pytest.raises(UnsafeArchiveError) as info:
        ex.extract_archive(archive, root, **kwargs)
    message = str(info.value)
    assert archive.name in message and member in message and words in message, message
    assert isinstance(info.value, InputError)  # never retried
    new = set(_tree(tmp_path)) - before
    assert new <= {"data", "data/extracted", f"data/extracted/{DIGEST_CACHE_NAME}"}, new
    assert not [p for p in root.iterdir() if p.is_dir()] if root.exists() else True


# ---------------------------------------------------------------- hostile zips and tars

@pytest.mark.parametrize("name, words", [
    ("../evil.txt", "'..'"),
    ("../../evil.txt", "'..'"),
    ("ok/../../evil.txt", "'..'"),
    ("/tmp/evil.txt", "absolute"),
    ("C:/evil.txt", "drive letter"),
    ("..\\..\\evil.txt", "backslash"),
])
def test_zip_with_escaping_name_is_refused(place, tmp_path, name, words):
    work, root = place
    archive = _zip(work / "bad.zip", {"good.jpg": image_bytes("cat", 1), name: b"owned\n"})
    _assert_refused(archive, root, tmp_path, name.split("/")[-1].split("\\")[-1], words)
    assert not list(tmp_path.rglob("evil.txt"))


@pytest.mark.parametrize("name, words", [("../evil.txt", "'..'"), ("/tmp/evil.txt", "absolute")])
def test_tar_with_escaping_name_is_refused(place, tmp_path, name, words):
    work, root = place
    archive = _tar(work / "bad.tar.gz", [_info("good.txt"), _info(name)], {name: b"owned\n", "good.txt": b"x"})
    _assert_refused(archive, root, tmp_path, name, words)
    assert not list(tmp_path.rglob("evil.txt"))


@pytest.mark.parametrize("name, words", [
    ("PetImages/Cat/" + "c" * 296 + ".jpg", "has a name of 300 bytes, longer than the 255"),  # from its header
    ("/".join(["d" * 250] * 17) + "/0.jpg", "makes a path longer than this filesystem allows"),  # when it is written
])
def test_a_member_whose_name_no_filesystem_holds_is_refused_in_one_sentence(place, tmp_path, name, words):
    work, root = place
    archive = _zip(work / "long.zip", {"PetImages/Cat/0.jpg": image_bytes("cat", 0), name: image_bytes("cat", 1)})
    _assert_refused(archive, root, tmp_path, name, words)


def test_zip_symlink_member_is_refused(place, tmp_path):
    work, root = place
    archive = _zip(work / "link.zip", {"PetImages/Cat/0.jpg": image_bytes("cat", 0), "escape": b"/etc"},
                   attrs={"escape": stat.S_IFLNK | 0o777})
    _assert_refused(archive, root, tmp_path, "escape", "symbolic link")


def test_zip_device_member_is_refused(place, tmp_path):
    work, root = place
    archive = _zip(work / "dev.zip", {"null": b""}, attrs={"null": stat.S_IFCHR | 0o666})
    _assert_refused(archive, root, tmp_path, "null", "device")


@pytest.mark.parametrize("kind, linkname, words", [
    (tarfile.SYMTYPE, "/etc/passwd", "symbolic link"),
    (tarfile.SYMTYPE, "../../outside", "symbolic link"),
    (tarfile.LNKTYPE, "good.txt", "hard link"),
    (tarfile.FIFOTYPE, "", "fifo"),
    (tarfile.CHRTYPE, "", "device"),
])
def test_tar_link_and_special_members_are_refused(place, tmp_path, kind, linkname, words):
    work, root = place
    archive = _tar(work / "links.tar", [_info("good.txt"), _info("trap", kind, linkname)], {"good.txt": b"hi"})
    _assert_refused(archive, root, tmp_path, "trap", words)


def test_zip_bomb_is_refused_by_ratio(place, tmp_path):
    work, root = place
    archive = _zip(work / "bomb.zip", {"PetImages/Cat/0.jpg": image_bytes("cat", 0), "zeros.bin": bytes(8 << 20)})
    assert archive.stat().st_size < 100_000  # 8 MiB of zeros squeezed ~1000:1
    _assert_refused(archive, root, tmp_path, "zeros.bin", "decompression bomb")


def test_total_size_and_member_limits_are_enforced(place, tmp_path):
    work, root = place
    archive = _zip(work / "many.zip", {f"f{i}.txt": os.urandom(2000) for i in range(10)})
    _assert_refused(archive, root, tmp_path, "f5.txt", "uncompressed total",
                    limits=ex.ExtractLimits(max_total_bytes=11_000))
    _assert_refused(archive, root, tmp_path, "f4.txt", "members", limits=ex.ExtractLimits(max_members=4))


def test_a_zip_header_that_understates_the_size_is_refused(place, tmp_path):
    """Headers lie: a member declared as 1000 bytes that inflates to 1 MiB is refused, not cut silently."""
    work, root = place
    data = bytearray(_zip(work / "liar.zip", {"a.bin": os.urandom(1 << 20)}).read_bytes())
    local, central = data.find(b"PK\x03\x04"), data.find(b"PK\x01\x02")
    data[local + 22: local + 26] = (1000).to_bytes(4, "little")
    data[central + 24: central + 28] = (1000).to_bytes(4, "little")
    archive = work / "liar.zip"
    archive.write_bytes(bytes(data))
    _assert_refused(archive, root, tmp_path, "liar.zip", "corrupt")


def test_tar_gz_bomb_is_refused_at_its_header_by_ratio(place, tmp_path):
    work, root = place
    archive = _tar(work / "bomb.tar.gz", [_info("zeros.bin")], {"zeros.bin": bytes(8 << 20)})
    _assert_refused(archive, root, tmp_path, "zeros.bin", "decompression bomb")


def test_archive_nested_more_than_one_level_is_refused(place, tmp_path):
    work, root = place
    deepest = _zip(work / "deepest.zip", {"cat.1.jpg": image_bytes("cat", 1)}).read_bytes()
    inner = _zip(work / "inner.zip", {"deepest.zip": deepest}).read_bytes()
    archive = _zip(work / "outer.zip", {"inner.zip": inner})
    _assert_refused(archive, root, tmp_path, "deepest.zip", "nested more than 1 level")
    _assert_refused(work / "inner.zip", root, tmp_path, "deepest.zip", "nested more than 0 level",
                    limits=ex.ExtractLimits(max_nesting=0))


@pytest.mark.parametrize("first, second", [
    ("train/Cat.1.jpg", "train/cat.1.jpg"),                  # case
    ("caf\u00e9.jpg", "cafe\u0301.jpg"),                       # NFC vs NFD
    ("same.jpg", "same.jpg"),                                # duplicate entry
    ("a", "a/b.jpg"),                                        # file where a folder is needed
])
def test_names_colliding_after_normalisation_are_refused(place, tmp_path, first, second):
    work, root = place
    archive = work / "collide.zip"
    with zipfile.ZipFile(archive, "w") as zf, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # zipfile warns about the duplicate name, and still writes it
        zf.writestr(first, b"one")
        zf.writestr(second, b"two")
    _assert_refused(archive, root, tmp_path, second, "")


def test_nested_archive_colliding_with_a_folder_of_its_name_is_refused(place, tmp_path):
    work, root = place
    inner = _zip(work / "inner.zip", {"train/cat.1.jpg": b"inner"}).read_bytes()
    archive = _zip(work / "outer.zip", {"train/cat.1.jpg": b"outer", "train.zip": inner})
    _assert_refused(archive, root, tmp_path, "cat.1.jpg", "collides")


def test_corrupt_and_unknown_files_are_refused(place, tmp_path):
    work, root = place
    good = zip_tree(write_kaggle_tree(work / "k", per_class=2, unlabelled=1), work / "good.zip").read_bytes()
    (work / "truncated.zip").write_bytes(good[: len(good) // 2])
    (work / "notes.txt").write_text("hello\n")
    with pytest.raises(UnsafeArchiveError, match="neither a zip nor a tar"):
        ex.extract_archive(work / "truncated.zip", root)
    with pytest.raises(UnsafeArchiveError, match="neither a zip nor a tar"):
        ex.extract_archive(work / "notes.txt", root)
    assert not root.exists()


def test_truncated_tar_gz_fails_midway_and_leaves_nothing(place, tmp_path):
    work, root = place
    tree = write_presplit_tree(work / "filtered", per_class={"train": 4})
    (tree / "train" / "noise.bin").write_bytes(os.urandom(300_000))
    good = tar_tree(tree, work / "good.tar.gz").read_bytes()
    archive = work / "cut.tar.gz"
    archive.write_bytes(good[: len(good) * 3 // 4])
    _assert_refused(archive, root, tmp_path, "cut.tar.gz", "corrupt or truncated")


# ---------------------------------------------------------------- friendly archives

def test_kaggle_double_zip_becomes_train_and_test1_folders(place, tmp_path):
    """Kaggle's zip holds train.zip (members under train/) and test1.zip; both unpack in place."""
    work, root = place
    tree = write_kaggle_tree(work / "kaggle", per_class=3, unlabelled=2)
    inner_train = zip_tree(tree / "train", work / "train.zip", prefix="train")   # train/cat.0.jpg ...
    inner_test = zip_tree(tree / "test1", work / "test1.zip")                    # 1.jpg ... (no folder)
    outer = _zip(work / "dogs-vs-cats.zip", {
        "train.zip": inner_train.read_bytes(),
        "test1.zip": inner_test.read_bytes(),
        "sampleSubmission.csv": b"id,label\n1,0\n2,0\n",
    })

    out = ex.extract_archive(outer, root)

    assert out == root / files.sha256_file(outer)[:16]
    expected = {f"train/{k}": v for k, v in _files(tree / "train").items()}
    expected |= {f"test1/{k}": v for k, v in _files(tree / "test1").items()}
    expected["sampleSubmission.csv"] = b"id,label\n1,0\n2,0\n"
    assert _files(out) == expected  # no train.zip left, no train/train/
    assert sorted(p.name for p in root.iterdir()) == sorted([out.name, DIGEST_CACHE_NAME])  # no temp folder


def test_tar_gz_presplit_tree_round_trips_and_second_run_writes_nothing(place, tmp_path, monkeypatch):
    work, root = place
    tree = write_presplit_tree(work / "filtered", per_class={"train": 3, "validation": 2})
    archive = tar_tree(tree, work / "cats_and_dogs_filtered.tar.gz")

    out = ex.extract_archive(archive, root)
    assert _files(out) == _files(tree)
    before = _tree(root)

    def no_rehash(path):
        raise AssertionError(f"{path} was hashed again")

    monkeypatch.setattr(files, "sha256_file", no_rehash)
    assert ex.extract_archive(archive, root) == out
    assert _tree(root) == before  # same inodes, mtimes and sizes: nothing written


def test_members_with_dot_prefix_and_folder_entries_extract(place):
    work, root = place
    archive = _tar(work / "dots.tar", [_info("./", tarfile.DIRTYPE), _info("./cats", tarfile.DIRTYPE),
                                        _info("./cats/cat.1.jpg")], {"./cats/cat.1.jpg": b"meow"})
    out = ex.extract_archive(archive, root)
    assert _files(out) == {"cats/cat.1.jpg": b"meow"}
    assert (out / "cats" / "cat.1.jpg").stat().st_mtime == 1_600_000_000  # archive mtimes kept


def test_a_changed_archive_gets_a_new_folder(place):
    work, root = place
    archive = _zip(work / "a.zip", {"x.txt": b"one"})
    first = ex.extract_archive(archive, root)
    _zip(archive, {"x.txt": b"two"})
    second = ex.extract_archive(archive, root)
    assert first != second and (second / "x.txt").read_bytes() == b"two"


def test_folder_is_returned_unchanged_and_missing_path_is_an_input_error(tmp_path):
    assert ex.extract_archive(tmp_path, tmp_path / "extracted") == tmp_path.resolve()
    assert not (tmp_path / "extracted").exists()
    with pytest.raises(InputError, match="does not exist"):
        ex.extract_archive(tmp_path / "missing.zip", tmp_path / "extracted")


def test_an_archive_larger_than_the_free_space_is_refused_before_any_write(tmp_path):
    archive = _zip(tmp_path / "pets.zip", {"PetImages/Cat/big.jpg": os.urandom(3 << 20)})
    with small_disk(tmp_path / "disk", "2m") as disk:
        root = disk / "data" / "extracted"
        with pytest.raises(DiskFullError) as caught:
            ex.extract_archive(archive, root)
        message = str(caught.value)
        assert message.startswith(f"Extracting {archive} needs 3 MiB in {root}, but its disk has ")
        assert "--data-dir" in message and len(message.splitlines()) == 1
        assert [p.name for p in root.iterdir()] == [DIGEST_CACHE_NAME]  # nothing half-extracted


def test_a_disk_that_fills_up_mid_extraction_is_one_sentence_and_leaves_nothing(tmp_path):
    """800 members of 100 bytes declare 80 KB but take a 4 KiB page each on tmpfs: the disk fills mid-way."""
    archive = _zip(tmp_path / "many.zip", {f"cats/{i}.jpg": os.urandom(100) for i in range(800)})
    with small_disk(tmp_path / "disk", "1m") as disk:
        root = disk / "extracted"
        with pytest.raises(DiskFullError) as caught:
            ex.extract_archive(archive, root)
        assert str(caught.value).startswith(f"The disk holding {root} is full (")
        assert isinstance(caught.value.__cause__, OSError) and caught.value.__cause__.errno == 28
        assert [p.name for p in root.iterdir()] == [DIGEST_CACHE_NAME]  # the temporary folder is gone


def test_task_retries_io_only():
    assert steps.extract.retries == 1
    assert steps.extract.retry_condition_fn is retry_unless_input_error
