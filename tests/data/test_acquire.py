"""Acquire: downloads against a real loopback HTTP server, local sources, and the Kaggle client's failure paths.

Only the internet is faked: the Kaggle client's network call is replaced by a 403 answer, while
everything around it (credential lookup, the client's own error handling) is real; offline, the real
client calls a host that does not resolve, or a closed loopback port.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
import sys
from pathlib import Path

import pytest
import requests

from tasks.data import acquire as acq
from tasks.data import steps
from tasks.common.diskspace import size_text
from tasks.common.errors import AcquireError, DiskFullError, InputError, UnreachableError, retry_unless_input_error
from tests.httpserver import FileServer
from tests.smalldisk import small_disk
from tests.imagegen import write_petimages_tree, zip_tree


pytestmark = pytest.mark.filterwarnings("ignore:Logger 'prefect.task_runs' attempted to send logs")  # tasks run alone


@pytest.fixture(scope="module")
def archive_bytes(tmp_path_factory) -> bytes:
    """A real PetImages-style zip, a few hundred KB: big enough to cut mid-way."""
    root = tmp_path_factory.mktemp("src")
    write_petimages_tree(root, per_class=20, faults=False)
    big = root / "PetImages" / "Cat" / "noise.jpg"
    big.write_bytes(random.Random(0).randbytes(256_000))  # incompressible filler
    return zip_tree(root, root.parent / f"{root.name}.zip").read_bytes()


@pytest.fixture
def server():
    with FileServer() as running:
        yield running


@pytest.fixture(autouse=True)
def _no_backoff(monkeypatch):
    monkeypatch.setattr(acq, "RETRY_BACKOFF_S", 0.0)


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _names(folder: Path) -> set[str]:
    return {path.name for path in folder.iterdir()} if folder.exists() else set()


# ---------------------------------------------------------------- HTTPS/loopback downloads

def test_download_verifies_records_digest_and_second_call_makes_no_request(server, archive_bytes, tmp_path, caplog,
                                                                        monkeypatch):
    url = server.serve("/files/pets.zip", archive_bytes)
    downloads = tmp_path / "downloads"
    caplog.set_level("INFO", logger="tasks.data.acquire")
    monkeypatch.setenv("CATSDOGS_PROGRESS_SECONDS", "0")

    path = acq.acquire_source(url, downloads)

    assert path == downloads / "pets.zip" and path.read_bytes() == archive_bytes
    assert json.loads((downloads / "digests.json").read_text())[url]["sha256"] == _sha(archive_bytes)
    assert _names(downloads) == {"pets.zip", "digests.json", ".sha256-cache.json"}  # no .part left
    assert any("100%" in message for message in caplog.messages)  # progress is logged
    assert len(server.hits) == 1
    before = {p.name: p.stat().st_mtime_ns for p in downloads.iterdir()}

    assert acq.acquire_source(url, downloads) == path
    assert len(server.hits) == 1  # cached: zero requests
    assert {p.name: p.stat().st_mtime_ns for p in downloads.iterdir()} == before  # and zero writes


def test_wrong_expected_checksum_deletes_download_and_is_not_retried(server, archive_bytes, tmp_path):
    url = server.serve("/pets.zip", archive_bytes)
    downloads = tmp_path / "downloads"
    with pytest.raises(AcquireError, match="Checksum mismatch") as info:
        acq.acquire_source(url, downloads, expected_sha256="0" * 64)
    assert isinstance(info.value, InputError)
    assert not any(name.startswith("pets.zip") for name in _names(downloads))  # neither final nor .part
    assert not (downloads / "digests.json").exists()  # a bad download is never trusted
    assert len(server.hits) == 1


def test_trusted_digest_detects_changed_file_on_later_download(server, archive_bytes, tmp_path):
    url = server.serve("/pets.zip", archive_bytes)
    downloads = tmp_path / "downloads"
    acq.acquire_source(url, downloads).unlink()
    server.serve("/pets.zip", archive_bytes.replace(b"noise.jpg", b"noize.jpg"))  # the file changed

    with pytest.raises(AcquireError, match="trusted on first use"):
        acq.acquire_source(url, downloads)
    assert _names(downloads) == {"digests.json", ".sha256-cache.json"}


def test_corrupted_cached_file_is_downloaded_again(server, archive_bytes, tmp_path):
    url = server.serve("/pets.zip", archive_bytes)
    downloads = tmp_path / "downloads"
    path = acq.acquire_source(url, downloads)
    path.write_bytes(b"bit rot" + archive_bytes[7:])

    assert acq.acquire_source(url, downloads).read_bytes() == archive_bytes
    assert len(server.hits) == 2


def test_expected_sha256_that_contradicts_the_verified_cache_is_an_error(server, archive_bytes, tmp_path):
    url = server.serve("/pets.zip", archive_bytes)
    downloads = tmp_path / "downloads"
    path = acq.acquire_source(url, downloads)
    with pytest.raises(AcquireError, match="--sha256 is"):
        acq.acquire_source(url, downloads, expected_sha256="a" * 64)
    assert path.read_bytes() == archive_bytes and len(server.hits) == 1  # kept, not re-downloaded


@pytest.mark.parametrize("ranges", [True, False], ids=["range", "no-range"])
def test_connection_cut_midway_resumes_or_restarts(server, archive_bytes, tmp_path, ranges):
    cut = len(archive_bytes) // 3
    url = server.serve("/pets.zip", archive_bytes, ranges=ranges, cut_after=cut, cuts=1)

    path = acq.acquire_source(url, tmp_path / "downloads", expected_sha256=_sha(archive_bytes))

    assert path.read_bytes() == archive_bytes
    first, second = server.hits
    assert first.sent == cut
    kept = int(second.range.removeprefix("bytes=").removesuffix("-"))  # bytes that reached the .part file
    assert 0 < kept <= cut
    if ranges:
        assert (second.status, second.sent) == (206, len(archive_bytes) - kept)  # only the missing bytes
    else:
        assert (second.status, second.sent) == (200, len(archive_bytes))  # clean restart


@pytest.mark.parametrize("ranges", [True, False], ids=["range", "no-range"])
def test_partial_file_from_an_earlier_run_is_resumed_or_replaced(server, archive_bytes, tmp_path, ranges):
    """A killed process leaves `<name>.part` and its metadata; the next run continues from there."""
    url = server.serve("/pets.zip", archive_bytes, ranges=ranges)
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    done = len(archive_bytes) // 2
    (downloads / "pets.zip.part").write_bytes(archive_bytes[:done])
    (downloads / "pets.zip.part.json").write_text(json.dumps(
        {"url": url, "total": len(archive_bytes), "validator": '"v1"'}))

    path = acq.acquire_source(url, downloads)

    assert path.read_bytes() == archive_bytes
    [hit] = server.hits
    assert hit.range == f"bytes={done}-"
    assert hit.sent == (len(archive_bytes) - done if ranges else len(archive_bytes))
    assert not (downloads / "pets.zip.part").exists() and not (downloads / "pets.zip.part.json").exists()


def test_complete_partial_file_from_an_earlier_run_is_not_downloaded_again(server, archive_bytes, tmp_path):
    url = server.serve("/pets.zip", archive_bytes)
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    (downloads / "pets.zip.part").write_bytes(archive_bytes)  # killed between last byte and rename
    (downloads / "pets.zip.part.json").write_text(json.dumps({"url": url, "total": len(archive_bytes)}))

    assert acq.acquire_source(url, downloads).read_bytes() == archive_bytes
    assert [(hit.status, hit.sent) for hit in server.hits] == [(416, 0)]


def test_partial_file_of_a_changed_remote_version_is_not_continued(server, archive_bytes, tmp_path):
    url = server.serve("/pets.zip", archive_bytes, etag='"v2"')
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    (downloads / "pets.zip.part").write_bytes(b"x" * 1000)  # bytes of an older version
    (downloads / "pets.zip.part.json").write_text(json.dumps({"url": url, "total": None, "validator": '"v1"'}))

    assert acq.acquire_source(url, downloads).read_bytes() == archive_bytes
    assert [(hit.status, hit.sent) for hit in server.hits] == [(200, len(archive_bytes))]


def test_http_404_is_one_actionable_error_without_retry(server, tmp_path):
    url = server.url("/missing.zip")
    with pytest.raises(AcquireError, match=r"HTTP 404 \(not found\)") as info:
        acq.acquire_source(url, tmp_path / "downloads")
    assert url in str(info.value)
    assert len(server.hits) == 1
    assert not list((tmp_path / "downloads").glob("*.part"))


def test_persistent_server_error_is_transient_so_the_task_retries(server, archive_bytes, tmp_path):
    url = server.serve("/pets.zip", archive_bytes, status=503)
    with pytest.raises(acq.TransientDownloadError) as info:
        acq.acquire_source(url, tmp_path / "downloads")
    assert not isinstance(info.value, InputError)
    assert len(server.hits) == acq.DOWNLOAD_ATTEMPTS


def test_connection_refused_is_tried_again_then_one_sentence_with_the_true_count(tmp_path, monkeypatch):
    with FileServer() as stopped:
        url = stopped.url("/pets.zip")
    fetches = _count_calls(monkeypatch, acq, "_fetch")
    with pytest.raises(UnreachableError, match=r"after 3 attempt\(s\): Connection refused; check this machine's "
                                               r"internet connection.*--source PATH") as info:
        steps.acquire(url, str(tmp_path / "data"))  # the Prefect task, with its retry policy
    assert isinstance(info.value.__cause__, requests.ConnectionError) and len(fetches) == acq.DOWNLOAD_ATTEMPTS
    assert len(str(info.value).splitlines()) == 1 and not isinstance(info.value, InputError)


def _count_calls(monkeypatch, owner, name: str) -> list[tuple]:
    """Record the calls of `owner.name` (the real function still runs)."""
    calls: list[tuple] = []
    real = getattr(owner, name)

    def counted(*args, **kwargs):
        calls.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(owner, name, counted)
    return calls


def test_an_unresolvable_host_is_tried_once_and_said_in_one_sentence(tmp_path, monkeypatch):
    """A machine without internet resolves no name: nine attempts over a minute would only delay the sentence."""
    monkeypatch.setenv(acq.PETIMAGES_URL_ENV, "https://download.catsdogs.invalid/kagglecatsanddogs_5340.zip")
    fetches = _count_calls(monkeypatch, acq, "_fetch")
    with pytest.raises(UnreachableError) as info:
        steps.acquire("petimages", str(tmp_path / "data"))
    assert len(fetches) == 1
    assert re.fullmatch(r"Could not download https://download\.catsdogs\.invalid/kagglecatsanddogs_5340\.zip after "
                        r"1 attempt\(s\): download\.catsdogs\.invalid does not resolve \([^)]+\); check this machine's "
                        r"internet connection and run the command again \(the download resumes\), or pass a local "
                        r"copy of the archive with --source PATH\.", str(info.value)), str(info.value)


def test_a_web_page_instead_of_an_archive_is_refused(server, tmp_path):
    url = server.serve("/pets.zip", b"<html>please log in</html>\n" * 50)
    with pytest.raises(AcquireError, match="not a zip or tar archive"):
        acq.acquire_source(url, tmp_path / "downloads")
    assert not (tmp_path / "downloads" / "pets.zip").exists()


def test_published_size_is_enforced(server, archive_bytes, tmp_path):
    url = server.serve("/pets.zip", archive_bytes)
    with pytest.raises(AcquireError, match="Size mismatch"):
        acq.download_url(url, tmp_path / "downloads", expected_size=len(archive_bytes) + 1)
    assert not (tmp_path / "downloads" / "pets.zip").exists()


def test_a_download_larger_than_the_free_space_is_refused_before_the_first_byte(server, archive_bytes, tmp_path):
    url = server.serve("/pets.zip", archive_bytes)
    with small_disk(tmp_path / "disk", "256k") as disk:
        downloads = disk / "data" / "downloads"
        with pytest.raises(DiskFullError) as caught:
            acq.download_url(url, downloads)
        message = str(caught.value)
        assert message.startswith(f"Downloading pets.zip needs {size_text(len(archive_bytes))} in {downloads}, "
                                  "but its disk has ") and len(message.splitlines()) == 1
        assert _names(downloads) == set()
    assert isinstance(caught.value, InputError)  # never retried by Prefect


def test_a_disk_that_fills_up_mid_download_is_one_sentence_and_the_partial_is_kept(server, tmp_path):
    """Room for the file as announced, but not for it and the download's own small state file beside it."""
    with small_disk(tmp_path / "disk", "1m") as disk:
        payload = random.Random(1).randbytes((1 << 20) - 1000)
        url = server.serve("/pets.zip", payload)
        downloads = disk / "downloads"
        with pytest.raises(DiskFullError) as caught:
            acq.download_url(url, downloads)
        assert str(caught.value).startswith(f"The disk holding {downloads} is full (")
        assert isinstance(caught.value.__cause__, OSError) and caught.value.__cause__.errno == 28
        assert "pets.zip" not in _names(downloads) and "pets.zip.part" in _names(downloads)  # resumable, not final


