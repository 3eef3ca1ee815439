"""Decoding image files: the one reader every command uses (validation, ``gara corrupt``,
training, evaluation, ``gara predict`` and the served model, the demo), so no two stages
ever see different pixels for the same file.

The rules, in order:

1. **Pixel limit, before decoding.** The header's size is checked against ``MAX_IMAGE_PIXELS``
   first: a 1 MB PNG can declare 30000 x 30000 pixels and exhaust the machine on decode.
2. **Orientation.** An EXIF orientation is applied: the image is used as viewers and
   annotation tools display it (and as detectron2 reads it), so a dataset's ``width`` /
   ``height`` and its masks are those of the displayed image, and a predicted mask comes
   back in that orientation too.
3. **Modes.** Everything becomes RGB uint8. 16-bit greyscale keeps its high byte (as Pillow
   does for 16-bit colour and OpenCV for both), palettes, greyscale and CMYK are converted,
   an alpha channel is dropped (not composited), as OpenCV's colour read does. A float image
   has no agreed 8-bit scale and is refused, naming the fix.
4. **Completeness.** Truncated data is an error, not a half-grey image (Pillow's ``load``
   catches truncated pixel data; a PNG cut inside its final IEND chunk is checked here).
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

# 50 megapixels (e.g. 8660 x 5773): a 48 MP phone photo passes; a corruption of a larger one
# costs several GB per worker. Pillow's own bomb check (179 MP) comes after ours.
MAX_IMAGE_PIXELS = 50_000_000
_EXIF_ORIENTATION = 0x0112
_TRANSPOSED = (5, 6, 7, 8)  # orientations that swap width and height
_PNG_IEND = b"IEND"
_SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")
# Pillow warns from 89 MP; every such image is over our limit and refused with a clear error.
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)


class ImageReadError(OSError):
    """An image file cannot be used: unreadable, truncated, too large or of an unknown scale."""


def _open(data: bytes, where: str, max_pixels: int) -> Image.Image:
    if not data:
        raise ImageReadError(f"{where}: the file is empty")
    try:
        return Image.open(io.BytesIO(data))
    except Image.DecompressionBombError:
        raise ImageReadError(f"{where}: over the limit of {max_pixels:,} pixels; "
                             "downscale it first") from None
    except UnidentifiedImageError:
        raise ImageReadError(f"{where}: not a readable image (unknown format or damaged header)") from None
    except Exception as exc:  # Pillow raises assorted types on junk headers
        raise ImageReadError(f"{where}: not a readable image ({exc})") from None


def _orientation(img: Image.Image) -> int:
    """The EXIF orientation, from the header: Pillow's ``getexif`` would decode a whole PNG to
    look for an eXIf chunk after its pixels, so a PNG's EXIF counts only when it comes first
    (as every writer we know puts it), the same for the header and the decode."""
    if img.format == "PNG" and "exif" not in img.info:
        return 1
    try:
        return int(img.getexif().get(_EXIF_ORIENTATION, 1))
    except Exception:  # a damaged EXIF block: the stored orientation is all there is
        return 1


def _check_pixels(size: tuple[int, int], where: str, max_pixels: int) -> None:
    width, height = size
    if width * height > max_pixels:
        raise ImageReadError(f"{where}: {width}x{height} is over the limit of {max_pixels:,} pixels; "
                             "downscale it first")


def displayed_size(path: str | Path, max_pixels: int = MAX_IMAGE_PIXELS) -> tuple[int, int]:
    """(width, height) of the image file as displayed (EXIF orientation applied), from its
    header; over the pixel limit or unreadable: :class:`ImageReadError`."""
    return header_size(_read(path), str(path), max_pixels)


def header_size(data: bytes, where: str, max_pixels: int = MAX_IMAGE_PIXELS) -> tuple[int, int]:
    """:func:`displayed_size` of encoded image bytes."""
    with _open(data, where, max_pixels) as img:
        _check_pixels(img.size, where, max_pixels)
        width, height = img.size
        return (height, width) if _orientation(img) in _TRANSPOSED else (width, height)


def decode_image(data: bytes, where: str, max_pixels: int = MAX_IMAGE_PIXELS) -> np.ndarray:
    """Encoded image bytes -> RGB uint8 (H, W, 3), upright, by the module's rules; ``where``
    names the source in every error (:class:`ImageReadError`)."""
    with _open(data, where, max_pixels) as img:
        _check_pixels(img.size, where, max_pixels)
        orientation = _orientation(img)
        try:
            img.load()
            if img.format == "PNG" and not _png_complete(data):
                raise ImageReadError(f"{where}: truncated PNG file (no complete IEND chunk)")
            upright = ImageOps.exif_transpose(img) if orientation != 1 else img
            return _to_rgb(upright, where)
        except ImageReadError:
            raise
        except Exception as exc:  # OSError for truncation, SyntaxError/ValueError for corrupt data
            raise ImageReadError(f"{where}: cannot decode ({exc})") from None


def read_image(path: str | Path, max_pixels: int = MAX_IMAGE_PIXELS) -> np.ndarray:
    """An image file -> RGB uint8 (H, W, 3), by :func:`decode_image`."""
    return decode_image(_read(path), str(path), max_pixels)


def _read(path: str | Path) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise ImageReadError(f"{path}: cannot read ({exc.strerror})") from None


def _to_rgb(img: Image.Image, where: str) -> np.ndarray:
    if img.mode in _SIXTEEN_BIT_MODES:
        values = np.asarray(img)
        if values.size and (values.min() < 0 or values.max() > 0xFFFF):
            raise ImageReadError(f"{where}: {img.mode} pixels outside 0..65535; save it as 8 or 16 bit")
        grey = (values.astype(np.uint32) >> 8).astype(np.uint8)
        return np.ascontiguousarray(np.repeat(grey[..., None], 3, axis=2))
    if img.mode == "F":
        raise ImageReadError(f"{where}: floating-point pixels have no agreed 8-bit scale; "
                             "save it as an 8- or 16-bit image")
    return np.ascontiguousarray(np.asarray(img.convert("RGB"), dtype=np.uint8))


def _png_complete(data: bytes) -> bool:
    """Whether the PNG's final IEND chunk (type + CRC) is complete."""
    end = data.rfind(_PNG_IEND, max(0, len(data) - 4096))
    return end >= 0 and len(data) >= end + len(_PNG_IEND) + 4
