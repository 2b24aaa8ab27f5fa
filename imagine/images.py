"""The image a user starts from (img2img): decoded with limits, and the size it renders at.

Front ends check it here before the queue (the bot, on an attachment), and the worker decodes it again
with the same code, because a message on the queue may come from an old or hostile client. It needs
Pillow, never torch.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import math
import warnings

from PIL import Image, ImageOps

ACCEPTED_FORMATS = ("PNG", "JPEG", "WEBP")
NATIVE_PIXELS = 512 * 512
"""What SD 1.x was trained at: an image given without a size renders at about this many pixels."""
SIDE_MULTIPLE = 8
"""The VAE halves each side three times: a side must be a multiple of 8."""
ASPECT_RATIOS = ("1:1", "4:3", "3:4", "3:2", "2:3", "16:9", "9:16")
"""What front ends offer instead of width and height."""


class ImageRejected(ValueError):
    """An image that cannot be a job's starting image; the message says what to do instead."""


def encode_image(data: bytes) -> str:
    """The file's bytes as the `image` option carries them through JSON and Redis."""
    return base64.b64encode(data).decode("ascii")


def image_digest(encoded: str) -> str:
    """A short name of the image, the same for the same file: what batches and the result's metadata use."""
    return hashlib.sha256(encoded.encode("ascii")).hexdigest()[:16]


def decode_image(encoded: str, max_bytes: int, max_pixels: int) -> Image.Image:
    """The image of an `image` option, ready to render from: its first frame, turned as its EXIF
    orientation says, in RGB (transparency over white). Raises ImageRejected."""
    if len(encoded) > (max_bytes + 2) // 3 * 4:  # before decoding it: base64 holds 3 bytes in 4 characters
        size = len(encoded) * 3 / 4 / 2**20
        raise ImageRejected(f"image is {size:.1f} MiB; at most {max_bytes / 2**20:.1f} MiB: send a smaller file")
    try:
        data = base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError):
        raise ImageRejected("image must be the base64 of a PNG, JPEG or WebP file") from None
    if len(data) > max_bytes:
        raise ImageRejected(
            f"image is {len(data) / 2**20:.1f} MiB; at most {max_bytes / 2**20:.1f} MiB: send a smaller file"
        )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=ACCEPTED_FORMATS)
            # Its header's size, before a single pixel is decoded: a decompression bomb stops here.
            if image.width * image.height > max_pixels:
                raise ImageRejected(
                    f"image is {image.width}×{image.height} = {image.width * image.height} pixels; "
                    f"at most {max_pixels}: send a smaller image"
                )
            image.seek(0)  # an animated image starts from its first frame
            image.load()
            image = ImageOps.exif_transpose(image)
            if image.mode.startswith("I"):  # 16- or 32-bit grey: to 8 bits, not clipped to white
                image = image.convert("I").point(lambda value: value * (1 / 256)).convert("L")
            return to_rgb(image)
    except ImageRejected:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):  # Pillow's own, larger bound
        raise ImageRejected(f"image has far more than {max_pixels} pixels: send a smaller image") from None
    except Image.UnidentifiedImageError:
        raise ImageRejected("image is not a PNG, JPEG or WebP file") from None
    except Exception as error:  # a damaged file (its EXIF included) makes Pillow raise anything
        raise ImageRejected(f"image could not be decoded ({error}); it may be truncated or damaged") from None


def to_rgb(image: Image.Image) -> Image.Image:
    """The image in RGB; transparent pixels onto white (their stored colour is arbitrary, often black)."""
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        background = Image.new("RGBA", image.size, "white")
        return Image.alpha_composite(background, image.convert("RGBA")).convert("RGB")
    return image.convert("RGB")


def render_size(
    image_size: tuple[int, int],
    width: int | None,
    height: int | None,
    min_side: int,
    max_side: int,
    max_pixels: int,
) -> tuple[int, int]:
    """The size to render an image of `image_size` at: width and height where both are given; otherwise
    its aspect ratio kept, at the given side or at about NATIVE_PIXELS, in multiples of 8 within the limits.
    Raises ImageRejected for a shape that no allowed size keeps (a 10000×10 strip)."""
    if width is not None and height is not None:
        return width, height
    image_width, image_height = image_size
    aspect = image_width / image_height
    if width is not None:
        size = (width, _multiple(width / aspect))
    elif height is not None:
        size = (_multiple(height * aspect), height)
    else:
        pixels = min(NATIVE_PIXELS, max_pixels)
        size = (_multiple(math.sqrt(pixels * aspect)), _multiple(math.sqrt(pixels / aspect)))
        while size[0] * size[1] > max_pixels:  # rounding up may overshoot
            size = (size[0] - SIDE_MULTIPLE, _multiple((size[0] - SIDE_MULTIPLE) / aspect))
    if not all(min_side <= side <= max_side for side in size):
        raise ImageRejected(
            f"image is {image_width}×{image_height}: kept in shape, it would render at {size[0]}×{size[1]}, "
            f"but each side must be from {min_side} to {max_side}; crop it closer to square, or give width and height"
        )
    return size


def aspect_sizes(min_side: int, max_side: int, max_pixels: int) -> dict[str, tuple[int, int]]:
    """Each aspect ratio's size for SD 1.x: multiples of 8 near 512² pixels, within the service's limits."""
    sizes = {}
    for ratio in ASPECT_RATIOS:
        width, height = map(int, ratio.split(":"))
        try:
            sizes[ratio] = render_size((width, height), None, None, min_side, max_side, max_pixels)
        except ImageRejected:  # a shape this service's limits do not allow: not offered
            continue
    return sizes


def resized(image: Image.Image, width: int, height: int) -> Image.Image:
    """The image at the size it renders at; where width and height change its shape, cropped to fill it (from
    the centre) rather than stretched."""
    if image.size == (width, height):
        return image
    return ImageOps.fit(image, (width, height), Image.Resampling.LANCZOS)


def _multiple(side: float) -> int:
    return max(SIDE_MULTIPLE, round(side / SIDE_MULTIPLE) * SIDE_MULTIPLE)
