"""Eight photographs from scikit-image's sample data (sources and terms in CREDITS.md; written
by tests/fixtures/make_fixtures.py), shipped with evalserve: ``evalserve bench`` and
``evalserve agreement`` use them wherever it is installed, and an exported runtime proves its
equivalence to torch on them at start-up. Torch-free, so any layer may read them."""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

from PIL import Image

NAMES = ("chelsea", "coffee", "rocket", "astronaut", "motorcycle", "retina", "hubble", "camera")


def path(name: str) -> Path:
    """The photograph ``name`` (without ``.jpg``) as a file on disk."""
    # A wheel installs package data as plain files, so the resource is a real path.
    return Path(str(files(__name__) / f"{name}.jpg"))


def image(name: str) -> Image.Image:
    """The photograph ``name``, decoded and fully loaded, in RGB."""
    with Image.open(path(name)) as photo:
        return photo.convert("RGB")
