"""Argument dataclasses of the training scripts, read from a YAML file with command-line overrides.

`python -m training.train_qformer configs/tiny/stage1.yaml --max_steps 50` takes every field from the YAML file,
then lets any `--field value` on the command line replace it, as transformers' example scripts do with JSON files.
`--help` lists every field with its help text.

The models' own settings (number of queries, embedding size, similarity rule, adapter width, ...) are not listed
here: `with_config_fields` derives them from `QFormerConfig` and `VLMConfig`, with the config's types and the help
of its docstring, so the config class is the one place that defines them.

Every mistake in a config file or on the command line is a `UserError` naming the field, the file and line where it
was read, and the fix: an unknown field (with the nearest known one), a value of the wrong type, a YAML syntax
error, a count below its minimum, a missing config file.
"""

import dataclasses
import enum
import inspect
import json
import re
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import yaml
from transformers import HfArgumentParser, TrainingArguments

from cli import OneLineErrors, UserError, check_at_least, closest, unknown_flags_message
from modeling import QFormerConfig, VLMConfig
from modeling.lora import LORA_TARGET_MODULES
from modeling.presets import TINY_SETTINGS

# ----------------------------------------------------------------------------------------------
# Model settings derived from the model configs
# ----------------------------------------------------------------------------------------------


def config_docs(config_class: type) -> dict[str, str]:
    """The `Args:` entries of a config class docstring, `{name: description}` with the lines joined."""
    docs, name = {}, None
    for line in inspect.getdoc(config_class).splitlines():
        entry = re.match(r"^    (\w+) \(.*\):$", line)
        if entry:
            name = entry.group(1)
            docs[name] = ""
        elif name and line.startswith("        "):
            docs[name] = f"{docs[name]} {line.strip()}".strip()
        elif line.strip():
            name = None
    return docs


def with_config_fields(config_class: type, exclude: tuple[str, ...] = ()):
    """Adds `config_class`'s own settings (its annotated fields, minus `exclude`) to an argument dataclass.

    Each becomes an optional field of the config's type whose help is the config docstring's description. Left
    unset (None), the model keeps its preset's value (the tiny preset's, or the config class default); set, it goes
    to the config (`config_overrides`).
    """
    docs = config_docs(config_class)

    def decorate(cls):
        names = [n for n in config_class.__annotations__ if n not in exclude]
        fields = []
        for name in names:
            default = getattr(config_class, name)
            help_text = f"{docs.get(name, '')} Unset: the preset's value ({config_class.__name__}: {default!r})."
            fields.append((name, config_class.__annotations__[name] | None,
                           field(default=None, metadata={"help": help_text.strip()})))
        derived = dataclasses.make_dataclass(cls.__name__, fields, bases=(cls,))
        derived.__doc__, derived.__module__, derived.__qualname__ = cls.__doc__, cls.__module__, cls.__qualname__
        derived.config_class, derived.config_fields = config_class, tuple(names)
        return derived

    return decorate


def config_overrides(model_args) -> dict:
    """The config settings given in `model_args` (`with_config_fields` fields that are set)."""
    values = {name: getattr(model_args, name) for name in model_args.config_fields}
    return {name: value for name, value in values.items() if value is not None}


def _as_dict(name: str, value: dict | str | None) -> dict:
    if value is None:
        return {}
    if isinstance(value, dict):
        return dict(value)
    try:
        parsed = json.loads(value)
    except ValueError:
        parsed = None
    if not isinstance(parsed, dict):
        raise UserError(f"{name} must be a JSON object such as '{{\"hidden_size\": 64}}', got {value!r}")
    return parsed


def _validate_config(model_args, preset: dict | None = None) -> None:
    """Builds the model config from the given settings over `preset` (the values the model starts from), so a bad
    value, or one that does not fit the preset's (e.g. more regional queries than it has queries), is reported
    before any data is read."""
    try:
        model_args.config_class(**{**(preset or {}), **config_overrides(model_args)})
    except ValueError as err:
        raise UserError(str(err)) from None


