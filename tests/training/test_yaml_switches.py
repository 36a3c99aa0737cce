"""The YAML/CLI switches reach the real training scripts: a feature cache built by its command, then read by a
stage-1 and a stage-2 run; uint8 pixels normalised in the Trainer; the attention kernels."""

import math

import pytest

from cli import UserError
from data.synthetic import generate_dataset
from tests.helpers import REPO
from tests.training.launch import as_cli
from training import feature_cache, train_qformer, train_vlm
from training.arguments import (
    DataArguments,
    QFormerModelArguments,
    TrainingArguments,
    VLMModelArguments,
    parse_args,
    read_yaml_config,
)
from training.models import build_stage1_model, build_stage2_model

VISION = {"image_size": 32, "patch_size": 8, "hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
          "intermediate_size": 64}
QFORMER = {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 64,
           "cross_attention_frequency": 1, "max_position_embeddings": 64}
LM = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
      "num_key_value_heads": 2}


# Slow tier (`make test`, not `make test-fast`): trains through the real scripts.
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    out = tmp_path_factory.mktemp("shards")
    generate_dataset(out, {"train": 24, "validation": 8}, seed=3, samples_per_shard=16, num_proc=1)
    return out


def stage1(shards, out, **overrides) -> list[str]:
    fields = {"train_data": shards, "eval_data": shards, "output_dir": out, "vision_config": VISION,
              "qformer_config": QFORMER, "num_query_tokens": 4, "regional_queries": 0,
              "isolate_regional_queries": False, "embed_dim": 32, "text_vocab_size": 300,
              "freeze_vision": True, "hard_negatives": 0, "per_device_train_batch_size": 8,
              "per_device_eval_batch_size": 8, "max_eval_samples": 8, "max_steps": 2, "warmup_steps": 0,
              "logging_steps": 1, "disable_tqdm": True, **overrides}
    return [str(REPO / "configs/tiny/stage1.yaml"), *as_cli(fields)]


def stage2(shards, qformer, out, **overrides) -> list[str]:
    fields = {"train_data": shards, "eval_data": shards, "output_dir": out, "qformer_name_or_path": qformer,
              "lm_config": LM, "lm_vocab_size": 300, "qa_turns": 1,
              "per_device_train_batch_size": 8, "per_device_eval_batch_size": 8, "max_eval_samples": 4,
              "max_steps": 2, "warmup_steps": 0, "logging_steps": 1, "disable_tqdm": True, **overrides}
    return [str(REPO / "configs/tiny/stage2.yaml"), *as_cli(fields)]


def test_feature_cache_and_uint8_pixels_from_the_config(shards, tmp_path):
    """Same seed, same data: the switched runs end with the plain run's losses (the cache stores bf16 features)."""
    plain = train_qformer.main(stage1(shards, tmp_path / "q"))
    uint8 = train_qformer.main(stage1(shards, tmp_path / "q8", pixel_format="uint8"))
    cache = tmp_path / "cache"
    built = feature_cache.main(["qformer", *stage1(shards, tmp_path / "unused", feature_cache=cache)])
    assert len(built) == 32  # train and validation images
    cached = train_qformer.main(stage1(shards, tmp_path / "qc", feature_cache=cache))
    for name in ("train_loss", "eval_loss", "eval_t2i_r1"):
        assert math.isfinite(plain[name])
        assert uint8[name] == pytest.approx(plain[name], rel=1e-5), name
        assert cached[name] == pytest.approx(plain[name], rel=2e-2, abs=1e-3), name

    # Stage 2 on the stage-1 folder: its encoder is the one the cache was built from, so the same cache serves.
    plain = train_vlm.main(stage2(shards, tmp_path / "q", tmp_path / "v"))
    cached = train_vlm.main(stage2(shards, tmp_path / "q", tmp_path / "vc", feature_cache=cache))
    for name in ("train_loss", "eval_loss"):
        assert cached[name] == pytest.approx(plain[name], rel=2e-2), name