def test_petimages_url_is_overridable_and_trusted_on_first_use(server, archive_bytes, tmp_path, monkeypatch):
    assert acq.PETIMAGES_URL.endswith("/kagglecatsanddogs_5340.zip")
    url = server.serve("/kagglecatsanddogs_5340.zip", archive_bytes)
    monkeypatch.setenv(acq.PETIMAGES_URL_ENV, url)

    path = acq.acquire_source("petimages", tmp_path / "downloads")

    assert path.name == "kagglecatsanddogs_5340.zip" and path.read_bytes() == archive_bytes
    assert acq.read_digests(tmp_path / "downloads")[url]["sha256"] == _sha(archive_bytes)


def test_plain_http_is_refused_off_loopback_unless_a_digest_guards_it(tmp_path):
    with pytest.raises(AcquireError, match="plain http"):
        acq.acquire_source("http://example.com/pets.zip", tmp_path / "d")
    acq.check_url_policy("http://example.com/pets.zip", "b" * 64)  # allowed, with a warning
    acq.check_url_policy("http://127.0.0.1:8000/pets.zip", None)
    with pytest.raises(AcquireError, match="unsupported scheme"):
        acq.acquire_source("ftp://example.com/pets.zip", tmp_path / "d")
    with pytest.raises(AcquireError, match="not a sha256"):
        acq.acquire_source("https://example.com/pets.zip", tmp_path / "d", expected_sha256="abc")
    assert not (tmp_path / "d").exists()


