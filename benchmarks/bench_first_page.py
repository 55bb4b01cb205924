"""Time to the dashboard's first page: `streamlit run app.py` started fresh, then Chromium (Debian's, through
Playwright) opens "/" and waits for the Inspect page's title. Target: first page drawn in <= 3 s.

Prints, per fresh server (median of --repeats): seconds from spawning streamlit to its health check answering, and
from opening "/" to the first page's title drawn (the first session pays the page's imports), then a second
session's open on the same server, and the ratio of the first draw to the 3 s target.

    python benchmarks/bench_first_page.py                 # 3 fresh servers
    python benchmarks/bench_first_page.py --repeats 5
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
CHROMIUM = Path("/usr/bin/chromium")
TARGET_S = 3.0


def _draw(browser, url: str) -> float:
    context = browser.new_context(viewport={"width": 1280, "height": 900}, base_url=url)
    page = context.new_page()
    page.set_default_timeout(120_000)
    start = time.perf_counter()
    page.goto("/")
    page.locator("h1", has_text="Inspect").first.wait_for()
    drawn = time.perf_counter() - start
    context.close()
    return drawn


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3, help="fresh servers started")
    args = parser.parse_args()
    if not CHROMIUM.is_file():
        sys.exit(f"no Chromium at {CHROMIUM}: apt-get install -y chromium")
    from playwright.sync_api import sync_playwright

    from streamlit_server import streamlit_server

    healthy, first, second = [], [], []
    with sync_playwright() as playwright, tempfile.TemporaryDirectory() as tmp:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True,
                                             args=["--no-sandbox", "--disable-dev-shm-usage"])
        env = {**os.environ, "PYTHONPATH": str(REPO), "VLMREL_CACHE_DIR": tmp}
        for i in range(args.repeats):
            start = time.perf_counter()
            with streamlit_server(env, Path(tmp) / f"server{i}.log") as url:
                healthy.append(time.perf_counter() - start)
                first.append(_draw(browser, url))
                second.append(_draw(browser, url))
            print(f"server {i + 1}/{args.repeats}: healthy {healthy[-1]:.2f} s, first page {first[-1]:.2f} s, "
                  f"second session {second[-1]:.2f} s", file=sys.stderr)
        browser.close()
    median_first = statistics.median(first)
    print(json.dumps({
        "repeats": args.repeats,
        "server_healthy_s": round(statistics.median(healthy), 3),
        "first_page_drawn_s": round(median_first, 3),
        "second_session_drawn_s": round(statistics.median(second), 3),
        "first_page_over_target": round(median_first / TARGET_S, 3),
        "target": f"first page drawn in <= {TARGET_S} s",
        "load_average_1min": round(os.getloadavg()[0], 2),
    }, indent=1))


if __name__ == "__main__":
    main()
