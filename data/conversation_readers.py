"""Readers that bring the common stage-2 data formats into the conversation schema of `data.conversations`.

Formats: LLaVA's `conversations` (human/gpt turns), the Cauldron's and FineVision's `images` + `texts`
(user/assistant pairs, FineVision with per-turn ratings), TRL's `messages` (role/content, content a string or typed
parts) and VQA columns (a question, one answer or a list of annotators' answers, an image). `resolve_fields` checks
once per source that the fields a format needs are there, so a misnamed column is one clear error instead of every
record skipped; then `read_record` turns each record (a `datasets` row, or one object of a JSON file) into its
images (paths, bytes or `datasets` image dicts, decoded later by `check_conversation`) and turns.
"""

from __future__ import annotations

import os
import re
from collections import Counter
from dataclasses import dataclass
from typing import Any, NamedTuple

from cli import UserError, closest

from .conversations import (
    CONVERSATION_MALFORMED,
    IMAGE_PLACEHOLDER,
    NO_TURNS_AFTER_RATINGS,
    PLACEHOLDER_ADDED,
    TURNS_DROPPED_BY_RATINGS,
    RecordSkipped,
)
from .loading import IMAGE_COLUMN_GUESSES

CONVERSATION_FORMATS = ("llava", "cauldron", "messages", "vqa")
# What each format's records hold, for the messages.
FORMAT_FIELDS = {
    "llava": "conversations, optional image",
    "cauldron": "texts, optional images",
    "messages": "messages, optional images or image",
    "vqa": "question, answers or answer, an image column",
}
# Where each format keeps its images unless told otherwise (`--image_column`), first match wins; VQA guesses.
IMAGE_FIELDS = {"llava": ("image",), "cauldron": ("images",), "messages": ("images", "image")}
_KNOWN_FIELDS = ("conversations", "image", "texts", "images", "messages", "question", "answers", "answer")
RATINGS_SUFFIX = "_ratings"
_LLAVA_ROLES = {"human": "user", "gpt": "assistant", "system": "system", "user": "user", "assistant": "assistant"}
# LLaVA writes the placeholder on a line of its own, before or after the first question: that newline is the
# layout of LLaVA's prompt, not part of the question. Without it the same conversation reads the same from every
# format (the Cauldron and messages have no such newline), and the chat template decides what surrounds images.
_PLACEHOLDER_LINE = re.compile(rf"\n?{re.escape(IMAGE_PLACEHOLDER)}\n?")


@dataclass(frozen=True)
class Fields:
    """Where a source's records keep what its format reads; made by `resolve_fields`."""

    format: str
    image: str | None = None
    question: str | None = None
    answer: str | None = None
    # (ratings column, minimum) pairs: FineVision turns rated below a minimum are dropped.
    min_ratings: tuple[tuple[str, int], ...] = ()


class Draft(NamedTuple):
    """A record in the schema's shape, before `check_conversation` checks it."""

    images: list[Any]
    turns: list[dict[str, str]]
    repairs: list[str]


def _formats_line() -> str:
    return "; ".join(f"{name} ({fields})" for name, fields in FORMAT_FIELDS.items())


def check_format(format: str) -> None:
    """`UserError` unless `format` is "auto" or one of `CONVERSATION_FORMATS`."""
    if format not in ("auto", *CONVERSATION_FORMATS):
        raise UserError(
            f"unknown conversation format {format!r}{closest(format, CONVERSATION_FORMATS)}; "
            f"expected auto or one of {', '.join(CONVERSATION_FORMATS)}"
        )


def detect_format(fields: Any, source: str = "the data") -> str:
    """The format whose fields `fields` (column names or a record's keys) hold; `UserError` when none fits."""
    names = list(fields)
    if "conversations" in names:
        return "llava"
    if "texts" in names:
        return "cauldron"
    if "messages" in names:
        return "messages"
    if "question" in names and ("answers" in names or "answer" in names):
        return "vqa"
    described = ", ".join(name if name in _KNOWN_FIELDS else name + closest(name, _KNOWN_FIELDS) for name in names)
    raise UserError(
        f"cannot tell the conversation format of {source}: its fields are {described or 'none'}; "
        f"expected {_formats_line()}; rename the fields or pass --format"
    )


def _column(names: list[str], column: str, role: str, flag: str, source: str) -> str:
    if column not in names:
        raise UserError(
            f"{role} column {column!r} not found in {source}{closest(column, names)}; its columns are: "
            f"{', '.join(names)}; name the right one with {flag}"
        )
    return column


