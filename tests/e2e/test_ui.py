"""The try-it page in a real browser: Debian's Chromium, driven by Playwright, against a live
server on 127.0.0.1."""

from __future__ import annotations

import base64
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from playwright.sync_api import Browser, FileChooser, Page, expect
from support import CAT_CLASSES, COFFEE_CLASSES, ROOT, chromium, fixture, live_server

pytestmark = pytest.mark.e2e

# `make test` saves the README's screenshot here when this is set; otherwise it goes to tmp.
SCREENSHOT = os.environ.get("UI_SCREENSHOT")


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with chromium() as browser:
        yield browser


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    with live_server() as (url, _):
        yield url


@dataclass
class Watched:
    """What the page did, recorded from before it loaded."""

    requests: list[str] = field(default_factory=list)
    choosers: list[FileChooser] = field(default_factory=list)


@pytest.fixture
def watched() -> Watched:
    return Watched()


@pytest.fixture
def page(browser: Browser, server: str, watched: Watched) -> Iterator[Page]:
    context = browser.new_context(viewport={"width": 1100, "height": 800})
    page = context.new_page()
    # Registered before the page loads: Playwright turns file-chooser interception on
    # asynchronously, and expect_file_chooser() right before a key press races it (flaky).
    page.on("filechooser", lambda chooser: watched.choosers.append(chooser))
    page.on("request", lambda request: watched.requests.append(request.url))
    page.goto(server)
    expect(page.locator("#model option")).to_have_count(2)
    yield page
    context.close()


def first_label(card: object) -> str:
    return card.locator(".bar .label").first.inner_text()  # type: ignore[attr-defined]


def card_for(page: Page, name: str) -> object:
    return page.locator(".card", has=page.locator("figcaption", has_text=name))


def test_cat_photo_gets_a_cat_bar_first(
    page: Page, watched: Watched, server: str, tmp_path: Path
) -> None:
    expect(page.locator("#model")).to_have_value("efficientnet_lite0")
    expect(page.get_by_label("API key")).to_be_hidden()  # no keys configured
    page.set_input_files("#files", str(fixture("chelsea.jpg")))
    card = card_for(page, "chelsea.jpg")
    expect(card.locator(".bar")).to_have_count(5)  # type: ignore[attr-defined]
    assert first_label(card) in CAT_CLASSES
    expect(card.locator(".meta")).to_contain_text("ms")  # type: ignore[attr-defined]
    # Each bar is drawn as long as its score: fill width / track width = score.
    for bar in card.locator(".bar").all():  # type: ignore[attr-defined]
        score = float(bar.locator(".score").inner_text().rstrip("%")) / 100
        fill = bar.locator(".fill").bounding_box()
        track = bar.locator(".track").bounding_box()
        assert fill is not None
        assert track is not None
        assert track["width"] > 50
        assert fill["width"] / track["width"] == pytest.approx(max(score, 0.005), abs=0.02)
    expect(card.locator("img")).to_have_attribute("alt", "Preview of chelsea.jpg")  # type: ignore[attr-defined]
    expect(page.locator("#status")).to_have_text("Classified 1 image.")
    shot = Path(SCREENSHOT) if SCREENSHOT else tmp_path / "ui.png"
    shot.parent.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(shot), full_page=True)
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # Nothing left the server's origin (the preview is a blob: URL of the page itself).
    assert watched.requests
    for url in watched.requests:
        assert url.startswith((server + "/", "blob:", "data:")), url


def test_two_images_at_once_each_beside_its_own_preview(page: Page) -> None:
    page.set_input_files("#files", [str(fixture("coffee.jpg")), str(fixture("chelsea.png"))])
    expect(page.locator(".card")).to_have_count(2)
    coffee, cat = card_for(page, "coffee.jpg"), card_for(page, "chelsea.png")
    expect(coffee.locator(".bar")).to_have_count(5)  # type: ignore[attr-defined]
    expect(cat.locator(".bar")).to_have_count(5)  # type: ignore[attr-defined]
    assert first_label(coffee) in COFFEE_CLASSES
    assert first_label(cat) in CAT_CLASSES
    expect(page.locator("#status")).to_have_text("Classified 2 images.")


