"""MkDocs hook: the build fails on a reST role left in the package's docstrings.

mkdocstrings renders Markdown, so a `:class:` or `.. math::` would show literally on the API pages
(`scripts/convert_rest_roles.py` converts them).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

ROLE = re.compile(r":(math|class|func|meth|attr|data|mod|exc|obj|ref):`|^[ \t]*\.\. (math|note|warning)::", re.M)
PACKAGE = Path(__file__).resolve().parents[2] / "lightning_hsu"


def leftover_roles(package: Path | None = None) -> list[str]:
    """`file:line: role` of every reST role in the package's sources."""
    package = PACKAGE if package is None else package
    found = []
    for path in sorted(package.rglob("*.py")):
        text = path.read_text(encoding="utf-8")
        for match in ROLE.finditer(text):
            line = text[: match.start()].count("\n") + 1
            found.append(f"{path.relative_to(package.parent)}:{line}: {match.group(0).strip()}")
    return found


def on_pre_build(config: Any, **kwargs: Any) -> None:
    found = leftover_roles()
    if found:
        raise SystemExit(
            "reST roles left in docstrings (scripts/convert_rest_roles.py converts them):\n" + "\n".join(found)
        )
