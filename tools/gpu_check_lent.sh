#!/usr/bin/env bash
# The GPU check on a lent machine that cannot install packages (it has torch, timm, peft, click, pytest).
# Unpacks DALI from the parts pack-dali.sh wrote to CARRY (once), runs benchmarks.gpu_check with that
# machine's python3, and leaves the log and the whole results folder as two files in $OUT, the most a
# device call brings back. Exits with the check's status (124 when it ran out of time).
#   usage: bash tools/gpu_check_lent.sh [CARRY=.carry] [gpu_check options, e.g. --quick or --steps round]
# GPU_CHECK_LIMIT_S (default 540) stops the check in time for the archive to be written inside a
# 600 s device call; summary.md is rewritten after every step, so a check cut short still reports.
set -uo pipefail
carry=.carry
if [[ $# -gt 0 && $1 != -* ]]; then carry=$1; shift; fi
site=/tmp/dali-site
if [[ ! -d $site/nvidia/dali ]]; then
  bash "$carry/dali-1/unpack.sh" "$site" || { echo "error: DALI could not be unpacked from $carry"; exit 1; }
fi
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$site:$PWD PYTHONUNBUFFERED=1
out=${OUT:-/tmp/gpu-check-out}
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | tee "$out/gpu-check.log"
timeout -k 10 "${GPU_CHECK_LIMIT_S:-540}" python3 -m benchmarks.gpu_check "$@" 2>&1 | tee -a "$out/gpu-check.log"
rc=${PIPESTATUS[0]}
# Everything under benchmarks/results (new and old, under a megabyte each) as one archive.
tar -czf "$out/results.tgz" benchmarks/results
echo "gpu-check exit $rc; log and results.tgz in $out"
exit "$rc"
