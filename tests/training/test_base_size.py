"""configs/base/stage1.yaml and stage2.yaml at the real model sizes, offline, through the real scripts.

The Hub models the files name (ViT-B/16 at 224 px, distilbert-base-uncased, SmolLM-135M-Instruct) are random-weight
checkpoints of the same architectures and sizes in local folders (`base_size_models`). The YAML files run as they
are except for the model and data paths, batch size 4, 2 optimizer steps (stage 2 keeps its 4 accumulation steps)
and what a CPU needs (float32, no loader workers). So the recipe's LoRA r=64 on every linear layer of the LM, its
optimizer, evaluation and TensorBoard logging, the full-size processors, saves and reloads all run.

Marked `base_size` (several GB of memory, minutes on 2 cores): `pytest -m "not base_size"` leaves it out.
"""

import json
import math
import os
import re
import shutil
import signal
import threading
from dataclasses import dataclass
from pathlib import Path

import pytest
from safetensors import safe_open

from data.loading import load_image_text_dataset
from data.synthetic import generate_dataset
from modeling.lora import LORA_TARGET_MODULES, NON_LORA_WEIGHTS
from modeling.model_folders import ADAPTER_WEIGHTS, SAFE_WEIGHTS
from tests.helpers import run_isolated
from tests.training.base_size_models import (
    DISTILBERT_BASE,
    SMOLLM_135M,
    save_distilbert_base,
    save_smollm_135m,
    save_vit_b16,
)
from tests.training.launch import REPO, as_cli, finish, start
from training.stage import text_corpus

pytestmark = pytest.mark.base_size

# A full-size stage 2 takes ~2 CPU-minutes; the limit leaves room for a machine shared with other work.
TIMEOUT_S = 900
# What this machine needs: float32 (the YAML files ask for bf16 autocast) and no loader workers (they ask for 8).
# Their fused AdamW runs on a CPU too.
ON_CPU = {"use_cpu": True, "bf16": False, "dataloader_num_workers": 0}
SHORT_RUN = {"per_device_train_batch_size": 4, "per_device_eval_batch_size": 4, "max_steps": 2}
# The LM tokenizer gains <image> at id 49152 (its length); the tied embedding grows to the next multiple of 64 rows.
GROWN_VOCAB = math.ceil((SMOLLM_135M["vocab_size"] + 1) / 64) * 64


@dataclass
class Run:
    output: str
    peak_rss_mib: float


def run_measured(module: str, args: list[str], log: Path) -> Run:
    """`launch.run`, also reading the process's own peak resident memory (wait4 reports it for that one child)."""
    process = start(module, args, log)
    killer = threading.Timer(TIMEOUT_S, os.killpg, (process.pid, signal.SIGKILL))  # its own session
    killer.start()
    try:
        _, status, usage = os.wait4(process.pid, 0)
    finally:
        killer.cancel()
    process.returncode = os.waitstatus_to_exitcode(status)  # what finish() then checks, with the log's tail
    assert process.returncode != -signal.SIGKILL, f"{module} was killed after {TIMEOUT_S}s:\n{log.read_text()[-6000:]}"
    return Run(finish(process, log), usage.ru_maxrss / 1024)  # Linux reports KiB


@dataclass
class BaseRecipe:
    root: Path
    vit: Path
    distilbert: Path
    smollm: Path
    qformer: Path
    vlm: Path
    stage1: Run
    stage2: Run


@pytest.fixture(scope="module")
def base_recipe(tmp_path_factory):
    root = tmp_path_factory.mktemp("base_size")
    shapes = root / "shapes"
    generate_dataset(shapes, {"train": 16, "validation": 8}, seed=3, image_size=224, samples_per_shard=16,
                     num_proc=1)
    corpus = text_corpus(load_image_text_dataset(shapes, split="train"))
    vit, distilbert = save_vit_b16(root / "vit"), save_distilbert_base(root / "distilbert", corpus)
    smollm = save_smollm_135m(root / "smollm", corpus)
    data = {"train_data": shapes, "eval_data": shapes}

    qformer = root / "qformer"
    stage1 = run_measured("training.train_qformer", [str(REPO / "configs/base/stage1.yaml"), *as_cli({
        "vision_model_name_or_path": vit, "text_model_name_or_path": distilbert, "output_dir": qformer,
        **data, **SHORT_RUN, **ON_CPU})], root / "stage1.log")  # fmt: skip
    vlm = root / "vlm"
    stage2 = run_measured("training.train_vlm", [str(REPO / "configs/base/stage2.yaml"), *as_cli({
        "qformer_name_or_path": qformer, "language_model_name_or_path": smollm, "output_dir": vlm,
        **data, **SHORT_RUN, **ON_CPU})], root / "stage2.log")  # fmt: skip
    for stage, run in (("stage 1", stage1), ("stage 2", stage2)):
        print(f"{stage} at base size: peak RSS {run.peak_rss_mib:.0f} MiB")
    yield BaseRecipe(root, vit, distilbert, smollm, qformer, vlm, stage1, stage2)
    shutil.rmtree(root)  # ~5 GB of weights, checkpoints and optimizer states


