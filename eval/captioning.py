"""Captioning evaluation: generate a caption per image, score it with the COCO metrics, show it.

Writes `captions.csv` (id, references, generated caption) and `captions.png` (a gallery of images
with the generated and a reference caption). The optional "shuffled" pass captions every image
with another image's pixels (a fixed derangement) and scores it against the original references:
what the model says without the right picture, i.e. how much of the score the caption template
alone earns.
"""

import csv
import json
import math
import random
import textwrap
from collections.abc import Sequence
from pathlib import Path

import evaluate
from PIL import Image

from cli import UserError

from .figures import plt, save_figure
from .generation import CAPTION_PROMPT, generate_texts

METRIC_PATH = Path(__file__).resolve().parent / "metrics" / "coco_caption"


def load_caption_metric() -> evaluate.EvaluationModule:
    """The local COCO caption module (BLEU-1..4, ROUGE-L, CIDEr-D, METEOR with Java); no Hub access."""
    return evaluate.load(str(METRIC_PATH))


def fixed_derangement(group_ids: Sequence, seed: int = 0) -> list[int]:
    """A permutation `perm` with `group_ids[perm[i]] != group_ids[i]` for every i, the same for a given seed.

    The groups are laid out in a seeded random order, each group's members next to each other, and
    every position takes the item `m` places further along (cyclically), `m` being the largest group's
    size: a jump of `m` always leaves the group, and comes back round only if one group holds more
    than half of the items, which makes a derangement impossible (an error then).
    """
    n = len(group_ids)
    members: dict = {}
    for index, group in enumerate(group_ids):
        members.setdefault(group, []).append(index)
    largest = max((len(m) for m in members.values()), default=0)
    if n < 2 or 2 * largest > n:
        raise UserError(
            f"cannot give each of {n} images another scene's picture when one scene holds {largest} of them; "
            "evaluate on more distinct scenes, or turn the shuffled pass off (python -m eval --no-shuffled)"
        )
    groups = list(members)
    random.Random(seed).shuffle(groups)
    order = [index for group in groups for index in members[group]]
    perm = [0] * n
    for place, index in enumerate(order):
        perm[index] = order[(place + largest) % n]
    return perm


def reference_captions(row: dict) -> list[str]:
    """Every caption of a row's image, its own caption first, each once.

    The loader's rows list them all in `references`, caption first (all five of a COCO image); rows from
    elsewhere may list only the other captions (as the shapes generator's JSON does), so the caption is added.
    """
    return list(dict.fromkeys([row["caption"], *(row.get("references") or [])]))


