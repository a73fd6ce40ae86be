"""The `Example:` blocks of the public docstrings run as doctests: what the API pages show works."""

from __future__ import annotations

import doctest
import importlib
import pkgutil

import pytest

import lightning_hsu

MODULES = sorted(m.name for m in pkgutil.walk_packages(lightning_hsu.__path__, "lightning_hsu."))


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_run(name: str) -> None:
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE, verbose=False)
    assert result.failed == 0, f"{result.failed} of {result.attempted} doctest examples of {name} failed"


def test_the_public_api_has_examples() -> None:
    """Examples exist where a user starts: the callback, rules, schedules, regularisers, formulas."""
    finder = doctest.DocTestFinder()
    names = {t.name for m in MODULES for t in finder.find(importlib.import_module(m)) if t.examples}
    for wanted in (
        "lightning_hsu.callbacks.uniformity.HypersphericalUniformity",
        "lightning_hsu.rules.Rule",
        "lightning_hsu.rules.preset_rules",
        "lightning_hsu.schedules.LinearWarmup",
        "lightning_hsu.regularizers.energy.MHE",
        "lightning_hsu.functional.energy.hyperspherical_energy",
        "lightning_hsu.functional.neurons.neurons_of",
    ):
        assert wanted in names, wanted
