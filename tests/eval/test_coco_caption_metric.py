"""The local `coco_caption` evaluate module gives pycocoevalcap's own numbers, offline."""

import json
import os
import subprocess
import sys
from pathlib import Path

import evaluate
import pytest
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.rouge.rouge import Rouge

from eval.metrics.coco_caption.coco_caption import coco_tokenize

METRIC_DIR = Path(__file__).resolve().parents[2] / "eval" / "metrics" / "coco_caption"

# Six images x five references, already in coco-tokenized form (lowercase, no punctuation), so the
# direct pycocoevalcap call below needs no tokenizer of ours. The predictions mix exact hits,
# partial overlaps and a miss so that every n-gram order and the CIDEr length penalty matter.
REFERENCES = [
    ["a red circle at the top left", "one red circle in the top left corner", "a small red circle",
     "a red round shape top left", "there is a red circle near the top left"],
    ["two blue squares", "a pair of blue squares", "two blue squares side by side",
     "blue squares two of them", "two small blue squares in the middle"],
    ["a green triangle and a yellow circle", "a yellow circle next to a green triangle",
     "green triangle with a yellow circle", "a triangle and a circle", "one green triangle one yellow circle"],
    ["an empty grey picture", "nothing in the image", "a blank image", "no shapes at all", "an empty scene"],
    ["a large purple square at the bottom", "a big purple square near the bottom",
     "purple square bottom centre", "one large purple square", "a large square in purple at the bottom"],
    ["three orange circles", "three small orange circles", "a few orange circles",
     "three circles coloured orange", "orange circles three of them"],
]
PREDICTIONS = [
    "a red circle at the top left",
    "two blue squares in the middle",
    "a green triangle next to a circle",
    "a red square",
    "a large purple square at the bottom right corner",
    "three orange circles",
]


# Slow tier (`make test`, not `make test-fast`): runs pycocoevalcap's Java tools.
pytestmark = pytest.mark.slow


def _pycocoevalcap_direct(predictions: list[str], references: list[list[str]]) -> dict[str, float]:
    """The reference numbers: pycocoevalcap's scorers called as coco-caption's COCOEvalCap calls them."""
    gts = {i: refs for i, refs in enumerate(references)}
    res = {i: [p] for i, p in enumerate(predictions)}
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    return {
        **{f"bleu_{n + 1}": b for n, b in enumerate(bleu)},
        "rouge_l": Rouge().compute_score(gts, res)[0],
        "cider": Cider().compute_score(gts, res)[0],
    }


def _untidy(caption: str) -> str:
    """A capitalised, punctuated spelling of a clean caption that coco tokenization must undo."""
    return caption[0].upper() + caption[1:].replace(" two ", ", two ") + "."


@pytest.fixture(scope="module")
def metric():
    return evaluate.load(str(METRIC_DIR))


def test_scores_equal_pycocoevalcap_called_directly(metric):
    direct = _pycocoevalcap_direct(PREDICTIONS, REFERENCES)
    ours = metric.compute(
        predictions=[_untidy(p) for p in PREDICTIONS],
        references=[[_untidy(r) for r in refs] for refs in REFERENCES],
        meteor=False,
    )
    print("\n".join(f"{k:8s} module {ours[k]:.12f}  pycocoevalcap {direct[k]:.12f}" for k in direct))
    assert set(ours) == set(direct)
    for key, value in direct.items():
        assert ours[key] == pytest.approx(value, abs=1e-9), key
    # The fixture is not degenerate: the scores sit strictly between their extremes.
    assert 0 < ours["bleu_4"] < ours["bleu_1"] < 1 and 0 < ours["cider"] < 10


