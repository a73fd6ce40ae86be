"""Rewrite the reST roles of the package's docstrings into the Markdown that mkdocstrings renders.

`:math:`x`` becomes `\\(x\\)` (arithmatex), a `.. math::` block `\\[ ... \\]`, and
`:class:`/`:func:`/`:meth:`/`:attr:`/`:data:`/`:mod:`/`:exc:` references become code spans
(`` `Name` ``; a leading `~` keeps the last component). Only string literals and `#:` doc comments are
touched, and a backslash is doubled inside non-raw strings. Usage: `python scripts/convert_rest_roles.py FILE...`.
"""

from __future__ import annotations

import io
import re
import sys
import tokenize

ROLE = re.compile(r":(class|func|meth|attr|data|mod|exc|obj):`(~?)([^`]+)`")
MATH = re.compile(r":math:`([^`]+)`")
DIRECTIVE = re.compile(r"^(?P<indent>[ \t]*)\.\. math::[ \t]*(?P<first>.*)$")


def _convert_text(text: str, raw: bool) -> str:
    bs = "\\" if raw else "\\\\"

    def role(match: re.Match[str]) -> str:
        target = match.group(3)
        shown = target.rsplit(".", 1)[-1] if match.group(2) else target
        return f"`{shown}`"

    text = ROLE.sub(role, text)
    text = MATH.sub(lambda m: f"{bs}({m.group(1)}{bs})", text)
    lines = text.split("\n")
    out: list[str] = []
    i = 0
    while i < len(lines):
        m = DIRECTIVE.match(lines[i])
        if not m:
            out.append(lines[i])
            i += 1
            continue
        indent = m.group("indent")
        body = [m.group("first").strip()] if m.group("first").strip() else []
        i += 1
        while i < len(lines) and lines[i].strip() and (lines[i].startswith(indent + " ") or not body):
            body.append(lines[i].strip())
            i += 1
        out.append(f"{indent}{bs}[")
        out.extend(f"{indent}{line}" for line in body)
        out.append(f"{indent}{bs}]")
    return "\n".join(out)


def convert(source: str) -> str:
    lines = source.splitlines(keepends=True)
    starts = [0]
    for line in lines:
        starts.append(starts[-1] + len(line))
    out, last = [], 0
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT and tok.string.startswith("#:"):
            prefix = "r"  # an attribute's doc comment: no escapes
        elif tok.type == tokenize.STRING:
            prefix = re.match(r"[A-Za-z]*", tok.string).group(0).lower()
            if "b" in prefix or "f" in prefix:
                continue
        else:
            continue
        begin = starts[tok.start[0] - 1] + tok.start[1]
        end = starts[tok.end[0] - 1] + tok.end[1]
        out += [source[last:begin], _convert_text(tok.string, "r" in prefix)]
        last = end
    out.append(source[last:])
    return "".join(out)


if __name__ == "__main__":
    for path in sys.argv[1:]:
        with open(path, encoding="utf-8") as handle:
            before = handle.read()
        after = convert(before)
        if after != before:
            with open(path, "w", encoding="utf-8") as handle:
                handle.write(after)