def preset_field(stage: str):
    """The `preset` option of both stages: the tiny models are asked for by name, never chosen by leaving things out
    (a stage-2 file that forgets its language model would otherwise train a random 2-layer one)."""
    return field(
        default=None,
        metadata={"help": f"'tiny': the offline tiny preset (random {stage} trained from scratch, tokenizers trained "
                          "on the data; configs/tiny). Unset: the named checkpoints give the model."},
    )


def check_preset(model_args, pretrained: dict[str, str | None], tiny_only: dict[str, object], saved: str | None,
                 example: str) -> None:
    """`UserError` when the preset and the named models disagree: tiny beside a pretrained checkpoint, neither of
    them, or a tiny-only setting beside a pretrained checkpoint (it would be ignored). A saved model to continue
    (`model_name_or_path`) fixes its own sizes, so the tiny-only settings are not read then."""
    named = [name for name, value in pretrained.items() if value]
    if model_args.preset == "tiny" and named:
        raise UserError(f"preset: tiny builds random models, but {named[0]} names a pretrained one; leave out one of "
                        "the two")
    if model_args.preset is None and not named and not saved:
        raise UserError(f"no model named: set {example}, model_name_or_path (a saved model to continue), or "
                        "preset: tiny for the tiny random models (configs/tiny)")
    ignored = [name for name, value in tiny_only.items() if value not in (None, {})]
    if named and ignored:
        raise UserError(f"{ignored[0]} is a setting of the tiny preset; it is not read beside {named[0]}: leave it "
                        "out")


def attn_implementation_field():
    """The `--attn_implementation` option of both stages (one definition for both argument classes)."""
    return field(
        default=None,
        metadata={"help": "Attention kernels of every part of the model (vision encoder, Q-Former, language model): "
                          "sdpa or eager. Unset: transformers' default (sdpa). On CPUs eager can be faster: the tiny "
                          "stage-2 preset uses it (configs/tiny/stage2.yaml)."},
    )


# ----------------------------------------------------------------------------------------------
# The argument dataclasses
# ----------------------------------------------------------------------------------------------


@with_config_fields(QFormerConfig, exclude=("vision_config", "qformer_config"))
@dataclass
class QFormerModelArguments:
    """Which stage-1 model to train: a saved one, one on pretrained checkpoints, or the tiny random preset."""

    preset: Literal["tiny"] | None = preset_field("vision encoder and Q-Former")
    model_name_or_path: str | None = field(
        default=None, metadata={"help": "A saved Q-Former (stage-1 output folder or Hub id) to continue training."}
    )
    vision_model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "Pretrained vision encoder, e.g. google/vit-base-patch16-224 (and text_model_name_or_path)"},
    )
    text_model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "BERT-family checkpoint for the Q-Former's text layers, e.g. distilbert-base-uncased."},
    )
    vision_config: dict | str | None = field(
        default=None,
        metadata={"help": "Tiny preset: changes to its vision encoder config, e.g. {\"num_hidden_layers\": 6} (JSON on "
                          "the command line); \"model_type\" picks another encoder (e.g. resnet)."},
    )
    qformer_config: dict | str | None = field(
        default=None, metadata={"help": "Changes to the Q-Former layers' config (Blip2QFormerConfig fields)."}
    )
    text_vocab_size: int | None = field(
        default=None, metadata={"help": "Tiny preset: vocabulary of the trained tokenizer (unset: the preset's)."}
    )
    pretrained_lr_ratio: float = field(
        default=0.1,
        metadata={"help": "Learning-rate multiplier of weights initialised from pretrained checkpoints (text layers)."},
    )
    attn_implementation: Literal["sdpa", "eager"] | None = attn_implementation_field()

    def __post_init__(self):
        self.vision_config = _as_dict("vision_config", self.vision_config)
        self.qformer_config = _as_dict("qformer_config", self.qformer_config)
        if self.text_vocab_size is not None:
            check_at_least({"text_vocab_size": self.text_vocab_size}, 50)
        check_at_least({"pretrained_lr_ratio": self.pretrained_lr_ratio}, 0)
        check_preset(
            self, {"vision_model_name_or_path": self.vision_model_name_or_path,
                   "text_model_name_or_path": self.text_model_name_or_path},
            {"vision_config": self.vision_config, "text_vocab_size": self.text_vocab_size}, self.model_name_or_path,
            "vision_model_name_or_path and text_model_name_or_path (configs/base/stage1.yaml)")
        _validate_config(self, TINY_SETTINGS if self.preset == "tiny" and not self.model_name_or_path else None)


