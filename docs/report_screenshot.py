"""Regenerate docs/report.png: the HTML report of a results store, as headless Chromium shows it.

    peftbench run quickstart                                   # the store: results/peftbench.sqlite
    python docs/report_screenshot.py results/peftbench.sqlite docs/report.png

Needs playwright (``pip install 'peftbench[report]'``) and a Chromium (``apt-get install -y chromium``, or
``PEFTBENCH_CHROMIUM=/path/to/chrome``); playwright's own browser download is not needed.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path

from peftbench.cli import main as peftbench


def screenshot(db: str, png: str, height: int, plugins: list[str]) -> None:
    from playwright.sync_api import sync_playwright

    executable = os.environ.get("PEFTBENCH_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    if not executable:
        sys.exit("no Chromium found: apt-get install -y chromium, or set PEFTBENCH_CHROMIUM")
    with tempfile.TemporaryDirectory() as out:
        args = ["report", db, "--out", out] + [f"--plugin={p}" for p in plugins]
        if peftbench(args) != 0:
            sys.exit(1)
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=executable, args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": 1300, "height": height})
            page.goto(Path(out, "index.html").resolve().as_uri(), wait_until="load")
            page.screenshot(path=png)  # the top of the page: summary, table, the first figures
            browser.close()
    print(f"wrote {png}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("db", nargs="?", default="results/peftbench.sqlite")
    parser.add_argument("png", nargs="?", default="docs/report.png")
    parser.add_argument("--height", type=int, default=1400, help="pixels of the page shown (default 1400)")
    parser.add_argument("--plugin", action="append", default=[], help="plugins of the stored tasks (repeatable)")
    options = parser.parse_args()
    screenshot(options.db, options.png, options.height, options.plugin)
