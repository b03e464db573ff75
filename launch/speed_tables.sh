#!/usr/bin/env bash
# Issue 17's speed tables, in one go on the machine at hand (run it on a quiet machine:
# only ratios measured in one run mean anything). About 35 minutes on a 2-core CPU.
#
#   bash launch/speed_tables.sh [OUT_DIR]        # default OUT_DIR: speed_tables/
#
# Prints markdown for BUILD_NOTES "Speed side by side (issue 17)" and writes
# OUT_DIR/tables.md (the same text) and OUT_DIR/pruned_latency.png. Needs the torch extra
# for the first table. Environment: PYTHON (default python3), REPEATS (default 10),
# LEVER_XLA_FLAGS (the XLA:CPU flag set tried as a lever; an unknown flag makes that
# table say so instead of stopping the script).
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
PYTHON=${PYTHON:-python3}
REPEATS=${REPEATS:-10}
OUT=${1:-speed_tables}
LEVER_XLA_FLAGS=${LEVER_XLA_FLAGS:---xla_cpu_multi_thread_eigen=false}
# XLA:CPU's default hands YNNPACK ("__ynn_fusion" in the compiled HLO) the kernel-gradient
# convolutions and the reductions (BN statistics and their gradients): in a resnet20 train
# step 45 convolutions, 103 reductions, 1 dot. Allowing it individual dots only sends the
# others back to XLA's own Eigen convolutions and loop emitters.
NO_YNN_FLAGS=--xla_cpu_experimental_ynn_fusion_type=LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
bench() { "$PYTHON" -m kdjax.bench --warmup 2 --repeats "$REPEATS" "$@"; }

{
  echo "## Speed side by side (issue 17): $(date -u +%F), $(lscpu | grep 'Model name' | sed 's/  */ /g')"
  echo
  echo "### Train-step rows vs PyTorch eager (2 rounds, A B A B; + the BN-folding bound row)"
  bench --compare-torch --rounds 2 --bn-folding-bound \
    || echo "(compare-torch failed: is the torch extra installed?)"
  echo
  echo "### Lever: matmul kernel gradient (--conv-kernel-grad matmul)"
  bench --conv-kernel-grad matmul || echo "(lever run failed)"
  echo
  echo "### Lever: XLA:CPU flags per simulated device ($LEVER_XLA_FLAGS)"
  bench --xla-flags="$LEVER_XLA_FLAGS" || echo "(XLA rejected the flags)"
  echo
  echo "### Lever: YNNPACK for dots only (convolutions and reductions back to XLA's own)"
  bench --compare-torch --rounds 2 --xla-flags="$NO_YNN_FLAGS" || echo "(lever run failed)"
  echo
  echo "### Lever: batch 128 on both sides"
  bench --compare-torch --rounds 2 --batch 128 || echo "(lever run failed)"
  echo
  echo "### Pruned resnet56: eval latency vs MACs (batch 64)"
  bench --pruned-latency resnet56 --png "$OUT/pruned_latency.png"
  echo
  echo "### EMO-PMS population evaluation (candidate evaluations/s)"
  bench --population-eval
} 2> "$OUT/stderr.log" | tee "$OUT/tables.md"