@with_config_fields(VLMConfig, exclude=("qformer_config", "text_config", "image_token_id"))
@dataclass
class VLMModelArguments:
    """How to assemble the stage-2 model: a stage-1 Q-Former, an adapter and a language model (with LoRA)."""

    preset: Literal["tiny"] | None = preset_field("language model")
    qformer_name_or_path: str | None = field(
        default=None, metadata={"help": "The stage-1 output folder (or Hub id). Required unless model_name_or_path."}
    )
    model_name_or_path: str | None = field(
        default=None, metadata={"help": "A saved VLM (stage-2 output folder or Hub id) to continue training."}
    )
    language_model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "Pretrained causal LM, e.g. HuggingFaceTB/SmolLM-135M-Instruct (or preset: tiny)."},
    )
    lm_config: dict | str | None = field(
        default=None, metadata={"help": "Tiny preset: changes to its LlamaConfig, e.g. {\"num_hidden_layers\": 4}."}
    )
    lm_vocab_size: int | None = field(
        default=None, metadata={"help": "Tiny preset: vocabulary of the trained LM tokenizer (unset: the preset's)."}
    )
    use_lora: bool = field(
        default=True, metadata={"help": "Train the language model through LoRA (false: train all its weights)."}
    )
    lora_r: int = field(default=64, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=128, metadata={"help": "LoRA scaling numerator (the update is scaled by alpha/r)."})
    lora_dropout: float = field(default=0.1, metadata={"help": "Dropout on the LoRA branch's input."})
    lora_target_modules: str = field(
        default=",".join(LORA_TARGET_MODULES),
        metadata={"help": "Comma-separated projection names inside the language model that get LoRA."},
    )
    qformer_learning_rate: float = field(
        default=1e-4, metadata={"help": "Learning rate of the Q-Former (the adapter and LoRA use --learning_rate)."}
    )
    freeze_qformer: bool = field(
        default=False, metadata={"help": "Keep the stage-1 Q-Former fixed; only the adapter and the LM train."}
    )
    attn_implementation: Literal["sdpa", "eager"] | None = attn_implementation_field()

    def __post_init__(self):
        self.lm_config = _as_dict("lm_config", self.lm_config)
        if self.model_name_or_path is None and self.qformer_name_or_path is None:
            raise UserError(
                "stage 2 needs --qformer_name_or_path (the stage-1 output folder) or --model_name_or_path (a saved VLM)"
            )
        if self.lm_vocab_size is not None:
            check_at_least({"lm_vocab_size": self.lm_vocab_size}, 50)
        check_preset(self, {"language_model_name_or_path": self.language_model_name_or_path},
                     {"lm_config": self.lm_config, "lm_vocab_size": self.lm_vocab_size}, self.model_name_or_path,
                     "language_model_name_or_path (e.g. HuggingFaceTB/SmolLM-135M-Instruct; configs/base/stage2.yaml)")
        check_at_least({"lora_r": self.lora_r, "lora_alpha": self.lora_alpha}, 1)
        check_at_least({"qformer_learning_rate": self.qformer_learning_rate, "lora_dropout": self.lora_dropout}, 0)
        if not self.lora_target_modules.strip(","):
            raise UserError("lora_target_modules is empty; name the projections, e.g. q_proj,v_proj")
        _validate_config(self)


