"""The tiny preset's tokenizers: the same texts give the same tokenizer, in any process.

tokenizers' WordPieceTrainer numbered its `##` pieces in hash-map order, so one corpus gave different vocabularies
from run to run (huggingface/tokenizers#1794) and two runs of one seed started stage 1 from different models.
"""

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest

from data.shapes import TEMPLATES, caption_for, generate_scene, questions_for
from modeling.tiny_tokenizers import train_chat_tokenizer, train_wordpiece_tokenizer

REPO = Path(__file__).resolve().parents[2]


def shapes_texts(n_scenes: int = 1500) -> list[str]:
    """Captions and questions of the shapes world, with its many ties in word and pair counts."""
    rng = random.Random(0)
    texts = []
    for i in range(n_scenes):
        scene = generate_scene(rng)
        texts.append(caption_for(scene, i % len(TEMPLATES)))
        for pair in questions_for(scene, rng):
            texts += [pair["question"], pair["answer"]]
    return texts


@pytest.mark.slow  # a fresh process: the slow tier
def test_same_texts_same_vocabularies_in_this_and_another_process():
    texts = shapes_texts()

    def vocabularies():
        return [train_wordpiece_tokenizer(texts).get_vocab(), train_chat_tokenizer(texts).get_vocab()]

    runs = [vocabularies() for _ in range(3)]
    script = (
        "import json, sys\n"
        "from modeling.tiny_tokenizers import train_chat_tokenizer, train_wordpiece_tokenizer\n"
        "texts = json.load(sys.stdin)\n"
        "print(json.dumps([train_wordpiece_tokenizer(texts).get_vocab(), train_chat_tokenizer(texts).get_vocab()]))\n"
    )
    other = subprocess.run([sys.executable, "-c", script], input=json.dumps(texts), capture_output=True, text=True,
                           cwd=REPO, check=True)
    runs.append(json.loads(other.stdout))
    assert all(run == runs[0] for run in runs[1:])


def test_words_are_whole_tokens_and_new_words_are_spelled():
    tokenizer = train_wordpiece_tokenizer(shapes_texts(300))
    caption = "A Large Green Triangle in the top left, and a small red circle?"
    assert tokenizer.tokenize(caption) == ["a", "large", "green", "triangle", "in", "the", "top", "left", ",", "and",
                                           "a", "small", "red", "circle", "?"]
    ids = tokenizer(caption).input_ids
    assert (ids[0], ids[-1]) == (tokenizer.cls_token_id, tokenizer.sep_token_id)
    assert tokenizer.decode(ids, skip_special_tokens=True) == caption.lower().replace(" ,", ",")
    # A word never seen is spelled from the characters' pieces rather than lost as [UNK].
    assert tokenizer.tokenize("greet") == ["g", "##r", "##e", "##e", "##t"]


def test_vocab_size_keeps_the_most_frequent_characters_then_words():
    texts = ["aaa bbb", "aaa ccc", "aaa bbb", "ddd"]
    vocab = train_wordpiece_tokenizer(texts, vocab_size=10).get_vocab()
    # Five special tokens, then the two most frequent characters alone and as continuations, one word.
    assert sorted(vocab, key=vocab.get) == ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "b", "##a", "##b",
                                            "aaa"]
