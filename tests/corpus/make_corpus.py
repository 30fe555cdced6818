"""Write the hostile-input corpus: crafted files and requests, each with the answer it must get.

Run from the repository root: ``python tests/corpus/make_corpus.py``. It writes the small files
to ``tests/corpus/files/`` and every case to ``tests/corpus/manifest.json``; both are committed.
Requests too big to commit (20 MB bodies, 10,000 multipart parts, thousands of frames) are
described in the manifest by the name of a builder here, which ``tests/e2e/test_corpus.py``
calls at run time. Everything is deterministic: no randomness, no clock, fixed boundaries.

A case is sent to a real server by one of three transports:

- ``http``: one request with the case's Content-Type (and Inference-Header-Content-Length) and
  body;
- ``chunked``: the body streamed with ``Transfer-Encoding: chunked``;
- ``socket``: the builder's bytes written as they are to a TCP connection (lying
  ``Content-Length``, malformed heads), and the first status line read back.

The expected answer is a status, and where the server answers in its own shape, the error code
(``/v1``) or a fragment of the message (``/v2``).
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import struct
import sys
import zipfile
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

HERE = Path(__file__).resolve().parent
FILES = HERE / "files"
MANIFEST = HERE / "manifest.json"
ROOT = HERE.parents[1]
CAT = ROOT / "app" / "photos" / "chelsea.jpg"
MODEL = "efficientnet_lite0"
INFER = f"/v2/models/{MODEL}/infer"
BOUNDARY = "corpus-boundary-7d1c"
MULTIPART = f"multipart/form-data; boundary={BOUNDARY}"
JSON = "application/json"
# The request body limit of a default server (EVALSERVE_MAX_UPLOAD_BYTES).
UPLOAD_LIMIT = 20 * 1024 * 1024


# --- image makers ---------------------------------------------------------------------------


def encode(image: Image.Image, fmt: str, **options: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def small_cat(size: int = 64) -> Image.Image:
    with Image.open(CAT) as cat:
        return cat.convert("RGB").resize((size, size))


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png(
    width: int, height: int, idat: bytes, *extra: bytes, depth: int = 8, color: int = 2
) -> bytes:
    header = struct.pack(">IIBBBBB", width, height, depth, color, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", header)
        + b"".join(extra)
        + png_chunk(b"IDAT", idat)
        + png_chunk(b"IEND", b"")
    )


def png_zlib_bomb() -> bytes:
    """A legitimate 4000x4000 grayscale PNG of zeros: 16 MB of pixels in about 16 KB."""
    rows = b"".join(b"\x00" + b"\x00" * 4000 for _ in range(4000))
    return png(4000, 4000, zlib.compress(rows, 9), color=0)


def png_ztxt_bomb() -> bytes:
    """A small PNG with a zTXt chunk that inflates to 10 MB (Pillow stops at 1 MB)."""
    text = b"Comment\x00\x00" + zlib.compress(b"\x00" * 10_000_000, 9)
    rows = b"\x00" + b"\x80\x80\x80" * 8
    return png(8, 1, zlib.compress(rows), png_chunk(b"zTXt", text))


def png_iccp_bomb() -> bytes:
    """A small PNG whose ICC profile inflates to 10 MB."""
    profile = b"icc\x00\x00" + zlib.compress(b"\x00" * 10_000_000, 9)
    rows = b"\x00" + b"\x80\x80\x80" * 8
    return png(8, 1, zlib.compress(rows), png_chunk(b"iCCP", profile))


def gif_screen(width: int, height: int, trailer: bytes = b"") -> bytes:
    """A GIF whose logical screen is width x height, holding one 1x1 frame: Pillow paints the
    frame on the whole screen, so 35 bytes decode to width x height pixels."""
    out = b"GIF89a" + struct.pack("<HHBBB", width, height, 0, 0, 0)
    out += b"\x2c" + struct.pack("<HHHHB", 0, 0, 1, 1, 0x80) + b"\x00\x00\x00\xff\xff\xff"
    return out + b"\x02\x02\x44\x01\x00\x3b" + trailer


def gif_frames(count: int) -> bytes:
    """An 8x8 GIF of ``count`` 1x1 frames (each about 20 bytes), built by hand: Pillow would
    merge identical frames."""
    out = b"GIF89a" + struct.pack("<HHBBB", 8, 8, 0xF0, 0, 0) + b"\x00\x00\x00\xff\xff\xff"
    out += b"\x21\xff\x0bNETSCAPE2.0\x03\x01\x00\x00\x00"  # loop forever
    for index in range(count):
        x, y = index % 8, (index // 8) % 8
        out += b"\x21\xf9\x04\x00\x01\x00\x00\x00"  # 10 ms
        out += b"\x2c" + struct.pack("<HHHHB", x, y, 1, 1, 0) + b"\x02\x02\x44\x01\x00"
    return out + b"\x3b"


def webp_lossless(width: int, height: int) -> bytes:
    """A lossless WebP of one colour: 36 MP in about 40 bytes."""
    return encode(Image.new("RGB", (width, height), (10, 200, 30)), "WEBP", lossless=True)


def webp_claiming(width: int, height: int) -> bytes:
    """A small lossless WebP whose VP8L header is patched to claim width x height."""
    data = bytearray(webp_lossless(16, 16))
    at = data.index(b"VP8L") + 9  # chunk header (8) and the signature byte 0x2f
    bits = (width - 1) | ((height - 1) << 14)
    old = struct.unpack_from("<I", data, at)[0]
    struct.pack_into("<I", data, at, (old & ~((1 << 28) - 1)) | bits)
    return bytes(data)


def jpeg_claiming(width: int, height: int, quality: int = 50) -> bytes:
    """A 16x16 JPEG whose frame header is patched to claim width x height: its data ends (with
    a proper end marker) long before the declared pixels do."""
    data = bytearray(encode(Image.new("RGB", (16, 16), (200, 30, 40)), "JPEG", quality=quality))
    at = data.index(b"\xff\xc0")
    struct.pack_into(">HH", data, at + 5, height, width)
    return bytes(data)


def tiff(entries: list[tuple[int, int, int, bytes]], tail: bytes = b"", next_ifd: int = 0) -> bytes:
    """A little-endian TIFF with one IFD at offset 8 of (tag, type, count, 4-byte value)."""
    ifd = struct.pack("<H", len(entries))
    ifd += b"".join(
        struct.pack("<HHI", tag, kind, count) + value for tag, kind, count, value in entries
    )
    return b"II*\x00" + struct.pack("<I", 8) + ifd + struct.pack("<I", next_ifd) + tail


def short(value: int) -> bytes:
    return struct.pack("<HH", value, 0)


def long(value: int) -> bytes:
    return struct.pack("<I", value)


def tiff_gray(width: int, height: int, offsets: tuple[int, bytes], next_ifd: int = 0) -> bytes:
    """An 8-bit grayscale TIFF of one strip; ``offsets`` is StripOffsets' (type, value)."""
    kind, value = offsets
    entries = [
        (256, 4, 1, long(width)),
        (257, 4, 1, long(height)),
        (258, 3, 1, short(8)),
        (259, 3, 1, short(1)),
        (262, 3, 1, short(1)),
        (273, kind, 1, value),
        (278, 4, 1, long(height)),
        (279, 4, 1, long(min(width * height, 2**32 - 1))),
    ]
    return tiff(entries, next_ifd=next_ifd)