@dataclass
class DataArguments:
    """Where the image-text pairs come from (see data.loading.load_image_text_dataset) and how they are batched."""

    train_data: str = field(
        metadata={"help": "Shard folder, image folder, local dataset or Hub dataset name; stage 2 also reads "
                          "conversation data (see data_format): a LLaVA .json/.jsonl file, parquet files, a "
                          "save_to_disk folder or a Hub dataset."}
    )
    eval_data: str | None = field(default=None, metadata={"help": "Same kinds as train_data; default: a split of it."})
    eval_size: int = field(default=1000, metadata={"help": "Held-out samples when eval_data is not given."})
    dataset_config_name: str | None = field(
        default=None, metadata={"help": "Configuration of a Hub dataset (e.g. the_cauldron's 'vqav2')."}
    )
    data_format: Literal["auto", "image_text", "llava", "cauldron", "messages", "vqa"] = field(
        default="auto",
        metadata={"help": "Stage 2: how train_data and eval_data are laid out. image_text: one image, a caption and "
                          "question-answer pairs per sample (shards, image folders, caption datasets). llava: "
                          "`conversations` of human/gpt turns and an `image` path (LLaVA JSON). cauldron: `images` + "
                          "`texts` of user/assistant pairs (the_cauldron, FineVision). messages: `messages` + `images` "
                          "(TRL). vqa: a question column and an answer (or answer list) column. auto: told from the "
                          "files and columns."},
    )
    image_folder: str | None = field(
        default=None, metadata={"help": "Stage 2: the folder that the data's relative image paths are under (LLaVA)."}
    )
    question_column: str | None = field(
        default=None, metadata={"help": "Stage 2, VQA data: the question column (unset: question)."}
    )
    answer_column: str | None = field(
        default=None, metadata={"help": "Stage 2, VQA data: the answer column (unset: answers, else answer); a list of "
                                        "human answers trains on the most frequent one."}
    )
    min_ratings: str | None = field(
        default=None,
        metadata={"help": "Stage 2, FineVision: minimum per-turn ratings, e.g. 'relevance=3,formatting=2' (columns "
                          "<name>_ratings, 1-5); turns rated lower are dropped, samples left without turns skipped."},
    )
    max_images_per_sample: int | None = field(
        default=None, metadata={"help": "Stage 2: samples with more images are skipped and counted (unset: no limit)."}
    )
    image_column: str | None = field(
        default=None, metadata={"help": "Image column of a datasets source (guessed when unset: an Image column)."}
    )
    caption_column: str | None = field(
        default=None, metadata={"help": "Caption column of a datasets source (guessed when unset: caption, text...); "
                                        "for shards, the field of each sample's .json (unset: the .txt member)."}
    )
    negative_captions_column: str | None = field(
        default=None, metadata={"help": "Column (shards: .json field) of counterfactual captions per image, for "
                                        "hard_negatives (unset: negative_captions)."}
    )
    max_train_samples: int | None = field(
        default=None, metadata={"help": "Train on the first N samples only (unset: all)."}
    )
    max_eval_samples: int | None = field(
        default=None, metadata={"help": "Evaluate on the first N samples only (unset: all)."}
    )
    max_caption_length: int = field(default=48, metadata={"help": "Tokens per caption (stage 1)."})
    max_length: int = field(default=160, metadata={"help": "Tokens per conversation (stage 2), image tokens included."})
    hard_negatives: int = field(
        default=0, metadata={"help": "Stage 1: counterfactual captions per image used as extra negatives (the data's "
                                     "negative_captions)."}
    )
    qa_turns: int = field(
        default=3, metadata={"help": "Stage 2: question-answer turns per image beside the caption (the data's qa)."}
    )
    separate_turns: bool = field(
        default=False,
        metadata={"help": "Stage 2: every turn (the caption, each question) is a conversation of its own with the "
                          "image, so no answer can be read off an earlier turn, as in evaluation."},
    )
    pixel_format: Literal["float", "uint8"] = field(
        default="float",
        metadata={"help": "'uint8': the loader sends uint8 pixels, normalised on the GPU (4x fewer bytes to move); "
                          "'float': the image processor's float output."},
    )
    streaming: bool = field(
        default=False,
        metadata={"help": "Read train_data's webdataset shards (stage 2: or parquet / JSON-lines conversation files) "
                          "lazily while training (data.streaming): nothing is copied into the datasets cache, "
                          "processes and DataLoader workers read their own shards, checkpoints resume mid-epoch "
                          "exactly. Needs max_steps and eval_data."},
    )
    shuffle_buffer_size: int = field(
        default=10_000,
        metadata={"help": "With streaming: sample references in each reader's shuffle buffer (1: file order)."},
    )
    preprocessing_num_workers: int | None = field(
        default=None,
        metadata={"help": "Processes that read and clean the data before training (map-style data: once, then the "
                          "datasets cache answers); the rows and their order are the same for any number."},
    )
    feature_cache: str | None = field(
        default=None,
        metadata={"help": "Folder of precomputed frozen-vision features (python -m training.feature_cache); the "
                          "vision encoder is not run in training. Needs freeze_vision."},
    )

    def min_ratings_dict(self) -> dict[str, int] | None:
        """`min_ratings` as {rating name: minimum}."""
        if not self.min_ratings:
            return None
        ratings = {}
        for item in self.min_ratings.split(","):
            name, _, value = item.partition("=")
            if not name.strip() or not value.strip().isdigit():
                raise UserError(f"min_ratings entry {item!r} is not name=value; write e.g. 'relevance=3,formatting=2'")
            ratings[name.strip()] = int(value)
        return ratings

    def __post_init__(self):
        self.min_ratings_dict()
        check_at_least({"max_images_per_sample": self.max_images_per_sample}, 0)
        check_at_least({"eval_size": self.eval_size, "max_train_samples": self.max_train_samples,
                        "max_eval_samples": self.max_eval_samples,
                        "preprocessing_num_workers": self.preprocessing_num_workers}, 1)
        check_at_least({"max_caption_length": self.max_caption_length, "max_length": self.max_length}, 2)
        check_at_least({"hard_negatives": self.hard_negatives, "qa_turns": self.qa_turns}, 0)
        check_at_least({"shuffle_buffer_size": self.shuffle_buffer_size}, 1)
        if self.streaming:
            for name, value in (("max_train_samples", self.max_train_samples), ("feature_cache", self.feature_cache)):
                if value is not None:
                    raise UserError(f"{name} does not work with streaming; leave it out, or set streaming: false")
            if self.eval_data is None:
                raise UserError("streaming needs eval_data: holding samples out of a stream would mean reading it all "
                                "first; give a separate evaluation set (e.g. one shard folder)")


