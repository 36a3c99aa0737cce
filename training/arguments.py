"""Argument dataclasses of the two training scripts, read from a YAML file with command-line overrides.

`python -m training.train_qformer configs/tiny/stage1.yaml --max_steps 50` takes every field from the YAML file,
then lets any `--field value` on the command line replace it, as transformers' example scripts do with JSON files.
"""

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from transformers import HfArgumentParser, TrainingArguments


@dataclass
class QFormerModelArguments:
    """Which stage-1 model to train: a saved one, one on pretrained checkpoints, or the tiny random preset."""

    model_name_or_path: str | None = field(
        default=None, metadata={"help": "A saved Q-Former (folder or Hub id) to continue training."}
    )
    vision_model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "Pretrained vision encoder, e.g. google/vit-base-patch16-224. None: tiny preset."},
    )
    text_model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "BERT-family checkpoint for the Q-Former's text layers, e.g. distilbert-base-uncased."},
    )
    vision_config: dict | str | None = field(
        default=None, metadata={"help": "Tiny preset: overrides of the ViT config (JSON on the command line)."}
    )
    qformer_config: dict | str | None = field(
        default=None, metadata={"help": "Overrides of the Q-Former layers' config (JSON on the command line)."}
    )
    text_vocab_size: int = field(default=1000, metadata={"help": "Tiny preset: vocabulary of the trained tokenizer."})
    num_query_tokens: int = 32
    embed_dim: int = 256
    freeze_vision: bool = True
    itc_similarity: str = field(default="max", metadata={"help": "'max' (BLIP-2) or 'mean' over queries."})
    temperature: float = 0.07
    pretrained_lr_ratio: float = field(
        default=0.1,
        metadata={"help": "Learning-rate multiplier of weights initialised from pretrained checkpoints (text layers)."},
    )
    itm_weight: float = field(default=0.0, metadata={"help": "Weight of the image-text matching loss (0: off)."})
    vision_position_codes: bool = field(
        default=False,
        metadata={"help": "Add fixed 2-D sine-cosine position codes to the patch tokens the queries read."},
    )

    def __post_init__(self):
        self.vision_config = _as_dict(self.vision_config)
        self.qformer_config = _as_dict(self.qformer_config)


@dataclass
class VLMModelArguments:
    """How to assemble the stage-2 model."""

    qformer_name_or_path: str | None = field(
        default=None, metadata={"help": "The stage-1 output folder (or Hub id). Required unless model_name_or_path."}
    )
    model_name_or_path: str | None = field(default=None, metadata={"help": "A saved VLM to continue training."})
    language_model_name_or_path: str | None = field(
        default=None, metadata={"help": "Causal LM, e.g. HuggingFaceTB/SmolLM-135M-Instruct. None: tiny preset."}
    )
    lm_config: dict | str | None = field(default=None, metadata={"help": "Tiny preset: LlamaConfig overrides."})
    lm_vocab_size: int = 800
    adapter_hidden_size: int | None = None
    use_lora: bool = True
    lora_r: int = 64
    lora_alpha: int = 128
    lora_dropout: float = 0.1
    lora_target_modules: str = field(
        default="q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj",
        metadata={"help": "Comma-separated projection names inside the language model."},
    )
    qformer_learning_rate: float = field(
        default=1e-4, metadata={"help": "Learning rate of the Q-Former (the adapter and LoRA use --learning_rate)."}
    )
    freeze_qformer: bool = False

    def __post_init__(self):
        self.lm_config = _as_dict(self.lm_config)
        if self.model_name_or_path is None and self.qformer_name_or_path is None:
            raise ValueError("stage 2 needs --qformer_name_or_path (the stage-1 output) or --model_name_or_path")


@dataclass
class DataArguments:
    """Where the image-text pairs come from (see data.loading.load_image_text_dataset)."""

    train_data: str = field(metadata={"help": "Shard folder, image folder, local dataset or Hub dataset name."})
    eval_data: str | None = field(default=None, metadata={"help": "Same kinds as train_data; default: a split of it."})
    eval_size: int = field(default=1000, metadata={"help": "Held-out samples when eval_data is not given."})
    image_column: str | None = None
    caption_column: str | None = None
    max_train_samples: int | None = None
    max_eval_samples: int | None = None
    max_caption_length: int = field(default=48, metadata={"help": "Tokens per caption (stage 1)."})
    max_length: int = field(default=160, metadata={"help": "Tokens per conversation (stage 2), image tokens included."})
    hard_negatives: int = field(
        default=0, metadata={"help": "Stage 1: counterfactual captions per image used as extra negatives."}
    )
    qa_turns: int = field(default=3, metadata={"help": "Stage 2: question-answer turns per image after the caption."})
    streaming: bool = False
    pixel_format: str = field(
        default="float",
        metadata={"help": "'uint8': the loader sends uint8 pixels, normalised on the GPU (4x fewer bytes to move); "
                          "'float': the image processor's float output."},
    )
    feature_cache: str | None = field(
        default=None,
        metadata={"help": "Folder of precomputed frozen-vision features (python -m training.feature_cache); the "
                          "vision encoder is not run in training. Needs freeze_vision."},
    )


def _as_dict(value: dict | str | None) -> dict:
    if value is None:
        return {}
    return json.loads(value) if isinstance(value, str) else dict(value)


def parse_args(dataclass_types: tuple, argv: list[str] | None = None) -> tuple:
    """Parses `[config.yaml] [--field value ...]` into the given dataclasses (YAML first, command line on top)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = HfArgumentParser(dataclass_types)
    if argv and argv[0].endswith((".yaml", ".yml")):
        path = Path(argv.pop(0))
        if not path.is_file():
            raise FileNotFoundError(f"config file {path} not found; the presets are in configs/<preset>/stage*.yaml")
        values = yaml.safe_load(path.read_text()) or {}
        known = {f for dc in dataclass_types for f in dc.__dataclass_fields__}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"{path}: unknown fields {unknown}; see --help for the accepted ones")
        parser.set_defaults(**values)
        # Fields the YAML file sets are no longer required on the command line.
        for action in parser._actions:
            if action.dest in values:
                action.required = False
    return parser.parse_args_into_dataclasses(args=argv)


__all__ = ["DataArguments", "QFormerModelArguments", "TrainingArguments", "VLMModelArguments", "parse_args"]
