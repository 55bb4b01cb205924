"""Images from users: size checked from the header before any pixel is decoded, then converted to plain RGB.

Why a cap from the header: a 1 KB PNG can declare 196 Mpx (a decompression bomb) and a genuine 10,000 x 10,000
photo costs 15 s and 2.3 GB to decode, while every supported processor shrinks its input to at most a few Mpx.
The default cap, 36 Mpx, admits an 8K UHD frame (7680 x 4320 = 33.2 Mpx) and any common camera photo up to
6000 x 6000, and bounds the decoded RGB buffer at ~108 MB. Set VLMREL_MAX_IMAGE_PIXELS or pass ``max_pixels``.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from vlmrel_core.validation.errors import InputError, int_setting

DEFAULT_MAX_PIXELS = 36_000_000
MAX_FILE_BYTES = 64 * 1024 * 1024
MIN_SIDE = 4  # below this no processor resize shows anything (a 1 x 1 image is one colour)
MAX_ASPECT = 50.0  # a 1 x 5000 strip squashed to a square is noise; Qwen2-VL's own processor refuses > 200
FORMATS = ("PNG", "JPEG", "GIF", "BMP", "WEBP", "TIFF")


@dataclass(frozen=True)
class ValidatedImage:
    """An RGB image that passed every check, with what was done to it (e.g. 'first of 12 frames used')."""

    image: Image.Image
    notes: tuple[str, ...] = field(default_factory=tuple)


def max_pixels_setting() -> int:
    """The pixel cap: VLMREL_MAX_IMAGE_PIXELS when set (a positive integer), else the default."""
    return int_setting("VLMREL_MAX_IMAGE_PIXELS", DEFAULT_MAX_PIXELS)


def check_image_header(source: str | Path | bytes, name: str | None = None, max_pixels: int | None = None) -> tuple[int, int]:
    """(width, height) read from the header only; refuses non-images, unsupported formats and oversized images."""
    with _open(source, name) as (image, label):
        _check_geometry(image, label, max_pixels)
        return image.size


def load_image(source: str | Path | bytes | Image.Image, name: str | None = None, max_pixels: int | None = None) -> ValidatedImage:
    """Validate and decode an image (path, bytes or PIL image) into RGB; `InputError` says why one is refused."""
    if isinstance(source, Image.Image):
        label = name or "image"
        _check_geometry(source, label, max_pixels)
        return _to_rgb(source, label, [])
    with _open(source, name) as (image, label):
        _check_geometry(image, label, max_pixels)
        notes: list[str] = []
        n_frames = int(getattr(image, "n_frames", 1) or 1)
        if n_frames > 1:
            image.seek(0)
            notes.append(f"{label} has {n_frames} frames; the first frame is used")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                image.load()
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
            raise InputError(f"{label}: refused as a decompression bomb ({err})") from None
        except (OSError, SyntaxError, ValueError) as err:
            raise InputError(f"{label}: damaged or truncated image ({err})") from None
        return _to_rgb(image, label, notes)


class _open:
    """Context manager: PIL image opened lazily (header only) with bombs and non-images turned into InputError."""

    def __init__(self, source: str | Path | bytes, name: str | None) -> None:
        self.source, self.name = source, name
        self.image: Image.Image | None = None

    def __enter__(self) -> tuple[Image.Image, str]:
        source = self.source
        if isinstance(source, (bytes, bytearray)):
            label = self.name or "uploaded image"
            if len(source) > MAX_FILE_BYTES:
                raise InputError(f"{label}: {len(source):,} bytes is over the {MAX_FILE_BYTES:,}-byte limit")
            handle = io.BytesIO(source)
        else:
            path = Path(source)
            label = self.name or str(path)
            if not path.is_file():
                raise InputError(f"image not found: {path}")
            if path.stat().st_size > MAX_FILE_BYTES:
                raise InputError(f"{label}: {path.stat().st_size:,} bytes is over the {MAX_FILE_BYTES:,}-byte limit")
            handle = path
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                self.image = Image.open(handle)
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
            raise InputError(f"{label}: refused as a decompression bomb ({err})") from None
        except UnidentifiedImageError:
            raise InputError(f"{label}: not an image vlmrel can read (expected {', '.join(FORMATS)})") from None
        except (OSError, SyntaxError, ValueError) as err:
            raise InputError(f"{label}: damaged image header ({err})") from None
        if self.image.format not in FORMATS:
            fmt = self.image.format
            self.image.close()
            raise InputError(f"{label}: {fmt} images are not accepted (expected {', '.join(FORMATS)})")
        return self.image, label

    def __exit__(self, *exc: object) -> None:
        if self.image is not None:
            self.image.close()


def _check_geometry(image: Image.Image, label: str, max_pixels: int | None) -> None:
    cap = max_pixels if max_pixels is not None else max_pixels_setting()
    width, height = image.size
    if width * height > cap:
        raise InputError(f"{label} is {width} x {height} = {width * height:,} pixels; the limit is {cap:,} "
                         "(set VLMREL_MAX_IMAGE_PIXELS to change it)")
    if min(width, height) < MIN_SIDE:
        raise InputError(f"{label} is {width} x {height}; each side must be at least {MIN_SIDE} pixels")
    if max(width, height) / min(width, height) > MAX_ASPECT:
        raise InputError(f"{label} is {width} x {height}; an aspect ratio over {MAX_ASPECT:g}:1 is refused "
                         "(the model would see a smear)")


def _to_rgb(image: Image.Image, label: str, notes: list[str]) -> ValidatedImage:
    """Plain 8-bit RGB: 16-bit and float images rescaled (not clipped), transparency composited on white."""
    mode = image.mode
    if mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        values = np.asarray(image, dtype=np.float64)
        low, high = float(values.min()), float(values.max())
        scaled = np.zeros_like(values) if high <= low else (values - low) / (high - low) * 255.0
        notes.append(f"{label}: {mode} image rescaled to 8 bits")
        return ValidatedImage(Image.fromarray(scaled.round().astype(np.uint8), "L").convert("RGB"), tuple(notes))
    if mode == "P" and "transparency" in image.info or mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        notes.append(f"{label}: transparency composited on white")
        return ValidatedImage(Image.alpha_composite(background, rgba).convert("RGB"), tuple(notes))
    if mode == "CMYK":
        notes.append(f"{label}: CMYK converted to RGB")
    try:
        return ValidatedImage(image.convert("RGB"), tuple(notes))
    except (OSError, ValueError) as err:
        raise InputError(f"{label}: cannot convert a {mode} image to RGB ({err})") from None
