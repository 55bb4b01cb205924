"""Read an uploaded image safely: bytes in, RGB PIL image out, or one error saying what is wrong with the file.

Why here: a page must not decode files itself, and a decompression bomb or a non-image must become a clear
message, never a traceback.
"""

from __future__ import annotations

import io
import warnings

from PIL import Image, UnidentifiedImageError

MAX_UPLOAD_PIXELS = 4096 * 4096


class ImageInputError(ValueError):
    """Uploaded bytes that are not a usable image, said in words."""


def load_image_bytes(data: bytes, name: str = "the file", max_pixels: int = MAX_UPLOAD_PIXELS) -> Image.Image:
    """Decode ``data`` to an RGB image; refuse empty files, non-images and images over ``max_pixels``."""
    if not data:
        raise ImageInputError(f"{name} is empty")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as image:
                if image.width * image.height > max_pixels:
                    raise ImageInputError(f"{name} is {image.width}x{image.height}; the limit is {max_pixels:,} pixels")
                return image.convert("RGB")
    except UnidentifiedImageError as err:
        raise ImageInputError(f"{name} is not an image this app can read (PNG or JPEG)") from err
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise ImageInputError(f"{name} is too large to decode safely ({err})") from err
    except OSError as err:
        raise ImageInputError(f"{name} could not be decoded ({err})") from err
