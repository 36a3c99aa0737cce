"""The models: a stage-1 Q-Former and a stage-2 VLM, as transformers `PreTrainedModel`s.

Importing this package registers them with the Auto classes of this process (`AutoConfig`, `AutoModel`,
`AutoModelForImageTextToText`, `AutoProcessor`) and marks them to ship their code in `save_pretrained`, so a
saved folder loads anywhere with `trust_remote_code=True`.
"""

from transformers import AutoConfig, AutoModel, AutoModelForImageTextToText, AutoProcessor

from .configuration_qformer import QFormerConfig
from .configuration_vlm import VLMConfig
from .lora import add_lora
from .modeling_qformer import QFormerModel, QFormerModelOutput
from .modeling_vlm import VLMCausalLMOutputWithPast, VLMForConditionalGeneration, VLMModel
from .processing_vlm import VLMProcessor

AutoConfig.register(QFormerConfig.model_type, QFormerConfig, exist_ok=True)
AutoConfig.register(VLMConfig.model_type, VLMConfig, exist_ok=True)
AutoModel.register(QFormerConfig, QFormerModel, exist_ok=True)
AutoModel.register(VLMConfig, VLMForConditionalGeneration, exist_ok=True)
AutoModelForImageTextToText.register(VLMConfig, VLMForConditionalGeneration, exist_ok=True)
AutoProcessor.register(VLMConfig, VLMProcessor, exist_ok=True)

QFormerConfig.register_for_auto_class()
VLMConfig.register_for_auto_class()
QFormerModel.register_for_auto_class("AutoModel")
VLMForConditionalGeneration.register_for_auto_class("AutoModelForImageTextToText")
VLMProcessor.register_for_auto_class("AutoProcessor")

__all__ = [
    "QFormerConfig",
    "QFormerModel",
    "QFormerModelOutput",
    "VLMCausalLMOutputWithPast",
    "VLMConfig",
    "VLMForConditionalGeneration",
    "VLMModel",
    "VLMProcessor",
    "add_lora",
]
