"""Each speed switch leaves the loss (and where it matters the gradients) equal to the plain path: same batch, same
weights. fp32 switches are compared tightly, bf16 ones within bf16 rounding."""

import copy

import pytest
import torch
from transformers import Trainer, TrainingArguments

from benchmarks.throughput import TINY, Case, build_model, compile_repeated_blocks
from modeling.lora import add_lora
from training.collators import ContrastiveCollator
from training.conversation_collator import ConversationCollator
from training.device_normalize import DeviceNormalizeMixin, pixel_batch

from .frozen_models import frozen_qformer, frozen_vlm

TIGHT = {"rtol": 1e-5, "atol": 1e-6}
BF16 = {"rtol": 3e-2, "atol": 3e-2}


def stage1_batch(processor, rows, **collator_kwargs):
    return ContrastiveCollator(processor, max_length=16, **collator_kwargs)(rows)


def stage2_batch(processor, rows, **collator_kwargs):
    return ConversationCollator(processor, max_length=64, qa_turns=1, **collator_kwargs)(rows)


def loss_and_grads(model, batch):
    model.zero_grad(set_to_none=True)
    loss = model(**batch).loss
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return loss.detach(), grads


def assert_same_grads(a, b, **tol):
    assert a.keys() == b.keys() and a
    for name in a:
        torch.testing.assert_close(a[name], b[name], **tol, msg=lambda m, name=name: f"{name}: {m}")


class _Prepared:
    """The Trainer's `_prepare_inputs` as far as this mixin cares: the batch is already on its device."""

    def _prepare_inputs(self, inputs):
        return inputs


def device_normalized(processor, batch):
    step = type("Step", (DeviceNormalizeMixin, _Prepared), {"processing_class": processor})()
    return step._prepare_inputs(batch)


def test_uint8_pixels_normalised_on_device_equal_processor_floats(rows):
    model, processor = frozen_qformer()
    floats = stage1_batch(processor, rows)
    uint8 = stage1_batch(processor, rows, pixel_format="uint8")
    assert uint8["pixel_values"].dtype == torch.uint8
    assert uint8["pixel_values"].element_size() * 4 == floats["pixel_values"].element_size()
    normalised = device_normalized(processor, uint8)
    torch.testing.assert_close(normalised["pixel_values"], floats["pixel_values"], **TIGHT)
    model.eval()
    torch.testing.assert_close(model(**normalised).loss, model(**floats).loss, **TIGHT)


def test_float_pixels_pass_the_mixin_untouched(rows):
    _, processor = frozen_qformer()
    batch = stage1_batch(processor, rows)
    assert device_normalized(processor, batch)["pixel_values"] is batch["pixel_values"]
    assert pixel_batch(processor.image_processor, [r["image"] for r in rows], "none") == {}


def test_label_logits_only_equals_full_logits(rows):
    model, processor = frozen_vlm(label_logits_only=False)
    batch = stage2_batch(processor, rows)
    model.train()
    full_loss, full_grads = loss_and_grads(model, batch)
    model.config.label_logits_only = True
    loss, grads = loss_and_grads(model, batch)
    torch.testing.assert_close(loss, full_loss, **TIGHT)
    assert_same_grads(grads, full_grads, rtol=1e-4, atol=1e-6)
    # Gradient accumulation passes the token count of the whole accumulated batch.
    items = int((batch["labels"][:, 1:] != -100).sum())
    torch.testing.assert_close(model(**batch, num_items_in_batch=2 * items).loss, full_loss / 2, **TIGHT)


def test_bf16_autocast_within_bf16_tolerance(rows):
    qformer, qproc = frozen_qformer()
    vlm, vproc = frozen_vlm()
    for model, batch in ((qformer.eval(), stage1_batch(qproc, rows)), (vlm.eval(), stage2_batch(vproc, rows))):
        fp32 = model(**batch).loss
        with torch.autocast("cpu", dtype=torch.bfloat16):
            bf16 = model(**batch).loss
        assert bf16.dtype == torch.float32
        torch.testing.assert_close(bf16, fp32, **BF16)


