"""LoRA on the VLM's language model, with the Q-Former and the MLP adapter trained fully beside it.

peft's `modules_to_save` would keep a trainable copy of each named module next to the original. For the Q-Former
that copies the frozen vision encoder too: at the base recipe's sizes, far more parameters in memory than the parts
add up to, and an adapter folder holding the frozen vision tensors (docs/measurements.md). Here the fully trained
parts keep `requires_grad` in place instead (no copy), and `save_adapter` writes them beside peft's LoRA file, in
`NON_LORA_WEIGHTS` (LLaVA keeps the same kind of file for its projector). The adapter folder then holds LoRA, the
Q-Former's trained weights and the MLP adapter, and nothing frozen.
"""

import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

# Projection layers of the decoder families we support (Llama/SmolLM, Qwen3, Mistral, ...): "all linear layers"
# of the original recipe.
LORA_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
NON_LORA_WEIGHTS = "non_lora_trainables.safetensors"


def lora_target_regex(target_modules: tuple[str, ...] | list[str] = LORA_TARGET_MODULES) -> str:
    """A peft `target_modules` regex that matches the given projections inside the language model only."""
    return rf".*language_model\..*\.({'|'.join(target_modules)})"


def add_lora(
    model,
    r: int = 64,
    alpha: int = 128,
    dropout: float = 0.1,
    target_modules: tuple[str, ...] | list[str] = LORA_TARGET_MODULES,
    trainable_modules: tuple[str, ...] | list[str] = ("qformer", "adapter"),
):
    """Wraps a `VLMForConditionalGeneration` with LoRA on the language model (original recipe: r=64, alpha=128, all
    linear layers) and keeps `trainable_modules` fully trainable in place; the vision encoder stays frozen when the
    config says so.

    Returns:
        a `peft.PeftModel`; `merge_and_unload()` gives back a plain `VLMForConditionalGeneration`, `save_adapter`
        writes the adapter folder.
    """
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=lora_target_regex(target_modules))
    peft_model = get_peft_model(model, lora)  # freezes everything but LoRA
    for name in trainable_modules:
        model.get_submodule(name).requires_grad_(True)
    if model.config.qformer_config.freeze_vision:
        model.qformer.vision_model.requires_grad_(False)
    return peft_model


def non_lora_trainables(peft_model) -> dict[str, torch.Tensor]:
    """The trainable weights outside LoRA, by their names in the wrapped VLM (e.g. `qformer.query_tokens`)."""
    return {name: param.detach() for name, param in peft_model.get_base_model().named_parameters()
            if param.requires_grad and "lora_" not in name}


def save_non_lora_trainables(peft_model, folder: str | os.PathLike) -> None:
    weights = {name: tensor.contiguous().cpu() for name, tensor in non_lora_trainables(peft_model).items()}
    save_file(weights, str(Path(folder) / NON_LORA_WEIGHTS), metadata={"format": "pt"})


def load_non_lora_trainables(peft_model, folder: str | os.PathLike) -> bool:
    """Loads `folder`'s non-LoRA weights into the wrapped VLM; False when the folder has none (LoRA only)."""
    path = Path(folder) / NON_LORA_WEIGHTS
    if not path.is_file():
        return False
    model = peft_model.get_base_model()
    weights = load_file(str(path), device=str(next(model.parameters()).device))
    unexpected = model.load_state_dict(weights, strict=False).unexpected_keys
    if unexpected:
        raise ValueError(f"{path} holds weights this model does not have: {unexpected[:5]}; it belongs to another "
                         "architecture")
    return True


def save_adapter(peft_model, folder: str | os.PathLike) -> None:
    """peft's LoRA files plus the fully trained parts: everything a `load_adapter` onto the same base needs."""
    peft_model.save_pretrained(folder)
    save_non_lora_trainables(peft_model, folder)


def load_adapter(model, folder: str | os.PathLike, is_trainable: bool = False):
    """Applies an adapter folder written by `save_adapter` to `model` (the VLM training started from).

    Returns:
        a `peft.PeftModel`; `merge_and_unload()` gives the trained VLM.
    """
    from peft import PeftModel

    peft_model = PeftModel.from_pretrained(model, folder, is_trainable=is_trainable)
    load_non_lora_trainables(peft_model, folder)
    return peft_model


__all__ = [
    "LORA_TARGET_MODULES",
    "NON_LORA_WEIGHTS",
    "add_lora",
    "load_adapter",
    "load_non_lora_trainables",
    "lora_target_regex",
    "save_adapter",
    "save_non_lora_trainables",
]