def numel(file: Path, keep=lambda name: True) -> int:
    """Number of values in the tensors of a safetensors file whose names pass `keep` (read from its header)."""
    with safe_open(str(file), framework="pt") as weights:
        return sum(math.prod(weights.get_slice(name).get_shape()) for name in weights.keys() if keep(name))


def tensor_names(file: Path) -> list[str]:
    with safe_open(str(file), framework="pt") as weights:
        return list(weights.keys())


def logged_counts(output: str, stage: str) -> tuple[str, str]:
    """The "<stage> model: X M parameters, Y M trainable" line of a run, as its two printed numbers."""
    found = re.search(rf"{stage} model: ([\d.]+)M parameters, ([\d.]+)M trainable", output)
    assert found, f"no {stage} parameter count in the output"
    return found.group(1), found.group(2)


def millions(count: int) -> str:
    return f"{count / 1e6:.2f}"  # as the scripts log it


def lora_size(config: dict, r: int) -> int:
    """LoRA's parameters on every projection of LORA_TARGET_MODULES in a Llama-style decoder: r x (in + out) each."""
    hidden, inner = config["hidden_size"], config["intermediate_size"]
    head = config.get("head_dim") or hidden // config["num_attention_heads"]
    query, key_value = config["num_attention_heads"] * head, config["num_key_value_heads"] * head
    shapes = {"q_proj": (hidden, query), "k_proj": (hidden, key_value), "v_proj": (hidden, key_value),
              "o_proj": (query, hidden), "gate_proj": (hidden, inner), "up_proj": (hidden, inner),
              "down_proj": (inner, hidden)}
    assert shapes.keys() == set(LORA_TARGET_MODULES)
    return config["num_hidden_layers"] * sum(r * (n_in + n_out) for n_in, n_out in shapes.values())


@dataclass
class Parts:
    vision: int
    qformer: int  # without its vision encoder
    adapter: int
    lm: int
    lora: int


def expected_parts(recipe: BaseRecipe) -> Parts:
    """Each part's size from the files it comes from, not from the stage-2 model."""
    vision = numel(recipe.vit / SAFE_WEIGHTS, lambda name: not name.startswith("classifier."))  # the head is dropped
    qformer_file = recipe.qformer / SAFE_WEIGHTS
    assert numel(qformer_file, lambda name: name.startswith("vision_model.")) == vision
    qformer = numel(qformer_file, lambda name: not name.startswith("vision_model."))
    qformer_width, lm_width = DISTILBERT_BASE["dim"], SMOLLM_135M["hidden_size"]
    adapter = (qformer_width + 1) * lm_width + (lm_width + 1) * lm_width  # two layers, as wide as the LM
    lm = numel(recipe.smollm / SAFE_WEIGHTS) + (GROWN_VOCAB - SMOLLM_135M["vocab_size"]) * lm_width
    return Parts(vision, qformer, adapter, lm, lora_size(SMOLLM_135M, r=64))


def test_stage1_runs_at_base_size_and_counts_its_parts(base_recipe):
    vision = numel(base_recipe.vit / SAFE_WEIGHTS, lambda name: not name.startswith("classifier."))
    total = numel(base_recipe.qformer / SAFE_WEIGHTS)
    assert logged_counts(base_recipe.stage1.output, "stage-1") == (millions(total), millions(total - vision))
    assert 190e6 < total < 200e6  # ViT-B/16 (86M) + a Q-Former of DistilBERT's shape with cross-attention (109M)
    results = json.loads((base_recipe.qformer / "eval_results.json").read_text())
    assert all(0 <= results[f"eval_{way}_r1"] <= 1 for way in ("i2t", "t2i"))


