"""What both stages' Trainers share: parameter groups with their own learning rates, checkpoints that hold every
trained weight, and the model card in every saved folder."""

import copy
import logging
import os
import re
from collections.abc import Sequence
from contextlib import contextmanager
from pathlib import Path

import transformers.trainer
from peft import PeftModel
from transformers import PreTrainedModel, Trainer
from transformers.utils import SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME

from eval.model_card import write_model_card
from modeling.lora import load_non_lora_trainables, save_non_lora_trainables

from .checkpoints import STAGING_PREFIX
from .output_lock import LOCK_NAME

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
        model = self.model if model is None else model
        if not self._load_converted_weights(resume_from_checkpoint, model):
            super()._load_from_checkpoint(resume_from_checkpoint, model)
        self._load_non_lora(resume_from_checkpoint, model)

    def _load_best_model(self):
        if not self._load_converted_weights(self.state.best_model_checkpoint, self.model):
            super()._load_best_model()
        self._load_non_lora(self.state.best_model_checkpoint, self.model)

    # Under LoRA the Trainer saves and loads peft's adapter file only; the Q-Former and the MLP adapter train fully
    # beside it (`modeling.lora`) and travel in a file of their own, written before trainer_state.json, so the
    # completeness rule of `training.checkpoints` covers it.
    def _save(self, output_dir: str | None = None, state_dict=None):
        super()._save(output_dir, state_dict)
        model = self.accelerator.unwrap_model(self.model)
        if isinstance(model, PeftModel) and self.args.should_save:
            save_non_lora_trainables(model, output_dir or self.args.output_dir)

    # The main process writes trainer_state.json, the mark of a complete checkpoint (`training.checkpoints`), right
    # after each process has written its own RNG state, with no barrier between: a kill at that moment left a
    # checkpoint that counted as complete without another rank's rng_state_N.pth. Everyone waits for everyone first.
    def _save_rng_state(self, output_dir):
        super()._save_rng_state(output_dir)
        self.accelerator.wait_for_everyone()

    def _load_non_lora(self, folder: str, model) -> None:
        model = self.accelerator.unwrap_model(model)
        if isinstance(model, PeftModel) and load_non_lora_trainables(model, folder):
            logger.info("loaded the Q-Former and adapter weights trained beside LoRA from %s", folder)

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


# Pickles: training_args.bin (the arguments), and in checkpoints the optimizer, scheduler and RNG states. A pickle
# runs code when loaded, so none goes up to the Hub: a pushed checkpoint holds weights, card and processor, and a run
# resumes from its local checkpoint folder. The run's lock file and folders still being written are of this machine
# only.
PICKLE_PATTERNS = ["*.bin", "*.pt", "*.pth", "*.pkl", "*.pickle"]
LOCAL_ONLY_PATTERNS = [*PICKLE_PATTERNS, LOCK_NAME, f"{STAGING_PREFIX}*"]


class _UploadsWithoutPickles:
    """The Hub API the Trainer pushes through, with `LOCAL_ONLY_PATTERNS` added to every upload_folder's ignore
    list."""

    def __init__(self, api):
        self._api = api

    def __getattr__(self, name):
        return getattr(self._api, name)

    def upload_folder(self, *args, ignore_patterns=None, **kwargs):
        return self._api.upload_folder(*args, ignore_patterns=[*(ignore_patterns or []), *LOCAL_ONLY_PATTERNS],
                                       **kwargs)


@contextmanager
def uploads_without_pickles():
    """For the Trainer's own pushes (`push_to_hub`, the pushes at each save), which upload whole folders with fixed
    ignore patterns: its Hub API is wrapped for the duration of the call."""
    real = transformers.trainer.hf_api
    transformers.trainer.hf_api = lambda: _UploadsWithoutPickles(real())
    try:
        yield
    finally:
        transformers.trainer.hf_api = real


class ModelCardTrainerMixin:
    """Trainer mixin: our card in every folder the Trainer saves a model to, and in what `push_to_hub` uploads.

    `card_info` (set by the script) gives the base models and the dataset; `card_samples` sample outputs.
    """

    card_info: dict | None = None
    card_samples: list[tuple[str, str]] | None = None

    def card_model(self):
        """The `PreTrainedModel` being trained (the VLM inside a peft or DDP wrapper)."""
        model = self.accelerator.unwrap_model(self.model)
        model = getattr(model, "base_model", model)
        return getattr(model, "model", model)

    def card_training_rows(self) -> list[list]:
        args, state = self.args, self.state
        batch = args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size
        precision = "bf16" if args.bf16 else "fp16" if args.fp16 else "fp32"
        return [
            ["data", (self.card_info or {}).get("dataset", "?")],
            ["steps", state.global_step],
            ["batch size", f"{batch} ({args.per_device_train_batch_size} per device x "
                           f"{args.gradient_accumulation_steps} accumulation steps x {args.world_size} processes)"],
            ["learning rate", f"{args.learning_rate:g}, {getattr(args.lr_scheduler_type, 'value', '?')} schedule, "
                              f"{args.warmup_steps} warmup steps, weight decay {args.weight_decay:g}"],
            ["precision", precision],
            ["seed", args.seed],
        ]

    def write_card(self, folder: str | os.PathLike, adapter: bool = False) -> Path:
        evaluations = [entry for entry in self.state.log_history if any(k.startswith("eval_") for k in entry)]
        # The scores of the last evaluation; its timings say nothing about the model.
        metrics = {k: v for k, v in (evaluations[-1] if evaluations else {}).items()
                   if k.startswith("eval_") and not k.endswith(("_runtime", "_per_second"))}
        info = self.card_info or {}
        repo = self.args.hub_model_id or Path(self.args.output_dir).name
        return write_model_card(
            folder, self.card_model(), repo=repo, training=self.card_training_rows(), metrics=metrics,
            samples=self.card_samples, base_models=info.get("base_models", ()), dataset=info.get("dataset"),
            adapter=adapter,
        )

    def create_model_card(self, *args, **kwargs):
        # Replaces the Trainer's own draft (its "More information needed" sections); called by push_to_hub too.
        if self.is_world_process_zero():
            self.write_card(self.args.output_dir)

    def _save(self, output_dir: str | None = None, state_dict=None):
        super()._save(output_dir, state_dict)
        if self.args.should_save:
            self.write_card(output_dir or self.args.output_dir)

    def _push_from_checkpoint(self, checkpoint_folder: str) -> None:
        # Pushes during training (hub_strategy) upload the output folder, not the checkpoint: card it first.
        if self.is_world_process_zero():
            self.write_card(self.args.output_dir)
        with uploads_without_pickles():
            super()._push_from_checkpoint(checkpoint_folder)

    def push_to_hub(self, *args, **kwargs):
        with uploads_without_pickles():
            return super().push_to_hub(*args, **kwargs)
