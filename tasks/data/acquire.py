"""Acquire the source: find it locally, or download it once, verified and atomically.

A source is "kaggle" (the competition zip through the official Kaggle client), "petimages"
(Microsoft's public zip of the same images), an https:// URL, a local archive or an already
extracted folder. Downloads land in `downloads_dir` under a `.part` name and take their final
name only after the size and sha256 checks, so a final name always holds verified bytes and a
verified archive is never downloaded twice. An interrupted download resumes with an HTTP Range
request when the server allows it and restarts cleanly when it does not.

Trust on first use: neither Microsoft nor Kaggle publishes a sha256 for these archives, so the
digest of the first verified download is recorded in `downloads_dir/digests.json`, keyed by the
source (its URL, or `kaggle:<competition>`), and every later use, the cached file or a fresh
download, must match it. A caller's `expected_sha256` takes precedence and replaces the record.

Plain http:// is refused (the first download could not be trusted) unless the host is loopback
or the caller passes `expected_sha256`, which makes the transport irrelevant to integrity.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import os
import re
import shutil
import socket
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path, PurePosixPath
from typing import Any, TypeVar
from urllib.parse import unquote, urlsplit

import requests
from urllib3.exceptions import NameResolutionError

from tasks.common.diskspace import ensure_room, no_room
from tasks.common.errors import AcquireError, UnreachableError, is_disk_full
from tasks.common.files import atomic_write_json, read_json_object, sha256_file, sha256_file_cached, write_if_changed
from tasks.common.logs import run_logger
from tasks.common.progress import Progress
from tasks.data.extract import archive_kind

KAGGLE_COMPETITION = "dogs-vs-cats"
KAGGLE_RULES_URL = f"https://www.kaggle.com/competitions/{KAGGLE_COMPETITION}/rules"

PETIMAGES_URL = ("https://download.microsoft.com/download/3/E/1/3E1C3F21-ECDB-4869-8368-6DEBA77B919F/"
                 "kagglecatsanddogs_5340.zip")
PETIMAGES_URL_ENV = "CATSDOGS_PETIMAGES_URL"
"""Environment variable overriding PETIMAGES_URL (a mirror, or a loopback server in tests)."""
PETIMAGES_SIZE = 824_887_076
"""Content-Length that download.microsoft.com serves for PETIMAGES_URL; Microsoft publishes no digest."""

DIGESTS_NAME = "digests.json"
DOWNLOAD_ATTEMPTS = 3
RETRY_BACKOFF_S = 1.0
TIMEOUT_S = (15.0, 120.0)  # connect, read (per chunk)
_CHUNK = 1 << 20
_NET_CHUNK = 1 << 16  # bytes read but not yet yielded are lost when a connection breaks: keep it small
_SOURCES_HINT = ("pass --source with an existing .zip/.tar/.tar.gz/.tgz archive or an extracted folder, "
                 "an https:// URL, 'kaggle' or 'petimages'")


class TransientDownloadError(OSError):
    """A download failed in a way that retrying can fix (cut connection, 5xx, changed partial)."""


class DownloadFailedError(TransientDownloadError, UnreachableError):
    """A download that stayed broken through every attempt here: says how many, what to check and the way around it."""


T = TypeVar("T")

_TRANSIENT = (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError,
              TransientDownloadError)


# ---------------------------------------------------------------- public entry points

def acquire_source(source: str, downloads_dir: Path, *, expected_sha256: str | None = None) -> Path:
    """Return a verified local archive or folder for `source`, downloading at most once.

    The keywords "kaggle" and "petimages" win over a local folder of that name (pass "./kaggle").
    Raises AcquireError (never worth retrying) for bad input; network failures that a retry can
    fix propagate as requests/OSError exceptions so the Prefect task retries and resumes.
    """
    source = str(source)  # a Path is welcome too
    downloads_dir = Path(downloads_dir)
    expected = _normalise_digest(expected_sha256)
    keyword = source.strip().lower()
    if keyword == "kaggle":
        return acquire_kaggle(downloads_dir, expected_sha256=expected)
    if keyword == "petimages":
        url = os.environ.get(PETIMAGES_URL_ENV) or PETIMAGES_URL
        size = PETIMAGES_SIZE if url == PETIMAGES_URL else None
        return download_url(url, downloads_dir, expected_sha256=expected, expected_size=size)
    scheme = urlsplit(source).scheme.lower()
    if scheme in ("http", "https"):
        return download_url(source, downloads_dir, expected_sha256=expected)
    if "://" in source:
        raise AcquireError(f"Source {source!r} uses an unsupported scheme; {_SOURCES_HINT}.")
    return local_source(source, downloads_dir, expected_sha256=expected)


def source_uri(source: str) -> str:
    """Where a source's bytes come from, as a URI people can follow (for lineage records)."""
    keyword = str(source).strip().lower()
    if keyword == "petimages":
        return os.environ.get(PETIMAGES_URL_ENV) or PETIMAGES_URL
    if keyword == "kaggle":
        return f"https://www.kaggle.com/competitions/{KAGGLE_COMPETITION}/data"
    if "://" in str(source):
        return str(source)
    return Path(source).expanduser().absolute().as_uri()


