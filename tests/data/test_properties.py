"""Property tests: random bytes and strings through decoding, caption cleaning and parsing never raise."""

from __future__ import annotations

import io

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from data.cleaning import CleaningOptions, sample_from_files
from data.sanitize import clean_caption, decode_image
from data.shapes import parse_caption

from .conftest import encode

# Real file starts, so random tails reach deep into the image plugins instead of failing at byte 0.
_PREFIXES = [
    b"",
    encode(Image.new("RGB", (12, 12), "red"), "PNG")[:40],
    encode(Image.new("RGB", (12, 12), "red"), "JPEG")[:120],
    encode(Image.new("P", (12, 12)), "GIF")[:30],
    encode(Image.new("RGB", (12, 12)), "BMP")[:54],
    encode(Image.new("RGB", (12, 12)), "WEBP")[:30],
    encode(Image.new("RGB", (12, 12)), "TIFF")[:60],
]
image_bytes = st.builds(lambda prefix, tail: prefix + tail, st.sampled_from(_PREFIXES), st.binary(max_size=600))
texts = st.one_of(st.text(max_size=300), st.binary(max_size=300), st.none())
fast = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@fast
@given(image_bytes)
def test_decode_image_never_raises(data: bytes) -> None:
    result = decode_image(data, min_side=1)
    assert (result.data is None) != (result.skip is None)
    if result.data is not None:  # what is kept always decodes to RGB
        with Image.open(io.BytesIO(result.data)) as image:
            image.load()
            assert image.mode == "RGB" and image.size == result.size


@fast
@given(texts, st.integers(min_value=1, max_value=80), st.sampled_from(["truncate", "skip"]))
def test_clean_caption_never_raises(raw: str | bytes | None, max_chars: int, policy: str) -> None:
    result = clean_caption(raw, max_chars=max_chars, long_policy=policy)
    assert (result.text is None) != (result.skip is None)
    if result.text is not None:
        assert result.text == result.text.strip() and 0 < len(result.text) <= max_chars
        assert "  " not in result.text and "\n" not in result.text
        result.text.encode("utf-8")  # storable: no lone surrogates left


@fast
@given(st.text(max_size=200))
def test_parse_caption_never_raises(text: str) -> None:
    scene = parse_caption(text)
    assert scene is None or 1 <= len(scene) <= 3


@fast
@given(
    st.dictionaries(
        st.sampled_from(["jpg", "png", "txt", "json", "cls"]),
        st.one_of(image_bytes, st.binary(max_size=200), st.text(max_size=100).map(str.encode)),
        max_size=4,
    )
)
def test_any_shard_sample_becomes_a_row_or_a_counted_skip(files: dict[str, bytes]) -> None:
    row = sample_from_files("key", files, CleaningOptions(min_image_side=1))
    assert (row["_skip"] is None) == (row["image"] is not None)
