"""The simulator and the harness's pure parts import neither torch nor Triton."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE_DIR = Path(__file__).resolve().parents[2] / "backend" / "preemptserve"
PURE = sorted((PACKAGE_DIR / "sim").rglob("*.py")) + [
    PACKAGE_DIR / "bench" / name for name in ("workload.py", "metrics.py", "report.py")
]
FORBIDDEN = ("torch", "triton_python_backend_utils", "tritonclient")


def top_level_imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module)
    return names


@pytest.mark.parametrize("path", PURE, ids=lambda p: p.relative_to(PACKAGE_DIR).as_posix())
def test_no_forbidden_import(path: Path) -> None:
    assert path.exists()
    bad = sorted(m for m in top_level_imports(path) if m.split(".")[0] in FORBIDDEN)
    assert not bad, f"{path.name} imports {bad}"


def test_importing_the_simulator_loads_no_torch() -> None:
    code = (
        "import sys\n"
        "import preemptserve.sim.simulator, preemptserve.sim.fit\n"
        "import preemptserve.bench.workload, preemptserve.bench.report\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in "
        f"{FORBIDDEN!r})\n"
        "print(','.join(bad)); sys.exit(1 if bad else 0)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, f"loaded: {result.stdout} {result.stderr[-2000:]}"