def check_training_arguments(args: TrainingArguments) -> None:
    """The counts of `TrainingArguments` that it leaves to fail at the first batch (or never)."""
    check_at_least({"per_device_train_batch_size": args.per_device_train_batch_size,
                    "per_device_eval_batch_size": args.per_device_eval_batch_size,
                    "gradient_accumulation_steps": args.gradient_accumulation_steps}, 1)
    if args.max_steps == 0 or args.max_steps < -1:
        raise UserError(f"max_steps must be at least 1 (or -1 to train for num_train_epochs), got {args.max_steps}")
    if args.max_steps == -1 and args.num_train_epochs <= 0:
        raise UserError(f"num_train_epochs must be above 0 when max_steps is unset, got {args.num_train_epochs}")
    check_at_least({"learning_rate": args.learning_rate}, 0)
    if args.lr_scheduler_type == "warmup_stable_decay":
        decay = (args.lr_scheduler_kwargs or {}).get("num_decay_steps")
        if decay is None:
            raise UserError("lr_scheduler_type warmup_stable_decay needs lr_scheduler_kwargs {num_decay_steps: N}, the "
                            "steps that decay the learning rate at the end")
        # Too long a decay for the run makes transformers' schedule drop the rate at the end of the warmup.
        warmup = args.get_warmup_steps(args.max_steps) if args.max_steps > 0 else 0
        if 0 < args.max_steps < warmup + decay:
            raise UserError(f"num_decay_steps {decay} after {warmup} warmup steps does not fit in max_steps "
                            f"{args.max_steps}; set lr_scheduler_kwargs num_decay_steps to at most "
                            f"{args.max_steps - warmup}")


