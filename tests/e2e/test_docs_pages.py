"""/docs (Swagger UI) and /redoc (ReDoc) in a real browser: Debian's Chromium, driven by
Playwright, against a live server. Every request that leaves the server's origin is aborted and
recorded, so a page that renders here renders offline from the vendored /docs-assets."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import httpx
import pytest
from playwright.sync_api import Browser, Locator, Page, Route, expect
from support import chromium, live_server

pytestmark = pytest.mark.e2e

# The server is reached by a name that is not localhost, as from another machine: Swagger UI
# treats localhost and 127.0.0.1 specially (it skips its online validator badge there).
HOST = "evalserve.test"


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with chromium(f"--host-resolver-rules=MAP {HOST} 127.0.0.1") as browser:
        yield browser


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    with live_server() as (url, _):
        yield url


@dataclass
class Visit:
    page: Page
    origin: str
    elsewhere: list[str] = field(default_factory=list)  # requests to any other origin, aborted
    errors: list[tuple[int, str]] = field(default_factory=list)  # 4xx and 5xx responses


@contextmanager
def visit(browser: Browser, server: str, path: str) -> Iterator[Visit]:
    """``path`` of the server opened in a fresh browser context, under the name HOST."""
    origin = server.replace("127.0.0.1", HOST)
    context = browser.new_context()
    page = context.new_page()
    seen = Visit(page, origin)

    def only_the_server(route: Route) -> None:
        url = route.request.url
        if url.startswith((origin + "/", "data:", "blob:")):
            route.continue_()
        else:
            seen.elsewhere.append(url)
            route.abort("blockedbyclient")

    context.route("**/*", only_the_server)
    page.on(
        "response",
        lambda response: (
            seen.errors.append((response.status, response.url)) if response.status >= 400 else None
        ),
    )
    try:
        page.goto(origin + path)
        yield seen
    finally:
        context.close()


def swagger_operation(page: Page, path: str) -> Locator:
    return page.locator(f'.opblock-summary-path[data-path="{path}"]')


def expect_swagger_ui_with_predict(page: Page) -> None:
    expect(page.locator(".swagger-ui .info .title")).to_contain_text("evalserve")
    predict = swagger_operation(page, "/v1/predict")
    expect(predict).to_be_visible()
    expect(predict).to_have_text("/v1/predict")
    # Its scripts work, not only its markup: the operation opens and offers "Try it out".
    predict.click()
    expect(page.get_by_role("button", name="Try it out")).to_be_visible()


def expect_redoc_with_predict(page: Page) -> None:
    # (Its accessible name also holds the anchor ReDoc puts inside the heading.)
    expect(page.get_by_role("heading", name="Predict Default")).to_be_visible()
    expect(page.get_by_text("/v1/predict", exact=True)).to_be_visible()
    expect(page.get_by_text("Classify one or more images with the default model.")).to_be_visible()


RENDERED = {"/docs": expect_swagger_ui_with_predict, "/redoc": expect_redoc_with_predict}


def test_swagger_ui_lists_the_predict_operation(browser: Browser, server: str) -> None:
    with visit(browser, server, "/docs") as seen:
        expect_swagger_ui_with_predict(seen.page)
        assert seen.errors == []


def test_redoc_shows_the_predict_operation(browser: Browser, server: str) -> None:
    with visit(browser, server, "/redoc") as seen:
        expect_redoc_with_predict(seen.page)
        assert seen.errors == []


# ReDoc 2.5's side menu drew Redocly's logo from https://cdn.redoc.ly: the vendored bundle is
# patched to an inline image (scripts/vendor_docs_assets.sh), which this test caught.
@pytest.mark.parametrize("path", ["/docs", "/redoc"])
def test_docs_page_requests_nothing_from_another_origin(
    browser: Browser, server: str, path: str
) -> None:
    with visit(browser, server, path) as seen:
        RENDERED[path](seen.page)
        seen.page.wait_for_load_state("networkidle")
        assert seen.elsewhere == []


def test_docs_still_work_with_the_page_turned_off(browser: Browser) -> None:
    with live_server(ui=False) as (url, _):
        assert httpx.get(url + "/").status_code == 404  # the try-it page is off
        with visit(browser, url, "/docs") as seen:
            expect_swagger_ui_with_predict(seen.page)
            assert seen.errors == []
            assert seen.elsewhere == []
