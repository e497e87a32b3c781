#!/usr/bin/env bash
# Pack DALI and its small pure-Python dependencies, for Python 3.12 on x86_64 Linux, into
# parts small enough to move one at a time to a machine that cannot install packages itself.
#   usage: tools/pack_dali.sh [OUT_DIR=.carry] [PART_MB=56] [DALI_SPEC=nvidia-dali-cuda120==2.4.0]
# Writes OUT_DIR/dali-1/part .. OUT_DIR/dali-K/part and OUT_DIR/dali-1/unpack.sh, and adds
# OUT_DIR to .git/info/exclude when it lies inside a git checkout. Takes about 5 minutes on 2 cores.
# On the other machine, once every part is there:  bash OUT_DIR/dali-1/unpack.sh /tmp/site
# then: export PYTHONPATH=/tmp/site:$PWD
set -euo pipefail
out=${1:-.carry}; part_mb=${2:-56}; spec=${3:-nvidia-dali-cuda120==2.4.0}
py=3.12  # the lent GPU machine's python3; only its bindings are packed
work=$(mktemp -d); trap 'rm -rf "$work"' EXIT
python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$py" --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 -d "$work/whl" "$spec" astunparse gast optree nvtx makefun 'libcst~=1.8' \
  2> >(grep -v 'is ignored' >&2)
mkdir -p "$work/site"
for w in "$work"/whl/*.whl; do python3 -m zipfile -e "$w" "$work/site"; done
# Debug symbols are a tenth of DALI's 785 MB; the CUDA kernels are the rest and must stay.
find "$work/site" -name '*.so*' -type f -exec strip --strip-unneeded {} + 2>/dev/null || true
# What dali-fl never loads or calls, each removal checked by importing nvidia.dali and running the CPU loader
# tests on such a tree (benchmarks/README.md): DALI's bindings for the other interpreters (cp310 ... cp315t,
# 40 MB) and its C++ headers for building plugins (17 MB) go; FFmpeg, libsndfile, CFITSIO (21 MB) and CV-CUDA
# (52 MB) become stubs, because libdali*.so name them as DT_NEEDED and the import fails without the files.
# 56 MiB parts: three of them (163 MiB), and up to 8 MiB of working tree beside each under a call's 64 MiB.
tag=cpython-${py/./}
find "$work/site/nvidia/dali" -maxdepth 1 -name '*.cpython-*.so' ! -name "*.$tag-*" -delete
rm -rf "$work/site/nvidia/dali/include"
python3 "$(dirname "$0")/stub_dali_libs.py" "$work/site"
rm -rf "$out"/dali-*; mkdir -p "$out"
tar -C "$work/site" -cf - . | xz -9 -T0 > "$work/dali.tar.xz"
split -b "${part_mb}M" -d -a 1 "$work/dali.tar.xz" "$work/p"
k=0
for p in "$work"/p*; do k=$((k + 1)); mkdir -p "$out/dali-$k"; mv "$p" "$out/dali-$k/part"; done
sha256sum "$work/dali.tar.xz" | cut -d' ' -f1 > "$out/dali-1/sha256"
cat > "$out/dali-1/unpack.sh" <<'UNPACK'
#!/usr/bin/env bash
# Join the parts beside this folder, check them, and unpack into $1 (default /tmp/site).
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd); dest=${1:-/tmp/site}; mkdir -p "$dest"
parts=$(ls "$here"/dali-*/part | sort -V)
got=$(cat $parts | sha256sum | cut -d' ' -f1)
[[ $got == "$(cat "$here/dali-1/sha256")" ]] || { echo "DALI parts incomplete or damaged: have $(echo $parts | wc -w)"; exit 1; }
# xz where the machine has it, else Python's own lzma (the lent machine's image is not ours to rely on)
unxz() { if command -v xz >/dev/null; then xz -dc; else python3 -c 'import lzma, shutil, sys
shutil.copyfileobj(lzma.open(sys.stdin.buffer), sys.stdout.buffer, 1 << 20)'; fi; }
cat $parts | unxz | tar -C "$dest" -xf -
echo "DALI unpacked into $dest: export PYTHONPATH=$dest:\$PYTHONPATH"
UNPACK
chmod +x "$out/dali-1/unpack.sh"
top=$(git rev-parse --show-toplevel 2>/dev/null) || top=
rel=${top:+$(realpath --relative-to="$top" "$out")}
case "$rel" in ""|..|../*) rel= ;; esac  # only an OUT_DIR inside the checkout would travel with it
if [ -n "$rel" ]; then
  exclude=$(git rev-parse --git-path info/exclude)  # .git/info/exclude, also from a worktree
  mkdir -p "$(dirname "$exclude")"
  grep -qx "/$rel/" "$exclude" 2>/dev/null || echo "/$rel/" >> "$exclude"
fi
echo "$k parts of at most ${part_mb} MiB:"; du -sh "$out"/dali-*
if [ -n "$top" ]; then  # a device call carries one part beside the working tree, 64 MiB in all
  tree=$(cd "$top" && git ls-files -co --exclude-standard -z | du -cb --files0-from=- | tail -1 | cut -f1)
  big=$(du -b "$out"/dali-*/part | sort -n | tail -1 | cut -f1)
  echo "working tree that travels: $((tree >> 20)) MiB; with the largest part: $(((tree + big) >> 20)) of 64 MiB"
  ((tree + big < 64 << 20)) || { echo "error: a part and the working tree exceed a call's 64 MiB" >&2; exit 1; }
fi
