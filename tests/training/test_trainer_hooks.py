"""The Trainer's private methods that our trainers override, pinned to the transformers installed.

Each override carries a job no public hook does (exact resume of streams and LoRA runs, complete checkpoints on
every rank, checkpoints renamed into place only when whole, no pickles on the Hub, uint8 pixels normalised on the
device; the comment above each, or its class's docstring, says which). A
transformers release that renames one of these methods, changes its parameters or stops calling it from the path
we rely on would turn that job off without an error. These tests fail first, naming the method.
"""

import inspect

import pytest
import transformers
from transformers import Trainer

from training.checkpoints import AtomicSavesMixin
from training.device_normalize import DeviceNormalizeMixin
from training.streaming import StreamingTrainerMixin
from training.trainer import ModelCardTrainerMixin, ParamGroupTrainer

OURS = (ParamGroupTrainer, ModelCardTrainerMixin, StreamingTrainerMixin, DeviceNormalizeMixin, AtomicSavesMixin)

# The private Trainer method -> the Trainer methods whose calls to it our override depends on.
CALLED_FROM = {
    "_save": {"save_model"},
    "_save_rng_state": {"_save_checkpoint"},
    "_push_from_checkpoint": {"_save_checkpoint"},
    "_load_from_checkpoint": {"train"},
    "_load_rng_state": {"_run_epoch"},
    "_load_best_model": {"_finalize_training"},
    "_prepare_inputs": {"training_step", "prediction_step"},
    "_save_checkpoint": {"_maybe_log_save_evaluate"},
    "_get_output_dir": {"_save_checkpoint"},
}


def overrides() -> list[tuple[type, str]]:
    return [(cls, name) for cls in OURS for name in vars(cls)
            if name.startswith("_") and not name.startswith("__") and hasattr(Trainer, name)]


def callers(name: str) -> set[str]:
    return {method for method, function in inspect.getmembers(Trainer, inspect.isfunction)
            if f"self.{name}(" in inspect.getsource(function)}


def test_every_private_override_is_pinned():
    assert {name for _, name in overrides()} == set(CALLED_FROM)


@pytest.mark.parametrize("cls, name", overrides(), ids=lambda v: v if isinstance(v, str) else v.__name__)
def test_override_matches_the_trainers_method(cls, name):
    ours = list(inspect.signature(getattr(cls, name)).parameters)
    theirs = list(inspect.signature(getattr(Trainer, name)).parameters)
    assert ours == theirs, (f"transformers {transformers.__version__} changed Trainer.{name}{theirs}; "
                            f"{cls.__name__}.{name}{ours} no longer overrides it as written")
    missing = CALLED_FROM[name] - callers(name)
    assert not missing, (f"transformers {transformers.__version__}: Trainer.{', '.join(sorted(missing))} no longer "
                         f"calls {name}, which {cls.__name__} overrides; move the override to where it is called now")


def test_the_hub_api_the_pushes_go_through():
    """`training.trainer.uploads_without_pickles` wraps `transformers.trainer.hf_api`: the pushes must still call it."""
    assert callable(transformers.trainer.hf_api)
    assert {"push_to_hub", "_push_from_checkpoint"} <= {
        method for method, function in inspect.getmembers(Trainer, inspect.isfunction)
        if "hf_api()" in inspect.getsource(function)}


def test_save_model_still_pushes_only_outside_internal_calls():
    """`AtomicSavesMixin.save_final_weights` saves through `save_model(folder, _internal_call=True)` so that it
    does not push output_dir before the final model is moved there."""
    assert "_internal_call" in inspect.signature(Trainer.save_model).parameters
    assert "not _internal_call" in inspect.getsource(Trainer.save_model)
