"""Seen vs held-out: which parts of an evaluation on shapes data involve a combination held out of training.

`python -m data.synthetic --holdout "green triangle"` keeps the combination out of every training image, caption,
hard negative and question, records it in `<data>/generation.json`, and still draws it in validation and test. A
model that composes attributes scores on held-out objects about as well as on seen ones. This module reads the
rules back and tells held-out rows (their scene holds a held-out object) and questions (about such an object)
apart; the scoring itself stays in `scene`, `vqa` and `retrieval`, which take the flags.
"""

import json
import logging
from collections.abc import Callable, Sequence
from pathlib import Path

from cli import UserError
from data.shapes import Holdout, is_held_out, parse_caption

logger = logging.getLogger(__name__)

# Written by `data.synthetic.generate_dataset` at the data root.
GENERATION_FILE = "generation.json"


def recorded_holdouts(data: str | Path) -> list[str]:
    """The holdouts recorded in `<data>/generation.json`, e.g. `["green triangle", "large blue"]`; their rules
    come from `data.shapes.parse_holdout`.

    Returns:
        `[]` when `data` has no such file (not a local folder, not generated here) or was generated without
        holdouts.
    """
    path = Path(data) / GENERATION_FILE
    if not path.is_file():
        return []
    try:
        summary = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UserError(f"cannot read {path} ({err}); regenerate the data with python -m data.synthetic, or remove "
                        "the file to evaluate without the seen vs held-out split") from err
    holdouts = summary.get("holdouts", []) if isinstance(summary, dict) else None
    if not isinstance(holdouts, list) or not all(isinstance(text, str) for text in holdouts):
        raise UserError(f"{path}: 'holdouts' must be a list of strings such as 'green triangle', got {holdouts!r}; "
                        "regenerate the data with python -m data.synthetic")
    return holdouts


def row_has_held_out(row: dict, rules: Sequence[Holdout]) -> bool:
    """True when the row's scene (read from its caption) holds an object matching a rule.

    A caption that does not parse as a shapes scene shows no held-out object.
    """
    scene = parse_caption(row["caption"])
    return scene is not None and any(is_held_out(obj, rules) for obj in scene)


def question_is_held_out(qa: dict, rules: Sequence[Holdout]) -> bool:
    """True when the question's `"about"` phrase ("small green triangle", "green triangle", "") matches a rule:
    every (attribute, value) of the rule is among the phrase's words.

    Comparing values alone is enough: the shape, colour and size vocabularies share no word.
    """
    words = set(qa["about"].split())
    return any(all(value in words for _, value in rule) for rule in rules)


def held_out_rows(rows: Sequence[dict], rules: Sequence[Holdout]) -> list[bool] | None:
    """One flag per row, True when its scene holds a held-out object (`row_has_held_out`).

    Returns:
        None, meaning no seen vs held-out split, when there are no rules, or (with a warning) when the rows are
        not of both kinds, as a handful of samples may be.
    """
    if not rules:
        return None
    flags = [row_has_held_out(row, rules) for row in rows]
    if all(flags) or not any(flags):
        logger.warning(
            "no seen vs held-out scores: %d of the %d evaluated rows show a held-out combination and both kinds are "
            "needed; evaluate more samples", sum(flags), len(flags),
        )
        return None
    return flags


def held_out_question_test(rows: Sequence[dict], rules: Sequence[Holdout]) -> Callable[[dict], bool] | None:
    """`question_is_held_out` bound to `rules`, for `eval.vqa.evaluate_vqa(held_out=...)`.

    Returns:
        None, meaning no held-out VQA scores, (with a warning) when some question has no `"about"` text: data
        generated before the field existed, or loaded by code that drops it.
    """
    # A loader with a fixed schema may fill a missing field with None rather than leave it out.
    if all(isinstance(qa.get("about"), str) for row in rows for qa in row.get("qa") or []):
        return lambda qa: question_is_held_out(qa, rules)
    logger.warning("no held-out VQA scores: some questions carry no 'about' text (the object each is about); data "
                   "generated before the field existed needs regenerating with python -m data.synthetic")
    return None


__all__ = [
    "GENERATION_FILE", "held_out_question_test", "held_out_rows", "question_is_held_out",
    "recorded_holdouts", "row_has_held_out",
]
