"""``evalserve evaluate`` in process, and the served digits model's eval-mode behaviour."""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path

import httpx
import pytest
import torch
from asgi_lifespan import LifespanManager
from support import MODELS, make_settings

from app.main import create_app
from app.tools.cli import main


def evaluate_json(capsys: pytest.CaptureFixture[str], *args: str) -> dict:
    code = main(["evaluate", "--model-repository", str(MODELS), "--device", "cpu", *args])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    return json.loads(captured.out)


def test_digits_model_is_at_least_95_percent_accurate_in_process(
    digits_test_split: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    result = evaluate_json(capsys, "--model", "digits", "--json", str(digits_test_split))
    assert result["images"] == result["evaluated"] == 360
    assert result["top1"] >= 0.95
    assert result["top5"] >= result["top1"]
    assert sorted(result["per_class"]) == [str(d) for d in range(10)]
    assert sum(row["total"] for row in result["per_class"].values()) == 360
    wrong = sum(p["label"] != p["predicted"] for p in result["predictions"])
    assert wrong == round(360 * (1 - result["top1"]))
    assert sum(c["count"] for c in result["confused"]) == wrong
    assert result["images_per_s"] > 0


def test_readable_report_names_the_accuracies(
    digits_test_split: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(["evaluate", "--model", "digits", "--device", "cpu", str(digits_test_split)])
    out = capsys.readouterr().out
    assert code == 0
    assert "top-1 accuracy" in out
    assert "top-5 accuracy" in out
    assert "images/s" in out


def test_folder_names_that_match_no_label_stop_with_a_list_of_them(
    digits_test_split: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = tmp_path / "data"
    shutil.copytree(digits_test_split / "3", data / "3")
    shutil.copytree(digits_test_split / "4", data / "four")
    shutil.copytree(digits_test_split / "5", data / "cat")
    code = main(["evaluate", "--model", "digits", "--device", "cpu", str(data)])
    err = capsys.readouterr().err
    assert code == 2
    assert "'cat'" in err
    assert "'four'" in err
    assert "'3'" not in err
    assert "match no label" in err


def test_a_corrupt_image_is_reported_by_path_and_the_run_finishes(
    digits_test_split: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = tmp_path / "data"
    shutil.copytree(digits_test_split / "7", data / "7")
    total = len(list((data / "7").iterdir()))
    corrupt = data / "7" / "broken.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n this is not really a png")
    result = evaluate_json(capsys, "--model", "digits", "--json", str(data))
    assert result["images"] == total + 1
    assert result["evaluated"] == total
    assert [u["path"] for u in result["unreadable"]] == [str(corrupt)]
    assert "broken.png" in result["unreadable"][0]["error"]


def test_served_digits_model_neither_varies_nor_leaks_between_batched_images(
    digits_test_split: Path,
) -> None:
    """Unlike train mode (see tests/unit/test_digits_model.py): the same image twice gives the
    same scores, and the scores do not change when other images share its batch."""
    images = sorted(digits_test_split.rglob("*.png"))[::40][:8]
    uploads = {path: path.read_bytes() for path in images}

    async def scenario() -> None:
        app = create_app(make_settings(max_batch_delay_ms=200))
        async with LifespanManager(app, startup_timeout=120):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:

                async def scores(path: Path) -> torch.Tensor:
                    response = await client.post(
                        "/v1/models/digits/predict?top_k=10",
                        content=uploads[path],
                        headers={"Content-Type": "image/png"},
                    )
                    assert response.status_code == 200, response.text
                    vector = torch.zeros(10)
                    for entry in response.json()["predictions"][0]["classes"]:
                        vector[entry["index"]] = entry["score"]
                    return vector

                alone = [await scores(path) for path in images]
                again = [await scores(path) for path in images]
                together = await asyncio.gather(*(scores(path) for path in images))
                stats = app.state.serving.models["digits"].batcher.stats
                assert stats.largest_batch > 1
            for first, second, batched in zip(alone, again, together, strict=True):
                assert torch.equal(first, second)
                assert torch.allclose(first, batched, atol=1e-6, rtol=0)

    asyncio.run(scenario())
