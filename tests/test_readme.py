"""A walk through the README in its order, with its own commands, on small generated data.

    main job -> the small-sample command (nothing changed) -> your own classes (retrain, serve,
    predict three class folders beside the cats) -> MLflow UI -> serve (two workers, each its own
    prediction log) + curl -> Prefect server -> PREFECT_API_URL -> work pool + worker -> deploy -> run
    -> batch prediction -> watching the champion (night shots are drift, the event starts a retrain,
    the loop turned off) -> the server gone

The commands are read from the README's fenced blocks (the main command and the blocks marked
`<!-- walk: ... -->`) and run in a scratch copy of the repository, as a user runs them from its
root. What differs from a user's machine: `.venv/bin/` is this interpreter's folder, the fixed
ports are free ones, the PetImages URL points at a loopback server holding a small archive
(the internet is the one thing faked), the main job gets the small-sample options the README
gives under "Pointing it at your data" (ImageNet weights cannot be downloaded here; your own
classes get them too, but keep the default class-balance check), and until
the walk reaches its own Prefect server the commands use the test session's (each command
otherwise starts a temporary one: tests/flows/test_killed_and_concurrent_runs.py runs that).
Batch prediction runs once, on the walk's server: one command costs tens of seconds here.
"""

from __future__ import annotations

import base64
import contextlib
import glob
import os
import json
import re
import shlex
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import httpx
import numpy as np
import pandas as pd
import pytest

from tests import servers
from tests.flows.test_deployment import load_deployment_spec
from tests.httpserver import FileServer
from tests.imagegen import image_bytes, indexed_image_bytes, night_shot_bytes, write_class_folders, write_kaggle_tree, \
    zip_tree

README = servers.REPO_ROOT / "README.md"
NOISE = ("I0000", "W0000", "E0000", "cuInit", "oneDNN", "absl", "Traceback", "telemetry", "CloudPickle",
         "Downloading artifacts", "retracing", "Finished in state", "Beginning flow run")


def blocks() -> dict[str, list[str]]:
    """Commands of each marked README block (backslash continuations joined, comments dropped)."""
    text = README.read_text()
    found = {}
    pattern = r"<!-- (walk: [\w-]+|main-command) -->\s*```bash\n(.*?)```"
    for marker, body in re.findall(pattern, text, flags=re.S):
        joined = re.sub(r"\\\n\s*", " ", body)
        found[marker.removeprefix("walk: ")] = [line.strip() for line in joined.splitlines()
                                                 if line.strip() and not line.strip().startswith("#")]
    return found


def serve_command_env() -> dict[str, str]:
    """The variables the README's serve command sets for the model server (all but the store and PATH).

    `served_model` below (the model-server and class tests) and benchmarks/serving_memory.py start the server with them.
    """
    [line] = blocks()["serve"]
    assignments = dict(word.split("=", 1) for word in re.match(r"((?:\w+=\S+\s+)*)", line).group(1).split())
    return {key: value for key, value in assignments.items() if key not in ("MLFLOW_TRACKING_URI", "PATH")}


@contextlib.contextmanager
def served_model(model_uri: str, tracking_uri: str, folder: Path, **extra_env: str) -> Iterator[SimpleNamespace]:
    """A real `mlflow models serve` of `model_uri`, started as the README starts it, answering /ping.

    Yields its `url`, `process` and the README's `env`; its log is `folder/serve.log`.
    """
    readme = serve_command_env()
    env = servers.base_env(MLFLOW_TRACKING_URI=tracking_uri,
                           PATH=f"{servers.BIN_DIR}{os.pathsep}{os.environ.get('PATH', '')}", **extra_env, **readme)
    port = servers.free_port()
    args = [servers.cli("mlflow"), "models", "serve", "-m", model_uri, "--env-manager", "local",
            "-p", str(port), "-h", "127.0.0.1"]
    with servers.running(servers.start_process("mlflow models serve", args, env=env,
                                               log_path=folder / "serve.log", cwd=folder)) as process:
        url = f"http://127.0.0.1:{port}"
        servers.wait_for_http(f"{url}/ping", timeout=240, process=process)
        yield SimpleNamespace(url=url, process=process, env=readme)