def test_two_urls_with_the_same_file_name_do_not_share_a_cache(server, archive_bytes, tmp_path):
    other = archive_bytes.replace(b"noise.jpg", b"noize.jpg")
    first = acq.acquire_source(server.serve("/a/pets.zip", archive_bytes), tmp_path / "d")
    second = acq.acquire_source(server.serve("/b/pets.zip", other), tmp_path / "d")
    assert first != second
    assert first.read_bytes() == archive_bytes and second.read_bytes() == other


# ---------------------------------------------------------------- local sources

def test_local_archive_and_folder_are_returned_resolved(tmp_path, archive_bytes, monkeypatch):
    archive = tmp_path / "pets.zip"
    archive.write_bytes(archive_bytes)
    monkeypatch.chdir(tmp_path)
    assert acq.acquire_source("pets.zip", tmp_path / "d") == archive.resolve()
    assert acq.acquire_source(str(tmp_path), tmp_path / "d") == tmp_path.resolve()
    assert acq.acquire_source("pets.zip", tmp_path / "d", expected_sha256=_sha(archive_bytes)) == archive.resolve()
    with pytest.raises(AcquireError, match="Checksum mismatch"):
        acq.acquire_source("pets.zip", tmp_path / "d", expected_sha256="c" * 64)


def test_missing_path_names_it_and_what_to_pass(tmp_path):
    missing = tmp_path / "nowhere" / "pets.zip"
    with pytest.raises(AcquireError) as info:
        acq.acquire_source(str(missing), tmp_path / "d")
    message = str(info.value)
    assert str(missing) in message and "https://" in message and "'kaggle'" in message