def test_stage2_parameter_count_is_the_sum_of_its_parts(base_recipe):
    parts = expected_parts(base_recipe)
    total = parts.vision + parts.qformer + parts.adapter + parts.lm + parts.lora
    trainable = parts.qformer + parts.adapter + parts.lora  # the vision encoder and the LM's own weights are frozen
    assert logged_counts(base_recipe.stage2.output, "stage-2") == (millions(total), millions(trainable))
    # The merged model is every part but LoRA, which it has absorbed, in float32 (bf16: false; the Hub LM is bf16).
    merged = base_recipe.vlm / SAFE_WEIGHTS
    assert numel(merged) == total - parts.lora
    with safe_open(str(merged), framework="pt") as weights:
        assert {weights.get_slice(name).get_dtype() for name in weights.keys()} == {"F32"}


def test_adapter_folder_holds_lora_and_the_trained_parts_only(base_recipe):
    parts = expected_parts(base_recipe)
    adapter = base_recipe.vlm / "adapter"
    lora, others = adapter / ADAPTER_WEIGHTS, adapter / NON_LORA_WEIGHTS
    assert sorted(p.name for p in adapter.glob("*.safetensors")) == sorted([lora.name, others.name])
    assert all("lora_" in name for name in tensor_names(lora))
    assert numel(lora) == parts.lora
    names = tensor_names(others)
    assert {name.split(".")[0] for name in names} == {"qformer", "adapter"}
    assert not [name for name in names if name.startswith("model.qformer.vision_model.")]  # frozen: not in the adapter
    assert numel(others) == parts.qformer + parts.adapter
    size_mb = sum(p.stat().st_size for p in adapter.iterdir()) / 1e6
    print(f"adapter folder at base size: {size_mb:.0f} MB (LoRA {lora.stat().st_size / 1e6:.0f} MB)")
    # float32 LoRA and trained Q-Former + MLP adapter, a few MB of config, card and headers on top
    assert size_mb < 4 * (parts.lora + parts.qformer + parts.adapter) / 1e6 + 1


def test_saved_vlm_loads_with_auto_classes_in_a_fresh_process_and_generates(base_recipe):
    parts = expected_parts(base_recipe)
    out = run_isolated(f"""
        import json, torch
        from PIL import Image
        from transformers import AutoModelForImageTextToText, AutoProcessor
        model = AutoModelForImageTextToText.from_pretrained({str(base_recipe.vlm)!r}, trust_remote_code=True)
        processor = AutoProcessor.from_pretrained({str(base_recipe.vlm)!r}, trust_remote_code=True)
        content = [{{"type": "image"}}, {{"type": "text", "text": "Describe the image."}}]
        messages = [{{"role": "user", "content": content}}]
        prompt = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        inputs = processor(images=[Image.new("RGB", (224, 224), (200, 30, 30))], text=[prompt], return_tensors="pt")
        out = model.generate(**inputs, max_new_tokens=5, min_new_tokens=5, do_sample=False)
        print(json.dumps({{
            "parameters": sum(p.numel() for p in model.parameters()),
            "dtypes": sorted({{str(p.dtype) for p in model.parameters()}}),
            "embedding_rows": model.get_input_embeddings().num_embeddings,
            "image_tokens": int((inputs["input_ids"] == model.config.image_token_id).sum()),
            "new_tokens": out.shape[1] - inputs["input_ids"].shape[1],
            "pixels": list(inputs["pixel_values"].shape),
        }}))
    """, cwd=base_recipe.root)  # fmt: skip
    loaded = json.loads(out.strip().splitlines()[-1])
    assert loaded["parameters"] == parts.vision + parts.qformer + parts.adapter + parts.lm
    assert loaded["dtypes"] == ["torch.float32"]
    assert loaded["embedding_rows"] == GROWN_VOCAB == 49216
    assert loaded["image_tokens"] == 32  # num_query_tokens of configs/base/stage1.yaml
    assert loaded["new_tokens"] == 5
    assert loaded["pixels"] == [1, 3, 224, 224]
