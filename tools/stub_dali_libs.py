"""Replace the shared libraries DALI links but dali-fl never calls by small stubs, to carry less to a lent GPU.

libdali*.so name FFmpeg (video), libsndfile (audio), CFITSIO (astronomy images) and CV-CUDA as DT_NEEDED, so the
files must exist for `import nvidia.dali`. Their code runs only in DALI's video, audio and FITS readers and
decoders and in four experimental GPU operators (experimental.resize, median_blur, dilate/erode,
warp_perspective: the only callers of cvcuda* in libdali_operators.so, read off its disassembly), which
dali-fl never builds: it feeds uint8 batches through external_source, slice, resize and crop_mirror_normalize.
Each stub keeps the library's file name, SONAME and symbol versions and defines only the symbols that the kept
libraries import from it: a function that names itself on stderr and aborts, or a zeroed object of the
original size. Libraries that only stubbed ones needed are deleted. Prove a stubbed tree with the import and
the CPU loader tests (benchmarks/README.md); a stub that is ever called stops the process with its name.

    python tools/stub_dali_libs.py SITE        # SITE holds nvidia/dali; needs readelf and a C compiler
"""
from __future__ import annotations

import argparse
import logging
import re
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional

log = logging.getLogger("stub_dali_libs")
# C libraries whose every exported symbol is their own API (av_*, sws_*, sf_*, ff*, cvcuda*, and CV-CUDA's
# nvcvOperatorDestroy), and their dependencies.
# Not the AWS and Google Cloud libraries: they also export the abseil and libstdc++ symbols that DALI itself
# resolves from them (absl::Mutex::Lock runs at import), so they stay whole.
STUBBED = re.compile(r"lib(avcodec|avformat|avutil|avfilter|swscale|sndfile|FLAC|opus|ogg|cfitsio|cvcuda)-")


@dataclass(frozen=True)
class Symbol:
    """One dynamic symbol: its name, version ('' if none), type, size and whether this file defines it."""

    name: str
    version: str
    kind: str
    size: int
    defined: bool


def readelf(*args: str) -> str:
    """readelf's output, wide."""
    return subprocess.run(["readelf", "-W", *args], check=True, capture_output=True, text=True).stdout


def dynamic_symbols(path: Path) -> list[Symbol]:
    """The dynamic symbol table of a shared library."""
    syms = []
    for line in readelf("--dyn-syms", str(path)).splitlines():
        f = line.split()
        if len(f) < 8 or not f[0].rstrip(":").isdigit() or f[0] == "0:":
            continue
        name, _, version = f[7].replace("@@", "@").partition("@")
        size = int(f[2], 16) if f[2].startswith("0x") else int(f[2])
        syms.append(Symbol(name, version.split(" ")[0], f[3], size, f[6] != "UND"))
    return syms


def dynamic_entries(path: Path, tag: str) -> list[str]:
    """The values of one dynamic-section tag (NEEDED, SONAME)."""
    return [m.group(1) for m in re.finditer(rf"\({tag}\)[^\[\n]*\[(.+?)\]", readelf("-d", str(path)))]


def stub_source(lib: str, syms: Iterable[Symbol]) -> str:
    """C for the stub: each function reports itself and aborts; each object is zeroed at its original size."""
    lines = ["#include <stdio.h>", "#include <stdlib.h>",
             "static void stub(const char *name) {",
             f'  fprintf(stderr, "dali-fl: %s of {lib} was called, but it is a stub (tools/stub_dali_libs.py)\\n",'
             " name);", "  abort();", "}"]
    for i, s in enumerate(syms):
        if s.kind in ("FUNC", "IFUNC", "NOTYPE"):
            lines += [f'void f{i}(void) __asm__("{s.name}");', f'void f{i}(void) {{ stub("{s.name}"); }}']
        elif s.kind in ("OBJECT", "TLS"):
            tls = "__thread " if s.kind == "TLS" else ""
            lines.append(f'{tls}char o{i}[{max(s.size, 1)}] __asm__("{s.name}");')
        else:
            raise SystemExit(f"error: {lib}: symbol {s.name} of type {s.kind}: no stub for that")
    return "\n".join(lines) + "\n"


def version_script(syms: list[Symbol]) -> Optional[str]:
    """A linker version script giving each symbol its original version; None when none is versioned."""
    versions = sorted({s.version for s in syms})
    if versions in ([], [""]):
        return None
    if "" in versions:
        raise SystemExit("error: versioned and unversioned symbols in one library: no stub for that")
    nodes = [f"{v} {{ global: " + " ".join(f'"{s.name}";' for s in syms if s.version == v) + " local: *; };"
             for v in versions]
    return "\n".join(nodes) + "\n"


def build_stub(lib: Path, syms: list[Symbol]) -> None:
    """Compile the stub over `lib`, with its SONAME and versions."""
    soname = (dynamic_entries(lib, "SONAME") or [lib.name])[0]
    with tempfile.TemporaryDirectory() as tmp:
        src, script = Path(tmp) / "stub.c", version_script(syms)
        src.write_text(stub_source(lib.name, syms))
        cmd = ["cc", "-shared", "-fPIC", "-O1", "-o", str(lib), str(src), f"-Wl,-soname,{soname}"]
        if script:
            (Path(tmp) / "stub.map").write_text(script)
            cmd.append(f"-Wl,--version-script,{Path(tmp) / 'stub.map'}")
        subprocess.run(cmd, check=True)
    subprocess.run(["strip", "--strip-unneeded", str(lib)], check=True)


def stub_site(site: Path) -> tuple[list[str], list[str]]:
    """Stub or delete the libraries dali-fl never calls under SITE/nvidia/dali; returns (stubbed, deleted)."""
    dali = site / "nvidia" / "dali"
    libs = sorted(p for p in (dali / ".libs").iterdir() if p.is_file())
    doomed = [p for p in libs if STUBBED.match(p.name)]
    kept = sorted(dali.glob("*.so")) + [p for p in libs if p not in doomed]
    imported = {(s.name, s.version) for k in kept for s in dynamic_symbols(k) if not s.defined}
    needed = {n for k in kept for n in dynamic_entries(k, "NEEDED")}
    stubbed, deleted = [], []
    for lib in doomed:
        if lib.name not in needed:  # only other doomed libraries load it
            lib.unlink()
            deleted.append(lib.name)
            continue
        wanted = [s for s in dynamic_symbols(lib) if s.defined and ((s.name, s.version) in imported
                                                                    or (s.name, "") in imported)]
        before = lib.stat().st_size
        build_stub(lib, wanted)
        log.info("%s: %d symbols, %.1f MiB -> %.0f KiB", lib.name, len(wanted), before / 2**20,
                 lib.stat().st_size / 1024)
        stubbed.append(lib.name)
    return stubbed, deleted


def main(argv: Optional[list[str]] = None) -> None:
    """Stub SITE's unused DALI libraries and say what went."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("site", type=Path, help="folder holding nvidia/dali (an unpacked wheel)")
    site = p.parse_args(argv).site
    if not (site / "nvidia" / "dali" / ".libs").is_dir():
        p.error(f"{site}: no nvidia/dali/.libs here")
    stubbed, deleted = stub_site(site)
    log.info("stubbed %d libraries, deleted %d: %s", len(stubbed), len(deleted), " ".join(deleted))


if __name__ == "__main__":
    main()
