"""A real `mlflow models serve` of the champion: it answers images and pixels over HTTP, every bad row is
its own error, a bad request is one sentence, and the server's memory and time stay where they were.

One server for the module (every HTTP test of the served model is here, so it starts once), serving
the session's champion (tests/conftest.py `champion_store`) as users start it: the environment the
README's serve command sets (tests/test_readme.py reads the same block), and the limits lowered
through MLflow's own `MLFLOW_PYFUNC_INFERENCE_CONFIG` so that small requests reach them. The server's memory is the
resident set of its whole process tree, sampled while a request is answered; the peaks under the
probes' full-size loads, before and after these limits, are what benchmarks/serving_memory.py measures.
What only a proxy in front of the server can bound (the body's size and content type) is checked at
the end, with deployments/model-proxy.conf in a real nginx where nginx is installed (and the file's
settings in tests/team/test_compose.py everywhere).
"""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import threading
import time
from collections.abc import Iterator
from types import SimpleNamespace

import httpx
import pandas as pd
import psutil
import pytest
from PIL import Image

from tests.imagegen import class_pixels, image_bytes, tall_png
from tests.memory import PeakRss, tree_rss
from tests.servers import REPO_ROOT, base_env, free_port, running, start_process, wait_for_http, wait_until
from tests.test_readme import served_model

pytestmark = pytest.mark.slow

MAX_ROWS = 8
MAX_SECONDS = 2
HUGE_SIDE = 12_000
"""144 MP: under Pillow's own bomb limit (2 x 89.5 MP), far over training's 25 MP; decoded, 432 MB of RGB."""


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _payload(cells: list[str]) -> dict:
    return {"dataframe_split": {"columns": ["image"], "data": [[cell] for cell in cells]}}


@pytest.fixture(scope="module")
def server(tmp_path_factory, champion_store):
    root = tmp_path_factory.mktemp("model-server")
    limits = json.dumps({"max_rows": MAX_ROWS, "max_seconds": MAX_SECONDS})
    with served_model("models:/cats-vs-dogs@champion", champion_store.uri, root,
                      MLFLOW_PYFUNC_INFERENCE_CONFIG=limits) as server:
        yield server


def _invoke(server, payload: dict | bytes | Iterator[bytes], content_type: str = "application/json"
            ) -> httpx.Response:
    if isinstance(payload, dict):
        return httpx.post(f"{server.url}/invocations", json=payload, timeout=300)
    return httpx.post(f"{server.url}/invocations", content=payload, headers={"content-type": content_type},
                      timeout=300)


def _one_sentence_error(response: httpx.Response, sentence: str) -> None:
    """A refused request says why in a sentence, and nothing of the server's insides."""
    body = response.json()
    assert sentence in body["message"], body["message"][:500]
    assert "stack_trace" not in body and "Traceback" not in response.text and "site-packages" not in response.text
    assert len(response.content) < 4096


def test_the_server_answers_jpegs_and_pixels_with_a_row_each(server, champion_store, tmp_path, monkeypatch):
    """`mlflow models serve -m models:/cats-vs-dogs@champion --env-manager local` answers over HTTP, with the
    probabilities batch prediction writes for the same files (both on the champion's engine, OpenVINO)."""
    images = [image_bytes("cat", 50), image_bytes("dog", 51), b"\xff\xd8 corrupt jpeg"]
    payload = {"dataframe_split": {"columns": ["image"],
                                   "data": [[base64.b64encode(data).decode("ascii")] for data in images]}}
    response = _invoke(server, payload)
    assert response.status_code == 200, response.text
    rows = response.json()["predictions"]
    assert [row["label"] for row in rows] == ["cat", "dog", ""]
    assert rows[0]["p_dog"] < 0.5 < rows[1]["p_dog"]
    assert rows[0]["error"] == "" and rows[2]["error"]
    strict = json.loads(response.text, parse_constant=lambda name: pytest.fail(f"{name} is not JSON"))
    assert strict["predictions"][2]["p_dog"] is None
    from tasks.models.predictions import predict_folder

    monkeypatch.setenv("MLFLOW_TRACKING_URI", champion_store.uri)
    for index, data in enumerate(images[:2], start=1):
        (tmp_path / "images" / f"{index}.jpg").parent.mkdir(exist_ok=True)
        (tmp_path / "images" / f"{index}.jpg").write_bytes(data)
    batch = predict_folder(tmp_path / "images", "models:/cats-vs-dogs@champion", tmp_path / "submission.csv", 8)
    assert pd.read_csv(batch.output_csv)["label"].tolist() == pytest.approx([row["p_dog"] for row in rows[:2]],
                                                                            abs=1e-6)

    pixels = {"dataframe_split": {"columns": ["pixels"], "data": [[class_pixels("dog", 52).tolist()]]}}
    response = _invoke(server, pixels)
    assert response.status_code == 200, response.text
    assert response.json()["predictions"][0]["label"] == "dog"


