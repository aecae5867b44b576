"""Take the live page's screenshots for docs/serve.md: serve the embedded default system on a free loopback port,
ask a question in the system's Chromium (driven by Playwright), and save the page while the answer agent speaks
and once the answer is in.

Needs the ``real`` and ``test`` extras and Chromium at /usr/bin/chromium. On two CPU cores the answer takes a few
minutes. Run: ``python docs/gen_serve_screenshot.py``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import httpx
from playwright.sync_api import sync_playwright

from latentgraph.embedded.default_system import default_system
from latentgraph.serve.app import create_app
from latentgraph.serve.server import Server, listen

ASSETS = Path(__file__).parent / "assets"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--question", default="What is the capital of France? Answer in one word.")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--timeout", type=float, default=1800, help="seconds the answer may take")
    args = parser.parse_args()

    server = Server(create_app(default_system, name="default"), listen("127.0.0.1", 0), log_level="warning")
    server.start()
    try:
        deadline = time.monotonic() + args.timeout
        while httpx.get(server.url + "/health", timeout=30).status_code != 200:
            if time.monotonic() > deadline:
                raise SystemExit("the default system did not load in time")
            time.sleep(1)
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path="/usr/bin/chromium", args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 1280, "height": 860})
            page.goto(server.url)
            page.wait_for_selector("#graph svg g.node")
            page.fill("#question", args.question)
            page.fill("#max-tokens", str(args.max_tokens))
            page.click("#submit")
            page.mouse.move(0, 0)  # no hover effects in the pictures
            page.wait_for_selector("#graph g.node.is-speaking", timeout=args.timeout * 1000)
            # A few words in (polled here: the page's security policy forbids the eval wait_for_function needs).
            while page.get_attribute("#answer", "data-state") == "streaming" and len(page.inner_text("#answer")) < 12:
                page.wait_for_timeout(100)
            page.screenshot(path=str(ASSETS / "serve-page-live.png"), full_page=True)
            page.wait_for_selector("#answer:not([data-state=streaming])", timeout=args.timeout * 1000)
            page.screenshot(path=str(ASSETS / "serve-page.png"), full_page=True)
            print(f"{ASSETS}/serve-page*.png: {page.eval_on_selector('#answer', 'e => e.textContent')!r}")
            browser.close()
    finally:
        server.stop()


if __name__ == "__main__":
    main()
