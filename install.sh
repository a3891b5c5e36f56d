#!/usr/bin/env bash
# Installs koala-fl into ./.venv (with the test tools) and makes sure Fashion-MNIST is present.
# Usage: bash install.sh            (then: .venv/bin/koala ..., .venv/bin/python -m pytest)
set -euo pipefail
cd "$(dirname "$0")"

PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null || PYTHON=python3
"$PYTHON" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' || {
  echo "install.sh: koala-fl needs Python 3.11 (found $("$PYTHON" --version 2>&1)); set PYTHON=/path/to/python3.11" >&2
  exit 1
}

[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
# torch is pinned in pyproject.toml (2.13.0, CPU build): an unpinned torch pulls a multi-GB CUDA build.
.venv/bin/python -m pip install --quiet -e ".[test]"

FMNIST_DIR=${KOALA_FASHION_MNIST_DIR:-/usr/share/datasets/fashion-mnist}
if [ ! -f "$FMNIST_DIR/train-images-idx3-ubyte.gz" ] && [ ! -f "$FMNIST_DIR/train-images-idx3-ubyte" ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "install.sh: Fashion-MNIST is missing; installing the Debian package dataset-fashion-mnist"
    apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist >/dev/null
  else
    echo "install.sh: Fashion-MNIST is not in $FMNIST_DIR. Install it with" >&2
    echo "  sudo apt-get install -y dataset-fashion-mnist" >&2
    echo "or download it with: .venv/bin/koala data download fashion-mnist --dir DIR (and set KOALA_FASHION_MNIST_DIR=DIR)" >&2
  fi
fi
echo "install.sh: koala-fl is installed in .venv"
