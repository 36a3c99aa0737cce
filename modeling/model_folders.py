"""Saved model folders and Hub names, checked before anything is loaded from them.

A command given the wrong folder should say so in one line, before minutes of data loading: a stage-2 VLM where a
stage-1 Q-Former is expected (and the reverse), another architecture, a folder without weights or with weights cut
short by an interrupted save, a local path with a typo. `check_model_source` does those checks (on a local folder
it reads config.json and the safetensors headers only; for a Hub name it fetches config.json), and `load_pretrained`
loads after them, with a clear message when loading still fails. Not shipped with the weights (no model file
imports it).
"""

import json
import logging
import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from huggingface_hub.errors import HTTPError
from safetensors import SafetensorError, safe_open
from transformers import PreTrainedConfig
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from cli.errors import UserError, one_line
from cli.paths import looks_like_local_path, missing_path

from .configuration_qformer import QFormerConfig
from .configuration_vlm import VLMConfig
from .lora import NON_LORA_WEIGHTS

SAFE_WEIGHTS = "model.safetensors"
SAFE_WEIGHTS_INDEX = "model.safetensors.index.json"
# What a checkpoint of a LoRA run holds instead (peft's name).
ADAPTER_WEIGHTS = "adapter_model.safetensors"
# Older checkpoints of base models (e.g. a BERT downloaded long ago) may only have these; transformers loads them.
LEGACY_WEIGHTS = ("pytorch_model.bin", "pytorch_model.bin.index.json")


@dataclass(frozen=True)
class ModelKind:
    """What an option expects: a description, the accepted `model_type`s (None: any) and where to find one."""

    description: str
    model_types: frozenset[str] | None
    where: str


QFORMER = ModelKind(
    "a stage-1 Q-Former", frozenset({QFormerConfig.model_type}),
    "the output_dir of `python -m training.train_qformer` (e.g. outputs/demo/qformer)",
)
VLM = ModelKind(
    "a stage-2 VLM", frozenset({VLMConfig.model_type}),
    "the output_dir of `python -m training.train_vlm` (e.g. outputs/demo/vlm)",
)
QFORMER_OR_VLM = ModelKind(
    "a stage-1 Q-Former or a stage-2 VLM", QFORMER.model_types | VLM.model_types,
    "a folder written by `python -m training.train_qformer` or `training.train_vlm` (e.g. outputs/demo/vlm)",
)
CAUSAL_LM = ModelKind(
    "a causal language model", frozenset(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES),
    "a Hub name such as HuggingFaceTB/SmolLM-135M-Instruct, or a folder written by save_pretrained",
)
BERT_TEXT_ENCODER = ModelKind(
    "a BERT or DistilBERT text encoder", frozenset({"bert", "distilbert"}),
    "a Hub name such as distilbert-base-uncased, or a folder written by save_pretrained",
)
VISION_ENCODER = ModelKind(
    "a vision encoder", None, "a Hub name such as google/vit-base-patch16-224, or a folder written by save_pretrained"
)

_OUR_KINDS = {QFormerConfig.model_type: QFORMER.description, VLMConfig.model_type: VLM.description}


def _what_it_is(model_type: str | None) -> str:
    if model_type in _OUR_KINDS:
        return f"{_OUR_KINDS[model_type]} (model_type {model_type})"
    return f"a {model_type!r} model" if model_type else "a config without model_type"


def check_weights(folder: str | os.PathLike) -> None:
    """Raises `UserError` naming the file when `folder`'s safetensors weights are missing, truncated or corrupt.

    Reads only the headers: safetensors checks that the header's tensors cover the file exactly, which is what a
    save cut short (a killed process, a full disk) breaks.
    """
    folder = Path(folder)
    if (folder / SAFE_WEIGHTS_INDEX).is_file():
        try:
            files = sorted(set(json.loads((folder / SAFE_WEIGHTS_INDEX).read_text())["weight_map"].values()))
        except (ValueError, KeyError) as err:
            raise UserError(f"{folder / SAFE_WEIGHTS_INDEX} is unreadable ({err}); save the model again") from None
    elif (folder / SAFE_WEIGHTS).is_file() or (folder / ADAPTER_WEIGHTS).is_file():
        files = [name for name in (SAFE_WEIGHTS, ADAPTER_WEIGHTS, NON_LORA_WEIGHTS) if (folder / name).is_file()]
    elif any((folder / name).is_file() for name in LEGACY_WEIGHTS):
        return
    else:
        raise UserError(
            f"{folder / SAFE_WEIGHTS} is missing: the folder has a config but no weights (an interrupted save?); "
            "save the model again, or use another complete checkpoint"
        )
    for name in files:
        path = folder / name
        if not path.is_file():
            raise UserError(f"{path} is missing (listed in {SAFE_WEIGHTS_INDEX}); save the model again")
        try:
            with safe_open(str(path), framework="pt"):
                pass
        except SafetensorError as err:
            raise UserError(
                f"{path} is truncated or corrupt ({err}): its save did not finish; save the model again, or use an "
                "earlier complete checkpoint"
            ) from None


