"""The "shapes" world: scenes of coloured shapes on a 3x3 grid, their pictures, captions and questions.

A scene is 1-3 objects, each with a shape, a colour, a size and a grid cell; at most one object per
cell, so objects never overlap. Everything a sample needs is a pure function of the scene (plus a
`random.Random` where a choice is made), which keeps the generator deterministic and lets evaluation
turn a generated caption back into a scene with `parse_caption` and compare it with the truth.

Vocabulary is deliberately small and lowercase: a tiny from-scratch tokenizer and language model can
learn it, and every caption template carries the full scene, so every caption parses back exactly.
"""

from __future__ import annotations

import random
import re
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, replace

from PIL import Image, ImageDraw

from cli import UserError

SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
# Saturated colours far apart in hue, so a 64 px JPEG keeps them apart.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (30, 80, 225),
    "yellow": (240, 205, 0),
    "purple": (145, 50, 185),
    "orange": (250, 130, 20),
}
SIZES: tuple[str, ...] = ("small", "large")
ROWS: tuple[str, ...] = ("top", "middle", "bottom")
COLS: tuple[str, ...] = ("left", "center", "right")
BACKGROUND: tuple[int, int, int] = (236, 236, 232)
COUNT_WORDS: tuple[str, ...] = ("zero", "one", "two", "three")
MAX_OBJECTS = 3

# Half the extent of a shape as a fraction of a grid cell: large objects fill most of their cell,
# small ones about half as much (under a third of the area), so the two sizes are far apart even at 64 px.
_HALF_EXTENT = {"small": 0.23, "large": 0.42}
# Objects stay inside this fraction of the cell half-width, jitter included, so neighbours never touch.
_CELL_LIMIT = 0.47
_SUPERSAMPLE = 4  # draw 4x larger and reduce: smooth edges without a blur


@dataclass(frozen=True)
class ShapeObject:
    """One object of a scene: what it is and which grid cell holds it."""

    shape: str
    color: str
    size: str
    row: str
    col: str

    @property
    def cell(self) -> int:
        """Reading-order index of the grid cell (0 = top left, 8 = bottom right)."""
        return ROWS.index(self.row) * len(COLS) + COLS.index(self.col)

    @property
    def description(self) -> str:
        """The noun phrase without article, e.g. 'small red circle'."""
        return f"{self.size} {self.color} {self.shape}"


Scene = tuple[ShapeObject, ...]
"""A scene: objects in canonical (reading) order of their cells, at most one per cell."""

_ALLOWED = {"shape": SHAPES, "color": tuple(COLORS), "size": SIZES, "row": ROWS, "col": COLS}


def make_scene(objects: Iterable[ShapeObject]) -> Scene:
    """Put objects in canonical order and check the scene is valid (1-3 objects, distinct cells)."""
    scene = tuple(sorted(objects, key=lambda obj: obj.cell))
    if not 1 <= len(scene) <= MAX_OBJECTS:
        raise ValueError(f"a scene holds 1 to {MAX_OBJECTS} objects, got {len(scene)}")
    if len({obj.cell for obj in scene}) != len(scene):
        raise ValueError(f"two objects share a grid cell in {scene_id(scene)!r}")
    for obj in scene:
        for name, allowed in _ALLOWED.items():
            if getattr(obj, name) not in allowed:
                raise ValueError(f"unknown {name} {getattr(obj, name)!r}; choose one of {', '.join(allowed)}")
    return scene


def scene_id(scene: Sequence[ShapeObject]) -> str:
    """Canonical text id: equal for two samples exactly when their scenes are equal."""
    return "|".join(f"{obj.row}-{obj.col}:{obj.size}-{obj.color}-{obj.shape}" for obj in scene)


def scene_to_json(scene: Scene) -> list[dict[str, str]]:
    """The scene as a JSON-ready list of {shape, color, size, row, col}, in canonical order."""
    return [asdict(obj) for obj in scene]


def scene_from_json(objects: Iterable[dict[str, str]]) -> Scene:
    """Inverse of `scene_to_json`."""
    return make_scene(ShapeObject(**obj) for obj in objects)


# ----------------------------------------------------------------------------------------------
# Held-out attribute combinations
# ----------------------------------------------------------------------------------------------

Holdout = frozenset[tuple[str, str]]
"""A set of (attribute, value) pairs; an object matches when it has all of them."""

_ATTRIBUTE_OF_WORD = {
    **{word: "shape" for word in SHAPES},
    **{word: "color" for word in COLORS},
    **{word: "size" for word in SIZES},
}