def check_source(source: str) -> None:
    """Refuse a local source that is not there, with the sentence acquiring it would end in, before any work.

    What a command line checks before it starts a server or a flow: the answer needs no download,
    no store and no Prefect (keywords and URLs are judged when they are acquired).
    """
    source = str(source)
    if source.strip().lower() in ("kaggle", "petimages") or "://" in source:
        return
    path = Path(source).expanduser()
    if not path.exists():
        raise AcquireError(f"Source {source!r} does not exist (looked for {path.absolute()}); {_SOURCES_HINT}.")


def local_source(source: str, downloads_dir: Path, *, expected_sha256: str | None = None) -> Path:
    """A local archive or folder, resolved; checked against `expected_sha256` when one is given."""
    expected_sha256 = _normalise_digest(expected_sha256)
    check_source(source)
    path = Path(source).expanduser().resolve()
    if path.is_dir():
        if expected_sha256:
            raise AcquireError(f"Source {path} is a folder, which has no sha256; drop --sha256 "
                               "or pass the archive it came from as --source.")
        return path
    if archive_kind(path) is None:
        raise AcquireError(f"Source {path} is not a zip or tar archive; {_SOURCES_HINT}.")
    if expected_sha256:
        digest = sha256_file_cached(path, downloads_dir)
        if digest != expected_sha256:
            raise AcquireError(f"Checksum mismatch for {path}: expected sha256 {expected_sha256} but the file has "
                               f"{digest}; check --sha256 or replace the file.")
    return path


# ---------------------------------------------------------------- trust on first use

def _normalise_digest(value: str | None) -> str | None:
    if value is None or not value.strip():
        return None
    digest = value.strip().lower()
    if not re.fullmatch(r"[0-9a-f]{64}", digest):
        raise AcquireError(f"--sha256 {value!r} is not a sha256 hex digest; pass 64 hex characters or leave it out.")
    return digest


