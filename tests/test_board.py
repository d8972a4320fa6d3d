"""The live job board, end to end in a real headless Chromium: submit from the page, watch it finish, cancel."""

from __future__ import annotations

import shutil

from playwright.sync_api import sync_playwright

from tests.conftest import Stack
from tests.stack import ARTIFACTS

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def test_board_submits_follows_live_and_cancels(stack: Stack) -> None:
    assert CHROMIUM, "chromium is required (make test installs Debian's chromium package)"
    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        page = browser.new_page()
        errors: list[str] = []
        page.on("pageerror", lambda error: errors.append(str(error)))
        page.on("console", lambda msg: errors.append(msg.text) if msg.type == "error" else None)
        page.goto(stack.url + "/board")
        page.wait_for_selector("#connection.on", timeout=10_000)

        page.fill("#repo", "octocat/board-demo")
        page.fill("#question", "What does it do?")
        page.click("#submit")
        row = page.locator("tr[data-job-id]", has_text="octocat/board-demo").first
        row.locator("[data-field=status]", has_text="finished").wait_for(timeout=30_000)
        assert row.locator(".bar > div").evaluate("el => el.style.width") == "100%"

        page.fill("#repo", "slow-parse/board-cancel")
        page.fill("#question", "")
        page.click("#submit")
        slow = page.locator("tr[data-job-id]", has_text="slow-parse/board-cancel").first
        slow.locator("[data-field=status]", has_text="parsing").wait_for(timeout=15_000)
        slow.locator("button.cancel").click()
        slow.locator("[data-field=status]", has_text="cancelled").wait_for(timeout=10_000)
        page.screenshot(path=str(ARTIFACTS / "board.png"), full_page=True)

        job_id = row.get_attribute("data-job-id")
        assert stack.status(job_id)["status"] == "finished"
        assert stack.status(slow.get_attribute("data-job-id"))["status"] == "cancelled"
        browser.close()
    assert errors == [], errors


def test_board_is_served_with_a_strict_csp_and_local_scripts(stack: Stack) -> None:
    import requests

    page = requests.get(stack.url + "/board", timeout=5)
    assert page.status_code == 200 and "text/html" in page.headers["Content-Type"]
    csp = page.headers["Content-Security-Policy"]
    assert "script-src 'self'" in csp and "frame-ancestors 'none'" in csp
    assert "http" not in page.text.split("<body>")[1].split("</body>")[0], "no CDN: every asset is local"
    for asset in ("/static/socket.io.min.js", "/static/board.js", "/static/board.css"):
        assert requests.get(stack.url + asset, timeout=5).status_code == 200, asset
