#!/usr/bin/env bash
# Installs everything the project needs on a Debian machine with Python 3.11:
# the system programs (espeak-ng, flite, sox, fortunes, chromium + chromedriver) and a virtual
# environment in .venv with the package and its dev extras. Safe to run again: it skips what is there.
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(espeak-ng flite sox libsndfile1 fortunes fortunes-min chromium chromium-driver python3-venv)

missing=()
for p in "${APT_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
    if command -v apt-get >/dev/null 2>&1; then
        SUDO=""
        [ "$(id -u)" -eq 0 ] || SUDO="sudo"
        echo "install.sh: installing system packages: ${missing[*]}"
        $SUDO apt-get update -qq
        DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    else
        echo "install.sh: not a Debian system; please install: ${missing[*]}" >&2
    fi
fi

PYTHON="${PYTHON:-}"
if [ -z "$PYTHON" ]; then
    for candidate in python3.11 python3; do
        if command -v "$candidate" >/dev/null 2>&1 &&
            "$candidate" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)'; then
            PYTHON="$candidate"
            break
        fi
    done
fi
[ -n "$PYTHON" ] || { echo "install.sh: Python >= 3.11 not found" >&2; exit 2; }

if [ ! -x .venv/bin/python ]; then
    echo "install.sh: creating .venv with $PYTHON"
    "$PYTHON" -m venv .venv
    .venv/bin/python -m pip install -q --upgrade pip setuptools wheel
fi

# Reinstall only when the dependency list changed.
stamp=".venv/.installed-$(sha256sum pyproject.toml | cut -c1-16)"
if [ ! -f "$stamp" ]; then
    echo "install.sh: installing the package and its dependencies into .venv (a few minutes the first time)"
    .venv/bin/python -m pip install -q -e '.[dev]'
    rm -f .venv/.installed-*
    touch "$stamp"
fi
echo "install.sh: ready ($(.venv/bin/python --version), keras $(.venv/bin/python -c 'import keras; print(keras.__version__)' 2>/dev/null))"
