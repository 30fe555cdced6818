"""GPU JPEG decode, everything but nvJPEG itself, on the CPU: which uploads are planned for the
device, the orientation and geometry the device path applies (checked against Pillow's), the
fallback of a refused image to the CPU path, and an undecodable image failing alone.

``DeviceDecoder`` runs the same code on the CPU with libjpeg (the CUDA tests run it with nvJPEG,
tests/api/test_cuda.py)."""

from __future__ import annotations

import dataclasses
import io

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps
from support import PHOTOS, jpeg_of, photo, web_jpeg

from app.model.device_decode import DeviceDecoder, upright
from app.preprocessing import (
    BadImage,
    ImageTooLarge,
    ImageTransform,
    load_image,
    plan_device_decode,
)
from app.values import EncodedImage

MAX_PIXELS = 40_000_000
TRANSFORM = ImageTransform(resize=256, crop=224, mode="RGB", resample=Image.Resampling.BILINEAR)


def with_orientation(image: Image.Image, orientation: int) -> bytes:
    exif = image.getexif()
    exif[0x0112] = orientation
    return jpeg_of(image, quality=95, exif=exif.tobytes())


def planned(data: bytes, transform: ImageTransform = TRANSFORM) -> EncodedImage | None:
    return plan_device_decode(data, "upload", MAX_PIXELS, transform)[1]


def test_baseline_and_progressive_rgb_jpegs_are_planned_for_the_device() -> None:
    for data in (web_jpeg("chelsea.jpg"), web_jpeg("chelsea.jpg", progressive=True)):
        pixels, encoded = plan_device_decode(data, "cat.jpg", MAX_PIXELS, TRANSFORM)
        assert encoded is not None
        assert encoded.data is data
        assert encoded.name == "cat.jpg"
        assert encoded.orientation == 1
        assert pixels == encoded.size[0] * encoded.size[1] == 451 * 300


def test_what_the_device_cannot_decode_is_planned_for_the_cpu() -> None:
    with Image.open(io.BytesIO(photo("chelsea.jpg"))) as image:
        cmyk = jpeg_of(image.convert("CMYK"))
        png = io.BytesIO()
        image.save(png, "PNG")
    assert planned(cmyk) is None
    assert planned(png.getvalue()) is None
    jpeg = web_jpeg("chelsea.jpg")
    # Models whose preprocessing the device does not reproduce decode everything on the CPU.
    for other in (
        dataclasses.replace(TRANSFORM, mode="L"),
        dataclasses.replace(TRANSFORM, resample=Image.Resampling.LANCZOS),
        dataclasses.replace(TRANSFORM, resample=Image.Resampling.NEAREST),
    ):
        assert planned(jpeg, other) is None
    assert planned(jpeg, dataclasses.replace(TRANSFORM, resample=Image.Resampling.BICUBIC))


def test_planning_checks_the_header_as_the_cpu_path_does() -> None:
    jpeg = web_jpeg("chelsea.jpg")
    with pytest.raises(ImageTooLarge):
        plan_device_decode(jpeg, "cat.jpg", 1000, TRANSFORM)
    with pytest.raises(BadImage, match="corrupt"):
        plan_device_decode(jpeg[:300], "cat.jpg", MAX_PIXELS, TRANSFORM)
    with pytest.raises(BadImage, match="not a supported image"):
        plan_device_decode(b"not an image at all", "x.bin", MAX_PIXELS, TRANSFORM)


def test_the_exif_orientation_is_read_at_planning() -> None:
    with Image.open(io.BytesIO(photo("chelsea.jpg"))) as image:
        rotated = with_orientation(image.convert("RGB"), 6)
    encoded = planned(rotated)
    assert encoded is not None
    assert (encoded.orientation, encoded.size) == (6, (451, 300))


@pytest.mark.parametrize("orientation", range(1, 9))
def test_upright_turns_an_image_as_pillow_exif_transpose_does(orientation: int) -> None:
    pixels = np.random.default_rng(orientation).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    image = Image.fromarray(pixels)
    exif = image.getexif()
    exif[0x0112] = orientation
    stored = io.BytesIO()
    image.save(stored, "PNG", exif=exif.tobytes())
    expected = np.asarray(ImageOps.exif_transpose(Image.open(stored)))
    got = upright(torch.from_numpy(pixels).permute(2, 0, 1), orientation)
    assert np.array_equal(got.permute(1, 2, 0).numpy(), expected)


