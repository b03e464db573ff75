#!/usr/bin/env bash
# Run a kdjax pipeline on every worker of a Cloud TPU VM (single- or multi-host).
#
#   bash launch/tpu_vm.sh TPU_NAME ZONE CONFIG WORKDIR [--config.key=value ...]
#
# Copies this checkout to each worker, installs kdjax with jax[tpu] into ~/kdjax/.venv,
# and starts the same command on all workers. WORKDIR must be shared storage (a gs://
# bucket or a mounted filesystem) so that every host sees the same checkpoints.
# Multi-host runs set --config.train.distributed=True (jax.distributed.initialize()).
# Re-running the same command after a preemption resumes from the last checkpoint.
set -euo pipefail
[ $# -ge 4 ] || { sed -n '2,11p' "$0" >&2; exit 2; }
tpu=$1 zone=$2 config=$3 workdir=$4
shift 4
cd "$(dirname "$0")/.."
gcloud compute tpus tpu-vm scp --recurse --zone "$zone" --worker=all . "$tpu":~/kdjax
gcloud compute tpus tpu-vm ssh "$tpu" --zone "$zone" --worker=all --command "
  set -e; cd ~/kdjax
  [ -x .venv/bin/python ] || python3 -m venv .venv
  .venv/bin/pip install -q -e . 'jax[tpu]==0.10.2'
  .venv/bin/python -m kdjax.main --config=$config --workdir=$workdir \
      --config.train.distributed=True $*
"
