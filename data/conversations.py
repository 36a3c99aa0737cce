"""The one conversation schema of stage-2 (instruction / VQA) data, and the checks every kept row passes.

A row is `{"key", "images", "turns"}`: `images` a list of pictures (possibly empty), `turns` a list of
`{"role", "text"}` with `role` one of system/user/assistant. Where an image goes is marked in a user turn's text by
`IMAGE_PLACEHOLDER`; the i-th placeholder stands for the i-th image. The readers of `data.conversation_readers`
bring each format into this shape; `check_conversation` then decides, once per record, whether it is kept (and
decodes its images) or skipped and why. The reasons are `SkipReport` keys, so they are short and fixed.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from datasets import Features, Image, List, Value

from .sanitize import IMAGE_MISSING, decode_image

IMAGE_PLACEHOLDER = "<image>"
ROLES = ("system", "user", "assistant")

# Reasons a record is skipped (besides `data.sanitize`'s image reasons: undecodable, truncated, too small, ...).
IMAGE_FILE_MISSING = "image file missing"
CONVERSATION_MALFORMED = "conversation malformed (not a list of role/text turns)"
ROLE_UNKNOWN = "turn role unknown"
TURN_ORDER = "turn order is not user/assistant"
EMPTY_TURN = "empty turn"
PLACEHOLDER_OUTSIDE_USER_TURN = "image placeholder outside a user turn"
PLACEHOLDERS_MISMATCH = "placeholders do not match images"
TOO_MANY_IMAGES = "more than max_images_per_sample images"
NO_TURNS_AFTER_RATINGS = "no turns left after the rating filter"
# Repairs: the record is kept.
PLACEHOLDER_ADDED = "image placeholder added"
TURNS_DROPPED_BY_RATINGS = "turns below min_ratings dropped"

_TURN = {"role": Value("string"), "text": Value("string")}
CONVERSATION_FEATURES = Features(
    {"key": Value("string"), "images": List(Image(mode="RGB")), "turns": List(_TURN)}
)
# The check's verdict rides along in these columns until it has been counted.
HIDDEN_FEATURES = {"_skip": Value("string"), "_repairs": List(Value("string"))}
# Images stay undecoded while records are checked, so each kept image is decoded once more only when read.
CHECKED_FEATURES = Features({**CONVERSATION_FEATURES, "images": List(Image(decode=False)), **HIDDEN_FEATURES})


class RecordSkipped(Exception):
    """Raised by a reader when a record cannot become a conversation; `reason` is its `SkipReport` key."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def verdict_row(key: str, reason: str) -> dict[str, Any]:
    """A row that carries no conversation, only why it is skipped."""
    return {"key": key, "images": [], "turns": [], "_skip": reason, "_repairs": []}


def _order_problem(turns: list[dict[str, str]]) -> str | None:
    roles = [turn["role"] for turn in turns]
    if any(role not in ROLES for role in roles):
        return ROLE_UNKNOWN
    if roles[:1] == ["system"]:
        roles = roles[1:]
    expected = ["user", "assistant"] * (len(roles) // 2)
    return None if roles and roles == expected else TURN_ORDER


def _text_problem(turns: list[dict[str, str]]) -> str | None:
    for turn in turns:
        placeholders = turn["text"].count(IMAGE_PLACEHOLDER)
        if placeholders and turn["role"] != "user":
            return PLACEHOLDER_OUTSIDE_USER_TURN
        if turn["role"] != "system" and not placeholders and not turn["text"].strip():
            return EMPTY_TURN
    return None


def _read_file(path: str) -> bytes | None:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError:
        return None


def _checked_image(value: Any) -> tuple[dict[str, Any] | None, str | None, str | None]:
    """(stored image, skip reason, repair) for one image as a reader gives it: a path, bytes, a `datasets` dict."""
    path = value if isinstance(value, str) else value.get("path") if isinstance(value, dict) else None
    data = value.get("bytes") if isinstance(value, dict) else value if isinstance(value, bytes) else None
    from_file = not data and bool(path)
    if from_file:
        data = _read_file(path)
        if data is None:
            return None, IMAGE_FILE_MISSING, None
    if data is None:
        return None, IMAGE_MISSING, None
    decoded = decode_image(data)
    if decoded.skip is not None:
        return None, decoded.skip, None
    # An image read from a file that needs no conversion is stored as its path: the cache then holds the
    # conversations, not a second copy of an image folder that can be as large as a whole dataset.
    if from_file and decoded.data is data:
        return {"bytes": None, "path": path}, None, None
    return {"bytes": decoded.data, "path": None}, None, decoded.repair


def check_conversation(
    key: str, images: list[Any], turns: list[dict[str, str]], *, repairs: Sequence[str] = (),
    max_images_per_sample: int | None = None,
) -> dict[str, Any]:
    """The row of a record that a reader has brought into the schema, or a verdict row saying why it is skipped.

    `images` are paths, bytes or `datasets` image dicts (None: missing); `turns` have str texts. The cheap
    checks of the turns come first; images are decoded last, with `data.sanitize`'s limits.
    """
    problem = _order_problem(turns) or _text_problem(turns)
    if problem is None and sum(turn["text"].count(IMAGE_PLACEHOLDER) for turn in turns) != len(images):
        problem = PLACEHOLDERS_MISMATCH
    if problem is None and max_images_per_sample is not None and len(images) > max_images_per_sample:
        problem = TOO_MANY_IMAGES
    if problem is not None:
        return verdict_row(key, problem)
    stored, repairs = [], list(repairs)
    for value in images:
        image, skip, repair = _checked_image(value)
        if skip is not None:
            return verdict_row(key, skip)
        stored.append(image)
        repairs += [repair] if repair else []
    return {"key": key, "images": stored, "turns": turns, "_skip": None, "_repairs": repairs}
