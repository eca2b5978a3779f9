"""The layers import only downwards, and no module or function grows past the size a reader takes in at once.

Layers, bottom to top: ``core`` (settings, logging) → ``router`` (the routing science, pure) → ``db`` (SQL and the
state shared through Redis) → ``worker`` (Celery tasks by stage) → ``api`` (HTTP) → ``cli`` (the command-line
shell). docs/architecture.md describes them.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

LAYERS = ("core", "router", "db", "worker", "api", "cli")

TRANSPORT = "worker.transport"
"""The one module of the worker the API may import: the Celery app, queue and task names, publishing."""

FORBIDDEN_LIBRARIES = {
    "core": {"flask", "sqlalchemy", "redis", "celery", "kombu", "torch", "numpy"},
    "router": {"flask", "sqlalchemy", "alembic", "redis", "celery", "kombu", "gunicorn", "psycopg"},
    "api": {"torch", "torchvision", "diffusers", "transformers", "open_clip", "onnxruntime"},
}
"""Third-party packages a layer never imports: the router stays importable without Redis, Flask or a database;
the API never loads model code."""

MAX_MODULE_LINES = 500
MAX_FUNCTION_LINES = 80


def imported_modules(source: str) -> list[tuple[int, str]]:
    """Every module ``source`` imports (at any depth, type-checking blocks included), with its line.
    ``from package import name`` counts as importing ``package.name``."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if "." in node.module:
                found.append((node.lineno, node.module))
            else:
                found += [(node.lineno, f"{node.module}.{alias.name}") for alias in node.names]
    return found


def violations(package: str, source: str) -> list[str]:
    """The imports of a module of ``package`` that point up the layers, reach into the worker from the API
    beyond its transport, or load a library the layer must not need."""
    level = LAYERS.index(package)
    problems = []
    for line, module in imported_modules(source):
        top = module.split(".")[0]
        if top in LAYERS and LAYERS.index(top) > level:
            problems.append(f"line {line}: {package} imports {module}, a layer above it")
        elif package == "api" and top == "worker" and not (module == TRANSPORT or module.startswith(TRANSPORT + ".")):
            problems.append(f"line {line}: api imports {module}; of the worker only {TRANSPORT}")
        elif top in FORBIDDEN_LIBRARIES.get(package, ()):
            problems.append(f"line {line}: {package} imports {module}")
    return problems


def modules(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


@pytest.mark.parametrize("package", LAYERS)
def test_no_import_points_up_the_layers(package: str) -> None:
    problems = [
        f"{path.relative_to(ROOT)}: {problem}"
        for path in modules(package)
        for problem in violations(package, path.read_text(encoding="utf-8"))
    ]
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize(
    ("package", "source"),
    [
        ("core", "from router.types import Tier\n"),
        ("router", "def f():\n    from db.models import Job\n"),
        ("router", "import sqlalchemy\n"),
        ("router", "from flask import Flask\n"),
        ("db", "from worker.transport import publish\n"),
        ("worker", "from api.app import create_app\n"),
        ("api", "from worker.tasks import register_tasks\n"),
        ("api", "from worker import context\n"),
        ("api", "import torch\n"),
        ("api", "from cli.stack import free_port\n"),
        ("worker", "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from cli.main import main\n"),
    ],
)
def test_the_check_refuses_an_import_that_points_up(package: str, source: str) -> None:
    assert violations(package, source)


@pytest.mark.parametrize(
    ("package", "source"),
    [
        ("router", "from core.settings import Settings\nimport numpy\n"),
        ("db", "from router.types import RoutingDecision\n"),
        ("api", "from worker.transport import publish_many\n"),
        ("api", "from worker import transport\n"),
        ("cli", "from api.app import create_app\nfrom worker.tasks import register_tasks\n"),
    ],
)
def test_the_check_allows_imports_that_point_down(package: str, source: str) -> None:
    assert violations(package, source) == []


def test_the_project_has_these_layers_and_no_other_package() -> None:
    packages = {p.parent.name for p in ROOT.glob("*/__init__.py")} - {"tests"}
    assert packages == set(LAYERS)


def test_no_module_over_500_lines_and_no_function_over_80() -> None:
    too_long = []
    for package in LAYERS:
        for path in modules(package):
            source = path.read_text(encoding="utf-8")
            name = path.relative_to(ROOT)
            if (lines := source.count("\n")) > MAX_MODULE_LINES:
                too_long.append(f"{name}: {lines} lines")
            for node in ast.walk(ast.parse(source)):
                if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                    length = (node.end_lineno or node.lineno) - node.lineno + 1
                    if length > MAX_FUNCTION_LINES:
                        too_long.append(f"{name}:{node.lineno} {node.name}: {length} lines")
    assert not too_long, "\n".join(too_long)