def test_the_readme_marks_every_step_of_the_walk():
    assert set(blocks()) == {"main-command", "small", "own-classes", "mlflow-ui", "serve", "curl", "predict",
                             "prefect-server", "prefect-env", "worker", "deploy", "run", "monitor", "loop-off"}
    main = blocks()["main-command"][0]
    assert "/path/to" not in main and main.endswith(".venv/bin/python -m flows.retrain")  # runnable as pasted


def test_the_folders_the_readme_makes_are_never_committed():
    """`data/`, each model's `data-<name>/` and the MLflow store are git-ignored (the store's README is not)."""
    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    paths = ["data/x.jpg", "data-flowers/arranged/train/Daisy/1.jpg", "mlruns/mlflow.db", "mlruns/README.md",
             "tasks/data/splits.py"]
    done = subprocess.run(["git", "check-ignore", "--no-index", *paths], cwd=servers.REPO_ROOT, capture_output=True,
                          text=True, timeout=60)
    assert done.stdout.split() == paths[:3], done.stderr


README_PORTS = ("5000", "5001", "4200")  # mlflow ui, mlflow models serve, prefect server start


class Ports(dict):
    """A free port for each of the README's, picked when a command first needs it.

    Not all at the start: a port picked minutes before its server binds it can meanwhile become
    the local port of some client's connection (both come from the same ephemeral range).
    """

    def __missing__(self, default: str) -> int:
        self[default] = port = servers.free_port()
        return port


class Walk:
    """Runs README commands in the scratch checkout with one environment, like a user's terminals."""

    def __init__(self, root: Path, env: dict[str, str]) -> None:
        self.root, self.env, self.ports, self.background = root, env, Ports(), []

    def command(self, line: str) -> str:
        line = line.replace(".venv/bin/", f"{servers.BIN_DIR}/").replace("PATH=.venv/bin:", f"PATH={servers.BIN_DIR}:")
        for default in README_PORTS:
            if default in line:
                line = line.replace(default, str(self.ports[default]))
        return line

    def run(self, line: str, timeout: float = 600, **env: str) -> subprocess.CompletedProcess:
        """One command, as typed at a terminal with nobody to answer a prompt (stdin closed)."""
        return subprocess.run(["bash", "-c", self.command(line)], cwd=self.root, env={**self.env, **env},
                              stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout)

    def start(self, name: str, line: str) -> servers.ManagedProcess:
        process = servers.start_process(name, ["bash", "-c", self.command(line)], env=self.env,
                                        log_path=self.root / f"{name}.log", cwd=self.root)
        self.background.append(process)
        return process

    def stop_all(self) -> None:
        for process in self.background:
            process.stop()


LATER = ("data/predictions/", "data/monitoring/")
"""Promised paths the walk makes after the main job: serving and the drift check (checked when they have run)."""


def promised_paths(root: Path) -> list[str]:
    """The paths of the README's "Where results appear" table, as globs under the checkout."""
    table = README.read_text().split("## Where results appear", 1)[1].split("## ", 1)[0]
    paths = []
    for cell in re.findall(r"^\| [^|]+ \| (.+) \|$", table, flags=re.M):
        for path in re.findall(r"`([^`]+)`", cell):
            if path.startswith(("data/", "mlruns/")) and "e.g." not in path:
                paths.append(re.sub(r"<[^>]+>|\{[^}]+\}", "*", path).replace("**", "*"))
    return paths