def check_model_source(name_or_path: str | os.PathLike, option: str, kind: ModelKind) -> str:
    """`name_or_path` as a loadable string, after checking what can be checked without loading.

    A local folder must hold a config.json of the expected kind and complete weights; a value that can only be a
    local path must exist; anything else is a Hub name whose config.json must download and be of the expected kind.
    Raises `UserError` naming `option`, the value and the fix.
    """
    value = os.fspath(name_or_path)
    path = Path(os.path.expanduser(value))
    if not path.exists():
        if looks_like_local_path(value):
            raise missing_path(option, value, f"{kind.description}: {kind.where}")
        with hub_errors(option, value):
            config, _ = PreTrainedConfig.get_config_dict(value)
        _check_kind(config.get("model_type"), option, value, kind)
        return value
    if not path.is_dir():
        raise UserError(f"{option} {value} is a file; give the model's folder ({kind.description}: {kind.where})")
    config_file = path / "config.json"
    if not config_file.is_file():
        raise UserError(
            f"{option} {value} has no config.json, so it is not a saved model; expected {kind.description}: "
            f"{kind.where}"
        )
    try:
        model_type = json.loads(config_file.read_text()).get("model_type")
    except (ValueError, AttributeError) as err:
        raise UserError(f"{config_file} is not a JSON object ({err}); save the model again") from None
    _check_kind(model_type, option, value, kind)
    check_weights(path)
    return str(path)


def _check_kind(model_type: str | None, option: str, value: str, kind: ModelKind) -> None:
    if kind.model_types is not None and model_type not in kind.model_types:
        raise UserError(f"{option} {value} is {_what_it_is(model_type)}, not {kind.description}; give {kind.where}")


@contextmanager
def hub_errors(option: str, name: str):
    """Turns a failure to load `name` (a local folder or a Hub name) into a `UserError` naming the option."""
    try:
        yield
    except (OSError, HTTPError) as err:  # httpx's network errors are not OSErrors
        advice = "" if os.path.isdir(os.path.expanduser(name)) else (
            "; no such local folder, and the Hugging Face Hub could not provide it: check the name, the network and "
            "your access (with HF_HUB_OFFLINE=1 only models already in the cache load), or download it on a "
            "connected machine (`hf download NAME --local-dir DIR`) and pass that local folder"
        )
        raise UserError(f"{option} {name}: could not be loaded ({one_line(err)[:300]}){advice}") from err


def load_pretrained(auto_class, name_or_path: str | os.PathLike, option: str, kind: ModelKind, *, whole: bool = False,
                    **kwargs):
    """`auto_class.from_pretrained(name_or_path, **kwargs)` after `check_model_source`, with Hub failures
    reported as `UserError`. `whole` (a model class, for evaluation and serving): see `load_whole_model`."""
    source = check_model_source(name_or_path, option, kind)
    with hub_errors(option, source):
        if whole:
            return load_whole_model(auto_class, source, option, **kwargs)
        return auto_class.from_pretrained(source, **kwargs)


def _no_load_report(record: logging.LogRecord) -> bool:
    return "LOAD REPORT" not in record.getMessage()


def load_whole_model(auto_class, source: str, option: str, **kwargs):
    """`auto_class.from_pretrained(source, **kwargs)`, raising `UserError` unless every weight of the folder finds
    its parameter and every parameter its weight (a weight of another shape already stops transformers' loading,
    unless `ignore_mismatched_sizes` is passed; then it is refused here too).

    The model classes this checkout defines win over the code saved beside the weights, so a model saved by other
    code (a branch, an older or newer version) would otherwise run with weights dropped, or drawn at random, after
    one warning among the logs, and its scores would describe another model.
    """
    # transformers logs the same facts as a warning table; here they are an error, said once. (A filter, not a
    # higher level: at WARNING or above, transformers also lists every layer that tensor parallelism left alone.)
    report = logging.getLogger("transformers.modeling_utils")
    report.addFilter(_no_load_report)
    try:
        model, info = auto_class.from_pretrained(source, output_loading_info=True, **kwargs)
    finally:
        report.removeFilter(_no_load_report)
    problems = []
    for kind in ("unexpected", "missing", "mismatched"):
        keys = sorted(str(key[0] if isinstance(key, tuple) else key) for key in info.get(f"{kind}_keys") or ())
        if keys:
            more = f" and {len(keys) - 3} more" if len(keys) > 3 else ""
            problems.append(f"{kind}: {', '.join(keys[:3])}{more}")
    if problems:
        raise UserError(
            f"{option} {source}: its weights do not fit this checkout's {type(model).__name__} ({'; '.join(problems)}):"
            " it was saved by other model code; load it with the code that trained it"
        )
    return model


__all__ = [
    "BERT_TEXT_ENCODER", "CAUSAL_LM", "ModelKind", "QFORMER", "QFORMER_OR_VLM", "VISION_ENCODER", "VLM",
    "check_model_source", "check_weights", "hub_errors", "load_pretrained", "load_whole_model",
]
