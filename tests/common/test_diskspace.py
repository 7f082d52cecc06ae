"""Room on disk, on a real small disk (a tmpfs): what is free, and the one sentence when it is not enough."""

from __future__ import annotations

import pytest

from tasks.common.diskspace import check_not_full, disk_full, ensure_room, free_bytes, size_text
from tasks.common.errors import DiskFullError, is_disk_full, retry_unless_input_error
from tests.smalldisk import fill, small_disk


def test_size_text_reads_like_df_h():
    assert [size_text(n) for n in (0, 512, 2048, 3 * 2**20 + 2**19, 2**30)] == \
        ["0 bytes", "512 bytes", "2 KiB", "3.5 MiB", "1 GiB"]


def test_a_full_disk_is_one_sentence_naming_the_folder_what_is_needed_and_what_is_free(tmp_path):
    with small_disk(tmp_path / "disk", "2m") as disk:
        folder = disk / "data" / "downloads"  # not made yet: the disk that would hold it counts
        assert 1.5 * 2**20 < free_bytes(folder) <= 2 * 2**20
        ensure_room(folder, 2**20, "Downloading pets.zip")  # fits
        with pytest.raises(DiskFullError) as caught:
            ensure_room(folder, 3 * 2**20, "Downloading pets.zip")
        message = str(caught.value)
        assert message.startswith(f"Downloading pets.zip needs 3 MiB in {folder}, but its disk has ")
        assert message.endswith("free; free space there or pass --data-dir a folder on a larger disk.")
        assert len(message.splitlines()) == 1

        fill(disk)
        with pytest.raises(DiskFullError, match=f"^The disk holding {disk} is full \\(0 bytes free\\); "):
            check_not_full(folder)
        with pytest.raises(OSError) as write:
            (disk / "more").write_bytes(b"x" * 8192)
        assert is_disk_full(write.value) and not is_disk_full(RuntimeError("not a disk"))
        assert str(disk_full(write.value, disk / "data")).startswith(f"The disk holding {disk} is full")


class _State:
    def __init__(self, error: BaseException) -> None:
        self.error = error

    def result(self):
        raise self.error


def test_prefect_does_not_retry_a_full_disk_but_retries_other_io_errors(tmp_path):
    full = OSError(28, "No space left on device")
    assert retry_unless_input_error(None, None, _State(full)) is False
    assert retry_unless_input_error(None, None, _State(ConnectionResetError(104, "reset"))) is True
    chained = RuntimeError("wrapped")
    chained.__cause__ = full
    assert retry_unless_input_error(None, None, _State(chained)) is False