@pytest.mark.slow
def test_walk_through_the_readme_in_its_order(tmp_path):
    root = tmp_path / "checkout"
    anywhere = shutil.ignore_patterns(".git", ".venv", "__pycache__", ".pytest_cache", ".whl", "*.egg-info")

    def ignored(folder: str, names: list[str]) -> set[str]:  # a user's data/ and mlruns/, not tasks/data/
        top = {name for name in names if name in ("data", "mlruns") or name.startswith("data-")} \
            if Path(folder) == servers.REPO_ROOT else set()
        return set(anywhere(folder, names)) | top

    shutil.copytree(servers.REPO_ROOT, root, ignore=ignored)
    (root / "mlruns").mkdir()
    write_kaggle_tree(tmp_path / "tree", per_class=24, unlabelled=6)
    (tmp_path / "tree" / "train" / "cat.900.jpg").write_bytes(image_bytes("cat", 900, fmt="PNG"))  # converted
    (tmp_path / "tree" / "train" / "dog.901.jpg").write_bytes(image_bytes("dog", 901, mode="CMYK"))
    (tmp_path / "tree" / "sampleSubmission.csv").write_text("id,label\n" + "".join(f"{i},0\n" for i in range(1, 7)))
    archive = zip_tree(tmp_path / "tree", root / "pets.zip")
    (root / "cat.jpg").write_bytes(image_bytes("cat", 4242))
    steps = blocks()
    options = shlex.split(steps["small"][0])[3:]  # the options after `python -m flows.retrain`
    at = options.index("--source")
    small = options[:at] + options[at + 2:]  # the main job keeps its default source
    with FileServer() as files:
        url = files.serve("/kagglecatsanddogs_5340.zip", archive.read_bytes())
        # The session's Prefect server stands in for each command's own temporary one (the same code
        # path as any configured server).
        # README step 1's `prefect server start` finds a migrated database (tests/servers.py seed_prefect_home).
        env = servers.base_env(PREFECT_HOME=servers.seed_prefect_home(tmp_path / "prefect"),
                               PREFECT_PROFILES_PATH=tmp_path / "profiles.toml", MLFLOW_TRACKING_URI=None,
                               TF_CPP_MIN_LOG_LEVEL=None, PREFECT_LOGGING_LEVEL=None, CATSDOGS_PETIMAGES_URL=url,
                               CATSDOGS_PROGRESS_SECONDS="0",
                               PREFECT_WORKER_QUERY_SECONDS="1", PREFECT_WORKER_PREFETCH_SECONDS="5",
                               KERAS_HOME=tmp_path / "keras")
        walk = Walk(root, env)
        try:
            _main_job_and_rerun(walk, steps, small, root)
            _own_classes(walk, steps, small, root)
            _mlflow_ui(walk, steps)
            _serve_and_curl(walk, steps)
            for process in walk.background:  # leave the cores to Prefect
                process.stop()
            _prefect_deployment(walk, steps, small, root)
        finally:
            walk.stop_all()


def _main_job_and_rerun(walk: Walk, steps: dict, small: list[str], root: Path) -> None:
    main = steps["main-command"][0].split("&&")[-1].strip()  # the venv was made: the part after it
    first = walk.run(f"{main} {shlex.join(small)}")
    assert first.returncode == 0, first.stderr
    assert first.stdout.startswith("# Retrain: version 1 promoted to champion")
    noisy = [line for line in first.stderr.splitlines() if any(word in line for word in NOISE)]
    assert not noisy, noisy  # the terminal carries the pipeline's lines only
    lines = first.stderr.strip().splitlines()
    assert all(re.match(r"^\d\d:\d\d:\d\d  ", line) for line in lines), lines
    assert not [line for line in lines + first.stdout.splitlines() if re.search(r"\d\.\d{5,}", line)]  # 0.9994, not 0.99936...
    for step in ("Acquire:", "Build manifest:", "Validate: passed", "Arrange:", "Chosen backbone:", "Version 1"):
        assert any(step in line for line in lines), step
    said = [line for line in lines + first.stdout.splitlines() if "bfloat16 must gain" in line]
    assert len(said) == 1 and "vgg16 at 32 px computes on" in said[0], said  # why that engine and precision: once
    for long_step in ("Downloading kagglecatsanddogs_5340.zip:", "Inspecting images:", "Extracting vgg16 features:",
                      "Training the vgg16 head:", "Scoring models:/"):  # the default source, downloaded
        assert any(long_step in line and "/s" in line for line in lines), long_step  # count, rate, time left
    [log] = (root / "data" / "logs").glob("retrain-*.log")
    assert "Beginning flow run" in log.read_text()  # the details are kept, in the log file
    for promised in promised_paths(root):
        if not promised.startswith(LATER):
            assert glob.glob(str(root / promised)), f"the README promises {promised}"
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{root / 'mlruns' / 'mlflow.db'}")
    champion = client.get_model_version_by_alias("cats-vs-dogs", "champion")
    scored = client.get_run(champion.run_id).data.metrics  # the gate's own measurement of the held-out images
    assert scored["served_test_accuracy"] > scored["served_test_chance_accuracy"], scored  # the quick try learns
    _the_versions_report_opens_with_every_section_filled(client, champion, first.stdout)
    again = walk.run(steps["small"][0])  # the same images from a local copy, the same config
    assert again.returncode == 0 and "nothing changed" in again.stdout, again.stderr