def test_the_server_answers_the_probabilities_batch_prediction_writes(server, champion_store, tmp_path, monkeypatch):
    """Test-time augmentation and the temperature are inside the model: served and batch p(dog) agree to 1e-6."""
    from tasks.models.predictions import predict_folder

    monkeypatch.setenv("MLFLOW_TRACKING_URI", champion_store.uri)
    images = tmp_path / "images"
    images.mkdir()
    for index, label in enumerate(["cat", "dog", "dog", "cat"], start=1):
        (images / f"{index}.jpg").write_bytes(image_bytes(label, 300 + index, size=(57, 43)))
    written = predict_folder(images, "models:/cats-vs-dogs@champion", tmp_path / "submission.csv", 4)
    batch = pd.read_csv(written.output_csv)["label"].to_numpy()
    response = _invoke(server, _payload([_b64((images / f"{i}.jpg").read_bytes()) for i in range(1, 5)]))
    served = [row["p_dog"] for row in response.json()["predictions"]]
    assert abs(batch - served).max() <= 1e-6, (batch, served)  # the CSV's six decimals are the only difference


def test_a_bad_base64_row_is_that_rows_error_and_the_others_are_scored(server):
    response = _invoke(server, _payload([_b64(image_bytes("cat", 1)), "%%% not base64 %%%",
                                         _b64(image_bytes("dog", 2))]))
    assert response.status_code == 200, response.text
    rows = response.json()["predictions"]
    assert [row["label"] for row in rows] == ["cat", "", "dog"]
    assert "not valid base64" in rows[1]["error"] and rows[1]["p_dog"] is None
    assert rows[0]["error"] == rows[2]["error"] == ""


def test_a_12000_pixel_jpeg_is_refused_from_its_header_without_the_memory_to_decode_it(server):
    buffer = io.BytesIO()
    Image.new("RGB", (HUGE_SIDE, HUGE_SIDE), (90, 60, 200)).save(buffer, format="JPEG", quality=75)
    huge = buffer.getvalue()
    assert len(huge) < 4 * 2**20  # a few MB on the wire, 432 MB once decoded
    _invoke(server, _payload([_b64(image_bytes("dog", 3))]))  # warm: the first request compiles the model
    before = tree_rss(server.process.pid)
    with PeakRss(server.process.pid) as rss:
        response = _invoke(server, _payload([_b64(huge), _b64(image_bytes("dog", 4))]))
    assert response.status_code == 200, response.text
    rows = response.json()["predictions"]
    assert "above the limit" in rows[0]["error"] and f"{HUGE_SIDE}" in rows[0]["error"]
    assert rows[1]["label"] == "dog"
    grown = rss.peak - before
    assert grown < 200 * 2**20, f"the server grew by {grown / 2**20:.0f} MiB answering one refused image"


def test_a_request_of_more_rows_than_the_limit_is_refused_whole_in_one_sentence(server):
    cells = [_b64(image_bytes("cat", 10 + index)) for index in range(MAX_ROWS + 2)]
    response = _invoke(server, _payload(cells))
    assert response.status_code == 400, response.text[:500]
    _one_sentence_error(response, f"the request has {MAX_ROWS + 2} rows; at most {MAX_ROWS} are scored per request")


