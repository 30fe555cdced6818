"""Decoding uploads and the resize / center-crop transform, on real photographs.

The photographs in tests/fixtures come from scikit-image's sample data (see make_fixtures.py).
Variants in other formats and modes are encoded in memory from them.
"""

from __future__ import annotations

import io
import json
import struct
import subprocess
import sys
import tracemalloc
import warnings
import zlib
from typing import Any

import numpy as np
import pytest
from corpus import make_corpus
from PIL import Image, features
from support import ROOT, fixture
from torchvision import transforms
from torchvision.transforms import InterpolationMode

from app.model.repository import PreprocessingSection
from app.preprocessing import (
    ALLOWED_FORMATS,
    STILL_FORMATS,
    BadImage,
    ImageTooLarge,
    ImageTransform,
    decode,
    load_image,
    probe,
)

HAS_AVIF = bool(features.check("avif"))
NO_AVIF = "this Pillow has no AVIF codec (libavif)"
IMAGENET = {"mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225)}
MAX_PIXELS = 40_000_000  # the server's default limit


def spec(**overrides) -> PreprocessingSection:
    fields: dict[str, Any] = {"resize": 256, "crop": 224, "interpolation": "bilinear", **IMAGENET}
    fields.update(overrides)
    return PreprocessingSection(**fields)


def imagenet_transform() -> ImageTransform:
    return ImageTransform.from_spec(spec())


def photo(name: str) -> Image.Image:
    with Image.open(fixture(name)) as image:
        image.load()
        return image.copy()


def encode(image: Image.Image, fmt: str, **params) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **params)
    return buffer.getvalue()


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_claiming_size(width: int, height: int) -> bytes:
    """A well-formed PNG header for an 8-bit RGB image of the given size, with almost no data."""
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", header)
        + png_chunk(b"IDAT", zlib.compress(b"\x00" * 16))
        + png_chunk(b"IEND", b"")
    )


# --- the transform against torchvision's reference pipeline -----------------------------------


def reference(image: Image.Image, resize: int = 256, crop: int = 224) -> np.ndarray:
    pipeline = transforms.Compose(
        [
            transforms.Resize(resize, interpolation=InterpolationMode.BILINEAR),
            transforms.CenterCrop(crop),
        ]
    )
    return np.asarray(pipeline(image))


def _small(name: str) -> Image.Image:
    image = photo(name)
    image.thumbnail((200, 200), Image.Resampling.LANCZOS)
    return image


PHOTOS = {
    "chelsea-landscape": lambda: photo("chelsea.jpg"),
    "chelsea-png": lambda: photo("chelsea.png"),
    "coffee-landscape": lambda: photo("coffee.jpg"),
    "rocket-landscape": lambda: photo("rocket.jpg"),
    "rocket-portrait": lambda: photo("rocket.jpg").transpose(Image.Transpose.ROTATE_90),
    "coffee-portrait": lambda: photo("coffee.png").transpose(Image.Transpose.TRANSPOSE),
    "astronaut-square": lambda: photo("astronaut.jpg"),
    "hubble-odd-size": lambda: photo("hubble.jpg"),
    "chelsea-smaller-than-resize": lambda: _small("chelsea.jpg"),
    "rocket-portrait-smaller-than-crop": lambda: _small("rocket.jpg").transpose(
        Image.Transpose.ROTATE_270
    ),
}


@pytest.mark.parametrize("make", PHOTOS.values(), ids=PHOTOS.keys())
def test_transform_matches_torchvision_pixel_for_pixel(make):
    image = make().convert("RGB")

    out = imagenet_transform()(image)

    assert out.shape == (224, 224, 3)
    assert out.dtype == np.uint8
    assert np.array_equal(out, reference(image))


