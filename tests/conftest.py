import os

import huggingface_hub
import pytest
import torch
import transformers.utils.hub as transformers_hub

import modeling  # noqa: F401  (registers the Auto classes)
from modeling.presets import build_tiny_qformer, build_vlm
from tests.helpers import TINY_CORPUS, TINY_LM, FolderHub

# pytest-xdist's workers share the cores: each worker, and every process it starts (they inherit the environment),
# gets its share of threads. Oversubscribed OpenMP threads crawl: the reduced demo took 88 s alone with two
# threads and 439 s beside the other worker.
THREADS = max(1, (os.cpu_count() or 1) // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")))
os.environ["OMP_NUM_THREADS"] = str(THREADS)
torch.set_num_threads(THREADS)


def tiny_qformer_and_processor(**config_kwargs):
    torch.manual_seed(0)
    kwargs = {
        "num_query_tokens": 4,
        "embed_dim": 32,
        "vision": {"image_size": 32, "patch_size": 8, "hidden_size": 32, "num_hidden_layers": 1,
                   "num_attention_heads": 2, "intermediate_size": 64},
        "qformer": {"hidden_size": 32, "num_attention_heads": 2, "intermediate_size": 64},
        **config_kwargs,
    }
    return build_tiny_qformer(TINY_CORPUS * 5, text_vocab_size=300, **kwargs)


def tiny_vlm_and_processor(instruction_aware_qformer: bool = False, **qformer_kwargs):
    qformer, qformer_processor = tiny_qformer_and_processor(**qformer_kwargs)
    torch.manual_seed(1)
    return build_vlm(qformer, qformer_processor, corpus=TINY_CORPUS * 5, lm=TINY_LM, lm_vocab_size=400,
                     instruction_aware_qformer=instruction_aware_qformer)


@pytest.fixture
def tiny_qformer():
    return tiny_qformer_and_processor()


@pytest.fixture
def tiny_vlm():
    return tiny_vlm_and_processor()


@pytest.fixture
def shape_images():
    """Four distinct small RGB images."""
    from PIL import Image, ImageDraw

    images = []
    for i, colour in enumerate([(220, 30, 30), (30, 160, 40), (40, 60, 220), (230, 200, 20)]):
        img = Image.new("RGB", (32, 32), (245, 245, 240))
        ImageDraw.Draw(img).ellipse([4 + i * 3, 4, 20 + i * 3, 20], fill=colour)
        images.append(img)
    return images


@pytest.fixture
def folder_hub(tmp_path, monkeypatch):
    """The Hub's HTTP API replaced by folders under tmp_path/hub (see `FolderHub`)."""
    hub = FolderHub(tmp_path / "hub")
    monkeypatch.setattr(transformers_hub, "_hf_api", hub)
    # The model-card lookup must not reach for the network either: offline, a missing card is made from a template.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    return hub