def read_digests(downloads_dir: Path) -> dict[str, dict[str, Any]]:
    """The trusted digests recorded in downloads_dir/digests.json ({} when there are none)."""
    try:
        book = json.loads((Path(downloads_dir) / DIGESTS_NAME).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as err:
        raise AcquireError(f"{Path(downloads_dir) / DIGESTS_NAME} is unreadable ({err}); fix or delete it "
                           "(its digests will then be trusted again on first use).") from err
    return book if isinstance(book, dict) else {}


def _record_digest(downloads_dir: Path, key: str, file_name: str, digest: str, size: int) -> None:
    """Record the trusted digest of `key`; writes nothing when the record already says so."""
    book = read_digests(downloads_dir)
    old = book.get(key) or {}
    if old.get("sha256") == digest and old.get("file") == file_name and old.get("size") == size:
        return
    if old.get("sha256") and old["sha256"] != digest:
        run_logger(__name__).warning("Replacing the trusted sha256 of %s (%s) with %s, as expected_sha256 asked",
                          key, old["sha256"], digest)
    book[key] = {"file": file_name, "sha256": digest, "size": size,
                 "recorded_at": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    write_if_changed(Path(downloads_dir) / DIGESTS_NAME,
                     (json.dumps(book, indent=2, sort_keys=True) + "\n").encode("utf-8"))


def _use_cached(final: Path, key: str, downloads_dir: Path, expected_sha256: str | None,
                expected_size: int | None) -> bool:
    """True when `final` holds the trusted bytes; a corrupt cached file is deleted to be fetched again.

    The digest comes from a stat-keyed cache, so an untouched archive is hashed once, not per run.
    """
    if not final.is_file():
        return False
    log = run_logger(__name__)
    size = final.stat().st_size
    if expected_size is not None and size != expected_size:
        log.warning("%s has %d bytes, not the published %d; downloading it again", final, size, expected_size)
        final.unlink()
        return False
    digest = sha256_file_cached(final, downloads_dir)
    recorded = (read_digests(downloads_dir).get(key) or {}).get("sha256")
    trusted = expected_sha256 or recorded
    if expected_sha256 and digest != expected_sha256 and digest == recorded:
        raise AcquireError(f"{final} holds sha256 {digest}, verified when it was downloaded, but "
                           f"--sha256 is {expected_sha256}; check --sha256, or delete "
                           "the file to download it again.")
    if trusted is None:
        ok = archive_kind(final) is not None
        if ok:
            log.warning("Trusting %s on first use: it was already there, with no recorded digest", final)
    else:
        ok = digest == trusted
    if not ok:
        log.warning("%s is not the trusted archive; deleting it and downloading again", final)
        final.unlink()
        return False
    _record_digest(downloads_dir, key, final.name, digest, size)
    log.info("Using verified %s (sha256 %s)", final, digest[:16])
    return True


def _promote(part: Path, final: Path, key: str, downloads_dir: Path, *, expected_sha256: str | None,
             expected_size: int | None, digest: str | None = None, origin: str) -> Path:
    """Check a finished download and give it its final name; a bad one is deleted, never kept.

    The digest is recorded before the rename: a crash in between leaves a record and no file,
    and the next download is then checked against that record.
    """
    size = part.stat().st_size
    digest = digest or sha256_file(part)
    recorded = (read_digests(downloads_dir).get(key) or {}).get("sha256")
    trusted = expected_sha256 or recorded
    problem = None
    if expected_size is not None and size != expected_size:
        problem = (f"Size mismatch for {origin}: expected {expected_size} bytes but got {size}; the download was "
                   "deleted, check the URL or your network proxy.")
    elif trusted is not None and digest != trusted:
        why = "passed as expected_sha256" if expected_sha256 else f"trusted on first use in {downloads_dir / DIGESTS_NAME}"
        problem = (f"Checksum mismatch for {origin}: expected sha256 {trusted} ({why}) but the download has "
                   f"{digest}; the download was deleted, check the URL and expected_sha256, or remove the entry "
                   "from digests.json if the publisher really changed the file.")
    elif archive_kind(part) is None:
        problem = (f"The download from {origin} is not a zip or tar archive; the download was deleted, check "
                   "that the URL points at the archive itself and not at a web page.")
    if problem:
        part.unlink()
        raise AcquireError(problem)
    _record_digest(downloads_dir, key, final.name, digest, size)
    os.replace(part, final)
    sha256_file_cached(final, downloads_dir, known=digest)  # later runs need not re-hash
    run_logger(__name__).info("Verified %s (%d bytes, sha256 %s)", final, size, digest)
    return final


# ---------------------------------------------------------------- HTTPS downloads

def _is_loopback(host: str | None) -> bool:
    if not host:
        return False
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_url_policy(url: str, expected_sha256: str | None) -> None:
    """Allow https://, and http:// only to loopback or when a sha256 guards the bytes anyway."""
    parts = urlsplit(url)
    if parts.scheme == "https":
        return
    if parts.scheme == "http":
        if _is_loopback(parts.hostname):
            return
        if expected_sha256:
            run_logger(__name__).warning("Downloading %s over plain http; expected_sha256 guards its integrity", url)
            return
        raise AcquireError(f"Refusing the plain http:// download {url}: without TLS its first download cannot be "
                           "trusted; use an https:// URL or pass --sha256.")
    raise AcquireError(f"Source {url!r} uses an unsupported scheme; {_SOURCES_HINT}.")


def _download_name(url: str, book: dict[str, dict[str, Any]]) -> str:
    """File name for a URL: its last path segment, prefixed by a URL hash if another URL owns that name."""
    if isinstance(book.get(url), dict) and book[url].get("file"):
        return str(book[url]["file"])
    name = re.sub(r"[^A-Za-z0-9._-]", "_", unquote(PurePosixPath(urlsplit(url).path).name)).lstrip(".")
    name = name or "download"
    if any(key != url and isinstance(rec, dict) and rec.get("file") == name for key, rec in book.items()):
        name = f"{hashlib.sha256(url.encode()).hexdigest()[:8]}-{name}"
    return name


def _raise_for_status(url: str, response: requests.Response) -> None:
    """Turn an HTTP error into AcquireError when retrying cannot help, else into a transient error."""
    code = response.status_code
    if code in (200, 206, 416):
        return
    if code in (401, 403):
        raise AcquireError(f"{url} answered HTTP {code} (access denied); check that the URL is public, or "
                           "download the archive yourself and pass it with --source PATH.")
    if code in (404, 410):
        raise AcquireError(f"{url} answered HTTP {code} (not found); check the URL, or pass a local archive "
                           "or folder with --source instead.")
    if 400 <= code < 500 and code not in (408, 429):
        raise AcquireError(f"{url} answered HTTP {code}; check the URL, or pass a local archive or folder with --source instead.")
    raise TransientDownloadError(f"{url} answered HTTP {code}, usually temporary")


def _discard(*paths: Path) -> None:
    for path in paths:
        path.unlink(missing_ok=True)


def _fetch(url: str, part: Path, meta: Path, session: requests.Session, expected_sha256: str | None) -> str:
    """One attempt: request the rest of `part` (or all of it) and stream it in; returns the sha256.

    `meta` remembers which URL and which version (ETag/Last-Modified, sent back as If-Range)
    the partial bytes belong to, so a partial is only ever continued with bytes of the same file.
    """
    log = run_logger(__name__)
    state = read_json_object(meta)
    offset = part.stat().st_size if part.is_file() and state.get("url") == url else 0
    if offset == 0:
        _discard(part, meta)
    headers = {"Accept-Encoding": "identity"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
        if state.get("validator"):
            headers["If-Range"] = state["validator"]
    with session.get(url, headers=headers, stream=True, timeout=TIMEOUT_S) as response:
        check_url_policy(response.url, expected_sha256)  # after redirects
        _raise_for_status(url, response)
        if response.status_code == 416:
            if offset and state.get("total") == offset:  # every byte arrived before the last run stopped
                log.info("%s was already complete", part)
                return sha256_file(part)
            _discard(part, meta)
            raise TransientDownloadError(f"{url} refused to resume at byte {offset}; restarting")
        total = _total_size(response)
        if response.status_code == 206:
            match = re.fullmatch(r"bytes (\d+)-\d+/(\d+|\*)", response.headers.get("Content-Range", "").strip())
            if not match or int(match.group(1)) != offset or (state.get("total") not in (None, total)):
                _discard(part, meta)
                raise TransientDownloadError(f"{url} resumed at an unexpected place; restarting")
            log.info("Resuming %s at byte %d", url, offset)
            mode = "ab"
        else:
            if offset:
                log.info("%s does not resume partial downloads; restarting from the first byte", url)
            offset, mode = 0, "wb"
        name = part.name[: -len('.part')]
        if total is not None:  # refuse before the first byte rather than fill the disk
            ensure_room(part.parent, total - offset, f"Downloading {name}")
        atomic_write_json(meta, {"url": url, "total": total,
                                 "validator": response.headers.get("ETag") or response.headers.get("Last-Modified")})
        hasher = hashlib.sha256()
        if mode == "ab":
            with open(part, "rb") as existing:
                for chunk in iter(lambda: existing.read(_CHUNK), b""):
                    hasher.update(chunk)
        progress = Progress(f"Downloading {name}", total, "MB", scale=1e6, done=offset, logger_name=__name__)
        try:
            with open(part, mode) as out:
                for chunk in response.iter_content(_NET_CHUNK):
                    out.write(chunk)
                    hasher.update(chunk)
                    progress.advance(len(chunk))
        except OSError as error:
            if is_disk_full(error):  # the partial stays: the download resumes once there is room
                raise no_room(part.parent) from error
            raise
        progress.finish()
    if total is not None and part.stat().st_size != total:
        raise TransientDownloadError(f"{url} ended after {part.stat().st_size} of {total} bytes")
    return hasher.hexdigest()


def _total_size(response: requests.Response) -> int | None:
    """Full size of the remote file from Content-Range (206) or Content-Length (200)."""
    if response.status_code == 206:
        total = response.headers.get("Content-Range", "").rpartition("/")[2]
        return int(total) if total.isdigit() else None
    length = response.headers.get("Content-Length", "")
    return int(length) if length.isdigit() else None


def download_url(url: str, downloads_dir: Path, *, expected_sha256: str | None = None,
                 expected_size: int | None = None, attempts: int = DOWNLOAD_ATTEMPTS) -> Path:
    """Download `url` into downloads_dir once: resumable, verified, atomic; returns the archive path.

    Cut connections and 5xx answers are retried here `attempts` times, resuming each time; if
    they persist the transient error propagates (the Prefect task retries later, resuming again).
    """
    expected_sha256 = _normalise_digest(expected_sha256)
    check_url_policy(url, expected_sha256)
    downloads_dir = Path(downloads_dir)
    downloads_dir.mkdir(parents=True, exist_ok=True)
    name = _download_name(url, read_digests(downloads_dir))
    final = downloads_dir / name
    if _use_cached(final, url, downloads_dir, expected_sha256, expected_size):
        return final
    part, meta = downloads_dir / f"{name}.part", downloads_dir / f"{name}.part.json"
    run_logger(__name__).info("Downloading %s to %s", url, final)
    with requests.Session() as session:
        session.headers["User-Agent"] = "catsdogs-pipeline (+requests)"
        digest = with_attempts(url, attempts, lambda: _fetch(url, part, meta, session, expected_sha256),
                               "run the command again (the download resumes), or pass a local copy of the archive "
                               "with --source PATH")
    try:
        return _promote(part, final, url, downloads_dir, expected_sha256=expected_sha256,
                        expected_size=expected_size, digest=digest, origin=url)
    finally:
        _discard(meta)


def with_attempts(origin: str, attempts: int, fetch: Callable[[], T], way_around: str) -> T:
    """`fetch()`, tried up to `attempts` times while it fails in a way a retry can fix; then one sentence.

    A host name that does not resolve is not tried again: the machine is offline (or the name is
    wrong), and seconds later it still is. Every connection error ends as DownloadFailedError,
    whose sentence says how many attempts were made, what to check and `way_around`; the acquire
    task does not retry it again (tasks/common/errors.py).
    """
    log = run_logger(__name__)
    for attempt in range(1, attempts + 1):
        try:
            return fetch()
        except _TRANSIENT as err:
            offline = unresolved_host(err)
            if attempt == attempts or offline:
                why = f"{offline} does not resolve ({_short_reason(err)})" if offline else _short_reason(err)
                raise DownloadFailedError(
                    f"Could not download {origin} after {attempt} attempt(s): {why}; check this machine's internet "
                    f"connection and {way_around}.") from err
            log.warning("Download of %s interrupted (%s); retrying (%d/%d)", origin, _short_reason(err), attempt, attempts)
            time.sleep(RETRY_BACKOFF_S * attempt)
    raise AssertionError("unreachable: attempts must be at least 1")


def unresolved_host(err: BaseException) -> str | None:
    """The host name that failed to resolve somewhere in `err`'s chain (requests -> urllib3 -> socket), or None."""
    seen: set[int] = set()
    todo: list[Any] = [err]
    while todo:
        current = todo.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, NameResolutionError):
            return str(getattr(current, "_host", None) or "its host")
        if isinstance(current, socket.gaierror):
            return "its host"
        if isinstance(current, BaseException):
            todo += [current.__cause__, current.__context__, getattr(current, "reason", None), *current.args]
    return None


def _short_reason(err: Exception) -> str:
    """The operating system's words for a failed connection ("Name or service not known"), not requests' whole chain."""
    match = re.search(r"\[Errno -?\d+\] ([^'\")]+)", str(err))
    return match.group(1).strip() if match else (str(err).splitlines() or [type(err).__name__])[0][:200]


# ---------------------------------------------------------------- Kaggle

def kaggle_credentials_present() -> bool:
    """Whether any credential the Kaggle client reads exists (checked without importing the client).

    The client exits the process when it finds none, so this check runs first.
    """
    env = os.environ
    if (env.get("KAGGLE_USERNAME") and env.get("KAGGLE_KEY")) or env.get("KAGGLE_API_TOKEN"):
        return True
    home = Path.home()
    xdg = Path(env.get("XDG_CONFIG_HOME") or home / ".config") / "kaggle"
    folders = [Path(env["KAGGLE_CONFIG_DIR"])] if env.get("KAGGLE_CONFIG_DIR") else []
    folders += [home / ".kaggle", xdg]
    names = ("kaggle.json", "access_token", "access_token.txt", "credentials.json")
    return any((folder / name).is_file() for folder in folders for name in names)


def _kaggle_api(competition: str) -> Any:
    """The authenticated official client, imported only now: it is an optional extra."""
    try:
        from kaggle.api.kaggle_api_extended import KaggleApi
    except ImportError as err:
        raise AcquireError("The Kaggle client is not installed; run pip install 'catsdogs-pipeline[kaggle]', "
                           "or use --source petimages or a local archive.") from err
    api = KaggleApi()
    try:
        api.authenticate()
    except SystemExit as err:  # the client calls exit(1) when it finds no usable credentials
        raise AcquireError(f"The Kaggle client found no usable credentials for '{competition}'; save an API token "
                           "as ~/.kaggle/kaggle.json or set KAGGLE_USERNAME and KAGGLE_KEY.") from err
    return api


def _kaggle_http_error(err: requests.HTTPError, competition: str) -> Exception:
    """Kaggle's refusals as the sentence that fixes them; a server's hiccup as a transient error (tried again)."""
    code = err.response.status_code if err.response is not None else None
    if code == 403:
        return AcquireError(f"Kaggle refused the download of '{competition}' (HTTP 403, competition rules not "
                            f"accepted): accept them at https://www.kaggle.com/competitions/{competition}/rules "
                            "while logged in, then run again.")
    if code == 401:
        return AcquireError("Kaggle rejected the credentials (HTTP 401); create a new API token at "
                            "https://www.kaggle.com/settings and save it as ~/.kaggle/kaggle.json "
                            "(or set KAGGLE_USERNAME and KAGGLE_KEY).")
    if code == 404:
        return AcquireError(f"Kaggle has no competition '{competition}' (HTTP 404); check its name.")
    if code is not None and 400 <= code < 500 and code not in (408, 429):
        return AcquireError(f"Kaggle refused the download of '{competition}' (HTTP {code}); check the client's "
                            "version (pip install -U kaggle), or pass --source petimages or a local archive.")
    return TransientDownloadError(f"Kaggle answered HTTP {code}, usually temporary")


def acquire_kaggle(downloads_dir: Path, *, expected_sha256: str | None = None,
                   competition: str = KAGGLE_COMPETITION) -> Path:
    """The competition zip (train.zip, test1.zip, sampleSubmission.csv) via the official client.

    A verified copy in downloads_dir is used without credentials or network. The client
    downloads into a hidden staging folder (kept between attempts, so its own resume works),
    and the zip is promoted only after verification.
    """
    downloads_dir = Path(downloads_dir)
    expected_sha256 = _normalise_digest(expected_sha256)
    key = f"kaggle:{competition}"
    final = downloads_dir / f"{competition}.zip"
    if _use_cached(final, key, downloads_dir, expected_sha256, None):
        return final
    if not kaggle_credentials_present():
        raise AcquireError("Kaggle credentials not found: save your API token as ~/.kaggle/kaggle.json "
                           "(Kaggle > Settings > API > Create New Token) or set KAGGLE_USERNAME and KAGGLE_KEY, "
                           "or pass --source petimages or a local archive instead.")
    api = _kaggle_api(competition)
    staging = downloads_dir / f".{competition}.kaggle-part"
    staging.mkdir(parents=True, exist_ok=True)
    run_logger(__name__).info("Downloading Kaggle competition %s into %s", competition, staging)

    def download() -> None:
        try:
            api.competition_download_files(competition, path=str(staging), quiet=False)
        except requests.HTTPError as err:
            raise _kaggle_http_error(err, competition) from err

    with_attempts(f"Kaggle competition '{competition}'", DOWNLOAD_ATTEMPTS, download,
                  "run the command again, or pass --source petimages or a local copy of the archive with --source PATH")
    archive = staging / f"{competition}.zip"
    if not archive.is_file():
        found = sorted(path.name for path in staging.iterdir())
        raise TransientDownloadError(f"The Kaggle client left no {archive.name} in {staging} (found {found})")
    result = _promote(archive, final, key, downloads_dir, expected_sha256=expected_sha256, expected_size=None,
                      origin=f"Kaggle competition '{competition}'")
    shutil.rmtree(staging, ignore_errors=True)
    return result