FOLDERS = ["Daisy", "Red Roses", "tulips"]
CLASSES = ["daisy", "red_roses", "tulips"]


def _own_classes(walk: Walk, steps: dict, small: list[str], root: Path) -> None:
    """README "Your own classes" as pasted, after the cats: three class folders retrained, served and predicted.

    The retrain gets the small-sample options but keeps the default class-balance check (30 images a
    class, stratified); everything lands under the model's own name, beside the cats, never in them.
    """
    from mlflow.tracking import MlflowClient

    source = write_class_folders(root / "flowers", FOLDERS, per_class=30)
    # Links are followed, folders and files alike: a class folder kept elsewhere, a photo linked in
    (root / "_outside").mkdir()
    (source / "tulips").rename(root / "_outside" / "tulips")
    (source / "tulips").symlink_to(Path("..") / "_outside" / "tulips")  # once: a two-class model, without a word
    (root / "_outside" / "daisy.jpg").write_bytes(indexed_image_bytes(0, 3, 777))
    (source / "Daisy" / "linked.jpg").symlink_to(root / "_outside" / "daisy.jpg")
    write_class_folders(root / "new_photos", FOLDERS, per_class=2, seed0=5000)
    cats = (root / "data" / "manifest.parquet").read_bytes()
    retrain, serve, predict = steps["own-classes"]
    loosened = {"--max-class-imbalance", "--max-quarantined-share"}
    tiny = [word for at, word in enumerate(small) if word not in loosened and small[at - 1] not in loosened]
    done = walk.run(f"{retrain} {shlex.join(tiny)}")
    assert done.returncode == 0, done.stderr
    assert "| split | daisy | red_roses | tulips |" in done.stdout and "Validate: passed" in done.stderr
    folder = root / "data-flowers"  # the model's own data folder; the cats' is untouched
    assert json.loads((folder / "classes.json").read_text()) == {"names": CLASSES, "folders": FOLDERS}
    assert sorted(path.name for path in (folder / "arranged" / "test").iterdir()) == FOLDERS  # as on disk
    assert (root / "data" / "manifest.parquet").read_bytes() == cats
    arranged = [path for path in (folder / "arranged").rglob("*") if not path.is_dir()]
    assert len(arranged) == 91 and not [path for path in arranged if path.is_symlink()]  # bytes, never a link out
    assert any(path.name.startswith("linked_") and path.parent.name == "Daisy" for path in arranged)

    client = MlflowClient(tracking_uri=f"sqlite:///{root / 'mlruns' / 'mlflow.db'}")
    champion = client.get_model_version_by_alias("flowers", "champion")  # its own registered model
    assert str(client.get_model_version_by_alias("cats-vs-dogs", "champion").version) == "1"
    run = client.get_run(champion.run_id)
    assert client.get_experiment(run.info.experiment_id).name == "flowers"
    assert {item.dataset.name for item in run.inputs.dataset_inputs} == {"flowers-train", "flowers-validation",
                                                                         "flowers-test"}
    shards = [path.stat().st_mtime * 1000 for path in (folder / "features").rglob("shard-*")]
    assert shards and run.info.start_time <= min(shards)  # opened when training started
    assert run.data.params["data.classes"] == "daisy,red_roses,tulips"
    assert run.data.metrics["test_accuracy"] > run.data.metrics["test_chance_accuracy"]
    assert {"test_macro_f1", "test_roc_auc", "test_recall_red_roses"} <= set(run.data.metrics)

    server = walk.start("serve-flowers", serve)  # without MLFLOW_TRACKING_URI in the walk's environment
    done = walk.run(predict)  # in another terminal while the server starts, as a person would
    assert done.returncode == 0 and "Kaggle id" not in done.stderr + done.stdout, done.stderr
    table = pd.read_csv(root / "flowers.csv")
    assert list(table.columns) == ["id", "label", "p_daisy", "p_red_roses", "p_tulips"]
    assert len(table) == 6 and set(table["label"]) <= set(CLASSES)
    assert np.allclose(table[["p_daisy", "p_red_roses", "p_tulips"]].sum(axis=1), 1.0, atol=1e-4)
    assert list((folder / "logs").glob("predict-*.log"))  # the model's data folder, found from its URI

    url = f"http://127.0.0.1:{walk.ports['5001']}"
    servers.wait_for_http(f"{url}/ping", timeout=300, process=server)
    cells = [[base64.b64encode(indexed_image_bytes(index, 3, 900 + index)).decode("ascii")] for index in range(3)]
    answer = httpx.post(f"{url}/invocations", timeout=300,
                        json={"dataframe_split": {"columns": ["image"], "data": [*cells, ["%%% not base64 %%%"]]}})
    server.stop()
    assert answer.status_code == 200, answer.text
    rows = answer.json()["predictions"]
    assert list(rows[0]) == ["p_daisy", "p_red_roses", "p_tulips", "label", "label_index", "error"]
    for row in rows[:3]:
        probabilities = [row[f"p_{name}"] for name in CLASSES]
        assert sum(probabilities) == pytest.approx(1.0, abs=1e-4)
        assert row["label"] == CLASSES[int(np.argmax(probabilities))] == CLASSES[row["label_index"]]
    assert sum(row["label"] == name for row, name in zip(rows, CLASSES)) >= 2
    assert rows[3]["label"] == "" and rows[3]["p_daisy"] is None and "base64" in rows[3]["error"]


