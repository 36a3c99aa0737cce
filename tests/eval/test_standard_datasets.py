"""`python -m eval` on data laid out like the standard sets: COCO Karpathy (captions) and Flickr30k (retrieval).

One row per image with a list of five reference captions, mapped with --image-column/--caption-column/--id-column.
The pictures are shapes scenes; the numbers are checked against a direct computation: pycocoevalcap's scorers on the
captions read back from captions.csv against all five references, and Recall@K from the similarity matrix by the
standard protocol in numpy.
"""

import csv
import json
import random

import numpy as np
import pytest
import torch
from datasets import Dataset, Features, Image, List, Value
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider

from cli import UserError
from data.shapes import TEMPLATES, caption_for, generate_scene, render, scene_id
from eval.__main__ import main
from eval.generation import CAPTION_PROMPT
from eval.metrics.coco_caption.coco_caption import coco_tokenize
from eval.retrieval import RECALL_AT
from tests.conftest import tiny_qformer_and_processor, tiny_vlm_and_processor
from training.conversation_collator import ConversationCollator

NUM_IMAGES = 8
# The template the VLM is taught to caption with. It is never an image's first caption (the row's `caption`), so
# scores against the first caption alone differ from scores against all five.
TAUGHT_TEMPLATE = 2


@pytest.fixture(scope="module")
def scenes():
    """Distinct scenes as (32-pixel pictures, five captions each: template 0 first, the other four rotated)."""
    rng = random.Random(7)
    chosen = {}
    while len(chosen) < NUM_IMAGES:
        scene = generate_scene(rng)
        chosen.setdefault(scene_id(scene), scene)
    pictures, captions = [], []
    others = list(range(1, len(TEMPLATES)))
    for i, scene in enumerate(chosen.values()):
        pictures.append(render(scene, 32, rng))
        turn = i % len(others)
        captions.append([caption_for(scene, t) for t in [0, *others[turn:], *others[:turn]]])
    return pictures, captions, [caption_for(scene, TAUGHT_TEMPLATE) for scene in chosen.values()]


@pytest.fixture(scope="module")
def coco_karpathy(scenes, tmp_path_factory):
    """A parquet file with yerevann/coco-karpathy's columns: the image is a URL (here file://), captions a list."""
    pictures, captions, _ = scenes
    folder = tmp_path_factory.mktemp("coco")
    ids = [391895 + 17 * i for i in range(NUM_IMAGES)]
    names = [f"COCO_val2014_{cocoid:012d}.jpg" for cocoid in ids]
    for picture, name in zip(pictures, names):
        picture.save(folder / name, quality=95)
    Dataset.from_dict({
        "filepath": ["val2014"] * NUM_IMAGES, "sentids": [list(range(5 * i, 5 * i + 5)) for i in range(NUM_IMAGES)],
        "filename": names, "imgid": list(range(NUM_IMAGES)), "split": ["test"] * NUM_IMAGES, "sentences": captions,
        "cocoid": ids, "url": [(folder / name).as_uri() for name in names],
    }).to_parquet(folder / "test.parquet")
    return folder / "test.parquet", ids


@pytest.fixture(scope="module")
def flickr30k(scenes, tmp_path_factory):
    """A saved dataset with nlphuji/flickr30k's columns: an Image column, a list of five captions, a string id."""
    pictures, captions, _ = scenes
    folder = tmp_path_factory.mktemp("flickr30k") / "test"
    features = Features({"image": Image(), "caption": List(Value("string")), "img_id": Value("string"),
                         "filename": Value("string")})
    Dataset.from_dict({
        "image": pictures, "caption": captions, "img_id": [str(1000 + i) for i in range(NUM_IMAGES)],
        "filename": [f"{1000092795 + i}.jpg" for i in range(NUM_IMAGES)],
    }, features=features).save_to_disk(str(folder))
    return folder


@pytest.fixture(scope="module")
def qformer(tmp_path_factory):
    model, processor = tiny_qformer_and_processor()
    folder = tmp_path_factory.mktemp("qformer")
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder, model, processor


def _taught_vlm(pictures, taught, folder):
    """A tiny VLM shown each picture with its `TAUGHT_TEMPLATE` caption for 30 steps: it then writes that template's
    words with partly wrong objects, so the scores are neither zero nor perfect."""
    model, processor = tiny_vlm_and_processor()
    collator = ConversationCollator(processor, qa_turns=0, instructions=[CAPTION_PROMPT])
    batch = collator([{"image": p, "caption": c, "key": str(i)} for i, (p, c) in enumerate(zip(pictures, taught))])
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    model.train()
    for _ in range(30):
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def _coco_scores(generated: list[str], references: list[list[str]]) -> tuple[float, float]:
    """BLEU-4 and CIDEr-D straight from pycocoevalcap, on the caption metric's tokenization."""
    res = {i: [coco_tokenize(g)] for i, g in enumerate(generated)}
    gts = {i: [coco_tokenize(r) for r in refs] for i, refs in enumerate(references)}
    return Bleu(4).compute_score(gts, res, verbose=0)[0][3], Cider().compute_score(gts, res)[0]