def parse_holdout(text: str) -> Holdout:
    """Turn e.g. 'green triangle' or 'large blue' into a holdout rule."""
    words = text.lower().split()
    unknown = [word for word in words if word not in _ATTRIBUTE_OF_WORD]
    if not words or unknown:
        raise UserError(
            f"cannot read holdout {text!r}: unknown words {unknown or '(none given)'}; use shape, colour "
            f"and size words such as 'green triangle' from: {', '.join(_ATTRIBUTE_OF_WORD)}"
        )
    attributes = [_ATTRIBUTE_OF_WORD[word] for word in words]
    if len(set(attributes)) != len(attributes):
        raise UserError(f"holdout {text!r} names the same attribute twice; give at most one shape, colour, size")
    return frozenset(zip(attributes, words))


def is_held_out(obj: ShapeObject, holdouts: Iterable[Holdout]) -> bool:
    """True when the object matches any of the holdout rules."""
    return any(all(getattr(obj, attr) == value for attr, value in rule) for rule in holdouts)


# ----------------------------------------------------------------------------------------------
# Scenes and pictures
# ----------------------------------------------------------------------------------------------


def _random_object(rng: random.Random, row: str, col: str, holdouts: Sequence[Holdout]) -> ShapeObject:
    # Rejection keeps the distribution uniform over the allowed combinations.
    while True:
        obj = ShapeObject(rng.choice(SHAPES), rng.choice(tuple(COLORS)), rng.choice(SIZES), row, col)
        if not is_held_out(obj, holdouts):
            return obj


