"""Caption-vs-scene checks for the synthetic shapes data: does the generated caption describe the picture?

Each generated caption is read back into a scene with `data.shapes.parse_caption` and compared with
the scene that was drawn. Exact match asks for every object with all its attributes and no extra
object; the object-level scores give partial credit (an object counts when shape, colour, size and
cell all agree), pooled over the whole set (micro average).
"""

from collections.abc import Sequence

from data.shapes import Scene, parse_caption


def caption_scene_metrics(generated: Sequence[str], scenes: Sequence[Scene]) -> dict[str, float]:
    """Scores generated captions against the true scenes.

    Returns:
        `scene_exact_match` (fraction of captions whose parsed scene equals the truth), `parse_rate`
        (fraction that parse at all), and `object_precision`, `object_recall`, `object_f1` over the
        pooled objects (a caption that does not parse names no objects).
    """
    if len(generated) != len(scenes):
        raise ValueError(f"{len(generated)} captions for {len(scenes)} scenes; give one caption per scene.")
    if not scenes:
        raise ValueError("no scenes to compare with; the evaluation rows hold no synthetic scenes.")
    exact = parsed = true_positives = predicted = actual = 0
    for caption, scene in zip(generated, scenes):
        found = parse_caption(caption)
        truth = set(scene)
        actual += len(truth)
        if found is None:
            continue
        parsed += 1
        exact += set(found) == truth
        predicted += len(found)
        true_positives += len(set(found) & truth)
    precision = true_positives / predicted if predicted else 0.0
    recall = true_positives / actual
    return {
        "scene_exact_match": exact / len(scenes),
        "parse_rate": parsed / len(scenes),
        "object_precision": precision,
        "object_recall": recall,
        "object_f1": 2 * precision * recall / (precision + recall) if precision + recall else 0.0,
    }