def tiff_rational_strip_offsets() -> bytes:
    """StripOffsets typed RATIONAL (5), pointing at a fraction: Pillow raised TypeError."""
    end = 8 + 2 + 12 * 8 + 4
    return tiff_gray(4, 4, (5, long(end))) + struct.pack("<II", end + 8, 1) + b"\x80" * 16


def tiff_claiming(width: int, height: int) -> bytes:
    end = 8 + 2 + 12 * 8 + 4
    return tiff_gray(width, height, (4, long(end))) + b"\x80" * 64


def tiff_ifd_loop() -> bytes:
    """A 4x4 TIFF whose next-IFD offset points back at its own IFD."""
    end = 8 + 2 + 12 * 8 + 4
    return tiff_gray(4, 4, (4, long(end)), next_ifd=8) + bytes(range(0, 256, 16))


def tiff_of(array: np.ndarray, mode: str) -> bytes:
    return encode(Image.fromarray(array, mode), "TIFF")


def float_tiff() -> bytes:
    """32x32 float32 in 0..1 (a gradient): it turned black."""
    return tiff_of(np.linspace(0, 1, 32 * 32, dtype=np.float32).reshape(32, 32), "F")


def float_tiff_nan() -> bytes:
    values = np.linspace(0, 1, 32 * 32, dtype=np.float32).reshape(32, 32)
    values[5, 5] = np.nan
    return tiff_of(values, "F")


def int32_tiff() -> bytes:
    """32x32 int32 from -40000 to 40000: the negative half wrapped round to white."""
    return tiff_of(np.linspace(-40000, 40000, 32 * 32).astype(np.int32).reshape(32, 32), "I")


def png16() -> bytes:
    gray = np.asarray(small_cat(32).convert("L")).astype(np.uint16) * 257
    return encode(Image.fromarray(gray), "PNG")


def bmp_claiming(width: int, height: int) -> bytes:
    header = struct.pack("<IiiHHIIiiII", 40, width, height, 1, 24, 0, 0, 2835, 2835, 0, 0)
    return b"BM" + struct.pack("<IHHI", 14 + 40 + 16, 0, 0, 54) + header + b"\x00" * 16


def bmp_rle_short() -> bytes:
    """An RLE8 BMP declaring 3000x3000 whose data ends after one run."""
    palette = b"".join(bytes((i, i, i, 0)) for i in range(256))
    header = struct.pack("<IiiHHIIiiII", 40, 3000, 3000, 1, 8, 1, 4, 2835, 2835, 256, 0)
    offset = 14 + 40 + len(palette)
    data = b"\xff\x10\x00\x01"  # 255 pixels of colour 16, then end of bitmap
    return b"BM" + struct.pack("<IHHI", offset + len(data), 0, 0, offset) + header + palette + data


def avif_claiming(width: int, height: int) -> bytes:
    """A small AVIF whose ``ispe`` box (the image's spatial extent) claims width x height."""
    data = bytearray(encode(Image.new("RGB", (16, 16), (50, 90, 200)), "AVIF", quality=30))
    at = data.index(b"ispe") + 8  # box type, then version and flags
    struct.pack_into(">II", data, at, width, height)
    return bytes(data)


def psd_header() -> bytes:
    """A Photoshop header: Pillow opens PSD, evalserve must not."""
    head = b"8BPS" + struct.pack(">H6sHIIHH", 1, b"\x00" * 6, 3, 16, 16, 8, 3)
    return head + struct.pack(">III", 0, 0, 0) + struct.pack(">H", 0) + b"\x00" * (16 * 16 * 3)


def ico() -> bytes:
    return encode(small_cat(32), "ICO")


def jpeg_with_zip() -> bytes:
    """A JPEG with a ZIP archive appended (a JAR-style polyglot): the image part is valid."""
    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w") as zipped:
        info = zipfile.ZipInfo("payload.txt", date_time=(2020, 1, 1, 0, 0, 0))
        zipped.writestr(info, "not a picture")
    return encode(small_cat(), "JPEG", quality=85) + archive.getvalue()


def gif_js_polyglot() -> bytes:
    """A GIF that is also JavaScript: its width bytes are ``/*`` (10799 pixels), and a comment
    closer and a statement follow the trailer."""
    return gif_screen(0x2A2F, 61, trailer=b"*/=1;console.log('polyglot');")