def test_a_cache_of_another_encoder_is_refused(shards, tmp_path):
    cache = tmp_path / "cache"
    feature_cache.main(["qformer", *stage1(shards, tmp_path / "unused", feature_cache=cache)])
    other_vision = {**VISION, "layer_norm_eps": 1e-6}
    with pytest.raises(UserError, match="built for another encoder"):
        train_qformer.main(stage1(shards, tmp_path / "q", feature_cache=cache, vision_config=other_vision))


def attention_kernels(model) -> set[str]:
    """The attention implementation of every sub-model (vision encoder, Q-Former layers, language model)."""
    return {module.config._attn_implementation for module in model.modules() if hasattr(module, "config")}


def test_attention_kernels_from_the_config(shards, tmp_path):
    """attn_implementation reaches every part of either stage's model, is not written into the saved config (it is
    a training-time choice), and leaves the stage-2 losses where sdpa puts them."""
    args = stage1(shards, tmp_path / "q", attn_implementation="eager")
    model_args, _, _ = parse_args((QFormerModelArguments, DataArguments, TrainingArguments), args)
    assert attention_kernels(build_stage1_model(model_args, corpus=lambda: ["a red circle"] * 4)[0]) == {"eager"}
    train_qformer.main(args)
    assert "eager" not in (tmp_path / "q" / "config.json").read_text()

    runs = {}
    for kernel in ("eager", "sdpa"):
        args = stage2(shards, tmp_path / "q", tmp_path / kernel, attn_implementation=kernel, bf16=False)
        model_args, _, _ = parse_args((VLMModelArguments, DataArguments, TrainingArguments), args)
        assert attention_kernels(build_stage2_model(model_args, corpus=lambda: ["a red circle"] * 4)[0]) == {kernel}
        runs[kernel] = train_vlm.main(args)
    for name in ("train_loss", "eval_loss"):
        assert runs["eager"][name] == pytest.approx(runs["sdpa"][name], rel=1e-4), name


@pytest.mark.parametrize("recipe", ["base", "qwen3"])
def test_the_instruct_recipes_are_their_stage2_with_the_option_on(recipe):
    """configs/<recipe>/stage2_instruct.yaml extends stage2.yaml: the same run, the Q-Former reading the instruction."""
    hints = (VLMModelArguments, DataArguments, TrainingArguments)
    plain = read_yaml_config(REPO / f"configs/{recipe}/stage2.yaml", hints)
    instruct = read_yaml_config(REPO / f"configs/{recipe}/stage2_instruct.yaml", hints)
    assert instruct == {**plain, "instruction_aware_qformer": True, "output_dir": f"outputs/{recipe}/vlm_instruct"}


def test_an_extending_yaml_changes_only_what_it_states(shards, tmp_path):
    """`extends:` with a command line on top: the child's fields over its parent's, the command line over both; and
    the option trains through the real script, its saved model reading instructions."""
    tiny = REPO / "configs/tiny/stage2.yaml"
    (tmp_path / "parent.yaml").write_text(f"extends: {tiny}\nmax_steps: 7\nlearning_rate: 0.5\nqa_turns: 2\n")
    (tmp_path / "child.yaml").write_text("extends: parent.yaml\nlearning_rate: 0.01\ninstruction_aware_qformer: true\n")
    hints = (VLMModelArguments, DataArguments, TrainingArguments)
    assert read_yaml_config(tmp_path / "child.yaml", hints) == {
        **read_yaml_config(tiny, hints), "max_steps": 7, "learning_rate": 0.01, "qa_turns": 2,
        "instruction_aware_qformer": True}
    train_qformer.main(stage1(shards, tmp_path / "q"))
    args = [str(tmp_path / "child.yaml"), *stage2(shards, tmp_path / "q", tmp_path / "vlm", bf16=False)[1:]]
    model_args, data_args, training_args = parse_args(hints, args)
    assert model_args.instruction_aware_qformer and training_args.learning_rate == 0.01 and data_args.qa_turns == 1
    metrics = train_vlm.main(args)
    assert math.isfinite(metrics["train_loss"]) and math.isfinite(metrics["eval_loss"])
    assert '"instruction_aware_qformer": true' in (tmp_path / "vlm" / "config.json").read_text()
