"""Make the repository root importable so test modules can ``from tests import models``; the moving device.

``pytest`` (unlike ``python -m pytest``) does not put the working directory on ``sys.path``, and the
editable install ships only ``attnprobe`` and ``prune``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

_ROOT = str(Path(__file__).resolve().parents[1])
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)


# -- the moving device --------------------------------------------------------------------------------
# Tests (or modules, via `pytestmark = pytest.mark.moving_device`) marked `moving_device` run twice:
# `[plain]`, with onloading as it is on this machine (device="cpu" moves nothing), and `[moving]`,
# with ATTNPROBE_MOVING_DEVICE=1 (prune.engine.moving_device): every onload copies into fresh storage and the
# host copies are NaN while their block is away, as on a real accelerator. The variable is set in the
# environment, so processes the test spawns (a process group) move too. Every test added to a marked
# module runs both ways. (A mark on one pytest.param is not seen here: mark the whole test.)


ONLOAD_MODES = ("plain", "moving")


def pytest_configure(config):
    config.addinivalue_line(
        "markers",
        "moving_device: run the test both plainly and under the moving device (ATTNPROBE_MOVING_DEVICE=1)",
    )


def pytest_generate_tests(metafunc):
    if "onload_mode" in metafunc.fixturenames and metafunc.definition.get_closest_marker("moving_device"):
        metafunc.parametrize("onload_mode", ONLOAD_MODES, indirect=True)


@pytest.fixture(autouse=True)
def onload_mode(request, monkeypatch):
    """ "plain" or "moving" for tests marked moving_device; None (environment untouched) otherwise."""
    # imported here: at conftest import time `prune` would resolve to tests/prune (first on sys.path)
    from prune.engine.moving_device import ENV_VAR

    mode = getattr(request, "param", None)
    if mode == "moving":
        monkeypatch.setenv(ENV_VAR, "1")
    elif mode == "plain":
        monkeypatch.delenv(ENV_VAR, raising=False)
    return mode