def png_with_html() -> bytes:
    rows = b"".join(b"\x00" + b"\x80\x40\x20" * 16 for _ in range(16))
    text = b"Comment\x00<html><script>alert(1)</script></html>"
    return png(16, 16, zlib.compress(rows), png_chunk(b"tEXt", text))


def html_then_png() -> bytes:
    return b"<!doctype html><title>x</title>\n" + png_with_html()


def pdf_then_jpeg() -> bytes:
    return b"%PDF-1.4\n1 0 obj\n<<>>\nendobj\n" + encode(small_cat(), "JPEG")


def svg() -> bytes:
    return b'<svg xmlns="http://www.w3.org/2000/svg" width="9999999" height="9999999"/>'


def exif_jpeg(orientation: int, entries: int) -> bytes:
    """A JPEG with an EXIF orientation, its directory claiming ``entries`` entries."""
    entry = struct.pack(">HHIHH", 0x0112, 3, 1, orientation, 0)
    exif = b"Exif\x00\x00MM\x00*" + struct.pack(">IH", 8, entries) + entry + b"\x00" * 4
    return encode(small_cat(), "JPEG", exif=exif)


def cut(data: bytes, fraction: float) -> bytes:
    return data[: int(len(data) * fraction)]


# --- /v2 request makers ---------------------------------------------------------------------


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def infer_json(inputs: list[dict[str, Any]], **more: Any) -> bytes:
    return json.dumps({"inputs": inputs, **more}, separators=(",", ":")).encode()


def bytes_input(images: list[bytes], name: str = "image") -> dict[str, Any]:
    return {
        "name": name,
        "shape": [len(images)],
        "datatype": "BYTES",
        "data": [b64(i) for i in images],
    }


def binary_request(inputs: list[dict[str, Any]], raw: bytes, **more: Any) -> tuple[bytes, int]:
    head = infer_json(inputs, **more)
    return head + raw, len(head)


def length_prefixed(*elements: bytes) -> bytes:
    return b"".join(struct.pack("<I", len(e)) + e for e in elements)


def outputs_repeated() -> bytes:
    """128 images and the one output asked for 80 times with classification 1000: 17.7 KB that
    made a 270 MB response."""
    output = {"name": "probabilities", "parameters": {"classification": 1000}}
    return infer_json([bytes_input([gif_screen(8, 8)] * 128)], outputs=[output] * 80)


def deep_json() -> bytes:
    depth = 50_000
    return (
        b'{"inputs":[{"name":"x","shape":[1],"datatype":"BYTES","data":'
        + b"[" * depth
        + b"]" * depth
        + b"}]}"
    )


def huge_json_uint8() -> bytes:
    """A UINT8 tensor of 16 images as JSON: 2.4 million values in 4.8 MB."""
    count = 16
    values = ",".join(["0"] * (count * 224 * 224 * 3))
    head = f'{{"inputs":[{{"name":"x","shape":[{count},224,224,3],"datatype":"UINT8","data":['
    return head.encode() + values.encode() + b"]}]}"


def many_empty_json_strings() -> bytes:
    """A BYTES tensor of shape [1] whose data holds a million empty strings (3 MB)."""
    return (
        b'{"inputs":[{"name":"x","shape":[1],"datatype":"BYTES","data":['
        + b",".join([b'""'] * 1_000_000)
        + b"]}]}"
    )


def many_empty_binary_elements() -> tuple[bytes, int]:
    """20.8 MB of binary data: 5.2 million empty BYTES elements for a shape of [1]."""
    raw = b"\x00\x00\x00\x00" * 5_200_000
    size = {"binary_data_size": len(raw)}
    return binary_request(
        [{"name": "x", "shape": [1], "datatype": "BYTES", "parameters": size}], raw
    )


def classification_all_classes() -> bytes:
    output = {"name": "probabilities", "parameters": {"classification": 1000}}
    return infer_json([bytes_input([encode(small_cat(), "JPEG")] * 16)], outputs=[output])


def uint8_value_300() -> bytes:
    values = [0] * (224 * 224 * 3)
    values[1000] = 300
    return infer_json(
        [{"name": "x", "shape": [1, 224, 224, 3], "datatype": "UINT8", "data": values}]
    )


def fp32_json_nan() -> bytes:
    """JSON has no NaN, but Python's and pydantic's parsers read one."""
    values = b",0" * (3 * 224 * 224 - 1)
    return (
        b'{"inputs":[{"name":"x","shape":[1,3,224,224],"datatype":"FP32","data":[NaN'
        + values
        + b"]}]}"
    )


def fp32_binary(values: np.ndarray) -> tuple[bytes, int]:
    raw = values.astype("<f4").tobytes()
    tensor = {
        "name": "x",
        "shape": list(values.shape),
        "datatype": "FP32",
        "parameters": {"binary_data_size": len(raw)},
    }
    return binary_request([tensor], raw)


def fp32_binary_inf() -> tuple[bytes, int]:
    values = np.zeros((1, 3, 224, 224), dtype=np.float32)
    values[0, 1, 100, 100] = np.inf
    return fp32_binary(values)


def fp32_binary_nan() -> tuple[bytes, int]:
    values = np.zeros((1, 3, 224, 224), dtype=np.float32)
    values[0, 2, 7, 7] = np.nan
    return fp32_binary(values)


def fp32_binary_good() -> tuple[bytes, int]:
    return fp32_binary(np.zeros((1, 3, 224, 224), dtype=np.float32))


# --- multipart and raw HTTP makers ----------------------------------------------------------


def part(name: str, filename: str | None, data: bytes, content_type: str | None = None) -> bytes:
    disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
    head = f"--{BOUNDARY}\r\nContent-Disposition: {disposition}\r\n"
    if content_type:
        head += f"Content-Type: {content_type}\r\n"
    return head.encode() + b"\r\n" + data + b"\r\n"


