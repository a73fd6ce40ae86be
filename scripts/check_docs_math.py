"""Check that the built docs site renders its formulas offline, in a real headless browser.

Builds the site (`mkdocs build`), opens pages from disk (`file://`, no network) in headless
Chromium, lets MathJax run, and reads the resulting DOM: every formula must have become a
rendered `mjx-container`, and no raw TeX delimiter (`\\(`, `\\[`) may remain in the page's text.
Exits 1 naming the page at fault. `--png DIR` also writes a screenshot of each page.

    python scripts/check_docs_math.py [--site DIR] [--png DIR] [PAGE ...]
"""

from __future__ import annotations

import argparse
import html
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
#: Pages with many formulas: the regularisers' mathematics and two API pages.
PAGES = ("regularizers/index.html", "api/functional/index.html", "api/lightning/index.html")


def browser() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


def rendered_dom(chrome: str, page: Path) -> str:
    command = [chrome, "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=20000"]
    proc = subprocess.run([*command, "--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=120)
    return proc.stdout


def problems(dom: str) -> list[str]:
    """What is wrong with one rendered page (empty: all formulas rendered)."""
    body = re.sub(r"<script\b.*?</script>", "", dom, flags=re.S)
    text = html.unescape(re.sub(r"<[^>]+>", " ", body))
    found = []
    formulas = len(re.findall(r'class="arithmatex"', body))
    rendered = len(re.findall(r"<mjx-container\b", body))
    if formulas == 0:
        found.append("no formula found (is the page right?)")
    if rendered < formulas:
        found.append(f"{rendered} rendered formulas for {formulas} arithmatex elements")
    raw = re.findall(r"\\[(\[][^\n]{0,40}", text)
    if raw:
        found.append(f"raw TeX left in the text, e.g. {raw[0]!r}")
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("pages", nargs="*", default=list(PAGES))
    parser.add_argument("--site", type=Path, help="an already built site (default: build one)")
    parser.add_argument("--png", type=Path, help="write a screenshot of each page here")
    args = parser.parse_args(argv)
    chrome = browser()
    if chrome is None:
        print("no Chromium found: install it (Debian: apt-get install chromium)", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        site = args.site
        if site is None:
            site = Path(tmp) / "site"
            subprocess.run([sys.executable, "-m", "mkdocs", "build", "-q", "-d", str(site)], cwd=ROOT, check=True)
        failed = False
        for name in args.pages:
            page = site / name
            found = problems(rendered_dom(chrome, page))
            print(f"{name}: {'ok' if not found else '; '.join(found)}")
            failed |= bool(found)
            if args.png is not None:
                args.png.mkdir(parents=True, exist_ok=True)
                shot = args.png / (name.replace("/", "_").removesuffix("_index.html") + ".png")
                subprocess.run(
                    [
                        chrome,
                        "--headless",
                        "--no-sandbox",
                        "--disable-gpu",
                        "--virtual-time-budget=20000",
                        "--window-size=1280,1600",
                        f"--screenshot={shot}",
                        page.as_uri(),
                    ],
                    capture_output=True,
                    timeout=120,
                    check=False,
                )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
