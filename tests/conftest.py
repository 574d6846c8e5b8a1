"""Make the repository root importable so test modules can ``from tests import models``.

``pytest`` (unlike ``python -m pytest``) does not put the working directory on ``sys.path``, and the
editable install ships only ``attnprobe`` and ``prune``.
"""

from __future__ import annotations

import sys
from pathlib import Path

_ROOT = str(Path(__file__).resolve().parents[1])
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)
