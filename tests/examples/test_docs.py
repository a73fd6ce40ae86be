"""The documentation builds in strict mode: a broken link, a missing page in the navigation or an
API reference (``::: lightning_hsu...``) that no longer resolves fails this test, and so CI.

``scripts/test.sh`` installs the ``docs`` extra, so CI runs it; elsewhere it is skipped, saying
why, when MkDocs is not installed.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

needs_mkdocs = pytest.mark.skipif(
    importlib.util.find_spec("mkdocs") is None
    or importlib.util.find_spec("material") is None
    or importlib.util.find_spec("mkdocstrings") is None,
    reason="mkdocs, mkdocs-material or mkdocstrings is not installed (pip install -e '.[docs]')",
)


def build(site: Path) -> None:
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "mkdocs",
            "build",
            "--strict",
            "--config-file",
            str(ROOT / "mkdocs.yml"),
            "--site-dir",
            str(site),
        ],
        cwd=ROOT,  # snippet paths in mkdocs.yml are relative to the repository root
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, f"mkdocs build --strict failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}"


@needs_mkdocs
def test_docs_build_strict(tmp_path: Path):
    site = tmp_path / "site"
    build(site)
    pages = ("index.html", "reproduction/index.html", "reproduction_fashion/index.html", "api/lightning/index.html")
    for page in (*pages, "faq/index.html"):
        assert (site / page).is_file(), f"{page} was not built"
    # the API reference really rendered the docstrings
    assert "HypersphericalUniformity" in (site / "api" / "lightning" / "index.html").read_text()


# -- formulas render offline -----------------------------------------------------------------------
sys.path.insert(0, str(ROOT / "scripts"))
import check_docs_math  # noqa: E402


def test_math_check_catches_raw_tex_and_unrendered_formulas():
    rendered = '<span class="arithmatex"><mjx-container class="MathJax">x</mjx-container></span>'
    assert check_docs_math.problems(f"<p>{rendered}</p>") == []
    raw = '<p><span class="arithmatex">\\(\\lambda\\)</span></p>'
    found = check_docs_math.problems(raw)
    assert any("0 rendered formulas for 1" in p for p in found) and any("raw TeX" in p for p in found)


@needs_mkdocs
@pytest.mark.skipif(
    check_docs_math.browser() is None, reason="no Chromium to render the site (apt-get install chromium)"
)
def test_site_renders_its_formulas_offline_in_a_browser(tmp_path: Path):
    """MathJax is vendored: opened from disk with no network, every formula of these pages renders."""
    site = tmp_path / "site"
    build(site)
    assert check_docs_math.main(["--site", str(site)]) == 0


# -- docstrings in the Markdown mkdocstrings renders ----------------------------------------------------
sys.path.insert(0, str(ROOT / "docs" / "hooks"))
import rest_roles  # noqa: E402


def test_no_rest_role_is_left_in_the_package_docstrings():
    """mkdocstrings renders Markdown: a reST role would show literally on the API pages (the docs
    build's hook fails on one too)."""
    assert rest_roles.leftover_roles() == []


def test_the_docs_build_fails_on_a_leftover_role(tmp_path: Path):
    package = tmp_path / "lightning_hsu"
    package.mkdir()
    (package / "mod.py").write_text('"""The :class:`Rule` of a layer.\n\n.. math:: x\n"""\n')
    assert rest_roles.leftover_roles(package) == [
        "lightning_hsu/mod.py:1: :class:`",
        "lightning_hsu/mod.py:3: .. math::",
    ]
    with pytest.raises(SystemExit, match="reST roles left"):
        original = rest_roles.PACKAGE
        try:
            rest_roles.PACKAGE = package
            rest_roles.on_pre_build({})
        finally:
            rest_roles.PACKAGE = original