def _the_versions_report_opens_with_every_section_filled(client, version, summary: str) -> None:
    """The quick try's report: logged to its run, linked from the version and the summary, no section left empty,
    and whole in Chromium (tests/models/test_model_report.py's browser check): it renders, every image loads,
    no request leaves it."""
    from tests.models.test_model_report import SECTIONS, assert_opens_whole

    [logged] = client.list_artifacts(version.run_id, "report")
    page = Path(client.download_artifacts(version.run_id, logged.path))
    html = page.read_text()
    link = f"/artifactPath/{logged.path}"
    assert logged.path == "report/index.html" and link in version.description and link in summary
    for section in SECTIONS:
        body = re.search(rf'<section id="{section}">(.*?)</section>', html, flags=re.S)
        assert body and len(re.sub(r"<[^>]+>|\s", "", body.group(1))) > 20, section
    assert 'class="missing"' not in html and "promoted to champion" in html
    assert_opens_whole(page, html.count("<img "))


def _mlflow_ui(walk: Walk, steps: dict) -> None:
    """`mlflow ui` on the store the main job wrote: the page, the run, its artifacts beside the store."""
    ui = walk.start("mlflow-ui", steps["mlflow-ui"][0])
    base = f"http://127.0.0.1:{walk.ports['5000']}"
    servers.wait_for_http(f"{base}/health", timeout=240, process=ui)
    page = httpx.get(base, timeout=30)
    assert page.status_code == 200 and "<html" in page.text.lower()
    found = httpx.post(f"{base}/api/2.0/mlflow/experiments/search", json={"max_results": 10}, timeout=30).json()
    [experiment] = [e for e in found["experiments"] if e["name"] == "cats-vs-dogs"]
    assert f"http://127.0.0.1:5000/#/experiments/{experiment['experiment_id']}/runs" in README.read_text()  # the link
    assert {"key": "mlflow.experimentKind", "value": "custom_model_development"} in experiment["tags"]  # opens on runs
    runs = httpx.post(f"{base}/api/2.0/mlflow/runs/search", timeout=30, json={
        "experiment_ids": [experiment["experiment_id"]], "filter": "tags.`catsdogs.kind` = 'retrain'"}).json()["runs"]
    [run] = runs
    assert run["info"]["artifact_uri"].startswith((walk.root / "mlruns").as_uri())  # artifacts beside the store
    plots = httpx.get(f"{base}/api/2.0/mlflow/artifacts/list", timeout=30,
                      params={"run_id": run["info"]["run_id"], "path": "plots"}).json()
    assert "plots/roc_curve.png" in {item["path"] for item in plots["files"]}
    ui.stop()


