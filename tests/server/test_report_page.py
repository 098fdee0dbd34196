"""report.html in headless Chromium: rendered from a file with the network off, every image
decoded, the curves drawn, the best checkpoint marked; a screenshot is taken."""
from __future__ import annotations

from pathlib import Path

from tests.server.test_web_page import CHROMIUM, CHROMIUM_FLAGS

REPO = Path(__file__).resolve().parents[2]
PHOTOS = sorted((REPO / "examples" / "tiny-subject").glob("*.png"))


def test_the_report_renders_offline_with_every_image_and_the_best_marked(tmp_path: Path) -> None:
    from playwright.sync_api import sync_playwright

    from dreambooth_trainer.report import render_report

    photos = [path.read_bytes() for path in PHOTOS]
    steps = [{"step": 0, "fidelity/dino": 0.3, "fidelity/clip_t": 0.3, "fidelity/instance_distance": 0.4},
             {"step": 100, "fidelity/dino": 0.7, "fidelity/clip_t": 0.29, "fidelity/instance_distance": 0.2, "kept": True},
             {"step": 200, "fidelity/dino": 0.6, "fidelity/clip_t": 0.2, "fidelity/instance_distance": 0.1, "kept": True}]
    document = {"best": {"step": 100}, "select": "highest dino", "steps": steps}
    lines = [{"step": step, "loss": 1.0 / step} for step in range(1, 201)]
    html = render_report("DreamBooth run: a photo of sks toy", [("model", "tiny")], document, lines, photos,
                         (photos[0], photos[1]), [(0, False, photos[0]), (100, False, photos[1]), (200, True, photos[2])], 100)
    page_file = tmp_path / "report.html"
    page_file.write_text(html)

    assert CHROMIUM.exists(), f"{CHROMIUM} is missing: run tests/server/install-browser.sh"
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_FLAGS, headless=True)
        try:
            context = browser.new_context(offline=True, viewport={"width": 1100, "height": 800})
            requests: list[str] = []
            page = context.new_page()
            page.on("request", lambda request: requests.append(request.url))
            page.goto(page_file.as_uri())
            page.wait_for_load_state("load")
            sizes = page.eval_on_selector_all("img", "imgs => imgs.map(i => [i.complete, i.naturalWidth])")
            assert len(sizes) == len(photos) + 2 + 3 and all(done and width > 0 for done, width in sizes), sizes
            assert page.locator("svg polyline").count() >= 3, "loss and score curves are drawn"
            best = page.locator('.ckpt.best')
            assert best.count() == 1 and best.get_attribute("data-step") == "100" and best.is_visible()
            assert "served" in best.inner_text() and page.locator("tr.best td").first.inner_text() == "100"
            assert [url for url in requests if not url.startswith(("file:", "data:"))] == [], "self-contained: nothing fetched"
            shot = tmp_path / "report.png"
            page.screenshot(path=str(shot), full_page=True)
            assert shot.stat().st_size > 10_000
        finally:
            browser.close()


def test_the_server_page_opens_the_report_beside_a_subjects_weights(tmp_path: Path) -> None:
    """A shared server's adapter in the trainer's layout (<run>/exports/best/lora, report.html beside
    lora/): GET /v1/reports/<subject> behind the token, and the web page's link opens it in Chromium."""
    import httpx
    from playwright.sync_api import expect, sync_playwright

    from dreambooth_serving.app import ServerSettings, create_app
    from tests.server.conftest import TOKEN, serving, wait_ready, write_random_lora

    export = tmp_path / "run" / "exports" / "best"
    lora = write_random_lora(export / "lora", seed=4)
    (export / "report.html").write_text("<!doctype html><title>DreamBooth run: a photo of sks dog</title><h1>rex at step 4</h1>")
    bare = write_random_lora(tmp_path / "other" / "final" / "lora", seed=5)  # a run without a report
    settings = ServerSettings(model="tiny", device="cpu", api_token=TOKEN, adapters=(("rex", str(lora)), ("mia", str(bare))))
    with serving(create_app(settings)) as url:
        wait_ready(url)
        auth = {"Authorization": f"Bearer {TOKEN}"}
        assert httpx.get(f"{url}/v1/reports/rex", timeout=30).status_code == 401, "the report shows the subject's photos: token only"
        page = httpx.get(f"{url}/v1/reports/rex", headers=auth, timeout=30)
        assert page.status_code == 200 and "rex at step 4" in page.text and page.headers["content-type"].startswith("text/html")
        assert page.headers["content-security-policy"].startswith("default-src 'none'")
        for model, detail in (("mia", "no training report for 'mia'"), ("tiny", "no training report for 'tiny'"),
                              ("zed", "the model 'zed' does not exist")):
            missing = httpx.get(f"{url}/v1/reports/{model}", headers=auth, timeout=30)
            assert missing.status_code == 404 and detail in missing.json()["detail"], missing.text

        assert CHROMIUM.exists(), f"{CHROMIUM} is missing: run tests/server/install-browser.sh"
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_FLAGS, headless=True)
            try:
                page = browser.new_page()
                page.goto(url + "/")
                page.click("summary")
                page.fill("#token", TOKEN)
                page.click("#reload-models")
                expect(page.locator("#model option")).to_have_count(3, timeout=30_000)
                page.select_option("#model", "rex")
                with page.expect_popup() as opened:
                    page.click("#report-link")
                report = opened.value
                expect(report.locator("h1")).to_have_text("rex at step 4", timeout=30_000)
                assert report.title() == "DreamBooth run: a photo of sks dog"
                page.select_option("#model", "mia")
                page.click("#report-link")
                expect(page.locator("#status")).to_contain_text("no training report for 'mia'", timeout=30_000)
            finally:
                browser.close()
