#!/usr/bin/env bash
# Rehearse the lent-GPU procedure of benchmarks/README.md here, every step tiny (--quick) on the CPU.
#   usage: PYTHON=<python holding only the GPU machine's packages> bash tools/rehearse_lent.sh [CARRY=.carry]
# Copies the working tree as a device call sends it (tracked and untracked-not-ignored files) and the DALI
# parts beside it, then runs the procedure's calls, each under `timeout` at its timeout_s and into an OUT of
# its own: stores, memmap, rounds, detail, and a detail call given too little time on purpose. For each call it prints
# the exit status, the seconds taken and the files that would come back. Leaves everything in a temporary
# folder, printed at the end.
set -uo pipefail
carry=$(realpath "${1:-.carry}")
py=$(command -v "${PYTHON:?set PYTHON to the interpreter to rehearse with}")
work=$(mktemp -d)
repo=$work/repo
mkdir -p "$repo/.carry"
git ls-files -co --exclude-standard -z | tar --null -T - -cf - | tar -C "$repo" -xf -
for part in "$carry"/dali-*; do cp -r "$part" "$repo/.carry/"; done
echo "rehearsal in $work: tree $(du -sh --exclude=.carry "$repo" | cut -f1), parts $(ls "$carry" | wc -l)," \
  "$("$py" -c 'import sys, torch; print("Python", sys.version.split()[0], "torch", torch.__version__)')"
cd "$repo" || exit 1
export DALI_SITE=$work/dali-site PYTHON=$py

call() {  # name, timeout_s, then gpu_check_lent.sh's arguments
  local name=$1 limit=$2 t0=$SECONDS rc
  shift 2
  OUT=$work/out-$name GPU_CHECK_LIMIT_S=$limit timeout "$limit" bash tools/gpu_check_lent.sh "$@" \
    >"$work/$name.stdout" 2>&1
  rc=$?
  echo "call $name (timeout_s $limit): exit $rc after $((SECONDS - t0)) s; back: $(ls "$work/out-$name" | xargs)"
  grep -E '^\| [^|]+ \| [0-9]+ \| [^|]+ \|$' "$work/out-$name/summary.md" 2>/dev/null | sed 's/^/    /'
}

call stores 120 stores --quick
call memmap 240 memmap --quick  # before the rounds call has unpacked DALI: this one must run without it
call rounds 240 rounds --quick
call detail 240 detail --quick
# 35 s for the check, imports included. detail's three steps take longer than rounds' first two, so a step is cut
# or not started on an idle machine too (a quick rounds call finished inside 35 s on 2026-12-04).
call cut 65 detail --quick
echo "results.tgz of the rounds call: $(tar -tzf "$work/out-rounds/results.tgz" | grep -c '\.json$') JSON files"
echo "left in $work"
