"""Eight photographs from scikit-image's sample data (sources and terms in CREDITS.md; written
by tests/fixtures/make_fixtures.py), shipped with evalserve so that ``evalserve bench`` and
``evalserve agreement`` run wherever it is installed, not only in a checkout."""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

NAMES = ("chelsea", "coffee", "rocket", "astronaut", "motorcycle", "retina", "hubble", "camera")


def path(name: str) -> Path:
    """The photograph ``name`` (without ``.jpg``) as a file on disk."""
    # A wheel installs package data as plain files, so the resource is a real path.
    return Path(str(files(__name__) / f"{name}.jpg"))
