"""The structure ARCHITECTURE.md describes, checked: wings, the direction of imports, what needs Prefect.

    flows  ->  tasks.models  ->  tasks.learning  ->  tasks.data  ->  tasks.common

A module imports only from its own layer or the layers to its right; `steps.py` of each wing
holds its Prefect tasks and the other modules stay importable without Prefect.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LAYERS = ("tasks.common", "tasks.data", "tasks.learning", "tasks.models", "flows")


def _layer(module: str) -> int:
    return next(index for index, prefix in enumerate(LAYERS) if module == prefix or module.startswith(prefix + "."))


def _modules() -> dict[str, Path]:
    found = {}
    for root in ("tasks", "flows"):
        for path in (REPO / root).rglob("*.py"):
            name = ".".join(path.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__")
            found[name] = path
    return found


def _imports(path: Path) -> set[str]:
    """Every project module a file imports, at module level or inside functions."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names |= {f"{node.module}.{alias.name}" for alias in node.names}
    return {name for name in names if name.split(".")[0] in ("tasks", "flows")}


def test_every_module_belongs_to_a_wing():
    assert set(p.name for p in (REPO / "tasks").iterdir() if p.is_dir() and not p.name.startswith("__")) == \
        {"common", "data", "learning", "models"}
    assert sorted(p.name for p in (REPO / "tasks").glob("*.py")) == ["__init__.py"]  # no loose rooms


def _project_imports(modules: dict[str, Path], path: Path) -> set[str]:
    """The project modules a file imports (a `from module import name` of a function counts as the module)."""
    found = set()
    for imported in _imports(path):
        target = imported if imported in modules else imported.rsplit(".", 1)[0]
        if target in modules and target not in ("tasks", "flows") and not _is_wing_package(target):
            found.add(target)
    return found


def _is_wing_package(name: str) -> bool:
    return name.startswith("tasks.") and name.count(".") == 1


def test_no_two_modules_import_each_other_even_inside_functions():
    """A cycle hidden in a function-level import is still a cycle: neither module stands without the other."""
    modules = _modules()
    graph = {name: _project_imports(modules, path) - {name} for name, path in modules.items()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(node: str) -> None:  # Tarjan's strongly connected components
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for other in graph[node]:
            if other not in index:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in on_stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    assert not cycles, cycles


def test_imports_only_go_down_or_sideways():
    modules = _modules()
    upward = []
    for name, path in modules.items():
        if name in ("tasks", "flows") or name.startswith("tasks.") and name.count(".") == 1:
            continue
        for imported in _imports(path):
            target = imported if imported in modules else imported.rsplit(".", 1)[0]
            if target in ("tasks", "flows") or target not in modules:
                continue
            if _layer(target) > _layer(name):
                upward.append(f"{name} imports {imported}")
    assert not upward, upward


@pytest.mark.parametrize("module", [
    "tasks.models.inputs", "tasks.models.pyfunc", "tasks.models.packaging",
    "tasks.learning.features", "tasks.learning.extractor", "tasks.learning.shards", "tasks.learning.leases",
    "tasks.learning.finetune", "tasks.learning.evaluate", "tasks.learning.pixels", "tasks.learning.forward",
    "tasks.data.manifest", "tasks.data.acquire",
])
def test_the_compute_and_serving_modules_do_not_need_prefect(module):
    """What a GPU host (Keras + JAX only) and the served model's environment import must not pull Prefect in."""
    script = ("import importlib.abc, sys\n"
              "class Block(importlib.abc.MetaPathFinder):\n"
              "    def find_spec(self, name, path, target=None):\n"
              "        if name.split('.')[0] in ('prefect', 'great_expectations'):\n"
              "            raise ModuleNotFoundError(name)\n"
              "sys.meta_path.insert(0, Block())\n"
              f"import {module}\n")
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]


def test_prefect_tasks_live_in_the_steps_modules_and_flows_define_none():
    for name, path in _modules().items():
        source = path.read_text()
        if "@task(" in source or "@task\n" in source:
            assert name.endswith(".steps"), f"{name} defines a Prefect task outside a wing's steps.py"


def test_help_does_not_import_a_deep_learning_backend():
    script = ("import sys\nfrom flows.retrain import build_parser\nbuild_parser().format_help()\n"
              "print(sorted(m for m in ('tensorflow', 'keras', 'jax', 'mlflow', 'torch') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "[]"
