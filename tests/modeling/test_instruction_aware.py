"""The instruction-aware Q-Former (`VLMConfig.instruction_aware_qformer`): the processor's second set of ids, the
joint attention of queries and instruction, generation, and a saved model in a fresh process."""

import pytest
import torch
from safetensors.torch import save_file
from transformers import pipeline

from modeling import VLMForConditionalGeneration
from tests.conftest import tiny_vlm_and_processor
from tests.helpers import run_isolated

QUESTIONS = ["describe the image.", "what color is the circle? how many shapes are there? is there a triangle?"]


def instruction_vlm(**qformer_kwargs):
    model, processor = tiny_vlm_and_processor(instruction_aware_qformer=True, **qformer_kwargs)
    # Widely spread random weights, so that greedy decoding is not a chain of near-ties and the instruction's effect
    # on the queries is far above rounding.
    torch.manual_seed(3)
    with torch.no_grad():
        for param in [*model.language_model.parameters(), *model.qformer.query_transformer.parameters()]:
            if param.dim() > 1:
                param.normal_(std=0.3)
    return model.eval(), processor


def prompt(processor, question, images=1):
    content = [{"type": "image"}] * images + [{"type": "text", "text": question}]
    return processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                         tokenize=False)


def test_the_processor_gives_each_image_the_text_of_its_turn(shape_images):
    _, processor = instruction_vlm()
    conversation = [
        {"role": "system", "content": [{"type": "text", "text": "Answer briefly."}]},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What color is the circle?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "red"}]},
        {"role": "user", "content": [{"type": "text", "text": "And here?"}, {"type": "image"}, {"type": "image"}]},
    ]
    text = processor.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
    assert processor.image_instructions(text) == ["What color is the circle?", "And here?", "And here?"]
    assert processor.image_instructions("<image>\nWhat is it?") == ["What is it?"]
    batch = processor(images=shape_images[:4], text=[text, prompt(processor, "Describe it.")], padding=True,
                      return_tensors="pt")
    # The language model's ids for the prompts, the Q-Former's for each image's instruction, right-padded.
    assert batch["input_ids"].shape[0] == 2 and batch["pixel_values"].shape[0] == 4
    assert batch["qformer_input_ids"].shape == batch["qformer_attention_mask"].shape
    decoded = processor.qformer_tokenizer.batch_decode(batch["qformer_input_ids"], skip_special_tokens=True)
    assert decoded == ["what color is the circle?", "and here?", "and here?", "describe it."]
    padding = batch["qformer_input_ids"] == processor.qformer_tokenizer.pad_token_id
    assert padding.any() and torch.equal(batch["qformer_attention_mask"] == 0, padding)
    assert "qformer_input_ids" not in processor(text=["<|im_start|>user\nhi<|im_end|>\n"], return_tensors="pt")


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
@pytest.mark.parametrize("isolate", [False, True])
def test_padding_of_the_instruction_changes_no_query(shape_images, attn_implementation, isolate):
    """Queries and instruction attend to each other, never to the instruction's padding: an instruction gives the
    same visual tokens alone and beside a longer one, with isolated regional queries as without."""
    model, processor = instruction_vlm(num_query_tokens=6, regional_queries=2, isolate_regional_queries=isolate)
    model.set_attn_implementation(attn_implementation)
    pixels = processor.image_processor(shape_images[:2], return_tensors="pt")["pixel_values"]
    together = processor.qformer_inputs(QUESTIONS)
    assert together["qformer_attention_mask"][0].tolist().count(0) > 3
    with torch.no_grad():
        both = model.get_image_features(pixels, **together)
        for i, question in enumerate(QUESTIONS):
            alone = model.get_image_features(pixels[i : i + 1], **processor.qformer_inputs([question]))
            torch.testing.assert_close(both[i : i + 1], alone, atol=1e-5, rtol=1e-5)
        # The instruction reaches every query, the isolated regional ones included.
        swapped = model.get_image_features(pixels, **processor.qformer_inputs(QUESTIONS[::-1]))
    assert (swapped - both).abs().amax(dim=-1).min() > 1e-3


@pytest.mark.parametrize("instruction_aware", [False, True])
def test_image_index_encodes_each_image_once(shape_images, instruction_aware):
    """Copies of an image named by `image_index` get the visual tokens of the image repeated, each reading its own
    instruction, from one pass of the vision encoder per image."""
    model, processor = instruction_vlm() if instruction_aware else (tiny_vlm_and_processor()[0].eval(), None)
    processor = processor or tiny_vlm_and_processor()[1]
    pixels = processor.image_processor(shape_images[:2], return_tensors="pt")["pixel_values"]
    index = torch.tensor([0, 0, 1, 0])
    asked = processor.qformer_inputs(["what is it?", QUESTIONS[0], QUESTIONS[1], "where?"])
    encoded = []
    model.qformer.vision_model.register_forward_hook(lambda module, args, out: encoded.append(len(out[0])))
    with torch.no_grad():
        shared = model.get_image_features(pixels, **asked, image_index=index)
        repeated = model.get_image_features(pixels[index], **asked)
    assert encoded == [2, 4]
    torch.testing.assert_close(shared, repeated, atol=1e-5, rtol=1e-5)
    assert (shared[0] - shared[1]).abs().max() > 1e-3 if instruction_aware else torch.equal(shared[0], shared[1])
    with pytest.raises(ValueError, match="each entry is an image, from 0 to 1"):
        model.get_image_features(pixels, **asked, image_index=torch.tensor([0, 2, 1, 0]))
    if instruction_aware:
        with pytest.raises(ValueError, match="per entry of image_index"):
            model.get_image_features(pixels, **asked, image_index=torch.tensor([0, 1]))


