#!/usr/bin/env bash
# Run a kdjax pipeline on all GPUs of one machine (data parallel over a 1-D mesh).
#
#   bash launch/multi_gpu.sh CONFIG WORKDIR [--config.key=value ...]
#
# Installs kdjax with jax[cuda12] into ./.venv on first use. For several machines, start
# the same command on each with --config.train.distributed=True and the usual
# JAX coordinator environment (see jax.distributed.initialize).
set -euo pipefail
[ $# -ge 2 ] || { sed -n '2,8p' "$0" >&2; exit 2; }
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
"$VENV/bin/pip" install -q -e . 'jax[cuda12]==0.10.2'
config=$1 workdir=$2
shift 2
exec "$VENV/bin/python" -m kdjax.main --config="$config" --workdir="$workdir" "$@"