def test_portrait_and_landscape_are_resized_on_their_shorter_side():
    landscape = photo("coffee.jpg")  # 600 x 400
    portrait = landscape.transpose(Image.Transpose.TRANSPOSE)  # 400 x 600
    transform = ImageTransform.from_spec(spec(resize=256, crop=256))

    # Cropping a square of the shorter side keeps the transposition: no squashing either way.
    # (Equal up to rounding: PIL resizes in two passes, so the order of the passes shows.)
    difference = transform(portrait).astype(int) - transform(landscape).transpose(1, 0, 2)
    assert np.abs(difference).max() <= 1


@pytest.mark.parametrize("size", [(221, 221), (217, 230), (220, 219), (300, 223)])
def test_crop_larger_than_the_image_pads_like_torchvision(size):
    rng = np.random.default_rng(7)
    image = Image.fromarray(rng.integers(1, 256, (size[1], size[0], 3), dtype=np.uint8))
    transform = ImageTransform.from_spec(spec(resize=None, crop=224))

    out = transform(image)

    assert out.shape == (224, 224, 3)
    assert np.array_equal(out, np.asarray(transforms.CenterCrop(224)(image)))


def test_grayscale_color_mode_gives_one_channel():
    image = photo("chelsea.jpg")
    transform = ImageTransform.from_spec(spec(color_mode="L", mean=(0.5,), std=(0.25,)))

    out = transform(image)

    assert out.shape == (224, 224, 1)
    assert out.dtype == np.uint8
    assert np.array_equal(out[:, :, 0], reference(image.convert("L")))


def test_grayscale_photo_becomes_three_equal_channels():
    image = photo("camera.jpg")
    assert image.mode == "L"

    out = imagenet_transform()(image)

    assert out.shape == (224, 224, 3)
    assert np.array_equal(out[:, :, 0], out[:, :, 1])
    assert np.array_equal(out[:, :, 1], out[:, :, 2])
    assert np.array_equal(out, reference(image.convert("RGB")))


# --- decoding formats and modes ---------------------------------------------------------------


LOSSLESS = {
    "PNG": {},
    "WEBP": {"lossless": True},
    "BMP": {},
    "TIFF": {},
}


@pytest.mark.parametrize("fmt", LOSSLESS, ids=str.lower)
def test_lossless_formats_decode_to_the_original_pixels(fmt):
    original = photo("chelsea.png")

    decoded = decode(encode(original, fmt, **LOSSLESS[fmt]), f"chelsea.{fmt.lower()}", MAX_PIXELS)

    assert decoded.size == original.size
    assert np.array_equal(np.asarray(decoded.convert("RGB")), np.asarray(original))


@pytest.mark.parametrize(
    "fmt",
    [
        "JPEG",
        "WEBP",
        "GIF",
        pytest.param("AVIF", marks=pytest.mark.skipif(not HAS_AVIF, reason=NO_AVIF)),
    ],
    ids=str.lower,
)
def test_lossy_formats_decode_close_to_the_original(fmt):
    original = photo("chelsea.png")
    data = encode(original, fmt)

    out = load_image(data, f"chelsea.{fmt.lower()}", MAX_PIXELS, imagenet_transform())

    expected = imagenet_transform()(original)
    assert out.shape == (224, 224, 3)
    difference = np.abs(out.astype(int) - expected.astype(int)).mean()
    assert difference < 12  # same picture, up to compression / palette error


def test_animated_gif_gives_its_first_frame():
    red = Image.new("RGB", (64, 48), (255, 0, 0))
    blue = Image.new("RGB", (64, 48), (0, 0, 255))
    data = encode(red, "GIF", save_all=True, append_images=[blue], duration=100, loop=0)
    with Image.open(io.BytesIO(data)) as check:
        assert getattr(check, "n_frames", 1) == 2

    out = load_image(data, "blink.gif", MAX_PIXELS, ImageTransform.from_spec(spec(crop=200)))

    assert out.shape == (200, 200, 3)
    assert np.all(out == np.array([255, 0, 0], dtype=np.uint8))


def test_multipage_tiff_gives_its_first_page():
    green = Image.new("RGB", (40, 30), (0, 200, 0))
    black = Image.new("RGB", (40, 30), (0, 0, 0))
    data = encode(green, "TIFF", save_all=True, append_images=[black])

    decoded = decode(data, "pages.tiff", MAX_PIXELS)

    assert decoded.size == (40, 30)
    assert decoded.convert("RGB").getpixel((20, 15)) == (0, 200, 0)