def test_local_file_that_is_not_an_archive_is_refused(tmp_path):
    text = tmp_path / "notes.zip"
    text.write_text("not really a zip\n")
    with pytest.raises(AcquireError, match="not a zip or tar archive"):
        acq.acquire_source(str(text), tmp_path / "d")


# ---------------------------------------------------------------- Kaggle

@pytest.fixture
def no_kaggle_credentials(tmp_path, monkeypatch):
    """A home with no Kaggle files and no Kaggle variables."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(home / ".config"))
    for name in ("KAGGLE_USERNAME", "KAGGLE_KEY", "KAGGLE_API_TOKEN", "KAGGLE_CONFIG_DIR"):
        monkeypatch.delenv(name, raising=False)
    return home


def test_kaggle_without_credentials_names_both_places_and_never_imports_the_client(
        no_kaggle_credentials, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "kaggle", None)  # any import attempt would fail differently
    with pytest.raises(AcquireError) as info:
        acq.acquire_source("kaggle", tmp_path / "downloads")
    message = str(info.value)
    assert "~/.kaggle/kaggle.json" in message and "KAGGLE_USERNAME" in message and "KAGGLE_KEY" in message


def test_kaggle_credentials_are_found_in_file_or_environment(no_kaggle_credentials, monkeypatch):
    assert not acq.kaggle_credentials_present()
    monkeypatch.setenv("KAGGLE_USERNAME", "someone")
    assert not acq.kaggle_credentials_present()  # a username alone is not a credential
    monkeypatch.setenv("KAGGLE_KEY", "secret")
    assert acq.kaggle_credentials_present()
    monkeypatch.delenv("KAGGLE_USERNAME")
    (no_kaggle_credentials / ".kaggle").mkdir()
    (no_kaggle_credentials / ".kaggle" / "kaggle.json").write_text('{"username": "u", "key": "k"}')
    assert acq.kaggle_credentials_present()


def test_kaggle_403_says_to_accept_the_rules(no_kaggle_credentials, tmp_path, monkeypatch):
    """The real client runs; only its HTTP send is replaced by Kaggle's answer for unaccepted rules."""
    monkeypatch.setenv("KAGGLE_USERNAME", "someone")
    monkeypatch.setenv("KAGGLE_KEY", "not-a-real-key")
    from kagglesdk.kaggle_http_client import KaggleHttpClient

    calls = []

    def forbidden(self, service_name, request_name, request, response_type):
        self._init_session()
        prepared = self._prepare_request(service_name, request_name, request)
        calls.append(prepared.url)
        response = requests.Response()
        response.status_code = 403
        response.url = prepared.url
        response.request = prepared
        response.headers["Content-Type"] = "application/json"
        response._content = b'{"code": 403, "message": "You must accept this competition\'s rules"}'
        return self._prepare_response(response_type, response)

    monkeypatch.setattr(KaggleHttpClient, "call", forbidden)
    with pytest.raises(AcquireError) as info:
        acq.acquire_source("kaggle", tmp_path / "downloads")
    assert "https://www.kaggle.com/competitions/dogs-vs-cats/rules" in str(info.value)
    assert "403" in str(info.value)
    assert calls and "DownloadDataFiles" in calls[0]
    assert not (tmp_path / "downloads" / "dogs-vs-cats.zip").exists()


