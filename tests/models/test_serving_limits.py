"""Hostile and careless requests against a real `mlflow models serve`: every bad row is its own error,
and the server's memory stays where it was.

One server for the module, started as users start it, with the limits lowered through MLflow's
own `MLFLOW_PYFUNC_INFERENCE_CONFIG` so that small requests reach them. The server's memory is
the resident set of its whole process tree, sampled while a request is answered; the peak under
a concurrent load, before and after these limits, is what benchmarks/serving_memory.py measures.
"""

from __future__ import annotations

import base64
import io
import json
import os
from types import SimpleNamespace

import httpx
import pytest
from PIL import Image

from tests.fake_training import promoted_champion
from tests.imagegen import image_bytes
from tests.memory import PeakRss, tree_rss
from tests.servers import BIN_DIR, base_env, cli, free_port, running, start_process, wait_for_http

pytestmark = pytest.mark.slow

MAX_ROWS = 8
MAX_REQUEST_BYTES = 8 * 2**20
HUGE_SIDE = 12_000
"""144 MP: under Pillow's own bomb limit (2 x 89.5 MP), far over training's 25 MP; decoded, 432 MB of RGB."""


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _payload(cells: list[str]) -> dict:
    return {"dataframe_split": {"columns": ["image"], "data": [[cell] for cell in cells]}}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("serving-limits")
    uri, _ = promoted_champion(root)
    port = free_port()
    env = base_env(MLFLOW_TRACKING_URI=uri, PATH=f"{BIN_DIR}{os.pathsep}{os.environ.get('PATH', '')}",
                   MLFLOW_PYFUNC_INFERENCE_CONFIG=json.dumps({"max_rows": MAX_ROWS,
                                                              "max_request_bytes": MAX_REQUEST_BYTES}))
    args = [cli("mlflow"), "models", "serve", "-m", "models:/cats-vs-dogs@champion", "--env-manager", "local",
            "-p", str(port), "-h", "127.0.0.1"]
    with running(start_process("mlflow models serve", args, env=env, log_path=root / "serve.log",
                               cwd=root)) as process:
        url = f"http://127.0.0.1:{port}"
        wait_for_http(f"{url}/ping", timeout=240, process=process)
        yield SimpleNamespace(url=url, process=process)


def _invoke(server, payload: dict | bytes) -> httpx.Response:
    if isinstance(payload, bytes):
        return httpx.post(f"{server.url}/invocations", content=payload,
                          headers={"content-type": "application/json"}, timeout=300)
    return httpx.post(f"{server.url}/invocations", json=payload, timeout=300)


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


def test_rows_past_the_limit_are_error_rows(server):
    cells = [_b64(image_bytes("cat", 10 + index)) for index in range(MAX_ROWS + 2)]
    response = _invoke(server, _payload(cells))
    assert response.status_code == 200, response.text
    rows = response.json()["predictions"]
    assert len(rows) == MAX_ROWS + 2
    assert all(row["label"] == "cat" for row in rows[:MAX_ROWS])
    for row in rows[MAX_ROWS:]:
        assert row["p_dog"] is None and f"at most {MAX_ROWS} are scored per request" in row["error"]


def test_a_request_over_the_size_limit_is_413_and_the_server_goes_on(server):
    body = json.dumps(_payload(["A" * (MAX_REQUEST_BYTES + 1024)])).encode()
    response = _invoke(server, body)
    assert response.status_code == 413, response.text[:500]
    assert f"larger than {MAX_REQUEST_BYTES:,} bytes" in response.json()["detail"]
    response = _invoke(server, _payload([_b64(image_bytes("dog", 20))]))
    assert response.status_code == 200 and response.json()["predictions"][0]["label"] == "dog"