def _rgba() -> bytes:
    image = photo("chelsea.png").convert("RGBA")
    image.putalpha(128)
    return encode(image, "PNG")


def _cmyk() -> bytes:
    return encode(photo("chelsea.png").convert("CMYK"), "JPEG", quality=95)


def _palette() -> bytes:
    return encode(photo("chelsea.png").quantize(64), "PNG")


def _grayscale() -> bytes:
    return (fixture("camera.jpg")).read_bytes()


MODES = {"RGBA": _rgba, "CMYK": _cmyk, "P": _palette, "L": _grayscale}


@pytest.mark.parametrize("mode", MODES, ids=str.lower)
def test_every_color_mode_comes_out_as_three_channel_rgb(mode):
    data = MODES[mode]()
    assert decode(data, "upload", MAX_PIXELS).mode == mode

    out = load_image(data, "upload", MAX_PIXELS, imagenet_transform())

    assert out.shape == (224, 224, 3)
    assert out.dtype == np.uint8


def test_cmyk_jpeg_keeps_its_colours():
    original = photo("chelsea.png")

    out = load_image(_cmyk(), "cmyk.jpg", MAX_PIXELS, imagenet_transform())

    difference = np.abs(out.astype(int) - imagenet_transform()(original).astype(int)).mean()
    assert difference < 5  # not inverted, not channel-swapped


def test_palette_png_with_alpha_transparency_converts_without_warning():
    palette = photo("chelsea.png").quantize(16)
    alpha = bytes([0, 64, 128, 192] + [255] * 12)
    data = encode(palette, "PNG", transparency=alpha)
    with Image.open(io.BytesIO(data)) as check:
        assert check.mode == "P"
        assert isinstance(check.info["transparency"], bytes)
        # The hazard this guards against: the naive conversion warns.
        with pytest.warns(UserWarning, match="Transparency"):
            check.convert("RGB")

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = load_image(data, "sticker.png", MAX_PIXELS, imagenet_transform())
        gray = load_image(
            data,
            "sticker.png",
            MAX_PIXELS,
            ImageTransform.from_spec(spec(color_mode="L", mean=(0.5,), std=(0.25,))),
        )

    assert out.shape == (224, 224, 3)
    assert gray.shape == (224, 224, 1)


def test_exif_orientation_is_applied():
    # Left half red, right half blue, stored landscape; orientation 6 means "rotate 90 clockwise".
    stored = Image.new("RGB", (80, 40), (0, 0, 255))
    stored.paste((255, 0, 0), (0, 0, 40, 40))
    exif = Image.Exif()
    exif[0x0112] = 6
    data = encode(stored, "JPEG", exif=exif, quality=95)

    upright = decode(data, "phone.jpg", MAX_PIXELS)

    assert upright.size == (40, 80)
    top, bottom = upright.getpixel((20, 10)), upright.getpixel((20, 70))
    assert isinstance(top, tuple)
    assert isinstance(bottom, tuple)
    assert top[0] > 200
    assert top[2] < 50
    assert bottom[2] > 200
    assert bottom[0] < 50


def test_load_image_is_decode_then_transform():
    data = (fixture("rocket.jpg")).read_bytes()
    transform = imagenet_transform()

    out = load_image(data, "rocket.jpg", MAX_PIXELS, transform)

    assert np.array_equal(out, transform(decode(data, "rocket.jpg", MAX_PIXELS)))
    assert np.array_equal(out, reference(photo("rocket.jpg")))


def phone_jpeg(orientation: int | None = None) -> tuple[bytes, Image.Image]:
    """A 4000x3000 JPEG (the cat, scaled up), and the image it decodes to in full."""
    big = photo("chelsea.jpg").convert("RGB").resize((4000, 3000), Image.Resampling.BICUBIC)
    params: dict = {"quality": 90}
    if orientation is not None:
        exif = Image.Exif()
        exif[0x0112] = orientation
        params["exif"] = exif
    data = encode(big, "JPEG", **params)
    return data, decode(data, "phone.jpg", MAX_PIXELS)