def _serve_and_curl(walk: Walk, steps: dict) -> None:
    """The README's serve (two workers) and curl; each worker records what it scores in a log file of its own."""
    from concurrent.futures import ThreadPoolExecutor

    serve = walk.start("serve", steps["serve"][0])
    url = f"http://127.0.0.1:{walk.ports['5001']}"
    servers.wait_for_http(f"{url}/ping", timeout=300, process=serve)
    answer = walk.run(steps["curl"][0], timeout=120)
    assert answer.returncode == 0, answer.stderr
    [row] = json.loads(answer.stdout)["predictions"]
    assert set(row) == {"p_dog", "label", "label_index", "error"} and row["error"] == ""
    body = {"dataframe_split": {"columns": ["image"], "data": [[base64.b64encode(image_bytes("dog", 4243)).decode()]]}}
    log = walk.root / "data" / "predictions"
    with ThreadPoolExecutor(3) as pool:  # bursts of requests until both workers have answered some
        for _ in range(10):
            assert {response.status_code for response in pool.map(
                lambda _: httpx.post(f"{url}/invocations", json=body, timeout=120), range(3))} == {200}
            if len({path.name.rsplit("-", 1)[1] for path in log.glob("predictions-*.jsonl")}) == 2:
                break
            time.sleep(1)  # the workers' log writers append as they go
    serve.stop()  # both workers write what they still hold as they exit
    files = sorted(log.glob("predictions-*.jsonl"))
    assert len({path.name.rsplit("-", 1)[1] for path in files}) == 2, files  # one file per worker process
    rows = [json.loads(line) for path in files for line in path.read_text().splitlines()]
    assert {(row["model"], row["version"]) for row in rows} == {("cats-vs-dogs", "1")}
    assert all(len(row["features"]) == 32 for row in rows) and {row["label"] for row in rows} <= {"cat", "dog"}


def _prefect_deployment(walk: Walk, steps: dict, small: list[str], root: Path) -> None:
    """README steps 1-5 with the README's commands: server, PREFECT_API_URL, pool and worker, deploy, run."""
    server = walk.start("prefect-server", steps["prefect-server"][0] + f" --port {walk.ports['4200']}")
    api = f"http://127.0.0.1:{walk.ports['4200']}/api"
    servers.wait_for_http(f"{api}/health", timeout=240, process=server)
    [export] = steps["prefect-env"]
    name, value = walk.command(export).removeprefix("export ").split("=", 1)
    assert value == api
    walk.env[name] = value
    create_pool, start_worker = steps["worker"]
    assert walk.run(create_pool).returncode == 0
    worker = walk.start("worker", start_worker)
    # Prompts on, nobody to answer: a deployment without `schedules` would ask for one; `retrain/on-demand`
    # declares an empty list, so the command runs through and registers it unscheduled.
    deployed = walk.run(steps["deploy"][0], PREFECT_CLI_PROMPT="true")
    assert deployed.returncode == 0 and "retrain/weekly" in deployed.stdout, deployed.stdout + deployed.stderr
    assert "EOFError" not in deployed.stdout + deployed.stderr
    _, weekly = load_deployment_spec()
    deployment = httpx.get(f"{api}/deployments/name/retrain/weekly", timeout=30).json()
    assert [s["schedule"]["cron"] for s in deployment["schedules"]] == [weekly["schedules"][0]["cron"]]
    assert deployment["pull_steps"] == [
        {"prefect.deployments.steps.set_working_directory": {"directory": str(root)}}]  # runs start in the checkout
    on_demand = httpx.get(f"{api}/deployments/name/retrain/on-demand", timeout=30).json()
    assert on_demand["schedules"] == []
    assert deployment["work_pool_name"] == on_demand["work_pool_name"] == weekly["work_pool"]["name"]
    _serving_takes_over(api)

    bogus = walk.run(steps["run"][0] + " --params " + shlex.quote(json.dumps({"config": {"bogus": 1}})))
    assert bogus.returncode != 0 and "bogus" in bogus.stdout + bogus.stderr  # refused before any run starts
    config = {"weights": None, "backbones": ["vgg16"], "input_size": 32, "floor": 0.0,  # the options' names
              "min_per_class": 10, "min_per_class_per_split": 1, "max_class_imbalance": 10.0,
              "max_quarantined_share": 0.3}
    run = walk.run(steps["run"][0] + " --params " + shlex.quote(json.dumps({"config": config})), timeout=600)
    assert run.returncode == 0 and "Completed" in run.stdout, run.stdout + run.stderr + worker.log_tail()
    flow_run_id = re.search(r"UUID: ([0-9a-f-]{36})", run.stdout).group(1)
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{root / 'mlruns' / 'mlflow.db'}")
    [experiment] = [e for e in client.search_experiments() if e.name == "cats-vs-dogs"]
    [skipped] = client.search_runs([experiment.experiment_id], f"tags.`prefect.flow_run_id` = '{flow_run_id}'")
    assert skipped.data.tags["catsdogs.kind"] == "skipped"  # same data and config: nothing changed
    assert skipped.data.tags["prefect.deployment_name"] == "weekly"
    artifacts = httpx.post(f"{api}/artifacts/filter", json={"artifacts": {"flow_run_id": {"any_": [flow_run_id]}}},
                           timeout=30).json()
    [summary] = [artifact for artifact in artifacts if artifact["key"] == "retrain-summary"]
    assert summary["type"] == "markdown" and "nothing changed" in summary["data"]

    done = walk.run(steps["predict"][0])  # the README's batch prediction, reporting to this server
    assert done.returncode == 0, done.stderr
    submission = pd.read_csv(root / "submission.csv")
    assert list(submission.columns) == ["id", "label"] and submission["id"].tolist() == list(range(1, 7))

    worker.stop()  # what the drift event starts stays a scheduled run: no worker takes it
    _watching_the_champion(walk, steps, api, root)

    # The server stopped but still configured: one sentence says how to get back to working without it
    # (the temporary server a command then starts is the killed-run test's, tests/flows/).
    server.stop()
    stale = walk.run(steps["predict"][0])
    assert stale.returncode == 2 and "unset PREFECT_API_URL" in stale.stderr, stale.stderr


