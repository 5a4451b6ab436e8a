"""Locate the Triton server inside the ``nvidia-pytriton`` wheel and prepare to run it.

The wheel carries a complete ``tritonserver`` (release 24.10), the Python backend and
one Python backend stub per Python version. Running it needs three things:

* the stub for the running interpreter copied into ``backends/python/``;
* ``LD_LIBRARY_PATH`` holding the wheel's ``nvidia_pytriton.libs`` and the interpreter's
  ``LIBDIR`` (where ``libpython3.X.so`` lives);
* the interpreter's ``bin/`` first on ``PATH``: the stub embeds the first Python found
  there, so this is how the model code sees the project's virtualenv.

Stdlib only, so that tests and the CLI start fast.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import sys
import sysconfig
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

STUB_NAME = "triton_python_backend_stub"


class TritonServerError(RuntimeError):
    """The server could not be found, did not start, or did not become ready."""


@dataclass(frozen=True)
class TritonPaths:
    """Where the pieces of the wheel's Triton server live."""

    server_bin: Path  # .../pytriton/tritonserver/bin/tritonserver
    backends_dir: Path  # .../pytriton/tritonserver/backends
    libs_dir: Path  # .../site-packages/nvidia_pytriton.libs
    stubs_dir: Path  # .../pytriton/tritonserver/python_backend_stubs

    def stub_for(self, python_version: str) -> Path:
        """The stub shipped for ``python_version`` (``"3.11"``)."""
        return self.stubs_dir / python_version / STUB_NAME

    @property
    def installed_stub(self) -> Path:
        """Where the Python backend looks for its stub."""
        return self.backends_dir / "python" / STUB_NAME


def find_triton() -> TritonPaths:
    """Locate the Triton server inside the installed ``pytriton`` package.

    The package is found without being imported (importing it pulls in its whole client
    API). Raises ``TritonServerError`` when the package or a part of it is missing.
    """
    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        raise TritonServerError(
            "the 'pytriton' package is not installed; run scripts/setup.sh "
            "(it installs nvidia-pytriton into .venv)"
        )
    package_dir = Path(next(iter(spec.submodule_search_locations)))
    server_dir = package_dir / "tritonserver"
    paths = TritonPaths(
        server_bin=server_dir / "bin" / "tritonserver",
        backends_dir=server_dir / "backends",
        libs_dir=package_dir.parent / "nvidia_pytriton.libs",
        stubs_dir=server_dir / "python_backend_stubs",
    )
    for required in (paths.server_bin, paths.backends_dir / "python", paths.libs_dir):
        if not required.exists():
            raise TritonServerError(f"incomplete nvidia-pytriton install: {required} is missing")
    return paths


def current_python_version() -> str:
    return f"{sys.version_info.major}.{sys.version_info.minor}"


def prepare_python_backend(
    paths: TritonPaths | None = None, python_version: str | None = None
) -> Path:
    """Copy the Python backend stub for ``python_version`` into ``backends/python/``.

    Does nothing when the installed stub already is that version's stub. Returns the
    installed stub's path.
    """
    paths = paths or find_triton()
    version = python_version or current_python_version()
    source = paths.stub_for(version)
    if not source.is_file():
        available = (
            sorted(p.name for p in paths.stubs_dir.iterdir()) if paths.stubs_dir.is_dir() else []
        )
        raise TritonServerError(
            f"no Python backend stub for Python {version} in {paths.stubs_dir} "
            f"(available: {', '.join(available) or 'none'})"
        )
    target = paths.installed_stub
    if not _same_file_content(source, target):
        # Copy then rename so that a concurrent server never sees a half-written stub.
        partial = target.with_name(f".{STUB_NAME}.{os.getpid()}.tmp")
        shutil.copy2(source, partial)
        partial.chmod(0o755)
        partial.replace(target)
        logger.info("installed Python %s backend stub at %s", version, target)
    return target


def _same_file_content(a: Path, b: Path) -> bool:
    if not b.is_file() or a.stat().st_size != b.stat().st_size:
        return False
    return a.read_bytes() == b.read_bytes()


def build_env(
    paths: TritonPaths,
    base_env: Mapping[str, str] | None = None,
    python_prefix: str | None = None,
) -> dict[str, str]:
    """Environment for the server process.

    ``LD_LIBRARY_PATH`` gets the wheel's libraries and the interpreter's ``LIBDIR`` in
    front; ``PATH`` gets ``<python_prefix>/bin`` (default ``sys.prefix``, the virtualenv
    when run from one) in front, so the stub embeds that Python.
    """
    env = dict(os.environ if base_env is None else base_env)
    prefix_bin = Path(python_prefix or sys.prefix) / "bin"
    lib_dirs = [str(paths.libs_dir)]
    libdir = sysconfig.get_config_var("LIBDIR")
    if libdir:
        lib_dirs.append(str(libdir))
    env["LD_LIBRARY_PATH"] = _prepend(lib_dirs, env.get("LD_LIBRARY_PATH", ""))
    env["PATH"] = _prepend([str(prefix_bin)], env.get("PATH", os.defpath))
    return env


def _prepend(entries: Sequence[str], current: str) -> str:
    rest = [p for p in current.split(os.pathsep) if p and p not in entries]
    return os.pathsep.join([*entries, *rest])
