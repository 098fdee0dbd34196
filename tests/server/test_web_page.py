"""The web page in headless Chromium (Debian's, driven by Playwright): type, click, see the image.

Chromium is installed by tests/server/install-browser.sh (the Makefile's test target runs it).
"""
from __future__ import annotations

from pathlib import Path

from tests.server.conftest import LiveServer

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--no-first-run",
]
SCREENSHOT = Path(__file__).resolve().parents[2] / "docs" / "images" / "web-ui.png"
# The README's screenshot is written when missing or when asked for, so `make test` does not
# leave a changed binary in the working tree on every run (timings in the captions differ).
UPDATE_SCREENSHOT_ENV = "DREAMBOOTH_UPDATE_SCREENSHOT"


def test_type_a_prompt_click_generate_and_the_image_appears(live_server: LiveServer, tmp_path: Path) -> None:
    import os

    from playwright.sync_api import expect, sync_playwright

    screenshot = SCREENSHOT if os.environ.get(UPDATE_SCREENSHOT_ENV) or not SCREENSHOT.exists() else tmp_path / "web-ui.png"

    assert CHROMIUM.exists(), f"{CHROMIUM} is missing: run tests/server/install-browser.sh"
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_FLAGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1100, "height": 620})
            page.goto(live_server.url + "/")
            page.fill("#prompt", "a photo of sks dog on the moon")
            page.fill("#negative_prompt", "blurry")
            page.fill("#steps", "2")
            page.fill("#seed", "42")
            page.fill("#width", "64")
            page.fill("#height", "64")
            page.click("#generate")
            image = page.locator("#gallery figure img").first
            expect(image).to_be_visible(timeout=60_000)
            page.wait_for_function(
                "() => { const i = document.querySelector('#gallery figure img'); return i && i.complete && i.naturalWidth > 0; }",
                timeout=60_000,
            )
            assert image.evaluate("i => [i.naturalWidth, i.naturalHeight]") == [64, 64]
            caption = page.locator("#gallery figcaption").first.inner_text()
            assert "a photo of sks dog on the moon" in caption and "seed 42" in caption and "2 steps" in caption
            # a second one with several images, so the screenshot shows a gallery
            page.fill("#seed", "7")
            page.fill("#num_images", "3")
            page.click("#generate")
            expect(page.locator("#gallery figure")).to_have_count(4, timeout=60_000)
            expect(page.locator("#status")).to_contain_text("Done", timeout=60_000)
            screenshot.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(screenshot), full_page=True)
        finally:
            browser.close()
    assert screenshot.stat().st_size > 1000


def test_the_page_shows_which_field_is_wrong(live_server: LiveServer) -> None:
    from playwright.sync_api import expect, sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_FLAGS, headless=True)
        try:
            page = browser.new_page()
            page.goto(live_server.url + "/")
            page.fill("#prompt", "a dog")
            page.fill("#steps", "500")
            page.evaluate("document.querySelector('#form').noValidate = true")  # let the server judge
            page.click("#generate")
            expect(page.locator("#status")).to_contain_text("steps", timeout=30_000)
            expect(page.locator("#status")).to_have_class("error")
        finally:
            browser.close()


def test_the_page_lists_the_subjects_and_draws_the_one_picked(shared_server) -> None:
    from playwright.sync_api import expect, sync_playwright

    from tests.server.conftest import TOKEN

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_FLAGS, headless=True)
        try:
            page = browser.new_page()
            page.goto(shared_server.url + "/")
            expect(page.locator("#models-note")).to_contain_text("API token", timeout=30_000)  # the list needs the token
            page.click("summary")
            page.fill("#token", TOKEN)
            page.click("#reload-models")
            expect(page.locator("#model option")).to_have_count(3, timeout=30_000)
            assert page.locator("#model option").all_inner_texts() == ["tiny (base model)", "rex", "mia"]
            page.select_option("#model", "mia")
            page.fill("#prompt", "a photo of sks dog")
            page.fill("#steps", "2")
            page.fill("#seed", "3")
            page.click("#generate")
            expect(page.locator("#gallery figcaption").first).to_contain_text("subject mia", timeout=60_000)
            expect(page.locator("#status")).to_contain_text("Done", timeout=60_000)
        finally:
            browser.close()
