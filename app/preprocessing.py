"""Bytes to a checked, decoded, resized uint8 array: pure functions, safe to run in a thread pool,
and the pool they run in (``DecodePool``, shared fairly between requests).

Normalisation and the move to the device happen once per batch in the runtime, not here, so the
arrays that cross into the batcher stay small (uint8) and torch-free.
"""

from __future__ import annotations

import asyncio
import io
import struct
from collections import OrderedDict, deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from typing import Any, Protocol, TypeVar

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError, features

from app.values import EncodedImage

# Still-image formats a client may send, each with the Pillow feature its decoder needs (None:
# pure Python, or a plugin that registers itself only where it works). Pillow would open more
# (e.g. PSD, EPS); a server should not. (Multi-picture JPEGs from phones open through the JPEG
# plugin.) AVIF needs a Pillow built with libavif (the wheels are); HEIF/HEIC needs a plugin such
# as pillow-heif, which evalserve does not depend on but registers where it is installed.
STILL_FORMATS: dict[str, str | None] = {
    "JPEG": "jpg",
    "PNG": "zlib",
    "WEBP": "webp",
    "BMP": None,
    "GIF": None,
    "TIFF": None,
    "AVIF": "avif",
    "HEIF": None,
}
_SPELLING = {"WEBP": "WebP"}


def _register_heif_plugin() -> None:
    try:
        from pillow_heif import register_heif_opener
    except ImportError:
        return
    register_heif_opener()


def _decodable(formats: dict[str, str | None]) -> tuple[str, ...]:
    """The formats this Pillow has a working decoder for, in the order given."""
    _register_heif_plugin()
    Image.init()
    return tuple(
        name
        for name, feature in formats.items()
        if name in Image.OPEN and (feature is None or features.check(feature))
    )


def _either(names: tuple[str, ...]) -> str:
    spelled = [_SPELLING.get(name, name) for name in names]
    return spelled[0] if len(spelled) == 1 else f"{', '.join(spelled[:-1])} or {spelled[-1]}"


# Computed once: the plugins a Pillow install has do not change while it runs. An install
# without libavif still serves, and its refusals name what it does accept.
ALLOWED_FORMATS = _decodable(STILL_FORMATS)
UNSUPPORTED_MESSAGE = f"not a supported image ({_either(ALLOWED_FORMATS)} expected)"

_RESAMPLE = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
}


# Above this many pixels, a resize is not materialised whole (see ImageTransform).
RESIZED_PIXEL_BUDGET = 16_000_000


class PreprocessingConfig(Protocol):
    """The [preprocessing] section of a model.toml (``app.model.repository``), as read here."""

    @property
    def resize(self) -> int | None: ...
    @property
    def crop(self) -> int: ...
    @property
    def interpolation(self) -> str: ...
    @property
    def color_mode(self) -> str: ...
    @property
    def jpeg_draft(self) -> bool: ...


class ImageError(Exception):
    """An upload that cannot become a model input; ``name`` says which one."""

    def __init__(self, name: str, message: str) -> None:
        super().__init__(f"{name}: {message}")
        self.name = name
        self.message = message


class BadImage(ImageError):
    """Not an image, an unsupported format, or a truncated or corrupt file."""


class ImageTooLarge(ImageError):
    """More pixels than the server accepts (a decompression bomb, or just too big)."""


# What Pillow's plugins raise on malformed input besides OSError: a TIFF whose StripOffsets tag
# has a RATIONAL type raises TypeError, for one (found by an attack pass). All mean "corrupt".
CORRUPT = (
    OSError,
    ValueError,
    SyntaxError,
    EOFError,
    TypeError,
    IndexError,
    KeyError,
    ArithmeticError,
    struct.error,
)

# JPEG frames coded with Huffman tables (SOF0-3, 5-7); the others use arithmetic coding.
_HUFFMAN_FRAMES = frozenset({0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7})
_ARITHMETIC_FRAMES = frozenset({0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF})


