"""Every script under benchmarks/ runs as a file from any directory, even beside another package named
`benchmarks` (Opacus's wheel installed one, which shadowed the project's)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = sorted(p for p in (ROOT / "benchmarks").glob("*.py") if 'if __name__ == "__main__":' in p.read_text())


def test_the_scripts_are_found():
    assert {"bench_algorithms.py", "bench_loader.py", "bench_round.py", "gpu_check.py"} <= {p.name for p in SCRIPTS}


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_script_help_works_as_a_file_from_another_directory(script, tmp_path):
    shadow = tmp_path / "site" / "benchmarks"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("")  # an installed package of the same name, as Opacus's wheel had
    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    env = {**os.environ, "PYTHONPATH": str(shadow.parent)}
    run = subprocess.run([sys.executable, str(script), "--help"], cwd=cwd, env=env, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "usage:" in run.stdout.lower()
