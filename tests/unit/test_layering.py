"""Imports flow one way: the scheduler layer imports neither torch, Triton nor Ray."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE_DIR = Path(__file__).resolve().parents[2] / "backend" / "preemptserve"
SCHEDULER_LAYER = sorted((PACKAGE_DIR / "core").rglob("*.py")) + [PACKAGE_DIR / "config.py"]
FORBIDDEN = ("torch", "triton_python_backend_utils", "ray")


def imported_modules(path: Path, source: str | None = None) -> set[str]:
    """Absolute module names ``path`` imports; relative imports are resolved."""
    # The package a module (or an __init__) sits in, e.g. ("preemptserve", "core").
    package = path.relative_to(PACKAGE_DIR.parent).parts[:-1]
    text = path.read_text() if source is None else source
    modules: set[str] = set()
    for node in ast.walk(ast.parse(text, filename=str(path))):
        if isinstance(node, ast.Import):
            modules.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                prefix = ".".join(package[: len(package) - node.level + 1])
                names = [node.module] if node.module else [a.name for a in node.names]
                modules.update(f"{prefix}.{name}" for name in names)
            elif node.module:
                modules.add(node.module)
        elif (
            isinstance(node, ast.Call)
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and (
                (isinstance(node.func, ast.Name) and node.func.id == "__import__")
                or (isinstance(node.func, ast.Attribute) and node.func.attr == "import_module")
            )
        ):
            modules.add(str(node.args[0].value))
    return modules


def is_forbidden(module: str) -> bool:
    return any(module == name or module.startswith(f"{name}.") for name in FORBIDDEN)


def test_scheduler_layer_files_found() -> None:
    names = {p.relative_to(PACKAGE_DIR).as_posix() for p in SCHEDULER_LAYER}
    assert {"config.py", "core/block_manager.py", "core/scheduler/fcfs.py"} <= names


@pytest.mark.parametrize(
    "path", SCHEDULER_LAYER, ids=lambda p: p.relative_to(PACKAGE_DIR).as_posix()
)
def test_no_torch_or_triton_import(path: Path) -> None:
    bad = sorted(m for m in imported_modules(path) if is_forbidden(m))
    assert not bad, f"{path.relative_to(PACKAGE_DIR)} imports {bad}"


@pytest.mark.parametrize(
    "path", SCHEDULER_LAYER, ids=lambda p: p.relative_to(PACKAGE_DIR).as_posix()
)
def test_scheduler_layer_imports_only_itself_within_the_package(path: Path) -> None:
    allowed = ("preemptserve.core", "preemptserve.config")
    inner = {m for m in imported_modules(path) if m.startswith("preemptserve")}
    bad = sorted(m for m in inner if not m.startswith(allowed))
    assert not bad, f"{path.relative_to(PACKAGE_DIR)} reaches up into {bad}"


def test_checker_sees_forbidden_imports() -> None:
    source = (
        "import torch.nn as nn\n"
        "def f():\n"
        "    from triton_python_backend_utils import Tensor\n"
        "    return importlib.import_module('torch')\n"
        "from ...engine import sampler\n"
        "from .. import request\n"
    )
    modules = imported_modules(PACKAGE_DIR / "core" / "scheduler" / "fake.py", source)
    assert modules == {
        "torch.nn",
        "torch",
        "triton_python_backend_utils",
        "preemptserve.engine",
        "preemptserve.core.request",
    }
    assert is_forbidden("torch.nn") and is_forbidden("triton_python_backend_utils")
    assert not is_forbidden("torchaudio_free_name")


def test_importing_scheduler_loads_no_torch() -> None:
    code = (
        "import sys\n"
        "import preemptserve.core.scheduler\n"
        "import preemptserve.core.block_manager\n"
        "import preemptserve.core.global_scheduler\n"
        "import preemptserve.config\n"
        "bad = sorted(m for m in sys.modules\n"
        f"             if m.split('.')[0] in {FORBIDDEN!r})\n"
        "print(','.join(bad))\n"
        "sys.exit(1 if bad else 0)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, f"loaded: {result.stdout.strip()} {result.stderr[-2000:]}"