def test_a_parquet_bomb_is_refused_from_its_row_count_without_memory_or_a_huge_answer(server):
    """A few KB of zstd parquet that MLflow reads into a million rows: refused before any per-row work."""
    buffer = io.BytesIO()
    pd.DataFrame({"image": ["x"] * 1_000_000}).to_parquet(buffer, compression="zstd", index=False)
    assert len(buffer.getvalue()) < 100_000
    before = tree_rss(server.process.pid)
    with PeakRss(server.process.pid) as rss:
        response = _invoke(server, buffer.getvalue(), "application/vnd.apache.parquet")
    assert response.status_code == 400, response.text[:500]
    _one_sentence_error(response, f"the request has 1,000,000 rows; at most {MAX_ROWS} are scored per request")
    grown = rss.peak - before
    assert grown < 300 * 2**20, f"the server grew by {grown / 2**20:.0f} MiB refusing a {len(buffer.getvalue())}-byte body"


def test_a_request_the_model_cannot_use_is_400_with_one_sentence_and_no_stack_trace(server):
    response = _invoke(server, {"dataframe_split": {"columns": ["photo"], "data": [["x"]]}})
    assert response.status_code == 400, response.text[:500]
    _one_sentence_error(response, "it needs a column 'image' (base64 image text) or 'pixels' (pixel arrays)")


def test_work_stops_at_the_request_time_limit_and_the_unscored_rows_say_so(server):
    """25 MP PNGs (80 KB each, most of a second to decode): the rows past the time budget are error rows
    saying so, and the server is free for the next request. (No wall-clock bound: how many rows fit in
    the budget depends on the machine; that some do not is the behaviour.)"""
    buffer = io.BytesIO()
    Image.new("RGB", (5000, 5000), (200, 60, 90)).save(buffer, format="PNG")
    _invoke(server, _payload([_b64(image_bytes("dog", 5))]))  # warm: the first request compiles the model
    response = _invoke(server, _payload([_b64(buffer.getvalue())] * MAX_ROWS))
    assert response.status_code == 200, response.text[:500]
    rows = response.json()["predictions"]
    assert rows[0]["label"] in ("cat", "dog") and rows[0]["error"] == ""  # the first row is always begun
    unscored = [row for row in rows if row["p_dog"] is None]
    assert unscored and all(f"used up the {MAX_SECONDS} s it may take here" in row["error"] for row in unscored)
    assert rows[-1] in unscored  # rows are taken in order: the budget ends with the last ones
    response = _invoke(server, _payload([_b64(image_bytes("cat", 6))]))
    assert response.status_code == 200 and response.json()["predictions"][0]["label"] == "cat"


def test_requests_past_the_concurrency_limit_are_503_at_once_so_bodies_in_flight_are_bounded(server):
    """The README's serve command bounds requests in flight per process (uvicorn's own limit): bodies being
    read and parsed, which the model never sees, are at most that many; the others get HTTP 503 at once."""
    in_flight = int(server.env["UVICORN_LIMIT_CONCURRENCY"]) - 1  # uvicorn counts the new connection too
    body = json.dumps(_payload([_b64(image_bytes("dog", 7))])).encode()

    def slow_body():  # a client that takes two seconds to send its body: its request stays in flight
        for _ in range(20):
            yield b" " * 4096
            time.sleep(0.1)
        yield body

    answers: list[int] = []
    slow = [threading.Thread(target=lambda: answers.append(_invoke(server, slow_body()).status_code))
            for _ in range(in_flight)]
    for thread in slow:
        thread.start()
    time.sleep(0.8)
    started = time.monotonic()
    refused = [_invoke(server, body) for _ in range(3)]
    assert [response.status_code for response in refused] == [503] * 3
    assert time.monotonic() - started < 2
    for thread in slow:
        thread.join()
    assert answers == [200] * in_flight
    assert _invoke(server, body).status_code == 200


# ------------------------------------------------------------------ the proxy in front of it (team stack)

PROXY_CONF = REPO_ROOT / "deployments" / "model-proxy.conf"