def _jpeg_sof(data: bytes) -> tuple[int, int] | None:
    """The SOF marker's second byte (0xC0 baseline, 0xC2 progressive, ...) and the frame's
    sample precision in bits, read by walking the segments from the start; None when there is
    no frame header before the scan."""
    at = 2  # after SOI
    while at + 4 <= len(data) and data[at] == 0xFF:
        marker = data[at + 1]
        if marker == 0xFF:  # fill byte
            at += 1
            continue
        if marker in _HUFFMAN_FRAMES or marker in _ARITHMETIC_FRAMES:
            return marker, data[at + 4] if at + 4 < len(data) else 0
        if marker == 0xDA:  # start of scan: no frame header before it
            return None
        (length,) = struct.unpack_from(">H", data, at + 2)
        at += 2 + length
    return None


def _jpeg_frame(data: bytes) -> int | None:
    sof = _jpeg_sof(data)
    return None if sof is None else sof[0]


def _check_jpeg_length(data: bytes, name: str, width: int, height: int) -> None:
    """Refuse a Huffman-coded JPEG too short to hold its declared size.

    libjpeg decodes a JPEG whose data ends early (a premature end marker) without an error,
    filling the rest with grey: a 633-byte file declaring 6000x6000 decoded for 1.6 s into a
    blank image. Every 8x8 block of the full-resolution component costs at least one bit (its
    DC coefficient's Huffman code, in baseline and progressive JPEGs alike), so a shorter file
    cannot be whole. Arithmetic-coded JPEGs (rare) can be smaller and are not checked."""
    if _jpeg_frame(data) not in _HUFFMAN_FRAMES:
        return
    blocks = -(-width // 8) * -(-height // 8)
    if len(data) * 8 < blocks:
        raise BadImage(
            name,
            f"the JPEG data is truncated: {width}x{height} needs at least {-(-blocks // 8)} "
            f"bytes, the file has {len(data)}",
        )


def _open(data: bytes, name: str, max_pixels: int) -> Image.Image:
    """Open one upload and check its header: the format, the pixel limit, a JPEG too short for
    its size. No pixel data is decoded."""
    if not data:
        raise BadImage(name, "the file is empty")
    # Image.open(formats=...) needs every named plugin registered; init() is a no-op once done.
    Image.init()
    try:
        image: Image.Image = Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS)
    except Image.DecompressionBombError as exc:
        raise ImageTooLarge(name, f"the image has too many pixels ({exc})") from exc
    except UnidentifiedImageError as exc:
        raise BadImage(name, UNSUPPORTED_MESSAGE) from exc
    except CORRUPT as exc:
        raise BadImage(name, f"the image header is corrupt ({exc})") from exc
    width, height = image.size
    if width * height > max_pixels:
        raise ImageTooLarge(
            name, f"{width}x{height} is {width * height} pixels, the limit is {max_pixels}"
        )
    if image.format == "JPEG":
        _check_jpeg_length(data, name, width, height)
    return image


def probe(data: bytes, name: str, max_pixels: int) -> int:
    """The pixel count of one upload, read from its header and checked as ``decode`` checks it,
    without decoding: what a request's pixel budget is counted in."""
    width, height = _open(data, name, max_pixels).size
    return width * height


# What a model's device decodes (nvJPEG, through torchvision): 8-bit Huffman-coded JPEGs,
# sequential or progressive, in YCbCr or grayscale. Arithmetic-coded, lossless, 12-bit and
# CMYK JPEGs, and every other format, decode on the CPU.
_DEVICE_FRAMES = frozenset({0xC0, 0xC1, 0xC2})
_DEVICE_MODES = frozenset({"RGB", "L"})
# Resampling that the device reproduces (antialiased bilinear and bicubic on tensors); a model
# that asks for nearest or Lanczos decodes on the CPU.
_DEVICE_RESAMPLE = frozenset({Image.Resampling.BILINEAR, Image.Resampling.BICUBIC})
# Larger JPEGs decode on the CPU: a batch of them would hold gigabytes of device memory at
# full size, where the CPU path decodes at reduced scale when the model allows (jpeg_draft).
DEVICE_DECODE_MAX_PIXELS = 24_000_000


def device_decodes(transform: ImageTransform) -> bool:
    """Whether the device can produce ``transform``'s input at all (RGB, a resampling it
    reproduces); when not, every image of that model decodes on the CPU."""
    return transform.mode == "RGB" and transform.resample in _DEVICE_RESAMPLE


