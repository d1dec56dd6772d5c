"""Under CI, a test skipped because a tool is missing fails (``tests/ci_strict.py``)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

TESTS = '''
import pytest

@pytest.mark.skipif(True, reason="Verilator not installed")
def test_needs_a_simulator():
    pass

@pytest.mark.skipif(True, reason="minutes of solver time: set MLG_LONG=1")
def test_long():
    pass

def test_plain():
    pass
'''


def _pytest(tmp_path, ci: str | None, *files):
    env = {k: v for k, v in os.environ.items() if k not in ("CI", "PYTEST_XDIST_WORKER")}
    if ci is not None:
        env["CI"] = ci
    env["PYTHONPATH"] = str(ROOT)
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "tests.ci_strict",
                           "-p", "no:cacheprovider", "-p", "no:xdist", "-p", "no:randomly",
                           *files],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize("ci", [None, "false", "true", "1"])
def test_a_missing_tool_fails_under_ci_and_skips_elsewhere(ci, tmp_path):
    (tmp_path / "test_tools.py").write_text(TESTS)
    r = _pytest(tmp_path, ci, "test_tools.py")
    out = r.stdout
    if ci in ("true", "1"):
        assert r.returncode == 1, out
        assert "1 passed, 1 skipped, 1 error" in out, out   # (the skip was in setup)
        assert "Verilator not installed: under CI" in out, out
    else:
        assert r.returncode == 0, out
        assert "1 passed, 2 skipped" in out, out


def test_a_missing_package_at_import_fails_under_ci(tmp_path):
    (tmp_path / "test_pkg.py").write_text(
        'import pytest\npytest.importorskip("no_such_package_for_this_test")\n')
    r = _pytest(tmp_path, None, "test_pkg.py")
    assert r.returncode == 5 and "1 skipped" in r.stdout, r.stdout   # (5: no test ran)
    r = _pytest(tmp_path, "true", "test_pkg.py")
    assert r.returncode != 0 and "under CI (CI=true) a missing tool" in r.stdout, r.stdout
