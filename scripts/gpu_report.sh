#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0
# Copyright (c) berdiff contributors
# The GPU rows in one run of at most 9 minutes (docs/benchmarks.md, "GPU run"): training throughput, bundle inference
# throughput, the equal-compute benchmark and the BraTS recipe, each part with its own time limit
# (berdiff.apps.gpu_report). Writes $OUT/gpu_report.json, $OUT/gpu_report.md and $OUT/logs/.
#
#   bash scripts/gpu_report.sh            # on the GPU machine, from a copy of the repository with .whl/ and .data/
#   bash scripts/gpu_report.sh --dry-run  # the same steps on the CPU with tiny sizes and synthetic data
#
# Environment: OUT (default outputs/gpu_report), PYTHON (default python3), BERDIFF_WHEELS (folder of wheels to
# install, default .whl; none there: the current environment is used), BERDIFF_SITE (where they are installed,
# default /tmp/site), BERDIFF_GPU_REPORT_DRY=1 (= --dry-run), BERDIFF_GPU_REPORT_ARGS (more flags of
# `python -m berdiff gpu_report`, e.g. "--parts train_speed,inference").
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
DRY=${BERDIFF_GPU_REPORT_DRY:-0}
[ "${1:-}" = "--dry-run" ] && DRY=1
PYTHON=${PYTHON:-python3}
WHEELS=${BERDIFF_WHEELS:-.whl}
SITE=${BERDIFF_SITE:-/tmp/site}
export OUT=${OUT:-$PWD/outputs/gpu_report}
mkdir -p "$OUT"
# the GPU machine has CUDA PyTorch but not MONAI: install the wheels (docs/benchmarks.md, "GPU run") into SITE and
# put them and the project's source on PYTHONPATH (no build, no pip install -e)
if compgen -G "$WHEELS/*.whl" >/dev/null; then
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "$WHEELS"/*.whl || exit 1
  export PYTHONPATH=$SITE:$PWD/custom PYTHONUNBUFFERED=1
else
  echo "gpu_report.sh: no wheels in $WHEELS/, using the current environment" >&2
  export PYTHONPATH=$PWD/custom${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
fi
if [ "$DRY" = 1 ]; then FLAGS="--dry_run True"; LIMIT=1000; else FLAGS=""; LIMIT=560; fi
# shellcheck disable=SC2086  # FLAGS and BERDIFF_GPU_REPORT_ARGS are word lists
timeout -k 10 "$LIMIT" "$PYTHON" -m berdiff gpu_report --out "$OUT" $FLAGS ${BERDIFF_GPU_REPORT_ARGS:-}
rc=$?
if [ ! -s "$OUT/gpu_report.json" ]; then  # the report never started (e.g. an import error): say so in its files
  printf '{"mode": "failed to start", "rc": %d}\n' "$rc" >"$OUT/gpu_report.json"
  printf '# GPU report\n\nThe report did not start (exit status %d); see the output above.\n' "$rc" >"$OUT/gpu_report.md"
fi
exit "$rc"