def test_batches_are_scored_as_one_set(metric):
    """add_batch + compute gives the whole-set CIDEr-D (IDF over all references), not a batch mean."""
    for start in (0, 3):
        metric.add_batch(predictions=PREDICTIONS[start : start + 3], references=REFERENCES[start : start + 3])
    batched = metric.compute(meteor=False)
    assert batched["cider"] == pytest.approx(_pycocoevalcap_direct(PREDICTIONS, REFERENCES)["cider"], abs=1e-9)
    halves = [_pycocoevalcap_direct(PREDICTIONS[s : s + 3], REFERENCES[s : s + 3])["cider"] for s in (0, 3)]
    assert abs(batched["cider"] - sum(halves) / 2) > 1e-3  # averaging batches would be a different number


def test_loads_and_computes_with_hub_offline(metric):
    script = (
        "import evaluate, json, sys;"
        f"m = evaluate.load({str(METRIC_DIR)!r});"
        "p, r = (json.loads(a) for a in sys.argv[1:]);"
        "print(json.dumps(m.compute(predictions=p, references=r, meteor=False)))"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, "-c", script, json.dumps(PREDICTIONS), json.dumps(REFERENCES)],
        env=env, capture_output=True, text=True, timeout=120, check=True,
    )
    offline = json.loads(result.stdout.strip().splitlines()[-1])
    assert offline == pytest.approx(metric.compute(predictions=PREDICTIONS, references=REFERENCES, meteor=False))


def test_meteor_follows_java_on_path(metric, monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))  # an empty folder: no java here
    scores = metric.compute(predictions=PREDICTIONS, references=REFERENCES)
    assert "meteor" not in scores and "cider" in scores
    with pytest.raises(RuntimeError, match="java"):
        metric.compute(predictions=PREDICTIONS, references=REFERENCES, meteor=True)
    with pytest.raises(RuntimeError, match="java"):
        metric.compute(predictions=PREDICTIONS, references=REFERENCES, tokenizer="ptb", meteor=False)


def test_rejects_an_image_without_references(metric):
    with pytest.raises(ValueError, match=r"references\[1\]"):
        metric.compute(predictions=["a", "b"], references=[["a"], []], meteor=False)


# Outputs of coco-caption's PTBTokenizer (Stanford CoreNLP 3.4.1, -lowerCase) followed by its
# punctuation removal, recorded by running pycocoevalcap on these inputs.
@pytest.mark.parametrize(
    ("raw", "ptb"),
    [
        ("A man's dog.", "a man 's dog"),
        ("They don't know (really) what's up!", "they do n't know -lrb- really -rrb- what 's up"),
        ("A well-known 3.5-inch red/blue thing, 1,000 times.", "a well-known 3.5-inch red/blue thing 1,000 times"),
        ('He said "hello" -- and left...', "he said hello and left"),
        ("Two dogs; one cat: a mouse?", "two dogs one cat a mouse"),
        ("it's the players' ball", "it 's the players ball"),
        ("A  double  space , weird .", "a double space weird"),
        ("The U.S. flag & a cat's toy", "the u.s. flag & a cat 's toy"),
        ("cannot won't gonna", "can not wo n't gon na"),
        ("e-mail @ home #1 $5 50% 3:30", "e-mail @ home # 1 $ 5 50 % 3:30"),
        ("I'm here, you're there, we've gone", "i 'm here you 're there we 've gone"),
        ("they'll go, he'd do", "they 'll go he 'd do"),
        ("a cat\u2019s paw", "a cat 's paw"),
        ("a {brace} [bracket]", "a -lcb- brace -rcb- -lsb- bracket -rsb-"),
        ("o'clock ok.", "o'clock ok"),
        ("end with dots..", "end with dots"),
        ("hello!! what?!", "hello !! what ?!"),
        ("a+b 5*3 x = y", "a + b 5 * 3 x = y"),
        ("AT&T www.x.com", "at&t www.x.com"),
        ("dogs,cats", "dogs cats"),
        ("can't", "ca n't"),
        ("MIXED Case WORDS", "mixed case words"),
    ],
)
def test_simple_tokenizer_matches_recorded_ptb_output(raw, ptb):
    assert coco_tokenize(raw) == ptb
