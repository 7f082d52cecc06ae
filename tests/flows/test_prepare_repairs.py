"""`prepare_data` after someone wrote through an arranged hard link: the damage is found and repaired.

Arranged images are hard links to the extracted (or converted) files, so writing an arranged
JPEG in place writes its source too. The next prepare must notice, repair the source from the
archive (or convert again), link again, and not quarantine a good image for good.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pandas as pd
import pytest

from tasks.common.files import sha256_file
from tests.flows.test_prepare_flow import FRACTIONS, SMALL, snapshot
from tests.imagegen import write_petimages_tree, zip_tree



@pytest.fixture(scope="module")
def petimages_zip(tmp_path_factory) -> Path:
    base = tmp_path_factory.mktemp("repair-source")
    write_petimages_tree(base / "tree", per_class=30, faults=True)
    return zip_tree(base / "tree", base / "petimages.zip")


@pytest.fixture
def warnings_logged():
    """Warnings of the steps, as Prefect's run loggers emit them inside a run (and `logging` outside)."""
    import flows.prepare  # noqa: F401  (imports Prefect, which sets up its loggers: attach after that)

    messages: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            messages.append(record.getMessage())

    handler = Collect(logging.WARNING)
    loggers = [logging.getLogger(name) for name in ("prefect.task_runs", "prefect.flow_runs", "tasks")]
    # A command line run in this process before (flows.cli.run_main) leaves the `prefect` logger at
    # ERROR for the process's exit: let warnings through here whatever ran before.
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
    yield messages
    for logger, level in zip(loggers, levels):
        logger.removeHandler(handler)
        logger.setLevel(level)


def prepare(source: Path, data_dir: Path):
    from flows.config import DataConfig
    from flows.prepare import prepare_data

    return prepare_data(DataConfig(source=str(source), data_dir=str(data_dir), thresholds=SMALL,
                                   split_fractions=FRACTIONS))


def _rows(data_dir: Path) -> pd.DataFrame:
    return pd.read_parquet(data_dir / "manifest.parquet").set_index("relative_path")


def _write_in_place(path: Path) -> int:
    """Overwrite the first bytes of a file through its name, keeping its inode (and so its hard links)."""
    inode = path.stat().st_ino
    with open(path, "r+b") as handle:
        handle.write(b"\x00" * 64)
    assert path.stat().st_ino == inode
    return inode


def test_an_arranged_jpeg_written_in_place_is_repaired_from_the_archive(petimages_zip, tmp_path, warnings_logged):
    data_dir = tmp_path / "data"
    first = prepare(petimages_zip, data_dir)
    rows = _rows(data_dir)
    name = "PetImages/Cat/3.jpg"
    row = rows.loc[name]
    assert row.status == "ok" and row.converted_path == ""
    arranged, extracted = data_dir / row.arranged_path, Path(row.source_path)
    assert arranged.samefile(extracted)  # a hard link: one inode, two names
    _write_in_place(arranged)
    assert sha256_file(extracted) != row.sha256  # the extracted copy was damaged with it

    again = prepare(petimages_zip, data_dir)

    assert again == first  # not quarantined: the same data, the same fingerprint
    repaired = _rows(data_dir).loc[name]
    assert (repaired.status, repaired.sha256, repaired.arranged_path) == ("ok", row.sha256, row.arranged_path)
    assert sha256_file(data_dir / repaired.arranged_path) == row.sha256
    assert sha256_file(repaired.source_path) == row.sha256
    warnings = [line for line in warnings_logged if "extracting the archive again" in line]
    assert warnings and str(extracted) in warnings[0], warnings_logged

    before = snapshot(data_dir)  # repaired once; the run after writes nothing
    assert prepare(petimages_zip, data_dir) == first
    assert snapshot(data_dir) == before


def test_a_converted_image_written_through_its_arranged_link_is_converted_again(petimages_zip, tmp_path, warnings_logged):
    data_dir = tmp_path / "data"
    first = prepare(petimages_zip, data_dir)
    rows = _rows(data_dir)
    converted_rows = rows[(rows["converted_path"] != "") & (rows["status"] == "ok")]
    name = converted_rows.index[0]
    row = converted_rows.iloc[0]
    arranged, converted = data_dir / row.arranged_path, Path(row.converted_path)
    assert arranged.samefile(converted)
    good = sha256_file(arranged)
    _write_in_place(arranged)

    assert prepare(petimages_zip, data_dir) == first

    assert sha256_file(data_dir / _rows(data_dir).loc[name].arranged_path) == good
    assert sha256_file(converted) == good
    warnings = [line for line in warnings_logged if "converting" in line and "again" in line]
    assert warnings and str(arranged) in warnings[0], warnings_logged