def _ratings(names: list[str], min_ratings: dict[str, int], source: str) -> tuple[tuple[str, int], ...]:
    available = {name.removesuffix(RATINGS_SUFFIX): name for name in names if name.endswith(RATINGS_SUFFIX)}
    chosen = []
    for name, minimum in min_ratings.items():
        short = name.removesuffix(RATINGS_SUFFIX)
        if short not in available:
            raise UserError(
                f"rating {name!r} not found in {source}{closest(short, available)}; its ratings are: "
                f"{', '.join(available) or 'none (no *_ratings columns)'}"
            )
        chosen.append((available[short], int(minimum)))
    return tuple(chosen)


def resolve_fields(
    format: str, fields: Any, *, source: str, image_types: tuple[str, ...] = (), image_column: str | None = None,
    question_column: str | None = None, answer_column: str | None = None, min_ratings: dict[str, int] | None = None,
) -> Fields:
    """Check that `fields` (a source's column names) hold what `format` reads, and say where; `UserError` if not.

    `image_types`: the columns typed as images, the first guess for a VQA image column.
    """
    names = list(fields)
    if format != "vqa" and (question_column or answer_column):
        raise UserError(f"--question_column and --answer_column are for vqa data; {source} is read as {format}")
    if min_ratings and format != "cauldron":
        raise UserError(f"min_ratings filters FineVision (cauldron format) turns; {source} is read as {format}")
    if format == "vqa":
        question = _column(names, question_column or "question", "question", "--question_column", source)
        answer = answer_column or next((n for n in ("answers", "answer") if n in names), "answer")
        image = image_column or next((n for n in (*image_types, *IMAGE_COLUMN_GUESSES) if n in names), None)
        if image is None:
            raise UserError(f"no image column found in {source}; its columns are: {', '.join(names)}; "
                            "name it with --image_column")
        return Fields(
            format, image=_column(names, image, "image", "--image_column", source), question=question,
            answer=_column(names, answer, "answer", "--answer_column", source),
        )
    needed = {"llava": "conversations", "cauldron": "texts", "messages": "messages"}[format]
    if needed not in names:
        raise UserError(
            f"{source} is not {format} data: it has no {needed!r} field{closest(needed, names)}; its fields are: "
            f"{', '.join(names)}; expected {_formats_line()}"
        )
    if image_column is not None:
        image = _column(names, image_column, "image", "--image_column", source)
    else:
        image = next((n for n in IMAGE_FIELDS[format] if n in names), None)
    return Fields(format, image=image, min_ratings=_ratings(names, min_ratings or {}, source))


def _text(value: Any) -> str:
    if value is None:
        return ""  # an absent text is an empty turn, counted as such
    if not isinstance(value, str):
        raise RecordSkipped(CONVERSATION_MALFORMED)
    return value


def _entries(value: Any) -> list[Any]:
    if not isinstance(value, list):
        raise RecordSkipped(CONVERSATION_MALFORMED)
    return value


def _dict(value: Any) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise RecordSkipped(CONVERSATION_MALFORMED)
    return value


def _images(value: Any, image_folder: str | None) -> list[Any]:
    """A record's image field as a list; relative paths are taken from `image_folder`."""
    values = [] if value is None else value if isinstance(value, list) else [value]
    return [
        os.path.join(image_folder, v) if isinstance(v, str) and image_folder and not os.path.isabs(v) else v
        for v in values
    ]


def _placeholders_first(turns: list[dict[str, str]], count: int) -> None:
    user = next((turn for turn in turns if turn["role"] == "user"), None)
    if user is not None:
        user["text"] = IMAGE_PLACEHOLDER * count + user["text"]


def _placeholder_count(turns: list[dict[str, str]]) -> int:
    return sum(turn["text"].count(IMAGE_PLACEHOLDER) for turn in turns)


