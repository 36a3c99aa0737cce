"""Hooks of the exported lmms-eval tasks: the prompts and scores of `python -m eval`, reused rather than restated.

lmms-eval loads this file by its path (`!function shapes.<name>` in the templates beside it), outside any package,
so the project's modules are imported by their absolute names.
"""

from eval.captioning import load_caption_metric
from eval.generation import CAPTION_PROMPT
from eval.vqa import vqa_accuracy


def doc_to_visual(doc: dict) -> list:
    return [doc["image"].convert("RGB")]


def caption_prompt(doc: dict) -> str:
    return CAPTION_PROMPT


def vqa_process_results(doc: dict, results: list[str]) -> dict:
    """`accuracy` (equal after `eval.vqa.normalize_answer`: the VQA accuracy `python -m eval` reports) and
    `exact_match` (equal stripped strings) of one answer."""
    scores = vqa_accuracy(results[:1], [doc["answer"]])
    return {"accuracy": scores["accuracy"], "exact_match": scores["exact_match"]}


def caption_process_results(doc: dict, results: list[str]) -> dict:
    return {"cider": {"prediction": results[0].strip(), "references": doc["references"]}}


def cider(items: list[dict]) -> float:
    """CIDEr-D of the whole set in one call, with `python -m eval`'s metric: its IDF weights come from all the
    references, so it cannot be a mean of per-caption scores."""
    scores = load_caption_metric().compute(
        predictions=[item["prediction"] for item in items],
        references=[item["references"] for item in items],
        meteor=False,
    )
    return scores["cider"]