def form(*parts: bytes, close: bool = True) -> bytes:
    return b"".join(parts) + (f"--{BOUNDARY}--\r\n".encode() if close else b"")


def files_form(images: list[bytes], stem: str) -> bytes:
    return form(*(part("file", f"{stem}{i}", data) for i, data in enumerate(images)))


def sixteen_big_webps() -> bytes:
    return files_form([webp_lossless(6000, 6000)] * 16, "w")


def many_screen_gifs() -> bytes:
    return files_form([gif_screen(6000, 6000)] * 128, "g")


def five_screen_gifs() -> bytes:
    return files_form([gif_screen(6000, 6000)] * 5, "g")


def over_the_queue() -> bytes:
    return files_form([gif_screen(2, 2)] * 257, "q")


def ten_thousand_file_parts() -> bytes:
    return files_form([b"x"] * 10_000, "p")


def ten_thousand_fields() -> bytes:
    return form(*(part(f"field{i}", None, b"x") for i in range(10_000)))


def animated_webp(frames: int) -> bytes:
    images = [Image.new("RGB", (8, 8), (i % 256, (i * 7) % 256, 90)) for i in range(frames)]
    return encode(
        images[0], "WEBP", save_all=True, append_images=images[1:], duration=10, lossless=True
    )


def animated_png(frames: int) -> bytes:
    images = [Image.new("RGB", (8, 8), (i % 256, (i * 7) % 256, 90)) for i in range(frames)]
    return encode(images[0], "PNG", save_all=True, append_images=images[1:], duration=10)


def multipage_tiff(pages: int) -> bytes:
    images = [Image.new("L", (8, 8), i % 256) for i in range(pages)]
    return encode(images[0], "TIFF", save_all=True, append_images=images[1:])


def thousands_of_gif_frames() -> bytes:
    return gif_frames(10_000)


def thousand_webp_frames() -> bytes:
    return animated_webp(1000)


def thousand_png_frames() -> bytes:
    return animated_png(1000)


def thousand_tiff_pages() -> bytes:
    return multipage_tiff(1000)


