"""The file primitives: a failed write leaves the old state, a repeated write leaves no trace."""

from __future__ import annotations

import hashlib

import pytest

from tasks.common.files import atomic_directory, atomic_path, atomic_write_json, sha256_file, write_if_changed


def test_sha256_file_matches_hashlib_over_several_chunks(tmp_path):
    data = bytes(range(256)) * 10_000  # > one 1 MiB chunk
    path = tmp_path / "blob"
    path.write_bytes(data)
    assert sha256_file(path) == hashlib.sha256(data).hexdigest()


def test_failed_atomic_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "manifest.parquet"
    target.write_text("old")
    with pytest.raises(RuntimeError), atomic_path(target, suffix=".parquet") as tmp:
        tmp.write_text("half of the new")
        raise RuntimeError("killed mid-way")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["manifest.parquet"]


def test_write_if_changed_writes_once(tmp_path):
    target = tmp_path / "summary.json"
    assert write_if_changed(target, b"{}") is True
    mtime = target.stat().st_mtime_ns
    assert write_if_changed(target, b"{}") is False
    assert target.stat().st_mtime_ns == mtime
    assert write_if_changed(target, b"{\"a\": 1}") is True
    atomic_write_json(target, {"b": 2})
    assert '"b": 2' in target.read_text()


def test_atomic_directory_swaps_a_whole_folder_or_nothing(tmp_path):
    target = tmp_path / "docs"
    with atomic_directory(target) as tmp:
        (tmp / "index.html").write_text("v1")
    with pytest.raises(RuntimeError), atomic_directory(target) as tmp:
        (tmp / "index.html").write_text("v2, half built")
        raise RuntimeError("killed mid-way")
    assert (target / "index.html").read_text() == "v1"
    with atomic_directory(target) as tmp:
        (tmp / "index.html").write_text("v2")
    assert (target / "index.html").read_text() == "v2"
    assert [p.name for p in tmp_path.iterdir()] == ["docs"]  # no temporary or old folder left


@pytest.mark.parametrize("mask", [0o022, 0o002, 0o077])
def test_atomic_writes_honour_the_umask_like_an_ordinary_write(tmp_path, mask):
    """mkstemp/mkdtemp make private temporaries; renamed into place they would lock the team out."""
    import os

    from tasks.common.files import atomic_write_text, current_umask

    previous = os.umask(mask)
    try:
        assert current_umask() == mask
        ordinary = tmp_path / "ordinary.txt"
        ordinary.write_text("x")
        atomic = atomic_write_text(tmp_path / "atomic.txt", "x")
        with atomic_directory(tmp_path / "folder") as tmp:
            (tmp / "index.html").write_text("v1")
    finally:
        os.umask(previous)
    assert atomic.stat().st_mode & 0o777 == ordinary.stat().st_mode & 0o777 == 0o666 & ~mask
    assert (tmp_path / "folder").stat().st_mode & 0o777 == 0o777 & ~mask
