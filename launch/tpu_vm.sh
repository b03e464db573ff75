#!/usr/bin/env bash
# Run a kdjax pipeline on every worker of a Cloud TPU VM or pod slice.
#
#   bash launch/tpu_vm.sh [OPTIONS] TPU_NAME ZONE CONFIG WORKDIR [--config.key=value ...]
#
# Options:
#   --create=TYPE     create the TPU VM (accelerator type, e.g. v4-8, v4-32, v5litepod-16)
#                     when it does not exist or was preempted; without it, it must exist
#   --version=V       TPU software version for --create (default tpu-ubuntu2204-base)
#   --spot            create it as a Spot VM (cheaper, can be preempted)
#   --project=P       Google Cloud project (default: gcloud's configured one)
#   --detach          start the run under nohup and return; output in ~/kdjax/run.log
#                     on every worker
#   --dry-run         print the commands (local and remote) instead of running them
#
# What it does: packs the checkout's tracked files with `git archive` (uncommitted edits
# to tracked files included; no .git, no .venv, no untracked files), copies the archive
# to every worker, installs kdjax[train,tpu] with constraints.txt into ~/kdjax/venv with
# a Python >= 3.11 (installs Debian's python3.11 if the image has none), and runs
# `python -m kdjax.main` on --worker=all with --config.train.distributed=True. Every
# argument is quoted with printf %q, so --config.optim.milestones=(82,123) arrives intact.
# WORKDIR must be storage all workers share (gs://BUCKET/run). TFDS_DATA_DIR, when set
# here (e.g. TFDS_DATA_DIR=gs://BUCKET/tensorflow_datasets), is exported on the workers.
# After a preemption, run the same command again: it resumes from WORKDIR's checkpoints.
set -euo pipefail

usage() { sed -n '2,24p' "$0" >&2; exit 2; }

dry_run=0 detach=0 spot=0 create="" project="" version=tpu-ubuntu2204-base
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) dry_run=1 ;;
    --detach) detach=1 ;;
    --spot) spot=1 ;;
    --create=*) create=${1#*=} ;;
    --version=*) version=${1#*=} ;;
    --project=*) project=${1#*=} ;;
    --) shift; break ;;
    -*) echo "tpu_vm.sh: unknown option $1" >&2; usage ;;
    *) break ;;
  esac
  shift
done
[ $# -ge 4 ] || usage
tpu=$1 zone=$2 config=$3 workdir=$4
shift 4
case "$workdir" in
  gs://* | /*) ;;
  *) echo "tpu_vm.sh: WORKDIR must be gs://... or an absolute path all workers share, got $workdir" >&2
     exit 2 ;;
esac
cd "$(dirname "$0")/.."

quote() { printf '%q' "$1"; shift; [ $# -eq 0 ] || printf ' %q' "$@"; }
# Run a local command, or print it (shell-quoted, ready to paste) with --dry-run.
run() { if [ "$dry_run" = 1 ]; then quote "$@"; echo; else "$@"; fi; }

gcloud_tpu=(gcloud compute tpus tpu-vm)
where=(--zone="$zone")
[ -z "$project" ] || where+=(--project="$project")

# 1. Create the TPU VM when asked to and it is absent or preempted (reuse it otherwise).
if [ -n "$create" ]; then
  state=ABSENT
  if [ "$dry_run" = 1 ]; then
    echo "# if 'describe' finds no TPU VM (or a PREEMPTED one, deleted first):"
  else
    state=$("${gcloud_tpu[@]}" describe "$tpu" "${where[@]}" --format='value(state)' 2>/dev/null) \
      || state=ABSENT
  fi
  if [ "$state" = PREEMPTED ]; then
    run "${gcloud_tpu[@]}" delete "$tpu" "${where[@]}" --quiet
    state=ABSENT
  fi
  if [ "$state" = ABSENT ]; then
    spot_flag=()
    [ "$spot" = 0 ] || spot_flag=(--spot)
    run "${gcloud_tpu[@]}" create "$tpu" "${where[@]}" --accelerator-type="$create" \
      --version="$version" "${spot_flag[@]}"
  fi
fi

# 2. Ship tracked files only: a commit of the working tree (HEAD when it is clean). `git
#    stash create` only writes a dangling commit object; work tree and refs stay as they are.
git rev-parse --git-dir >/dev/null 2>&1 \
  || { echo "tpu_vm.sh: run it from a git checkout (it ships the tracked files)" >&2; exit 2; }
tree=$(git stash create)
tree=${tree:-HEAD}
archive=${TMPDIR:-/tmp}/kdjax-src-$$.tar.gz
run git archive --format=tar.gz --output="$archive" "$tree"
[ "$dry_run" = 1 ] || trap 'rm -f "$archive"' EXIT
run "${gcloud_tpu[@]}" scp "$archive" "$tpu":kdjax-src.tar.gz "${where[@]}" --worker=all

# 3. The script each worker runs: unpack, install with Python >= 3.11, start kdjax.
kdjax_cmd=$(quote ../venv/bin/python -m kdjax.main --config="$config" --workdir="$workdir" \
  --config.train.distributed=True "$@")
tfds_env=""
[ -z "${TFDS_DATA_DIR:-}" ] || tfds_env="export TFDS_DATA_DIR=$(quote "$TFDS_DATA_DIR")"
if [ "$detach" = 1 ]; then
  start="nohup $kdjax_cmd > ../run.log 2>&1 < /dev/null & echo \$! > ../run.pid
echo \"\$(hostname): started; log in ~/kdjax/run.log\""
else
  start="exec $kdjax_cmd"
fi
read -r -d '' remote <<EOF || true
set -euo pipefail
mkdir -p ~/kdjax && cd ~/kdjax
if [ -f run.pid ] && kill -0 "\$(cat run.pid)" 2>/dev/null; then
  echo "\$(hostname): a kdjax run (pid \$(cat run.pid)) is still running; stop it first" >&2; exit 1
fi
rm -rf src && mkdir src && tar -xzf ~/kdjax-src.tar.gz -C src
py=""
for c in python3.13 python3.12 python3.11 python3; do
  if command -v "\$c" >/dev/null && "\$c" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
    py=\$c; break
  fi
done
if [ -z "\$py" ]; then
  sudo apt-get update -qq && sudo apt-get install -y -qq python3.11 python3.11-venv
  py=python3.11
fi
[ -x venv/bin/python ] || "\$py" -m venv venv
if ! venv/bin/python -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
  echo "\$(hostname): ~/kdjax/venv has Python < 3.11; delete it and rerun" >&2; exit 1
fi
venv/bin/python -m pip install -q --upgrade pip
venv/bin/python -m pip install -q -c src/constraints.txt -e 'src[train,tpu]'
cd src
$tfds_env
$start
EOF
if [ "$dry_run" = 1 ]; then
  echo "# the script each worker runs (passed as --command below):"
  while IFS= read -r line; do echo "#   $line"; done <<<"$remote"
fi
run "${gcloud_tpu[@]}" ssh "$tpu" "${where[@]}" --worker=all --command="$remote"
