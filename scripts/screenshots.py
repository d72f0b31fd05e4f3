#!/usr/bin/env python
"""Screenshots of a real TensorBoard in headless Chromium, for the README: one run folder, six dashboards.

    .venv/bin/pip install -e '.[docs]'      # Playwright's Python package; it drives Debian's chromium, no download
    .venv/bin/python scripts/screenshots.py outputs/screenshots/max-relu-batchnorm docs/img

Playwright (rather than `chromium --screenshot`, which the tests use) because the graph needs two double-clicks and
the projector a tensor and a colouring picked from its menus.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from playwright.sync_api import sync_playwright

from cifarlab import board

# dashboard -> URL fragment (TensorBoard keeps a dashboard's tag filter in the URL)
DASHBOARDS = {
    "images": "images&tagFilter=pool%2Fstage",  # the README picture
    "scalars": "scalars&tagFilter=%5E(train%7Cval)%2F",
    "graphs": "graphs",
    "hparams": "hparams",
    "histograms": "histograms&tagFilter=conv.weight",
    "projector": "projector",
}


def projector(page) -> None:
    """The tested checkpoint's 64-d hidden features, each image's thumbnail tinted by its true class."""
    panel = next(f for f in page.frames if f.url.endswith("projector_binary.html"))  # the plugin's own page
    tensors = panel.locator("paper-dropdown-menu").first
    tensors.click()
    tensors.get_by_role("option", name=re.compile(r"^hidden @ step \d+ \(tested\)")).click()
    page.wait_for_timeout(5000)
    colour = panel.locator('paper-dropdown-menu[label="Color by"]')
    colour.click()
    colour.get_by_role("option", name=re.compile(r"^true\b")).click()
    page.wait_for_timeout(3000)

if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir")
    p.add_argument("out_dir")
    args = p.parse_args()
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with board.serve(args.run_dir) as url, sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=board.chromium(),
                                     args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"])
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        for name, fragment in DASHBOARDS.items():
            page.goto(f"{url}/#{fragment}")
            page.wait_for_timeout(5000)  # let the dashboard fetch and draw
            if name == "graphs":  # open the model, then its first stage
                for node in ("CifarNet", "Stage[stage1]"):
                    page.locator("g.node", has_text=node).last.dblclick()  # last: the innermost node with that name
                    page.wait_for_timeout(2000)
            if name == "projector":
                projector(page)
            path = out / f"tensorboard_{name}.png"
            page.screenshot(path=str(path))
            print(path)
        browser.close()