def _watching_the_champion(walk: Walk, steps: dict, api: str, root: Path) -> None:
    """README "Watching the champion": night shots from another camera are drift (on the cached features of the
    quick try's VGG16), the check's event makes the Prefect server start retrain/on-demand, and the loop turns off."""
    incoming = root / "incoming"
    incoming.mkdir()
    for index in range(200):
        (incoming / f"{index}.jpg").write_bytes(night_shot_bytes("dog" if index % 2 else "cat", 8000 + index))
    [automation] = httpx.post(f"{api}/automations/filter", json={}, timeout=30).json()
    assert automation["name"] == "retrain-on-drift" and automation["enabled"]
    done = walk.run(steps["monitor"][0])
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("Drift check: drift for cats-vs-dogs version 1 on 200 rows"), done.stdout
    assert "the cached features of" in done.stdout and "Emitted catsdogs.drift.detected" in done.stdout
    for promised in promised_paths(root):
        if promised.startswith(LATER):
            assert glob.glob(str(root / promised)), f"the README promises {promised}"
    [on_demand] = [deployment["id"] for deployment in httpx.post(f"{api}/deployments/filter", json={}, timeout=30).json()
                   if deployment["name"] == "on-demand"]
    started = servers.wait_until(lambda: httpx.post(f"{api}/flow_runs/filter", timeout=30, json={
        "deployments": {"id": {"any_": [on_demand]}}}).json(), timeout=60, what="the drift event to start a retrain")
    assert [run["state_type"] for run in started] == ["SCHEDULED"]  # created by the trigger; no worker takes it
    off = walk.run(steps["loop-off"][0])
    assert off.returncode == 0, off.stdout + off.stderr
    assert not httpx.get(f"{api}/automations/{automation['id']}", timeout=30).json()["enabled"]


def _serving_takes_over(api: str) -> None:
    """What `--serve` says before it takes the deployed `retrain/weekly` over."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows.retrain import _serving_notices

    with temporary_settings({PREFECT_API_URL: api}):
        [notice] = _serving_notices()
    assert notice.startswith("retrain/weekly was deployed to work pool 'catsdogs-process'; serving takes it over")
