import os

import torch

# Under pytest-xdist every worker is one process per core: more torch threads than
# cores makes OpenMP workers spin against each other and slows training tenfold.
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)
    os.environ["OMP_NUM_THREADS"] = "1"

# Under CI a test skipped for a missing tool fails (tests/ci_strict.py).
from tests.ci_strict import pytest_make_collect_report, pytest_runtest_makereport  # noqa: E402,F401
