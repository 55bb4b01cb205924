"""validation.images: cap from the header, bombs, truncated files, and the mode conversions."""

import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from hostile_cases import png_bytes  # noqa: E402

from vlmrel_core.validation.errors import InputError
from vlmrel_core.validation.images import DEFAULT_MAX_PIXELS, check_image_header, load_image


def test_bomb_is_refused_from_the_header_without_decoding():
    data = png_bytes(14000, 14000, rows=1)  # 196 Mpx declared, ~200 bytes on disk
    assert len(data) < 1000
    with pytest.raises(InputError, match="decompression bomb|limit is"):
        load_image(data)


def test_cap_is_configurable_and_read_from_the_header(tmp_path, monkeypatch):
    path = tmp_path / "big.png"
    path.write_bytes(png_bytes(300, 200, rows=1))  # truncated data: only the header is read
    assert check_image_header(path) == (300, 200)
    with pytest.raises(InputError, match="300 x 200 = 60,000 pixels; the limit is 50,000"):
        check_image_header(path, max_pixels=50_000)
    monkeypatch.setenv("VLMREL_MAX_IMAGE_PIXELS", "50000")
    with pytest.raises(InputError, match="limit is 50,000"):
        check_image_header(path)
    monkeypatch.setenv("VLMREL_MAX_IMAGE_PIXELS", "lots")
    with pytest.raises(InputError, match="VLMREL_MAX_IMAGE_PIXELS must be a whole number"):
        check_image_header(path)
    assert DEFAULT_MAX_PIXELS >= 7680 * 4320  # an 8K frame passes


def test_conversions_give_plain_rgb_with_notes(tmp_path):
    frames = [Image.new("RGB", (8, 8), c) for c in ((255, 0, 0), (0, 255, 0))]
    frames[0].save(tmp_path / "a.gif", save_all=True, append_images=frames[1:])
    gif = load_image(tmp_path / "a.gif")
    assert gif.image.mode == "RGB" and "2 frames; the first frame is used" in gif.notes[0]
    assert gif.image.getpixel((0, 0))[0] > 200  # the first (red) frame

    Image.new("I;16", (8, 8), 40000).save(tmp_path / "deep.png")
    deep = load_image(tmp_path / "deep.png")
    assert deep.image.mode == "RGB" and "rescaled to 8 bits" in deep.notes[0]

    rgba = Image.new("RGBA", (8, 8), (0, 0, 0, 0))
    rgba.save(tmp_path / "clear.png")
    clear = load_image(tmp_path / "clear.png")
    assert clear.image.getpixel((0, 0)) == (255, 255, 255)  # transparent is white, not black

    Image.new("CMYK", (8, 8), (0, 255, 255, 0)).save(tmp_path / "c.jpg")
    cmyk = load_image(tmp_path / "c.jpg")
    assert cmyk.image.mode == "RGB" and cmyk.notes == (f"{tmp_path / 'c.jpg'}: CMYK converted to RGB",)
    assert np.asarray(cmyk.image)[0, 0, 0] > 200  # red stays red


@pytest.mark.parametrize("size, message", [((1, 1), "at least 4 pixels"), ((400, 4), "aspect ratio")])
def test_degenerate_geometry_is_refused(size, message):
    with pytest.raises(InputError, match=message):
        load_image(Image.new("RGB", size))


def test_truncated_and_non_images(tmp_path):
    path = tmp_path / "t.png"
    Image.effect_noise((64, 64), 40).save(path)
    path.write_bytes(path.read_bytes()[:300])
    with pytest.raises(InputError, match="damaged or truncated"):
        load_image(path)
    with pytest.raises(InputError, match="not an image"):
        load_image(b"GIF89a-but-not-really")
    with pytest.raises(InputError, match="image not found"):
        load_image(tmp_path / "nope.png")
