"""Tiny models with every dropout off (so two paths see identical computations) and rows shaped like the loader's."""

import torch
from PIL import Image, ImageDraw

from modeling.presets import build_tiny_qformer, build_vlm
from tests.helpers import TINY_CORPUS, TINY_LM

VISION = {"image_size": 32, "patch_size": 8, "hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
          "intermediate_size": 64}
QFORMER = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64,
           "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}


def frozen_qformer(vision: dict | None = None, **config_kwargs):
    """A stage-1 model and processor whose vision encoder is frozen (the case a feature cache serves)."""
    torch.manual_seed(0)
    return build_tiny_qformer(
        TINY_CORPUS * 5, vision={**VISION, **(vision or {})}, qformer=QFORMER, text_vocab_size=300,
        num_query_tokens=4, embed_dim=32, **{"freeze_vision": True, **config_kwargs},
    )


def frozen_vlm(**config_kwargs):
    qformer, processor = frozen_qformer()
    torch.manual_seed(1)
    return build_vlm(qformer, processor, corpus=TINY_CORPUS * 5, lm=TINY_LM, lm_vocab_size=400, **config_kwargs)


def make_rows(count: int = 4) -> list[dict]:
    """Loader-style rows: distinct 40x48 images (resized by the processor), captions, Q&A, negatives."""
    rows = []
    for i in range(count):
        img = Image.new("RGB", (48, 40), (245 - 10 * i, 245, 240))
        ImageDraw.Draw(img).ellipse([4 + 3 * i, 4, 24 + 3 * i, 30], fill=(40 * i % 255, 160, 220 - 30 * i))
        rows.append({
            "key": f"sample-{i}", "image": img, "caption": TINY_CORPUS[i % 3], "group_id": f"g{i}",
            "references": [TINY_CORPUS[i % 3]], "negative_captions": [TINY_CORPUS[(i + 1) % 3]],
            "qa": [{"question": "what color is the circle?", "answer": "red", "type": "color"}],
        })
    return rows
