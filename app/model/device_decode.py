"""JPEGs decoded on the model's device, a batch at a time, then turned upright, resized and
center-cropped there with the CPU path's geometry (``ImageTransform.geometry``).

On CUDA the whole batch goes to nvJPEG in one call (torchvision's batched decoder). An image it
refuses is tried again alone, and one that fails alone too is decoded on the CPU by the normal
path (``app.preprocessing.load_image``), so a refusal costs that image time, never its answer;
an image the CPU path refuses as well fails alone, with the CPU path's error. On the CPU the
same code runs with libjpeg (the tests use it so; serving never does).

The result is not pixel-identical to the CPU path: the two decoders' IDCTs differ, and the
resize here is torchvision's antialiased tensor resize rather than Pillow's. ``evalserve
agreement --device-decode`` reports the top-1 agreement of the two paths.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import torch
import torchvision.io  # noqa: F401 (registers torch.ops.image)
from torchvision.io import ImageReadMode
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as tvf

from app.preprocessing import ImageError, ImageTransform, device_decodes, load_image
from app.values import EncodedImage

logger = logging.getLogger("evalserve.decode")

_INTERPOLATION = {
    "bilinear": InterpolationMode.BILINEAR,
    "bicubic": InterpolationMode.BICUBIC,
}


def upright(image: torch.Tensor, orientation: int) -> torch.Tensor:
    """A (C, H, W) image turned as its EXIF ``orientation`` says, as Pillow's
    ``ImageOps.exif_transpose`` turns it (1 upright, 2-8 flipped and/or rotated)."""
    if orientation == 2:
        return image.flip(-1)
    if orientation == 3:
        return image.flip(-1, -2)
    if orientation == 4:
        return image.flip(-2)
    if orientation == 5:
        return image.transpose(-1, -2)
    if orientation == 6:
        return torch.rot90(image, -1, (-2, -1))
    if orientation == 7:
        return image.flip(-1, -2).transpose(-1, -2)
    if orientation == 8:
        return torch.rot90(image, 1, (-2, -1))
    return image


class DeviceDecoder:
    """Decodes a batch's ``EncodedImage``s on ``device`` into the model's uint8 input."""

    def __init__(self, device: torch.device, transform: ImageTransform, max_pixels: int) -> None:
        if not device_decodes(transform):
            raise ValueError("the device decodes RGB models resized bilinear or bicubic only")
        self.device = device
        self.transform = transform
        self.max_pixels = max_pixels
        self._interpolation = _INTERPOLATION[transform.resample.name.lower()]
        # Running totals: images decoded on the device, and those that fell back to the CPU.
        self.decoded = 0
        self.fell_back = 0

    def __call__(self, images: Sequence[EncodedImage]) -> list[torch.Tensor | ImageError]:
        """Each image as a uint8 (C, crop, crop) tensor on the device, or the error that
        refuses it (the CPU path's: the image is corrupt)."""
        out: list[torch.Tensor | ImageError | None] = [None] * len(images)
        # Decoded upright images waiting to be resized, by (width, height): a batch of
        # same-sized photos resizes in one call.
        by_size: dict[tuple[int, int], list[tuple[int, torch.Tensor]]] = {}
        for index, (image, pixels) in enumerate(zip(images, self._decode(images), strict=True)):
            upright_pixels = None if pixels is None else self._upright(pixels, image)
            if upright_pixels is None:
                out[index] = self._on_cpu(image)
            else:
                size = (upright_pixels.shape[-1], upright_pixels.shape[-2])
                by_size.setdefault(size, []).append((index, upright_pixels))
        crop = self.transform.crop
        for (width, height), members in by_size.items():
            stacked = torch.stack([pixels for _, pixels in members])
            (new_width, new_height), (left, top) = self.transform.geometry((width, height))
            if (new_width, new_height) != (width, height):
                stacked = tvf.resize(
                    stacked, [new_height, new_width], self._interpolation, antialias=True
                )
            cropped = _crop(stacked, left, top, crop)
            for row, (index, _) in enumerate(members):
                out[index] = cropped[row]
        return [pixels for pixels in out if pixels is not None]

    def _decode(self, images: Sequence[EncodedImage]) -> list[torch.Tensor | None]:
        """Each image decoded at its stored size on the device; None where the decoder refused
        it (the whole batch first, then one at a time)."""
        encoded = [
            torch.from_numpy(np.frombuffer(image.data, dtype=np.uint8).copy()) for image in images
        ]
        try:
            return list(self._decode_many(encoded))
        except RuntimeError as exc:
            if len(images) == 1:
                logger.info(
                    "the device refused %s (%s); decoding it on the CPU",
                    images[0].name,
                    _brief(exc),
                )
                return [None]
            logger.info(
                "the device refused a batch of %d JPEGs (%s); one at a time",
                len(images),
                _brief(exc),
            )
        results: list[torch.Tensor | None] = []
        for image, data in zip(images, encoded, strict=True):
            try:
                results.append(self._decode_many([data])[0])
            except RuntimeError as exc:
                logger.info(
                    "the device refused %s (%s); decoding it on the CPU", image.name, _brief(exc)
                )
                results.append(None)
        return results

    def _decode_many(self, encoded: list[torch.Tensor]) -> list[torch.Tensor]:
        # The registered ops rather than torchvision.io.decode_jpeg, which since torchvision
        # 0.29 warns on every call that TorchCodec succeeds it (not a dependency of ours).
        if self.device.type == "cuda":
            decoded: list[torch.Tensor] = torch.ops.image.decode_jpegs_cuda(
                encoded, ImageReadMode.RGB.value, self.device
            )
            return decoded
        return [
            torch.ops.image.decode_jpeg(data, ImageReadMode.RGB.value, False) for data in encoded
        ]

    def _upright(self, pixels: torch.Tensor, image: EncodedImage) -> torch.Tensor | None:
        """The decoded image upright, or None when it is not the size its header declared."""
        width, height = image.size
        if pixels.shape != (3, height, width):
            logger.info(
                "the device decoded %s as %s, not 3x%dx%d; decoding it on the CPU",
                image.name,
                tuple(pixels.shape),
                height,
                width,
            )
            return None
        self.decoded += 1
        return upright(pixels, image.orientation)

    def _on_cpu(self, image: EncodedImage) -> torch.Tensor | ImageError:
        """The CPU path's input for ``image`` (already resized and cropped), or its error."""
        self.fell_back += 1
        try:
            array = load_image(image.data, image.name, self.max_pixels, self.transform)
        except ImageError as exc:
            return exc
        return torch.from_numpy(array.copy()).permute(2, 0, 1).to(self.device)


def _crop(images: torch.Tensor, left: int, top: int, size: int) -> torch.Tensor:
    """(B, C, size, size) from (B, C, H, W) starting at (left, top), zeros where the box
    leaves the images (as Pillow's crop and torchvision's CenterCrop pad)."""
    batch, channels, height, width = images.shape
    if left >= 0 and top >= 0 and left + size <= width and top + size <= height:
        return images[:, :, top : top + size, left : left + size]
    out = images.new_zeros((batch, channels, size, size))
    x0, y0 = max(left, 0), max(top, 0)
    x1, y1 = min(left + size, width), min(top + size, height)
    if x1 > x0 and y1 > y0:
        out[:, :, y0 - top : y1 - top, x0 - left : x1 - left] = images[:, :, y0:y1, x0:x1]
    return out


def _brief(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:200]