def test_jpeg_draft_decodes_a_large_photo_at_a_quarter_scale_close_to_the_full_decode():
    data, full = phone_jpeg()
    drafting = ImageTransform.from_spec(spec(jpeg_draft=True))
    # Twice the 341x256 resize target is 682x512: 1/4 scale (1000x750) is the smallest above it.
    assert drafting.draft_size(full.size) == (682, 512)
    drafted = decode(data, "phone.jpg", MAX_PIXELS, drafting.draft_size)
    assert drafted.size == (1000, 750)
    out = drafting(drafted)
    exact = imagenet_transform()(full)
    assert out.shape == exact.shape == (224, 224, 3)
    assert not np.array_equal(out, exact)  # a different input, as documented...
    assert np.abs(out.astype(int) - exact).mean() < 2.0  # ...but close to it
    # load_image drafts when the model's preprocessing says so, and only then.
    assert np.array_equal(load_image(data, "phone.jpg", MAX_PIXELS, drafting), out)
    assert np.array_equal(load_image(data, "phone.jpg", MAX_PIXELS, imagenet_transform()), exact)


def test_jpeg_draft_follows_exif_orientation():
    data, full = phone_jpeg(orientation=6)
    assert full.size == (3000, 4000)
    drafting = ImageTransform.from_spec(spec(jpeg_draft=True))
    drafted = decode(data, "phone.jpg", MAX_PIXELS, drafting.draft_size)
    assert drafted.size == (750, 1000)
    out, exact = drafting(drafted), imagenet_transform()(full)
    assert np.abs(out.astype(int) - exact).mean() < 2.0


def test_jpeg_draft_leaves_small_photos_and_other_formats_exact():
    drafting = ImageTransform.from_spec(spec(jpeg_draft=True))
    # Under four times the resize target nothing is drafted: the fixtures decode exactly.
    data = (fixture("rocket.jpg")).read_bytes()
    assert np.array_equal(
        load_image(data, "rocket.jpg", MAX_PIXELS, drafting), reference(photo("rocket.jpg"))
    )
    # Only JPEG has DCT scaling: a large PNG decodes in full.
    png = encode(photo("chelsea.jpg").convert("RGB").resize((2000, 1500)), "PNG")
    assert decode(png, "big.png", MAX_PIXELS, drafting.draft_size).size == (2000, 1500)


