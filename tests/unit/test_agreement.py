"""The agreement tool's statistics."""

from __future__ import annotations

import pytest

from app.tools.agreement import test_images as agreement_images
from app.tools.agreement import wilson_interval


@pytest.mark.parametrize(
    ("successes", "trials", "low", "high"),
    # Reference values of the Wilson score interval at 95% (z = 1.96).
    [(95, 100, 0.8882, 0.9785), (0, 10, 0.0, 0.2775), (448, 448, 448 / (448 + 1.96**2), 1.0)],
)
def test_wilson_interval_matches_reference_values(
    successes: int, trials: int, low: float, high: float
) -> None:
    got = wilson_interval(successes, trials)
    assert got == pytest.approx((low, high), abs=1e-4)


def test_agreement_set_is_every_photo_and_mirror_whole_and_in_27_crops() -> None:
    images = agreement_images()
    assert len(images) == 448
    assert len({image.tobytes() for image in images}) == 448  # no two alike