@pytest.fixture(scope="module")
def proxy(server, tmp_path_factory):
    """deployments/model-proxy.conf in a real nginx, in front of the module's server (where nginx is installed)."""
    nginx = shutil.which("nginx") or next((path for path in ("/usr/sbin/nginx",) if os.access(path, os.X_OK)), None)
    if nginx is None:
        pytest.skip("nginx is not installed here; tests/team/test_compose.py still checks the proxy's settings")
    root = tmp_path_factory.mktemp("model-proxy")
    root.chmod(0o777)  # nginx's workers may run as an unprivileged user and buffer bodies here
    port = free_port()
    site = PROXY_CONF.read_text().replace("listen 8080;", f"listen 127.0.0.1:{port};")
    site = site.replace("http://model:5001", server.url)
    (root / "site.conf").write_text(site)
    (root / "nginx.conf").write_text(
        f"worker_processes 1;\npid {root}/nginx.pid;\nerror_log {root}/error.log;\nevents {{}}\n"
        f"http {{\n  access_log off;\n  client_body_temp_path {root}/body;\n  proxy_temp_path {root}/proxy;\n"
        f"  include {root}/site.conf;\n}}\n")
    args = [nginx, "-p", str(root), "-c", str(root / "nginx.conf"), "-g", "daemon off;"]
    with running(start_process("nginx", args, env=base_env(), log_path=root / "nginx.log", cwd=root)) as process:
        url = f"http://127.0.0.1:{port}"
        wait_for_http(f"{url}/ping", timeout=30, process=process)
        yield SimpleNamespace(url=url)


def test_the_proxy_passes_json_through_to_the_model(proxy):
    response = _invoke(proxy, _payload([_b64(image_bytes("dog", 30))]))
    assert response.status_code == 200 and response.json()["predictions"][0]["label"] == "dog"


@pytest.mark.parametrize("content_type", ["", "application/vnd.apache.parquet", "text/csv", "application/jsonx"])
def test_the_proxy_refuses_what_is_not_json_with_one_sentence(proxy, content_type):
    """A missing Content-Type (a bare 500 from MLflow itself) and parquet (a row bomb MLflow unpacks) stop here."""
    headers = {"content-type": content_type} if content_type else {}
    response = httpx.post(f"{proxy.url}/invocations", content=json.dumps(_payload(["x"])).encode(), headers=headers,
                          timeout=60)
    assert response.status_code == 415, response.text[:500]
    assert "Content-Type: application/json" in response.json()["message"]


def test_the_proxy_refuses_a_body_over_32_mib_before_the_model_server_reads_it(proxy, server):
    before = tree_rss(server.process.pid)
    with PeakRss(server.process.pid) as rss:
        response = _invoke(proxy, b" " * (32 * 2**20 + 1))
    assert response.status_code == 413
    assert "larger than 32 MiB" in response.json()["message"]
    assert rss.peak - before < 16 * 2**20  # not a byte of it reached the model server


# ------------------------------------------------------------------ last in the module: it stops the server


def _gone(process: psutil.Process) -> bool:
    try:
        return process.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_a_2_kb_png_of_a_million_rows_is_its_rows_error_and_then_sigterm_ends_the_server(server):
    """The 1 x 1,000,000 PNG once held a worker for minutes of OpenCV smoothing: a 504 after 60 s, the next
    request a 503, the idle server burning CPU and deaf to SIGTERM (no signal handler runs inside a C call,
    and the interpreter joins the request's thread before it exits). Now it is refused from its header, as
    the manifest refuses it in training: its row's error, the other rows scored, the next request answered,
    and SIGTERM, sent as `docker stop` or a service manager sends it, ends the server and its worker."""
    good = [_b64(image_bytes(label, 60 + index)) for index, label in enumerate(("cat", "dog", "cat"))]
    response = _invoke(server, _payload([_b64(tall_png()), *good]))
    assert response.status_code == 200, response.text[:500]
    rows = response.json()["predictions"]
    assert "a side longer than the limit of 20,000" in rows[0]["error"] and rows[0]["p_dog"] is None
    assert [row["label"] for row in rows[1:]] == ["cat", "dog", "cat"] and not any(row["error"] for row in rows[1:])
    response = _invoke(server, _payload([good[1]]))
    assert response.status_code == 200 and response.json()["predictions"][0]["label"] == "dog"

    tree = [psutil.Process(server.process.pid), *psutil.Process(server.process.pid).children(recursive=True)]
    assert any("uvicorn" in " ".join(process.cmdline()) for process in tree[1:])
    server.process.popen.terminate()
    try:
        wait_until(lambda: all(_gone(process) for process in tree), timeout=60, what="the server to end on SIGTERM")
    finally:  # a worker left behind is init's child now: the fixture's stop would not find it
        for process in tree:
            if not _gone(process):
                process.kill()
