#!/usr/bin/env bash
# kdjax on one machine. Installs what it needs into ./.venv on first use.
#
#   bash launch/local.sh demo                 # KD demo on Fashion-MNIST (installs the dataset)
#   bash launch/local.sh test                 # the test suite (what CI runs)
#   bash launch/local.sh run CONFIG WORKDIR [--config.key=value ...]
#
# Environment: PYTHON (default python3), VENV (default .venv).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
FASHION_MNIST=/usr/share/datasets/fashion-mnist

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

ensure_venv() {  # $1: pip extras, e.g. "[train,test]"; versions pinned by constraints.txt
  if [ ! -x "$VENV/bin/python" ]; then
    if ! "$PYTHON" -m venv "$VENV" 2>/dev/null; then
      echo "python3 -m venv is unavailable; installing Debian's python3-venv" >&2
      as_root apt-get update -qq && as_root apt-get install -y -qq python3-venv
      rm -rf "$VENV" && "$PYTHON" -m venv "$VENV"
    fi
    "$VENV/bin/python" -m pip install -q --upgrade pip
  fi
  "$VENV/bin/python" -m pip install -q -c constraints.txt -e ".$1"
}

ensure_fashion_mnist() {
  if [ ! -f "$FASHION_MNIST/train-images-idx3-ubyte.gz" ]; then
    echo "installing the Fashion-MNIST dataset (Debian package dataset-fashion-mnist)" >&2
    as_root apt-get update -qq && as_root apt-get install -y -qq dataset-fashion-mnist
  fi
}

case "${1:-}" in
  demo)
    ensure_venv "[train]"
    ensure_fashion_mnist
    exec "$VENV/bin/python" -m kdjax.main --config=configs/kd.py:demo --workdir="${2:-/tmp/kdjax-demo}"
    ;;
  test)
    ensure_venv "[train,test]"
    shift
    exec "$VENV/bin/python" -m pytest -q "$@"
    ;;
  run)
    [ $# -ge 3 ] || { echo "usage: $0 run CONFIG WORKDIR [--config.key=value ...]" >&2; exit 2; }
    ensure_venv "[train]"
    config=$2 workdir=$3
    shift 3
    exec "$VENV/bin/python" -m kdjax.main --config="$config" --workdir="$workdir" "$@"
    ;;
  *)
    sed -n '2,9p' "$0" >&2
    exit 2
    ;;
esac