def read_llava(record: dict[str, Any], fields: Fields, image_folder: str | None) -> Draft:
    """LLaVA: `conversations` of {from: human/gpt/system, value}; `image` a path, a list of paths or absent."""
    images = _images(record.get(fields.image), image_folder) if fields.image else []
    turns = []
    for turn in _entries(record.get("conversations")):
        speaker = _dict(turn).get("from")
        role = _LLAVA_ROLES.get(speaker, speaker) if isinstance(speaker, str) else str(speaker)
        text = _text(turn.get("value"))
        turns.append({"role": role, "text": _PLACEHOLDER_LINE.sub(IMAGE_PLACEHOLDER, text) if role == "user" else text})
    repairs = []
    # LLaVA's own loader puts a lone image before the first question when its text has no placeholder.
    if len(images) == 1 and _placeholder_count(turns) == 0:
        _placeholders_first(turns, 1)
        repairs.append(PLACEHOLDER_ADDED)
    return Draft(images, turns, repairs)


def _rated_below(record: dict[str, Any], index: int, fields: Fields) -> bool:
    for column, minimum in fields.min_ratings:
        ratings = record.get(column)
        rating = ratings[index] if isinstance(ratings, list) and index < len(ratings) else None
        if rating is not None and rating < minimum:  # an unrated turn is kept
            return True
    return False


def read_cauldron(record: dict[str, Any], fields: Fields, image_folder: str | None) -> Draft:
    """The Cauldron / FineVision: `images` and `texts` of {user, assistant}; the images precede the first question.

    FineVision rates each pair in `<name>_ratings` lists (1-5); pairs rated under `fields.min_ratings` are dropped.
    """
    pairs = _entries(record.get("texts"))
    kept = [_dict(pair) for i, pair in enumerate(pairs) if not _rated_below(record, i, fields)]
    if pairs and not kept:
        raise RecordSkipped(NO_TURNS_AFTER_RATINGS)
    turns = []
    for pair in kept:
        turns += [{"role": "user", "text": _text(pair.get("user"))},
                  {"role": "assistant", "text": _text(pair.get("assistant"))}]
    images = _images(record.get(fields.image), image_folder) if fields.image else []
    _placeholders_first(turns, len(images))
    return Draft(images, turns, [TURNS_DROPPED_BY_RATINGS] if len(kept) < len(pairs) else [])


def _content(value: Any) -> str:
    """A message's content: a string, or typed parts whose images become placeholders, in order."""
    if not isinstance(value, list):
        return _text(value)
    parts = []
    for part in value:
        kind = _dict(part).get("type")
        if kind == "image":
            parts.append(IMAGE_PLACEHOLDER)
        elif kind == "text":
            parts.append(_text(part.get("text")))
        else:
            raise RecordSkipped(CONVERSATION_MALFORMED)
    return "".join(parts)


def read_messages(record: dict[str, Any], fields: Fields, image_folder: str | None) -> Draft:
    """TRL: `messages` of {role, content}, with `images` (a list) or `image` (one)."""
    turns = [{"role": str(_dict(m).get("role")), "text": _content(m.get("content"))}
             for m in _entries(record.get("messages"))]
    images = _images(record.get(fields.image), image_folder) if fields.image else []
    # String contents carry no image parts: like the Cauldron, the images then precede the first question.
    if images and _placeholder_count(turns) == 0:
        _placeholders_first(turns, len(images))
    return Draft(images, turns, [])


def most_frequent_answer(value: Any) -> str:
    """The answer to train on: a string as is; of a list (strings or VQAv2's {answer} dicts), the most frequent,
    the first given on a tie."""
    if not isinstance(value, list):
        return _text(value)
    answers = [_text(a.get("answer") if isinstance(a, dict) else a) for a in value]
    if not answers:
        return ""
    counts = Counter(answers)  # keeps first-seen order, and max() returns the first of equal counts
    return max(counts, key=counts.__getitem__)


def read_vqa(record: dict[str, Any], fields: Fields, image_folder: str | None) -> Draft:
    """VQA columns: one user turn (the image, then the question) and the answer."""
    value = record.get(fields.image)
    images = _images(value, image_folder) if value is not None else [None]  # None: counted as a missing image
    turns = [
        {"role": "user", "text": IMAGE_PLACEHOLDER * len(images) + _text(record.get(fields.question))},
        {"role": "assistant", "text": most_frequent_answer(record.get(fields.answer))},
    ]
    return Draft(images, turns, [])


_READERS = {"llava": read_llava, "cauldron": read_cauldron, "messages": read_messages, "vqa": read_vqa}


def read_record(record: dict[str, Any], fields: Fields, image_folder: str | None) -> Draft:
    """One record in the schema's shape; raises `RecordSkipped` for a record whose structure is not its format's."""
    return _READERS[fields.format](record, fields, image_folder)
