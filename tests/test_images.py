"""Decoding input as it comes in the wild: accepted kinds are normalised to upright RGB, bad ones get a reason."""


import numpy as np
import pytest
from conftest import face_like, jpeg_bytes, png_bytes
from PIL import Image

from synfer_pipeline.io.images import BadImage, decode_image, pixel_hash


def _half_red_half_blue(w=80, h=60) -> Image.Image:
    arr = np.zeros((h, w, 3), np.uint8)
    arr[: h // 2] = (255, 0, 0)  # red on top
    arr[h // 2 :] = (0, 0, 255)
    return Image.fromarray(arr)


def test_grayscale_becomes_rgb_with_equal_channels():
    img = decode_image(png_bytes(face_like(64).convert("L")))
    arr = np.asarray(img)
    assert img.mode == "RGB" and arr.shape == (64, 64, 3)
    assert np.array_equal(arr[..., 0], arr[..., 1]) and np.array_equal(arr[..., 1], arr[..., 2])


def test_cmyk_jpeg_becomes_rgb_with_the_right_colours():
    img = decode_image(jpeg_bytes(_half_red_half_blue().convert("CMYK")))
    arr = np.asarray(img).astype(int)
    assert img.mode == "RGB"
    assert arr[5, 40, 0] > 200 and arr[5, 40, 2] < 60      # top stays red
    assert arr[55, 40, 2] > 200 and arr[55, 40, 0] < 60    # bottom stays blue


def test_16bit_grey_is_rescaled_not_clipped():
    ramp = (np.linspace(0, 65535, 64 * 64).reshape(64, 64)).astype(np.uint16)
    img = decode_image(png_bytes(Image.fromarray(ramp)))
    arr = np.asarray(img)[..., 0]
    assert img.mode == "RGB"
    assert arr.min() == 0 and arr.max() == 255
    assert 120 <= arr[32, 0] <= 135  # the middle of the ramp lands mid-grey, not white


def test_palette_image_keeps_its_colours():
    pal = _half_red_half_blue().convert("P", palette=Image.Palette.ADAPTIVE, colors=4)
    arr = np.asarray(decode_image(png_bytes(pal))).astype(int)
    assert tuple(arr[5, 5]) == (255, 0, 0) and tuple(arr[55, 5]) == (0, 0, 255)


def test_alpha_is_composited_over_white():
    rgba = Image.new("RGBA", (40, 40), (255, 0, 0, 255))
    rgba.paste((0, 0, 0, 0), (0, 0, 40, 20))  # top half fully transparent (black underneath)
    arr = np.asarray(decode_image(png_bytes(rgba)))
    assert tuple(arr[5, 5]) == (255, 255, 255)
    assert tuple(arr[30, 5]) == (255, 0, 0)


def test_exif_orientation_is_applied():
    exif = Image.Exif()
    exif[0x0112] = 6  # stored image must be rotated 90 degrees clockwise for display
    data = jpeg_bytes(_half_red_half_blue(80, 60), exif=exif.tobytes())
    img = decode_image(data)
    arr = np.asarray(img).astype(int)
    assert img.size == (60, 80)  # width and height swapped
    assert arr[40, 50, 0] > 200 and arr[40, 5, 2] > 200  # red (was top) is now on the right


def test_png_behind_a_jpg_name_is_decoded_by_content():
    # The decoder never looks at names: the bytes of a PNG decode the same as from a .png file.
    src = face_like(48, seed=3)
    assert np.array_equal(np.asarray(decode_image(png_bytes(src))), np.asarray(src))


@pytest.mark.parametrize(
    "data, reason",
    [
        (b"", "empty_file"),
        (b"this is a text file, not a picture\n" * 10, "not_an_image"),
        (jpeg_bytes(face_like(64))[:400], "corrupt"),  # truncated
        (png_bytes(face_like(64))[:-200], "corrupt"),
        (jpeg_bytes(face_like(20)), "too_small"),
    ],
    ids=["empty", "text", "truncated-jpeg", "truncated-png", "too-small"],
)
def test_bad_input_is_rejected_with_its_reason(data, reason):
    with pytest.raises(BadImage) as err:
        decode_image(data, min_side=32)
    assert err.value.reason == reason
    assert err.value.detail


def test_pixel_hash_sees_content_not_encoding():
    img = face_like(64, seed=1)
    assert pixel_hash(decode_image(png_bytes(img))) == pixel_hash(decode_image(png_bytes(img, optimize=True)))
    assert pixel_hash(decode_image(png_bytes(img))) != pixel_hash(decode_image(png_bytes(face_like(64, seed=2))))


def test_jpeg_draft_decodes_a_reduced_image_and_reports_the_scale():
    img = decode_image(jpeg_bytes(face_like(512)), draft_side=128)
    assert min(img.size) >= 128 and img.size[0] < 512
    assert img.info["scale"] == pytest.approx(img.size[0] / 512)
