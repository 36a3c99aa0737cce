"""Stage 1 then stage 2 through the real scripts: losses fall, metrics and sample captions are logged, and what they
save loads with the Auto classes in a process that cannot import this project."""

import json
import math

import pytest
from safetensors.torch import load_file

from tests.helpers import run_isolated
from tests.training.launch import (
    STAGE1_BATCH,
    STAGE1_STEPS,
    logged_losses,
    run,
    stage2_args,
    trainer_state,
)

STAGE2_STEPS = 40
RETRIEVAL_KEYS = [f"eval_{way}_r{k}" for way in ("i2t", "t2i") for k in (1, 5, 10)]


# Slow tier (`make test`, not `make test-fast`): trains both stages through the real scripts.
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def trained_stage2(shapes_data, trained_stage1, tmp_path_factory):
    """The tiny preset's stage 2 (full fine-tuning) on the stage-1 output, evaluating every 20 steps."""
    out = tmp_path_factory.mktemp("stage2") / "vlm"
    args = stage2_args(shapes_data, trained_stage1[0], out, max_steps=STAGE2_STEPS, logging_steps=5, warmup_steps=4,
                       eval_strategy="steps", eval_steps=20)
    return out, run("training.train_vlm", args, out.parent / "stage2.log")


@pytest.fixture(scope="module")
def lora_stage2(shapes_data, trained_stage1, tmp_path_factory):
    """A short stage 2 with LoRA on the language model."""
    out = tmp_path_factory.mktemp("stage2_lora") / "vlm"
    args = stage2_args(shapes_data, trained_stage1[0], out, max_steps=4, use_lora=True, lora_r=4, lora_alpha=8)
    return out, run("training.train_vlm", args, out.parent / "stage2_lora.log")


def _evaluations(folder):
    return [entry for entry in trainer_state(folder)["log_history"] if "eval_loss" in entry]


def test_stage1_loss_falls_and_retrieval_metrics_are_logged(trained_stage1):
    out, _ = trained_stage1
    losses = logged_losses(out)
    assert losses[-1][0] == STAGE1_STEPS
    (_, first), (_, last) = losses[0], losses[-1]
    assert last < first, f"stage-1 loss did not fall: {losses}"
    # ln(batch) is what a model that cannot tell captions apart scores; below it, it has learnt something.
    assert last < math.log(STAGE1_BATCH), f"stage-1 loss {last:.3f} is not below chance {math.log(STAGE1_BATCH):.3f}"

    evaluations = _evaluations(out)
    assert [entry["step"] for entry in evaluations] == [20, 40]
    for entry in evaluations:
        assert set(RETRIEVAL_KEYS) <= entry.keys()
        assert all(0.0 <= entry[key] <= 1.0 for key in RETRIEVAL_KEYS)
    assert evaluations[-1]["eval_loss"] < evaluations[0]["eval_loss"]
    final = json.loads((out / "eval_results.json").read_text())
    assert set(RETRIEVAL_KEYS) <= final.keys()
    card = (out / "README.md").read_text()
    assert "| eval_t2i_r1 |" in card and "| steps | 40 |" in card  # the model card carries the metrics
    assert "More information needed" not in card  # ours, not the Trainer's draft


def test_stage2_loss_falls_and_eval_loss_and_captions_are_logged(trained_stage2):
    out, output = trained_stage2
    losses = logged_losses(out)
    assert losses[-1][0] == STAGE2_STEPS
    assert losses[-1][1] < losses[0][1] - 0.5, f"stage-2 loss did not fall: {losses}"
    evaluations = _evaluations(out)
    assert [entry["step"] for entry in evaluations] == [20, 40]
    assert evaluations[-1]["eval_loss"] < evaluations[0]["eval_loss"]
    for step in (20, 40):
        assert f"sample captions at step {step}:" in output
    assert output.count("generated:") >= 2 * 4  # four fixed images per evaluation
    card = (out / "README.md").read_text()
    assert "## Sample outputs" in card and "| eval_loss |" in card


def test_lora_stage2_writes_the_adapter_and_a_merged_model_without_lora_weights(lora_stage2, trained_stage2):
    out, _ = lora_stage2
    adapter = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    assert (out / "adapter" / "adapter_config.json").is_file()
    card = (out / "adapter" / "README.md").read_text()  # our card replaced peft's template
    assert "library_name: peft" in card and "More Information Needed" not in card and "LoRA adapter" in card
    lora_b = {name: tensor for name, tensor in adapter.items() if "lora_B" in name}
    assert lora_b and any(name.replace("lora_B", "lora_A") in adapter for name in lora_b)
    # lora_B starts at zero: non-zero means training reached the adapter, so the merge has something to merge.
    assert any(tensor.abs().max() > 0 for tensor in lora_b.values())

    merged = load_file(str(out / "model.safetensors"))
    assert not [name for name in merged if "lora" in name or "modules_to_save" in name or "base_model" in name]
    # The same tensors as a stage 2 trained without LoRA: a plain VLM.
    assert merged.keys() == load_file(str(trained_stage2[0] / "model.safetensors")).keys()


def test_outputs_load_with_auto_classes_in_a_fresh_process(trained_stage1, trained_stage2, lora_stage2, tmp_path):
    code = f"""
    import json
    import torch
    from PIL import Image, ImageDraw
    from transformers import AutoModel, AutoModelForImageTextToText, AutoProcessor

    image = Image.new("RGB", (32, 32), "white")
    ImageDraw.Draw(image).ellipse([4, 4, 20, 20], fill="red")
    report = {{}}

    qformer = AutoModel.from_pretrained({str(trained_stage1[0])!r}, trust_remote_code=True)
    processor = AutoProcessor.from_pretrained({str(trained_stage1[0])!r}, trust_remote_code=True)
    text = processor.tokenizer(["a small red circle", "a large blue square"], padding=True, return_tensors="pt")
    pixels = processor.image_processor([image], return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        similarity = qformer.similarity(qformer.get_image_embeds(pixels),
                                        qformer.get_text_embeds(text["input_ids"], text["attention_mask"]))
    report["stage1"] = [type(qformer).__name__, list(similarity.shape)]

    for name, folder in (("full", {str(trained_stage2[0])!r}), ("lora", {str(lora_stage2[0])!r})):
        processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
        model = AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=True)
        base = AutoModel.from_pretrained(folder, trust_remote_code=True)
        content = [{{"type": "image"}}, {{"type": "text", "text": "Describe the image."}}]
        messages = [{{"role": "user", "content": content}}]
        prompt = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        inputs = processor(images=[image], text=[prompt], return_tensors="pt")
        out = model.generate(**inputs, max_new_tokens=4, do_sample=False)
        report[name] = [type(processor).__name__, type(model).__name__, type(base).__name__,
                        out.shape[1] - inputs["input_ids"].shape[1],
                        sum("lora" in key for key in base.state_dict())]
    print(json.dumps(report))
    """
    report = json.loads(run_isolated(code, tmp_path).strip().splitlines()[-1])
    assert report["stage1"] == ["QFormerModel", [1, 2]]
    for name in ("full", "lora"):
        processor, model, base, new_tokens, lora_tensors = report[name]
        assert processor == "VLMProcessor" and model == base == "VLMForConditionalGeneration"
        assert 1 <= new_tokens <= 4
        assert lora_tensors == 0