def test_summary_counts_a_failed_image_apart_from_the_classified_ones(
    page: Page, tmp_path: Path
) -> None:
    fake = tmp_path / "notes.jpg"
    fake.write_text("this is not an image")
    files = [str(fixture("chelsea.jpg")), str(fake), str(fixture("coffee.jpg"))]
    page.set_input_files("#files", files)
    expect(page.locator("#status")).to_have_text("Classified 2 of 3 images; 1 failed.")
    expect(page.locator(".card")).to_have_count(3)
    expect(page.locator(".card .error:visible")).to_have_count(1)
    expect(page.locator(".card:has(.bar)")).to_have_count(2)
    expect(card_for(page, "notes.jpg").locator(".error")).to_contain_text("(400)")  # type: ignore[attr-defined]
    expect(card_for(page, "chelsea.jpg").locator(".bar")).to_have_count(5)  # type: ignore[attr-defined]
    expect(card_for(page, "coffee.jpg").locator(".bar")).to_have_count(5)  # type: ignore[attr-defined]


def test_a_text_file_named_jpg_shows_the_servers_error_and_the_next_upload_works(
    page: Page, tmp_path: Path
) -> None:
    fake = tmp_path / "notes.jpg"
    fake.write_text("this is not an image")
    page.set_input_files("#files", str(fake))
    error = card_for(page, "notes.jpg").locator(".error")  # type: ignore[attr-defined]
    expect(error).to_be_visible()
    expect(error).to_contain_text("Not a readable image (400)")
    expect(error).to_contain_text("notes.jpg")
    page.set_input_files("#files", str(fixture("coffee.jpg")))
    expect(card_for(page, "coffee.jpg").locator(".bar")).to_have_count(5)  # type: ignore[attr-defined]


def test_loading_the_page_gets_no_error_response_and_its_icon_is_an_image(
    browser: Browser, server: str
) -> None:
    context = browser.new_context()
    page = context.new_page()
    responses: list[tuple[int, str]] = []
    failed: list[str] = []
    page.on("response", lambda response: responses.append((response.status, response.url)))
    page.on("requestfailed", lambda request: failed.append(request.url))
    try:
        page.goto(server, wait_until="networkidle")
        expect(page.locator("#model option")).to_have_count(2)
        icon = page.evaluate("document.querySelector('link[rel~=icon]').href")
        assert icon == f"{server}/favicon.ico"
        # The browser itself decodes what the page names as its icon.
        size = page.evaluate(
            """async (href) => {
                const image = new Image();
                image.src = href;
                await image.decode();
                return [image.naturalWidth, image.naturalHeight];
            }""",
            icon,
        )
        assert size[0] >= 16, size
        assert size[1] >= 16, size
        served = page.request.get(icon)
        assert served.status == 200
        assert served.headers["content-type"].startswith("image/")
        assert [(status, url) for status, url in responses if status >= 400] == []
        assert failed == []
        # (Chromium fetches the icon itself, outside the page's own requests: hence the checks
        # above rather than a /favicon.ico entry here.)
        loaded = {url.removeprefix(server) for _, url in responses}
        assert {"/", "/ui/app.js", "/ui/style.css", "/v1/models"} <= loaded
    finally:
        context.close()


def _dispatch_files(page: Page, event: str, target: str, name: str) -> None:
    data = base64.b64encode((fixture(name)).read_bytes()).decode()
    page.evaluate(
        """([event, target, name, data]) => {
            const bytes = Uint8Array.from(atob(data), (c) => c.charCodeAt(0));
            const transfer = new DataTransfer();
            transfer.items.add(new File([bytes], name, { type: "image/jpeg" }));
            const init = { bubbles: true, cancelable: true };
            const fired = event === "paste"
                ? new ClipboardEvent("paste", { ...init, clipboardData: transfer })
                : new DragEvent(event, { ...init, dataTransfer: transfer });
            document.querySelector(target).dispatchEvent(fired);
        }""",
        [event, target, name, data],
    )