def write_captions_csv(
    path: str | Path, ids: Sequence[str], references: Sequence[Sequence[str]], generated: Sequence[str]
) -> Path:
    """`id, references, generated` rows; the references cell is a JSON list so it reads back exactly."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["id", "references", "generated"])
        for row in zip(ids, references, generated):
            writer.writerow([row[0], json.dumps(list(row[1]), ensure_ascii=False), row[2]])
    return path


def caption_gallery(
    images: Sequence[Image.Image],
    generated: Sequence[str],
    references: Sequence[str],
    path: str | Path,
    columns: int = 4,
) -> Path:
    """A grid of images, each with its generated caption above (blue) and a reference caption below (grey).

    Returns:
        `path`, a PNG of (3.2 * columns) x (4.0 * rows) inches at 100 dpi, rows = ceil(N / columns).
    """
    n = len(images)
    if not n or len(generated) != n or len(references) != n:
        raise ValueError(f"need one generated and one reference caption per image; got {n} images, "
                         f"{len(generated)} generated, {len(references)} references.")
    columns = min(columns, n)
    rows = math.ceil(n / columns)
    height = 4.0 * rows
    # Room in inches for 8 pt text: 0.6 above the first row (3 lines of generated caption), 0.9 below the last
    # (5 lines of reference), 1.4 between rows for both.
    image_height = (height - 0.6 - 0.9 - 1.4 * (rows - 1)) / rows
    fig, axes = plt.subplots(rows, columns, figsize=(3.2 * columns, height), squeeze=False)
    fig.subplots_adjust(left=0.02, right=0.98, top=1 - 0.6 / height, bottom=0.9 / height, hspace=1.4 / image_height,
                        wspace=0.15)
    for ax in axes.flat:
        ax.set_axis_off()
    for ax, image, gen, ref in zip(axes.flat, images, generated, references):
        ax.imshow(image.convert("RGB"))
        gen = "".join(ch for ch in gen if ch.isprintable()) or "(nothing)"  # untrained models write control bytes
        above = textwrap.fill(f"generated: {gen}", 44, max_lines=3, placeholder=" ...")
        below = textwrap.fill(f"reference: {ref}", 44, max_lines=5, placeholder=" ...")
        # parse_math=False: matplotlib reads text between two "$" as TeX, and a model's or a dataset's text ("$5 and
        # $6", an untrained model's "$$") is not TeX: it would fail the whole evaluation at the picture.
        ax.text(0.5, 1.03, above, transform=ax.transAxes, ha="center", va="bottom", fontsize=8, color="tab:blue",
                parse_math=False)
        ax.text(0.5, -0.03, below, transform=ax.transAxes, ha="center", va="top", fontsize=8, color="dimgray",
                parse_math=False)
    return save_figure(fig, path)


def evaluate_captioning(
    model,
    processor,
    rows: Sequence[dict],
    out_dir: str | Path | None = None,
    batch_size: int = 16,
    strategy: str = "greedy",
    max_new_tokens: int = 40,
    shuffled: bool = False,
    gallery_size: int = 8,
    prompt: str = CAPTION_PROMPT,
    meteor: bool | None = None,
    **generate_kwargs,
) -> dict:
    """Captions every row's image and scores the captions against the row's references.

    Args:
        rows: dicts with `"image"` (PIL), `"caption"`, optional `"references"` (more captions of the
            same image; the caption joins them) and `"key"`.
        out_dir: when given, `captions.csv` and `captions.png` go there (and `captions_shuffled.csv`).
        strategy: `"greedy"`, `"beam"` or `"sample"` (see `eval.generation.GENERATION_PRESETS`).
        shuffled: also caption each image with another scene's pixels (`fixed_derangement`).
        meteor: METEOR on/off; `None` computes it when Java is installed (it starts a JVM: seconds).

    Returns:
        `{"captioning": scores, "captions": generated}` and, with `shuffled`, `"captioning_shuffled"`
        and `"captions_shuffled"` likewise. Scores are the coco_caption module's keys.
    """
    images = [row["image"] for row in rows]
    references = [reference_captions(row) for row in rows]
    ids = [str(row.get("key", index)) for index, row in enumerate(rows)]
    metric = load_caption_metric()

    def caption(pictures: list[Image.Image], desc: str) -> list[str]:
        return generate_texts(model, processor, pictures, [prompt] * len(pictures), batch_size=batch_size,
                              strategy=strategy, max_new_tokens=max_new_tokens, desc=desc, **generate_kwargs)

    generated = caption(images, "captioning")
    result = {
        "captioning": metric.compute(predictions=generated, references=references, meteor=meteor),
        "captions": generated,
    }
    if out_dir is not None:
        out_dir = Path(out_dir)
        write_captions_csv(out_dir / "captions.csv", ids, references, generated)
        n = min(gallery_size, len(rows))
        caption_gallery(images[:n], generated[:n], [r[0] for r in references[:n]], out_dir / "captions.png")
    if shuffled:
        groups = [ids[i] if row.get("group_id") is None else row["group_id"] for i, row in enumerate(rows)]
        perm = fixed_derangement(groups)
        wrong = caption([images[j] for j in perm], "captioning (shuffled images)")
        result["captioning_shuffled"] = metric.compute(predictions=wrong, references=references, meteor=meteor)
        result["captions_shuffled"] = wrong
        if out_dir is not None:
            write_captions_csv(out_dir / "captions_shuffled.csv", ids, references, wrong)
    return result
