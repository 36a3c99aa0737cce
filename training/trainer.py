"""The Trainer subclass both stages share: parameter groups with their own learning rates."""

import copy
import logging
import os
import re
from collections.abc import Sequence

from transformers import PreTrainedModel, Trainer
from transformers.utils import SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME

logger = logging.getLogger(__name__)


class ParamGroupTrainer(Trainer):
    """A `Trainer` whose optimizer gives parameter groups their own learning rates.

    Args:
        param_group_lrs: `(regex, learning_rate)` rules matched against parameter names in order; the first match
            wins, and parameters matching none use `args.learning_rate`. Weight decay follows the Trainer's usual
            rule (none on biases and norms) within each group.
    """

    def __init__(self, *args, param_group_lrs: Sequence[tuple[str, float]] = (), **kwargs):
        self.param_group_lrs = [(re.compile(pattern), lr) for pattern, lr in param_group_lrs]
        super().__init__(*args, **kwargs)

    def _lr_of(self, name: str) -> float:
        for pattern, lr in self.param_group_lrs:
            if pattern.search(name):
                return lr
        return self.args.learning_rate

    def create_optimizer(self, model=None):
        if self.optimizer is not None:
            return self.optimizer
        model = self.model if model is None else model
        decay = set(self.get_decay_parameter_names(model))
        groups: dict[tuple[float, float], list] = {}
        for name, param in model.named_parameters():
            if param.requires_grad:
                key = (self._lr_of(name), self.args.weight_decay if name in decay else 0.0)
                groups.setdefault(key, []).append(param)
        param_groups = [{"params": ps, "lr": lr, "weight_decay": wd} for (lr, wd), ps in sorted(groups.items())]
        for group in param_groups:
            logger.info("parameter group: lr=%g weight_decay=%g, %d tensors", group["lr"], group["weight_decay"],
                        len(group["params"]))
        optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, model)
        optimizer_kwargs.pop("lr", None)
        self.optimizer = optimizer_cls(param_groups, lr=self.args.learning_rate, **optimizer_kwargs)
        return self.optimizer

    # transformers 5 saves weights under their original (legacy) names, e.g. a ViT's `encoder.layer.0.attention.
    # attention.query`, while the live modules use new ones (`layers.0.attention.q_proj`); `from_pretrained` maps
    # them back, but the Trainer's resume and best-model loads call `load_state_dict(strict=False)` on the raw file,
    # so those weights were silently left as initialised and a resumed run drifted from an uninterrupted one. For a
    # plain PreTrainedModel we load through `from_pretrained` instead; peft, FSDP and DeepSpeed keep their own paths.
    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        if not self._load_converted_weights(resume_from_checkpoint, self.model if model is None else model):
            super()._load_from_checkpoint(resume_from_checkpoint, model)

    def _load_best_model(self):
        if not self._load_converted_weights(self.state.best_model_checkpoint, self.model):
            super()._load_best_model()

    def _load_converted_weights(self, folder: str, model) -> bool:
        """Loads `folder`'s weights into `model` with the names mapped as `from_pretrained` does; False if not ours."""
        if self.is_deepspeed_enabled or self.is_fsdp_enabled or not isinstance(model, PreTrainedModel):
            return False
        if not any(os.path.isfile(os.path.join(folder, n)) for n in (SAFE_WEIGHTS_NAME, SAFE_WEIGHTS_INDEX_NAME)):
            return False
        logger.info("loading weights from %s (with transformers' key conversion)", folder)
        config = copy.deepcopy(model.config)  # from_pretrained may adjust the config it is given
        loaded = type(model).from_pretrained(folder, config=config, dtype=next(model.parameters()).dtype)
        # strict: a weight the file does not hold is an error here, never a silently kept initial value.
        model.load_state_dict(loaded.state_dict(), strict=True)
        return True