# ----------------------------------------------------------------------------------------------
# Parsing: YAML file, then the command line
# ----------------------------------------------------------------------------------------------


# On the command line, these words unset a field of ours that may be unset, e.g. a column a preset's YAML names
# (`--caption_column none`: the caption of shards is then their .txt member). TrainingArguments keeps transformers'
# own reading, where `--report_to none` is a value.
UNSET_WORDS = ("none", "null")


def _or_unset(convert):
    """An argparse `type` that reads `UNSET_WORDS` as None and anything else through `convert`."""

    def parse(text: str):
        return None if text.lower() in UNSET_WORDS else convert(text)

    parse.__name__ = getattr(convert, "__name__", "value")  # argparse names the type in its errors
    return parse


class _Parser(OneLineErrors, HfArgumentParser):
    """HfArgumentParser whose mistakes are one-line `UserError`s, and where `none`/`null` unset our optional
    fields."""

    def __init__(self, dataclass_types, **kwargs):
        super().__init__(dataclass_types, **kwargs)
        for dataclass_type in dataclass_types:
            if issubclass(dataclass_type, TrainingArguments):
                continue
            hints = typing.get_type_hints(dataclass_type)
            for item in dataclasses.fields(dataclass_type):
                action = self._option_string_actions.get(f"--{item.name}")
                if action is None or action.type is None or type(None) not in typing.get_args(hints[item.name]):
                    continue
                action.type = _or_unset(action.type)
                if action.choices is not None:
                    action.choices = [*action.choices, None]


def _type_problem(value, annotation) -> str | None:
    """Why `value` (from YAML) cannot fill a field annotated `annotation`, or None when it can.

    Strings are what a command line gives: a string that converts (e.g. `1e-3` for a float) fits, as argparse
    converts string defaults too.
    """
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        problems = [_type_problem(value, arg) for arg in typing.get_args(annotation)]
        # "null" (for a field that may be unset) goes without saying.
        return None if None in problems else " or ".join(dict.fromkeys(p for p in problems if p != "null"))
    if annotation is type(None):
        return None if value is None else "null"
    if origin is Literal:
        choices = typing.get_args(annotation)
        return None if value in choices else f"one of {', '.join(map(repr, choices))}"
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        choices = [member.value for member in annotation]
        return None if value in choices else f"one of {', '.join(map(repr, choices))}"
    if annotation is bool:
        return None if isinstance(value, bool) or str(value).lower() in ("true", "false") else "true or false"
    if annotation in (int, float):
        kind = "an integer" if annotation is int else "a number"
        if isinstance(value, bool):
            return kind
        if isinstance(value, int) or (annotation is float and isinstance(value, float)):
            return None
        if isinstance(value, str):
            try:
                annotation(value)
            except ValueError:
                return kind
            return None
        return kind
    if annotation is str:
        return None if isinstance(value, (str, int, float)) and not isinstance(value, bool) else "a string"
    if annotation is dict or origin is dict:
        return None if isinstance(value, dict) else "a mapping"
    if annotation is list or origin is list:
        return None if isinstance(value, list) else "a list"
    return None