def test_coco_karpathy_captions_are_scored_against_all_five_references(scenes, coco_karpathy, tmp_path):
    pictures, captions, taught = scenes
    parquet, ids = coco_karpathy
    vlm = _taught_vlm(pictures, taught, tmp_path / "vlm")
    out = tmp_path / "report"
    metrics = main(["--model", str(vlm), "--data", str(parquet), "--image-column", "url",
                    "--caption-column", "sentences", "--id-column", "cocoid", "--out", str(out), "--no-shuffled",
                    "--max-new-tokens", "20", "--batch-size", "4", "--meteor", "off"])
    assert metrics["meta"]["num_samples"] == NUM_IMAGES

    with (out / "captions.csv").open(newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert [r["id"] for r in rows] == [str(i) for i in ids]  # the cocoid names each image
    assert [json.loads(r["references"]) for r in rows] == captions  # all five, in the data's order
    generated = [r["generated"] for r in rows]
    bleu_4, cider = _coco_scores(generated, captions)
    assert metrics["captioning"]["bleu_4"] == pytest.approx(bleu_4)
    assert metrics["captioning"]["cider"] == pytest.approx(cider)
    # The comparison can tell the references apart: the model writes the taught template, never a first caption.
    assert bleu_4 > 0 and cider > 0
    first_only = _coco_scores(generated, [c[:1] for c in captions])
    assert first_only[0] < bleu_4 and first_only[1] != pytest.approx(cider)


def _standard_recalls(similarity: np.ndarray, owner: np.ndarray) -> dict[str, float]:
    """Recall@K and ranks by the COCO/Flickr30k protocol: `similarity` is (images, texts), `owner[t]` the image of
    text t. Text -> image: the rank of the text's own image. Image -> text: the best rank among the image's texts."""
    num_images, num_texts = similarity.shape
    own_score = similarity[owner, np.arange(num_texts)]
    t2i = 1 + (similarity > own_score[None, :]).sum(axis=0)
    text_rank = np.empty_like(similarity, dtype=int)  # text_rank[i, t]: place of text t in image i's ranking
    np.put_along_axis(text_rank, np.argsort(-similarity, axis=1), np.arange(1, num_texts + 1)[None, :], axis=1)
    i2t = np.array([text_rank[i, owner == i].min() for i in range(num_images)])
    result = {}
    for name, ranks in (("i2t", i2t), ("t2i", t2i)):
        result |= {f"{name}_r{k}": float(np.mean(ranks <= k)) for k in RECALL_AT}
        result |= {f"{name}_mean_rank": float(ranks.mean()), f"{name}_median_rank": float(np.median(ranks))}
    return result


def test_flickr30k_retrieval_counts_each_of_the_five_captions(scenes, flickr30k, qformer, tmp_path):
    pictures, captions, _ = scenes
    folder, model, processor = qformer
    out = tmp_path / "report"
    metrics = main(["--model", str(folder), "--data", str(flickr30k), "--caption-column", "caption",
                    "--id-column", "img_id", "--retrieval-texts", "references", "--out", str(out),
                    "--batch-size", "3"])

    texts = [c for image_captions in captions for c in image_captions]
    owner = np.repeat(np.arange(NUM_IMAGES), [len(c) for c in captions])
    model.eval()
    with torch.no_grad():  # one unbatched pass of the in-memory model
        pixels = processor.image_processor(images=pictures, return_tensors="pt")["pixel_values"]
        tokens = processor.tokenizer(texts, padding=True, return_tensors="pt")
        similarity = model.similarity(model.get_image_embeds(pixels),
                                      model.get_text_embeds(tokens["input_ids"], tokens["attention_mask"]))
    assert len(np.unique(similarity.numpy())) == similarity.numel()  # no ties: the plain protocol is exact here
    expected = _standard_recalls(similarity.numpy(), owner)
    assert {k: metrics["retrieval"][k] for k in expected} == pytest.approx(expected, abs=1e-6)
    assert metrics["retrieval"]["num_images"] == NUM_IMAGES and metrics["retrieval"]["num_pairs"] == 5 * NUM_IMAGES
    assert "any caption of its image is in the top K" in (out / "report.md").read_text()
    # The comparison can tell the protocols apart: one caption per image (each image's first) scores otherwise.
    assert _standard_recalls(similarity.numpy()[:, ::5], np.arange(NUM_IMAGES)) != pytest.approx(expected)


@pytest.mark.parametrize(
    ("flag", "wrong", "message"),
    [
        ("--caption-column", "sentence", "caption column 'sentence' not found in {data} (did you mean sentences?)"),
        ("--image-column", "image", "image column 'image' not found in {data}"),
        ("--id-column", "coco_id", "id column 'coco_id' not found in {data} (did you mean cocoid?)"),
    ],
)
def test_a_wrong_column_name_is_one_line_listing_the_columns(coco_karpathy, qformer, tmp_path, flag, wrong, message):
    parquet, _ = coco_karpathy
    arguments = {"--image-column": "url", "--caption-column": "sentences", flag: wrong}
    with pytest.raises(UserError) as error:
        main(["--model", str(qformer[0]), "--data", str(parquet), "--out", str(tmp_path),
              *[part for item in arguments.items() for part in item]])
    text = str(error.value)
    assert "\n" not in text and text.startswith(message.format(data=parquet))
    assert text.endswith("; columns are: filepath, sentids, filename, imgid, split, sentences, cocoid, url")
