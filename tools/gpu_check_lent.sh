#!/usr/bin/env bash
# One call of the GPU check on a lent machine that cannot install packages (it has torch, timm, peft, click,
# pytest). Unpacks DALI from the parts tools/pack_dali.sh wrote to CARRY (once per machine), then runs one
# part of benchmarks.gpu_check with that machine's python3 inside the call's time limit.
#   usage: bash tools/gpu_check_lent.sh PART [CARRY=.carry] [gpu_check options, e.g. --quick]
#   PART: stores  the synthetic stores the benchmarks read, without DALI: run it in a call that carries a part
#         memmap  the seed's configuration over the DataLoader kinds (memmap@4, memmap@8, memmap-seed), FedLoRA
#                 then FedAvg, without DALI: the next call that carries a part
#         rounds  call A: the seed's configuration, FedLoRA then FedAvg over the loader kinds, and both
#                 again with torch capped at 12 GiB (the seed's card)
#         detail  call B: the GPU tests under a hard limit, the loader detail, torch.compile
#         all     every step in one call (a machine lent for longer)
# GPU_CHECK_LIMIT_S: the timeout_s this device call was given (default 300). The check gets what is left of it
# after unpacking, less a reserve for the kill's grace and the archive, so $OUT is always complete in time.
# $OUT gets gpu-check.log, and after every step summary.md, errors.txt and results.tgz (this call's new files
# under benchmarks/results), four of the eight files a call brings back. Exits with the check's status
# (124: out of time, 1: a step failed).
set -uo pipefail
part=${1:-}; shift || true
case $part in
  stores|memmap|rounds|detail) args=(--part "$part") ;;
  all) args=() ;;
  *) echo "usage: bash tools/gpu_check_lent.sh stores|memmap|rounds|detail|all [CARRY=.carry] [options]" >&2; exit 2 ;;
esac
carry=.carry
if [[ $# -gt 0 && $1 != -* ]]; then carry=$1; shift; fi
limit=${GPU_CHECK_LIMIT_S:-300}
reserve=30  # python's pages at its deadline, then `timeout`'s TERM (+10 s) and KILL (+5 s), then tar
out=${OUT:-/tmp/gpu-check-out}
mkdir -p "$out"
log=$out/gpu-check.log
marker=$(mktemp)  # files under benchmarks/results newer than this are this call's results
site=${DALI_SITE:-/tmp/dali-site}  # kept while the machine is warm: later calls skip the unpacking
echo "gpu-check $part: limit ${limit} s" | tee "$log"
if [[ $part != stores && $part != memmap && ! -d $site/nvidia/dali ]]; then
  bash "$carry/dali-1/unpack.sh" "$site" 2>&1 | tee -a "$log"
  [[ ${PIPESTATUS[0]} == 0 ]] || { echo "error: DALI could not be unpacked from $carry" | tee -a "$log"; exit 1; }
fi
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$site:$PWD PYTHONUNBUFFERED=1
budget=$((limit - SECONDS - reserve))
if ((budget < 30)); then
  echo "error: ${budget} s left for the check after unpacking (${SECONDS} s); give the call a larger limit" | tee -a "$log"
  exit 124
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | tee -a "$log"
echo "gpu-check $part: ${budget} s for the check (unpacking took ${SECONDS} s)" | tee -a "$log"
timeout -k 5 $((budget + 10)) "${PYTHON:-python3}" -m benchmarks.gpu_check "${args[@]}" --budget-s "$budget" \
  --report-dir "$out" "$@" 2>&1 | tee -a "$log"
rc=${PIPESTATUS[0]}
# Again at the end, from the files themselves: a step killed mid-way still left its partial output (gpu-tests.txt).
mapfile -d '' new < <(find benchmarks/results -type f -newer "$marker" -print0 2>/dev/null)
if ((${#new[@]})); then tar -czf "$out/results.tgz" "${new[@]}"; fi
rm -f "$marker"
echo "gpu-check $part: exit $rc after ${SECONDS} s; gpu-check.log, summary.md, errors.txt, results.tgz in $out" \
  | tee -a "$log"
exit "$rc"
