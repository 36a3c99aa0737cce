"""FSDP set-up the Trainer leaves to accelerate, fitted to these models."""

from transformers import Trainer


def wrap_declared_layers(trainer: Trainer) -> None:
    """Under FSDP with transformer-based auto-wrap and no class names in the accelerate config, names the layer
    classes our model classes declare in `_no_split_modules` (those the model holds) as the classes to wrap.

    accelerate would read the model's `_no_split_modules`, which transformers 5 fills with every class its
    sub-models declare: BLIP-2's list names absent classes (Blip2EncoderLayer, OPTDecoderLayer, ...), on which
    accelerate raises, and Blip2TextEmbeddings, whose wrapping clashes with accelerate sharding the input embeddings
    on their own.
    """
    plugin = getattr(trainer.accelerator.state, "fsdp_plugin", None)
    if plugin is None or plugin.transformer_cls_names_to_wrap is not None:
        return
    model = trainer.accelerator.unwrap_model(trainer.model)
    model = getattr(model, "get_base_model", lambda: model)()  # under a peft wrapper
    present = {type(module).__name__ for module in model.modules()}
    plugin.transformer_cls_names_to_wrap = [name for name in type(model)._no_split_modules if name in present]