def test_jpeg_draft_of_a_truncated_photo_is_still_a_bad_image():
    data, _ = phone_jpeg()
    drafting = ImageTransform.from_spec(spec(jpeg_draft=True))
    with pytest.raises(BadImage, match=r"phone\.jpg"):
        load_image(data[: len(data) // 2], "phone.jpg", MAX_PIXELS, drafting)


# --- refusals ---------------------------------------------------------------------------------


def _half(name: str) -> bytes:
    data = (fixture(name)).read_bytes()
    return data[: len(data) // 2]


BROKEN = {
    "notes.txt": lambda: b"these are not the pixels you are looking for\n" * 20,
    "empty.jpg": lambda: b"",
    "cut-short.jpg": lambda: _half("chelsea.jpg"),
    "cut-short.png": lambda: _half("chelsea.png"),
}


ENTRY_POINTS = {
    "decode": lambda data, name: decode(data, name, MAX_PIXELS),
    "load_image": lambda data, name: load_image(data, name, MAX_PIXELS, imagenet_transform()),
}


@pytest.mark.parametrize("entry", ENTRY_POINTS)
@pytest.mark.parametrize("name", BROKEN)
def test_broken_uploads_raise_bad_image_naming_the_file(name, entry):
    data = BROKEN[name]()

    with pytest.raises(BadImage) as caught:
        ENTRY_POINTS[entry](data, name)

    assert caught.value.name == name
    assert name in str(caught.value)


@pytest.mark.parametrize("fmt", ["PPM", "ICO", "TGA", "PCX"], ids=str.lower)
def test_formats_outside_the_allowed_list_are_refused(fmt):
    data = encode(photo("chelsea.jpg").resize((64, 48)), fmt)
    with Image.open(io.BytesIO(data)) as check:  # Pillow itself would happily open it
        assert check.format == fmt

    with pytest.raises(BadImage) as caught:
        decode(data, f"chelsea.{fmt.lower()}", MAX_PIXELS)

    assert caught.value.name == f"chelsea.{fmt.lower()}"


def _psd(image: Image.Image) -> bytes:
    """An uncompressed 8-bit RGB Photoshop file (Pillow reads PSD but cannot write it)."""
    pixels = np.asarray(image.convert("RGB"))
    header = b"8BPS" + struct.pack(">H6xHIIHH", 1, 3, image.height, image.width, 8, 3)
    # Empty colour-mode, image-resource and layer sections, then raw planar channel data.
    planes = b"".join(pixels[:, :, channel].tobytes() for channel in range(3))
    return header + struct.pack(">IIIH", 0, 0, 0, 0) + planes


def _eps(image: Image.Image) -> bytes:
    """An EPS header Pillow identifies (rendering it would need Ghostscript)."""
    box = f"%%BoundingBox: 0 0 {image.width} {image.height}"
    return f"%!PS-Adobe-3.0 EPSF-3.0\n{box}\n%%EndComments\nshowpage\n%%EOF\n".encode()


@pytest.mark.parametrize("fmt", ["PSD", "EPS"], ids=str.lower)
def test_psd_and_eps_that_pillow_opens_are_refused(fmt):
    data = (_psd if fmt == "PSD" else _eps)(photo("chelsea.jpg").resize((64, 48)))
    with Image.open(io.BytesIO(data)) as check:  # Pillow itself identifies it
        assert (check.format, check.size) == (fmt, (64, 48))

    with pytest.raises(BadImage) as caught:
        decode(data, f"chelsea.{fmt.lower()}", MAX_PIXELS)

    assert caught.value.message.startswith("not a supported image")
    assert fmt not in ALLOWED_FORMATS


@pytest.mark.skipif(not HAS_AVIF, reason=NO_AVIF)
def test_accepted_formats_name_avif_where_pillow_has_its_codec():
    assert ALLOWED_FORMATS[:7] == ("JPEG", "PNG", "WEBP", "BMP", "GIF", "TIFF", "AVIF")
    assert set(ALLOWED_FORMATS) <= set(STILL_FORMATS)

    with pytest.raises(BadImage) as caught:
        decode(b"these are not pixels\n" * 20, "notes.txt", MAX_PIXELS)

    assert "JPEG, PNG, WebP, BMP, GIF, TIFF" in caught.value.message
    assert "AVIF" in caught.value.message


# Run in a fresh interpreter where Pillow's libavif binding cannot be imported: Pillow then
# registers its AVIF plugin but cannot decode, as on an install built without libavif.
_WITHOUT_AVIF = """
import json, sys
from pathlib import Path
sys.modules["PIL._avif"] = None
from PIL import features
from app.preprocessing import ALLOWED_FORMATS, BadImage, decode
avif, jpeg = Path(sys.argv[1]).read_bytes(), Path(sys.argv[2]).read_bytes()
try:
    decode(avif, "chelsea.avif", 10**7)
    refusal = None
except BadImage as exc:
    refusal = exc.message
print(json.dumps({
    "has_avif": features.check("avif"),
    "allowed": ALLOWED_FORMATS,
    "refusal": refusal,
    "jpeg": decode(jpeg, "chelsea.jpg", 10**7).size,
}))
"""


@pytest.mark.skipif(not HAS_AVIF, reason=f"{NO_AVIF}: no AVIF file to send")
def test_without_an_avif_codec_avif_is_refused_naming_what_is_accepted(tmp_path):
    avif = tmp_path / "chelsea.avif"
    avif.write_bytes(encode(photo("chelsea.jpg"), "AVIF"))

    run = subprocess.run(
        [
            sys.executable,
            "-W",
            "error",
            "-c",
            _WITHOUT_AVIF,
            str(avif),
            str(fixture("chelsea.jpg")),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )

    assert run.returncode == 0, run.stderr
    seen = json.loads(run.stdout)
    assert seen["has_avif"] is False
    assert "AVIF" not in seen["allowed"]
    assert seen["allowed"][:6] == ["JPEG", "PNG", "WEBP", "BMP", "GIF", "TIFF"]
    assert seen["refusal"] is not None
    assert seen["refusal"].startswith("not a supported image (")
    assert "JPEG, PNG, WebP, BMP, GIF" in seen["refusal"]
    assert "AVIF" not in seen["refusal"]
    assert seen["jpeg"] == [451, 300]  # everything else still decodes


def test_image_over_the_pixel_limit_is_refused():
    data = (fixture("chelsea.jpg")).read_bytes()  # 451 x 300 = 135300 pixels

    with pytest.raises(ImageTooLarge) as caught:
        load_image(data, "chelsea.jpg", 100_000, imagenet_transform())

    assert caught.value.name == "chelsea.jpg"
    assert "451x300" in str(caught.value)
    # At exactly the limit it is accepted.
    assert decode(data, "chelsea.jpg", 451 * 300).size == (451, 300)


def test_pixel_limit_is_checked_before_the_pixels_are_decoded():
    # The header is intact but the data is cut short: decoding would fail with BadImage.
    data = _half("chelsea.jpg")

    with pytest.raises(ImageTooLarge):
        decode(data, "chelsea.jpg", 100_000)


@pytest.mark.parametrize(
    ("width", "height"),
    [(8_000, 8_000), (30_000, 30_000)],
    ids=["over-the-server-limit", "decompression-bomb"],
)
def test_png_whose_header_claims_a_huge_size_is_refused(width, height):
    data = png_claiming_size(width, height)
    assert struct.unpack(">II", data[16:24]) == (width, height)

    with pytest.raises(ImageTooLarge) as caught:
        decode(data, "bomb.png", MAX_PIXELS)

    assert caught.value.name == "bomb.png"


@pytest.mark.parametrize("color_mode", ["RGB", "L"])
def test_sixteen_bit_grayscale_is_scaled_not_clipped_to_white(color_mode):
    # A 0..65535 ramp: Pillow's own convert() would clip every value above 255 to white.
    ramp = np.arange(224 * 224, dtype=np.uint32).reshape(224, 224) * 65535 // (224 * 224 - 1)
    data = encode(Image.fromarray(ramp.astype(np.uint16)), "PNG")
    transform = ImageTransform.from_spec(
        spec(
            resize=None,
            color_mode=color_mode,
            mean=(0.5,) * (3 if color_mode == "RGB" else 1),
            std=(0.5,) * (3 if color_mode == "RGB" else 1),
        )
    )
    out = load_image(data, "depth.png", MAX_PIXELS, transform)
    assert out.shape == (224, 224, 3 if color_mode == "RGB" else 1)
    assert out.min() == 0
    assert out.max() == 255
    # Still a ramp: the middle row sits near the middle of the range.
    assert 100 < int(out[112, 112, 0]) < 156


# --- issue 15, item 6: inputs that cost or mislead (each also in tests/corpus) ----------------


def test_a_tiff_whose_strip_offsets_are_a_rational_is_a_bad_image_not_a_type_error():
    data = make_corpus.tiff_rational_strip_offsets()

    with pytest.raises(BadImage) as caught:
        load_image(data, "rational.tif", MAX_PIXELS, imagenet_transform())

    assert caught.value.name == "rational.tif"


@pytest.mark.parametrize("size", [(6000, 6000), (1000, 1000)])
def test_a_jpeg_too_short_for_its_declared_size_is_refused_before_decoding(size):
    # A 16x16 JPEG (about 600 bytes, ending with a proper end marker) patched to claim ``size``:
    # libjpeg would fill the missing blocks with grey and report success.
    data = make_corpus.jpeg_claiming(*size)

    with pytest.raises(BadImage, match="truncated"):
        decode(data, "premature.jpg", MAX_PIXELS)


@pytest.mark.parametrize("progressive", [False, True], ids=["baseline", "progressive"])
@pytest.mark.parametrize("mode", ["RGB", "L"])
def test_the_jpeg_length_check_passes_whole_jpegs_of_one_colour(progressive, mode):
    # One colour compresses best: about one bit per 8x8 block, the least any whole JPEG holds.
    flat = Image.new(mode, (4000, 3000), 128 if mode == "L" else (128, 64, 32))
    data = encode(flat, "JPEG", quality=10, progressive=progressive, optimize=True)

    assert decode(data, "flat.jpg", MAX_PIXELS).size == (4000, 3000)


def test_probe_reads_the_pixel_count_from_the_header_alone():
    assert probe(make_corpus.gif_screen(6000, 6000), "screen.gif", MAX_PIXELS) == 36_000_000
    with pytest.raises(ImageTooLarge):
        probe(make_corpus.webp_claiming(16383, 16383), "big.webp", MAX_PIXELS)


def gray_transform() -> ImageTransform:
    return ImageTransform.from_spec(
        spec(resize=None, crop=32, color_mode="L", mean=(0.5,), std=(0.5,))
    )


def test_a_float_tiff_in_0_to_1_is_scaled_to_0_to_255_not_black():
    ramp = np.linspace(0, 1, 32 * 32, dtype=np.float32).reshape(32, 32)
    data = encode(Image.fromarray(ramp, "F"), "TIFF")

    out = load_image(data, "float.tif", MAX_PIXELS, gray_transform())[:, :, 0]

    np.testing.assert_array_equal(out, np.rint(ramp * 255).astype(np.uint8))


def test_a_float_tiff_outside_0_to_1_is_clipped():
    values = np.array([[-3.0, 0.5, 7.0, 1.0]] * 32, dtype=np.float32).repeat(8, axis=1)
    data = encode(Image.fromarray(values, "F"), "TIFF")

    out = load_image(data, "float.tif", MAX_PIXELS, gray_transform())

    assert sorted(set(out[0, :, 0].tolist())) == [0, 128, 255]


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_a_float_tiff_holding_nan_or_infinity_is_a_bad_image(bad):
    values = np.full((32, 32), 0.5, dtype=np.float32)
    values[3, 3] = bad
    data = encode(Image.fromarray(values, "F"), "TIFF")

    with pytest.raises(BadImage, match="NaN or infinity"):
        load_image(data, "nan.tif", MAX_PIXELS, gray_transform())


def test_an_int32_tiff_reads_as_16_bit_with_negative_values_black_not_wrapped():
    values = np.array([[-40000, -1, 0, 256, 65535, 70000, 32768, 128]] * 32, dtype=np.int32)
    data = encode(Image.fromarray(values.repeat(4, axis=1), "I"), "TIFF")

    out = load_image(data, "int32.tif", MAX_PIXELS, gray_transform())

    assert out[0, ::4, 0].tolist() == [0, 0, 0, 1, 255, 255, 128, 0]


def test_sixteen_bit_conversion_holds_no_wide_copies():
    # 4000x4000 at 16 bits is 32 MB. Reading it into numpy peaks at twice that (Pillow's
    # tobytes); widening to uint32 three times (astype, clip, shift) held 240 MB at once.
    ramp = np.arange(4000 * 4000, dtype=np.uint32).reshape(4000, 4000) % 65536
    image = Image.fromarray(ramp.astype(np.uint16))
    assert image.mode == "I;16"
    transform = ImageTransform.from_spec(
        spec(resize=None, crop=8, color_mode="L", mean=(0.5,), std=(0.5,))
    )

    tracemalloc.start()
    try:
        transform(image)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()

    assert peak < 4000 * 4000 * 5, f"{peak / 2**20:.0f} MB of arrays at once"
