"""A headless Chromium driving the page (services/api/static/ui/) over the real stack.

Debian's `chromium` is used as installed (no browser download): the browser tests skip
where /usr/bin/chromium is missing.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

CHROMIUM = Path("/usr/bin/chromium")
ROOT = Path(__file__).resolve().parents[2]
# Every run saves its screenshots under var/; UPDATE_SCREENSHOTS=1 writes them into
# docs/images/ instead, where the README shows them (a plain run leaves the tree clean).
SCREENSHOTS = (
    ROOT / "docs" / "images"
    if os.environ.get("UPDATE_SCREENSHOTS")
    else ROOT / "var" / "screenshots"
)


@pytest.fixture(scope="session")
def browser():
    if not CHROMIUM.exists():
        pytest.skip("Chromium is not installed at /usr/bin/chromium")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=str(CHROMIUM), args=["--headless", "--no-sandbox", "--disable-gpu"]
        )
        yield browser
        browser.close()


@pytest.fixture
def new_page(browser, stack):
    """Pages on a fresh browser context (empty localStorage), optionally already holding
    the stack's API key, as a visitor who entered it once before."""
    contexts = []

    def make(with_key: bool = True):
        context = browser.new_context(
            viewport={"width": 1280, "height": 900}, accept_downloads=True
        )
        context.set_default_timeout(30_000)
        if with_key:
            key = json.dumps(stack.key.key)
            context.add_init_script(f"localStorage.setItem('instructedit.apiKey', {key})")
        contexts.append(context)
        page = context.new_page()
        page.goto(f"{stack.base_url}/ui")
        return page

    yield make
    for context in contexts:
        context.close()