def cpu_path(data: bytes) -> np.ndarray:
    return load_image(data, "upload", MAX_PIXELS, TRANSFORM)


def as_hwc(tensor: torch.Tensor | Exception) -> np.ndarray:
    assert isinstance(tensor, torch.Tensor), tensor
    return tensor.permute(1, 2, 0).numpy()


def test_a_batch_of_photos_of_different_sizes_matches_the_cpu_path_within_a_level() -> None:
    # Different sizes and an upright-turned one in one batch: each is resized with its own
    # geometry. (libjpeg decodes here; the resize is the device path's tensor resize.)
    with Image.open(io.BytesIO(photo("coffee.jpg"))) as image:
        turned = with_orientation(image.convert("RGB"), 8)
    uploads = [web_jpeg(name) for name in PHOTOS[:5]] + [turned]
    decoder = DeviceDecoder(torch.device("cpu"), TRANSFORM, MAX_PIXELS)
    plans = [planned(data) for data in uploads]
    assert all(plans)
    decoded = decoder([plan for plan in plans if plan is not None])
    for data, pixels in zip(uploads, decoded, strict=True):
        got = as_hwc(pixels)
        expected = cpu_path(data)
        assert got.shape == expected.shape == (224, 224, 3)
        difference = np.abs(got.astype(int) - expected.astype(int))
        assert difference.max() <= 2, difference.max()
        assert difference.mean() < 0.05
    assert (decoder.decoded, decoder.fell_back) == (6, 0)


def test_an_image_smaller_than_the_crop_is_padded_with_zeros_as_on_the_cpu() -> None:
    small = dataclasses.replace(TRANSFORM, resize=None)
    with Image.open(io.BytesIO(photo("chelsea.jpg"))) as image:
        data = jpeg_of(image.convert("RGB").resize((120, 90)), quality=95)
    encoded = planned(data, small)
    assert encoded is not None
    (got,) = DeviceDecoder(torch.device("cpu"), small, MAX_PIXELS)([encoded])
    expected = load_image(data, "small", MAX_PIXELS, small)
    assert np.array_equal(as_hwc(got), expected)
    assert not expected[:10].any()  # the padding rows really are there, and zero


def test_an_image_the_device_decodes_wrongly_is_decoded_on_the_cpu() -> None:
    data = web_jpeg("chelsea.jpg")
    encoded = planned(data)
    assert encoded is not None
    # Its header and the decoder disagree about its size: the decoder's pixels are not used.
    wrong = dataclasses.replace(encoded, size=(300, 451))
    decoder = DeviceDecoder(torch.device("cpu"), TRANSFORM, MAX_PIXELS)
    (got,) = decoder([wrong])
    assert np.array_equal(as_hwc(got), cpu_path(data))  # exactly the CPU path's pixels
    assert (decoder.decoded, decoder.fell_back) == (0, 1)


def test_an_undecodable_image_fails_alone_and_the_rest_of_its_batch_decodes() -> None:
    good = [web_jpeg(name) for name in PHOTOS[:3]]
    # A header that reads well over data cut short: only decoding finds out.
    cut = good[1][: len(good[1]) // 2]
    plans = [planned(data) for data in (good[0], cut, good[2])]
    assert all(plans)
    decoder = DeviceDecoder(torch.device("cpu"), TRANSFORM, MAX_PIXELS)
    first, failed, last = decoder([plan for plan in plans if plan is not None])
    assert isinstance(failed, BadImage)
    assert "upload" in str(failed)
    for pixels, data in ((first, good[0]), (last, good[2])):
        assert np.abs(as_hwc(pixels).astype(int) - cpu_path(data).astype(int)).max() <= 2
    # The batch was refused as a whole, then decoded one by one: the cut one fell back.
    assert (decoder.decoded, decoder.fell_back) == (2, 1)
