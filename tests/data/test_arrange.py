"""Arrange, on hand-built manifests (no Prefect, no image decoding)."""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd
import pytest

from tasks.data.arrange import arrange_files, link_arranged
from tasks.data.datafolder import DataFolder
from tasks.data.splits import assign_splits
from tests.data.rows import frame, row, sha




# --------------------------------------------------------------------------- arrange_files


@pytest.fixture
def sources(tmp_path: Path) -> tuple[Path, pd.DataFrame]:
    """Real files for a small manifest: 2 cats, 2 dogs, 1 unlabelled, 1 converted, 1 quarantined."""
    src = tmp_path / "src"
    src.mkdir()
    rows = []
    for name, label, split in [("Cat/1.jpg", "cat", ""), ("Cat/2.jpg", "cat", ""), ("Dog/1.jpg", "dog", ""),
                               ("Dog/odd name (1).jpg", "dog", ""), ("test1/7.jpg", "", "unlabelled")]:
        path = src / name.replace("/", "_")
        path.write_bytes(name.encode())
        rows.append(row(name, label, content=name, source_split=split, source_path=str(path)))
    converted = src / "converted.jpg"
    converted.write_bytes(b"converted bytes")
    raw = src / "Dog_png.jpg"
    raw.write_bytes(b"png bytes")
    rows.append(row("Dog/png.jpg", "dog", source_path=str(raw), converted_path=str(converted)))
    bad = src / "bad.jpg"
    bad.write_bytes(b"")
    rows.append(row("Cat/bad.jpg", status="quarantined", reason="empty_file", source_path=str(bad)))
    return tmp_path / "data", assign_splits(frame(rows))


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_mtime_ns, p.stat().st_ino)
            for p in sorted(root.rglob("*"))}


def test_arrange_links_each_kept_file_once_under_its_split_and_class(sources):
    data_dir, manifest = sources
    out, stats = link_arranged(manifest, DataFolder(data_dir))
    kept = out[out["status"] == "ok"]
    assert stats.linked == len(kept) == 6 and stats.copied == stats.removed == 0
    for r in kept.itertuples():
        target = data_dir / r.arranged_path
        source = Path(r.converted_path or r.source_path)
        assert os.path.samefile(target, source)
        if r.split == "unlabelled":
            assert r.arranged_path == "unlabelled/7.jpg"
        else:
            folder = {"cat": "cats", "dog": "dogs"}[r.label]
            assert r.arranged_path.startswith(f"arranged/{r.split}/{folder}/")
            assert r.arranged_path.endswith(f"_{r.sha256[:10]}.jpg")
    assert (data_dir / out.set_index("relative_path").loc["Dog/png.jpg", "arranged_path"]).read_bytes() == b"converted bytes"
    assert "odd_name_1_" in out.set_index("relative_path").loc["Dog/odd name (1).jpg", "arranged_path"]
    assert out.set_index("relative_path").loc["Cat/bad.jpg", "arranged_path"] == ""
    files = [p for p in data_dir.rglob("*") if p.is_file() and p != DataFolder(data_dir).arranged_index]
    assert len(files) == 6


def test_second_arrange_touches_nothing(sources):
    data_dir, manifest = sources
    arrange_files(manifest, DataFolder(data_dir))
    before = snapshot(data_dir)
    _, stats = link_arranged(manifest, DataFolder(data_dir))
    assert (stats.linked, stats.copied, stats.removed, stats.unchanged) == (0, 0, 0, 6)
    assert snapshot(data_dir) == before


def test_stale_files_are_removed_and_moved_images_relinked(sources):
    data_dir, manifest = sources
    arrange_files(manifest, DataFolder(data_dir))
    stray = data_dir / "arranged" / "train" / "cats" / "stray.jpg"
    stray.write_bytes(b"x")
    leftover = data_dir / "arranged" / "train" / "cats" / ".x.jpg.1234.tmp"
    leftover.write_bytes(b"x")
    smaller = manifest[manifest["relative_path"] != "Cat/2.jpg"]
    out, stats = link_arranged(smaller, DataFolder(data_dir))
    assert stats.removed == 3 and stats.linked == 0
    on_disk = {p.relative_to(data_dir).as_posix() for p in data_dir.rglob("*")
               if p.is_file() and p != DataFolder(data_dir).arranged_index}
    assert on_disk == set(out.loc[out["arranged_path"] != "", "arranged_path"])


def test_copy_fallback_when_links_are_impossible(sources, monkeypatch):
    data_dir, manifest = sources

    def no_links(src, dst):
        raise OSError(18, "Invalid cross-device link")  # EXDEV

    monkeypatch.setattr(os, "link", no_links)
    out, stats = link_arranged(manifest, DataFolder(data_dir))
    assert stats.copied == 6 and stats.linked == 0
    for r in out[out["arranged_path"] != ""].itertuples():
        assert (data_dir / r.arranged_path).read_bytes() == Path(r.converted_path or r.source_path).read_bytes()
    before = snapshot(data_dir)
    _, again = link_arranged(manifest, DataFolder(data_dir))
    assert again.written == 0 and snapshot(data_dir) == before


def test_other_link_errors_are_not_swallowed(sources, monkeypatch):
    data_dir, manifest = sources

    def broken(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "link", broken)
    with pytest.raises(OSError, match="No space"):
        arrange_files(manifest, DataFolder(data_dir))
    assert not [p for p in data_dir.rglob("*") if p.is_file()]   # no temp file left behind


def test_unlabelled_name_clash_is_disambiguated(tmp_path):
    rows = []
    for folder in ("a", "b"):
        path = tmp_path / f"{folder}.jpg"
        path.write_bytes(folder.encode())
        rows.append(row(f"{folder}/1.jpg", "", content=folder, source_split="unlabelled", source_path=str(path)))
    out = arrange_files(assign_splits(frame(rows)), DataFolder(tmp_path / "data"))
    assert sorted(out["arranged_path"]) == sorted(f"unlabelled/1_{sha(c)[:10]}.jpg" for c in "ab")
