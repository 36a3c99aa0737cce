"""Tokenizers trained locally, for the tiny offline preset (no Hub download).

The Q-Former's text side gets a BERT-style WordPiece tokenizer ([CLS] first, as the contrastive head reads it);
the language model gets a byte-level BPE tokenizer with ChatML tokens and the image placeholder, the same kind of
tokenizer SmolLM and Qwen3 use. Both are `PreTrainedTokenizerFast`, so they save and load like any Hub tokenizer.
"""

from collections import Counter
from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from .processing_vlm import DEFAULT_CHAT_TEMPLATE

CHAT_SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>")


def train_wordpiece_tokenizer(texts: Iterable[str], vocab_size: int = 1000) -> PreTrainedTokenizerFast:
    """A lowercasing WordPiece tokenizer that wraps every text as `[CLS] ... [SEP]`, like BERT's.

    Its vocabulary: the special tokens, each character of the texts alone and as a `##` continuation (so that any
    word can be spelled; the most frequent characters when not all fit), then whole words, most frequent first and
    ties in alphabetical order, up to `vocab_size` entries. The same texts always give the same tokenizer.
    `tokenizers`' own WordPieceTrainer does not: it numbers the `##` pieces in hash-map order, which changes from
    run to run and with it the merges and the vocabulary (huggingface/tokenizers#1794, still open in 0.23), so two
    runs of one seed started from different models.
    """
    normalizer = normalizers.BertNormalizer(lowercase=True)
    pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    # Captions and questions repeat, and so do their words: split on whitespace in Python, then normalise and
    # pre-tokenize each distinct piece once (one call per text took longer than the library's trainer).
    pieces = Counter()
    for text, n in Counter(texts).items():
        for piece in text.split():
            pieces[piece] += n
    words = Counter()
    for piece, n in pieces.items():
        for word, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(piece)):
            words[word] += n
    chars = Counter()
    for word, n in words.items():
        for char in word:
            chars[char] += n

    def by_count(counts: Counter) -> list[str]:
        return sorted(counts, key=lambda key: (-counts[key], key))

    special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    alphabet = by_count(chars)[: (vocab_size - len(special)) // 2]
    vocab = [*special, *alphabet, *(f"##{char}" for char in alphabet)]
    known = set(vocab)
    vocab += [word for word in by_count(words) if word not in known][: vocab_size - len(vocab)]

    tokenizer = Tokenizer(models.WordPiece({token: i for i, token in enumerate(vocab)}, unk_token="[UNK]"))
    tokenizer.normalizer = normalizer
    tokenizer.pre_tokenizer = pre_tokenizer
    tokenizer.decoder = decoders.WordPiece()
    tokenizer.add_special_tokens(special)
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
        model_max_length=64,
    )


def train_chat_tokenizer(texts: Iterable[str], vocab_size: int = 600) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer with ChatML turns (`<|im_start|>`/`<|im_end|>`), `<image>` and a chat template.

    `<|im_end|>` ends a turn and is the end-of-sequence token, as in SmolLM-Instruct; `<|endoftext|>` pads.
    """
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(CHAT_SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token="<|endoftext|>",
        extra_special_tokens={"image_token": "<image>"},
        model_max_length=512,
    )
    fast.chat_template = DEFAULT_CHAT_TEMPLATE
    return fast


__all__ = ["CHAT_SPECIAL_TOKENS", "train_chat_tokenizer", "train_wordpiece_tokenizer"]