def read_yaml_config(path: Path, dataclass_types: tuple, _seen: tuple[Path, ...] = ()) -> dict:
    """The fields of a YAML config file, checked against the dataclasses: known names, fitting types.

    An `extends: other.yaml` line (a path relative to the file) starts from that file's fields, which this one's
    change or add to: a variant of a recipe states only what differs.

    Raises `UserError` naming the file and line of the first problem.
    """
    if not path.is_file():
        raise UserError(f"config file {path} not found; the presets are configs/<tiny|base|qwen3>/stage<1|2>.yaml")
    text = path.read_text(encoding="utf-8")
    try:
        root = yaml.compose(text)
        values = yaml.safe_load(text) or {}
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(err, "problem", None) or str(err)
        raise UserError(f"{path}{where}: not valid YAML ({problem}); fix the syntax there") from None
    if not isinstance(values, dict):
        raise UserError(f"{path}: expected `field: value` lines, got a YAML {type(values).__name__}")
    lines = {node.value: node.start_mark.line + 1 for node, _ in root.value} if root is not None else {}
    inherited = {}
    if "extends" in values:
        parent = path.parent / str(values.pop("extends"))
        if not parent.is_file():
            raise UserError(f"{path} line {lines['extends']}: extends {parent}, which is not a file; give its path "
                            f"relative to {path.parent}")
        if parent.resolve() in _seen:
            raise UserError(f"{path} line {lines['extends']}: extends {parent}, which extends {path} again; break "
                            "the cycle")
        inherited = read_yaml_config(parent, dataclass_types, (*_seen, path.resolve()))
    hints = {}
    for dataclass_type in dataclass_types:
        types_of = typing.get_type_hints(dataclass_type)
        hints.update({f.name: types_of[f.name] for f in dataclasses.fields(dataclass_type)})
    for name, value in values.items():
        where = f"{path} line {lines.get(name, '?')}"
        if name not in hints:
            raise UserError(f"{where}: unknown field {name!r}{closest(name, hints)}; the script's --help lists them")
        problem = _type_problem(value, hints[name])
        if problem:
            raise UserError(f"{where}: {name} must be {problem}, got {value!r}")
    return {**inherited, **values}


def parse_args(dataclass_types: tuple, argv: list[str] | None = None) -> tuple:
    """Parses `[config.yaml] [--field value ...]` into the given dataclasses (YAML first, command line on top).

    A `TrainingArguments` among them is also checked for counts the Trainer would only reject at the first batch.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    # Exact option names only: argparse would take `--max_step` for `--max_steps`, and a typo for another option.
    script = "train_vlm" if VLMModelArguments in dataclass_types else "train_qformer"
    parser = _Parser(dataclass_types, prog=f"python -m training.{script}", allow_abbrev=False)
    if argv and not argv[0].startswith("-"):
        path = Path(argv.pop(0))
        if path.suffix not in (".yaml", ".yml"):
            raise UserError(f"{path}: the config file must be a .yaml file (or start with --field value options)")
        values = read_yaml_config(path, dataclass_types)
        parser.set_defaults(**values)
        # Fields the YAML file sets are no longer required on the command line.
        for action in parser._actions:
            if action.dest in values:
                action.required = False
    try:
        *parsed, unknown = parser.parse_args_into_dataclasses(args=argv, return_remaining_strings=True)
    except UserError:
        raise
    except (ValueError, TypeError) as err:  # a dataclass refused a combination of values (e.g. TrainingArguments)
        raise UserError(str(err)) from None
    if unknown:
        raise UserError(
            f"{unknown_flags_message(unknown, parser._option_string_actions)}; `{parser.prog} --help` lists the options"
        )
    for arguments in parsed:
        if isinstance(arguments, TrainingArguments):
            check_training_arguments(arguments)
            # A stream has no length, so the Trainer cannot count epochs; it would stop at its set-up with a traceback.
            if any(getattr(other, "streaming", False) for other in parsed) and arguments.max_steps <= 0:
                raise UserError("streaming: true needs max_steps (a stream has no length to count epochs in); set "
                                "max_steps, e.g. --max_steps 10000")
    return tuple(parsed)


__all__ = [
    "DataArguments", "QFormerModelArguments", "TrainingArguments", "VLMModelArguments", "check_training_arguments",
    "config_overrides", "parse_args", "read_yaml_config", "with_config_fields",
]
