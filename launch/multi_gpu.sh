#!/usr/bin/env bash
# Run a kdjax pipeline on the GPUs of one machine, or of several machines together.
#
#   bash launch/multi_gpu.sh [OPTIONS] CONFIG WORKDIR [--config.key=value ...]
#
# One machine: all its GPUs, data parallel over a 1-D mesh (one process).
# Several machines: start the same command on each, with the same coordinator and
# number of processes and a different --process-id (0 on the coordinator's machine):
#   host A: bash launch/multi_gpu.sh --coordinator=10.0.0.1:1234 --num-processes=2 --process-id=0 ...
#   host B: bash launch/multi_gpu.sh --coordinator=10.0.0.1:1234 --num-processes=2 --process-id=1 ...
# WORKDIR must then be storage every machine sees (a shared filesystem or gs://...).
#
# Options:
#   --coordinator=HOST:PORT  address of process 0 (reachable from every machine)
#   --num-processes=N        number of processes (machines) in the run
#   --process-id=I           this machine's process index, 0 .. N-1
#   --auto                   multi-host with JAX's cluster auto-detection (e.g. under Slurm)
#                            instead of the three settings above
#   --dry-run                print the commands instead of running them
# Installs kdjax[train,cuda12] with constraints.txt into ./.venv (VENV=...) on first use.
set -euo pipefail

usage() { sed -n '2,20p' "$0" >&2; exit 2; }

dry_run=0 auto=0 coordinator="" num_processes="" process_id=""
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) dry_run=1 ;;
    --auto) auto=1 ;;
    --coordinator=*) coordinator=${1#*=} ;;
    --num-processes=*) num_processes=${1#*=} ;;
    --process-id=*) process_id=${1#*=} ;;
    --) shift; break ;;
    -*) echo "multi_gpu.sh: unknown option $1" >&2; usage ;;
    *) break ;;
  esac
  shift
done
[ $# -ge 2 ] || usage
config=$1 workdir=$2
shift 2
explicit="$coordinator$num_processes$process_id"
if [ -n "$explicit" ] && { [ -z "$coordinator" ] || [ -z "$num_processes" ] || [ -z "$process_id" ]; }; then
  echo "multi_gpu.sh: --coordinator, --num-processes and --process-id go together" >&2
  exit 2
fi
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}

quote() { printf '%q' "$1"; shift; [ $# -eq 0 ] || printf ' %q' "$@"; }
# Run a command, or print it (shell-quoted, ready to paste) with --dry-run.
run() { if [ "$dry_run" = 1 ]; then quote "$@"; echo; else "$@"; fi; }

if [ "$dry_run" = 1 ] || [ ! -x "$VENV/bin/python" ]; then
  run python3 -m venv "$VENV"
fi
run "$VENV/bin/python" -m pip install -q -c constraints.txt -e ".[train,cuda12]"

distributed=()
if [ -n "$explicit" ]; then
  distributed=(--config.train.distributed=True --config.train.coordinator_address="$coordinator"
               --config.train.num_processes="$num_processes" --config.train.process_id="$process_id")
elif [ "$auto" = 1 ]; then
  distributed=(--config.train.distributed=True)
fi
run "$VENV/bin/python" -m kdjax.main --config="$config" --workdir="$workdir" "${distributed[@]}" "$@"