def plan_device_decode(
    data: bytes, name: str, max_pixels: int, transform: ImageTransform
) -> tuple[int, EncodedImage | None]:
    """The pixel count of one upload, its header checked as ``probe`` checks it, and the upload
    as an ``EncodedImage`` for the model's device to decode, or None when the CPU must decode
    it (see ``_DEVICE_FRAMES``). No pixel data is decoded here."""
    image = _open(data, name, max_pixels)
    width, height = image.size
    if not (
        image.format == "JPEG"
        and image.mode in _DEVICE_MODES
        and width * height <= DEVICE_DECODE_MAX_PIXELS
        and device_decodes(transform)
    ):
        return width * height, None
    sof = _jpeg_sof(data)
    if sof is None or sof[0] not in _DEVICE_FRAMES or sof[1] != 8:
        return width * height, None
    try:
        orientation = int(image.getexif().get(_ORIENTATION, 1))
    except CORRUPT:
        # Pillow's exif_transpose would fail on this EXIF block too: the CPU path says why.
        return width * height, None
    upright = (height, width) if orientation in _TRANSPOSING else (width, height)
    if transform.oversized(transform.geometry(upright)[0]):
        return width * height, None
    return width * height, EncodedImage(
        name, data, orientation if 1 <= orientation <= 8 else 1, (width, height)
    )


_ORIENTATION = 0x0112  # the EXIF orientation tag
_TRANSPOSING = frozenset({5, 6, 7, 8})  # orientations that swap width and height


def decode(
    data: bytes,
    name: str,
    max_pixels: int,
    draft: Callable[[tuple[int, int]], tuple[int, int] | None] | None = None,
) -> Image.Image:
    """Decode one upload to a fully loaded, upright image (its colour mode as stored).

    The pixel limit is checked from the header, before any pixel data is decoded. ``draft``,
    given the stored size, may name the smallest size a JPEG needs to decode at; libjpeg then
    decodes it directly at 1/2, 1/4 or 1/8 scale where that still covers it.
    """
    image = _open(data, name, max_pixels)
    try:
        if draft is not None and image.format == "JPEG":
            needed = draft(image.size)
            if needed is not None:
                image.draft(image.mode, needed)
        image.load()  # GIF and multi-page TIFF: the first frame
        image = ImageOps.exif_transpose(image)
    except Image.DecompressionBombError as exc:
        raise ImageTooLarge(name, f"the image has too many pixels ({exc})") from exc
    except CORRUPT as exc:
        raise BadImage(name, f"the image data is truncated or corrupt ({exc})") from exc
    return image


