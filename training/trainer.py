"""The Trainer subclass both stages share: parameter groups with their own learning rates."""

import logging
import re
from collections.abc import Sequence

from transformers import Trainer

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
