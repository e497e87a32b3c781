"""tools/stub_dali_libs.py on a tiny DALI-like tree: the consumer still loads, a stub that is called says so."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
import stub_dali_libs  # noqa: E402  (a script in tools/, not a package)

pytestmark = pytest.mark.skipif(not (shutil.which("cc") and shutil.which("readelf") and shutil.which("strip")),
                                reason="needs a C compiler and binutils")


def cc(out: Path, source: str, *flags: str) -> None:
    """Compile one C source into a shared library."""
    src = out.with_suffix(".c")
    src.write_text(source)
    subprocess.run(["cc", "-shared", "-fPIC", "-o", str(out), str(src), *flags], check=True)
    src.unlink()


def fake_site(tmp: Path) -> Path:
    """nvidia/dali with libdali.so needing a versioned libavutil, which needs libFLAC, as the wheel's are."""
    libs = tmp / "nvidia" / "dali" / ".libs"
    libs.mkdir(parents=True)
    cc(libs / "libFLAC-1.so.1", "int flac_init(void) { return 7; }\n", "-Wl,-soname,libFLAC-1.so.1")
    (tmp / "avutil.map").write_text("DALI_LIBAVUTIL_61 { global: av_foo; av_unused; av_data; local: *; };\n")
    cc(libs / "libavutil-1.so.61",
       "int flac_init(void);\nint av_data[4] = {1, 2, 3, 4};\n"
       "int av_foo(int x) { return x + flac_init(); }\nint av_unused(void) { return 2; }\n",
       "-Wl,-soname,libavutil-1.so.61", f"-Wl,--version-script,{tmp / 'avutil.map'}", f"-L{libs}",
       "-l:libFLAC-1.so.1", "-Wl,-rpath,$ORIGIN")
    cc(tmp / "nvidia" / "dali" / "libdali.so",
       "extern int av_data[];\nint av_foo(int);\n"
       "int dali_probe(void) { return av_data[3]; }\nint dali_call(void) { return av_foo(1); }\n",
       f"-L{libs}", "-l:libavutil-1.so.61", "-Wl,-rpath,$ORIGIN/.libs")
    return tmp


def call(lib: Path, fn: str) -> subprocess.CompletedProcess:
    """`fn()` of `lib` in a fresh interpreter (a stub aborts the process)."""
    code = f"import ctypes; print(ctypes.CDLL({str(lib)!r}).{fn}())"
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)


def test_a_stubbed_library_keeps_its_soname_versions_and_the_imported_symbols_only(tmp_path: Path) -> None:
    site = fake_site(tmp_path)
    libdali = site / "nvidia" / "dali" / "libdali.so"
    assert call(libdali, "dali_call").stdout == "8\n" and call(libdali, "dali_probe").stdout == "4\n"

    stubbed, deleted = stub_dali_libs.stub_site(site)

    assert stubbed == ["libavutil-1.so.61"] and deleted == ["libFLAC-1.so.1"]  # only the stub needed FLAC
    stub = site / "nvidia" / "dali" / ".libs" / "libavutil-1.so.61"
    assert stub_dali_libs.dynamic_entries(stub, "SONAME") == ["libavutil-1.so.61"]
    assert stub_dali_libs.dynamic_entries(stub, "NEEDED") == ["libc.so.6"]
    defined = {(s.name, s.version) for s in stub_dali_libs.dynamic_symbols(stub) if s.defined}
    assert {("av_foo", "DALI_LIBAVUTIL_61"), ("av_data", "DALI_LIBAVUTIL_61")} <= defined
    assert not any(name == "av_unused" for name, _ in defined)  # nobody imports it
    assert call(libdali, "dali_probe").stdout == "0\n"  # loads with the stub; its objects are zeroed
    called = call(libdali, "dali_call")  # and a stub that runs stops the process, naming itself
    assert called.returncode != 0
    assert "dali-fl: av_foo of libavutil-1.so.61 was called, but it is a stub" in called.stderr


def test_only_the_codec_and_cv_cuda_libraries_are_stubbed() -> None:
    doomed = ["libavcodec-0c04e3c0.so.63", "libswscale-36be4ddb.so.10", "libsndfile-dabc7e88.so.1",
              "libcfitsio-5049f98f.so.10", "libFLAC-27ecb4eb.so.14", "libcvcuda-a00410f9.so.0"]
    kept = ["libgoogle_cloud_cpp_common-31de1a29.so.3", "libaws-cpp-sdk-core-cf25c681.so",
            "libz-6b38d87b.so.1", "libzstd-fa22945d.so.1", "libnvcv_types-8eb37806.so.0"]
    assert all(stub_dali_libs.STUBBED.match(n) for n in doomed)
    # abseil and libstdc++ copies that DALI resolves at import; NVCV's types (1.8 MiB) are not worth a stub
    assert not any(stub_dali_libs.STUBBED.match(n) for n in kept)
