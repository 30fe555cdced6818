"""What a client puts in its request line can neither grow ``/metrics`` nor forge access-log
lines: made-up methods share one label, and control characters in a (percent-decoded) path are
escaped in the text log. The app runs in process, with its lifespan."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families
from support import make_settings, metric

from app.logs import TEXT_FORMAT, JsonFormatter
from app.main import create_app


@pytest.fixture(scope="module")
def client() -> Iterator[TestClient]:
    with TestClient(create_app(make_settings())) as found:
        yield found


def label_values(text: str, label: str) -> set[str]:
    return {
        sample.labels[label]
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if label in sample.labels
    }


def test_made_up_methods_share_one_metrics_label(client: TestClient) -> None:
    before = client.get("/metrics").text
    for i in range(200):
        method = f"MADEUP{i}"
        assert client.request(method, "/v1/models").status_code == 405
        assert client.request(method, f"/no/such/path/{i}").status_code == 404
    after = client.get("/metrics").text
    assert label_values(after, "method") <= {"GET", "POST", "HEAD", "OPTIONS", "other"}
    assert "MADEUP" not in after
    routes = {"/metrics", "/v1/models", "unmatched"}  # the scrape is counted after it answers
    assert label_values(after, "route") <= label_values(before, "route") | routes
    assert (
        metric(after, "evalserve_requests_total", route="/v1/models", method="other", status="405")
        == 200
    )
    assert (
        metric(after, "evalserve_requests_total", route="unmatched", method="other", status="404")
        == 200
    )
    # 400 requests added two counter series and two routes' histograms, not 400 series.
    assert len(after) < len(before) + 10_000


def access_records(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "evalserve.access"]


def test_control_characters_in_a_path_cannot_forge_access_log_lines(
    client: TestClient, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="evalserve.access")
    assert client.get("/v1/%0d%0aFAKE%20LINE%1b[2K").status_code == 404
    [record] = access_records(caplog)
    text = logging.Formatter(TEXT_FORMAT).format(record)
    assert len(text.splitlines()) == 1, text
    assert not any(line.startswith("FAKE") for line in text.splitlines())
    assert '"GET /v1/\\r\\nFAKE LINE\\x1b[2K" 404' in text
    assert "\x1b" not in text
    # The JSON line is one object too, and its path field is the exact path.
    line = JsonFormatter().format(record)
    assert len(line.splitlines()) == 1
    assert record.path == "/v1/\r\nFAKE LINE\x1b[2K"  # type: ignore[attr-defined]