def test_paste_and_drag_and_drop_classify_too(page: Page) -> None:
    _dispatch_files(page, "paste", "body", "chelsea.jpg")
    expect(card_for(page, "chelsea.jpg").locator(".bar")).to_have_count(5)  # type: ignore[attr-defined]
    _dispatch_files(page, "drop", "#drop", "coffee.jpg")
    expect(card_for(page, "coffee.jpg").locator(".bar")).to_have_count(5)  # type: ignore[attr-defined]
    assert first_label(card_for(page, "coffee.jpg")) in COFFEE_CLASSES


def test_keyboard_opens_the_file_picker_and_controls_have_labels(
    page: Page, watched: Watched
) -> None:
    page.keyboard.press("Tab")  # the model picker
    expect(page.locator("#model")).to_be_focused()
    page.keyboard.press("Tab")  # the "choose files" button in the drop zone
    expect(page.locator("#choose")).to_be_focused()
    page.keyboard.press("Enter")
    for _ in range(50):
        if watched.choosers:
            break
        page.wait_for_timeout(100)
    assert watched.choosers, "Enter on the button opened no file chooser"
    watched.choosers[0].set_files(str(fixture("chelsea.jpg")))
    expect(card_for(page, "chelsea.jpg").locator(".bar")).to_have_count(5)  # type: ignore[attr-defined]
    expect(page.get_by_label("Model")).to_be_visible()
    expect(page.get_by_role("button", name="choose files")).to_be_visible()


def test_phone_sized_screen_stacks_preview_above_the_bars(browser: Browser, server: str) -> None:
    context = browser.new_context(viewport={"width": 375, "height": 740}, is_mobile=True)
    page = context.new_page()
    try:
        page.goto(server)
        expect(page.locator("#model option")).to_have_count(2)
        page.set_input_files("#files", str(fixture("chelsea.jpg")))
        card = card_for(page, "chelsea.jpg")
        expect(card.locator(".bar")).to_have_count(5)  # type: ignore[attr-defined]
        image = card.locator("img").bounding_box()  # type: ignore[attr-defined]
        bars = card.locator(".bars").bounding_box()  # type: ignore[attr-defined]
        assert bars["y"] >= image["y"] + image["height"] - 1  # stacked, not side by side
        assert bars["x"] + bars["width"] <= 375
        width = page.evaluate("document.documentElement.scrollWidth")
        assert width <= 375, "the page scrolls sideways on a phone"
    finally:
        context.close()


def test_api_key_field_appears_and_the_key_is_sent(browser: Browser) -> None:
    with live_server(api_keys="page-key") as (url, _):
        context = browser.new_context()
        page = context.new_page()
        try:
            page.goto(url)
            key = page.get_by_label("API key")
            expect(key).to_be_visible()
            expect(page.locator("#status")).to_contain_text("(401)")
            key.fill("wrong-key")
            key.press("Enter")
            key.dispatch_event("change")
            expect(page.locator("#status")).to_contain_text("(403)")
            key.fill("page-key")
            key.dispatch_event("change")
            expect(page.locator("#model option")).to_have_count(2)
            page.set_input_files("#files", str(fixture("chelsea.jpg")))
            expect(card_for(page, "chelsea.jpg").locator(".bar")).to_have_count(5)  # type: ignore[attr-defined]
            stored = page.evaluate("sessionStorage.getItem('evalserve-api-key')")
            assert stored == "page-key"
            assert page.evaluate("localStorage.length") == 0  # only the session keeps it
        finally:
            context.close()


def test_too_large_upload_shows_the_413_message(browser: Browser) -> None:
    with live_server(max_upload_bytes=4096) as (url, _):
        context = browser.new_context()
        page = context.new_page()
        try:
            page.goto(url)
            expect(page.locator("#model option")).to_have_count(2)
            page.set_input_files("#files", str(fixture("chelsea.jpg")))
            error = card_for(page, "chelsea.jpg").locator(".error")  # type: ignore[attr-defined]
            expect(error).to_contain_text("Too large (413)")
        finally:
            context.close()


def test_the_page_can_be_turned_off(server: str) -> None:
    import httpx

    with live_server(ui=False) as (url, _):
        assert httpx.get(url + "/").status_code == 404
        assert httpx.get(url + "/ui/app.js").status_code == 404
    assert httpx.get(server + "/").status_code == 200
    assert ROOT.exists()