def head(path: str, *headers: str) -> bytes:
    lines = [f"POST {path} HTTP/1.1", "Host: corpus", *headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def length_over_the_limit() -> bytes:
    return head("/v1/predict", "Content-Type: image/jpeg", f"Content-Length: {UPLOAD_LIMIT * 5}")


def length_longer_than_the_body() -> bytes:
    """Content-Length says 50,000 bytes; 2,000 come, and then nothing."""
    body = CAT.read_bytes()[:2000]
    return head("/v1/predict", "Content-Type: image/jpeg", "Content-Length: 50000") + body


def length_shorter_than_the_body() -> bytes:
    """Content-Length says 100 bytes of a whole photograph: the server reads a cut JPEG."""
    return head("/v1/predict", "Content-Type: image/jpeg", "Content-Length: 100") + CAT.read_bytes()


def length_not_ascii() -> bytes:
    return head("/v1/predict", "Content-Type: image/jpeg", "Content-Length: ²") + b"xx"


def length_negative() -> bytes:
    return head("/v1/predict", "Content-Type: image/jpeg", "Content-Length: -1")


def length_and_chunked() -> bytes:
    return (
        head(
            "/v1/predict",
            "Content-Type: image/jpeg",
            "Content-Length: 5",
            "Transfer-Encoding: chunked",
        )
        + b"0\r\n\r\n"
    )


def chunk_size_malformed() -> bytes:
    return (
        head("/v1/predict", "Content-Type: image/jpeg", "Transfer-Encoding: chunked")
        + b"zz\r\nabc\r\n"
    )


def chunk_size_huge() -> bytes:
    """A chunk announcing 2**60 bytes, of which 10 come."""
    return (
        head("/v1/predict", "Content-Type: image/jpeg", "Transfer-Encoding: chunked")
        + b"1000000000000000\r\n0123456789"
    )


def chunked_over_the_limit() -> Iterator[bytes]:
    """21 MiB in 1 MiB chunks, without a Content-Length."""
    block = b"\x00" * (1024 * 1024)
    for _ in range(21):
        yield block


# --- the cases --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    id: str
    about: str
    status: int
    path: str = "/v1/predict"
    content_type: str | None = None
    # The body: committed bytes (written to files/<id><suffix>) or built at run time.
    data: bytes | None = None
    build: str | None = None
    suffix: str = ".bin"
    transport: str = "http"  # http, chunked or socket
    headers: dict[str, str] = field(default_factory=dict)
    # Inference-Header-Content-Length: "auto" for the builder's own, or a literal value.
    header_length: str | None = None
    code: str | None = None  # /v1 error code
    message: str | None = None  # a fragment of the error message (/v1 or /v2)
    issue: str = ""  # the finding the case pins down ("15.6": issue 15, item 6)


def v1(
    id: str, data: bytes, suffix: str, status: int, about: str, content_type: str, **more: Any
) -> Case:
    code = {400: "invalid_image", 413: "payload_too_large"}.get(status)
    return Case(
        id=id,
        about=about,
        status=status,
        data=data,
        suffix=suffix,
        content_type=content_type,
        code=more.pop("code", code),
        **more,
    )


def v2(id: str, status: int, about: str, **more: Any) -> Case:
    more.setdefault("content_type", JSON)
    return Case(id=id, about=about, status=status, path=INFER, suffix=".json", **more)


def cases() -> list[Case]:
    cat = CAT.read_bytes()
    small = small_cat()
    small_png = encode(small, "PNG")
    small_webp = encode(small, "WEBP", quality=80)
    small_gif = encode(small.convert("P"), "GIF")
    small_tiff = encode(small, "TIFF")
    small_bmp = encode(small, "BMP")
    tiny_png = encode(small_cat(16), "PNG")
    premature = jpeg_claiming(6000, 6000)
    rational = tiff_rational_strip_offsets()
    bad = "invalid_image"
    return [
        # Bombs: headers that claim more pixels than the server decodes, in every format.
        v1(
            "png-header-30000x30000",
            png(30000, 30000, zlib.compress(b"\x00" * 16)),
            ".png",
            413,
            "PNG header claiming 900 MP",
            "image/png",
        ),
        v1(
            "jpeg-header-60000x60000",
            jpeg_claiming(60000, 60000),
            ".jpg",
            413,
            "JPEG frame claiming 3.6 GP (over Pillow's own bomb limit too)",
            "image/jpeg",
        ),
        v1(
            "jpeg-header-8000x8000",
            jpeg_claiming(8000, 8000),
            ".jpg",
            413,
            "JPEG frame claiming 64 MP",
            "image/jpeg",
        ),
        v1(
            "webp-header-16383x16383",
            webp_claiming(16383, 16383),
            ".webp",
            413,
            "lossless WebP header claiming 268 MP",
            "image/webp",
        ),
        v1(
            "gif-screen-65535x65535",
            gif_screen(65535, 65535),
            ".gif",
            413,
            "GIF logical screen of 4.3 GP around a 1x1 frame",
            "image/gif",
        ),
        v1(
            "tiff-header-100000x100000",
            tiff_claiming(100000, 100000),
            ".tif",
            413,
            "TIFF IFD claiming 10 GP",
            "image/tiff",
        ),
        v1(
            "bmp-header-50000x50000",
            bmp_claiming(50000, 50000),
            ".bmp",
            413,
            "BMP header claiming 2.5 GP",
            "image/bmp",
        ),
        v1(
            "avif-ispe-10000x10000",
            avif_claiming(10000, 10000),
            ".avif",
            413,
            "AVIF whose ispe box claims 100 MP",
            "image/avif",
        ),
        v1(
            "png-ztxt-10mb",
            png_ztxt_bomb(),
            ".png",
            400,
            "zTXt chunk inflating to 10 MB (Pillow stops at 1 MB)",
            "image/png",
        ),
        v1(
            "png-iccp-10mb",
            png_iccp_bomb(),
            ".png",
            400,
            "ICC profile inflating to 10 MB",
            "image/png",
        ),
        v1(
            "png-zlib-4000x4000",
            png_zlib_bomb(),
            ".png",
            200,
            "16 MB of legitimate pixels in 16 KB of zlib",
            "image/png",
        ),
        v1(
            "gif-screen-6000x6000",
            gif_screen(6000, 6000),
            ".gif",
            200,
            "35 bytes that legitimately decode to 36 MP",
            "image/gif",
            issue="15.6",
        ),
        v1(
            "webp-lossless-6000x6000",
            webp_lossless(6000, 6000),
            ".webp",
            200,
            "a one-colour lossless WebP: 36 MP in 40 bytes",
            "image/webp",
            issue="15.6",
        ),
        # Per-request cost: many cheap-to-send, costly-to-decode images in one request.
        Case(
            "sixteen-36mp-webps",
            "16 WebPs of 36 MP in one request: 22.6 s and 1.4 GB before",
            413,
            content_type=MULTIPART,
            build="sixteen_big_webps",
            code="payload_too_large",
            message="pixels together",
            issue="15.6",
        ),
        Case(
            "128-36mp-gifs",
            "128 GIFs of 36 MP in one request",
            413,
            content_type=MULTIPART,
            build="many_screen_gifs",
            code="payload_too_large",
            message="pixels together",
            issue="15.6",
        ),
        Case(
            "five-36mp-gifs",
            "5 GIFs of 36 MP: 180 MP, within the request's budget",
            200,
            content_type=MULTIPART,
            build="five_screen_gifs",
            issue="15.6",
        ),
        Case(
            "257-images",
            "one image more than the queue can ever hold",
            413,
            content_type=MULTIPART,
            build="over_the_queue",
            code="payload_too_large",
        ),
        # Truncations.
        v1(
            "jpeg-premature-end-6000x6000",
            premature,
            ".jpg",
            400,
            "633-byte JPEG declaring 6000x6000 with an early end marker: decoded to grey before",
            "image/jpeg",
            message="truncated",
            issue="15.6",
        ),
        v1(
            "jpeg-cut-half",
            cut(cat, 0.5),
            ".jpg",
            400,
            "the cat photograph cut in half",
            "image/jpeg",
        ),
        v1(
            "jpeg-cut-header",
            cat[:300],
            ".jpg",
            400,
            "the cat photograph cut inside its headers",
            "image/jpeg",
        ),
        v1("png-cut-half", cut(small_png, 0.5), ".png", 400, "a PNG cut in half", "image/png"),
        v1("webp-cut-half", cut(small_webp, 0.5), ".webp", 400, "a WebP cut in half", "image/webp"),
        v1(
            "gif-cut-header",
            small_gif[:20],
            ".gif",
            400,
            "a GIF cut inside its palette",
            "image/gif",
        ),
        v1("tiff-cut-half", cut(small_tiff, 0.5), ".tif", 400, "a TIFF cut in half", "image/tiff"),
        v1("bmp-cut-half", cut(small_bmp, 0.5), ".bmp", 400, "a BMP cut in half", "image/bmp"),
        v1(
            "bmp-rle-3000x3000-short",
            bmp_rle_short(),
            ".bmp",
            400,
            "an RLE8 BMP declaring 3000x3000 with one run of data",
            "image/bmp",
        ),
        v1("empty", b"", ".bin", 400, "an empty body", "image/jpeg"),
        v1(
            "magic-only-jpeg",
            b"\xff\xd8\xff",
            ".jpg",
            400,
            "a JPEG signature and nothing else",
            "image/jpeg",
        ),
        # Formats and fields Pillow handles badly or evalserve refuses.
        v1(
            "tiff-rational-strip-offsets",
            rational,
            ".tif",
            400,
            "StripOffsets typed RATIONAL: a TypeError and a 500 before",
            "image/tiff",
            issue="15.6",
        ),
        v1(
            "tiff-float-0-1",
            float_tiff(),
            ".tif",
            200,
            "float32 TIFF in 0..1: black before, now scaled to 0..255",
            "image/tiff",
            issue="15.6",
        ),
        v1(
            "tiff-float-nan",
            float_tiff_nan(),
            ".tif",
            400,
            "float32 TIFF holding NaN",
            "image/tiff",
            message="NaN",
            issue="15.6",
        ),
        v1(
            "tiff-int32-negative",
            int32_tiff(),
            ".tif",
            200,
            "int32 TIFF with negative values: they wrapped to white before, now black",
            "image/tiff",
            issue="15.6",
        ),
        v1(
            "tiff-ifd-loop",
            tiff_ifd_loop(),
            ".tif",
            200,
            "a TIFF whose next IFD is itself (the first page is served)",
            "image/tiff",
        ),
        v1("png-16-bit", png16(), ".png", 200, "16-bit grayscale PNG", "image/png"),
        v1(
            "jpeg-exif-orientation-9",
            exif_jpeg(9, 1),
            ".jpg",
            200,
            "EXIF orientation 9 (no such orientation)",
            "image/jpeg",
        ),
        v1(
            "jpeg-exif-lying-count",
            exif_jpeg(6, 60000),
            ".jpg",
            200,
            "EXIF directory claiming 60000 entries, holding 1",
            "image/jpeg",
        ),
        v1(
            "psd",
            psd_header(),
            ".psd",
            400,
            "Photoshop: Pillow opens it, evalserve does not",
            "application/octet-stream",
        ),
        v1(
            "ico",
            ico(),
            ".ico",
            400,
            "a Windows icon: Pillow opens it, evalserve does not",
            "application/octet-stream",
        ),
        v1("svg", svg(), ".svg", 400, "SVG claiming 9999999x9999999", "application/octet-stream"),
        # Polyglots.
        v1(
            "jpeg-plus-zip",
            jpeg_with_zip(),
            ".jpg",
            200,
            "a JPEG with a ZIP archive appended",
            "image/jpeg",
        ),
        v1(
            "gif-javascript",
            gif_js_polyglot(),
            ".gif",
            200,
            "a GIF that is also JavaScript (its width is '/*')",
            "image/gif",
        ),
        v1(
            "png-html-text",
            png_with_html(),
            ".png",
            200,
            "a PNG carrying HTML in a tEXt chunk",
            "image/png",
        ),
        v1(
            "html-then-png",
            html_then_png(),
            ".html",
            400,
            "an HTML page with a PNG after it",
            "image/png",
        ),
        v1(
            "pdf-then-jpeg",
            pdf_then_jpeg(),
            ".pdf",
            400,
            "a PDF header with a JPEG after it",
            "image/jpeg",
        ),
        v1(
            "png-as-jpeg",
            small_png,
            ".png",
            200,
            "a PNG sent as image/jpeg (the content decides)",
            "image/jpeg",
        ),
        # Animated images with thousands of frames: the first is served, the rest never read.
        Case(
            "gif-10000-frames",
            "an animated GIF of 10,000 frames",
            200,
            content_type="image/gif",
            build="thousands_of_gif_frames",
        ),
        Case(
            "webp-1000-frames",
            "an animated WebP of 1,000 frames",
            200,
            content_type="image/webp",
            build="thousand_webp_frames",
        ),
        Case(
            "apng-1000-frames",
            "an animated PNG of 1,000 frames",
            200,
            content_type="image/png",
            build="thousand_png_frames",
        ),
        Case(
            "tiff-1000-pages",
            "a TIFF of 1,000 pages",
            200,
            content_type="image/tiff",
            build="thousand_tiff_pages",
        ),
        # Multipart.
        Case(
            "multipart-premature-jpeg",
            "the premature-end JPEG as a form file",
            400,
            content_type=MULTIPART,
            data=form(part("file", "premature.jpg", premature)),
            suffix=".form",
            code=bad,
            message="premature.jpg",
        ),
        Case(
            "multipart-10000-file-parts",
            "10,000 file parts: the parser stops at the queue's size",
            413,
            content_type=MULTIPART,
            build="ten_thousand_file_parts",
            code="payload_too_large",
        ),
        Case(
            "multipart-10000-fields",
            "10,000 text fields",
            400,
            content_type=MULTIPART,
            build="ten_thousand_fields",
            code="bad_request",
        ),
        Case(
            "multipart-no-boundary",
            "multipart without a boundary",
            400,
            content_type="multipart/form-data",
            data=form(part("file", "a.jpg", b"x")),
            suffix=".form",
            code="bad_request",
        ),
        Case(
            "multipart-unterminated",
            "a form whose closing boundary never comes",
            400,
            content_type=MULTIPART,
            data=form(part("file", "a.jpg", encode(small, "JPEG")), close=False),
            suffix=".form",
        ),
        Case(
            "multipart-text-file-field",
            "the file field sent as text",
            400,
            content_type=MULTIPART,
            data=form(part("file", None, b"hello")),
            suffix=".form",
            code="bad_request",
        ),
        Case(
            "multipart-no-file-field",
            "a form without a file field",
            400,
            content_type=MULTIPART,
            data=form(part("photo", "a.jpg", encode(small, "JPEG"))),
            suffix=".form",
            code="bad_request",
        ),
        Case(
            "multipart-hostile-filename",
            "a file name with ../ and a quote",
            200,
            content_type=MULTIPART,
            data=form(
                part("file", '../../etc/passwd\\"x.jpg', encode(small, "JPEG"), "image/jpeg")
            ),
            suffix=".form",
        ),
        # The HTTP layer: lying lengths, malformed heads, chunked bodies.
        Case(
            "content-length-over-the-limit",
            "Content-Length of 100 MB and no body: refused before reading",
            413,
            transport="socket",
            build="length_over_the_limit",
            code="payload_too_large",
        ),
        Case(
            "content-length-longer-than-body",
            "Content-Length 50000, 2000 bytes sent, then silence",
            408,
            transport="socket",
            build="length_longer_than_the_body",
            code="request_timeout",
        ),
        Case(
            "content-length-shorter-than-body",
            "Content-Length 100 before a whole photograph",
            400,
            transport="socket",
            build="length_shorter_than_the_body",
            code="invalid_image",
        ),
        Case(
            "content-length-superscript-two",
            "Content-Length '²' (isdigit() is true)",
            400,
            transport="socket",
            build="length_not_ascii",
        ),
        Case(
            "content-length-negative",
            "Content-Length -1",
            400,
            transport="socket",
            build="length_negative",
        ),
        Case(
            "content-length-and-chunked",
            "Content-Length and Transfer-Encoding: chunked together",
            400,
            transport="socket",
            build="length_and_chunked",
        ),
        Case(
            "chunk-size-malformed",
            "a chunk size that is not hexadecimal",
            400,
            transport="socket",
            build="chunk_size_malformed",
        ),
        Case(
            "chunk-size-huge",
            "a chunk announcing 2**60 bytes, of which 10 come",
            408,
            transport="socket",
            build="chunk_size_huge",
            code="request_timeout",
        ),
        Case(
            "chunked-over-the-limit",
            "21 MiB chunked, no Content-Length",
            413,
            content_type="image/jpeg",
            transport="chunked",
            build="chunked_over_the_limit",
            code="payload_too_large",
        ),
        # /v2: parsing costs, shapes that do not match their data, NaN and infinity.
        v2(
            "v2-outputs-80-times",
            400,
            "128 images, the output asked 80 times with classification 1000: 270 MB in 27.8 s",
            data=outputs_repeated(),
            message="more than once",
            issue="15.6",
        ),
        v2(
            "v2-outputs-twice",
            400,
            "the output asked for twice",
            data=infer_json([bytes_input([tiny_png])], outputs=[{"name": "probabilities"}] * 2),
            message="more than once",
            issue="15.6",
        ),
        v2(
            "v2-classification-all-16",
            200,
            "16 images, classification 1000 once: 16,000 strings, built off the event loop",
            build="classification_all_classes",
        ),
        v2(
            "v2-deeply-nested",
            400,
            "data nested 50,000 lists deep",
            build="deep_json",
            message="recursion limit",
        ),
        v2(
            "v2-json-2.4m-values",
            413,
            "a UINT8 tensor as 2.4 million JSON numbers: parsing alone held the event loop",
            build="huge_json_uint8",
            message="binary",
            issue="15.6",
        ),
        v2(
            "v2-json-million-empty-strings",
            400,
            "shape [1], a million empty strings",
            build="many_empty_json_strings",
            message="shape says 1 images",
        ),
        v2(
            "v2-binary-5.2m-empty-elements",
            400,
            "20.8 MB of empty BYTES elements for shape [1]: 3.1 s on the event loop before",
            build="many_empty_binary_elements",
            header_length="auto",
            content_type="application/octet-stream",
            message="more than 1 BYTES elements",
            issue="15.6",
        ),
        v2(
            "v2-header-length-superscript",
            400,
            "Inference-Header-Content-Length '²': a 500 before",
            data=infer_json([bytes_input([tiny_png])]),
            header_length="²",
            message="Inference-Header-Content-Length",
            issue="15.6",
        ),
        v2(
            "v2-header-length-negative",
            400,
            "Inference-Header-Content-Length -5",
            data=infer_json([bytes_input([tiny_png])]),
            header_length="-5",
            message="Inference-Header-Content-Length",
        ),
        v2(
            "v2-header-length-past-the-body",
            400,
            "Inference-Header-Content-Length past the end of the body",
            data=infer_json([bytes_input([tiny_png])]),
            header_length="999999",
            message="Inference-Header-Content-Length",
        ),
        v2(
            "v2-binary-size-mismatch",
            400,
            "binary_data_size unlike the binary data",
            data=infer_json(
                [
                    {
                        "name": "x",
                        "shape": [1],
                        "datatype": "BYTES",
                        "parameters": {"binary_data_size": 50},
                    }
                ]
            )
            + length_prefixed(b"abc"),
            header_length=str(
                len(
                    infer_json(
                        [
                            {
                                "name": "x",
                                "shape": [1],
                                "datatype": "BYTES",
                                "parameters": {"binary_data_size": 50},
                            }
                        ]
                    )
                )
            ),
            content_type="application/octet-stream",
            message="binary_data_size",
        ),
        v2(
            "v2-shape-says-2-data-1",
            400,
            "BYTES shape [2], one image",
            data=infer_json(
                [{"name": "x", "shape": [2], "datatype": "BYTES", "data": [b64(tiny_png)]}]
            ),
            message="shape says 2 images",
        ),
        v2(
            "v2-uint8-too-few-values",
            400,
            "UINT8 [1, 224, 224, 3] with 10 values",
            data=infer_json(
                [{"name": "x", "shape": [1, 224, 224, 3], "datatype": "UINT8", "data": [0] * 10}]
            ),
            message="does not hold",
        ),
        v2(
            "v2-uint8-value-300",
            400,
            "UINT8 holding 300",
            build="uint8_value_300",
            message="does not hold",
        ),
        v2(
            "v2-fp32-wrong-layout",
            400,
            "FP32 sent channels last",
            data=infer_json(
                [{"name": "x", "shape": [1, 224, 224, 3], "datatype": "FP32", "data": [0.0]}]
            ),
            message="shape must be",
        ),
        v2(
            "v2-shape-negative",
            400,
            "a negative dimension",
            data=infer_json([{"name": "x", "shape": [-1], "datatype": "BYTES", "data": []}]),
            message="batch size",
        ),
        v2(
            "v2-shape-billion",
            413,
            "shape [1000000000]: more images than the queue holds",
            data=infer_json(
                [{"name": "x", "shape": [1_000_000_000], "datatype": "BYTES", "data": []}]
            ),
            message="queue",
        ),
        v2(
            "v2-fp32-nan-json",
            400,
            "FP32 JSON holding NaN",
            build="fp32_json_nan",
            message="finite",
        ),
        v2(
            "v2-fp32-inf-binary",
            400,
            "FP32 binary holding infinity",
            build="fp32_binary_inf",
            header_length="auto",
            content_type="application/octet-stream",
            message="finite",
        ),
        v2(
            "v2-fp32-nan-binary",
            400,
            "FP32 binary holding NaN",
            build="fp32_binary_nan",
            header_length="auto",
            content_type="application/octet-stream",
            message="finite",
        ),
        v2(
            "v2-fp32-zeros-binary",
            200,
            "FP32 binary zeros: a well-formed tensor",
            build="fp32_binary_good",
            header_length="auto",
            content_type="application/octet-stream",
        ),
        v2(
            "v2-two-inputs",
            400,
            "two input tensors",
            data=infer_json([bytes_input([tiny_png]), bytes_input([tiny_png], "other")]),
            message="exactly one input",
        ),
        v2(
            "v2-unknown-output",
            400,
            "an output the model does not have",
            data=infer_json([bytes_input([tiny_png])], outputs=[{"name": "logits"}]),
            message="unknown output",
        ),
        v2(
            "v2-classification-zero",
            400,
            "classification 0",
            data=infer_json(
                [bytes_input([tiny_png])],
                outputs=[{"name": "probabilities", "parameters": {"classification": 0}}],
            ),
            message="classification",
        ),
        v2(
            "v2-classification-string",
            400,
            "classification '5'",
            data=infer_json(
                [bytes_input([tiny_png])],
                outputs=[{"name": "probabilities", "parameters": {"classification": "5"}}],
            ),
            message="classification",
        ),
        v2(
            "v2-not-json",
            400,
            "a body that is not JSON",
            data=b"\x00\x01 not json {",
            message="invalid inference request",
        ),
        v2(
            "v2-json-null",
            400,
            "the JSON value null",
            data=b"null",
            message="invalid inference request",
        ),
        v2("v2-empty", 400, "an empty body", data=b"", message="invalid inference request"),
        v2(
            "v2-premature-jpeg",
            400,
            "the premature-end JPEG as a BYTES element",
            data=infer_json([bytes_input([premature])]),
            message="truncated",
            issue="15.6",
        ),
        v2(
            "v2-rational-tiff",
            400,
            "the RATIONAL StripOffsets TIFF as a BYTES element: a 500 in the /v1 shape before",
            data=infer_json([bytes_input([rational])]),
            message="corrupt",
            issue="15.6",
        ),
        v2(
            "v2-not-base64",
            400,
            "BYTES data that is not base64",
            data=infer_json([{"name": "x", "shape": [1], "datatype": "BYTES", "data": ["%%%"]}]),
            message="base64",
        ),
    ]


# The requests built at run time, by the name the manifest gives.
BUILDERS: dict[str, Callable[[], Any]] = {
    function.__name__: function
    for function in (
        sixteen_big_webps,
        many_screen_gifs,
        five_screen_gifs,
        over_the_queue,
        thousands_of_gif_frames,
        thousand_webp_frames,
        thousand_png_frames,
        thousand_tiff_pages,
        ten_thousand_file_parts,
        ten_thousand_fields,
        length_over_the_limit,
        length_longer_than_the_body,
        length_shorter_than_the_body,
        length_not_ascii,
        length_negative,
        length_and_chunked,
        chunk_size_malformed,
        chunk_size_huge,
        chunked_over_the_limit,
        classification_all_classes,
        deep_json,
        huge_json_uint8,
        many_empty_json_strings,
        many_empty_binary_elements,
        fp32_binary_inf,
        fp32_binary_nan,
        fp32_binary_good,
        uint8_value_300,
        fp32_json_nan,
    )
}


def entry(case: Case) -> dict[str, Any]:
    """The manifest's record of a case."""
    record: dict[str, Any] = {
        "id": case.id,
        "about": case.about,
        "path": case.path,
        "transport": case.transport,
        "status": case.status,
    }
    if case.data is not None:
        name = f"{case.id}{case.suffix}"
        record["file"] = f"files/{name}"
        record["sha256"] = hashlib.sha256(case.data).hexdigest()
    else:
        assert case.build in BUILDERS, case.id
        record["build"] = case.build
    for key in ("content_type", "header_length", "code", "message", "issue"):
        value = getattr(case, key)
        if value:
            record[key] = value
    return record


def main(argv: list[str]) -> int:
    """Write the files and the manifest; with ``--check``, only say whether they are current."""
    check = "--check" in argv
    all_cases = cases()
    ids = [case.id for case in all_cases]
    assert len(ids) == len(set(ids)), "duplicate case ids"
    manifest = json.dumps([entry(case) for case in all_cases], indent=1) + "\n"
    if check:
        current = MANIFEST.exists() and MANIFEST.read_text() == manifest
        print("manifest current" if current else "manifest out of date")
        return 0 if current else 1
    FILES.mkdir(exist_ok=True)
    for stale in FILES.iterdir():
        stale.unlink()
    for case in all_cases:
        if case.data is not None:
            (FILES / f"{case.id}{case.suffix}").write_bytes(case.data)
    MANIFEST.write_text(manifest)
    size = sum(path.stat().st_size for path in FILES.iterdir())
    print(f"{len(all_cases)} cases, {len(list(FILES.iterdir()))} files ({size} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
