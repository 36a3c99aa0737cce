"""Turn untrusted image bytes and caption text into safe values, or say exactly why not.

Nothing here raises on bad input: each function returns the cleaned value (or None) with the
reason a sample must be skipped, or the repair that was applied. The reason strings are the keys
of `SkipReport`, so keep them short, fixed and readable (no per-sample details in them).
"""

from __future__ import annotations

import io
import re
import unicodedata
import warnings
from dataclasses import dataclass
from typing import Literal

import numpy as np
from PIL import Image, UnidentifiedImageError

# Reasons a sample is skipped.
IMAGE_MISSING = "image missing"
IMAGE_EMPTY = "image file empty"
IMAGE_UNDECODABLE = "image not decodable (corrupt or not an image)"
IMAGE_TRUNCATED = "image truncated"
IMAGE_TOO_SMALL = "image too small"
IMAGE_TOO_LARGE = "image too large (decompression bomb guard)"
CAPTION_MISSING = "caption missing"
CAPTION_EMPTY = "caption empty or whitespace"
CAPTION_NOT_UTF8 = "caption not valid UTF-8"
CAPTION_TOO_LONG = "caption too long (skipped)"
# Repairs: the sample is kept.
CAPTION_TRUNCATED = "caption too long (truncated)"


def image_converted(mode: str) -> str:
    """Repair reason for an image converted from `mode` to RGB."""
    return f"image mode {mode} converted to RGB"


@dataclass(frozen=True)
class DecodedImage:
    """Result of `decode_image`: encoded RGB bytes to store, or the reason there are none.

    `data` is the original file when it already decodes to RGB, else a lossless PNG of the RGB
    conversion; either way it decodes to an RGB image of `size`. `repair` names a conversion.
    """

    data: bytes | None
    size: tuple[int, int] | None = None
    skip: str | None = None
    repair: str | None = None


_KEEP_ORIGINAL_FORMATS = {"JPEG", "PNG", "WEBP"}


def _to_rgb(image: Image.Image) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB without mangling deep or transparent images."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        # 16/32-bit and float images: scale the actual range to 0..255 (a plain convert clips to white).
        array = np.asarray(image, dtype=np.float64)
        low, high = float(array.min()), float(array.max())
        scaled = (array - low) * (255.0 / (high - low)) if high > low else np.zeros_like(array)
        image = Image.fromarray(scaled.round().astype(np.uint8), mode="L")
    if image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        # Composite on white, as img2dataset does, instead of dropping alpha (black fringes).
        image = image.convert("RGBA")
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, image)
    return image.convert("RGB")


def decode_image(data: bytes | None, *, min_side: int = 8, max_pixels: int = 64_000_000) -> DecodedImage:
    """Check and decode image bytes; convert to RGB where needed. Never raises.

    Skips: missing/empty data, bytes that are not a decodable image, truncated files, images with
    a side under `min_side`, and images over `max_pixels` (checked from the header, before any
    pixel is decoded, so a decompression bomb costs nothing).
    """
    if data is None:
        return DecodedImage(None, skip=IMAGE_MISSING)
    if len(data) == 0:
        return DecodedImage(None, skip=IMAGE_EMPTY)
    try:
        with warnings.catch_warnings():
            # Plugins warn (and go on with a partial picture) on some damaged files: make that an error.
            warnings.simplefilter("ignore")
            warnings.filterwarnings("error", message=r"(?i).*truncated")
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            width, height = image.size
            if width * height > max_pixels:
                return DecodedImage(None, skip=IMAGE_TOO_LARGE)
            if min(width, height) < min_side:
                return DecodedImage(None, skip=IMAGE_TOO_SMALL)
            image.load()
            rgb = _to_rgb(image)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        return DecodedImage(None, skip=IMAGE_TOO_LARGE)
    except Exception as err:  # noqa: BLE001 - image plugins raise many types on hostile bytes
        truncated = "truncated" in str(err).lower() and not isinstance(err, UnidentifiedImageError)
        return DecodedImage(None, skip=IMAGE_TRUNCATED if truncated else IMAGE_UNDECODABLE)
    if image.mode == "RGB" and image.format in _KEEP_ORIGINAL_FORMATS:
        return DecodedImage(data, size=(width, height))
    buffer = io.BytesIO()
    rgb.save(buffer, format="PNG")
    repair = image_converted(image.mode) if image.mode != "RGB" else None
    return DecodedImage(buffer.getvalue(), size=(width, height), repair=repair)


@dataclass(frozen=True)
class CleanText:
    """Result of `clean_caption`: the cleaned text, or the reason there is none."""

    text: str | None
    skip: str | None = None
    repair: str | None = None


# Control characters (tabs, newlines) become spaces; format, surrogate, private-use and unassigned
# code points are dropped (a lone surrogate would not even encode to UTF-8 when stored).
_DROPPED_CATEGORIES = {"Cf", "Cs", "Co", "Cn"}
_WHITESPACE_RE = re.compile(r"\s+")


def clean_caption(
    raw: str | bytes | None, *, max_chars: int = 512, long_policy: Literal["truncate", "skip"] = "truncate"
) -> CleanText:
    """Decode (UTF-8, BOM tolerated), normalise (NFC), drop control characters, collapse spaces.

    A caption over `max_chars` is cut at the last word boundary ("truncate", a repair) or skipped
    ("skip"). Never raises.
    """
    if raw is None:
        return CleanText(None, skip=CAPTION_MISSING)
    if isinstance(raw, (bytes, bytearray, memoryview)):
        try:
            raw = bytes(raw).decode("utf-8-sig")
        except UnicodeDecodeError:
            return CleanText(None, skip=CAPTION_NOT_UTF8)
    if not isinstance(raw, str):
        return CleanText(None, skip=CAPTION_MISSING)
    text = unicodedata.normalize("NFC", raw)
    text = "".join(
        " " if category == "Cc" else ch
        for ch in text
        if (category := unicodedata.category(ch)) not in _DROPPED_CATEGORIES
    )
    text = _WHITESPACE_RE.sub(" ", text).strip()
    if not text:
        return CleanText(None, skip=CAPTION_EMPTY)
    if len(text) <= max_chars:
        return CleanText(text)
    if long_policy == "skip":
        return CleanText(None, skip=CAPTION_TOO_LONG)
    head = text[: max_chars + 1]  # one more: a space right after the limit is a clean cut
    cut = head.rsplit(" ", 1)[0] if " " in head else head[:max_chars]
    return CleanText(cut.rstrip(), repair=CAPTION_TRUNCATED)


_NOT_WORD_RE = re.compile(r"[^\w\s]")


def normalize_caption(text: str) -> str:
    """Lowercase, punctuation removed, spaces collapsed: equal for captions that say the same words."""
    return _WHITESPACE_RE.sub(" ", _NOT_WORD_RE.sub(" ", text.lower())).strip()
