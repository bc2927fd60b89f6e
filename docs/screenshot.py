"""docs/report.png: the report's threshold-tuning parts, as headless Chromium draws them.

    python docs/screenshot.py demo-output            # after `make demo`; writes docs/report.png

Opens OUTPUT/report.html from file:// in Debian's chromium (as tests/e2e/test_report_run.py does),
takes the CLIP histogram with what each threshold would keep, both sides of the first threshold
and why downloads failed, and stacks them into one small PNG (a palette of 128 colours, < 300 KB).
"""

from __future__ import annotations

import argparse
import io
import sys
from pathlib import Path

from PIL import Image

CHROMIUM = "/usr/bin/chromium"
PARTS = [
    ("#histograms .chart", 0),     # the CLIP chart: counts, threshold, kept-share curve, log switch
    ("#thresholds .rule", 0),      # both sides of the CLIP threshold
    ("#downloads", 0),             # failures by domain and HTTP status, example URLs
]
WIDTH = 1100


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("output", help="a finished run's output folder (its report.html)")
    parser.add_argument("--to", default=str(Path(__file__).with_name("report.png")), help="the PNG to write")
    args = parser.parse_args(argv)
    from playwright.sync_api import sync_playwright

    report = Path(args.output, "report.html").resolve()
    shots = []
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox", "--disable-gpu"])
        try:
            page = browser.new_page(viewport={"width": WIDTH, "height": 900})
            page.goto(report.as_uri(), wait_until="load")
            page.wait_for_function(
                "[...document.querySelectorAll('.plotly-graph-div')].every(d => d.querySelector('svg.main-svg'))")
            # Where one bar dwarfs the rest: the CLIP chart's counts on the log scale, as a user would switch.
            page.locator("#histograms .chart").nth(0).locator(".updatemenu-button", has_text="log").click()
            page.mouse.move(0, 0)  # away from the chart: no hover labels or mode bar in the picture
            page.wait_for_timeout(500)
            for selector, index in PARTS:
                shots.append(Image.open(io.BytesIO(page.locator(selector).nth(index).screenshot())).convert("RGB"))
        finally:
            browser.close()
    width = max(s.width for s in shots)
    sheet = Image.new("RGB", (width, sum(s.height for s in shots) + 12 * (len(shots) - 1)), (250, 250, 250))
    y = 0
    for shot in shots:
        sheet.paste(shot, (0, y))
        y += shot.height + 12
    sheet = sheet.quantize(colors=128, method=Image.Quantize.MEDIANCUT)
    sheet.save(args.to, optimize=True)
    print(f"{args.to}: {sheet.width}x{sheet.height}, {Path(args.to).stat().st_size // 1024} KB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
