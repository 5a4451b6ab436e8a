#!/usr/bin/env bash
# Prepare this checkout to serve and test: the project virtualenv (.venv), the Debian
# library perf_analyzer needs (libb64-0d) and the Triton Python backend stub.
#
# Idempotent and quiet: a second run with nothing to do prints nothing and takes about a
# second. Python packages are reinstalled only when pyproject.toml (or the Python version)
# changes. Environment: PYTHON (interpreter for a new .venv, default python3).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
PYTHON="${PYTHON:-python3}"
STAMP="$VENV/.preemptserve-install-stamp"

say() { echo "setup: $*" >&2; }
die() { echo "setup: error: $*" >&2; exit 1; }

# Runs a command quietly; on failure shows its output and stops.
run_logged() {
    local what="$1"; shift
    local log
    log="$(mktemp "${TMPDIR:-/tmp}/preemptserve-setup.XXXXXX")"
    if ! "$@" >"$log" 2>&1; then
        tail -n 40 "$log" >&2
        rm -f "$log"
        die "$what failed (command: $*)"
    fi
    rm -f "$log"
}

# Two setups at once (serve and test started together) would race on pip.
mkdir -p "$ROOT/.cache"
if command -v flock >/dev/null 2>&1; then
    exec 9>"$ROOT/.cache/setup.lock"
    flock 9
fi

# 1. Virtualenv ---------------------------------------------------------------------------
if [[ ! -x "$VENV/bin/python" ]]; then
    command -v "$PYTHON" >/dev/null 2>&1 || die "'$PYTHON' not found; install Python 3.10+ or set PYTHON"
    "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 10))' \
        || die "$PYTHON is $("$PYTHON" -V 2>&1); Python 3.10 or newer is required"
    say "creating $VENV with $("$PYTHON" -V 2>&1)"
    run_logged "creating the virtualenv" "$PYTHON" -m venv "$VENV"
fi
"$VENV/bin/python" -c 'import sys' 2>/dev/null \
    || die "$VENV/bin/python does not run (was its Python removed?); delete .venv and rerun"

# 2. Python packages ----------------------------------------------------------------------
want_stamp="$(
    { cat "$ROOT/pyproject.toml"; "$VENV/bin/python" -VV; } | sha256sum | cut -d' ' -f1
)"
have_stamp="$(cat "$STAMP" 2>/dev/null || true)"
if [[ "$want_stamp" != "$have_stamp" ]] \
    || ! "$VENV/bin/python" -c 'import importlib.util as u, sys
sys.exit(not all(u.find_spec(m) for m in ("preemptserve", "tritonclient", "pytriton", "ray")))'; then
    say "installing Python packages into .venv (a few minutes on a fresh machine)"
    run_logged "pip install" "$VENV/bin/python" -m pip install --quiet \
        --disable-pip-version-check -e "${ROOT}[test,cluster]"
    echo "$want_stamp" >"$STAMP"
fi

# 3. libb64 for perf_analyzer -------------------------------------------------------------
# Only perf_analyzer needs it (the server carries its own copy), so failing to install it
# is a warning, not an error.
have_libb64() {
    compgen -G '/usr/lib/*/libb64.so.0d' >/dev/null || compgen -G '/lib/*/libb64.so.0d' >/dev/null \
        || { PATH="$PATH:/sbin:/usr/sbin" ldconfig -p 2>/dev/null | grep -q 'libb64\.so\.0d'; }
}
if ! have_libb64; then
    as_root=()
    can_install=1
    if [[ "$(id -u)" -ne 0 ]]; then
        if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
            as_root=(sudo -n)
        else
            can_install=0
        fi
    fi
    if ! command -v apt-get >/dev/null 2>&1; then
        say "warning: libb64.so.0d is missing and there is no apt-get;" \
            "perf_analyzer needs it (Debian package libb64-0d)"
    elif [[ "$can_install" -eq 0 ]]; then
        say "warning: libb64.so.0d is missing; run 'sudo apt-get install libb64-0d'" \
            "(perf_analyzer needs it)"
    else
        say "installing Debian package libb64-0d (for perf_analyzer)"
        export DEBIAN_FRONTEND=noninteractive
        if "${as_root[@]}" apt-get update -qq >/dev/null 2>&1 \
            && "${as_root[@]}" apt-get install -y -qq --no-install-recommends libb64-0d \
                >/dev/null 2>&1; then
            have_libb64 || say "warning: libb64-0d installed but libb64.so.0d is not in the ld cache"
        else
            say "warning: 'apt-get install libb64-0d' failed; perf_analyzer will not run"
        fi
    fi
fi

# 4. Triton Python backend stub -----------------------------------------------------------
run_logged "preparing the Triton Python backend" "$VENV/bin/python" -c \
    'from preemptserve.triton_server import prepare_python_backend; prepare_python_backend()'
