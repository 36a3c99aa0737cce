"""The optimizer the training scripts build gives each parameter the learning rate its configuration asks for.

Read back from `trainer.optimizer.param_groups` of the Trainer that `build_trainer` (what `main` runs) returns.
"""

import pytest
import torch
from transformers import DistilBertConfig, DistilBertModel, TrainingArguments, ViTConfig, ViTImageProcessor, ViTModel

from modeling.tiny_tokenizers import train_wordpiece_tokenizer
from tests.conftest import tiny_qformer_and_processor
from tests.helpers import TINY_CORPUS
from tests.training.launch import REPO, SMALL_LM, as_cli
from training import train_qformer, train_vlm
from training.arguments import DataArguments, QFormerModelArguments, VLMModelArguments, parse_args

LEARNING_RATE, RATIO, QFORMER_LR = 1e-4, 0.1, 3e-4


def learning_rates(trainer) -> dict[int, float]:
    """id(parameter) -> the learning rate of its optimizer group."""
    trainer.create_optimizer()
    return {id(p): group["lr"] for group in trainer.optimizer.param_groups for p in group["params"]}


def perturbed(model):
    """Every weight made unique, so that an identical tensor in the Q-Former can only be a copy of it."""
    torch.manual_seed(2)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.01)
    return model


@pytest.fixture(scope="module")
def pretrained_folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("pretrained")
    vit = perturbed(ViTModel(ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=1,
                                       num_attention_heads=2, intermediate_size=64)))
    vit.save_pretrained(root / "vit")
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(root / "vit")
    tokenizer = train_wordpiece_tokenizer(TINY_CORPUS * 3, vocab_size=200)
    text = perturbed(DistilBertModel(DistilBertConfig(vocab_size=len(tokenizer), dim=32, n_layers=2, n_heads=2,
                                                      hidden_dim=64, max_position_embeddings=64)))
    text.save_pretrained(root / "distilbert")
    tokenizer.save_pretrained(root / "distilbert")
    return root, [*vit.state_dict().values(), *text.state_dict().values()]


def test_stage1_pretrained_weights_train_at_the_ratio_and_new_layers_at_the_learning_rate(
    pretrained_folders, shapes_data, tmp_path
):
    root, pretrained_tensors = pretrained_folders
    argv = [str(REPO / "configs/base/stage1.yaml"), *as_cli({
        "train_data": shapes_data, "eval_data": shapes_data, "output_dir": tmp_path / "out",
        "vision_model_name_or_path": root / "vit", "text_model_name_or_path": root / "distilbert",
        "freeze_vision": False, "num_query_tokens": 4, "embed_dim": 16, "learning_rate": LEARNING_RATE,
        "pretrained_lr_ratio": RATIO, "use_cpu": True, "bf16": False, "optim": "adamw_torch",
        "dataloader_num_workers": 0, "report_to": "none",
    })]  # fmt: skip
    arguments = parse_args((QFormerModelArguments, DataArguments, TrainingArguments), argv)
    trainer, _ = train_qformer.build_trainer(*arguments)
    lrs = learning_rates(trainer)

    copied, fresh = [], []
    for name, parameter in trainer.model.named_parameters():
        if not parameter.requires_grad:
            continue
        from_checkpoint = any(t.shape == parameter.shape and torch.equal(t, parameter) for t in pretrained_tensors)
        expected = LEARNING_RATE * RATIO if from_checkpoint else LEARNING_RATE
        assert lrs[id(parameter)] == pytest.approx(expected), f"{name}: lr {lrs[id(parameter)]}, expected {expected}"
        (copied if from_checkpoint else fresh).append(name)
    assert len(lrs) == len(copied) + len(fresh), "the optimizer holds frozen or foreign tensors"
    # Both kinds are really there: pretrained vision and text layers, and new cross-attention, queries and heads.
    assert "vision_model.embeddings.patch_embeddings.projection.weight" in copied
    assert "query_transformer.encoder.layer.1.attention.attention.query.weight" in copied
    assert "query_transformer.encoder.layer.1.intermediate_query.dense.weight" in copied
    assert {"query_tokens", "logit_scale", "vision_projection.weight"} <= set(fresh)
    assert "query_transformer.encoder.layer.1.crossattention.attention.query.weight" in fresh


@pytest.fixture(scope="module")
def stage1_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("stage1_tiny") / "qformer"
    model, processor = tiny_qformer_and_processor()
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


@pytest.mark.parametrize("use_lora", [True, False], ids=["lora", "full"])
def test_stage2_qformer_trains_at_its_own_rate_and_adapter_and_lm_at_the_learning_rate(
    stage1_folder, shapes_data, tmp_path, use_lora
):
    argv = [str(REPO / "configs/tiny/stage2.yaml"), *as_cli({
        "train_data": shapes_data, "eval_data": shapes_data, "output_dir": tmp_path / "out",
        "qformer_name_or_path": stage1_folder, "lm_config": SMALL_LM, "lm_vocab_size": 300,
        "use_lora": use_lora, "lora_r": 2, "lora_alpha": 4,
        "learning_rate": LEARNING_RATE, "qformer_learning_rate": QFORMER_LR,
    })]  # fmt: skip
    arguments = parse_args((VLMModelArguments, DataArguments, TrainingArguments), argv)
    trainer, _ = train_vlm.build_trainer(*arguments)
    lrs = learning_rates(trainer)
    vlm = trainer.model.get_base_model() if use_lora else trainer.model
    # The Q-Former's parameters by identity.
    qformer = {id(p) for p in vlm.qformer.parameters()}

    groups = {"qformer": [], "adapter": [], "lora": [], "language model": []}
    for name, parameter in trainer.model.named_parameters():
        if not parameter.requires_grad:
            continue
        if id(parameter) in qformer:
            kind = "qformer"
        elif ".adapter." in f".{name}":
            kind = "adapter"
        elif "lora_" in name:
            kind = "lora"
        else:
            kind = "language model"
        groups[kind].append(name)
        expected = QFORMER_LR if kind == "qformer" else LEARNING_RATE
        assert lrs[id(parameter)] == pytest.approx(expected), f"{name} ({kind}): lr {lrs[id(parameter)]}"
    assert groups["qformer"] and groups["adapter"]
    if use_lora:
        assert groups["lora"] and not groups["language model"], groups["language model"][:5]
    else:
        assert groups["language model"] and not groups["lora"]
    assert len(lrs) == sum(map(len, groups.values()))
