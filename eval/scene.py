"""Caption-vs-scene checks for the synthetic shapes data: does the generated caption describe the picture?

Each generated caption is read back into a scene with `data.shapes.parse_caption` and compared with
the scene that was drawn. Exact match asks for every object with all its attributes and no extra
object; the object-level scores give partial credit (an object counts when shape, colour, size and
cell all agree), pooled over the whole set (micro average). On data generated with held-out
combinations the recall is also split by object: seen in training or held out.
"""

from collections.abc import Sequence

from data.shapes import Holdout, Scene, is_held_out, parse_caption


def caption_scene_metrics(
    generated: Sequence[str], scenes: Sequence[Scene], holdouts: Sequence[Holdout] = ()
) -> dict[str, float]:
    """Scores generated captions against the true scenes.

    Args:
        holdouts: the rules of the combinations held out of training; when given, the true objects are pooled
            into seen and held-out ones (`data.shapes.is_held_out`) and each pool gets its own recall.

    Returns:
        `scene_exact_match` (fraction of captions whose parsed scene equals the truth), `parse_rate`
        (fraction that parse at all), and `object_precision`, `object_recall`, `object_f1` over the
        pooled objects (a caption that does not parse names no objects). With `holdouts` also
        `object_recall_seen`, `object_recall_held_out` and the pools' sizes `objects_seen`, `objects_held_out`.
    """
    if len(generated) != len(scenes):
        raise ValueError(f"{len(generated)} captions for {len(scenes)} scenes; give one caption per scene.")
    if not scenes:
        raise ValueError("no scenes to compare with; the evaluation rows hold no synthetic scenes.")
    exact = parsed = predicted = 0
    # held out? -> [recalled, total] true objects
    pools = {False: [0, 0], True: [0, 0]}
    for caption, scene in zip(generated, scenes):
        found = parse_caption(caption)
        truth = set(scene)
        named = set(found) if found is not None else set()
        for obj in truth:
            pool = pools[is_held_out(obj, holdouts)]
            pool[0] += obj in named
            pool[1] += 1
        if found is None:
            continue
        parsed += 1
        exact += named == truth
        predicted += len(found)
    true_positives = pools[False][0] + pools[True][0]
    precision = true_positives / predicted if predicted else 0.0
    recall = true_positives / (pools[False][1] + pools[True][1])
    metrics = {
        "scene_exact_match": exact / len(scenes),
        "parse_rate": parsed / len(scenes),
        "object_precision": precision,
        "object_recall": recall,
        "object_f1": 2 * precision * recall / (precision + recall) if precision + recall else 0.0,
    }
    if holdouts:
        for name, (recalled, total) in (("seen", pools[False]), ("held_out", pools[True])):
            if not total:
                raise ValueError(f"the scenes hold no {name.replace('_', '-')} object; the seen vs held-out recall "
                                 "needs both kinds (evaluate more samples, or pass no holdouts)")
            metrics[f"object_recall_{name}"] = recalled / total
            metrics[f"objects_{name}"] = total
    return metrics
