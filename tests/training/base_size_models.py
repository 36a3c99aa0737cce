"""Random-weight checkpoints of the Hub models configs/base names, at their real sizes, in local folders laid out
as the Hub holds them (nothing can be downloaded here).

Each folder has what `from_pretrained` reads from the Hub repository: a config with the real shapes, the weights of
the class the Hub checkpoint was saved from (its head, which the project drops, included) in the Hub file's dtype,
and the preprocessor or tokenizer. The tokenizers are the real classes (DistilBertTokenizer, GPT2Tokenizer) with
the real special tokens at their real ids and the real vocabulary size; only the ordinary entries differ: words and
merges learnt from the shapes captions, padded with unused entries to the real length. So the scripts meet what the
real files give them: the Q-Former takes DistilBERT's 30,522-word vocabulary and sizes, the LM tokenizer gains
`<image>` at id 49,152 and SmolLM's tied embedding grows to 49,216 rows, and padding, end-of-turn and [CLS] ids are
the real ones. What changes is only how many tokens a caption takes, which the sequence limits bound anyway.
"""

import json
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import (
    DistilBertConfig,
    DistilBertForMaskedLM,
    DistilBertTokenizer,
    GPT2Tokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    ViTConfig,
    ViTForImageClassification,
    ViTImageProcessor,
)

from modeling.presets import CHAT_WORDS
from modeling.tiny_tokenizers import train_wordpiece_tokenizer

# google/vit-base-patch16-224: ViT-B/16 at 224 px (ViTConfig's defaults), saved as an ImageNet-1k classifier.
VIT_B16 = {"image_size": 224, "patch_size": 16, "hidden_size": 768, "num_hidden_layers": 12,
           "num_attention_heads": 12, "intermediate_size": 3072, "num_labels": 1000}
# distilbert-base-uncased: 6 layers of 768, saved as a masked LM (DistilBertConfig's defaults).
DISTILBERT_BASE = {"vocab_size": 30522, "dim": 768, "n_layers": 6, "n_heads": 12, "hidden_dim": 3072,
                   "max_position_embeddings": 512, "pad_token_id": 0}
# BERT's vocabulary layout: [PAD] 0, [unused0..98] 1-99, then [UNK] [CLS] [SEP] [MASK] at 100-103.
BERT_SPECIALS = {"[PAD]": 0, "[UNK]": 100, "[CLS]": 101, "[SEP]": 102, "[MASK]": 103}

# HuggingFaceTB/SmolLM-135M-Instruct, in bfloat16 as on the Hub.
SMOLLM_135M = {"vocab_size": 49152, "hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30,
               "num_attention_heads": 9, "num_key_value_heads": 3, "max_position_embeddings": 2048,
               "rope_theta": 10000.0, "rms_norm_eps": 1e-5, "tie_word_embeddings": True,
               "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2}
# Its tokenizer's special tokens, ids 0-16; `<|im_end|>` ends a turn (eos) and pads, `<|im_start|>` is bos.
SMOLLM_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<repo_name>", "<reponame>", "<file_sep>",
                   "<filename>", "<gh_stars>", "<issue_start>", "<issue_comment>", "<issue_closed>",
                   "<jupyter_start>", "<jupyter_text>", "<jupyter_code>", "<jupyter_output>", "<jupyter_script>",
                   "<empty_output>")


def save_vit_b16(folder: Path) -> Path:
    torch.manual_seed(0)
    ViTForImageClassification(ViTConfig(**VIT_B16)).save_pretrained(folder)
    ViTImageProcessor().save_pretrained(folder)  # its defaults are the Hub's: 224x224, pixels scaled to [-1, 1]
    return folder


def bert_vocabulary(corpus: list[str], size: int) -> dict[str, int]:
    """BERT's layout of `size` entries: the special tokens at their ids, WordPiece entries learnt from `corpus`
    after them, `[unusedN]` for the rest."""
    learnt = train_wordpiece_tokenizer(corpus, vocab_size=2000).get_vocab()
    vocab = dict(BERT_SPECIALS)
    vocab.update({f"[unused{i}]": i + 1 for i in range(99)})
    for token in sorted(learnt, key=learnt.get):
        if token not in vocab:
            vocab[token] = len(vocab)
    unused = 99
    while len(vocab) < size:
        vocab[f"[unused{unused}]"] = len(vocab)
        unused += 1
    return vocab


def save_distilbert_base(folder: Path, corpus: list[str]) -> Path:
    torch.manual_seed(1)
    DistilBertForMaskedLM(DistilBertConfig(**DISTILBERT_BASE)).save_pretrained(folder)
    tokenizer = DistilBertTokenizer(vocab=bert_vocabulary(corpus, DISTILBERT_BASE["vocab_size"]),
                                    model_max_length=512)
    tokenizer.save_pretrained(folder)
    return folder


def byte_level_bpe(corpus: list[str], specials: tuple[str, ...], size: int):
    """A byte-level BPE learnt from `corpus` with `specials` first, padded with unused entries to `size`:
    (vocabulary, merges)."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    # ChatML's words too, which the real vocabularies hold whole.
    tokenizer.train_from_iterator([*corpus, *CHAT_WORDS], trainers.BpeTrainer(
        vocab_size=1000, special_tokens=list(specials), initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    model = json.loads(tokenizer.to_str())["model"]
    vocab, merges = model["vocab"], [tuple(pair) for pair in model["merges"]]
    while len(vocab) < size:
        vocab[f"<unused{len(vocab)}>"] = len(vocab)
    return vocab, merges


def save_smollm_135m(folder: Path, corpus: list[str]) -> Path:
    torch.manual_seed(2)
    model = LlamaForCausalLM(LlamaConfig(**SMOLLM_135M))
    model.to(torch.bfloat16).save_pretrained(folder)
    vocab, merges = byte_level_bpe(corpus, SMOLLM_SPECIALS, SMOLLM_135M["vocab_size"])
    tokenizer = GPT2Tokenizer(vocab=vocab, merges=merges, bos_token="<|im_start|>", eos_token="<|im_end|>",
                              pad_token="<|im_end|>", unk_token="<|endoftext|>", model_max_length=2048,
                              additional_special_tokens=list(SMOLLM_SPECIALS))
    tokenizer.save_pretrained(folder)
    return folder
