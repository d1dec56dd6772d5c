"""A pytest plugin: under CI (``CI`` set to ``true`` or ``1``) a test that would skip
because a tool or package is missing (Verilator, Icarus, the formal or synthesis tools,
an optional package) fails instead, so that a CI machine without them cannot pass.
Skips for other reasons (``MLG_LONG`` not set, no ``/proc``) stay skips.

``tests/conftest.py`` imports its hooks; ``pytest -p tests.ci_strict`` loads it alone.
"""

from __future__ import annotations

import os
import re

import pytest

# The skip reasons of the suite that mean "a tool is not there".
MISSING = re.compile(r"not installed|missing|could not import|no module named", re.I)


def ci() -> bool:
    """Whether the suite runs under CI."""
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


def _reason(report) -> str:
    longrepr = report.longrepr
    if isinstance(longrepr, tuple) and len(longrepr) == 3:
        return str(longrepr[2])
    return str(longrepr)


def _strict(report) -> None:
    if ci() and report.skipped and not hasattr(report, "wasxfail"):
        reason = _reason(report)
        if MISSING.search(reason):
            report.outcome = "failed"
            report.longrepr = (f"{reason.removeprefix('Skipped: ')}: under CI (CI=true) a "
                               "missing tool fails the test instead of skipping it")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    _strict(outcome.get_result())


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    outcome = yield
    _strict(outcome.get_result())