def generate_scene(rng: random.Random, *, holdouts: Sequence[Holdout] = ()) -> Scene:
    """Draw 1-3 objects (uniform count) in distinct random cells, avoiding held-out combinations."""
    count = rng.randint(1, MAX_OBJECTS)
    cells = rng.sample(range(len(ROWS) * len(COLS)), count)
    return make_scene(
        _random_object(rng, ROWS[cell // len(COLS)], COLS[cell % len(COLS)], holdouts) for cell in cells
    )


def render(scene: Sequence[ShapeObject], size: int = 64, rng: random.Random | None = None) -> Image.Image:
    """Draw the scene as an RGB image of `size` x `size` pixels.

    Without `rng` the picture is a pure function of the scene. With it, each object moves and scales
    a little inside its cell (never enough to leave it), so equal scenes give varied pictures.
    """
    canvas_size = size * _SUPERSAMPLE
    canvas = Image.new("RGB", (canvas_size, canvas_size), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    cell = canvas_size / len(COLS)
    for obj in scene:
        half = _HALF_EXTENT[obj.size] * (rng.uniform(0.92, 1.08) if rng else 1.0)
        slack = max(_CELL_LIMIT - half, 0.0)
        dx, dy = (rng.uniform(-slack, slack), rng.uniform(-slack, slack)) if rng else (0.0, 0.0)
        cx = (COLS.index(obj.col) + 0.5 + dx) * cell
        cy = (ROWS.index(obj.row) + 0.5 + dy) * cell
        r = half * cell
        fill = COLORS[obj.color]
        if obj.shape == "circle":
            draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
        elif obj.shape == "square":
            side = r * 0.9  # a square of the same extent looks bigger than a circle; even them out
            draw.rectangle((cx - side, cy - side, cx + side, cy + side), fill=fill)
        else:
            draw.polygon(((cx, cy - r), (cx + r, cy + r * 0.8), (cx - r, cy + r * 0.8)), fill=fill)
    return canvas.reduce(_SUPERSAMPLE)


# ----------------------------------------------------------------------------------------------
# Captions
# ----------------------------------------------------------------------------------------------


def position_phrase(row: str, col: str) -> str:
    """'top left', 'bottom center', ...; the middle cell is just 'center'."""
    return "center" if (row, col) == ("middle", "center") else f"{row} {col}"


def _join(parts: Sequence[str]) -> str:
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def _count_phrase(n: int) -> str:
    return f"{COUNT_WORDS[n]} shape{'s' if n > 1 else ''}"


# Every template names an object's size and shape first, then its colour, and its position last ("a small triangle
# that is green in the top left"): colour never directly follows the size or the shape. With "a small green
# triangle", the language model predicts the shape right after the colour word, and training text in which "green" is
# never followed by "triangle" taught it to write "green square" for a green triangle it had never seen (few named
# right in whole runs; with the colour named apart, stage 2 on one stage-1 model named most of them right,
# docs/tiny-recipe.md rounds seven and eight). The position comes after the whole description, as "where is the
# small green triangle?" asks: with only stage 2 retrained on two stage-1 models, position answers were better than
# with the position between the shape and the colour (round nine).
# Each template is (its opening, one object's words, at most 10); the objects are joined with commas and "and", and
# the opening may name their count. Every template names every attribute of every object, so each parses back exactly.
TEMPLATES = (
    ("", "a {size} {shape} that is {color} in the {where}"),
    ("{count}: ", "a {size} {shape} colored {color} at the {where}"),
    ("", "the {size} {shape} in {color} is in the {where}"),
    ("an image of ", "a {size} {shape} in {color} at the {where}"),
    ("", "a {size} {shape} painted {color} at the {where}"),
)


# The same five paraphrases with each object named "size colour shape" ("a small green triangle in the top left"),
# for stage 1's contrastive text encoder: its two layers bind the colour to its object best when the two words are
# adjacent (R@1 fell the more words stood between them), and the language model trained on a stage 1 that read this
# order answered position questions better than on one that read the colour last (docs/tiny-recipe.md, round
# eight).
COLOR_FIRST_TEMPLATES = (
    ("", "a {size} {color} {shape} in the {where}"),
    ("{count}: ", "a {size} {color} {shape} at the {where}"),
    ("", "the {where} has a {size} {color} {shape}"),
    ("an image of ", "a {size} {color} {shape} at the {where}"),
    ("", "in the {where} there is a {size} {color} {shape}"),
)


def caption_for(scene: Sequence[ShapeObject], template_id: int, *, color_first: bool = False) -> str:
    """Caption of the scene with template `template_id` (0 .. len(TEMPLATES) - 1); `color_first` takes the
    template's "size colour shape" form (`COLOR_FIRST_TEMPLATES`)."""
    templates = COLOR_FIRST_TEMPLATES if color_first else TEMPLATES
    if not 0 <= template_id < len(templates):
        raise ValueError(f"template_id {template_id} out of range; there are {len(templates)} templates")
    scene = make_scene(scene)
    opening, words = templates[template_id]
    objects = [words.format(size=o.size, color=o.color, shape=o.shape, where=position_phrase(o.row, o.col))
               for o in scene]
    return opening.format(count=_count_phrase(len(scene))) + _join(objects)


# An object's words may come in any order within its clause ("a small green triangle in the top left", "a small
# triangle in the top left that is green").
_ATTRIBUTE_RES = tuple(
    re.compile(rf"\b({'|'.join(words)}){suffix}\b") for words, suffix in ((SIZES, ""), (COLORS, ""), (SHAPES, "s?"))
)
_POSITION_RE = re.compile(
    rf"\b(?:({'|'.join(ROWS)})\s+({'|'.join(COLS)}|centre)|(center|centre))\b"
)
_COUNT_RE = re.compile(rf"\b({'|'.join(COUNT_WORDS[1:])})\s+shapes?\b")
_CLAUSE_SPLIT_RE = re.compile(r"[,;:.!?]|\band\b")


def parse_caption(text: str) -> Scene | None:
    """Read a caption back into a scene, or None when it does not describe one completely.

    Tolerant of form: any template, upper case, extra spaces or punctuation, filler words. Strict
    on content: each clause must name one object (size, colour, shape) and its position, no cell
    twice, and a stated count ("two shapes") must match.
    """
    if not isinstance(text, str):
        return None
    objects: list[ShapeObject] = []
    stated_count = None
    for clause in _CLAUSE_SPLIT_RE.split(text.lower()):
        found_attributes = [regex.findall(clause) for regex in _ATTRIBUTE_RES]
        found_positions = _POSITION_RE.findall(clause)
        counts = _COUNT_RE.findall(clause)
        if counts:
            if stated_count is not None or len(counts) > 1:
                return None
            stated_count = COUNT_WORDS.index(counts[0])
        if not any(found_attributes) and not found_positions:
            continue
        if any(len(found) != 1 for found in found_attributes) or len(found_positions) != 1:
            return None
        (size,), (color,), (shape,) = found_attributes
        row, col, center = found_positions[0]
        row, col = ("middle", "center") if center else (row, "center" if col == "centre" else col)
        objects.append(ShapeObject(shape, color, size, row, col))
    if not objects or len(objects) > MAX_OBJECTS or len({o.cell for o in objects}) != len(objects):
        return None
    if stated_count is not None and stated_count != len(objects):
        return None
    return make_scene(objects)


# ----------------------------------------------------------------------------------------------
# Hard negatives and questions
# ----------------------------------------------------------------------------------------------


def _other(rng: random.Random, values: Sequence[str], current: str) -> str:
    return rng.choice([v for v in values if v != current])


def _changed(
    rng: random.Random, scene: Scene, index: int, attribute: str, holdouts: Sequence[Holdout]
) -> Scene | None:
    """The scene with one attribute of object `index` changed to another allowed value."""
    obj = scene[index]
    if attribute == "cell":
        free = [(r, c) for r in ROWS for c in COLS if all((o.row, o.col) != (r, c) for o in scene)]
        row, col = rng.choice(free)
        candidates = [replace(obj, row=row, col=col)]
    else:
        values = {"color": tuple(COLORS), "shape": SHAPES, "size": SIZES}[attribute]
        candidates = [replace(obj, **{attribute: v}) for v in values if v != getattr(obj, attribute)]
        rng.shuffle(candidates)
    for candidate in candidates:
        if not is_held_out(candidate, holdouts):
            return make_scene([*scene[:index], candidate, *scene[index + 1 :]])
    return None


def negative_scenes(rng: random.Random, scene: Scene, holdouts: Sequence[Holdout] = ()) -> list[Scene]:
    """Scenes that differ from `scene` in exactly one attribute of one object.

    Colour matters most (a contrastive model learns count, size and position first and drops
    colour), so every object gets a colour change; one object each gets a shape, a size and a
    position change. Changes that would produce a held-out combination are avoided.
    """
    changes = [(i, "color") for i in range(len(scene))]
    changes += [(rng.randrange(len(scene)), attribute) for attribute in ("shape", "size", "cell")]
    negatives = (_changed(rng, scene, i, attribute, holdouts) for i, attribute in changes)
    return [negative for negative in negatives if negative is not None]


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def questions_for(
    scene: Sequence[ShapeObject], rng: random.Random, holdouts: Sequence[Holdout] = ()
) -> list[dict[str, str]]:
    """Question-answer pairs about the scene, each {"question", "answer", "type", "about"}.

    Types: count, color (one per object, asked by shape and position, which forces binding),
    shape, size, position (asked only of an object whose description is unique), exists (one yes,
    one no; the "no" never names a held-out combination).

    "about" is the noun phrase of the object asked about, so evaluation can tell questions about
    held-out combinations apart: the drawn object's description ("small green triangle") for
    color/shape/size/position and the exists-"yes" question, the colour and shape named by the
    exists-"no" question ("green triangle": no object is drawn), "" for the count question.
    """
    scene = make_scene(scene)
    qa = [{"question": "how many shapes are there?", "answer": COUNT_WORDS[len(scene)], "type": "count", "about": ""}]
    for obj in scene:
        where = position_phrase(obj.row, obj.col)
        qa.append({"question": f"what color is the {obj.shape} in the {where}?", "answer": obj.color, "type": "color",
                   "about": obj.description})
    obj = rng.choice(scene)
    qa.append({"question": f"what shape is in the {position_phrase(obj.row, obj.col)}?", "answer": obj.shape,
               "type": "shape", "about": obj.description})
    obj = rng.choice(scene)
    qa.append(
        {
            "question": f"what size is the {obj.shape} in the {position_phrase(obj.row, obj.col)}?",
            "answer": obj.size,
            "type": "size",
            "about": obj.description,
        }
    )
    unique = [o for o in scene if sum(other.description == o.description for other in scene) == 1]
    if unique:
        obj = rng.choice(unique)
        qa.append(
            {
                "question": f"where is the {obj.description}?",
                "answer": position_phrase(obj.row, obj.col),
                "type": "position",
                "about": obj.description,
            }
        )
    obj = rng.choice(scene)
    question = f"is there {_article(obj.color)} {obj.color} {obj.shape}?"
    qa.append({"question": question, "answer": "yes", "type": "exists", "about": obj.description})
    present = {(o.color, o.shape) for o in scene}
    absent = [
        (color, shape)
        for color in COLORS
        for shape in SHAPES
        if (color, shape) not in present
        and not any(is_held_out(ShapeObject(shape, color, size, "top", "left"), holdouts) for size in SIZES)
    ]
    if absent:  # empty only when holdouts cover nearly every colour-shape pair
        color, shape = rng.choice(absent)
        qa.append({"question": f"is there {_article(color)} {color} {shape}?", "answer": "no", "type": "exists",
                   "about": f"{color} {shape}"})
    return qa