def test_the_option_off_ignores_instructions(tiny_vlm, shape_images):
    model, processor = tiny_vlm
    pixels = processor.image_processor(shape_images[:2], return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        plain = model.eval().get_image_features(pixels)
        asked = model.get_image_features(pixels, **processor.qformer_inputs(QUESTIONS))
    torch.testing.assert_close(asked, plain, atol=0, rtol=0)


def test_a_model_that_reads_instructions_asks_for_them(shape_images):
    model, processor = instruction_vlm()
    inputs = processor(images=shape_images[:1], text=[prompt(processor, "what is it?")], return_tensors="pt")
    with pytest.raises(ValueError, match="pass the processor's qformer_input_ids"):
        model(input_ids=inputs["input_ids"], pixel_values=inputs["pixel_values"])
    with pytest.raises(ValueError, match="one instruction per image"):
        model(**{**inputs, **processor.qformer_inputs(QUESTIONS)})


def new_tokens(model, inputs, **kwargs):
    out = model.generate(**inputs, max_new_tokens=10, do_sample=False, **kwargs)
    return out[:, inputs["input_ids"].shape[1]:]


def test_generation_batched_cached_and_through_the_pipeline(shape_images):
    model, processor = instruction_vlm()
    prompts = [prompt(processor, q) for q in QUESTIONS]
    batch = processor(images=shape_images[:2], text=prompts, padding=True, return_tensors="pt")
    assert (batch["attention_mask"][0] == 0).any() and (batch["qformer_attention_mask"][0] == 0).any()
    batched = new_tokens(model, batch)
    for i in range(2):
        alone = processor(images=[shape_images[i]], text=[prompts[i]], return_tensors="pt")
        assert batched[i].tolist() == new_tokens(model, alone)[0].tolist()
        assert new_tokens(model, alone, use_cache=False).tolist() == new_tokens(model, alone).tolist()
    # The same image asked two things gets two sets of visual tokens.
    same_image = processor(images=[shape_images[0]] * 2, text=prompts, padding=True, return_tensors="pt")
    with torch.no_grad():
        features = model(**same_image).image_features
    assert (features[0] - features[1]).abs().max() > 1e-3
    pipe = pipeline("image-text-to-text", model=model, processor=processor)
    messages = [{"role": "user", "content": [{"type": "image", "image": shape_images[1]},
                                             {"type": "text", "text": QUESTIONS[1]}]}]
    out = pipe(text=messages, max_new_tokens=10, do_sample=False, return_full_text=False)
    assert out[0]["generated_text"] == processor.decode(batched[1], skip_special_tokens=True)


@pytest.mark.slow  # a fresh process: the slow tier
def test_saved_model_reads_instructions_in_a_fresh_process(shape_images, tmp_path):
    model, processor = instruction_vlm()
    model.save_pretrained(tmp_path / "vlm")
    processor.save_pretrained(tmp_path / "vlm")
    inputs = processor(images=shape_images[:2], text=[prompt(processor, q) for q in QUESTIONS], padding=True,
                       return_tensors="pt")
    with torch.no_grad():
        logits = model(**inputs).logits
    save_file({"logits": logits.contiguous()}, tmp_path / "expected.safetensors")
    for i, image in enumerate(shape_images[:2]):
        image.save(tmp_path / f"image{i}.png")
    run_isolated(
        f"""
        import torch
        from PIL import Image
        from safetensors.torch import load_file
        from transformers import AutoModelForImageTextToText, AutoProcessor
        model = AutoModelForImageTextToText.from_pretrained("vlm", trust_remote_code=True).eval()
        processor = AutoProcessor.from_pretrained("vlm", trust_remote_code=True)
        assert model.config.instruction_aware_qformer
        content = lambda q: [{{"role": "user", "content": [{{"type": "image"}}, {{"type": "text", "text": q}}]}}]
        prompts = [processor.apply_chat_template(content(q), add_generation_prompt=True, tokenize=False)
                   for q in {QUESTIONS!r}]
        images = [Image.open(f"image{{i}}.png") for i in range(2)]
        inputs = processor(images=images, text=prompts, padding=True, return_tensors="pt")
        with torch.no_grad():
            logits = model(**inputs).logits
        torch.testing.assert_close(logits, load_file("expected.safetensors")["logits"], atol=1e-5, rtol=1e-5)
        """,
        cwd=tmp_path,
    )
    loaded = VLMForConditionalGeneration.from_pretrained(tmp_path / "vlm")
    assert loaded.config.instruction_aware_qformer


def test_a_config_with_region_names_is_refused():
    """Folders saved with the removed grid-cell names would load and answer differently without them."""
    from modeling import VLMConfig

    with pytest.raises(ValueError, match="saved with region_token_ids"):
        VLMConfig(region_token_ids=[[5], [6]])