@pytest.mark.parametrize("offline", ["unresolvable", "refused"])
def test_kaggle_offline_is_the_one_download_sentence_from_the_real_client(offline, no_kaggle_credentials, tmp_path,
                                                                         monkeypatch):
    """The real client, its API host an unresolvable name or a closed loopback port: what a machine offline meets."""
    import kagglesdk.kaggle_env as kaggle_env
    from kagglesdk.kaggle_http_client import KaggleHttpClient

    monkeypatch.setenv("KAGGLE_USERNAME", "someone")
    monkeypatch.setenv("KAGGLE_KEY", "0" * 32)
    with FileServer() as stopped:
        closed = stopped.url("").rstrip("/")
    host = "https://api.kaggle.invalid" if offline == "unresolvable" else closed
    monkeypatch.setitem(kaggle_env._env_to_endpoint, kaggle_env.get_env(), host)
    calls = _count_calls(monkeypatch, KaggleHttpClient, "call")
    with pytest.raises(UnreachableError) as info:
        steps.acquire("kaggle", str(tmp_path / "data"))
    message = str(info.value)
    attempts = 1 if offline == "unresolvable" else acq.DOWNLOAD_ATTEMPTS
    assert len(calls) == attempts  # a name that does not resolve is not tried again, nor by the task
    assert message.startswith(f"Could not download Kaggle competition 'dogs-vs-cats' after {attempts} attempt(s): ")
    assert message.endswith("check this machine's internet connection and run the command again, or pass --source "
                            "petimages or a local copy of the archive with --source PATH.")
    assert ("api.kaggle.invalid does not resolve" in message) == (offline == "unresolvable")
    assert len(message.splitlines()) == 1 and isinstance(info.value.__cause__, requests.ConnectionError)
    assert not (tmp_path / "data" / "downloads" / "dogs-vs-cats.zip").exists()


def test_verified_kaggle_zip_is_reused_without_credentials(no_kaggle_credentials, tmp_path, archive_bytes):
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    (downloads / "dogs-vs-cats.zip").write_bytes(archive_bytes)
    acq._record_digest(downloads, "kaggle:dogs-vs-cats", "dogs-vs-cats.zip", _sha(archive_bytes), len(archive_bytes))

    assert acq.acquire_source("kaggle", downloads) == downloads / "dogs-vs-cats.zip"


# ---------------------------------------------------------------- the Prefect task

def test_task_retries_io_only():
    assert steps.acquire.retries == 2
    assert steps.acquire.retry_condition_fn is retry_unless_input_error