def _crop_start(size: int, crop: int) -> int:
    """Where a center crop starts, as torchvision computes it (padding first when too small)."""
    if size >= crop:
        return round((size - crop) / 2.0)
    return -((crop - size) // 2)


class Unusable(ValueError):
    """Pixel values that have no 8-bit meaning (NaN or infinity in a float image)."""


def _eight_bit(image: Image.Image) -> Image.Image:
    """A grayscale image deeper than 8 bits as 8-bit L; Pillow's convert() would clip it.

    - 16-bit (``I;16*``, PNG and TIFF): 0..65535 scaled onto 0..255 (the high byte).
    - 32-bit integer (``I``, signed TIFF): read as 16-bit too, values clipped to 0..65535 first,
      so negative values are black rather than wrapping round to white.
    - 32-bit float (``F``, TIFF): 0..1 onto 0..255, clipped, as skimage and torchvision read
      float images; NaN or infinity is refused (``Unusable``).

    The 16-bit path writes straight into the 8-bit result: no wider copy (it made three
    uint32 ones, 12 bytes a pixel, before).
    """
    values = np.asarray(image)  # Pillow's pixels, read-only: uint16, int32 or float32
    if image.mode == "F":
        if not np.isfinite(values).all():
            raise Unusable("a float image holds NaN or infinity")
        scaled = np.multiply(values, np.float32(255.0))
        np.clip(scaled, 0.0, 255.0, out=scaled)
        return Image.fromarray(np.rint(scaled, out=scaled).astype(np.uint8))
    eight = np.empty(values.shape, dtype=np.uint8)
    if values.dtype.kind == "i":
        # value >> 8 is below 0 for negative values and above 255 past 65535: clip it.
        np.clip(np.right_shift(values, 8), 0, 255, out=eight, casting="unsafe")
    else:
        np.right_shift(values, 8, out=eight, casting="unsafe")
    return Image.fromarray(eight)


_DEEP_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")


def _to_mode(image: Image.Image, mode: str) -> Image.Image:
    if image.mode == mode:
        return image
    if image.mode in _DEEP_MODES:
        image = _eight_bit(image)
        if mode == "L":
            return image
    if image.mode == "P" and "transparency" in image.info:
        # Palette transparency must go through RGBA, or Pillow warns and may mis-map colours.
        image = image.convert("RGBA")
    if mode == "L" and image.mode not in ("RGB", "RGBA", "L"):
        image = image.convert("RGB")
    return image.convert(mode)


@dataclass(frozen=True, slots=True)
class ImageTransform:
    """Resize (shorter side), center crop and colour conversion of one model, built once.

    Matches torchvision's ``Resize(int)`` and ``CenterCrop`` on PIL images exactly, so the served
    input equals a reference ``transforms.Compose`` pipeline's.
    """

    resize: int | None
    crop: int
    mode: str
    resample: Image.Resampling
    jpeg_draft: bool = False

    @classmethod
    def from_spec(cls, spec: PreprocessingConfig) -> ImageTransform:
        return cls(
            resize=spec.resize,
            crop=spec.crop,
            mode=spec.color_mode,
            resample=_RESAMPLE[spec.interpolation],
            jpeg_draft=spec.jpeg_draft,
        )

    def _resized_size(self, size: tuple[int, int]) -> tuple[int, int]:
        """(width, height) after resizing the shorter side to ``resize``."""
        assert self.resize is not None
        width, height = size
        short, long = min(width, height), max(width, height)
        new_short, new_long = self.resize, int(self.resize * long / short)
        return (new_short, new_long) if width <= height else (new_long, new_short)

    def draft_size(self, size: tuple[int, int]) -> tuple[int, int] | None:
        """The smallest size a JPEG of ``size`` may decode at (twice its resize target, so the
        resize still averages over at least two source pixels), or None when this transform
        does not draft. A photo under four times the target decodes exactly as without it.

        Measured on the agreement set scaled up to 3000-4000 pixels as JPEGs: decode and
        resize 11.9 ms instead of 58.7, and the same top-1 class as a full decode for 421 of
        448 images (the resize target itself, 1/8 scale here, agreed on only 407)."""
        if not self.jpeg_draft or self.resize is None:
            return None
        width, height = self._resized_size(size)
        return (2 * width, 2 * height)

    def geometry(self, size: tuple[int, int]) -> tuple[tuple[int, int], tuple[int, int]]:
        """For an upright image of ``size`` (width, height): its (width, height) once resized,
        and where the center crop starts in it, (left, top); negative where the crop is larger
        than the image (it is padded with zeros there). The one definition of the geometry,
        for the CPU path here and the device's (app/model/device_decode.py)."""
        resized = self._resized_size(size) if self.resize is not None else size
        return resized, (_crop_start(resized[0], self.crop), _crop_start(resized[1], self.crop))

    def oversized(self, resized: tuple[int, int]) -> bool:
        """A resize too large to materialise whole (see ``RESIZED_PIXEL_BUDGET``)."""
        return resized[0] * resized[1] > RESIZED_PIXEL_BUDGET and min(resized) >= self.crop

    def __call__(self, image: Image.Image) -> np.ndarray:
        """uint8 array of shape (crop, crop, channels)."""
        image = _to_mode(image, self.mode)
        size, (left, top) = self.geometry(image.size)
        if self.resize is not None and self.oversized(size):
            # An extreme aspect ratio (a 20000x1 strip resized to a 256 short side is 1.3
            # gigapixels): resample only the source region that lands in the crop.
            return _as_array(self._resize_crop_box(image, size))
        if size != image.size:
            image = image.resize(size, self.resample)
        # PIL pads with zeros where the crop box leaves the image, as torchvision does.
        return _as_array(image.crop((left, top, left + self.crop, top + self.crop)))

    def _resize_crop_box(self, image: Image.Image, size: tuple[int, int]) -> Image.Image:
        """Resize-then-center-crop computed on the crop's source box only: bounded memory."""
        scale_x, scale_y = size[0] / image.width, size[1] / image.height
        left, top = self.geometry(image.size)[1]
        box = (
            left / scale_x,
            top / scale_y,
            (left + self.crop) / scale_x,
            (top + self.crop) / scale_y,
        )
        return image.resize((self.crop, self.crop), self.resample, box=box)


def _as_array(image: Image.Image) -> np.ndarray:
    array = np.asarray(image, dtype=np.uint8)
    return array[:, :, None] if array.ndim == 2 else array


def load_image(data: bytes, name: str, max_pixels: int, transform: ImageTransform) -> np.ndarray:
    """Decode, check and transform one upload."""
    try:
        return transform(decode(data, name, max_pixels, transform.draft_size))
    except Unusable as exc:
        raise BadImage(name, str(exc)) from exc
    except CORRUPT as exc:
        # Pillow decodes some formats lazily, on first pixel access during the transform.
        raise BadImage(name, f"the image data is truncated or corrupt ({exc})") from exc


T = TypeVar("T")


@dataclass(slots=True)
class _Job:
    future: asyncio.Future[Any]
    call: Callable[[], Any]


class DecodePool(ThreadPoolExecutor):
    """The decode threads, shared fairly between requests.

    A plain executor runs jobs in the order they arrive, so a one-image request sent just after
    a request of 16 costly images waited for all 16. Here each request's jobs wait in their own
    line (``run``'s ``lane``); a free thread takes the next job of the next line in turn (round
    robin), and no line holds every thread: with two or more, one is always left for the next
    request, which so starts at once however busy the others are. A lone request therefore uses
    all threads but one. A job whose caller stopped waiting (the client left) never starts.

    Its lines are kept by the one event loop that calls ``run``.
    """

    def __init__(self, max_workers: int, thread_name_prefix: str = "decode") -> None:
        super().__init__(max_workers=max_workers, thread_name_prefix=thread_name_prefix)
        self.threads = max_workers
        # Most threads one lane may hold at once.
        self.share = max(1, max_workers - 1)
        self._lines: OrderedDict[object, deque[_Job]] = OrderedDict()
        self._held: dict[object, int] = {}  # threads held, by lane
        self._running = 0

    @property
    def waiting(self) -> int:
        """Jobs queued in the lines, not yet handed to a thread (cancelled ones included)."""
        return sum(len(line) for line in self._lines.values())

    async def run(self, lane: object, function: Callable[..., T], *args: Any) -> T:
        """``function(*args)`` in a decode thread, in turn with the other lanes' jobs."""
        loop = asyncio.get_running_loop()
        job = _Job(loop.create_future(), partial(function, *args))
        self._lines.setdefault(lane, deque()).append(job)
        self._dispatch(loop)
        result: T = await job.future
        return result

    def _next(self) -> tuple[object, _Job] | None:
        """The next lane in turn that may take a thread, and its job."""
        for lane, line in list(self._lines.items()):
            while line and line[0].future.done():
                line.popleft()  # its caller has gone
            if not line:
                del self._lines[lane]
            elif self._held.get(lane, 0) < self.share:
                job = line.popleft()
                if line:
                    self._lines.move_to_end(lane)  # its next job waits for the others' turns
                else:
                    del self._lines[lane]
                return lane, job
        return None

    def _dispatch(self, loop: asyncio.AbstractEventLoop) -> None:
        while self._running < self.threads and (chosen := self._next()) is not None:
            lane, job = chosen
            try:
                running = loop.run_in_executor(self, job.call)
            except RuntimeError as exc:  # shut down: the server is stopping
                job.future.set_exception(exc)
                continue
            self._running += 1
            self._held[lane] = self._held.get(lane, 0) + 1
            running.add_done_callback(partial(self._finished, loop, lane, job))

    def _finished(
        self,
        loop: asyncio.AbstractEventLoop,
        lane: object,
        job: _Job,
        running: asyncio.Future[Any],
    ) -> None:
        self._running -= 1
        self._held[lane] -= 1
        if not self._held[lane]:
            del self._held[lane]
        if running.cancelled():
            job.future.cancel()
        elif (error := running.exception()) is not None:
            if not job.future.done():
                job.future.set_exception(error)
        elif not job.future.done():
            job.future.set_result(running.result())
        self._dispatch(loop)