@pytest.mark.parametrize("separate_turns", [False, True])
def test_sdpa_equals_eager(rows, separate_turns):
    """Also with separate turns' (B, 1, T, T) attention mask, which each implementation takes in its own form."""
    model, processor = frozen_vlm()
    batch = ConversationCollator(processor, max_length=96, qa_turns=2, separate_turns=separate_turns)(rows)
    assert batch["attention_mask"].dim() == (4 if separate_turns else 2)
    model.train()
    model.set_attn_implementation("eager")
    eager_loss, eager_grads = loss_and_grads(model, batch)
    model.set_attn_implementation("sdpa")
    loss, grads = loss_and_grads(model, batch)
    torch.testing.assert_close(loss, eager_loss, **TIGHT)
    assert_same_grads(grads, eager_grads, rtol=1e-4, atol=1e-6)


def test_gradient_checkpointing_keeps_loss_and_lora_gradients(rows):
    model, processor = frozen_vlm()
    batch = stage2_batch(processor, rows)
    model = add_lora(model, r=4, alpha=8, dropout=0.0)
    model.train()
    plain_loss, plain_grads = loss_and_grads(model, batch)
    # The call the Trainer makes for `gradient_checkpointing: true` (renamed activation_checkpointing in 5.2x).
    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    enable()
    assert model.base_model.model.language_model.layers[0].gradient_checkpointing
    loss, grads = loss_and_grads(model, batch)
    torch.testing.assert_close(loss, plain_loss, **TIGHT)
    assert any("lora_" in name for name in grads), "LoRA weights must still get gradients under checkpointing"
    assert_same_grads(grads, plain_grads, rtol=1e-4, atol=1e-6)


def test_fused_adamw_equals_plain_after_one_step(rows):
    model, processor = frozen_qformer()
    batch = stage1_batch(processor, rows)
    model.train()
    losses = {}
    for optim in ("adamw_torch", "adamw_torch_fused"):
        copy_ = copy.deepcopy(model)
        args = TrainingArguments(output_dir="unused", optim=optim, learning_rate=1e-2, use_cpu=True)
        cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(args, copy_)
        assert kwargs.get("fused", False) == (optim == "adamw_torch_fused")
        optimizer = cls([p for p in copy_.parameters() if p.requires_grad], **kwargs)
        copy_(**batch).loss.backward()
        optimizer.step()
        losses[optim] = copy_(**batch).loss.detach()
    assert not torch.equal(losses["adamw_torch"], model(**batch).loss.detach()), "the step must change the loss"
    torch.testing.assert_close(losses["adamw_torch_fused"], losses["adamw_torch"], **TIGHT)


def test_frozen_weights_in_bf16_within_bf16_tolerance():
    """The benchmark's `--frozen-bf16`: frozen weights stored in bf16, trainable ones in fp32, under autocast."""
    sizes = TINY
    losses, dtypes = [], []
    for frozen_bf16 in (False, True):
        case = Case("", 2, 2, bf16=True, sdpa=True, fused_adamw=False, compile=False, vision="cache",
                    lora_dropout=0.0, frozen_bf16=frozen_bf16)
        torch.manual_seed(0)
        model = build_model(case, sizes, torch.device("cpu"))
        dtypes.append({p.dtype for p in model.parameters() if not p.requires_grad})
        torch.manual_seed(1)
        features = torch.randn(2, 17, sizes["vision"]["hidden_size"])
        ids = torch.randint(0, sizes["image_token_id"], (2, 20))
        ids[:, 2:2 + sizes["num_query_tokens"]] = sizes["image_token_id"]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            losses.append(model(input_ids=ids, vision_features=features, labels=ids).loss.float())
    assert dtypes == [{torch.float32}, {torch.bfloat16}]
    torch.testing.assert_close(losses[1], losses[0], **BF16)


@pytest.mark.slow  # torch.compile: the slow tier
def test_compiled_layers_keep_loss_and_gradients(rows):
    """The benchmark's `--compile` (in place, per layer) on a LoRA model whose Q-Former and adapter train fully. The
    aot_eager backend traces forward and backward as inductor would, without its C++ build, which a CPU test cannot
    afford."""
    model, processor = frozen_vlm()
    batch = stage2_batch(processor, rows)
    model = add_lora(model, r=4, alpha=8, dropout=0.0)
    model.train()
    plain_loss, plain_grads = loss_and_grads(model, batch)
    torch._dynamo.reset()
    compile_repeated_blocks(model, backend="aot_eager")
    loss, grads = loss_and_grads(model, batch)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > 0, "nothing was compiled"
    torch.testing.assert_close(loss, plain_loss, **TIGHT)
    assert_same_grads(grads, plain_grads, rtol=1e-4, atol=1e-6)
