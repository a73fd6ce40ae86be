"""Shared set-up of the reliability tests: helper import path and the hypothesis profiles.

The profiles are *registered* here but never loaded globally (other test folders keep their own
settings); the tests apply them with ``@settings(parent=settings.get_profile(...))``. Set
``HSU_RELIABILITY_EXAMPLES`` to scale the number of examples (e.g. 10x for a nightly run).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from hypothesis import HealthCheck, settings

# tests/lightning/models.py (TinyNet, trainer_kwargs, ...) is imported by name.
sys.path.insert(0, str(Path(__file__).parent.parent / "lightning"))

_SCALE = float(os.environ.get("HSU_RELIABILITY_EXAMPLES", "1"))

#: Property tests of the pure-torch core: many cheap examples, no deadline (2 shared CPU cores),
#: derandomized so a failure reproduces on every machine.
settings.register_profile(
    "reliability",
    max_examples=max(1, int(20 * _SCALE)),
    deadline=None,
    derandomize=True,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
#: Configuration fuzzing: every valid example trains a model, so few examples.
settings.register_profile(
    "reliability-training",
    max_examples=max(1, int(25 * _SCALE)),
    deadline=None,
    derandomize=True,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
