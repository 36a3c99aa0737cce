"""A run killed with SIGKILL and resumed from its checkpoints ends where an uninterrupted run with the same seed ends.

Stage 1 resumes with `--resume_from_checkpoint true` after incomplete checkpoint folders with higher step numbers
were planted beside the real ones; stage 2 (full fine-tuning and LoRA) resumes from an explicit checkpoint path.
Best-model selection reads checkpoints back the same way and is checked here too.
"""

import shutil
import signal
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoModel, TrainingArguments

from cli import UserError
from tests.training.launch import (
    TIMEOUT_S,
    logged_losses,
    max_weight_difference,
    run,
    stage1_args,
    stage2_args,
    start,
    trainer_state,
)
from training import train_qformer
from training.arguments import DataArguments, QFormerModelArguments, parse_args
from training.checkpoints import is_complete_checkpoint

# Long enough that the killed run is still training when the poll sees checkpoint-4 (a step takes ~30 ms here).
STEPS, SAVE_EVERY = 40, 2
WEIGHT_TOLERANCE = 1e-6


# Slow tier (`make test`, not `make test-fast`): trains, kills and resumes through the real scripts.
pytestmark = pytest.mark.slow


def run_killed_after_checkpoint_4(module: str, args: list[str], out: Path, log: Path) -> None:
    """Starts a run and kills it with SIGKILL as soon as `out/checkpoint-4` is complete."""
    process = start(module, args, log)
    deadline = time.monotonic() + TIMEOUT_S
    try:
        while not is_complete_checkpoint(out / "checkpoint-4"):
            assert process.poll() is None, f"the run ended before checkpoint-4:\n{log.read_text()[-4000:]}"
            assert time.monotonic() < deadline, "no complete checkpoint-4 in time"
            time.sleep(0.005)
    finally:
        process.send_signal(signal.SIGKILL)  # kill -9; a no-op if it has already been reaped
        process.wait()
    assert process.returncode == -signal.SIGKILL, f"the run finished before it was killed: raise STEPS above {STEPS}"
    assert not (out / "train_results.json").exists()


def complete_checkpoints(out: Path) -> list[int]:
    """Steps of the checkpoint folders whose trainer_state.json parses and names their own step."""
    steps = []
    for folder in out.glob("checkpoint-*"):
        step = int(folder.name.split("-")[1])
        try:
            if trainer_state(folder)["global_step"] == step:
                steps.append(step)
        except (OSError, ValueError):
            pass
    return sorted(steps)


def plant_incomplete_checkpoints(out: Path) -> list[Path]:
    """Copies of checkpoint-2 under higher step numbers, as a save killed halfway leaves them: one without
    trainer_state.json, one with half of it. Resuming from either would restart from step 2's weights."""
    missing, truncated = out / "checkpoint-1000", out / "checkpoint-1001"
    for folder in (missing, truncated):
        shutil.copytree(out / "checkpoint-2", folder)
    (missing / "trainer_state.json").unlink()
    state = (truncated / "trainer_state.json").read_text()
    (truncated / "trainer_state.json").write_text(state[: len(state) // 2])
    return [missing, truncated]


@pytest.fixture(scope="module")
def stage1_resume(shapes_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("resume_stage1")
    common = {"max_steps": STEPS, "save_strategy": "steps", "save_steps": SAVE_EVERY}
    reference, resumed = root / "uninterrupted", root / "resumed"
    run("training.train_qformer", stage1_args(shapes_data, reference, **common), root / "uninterrupted.log")
    run_killed_after_checkpoint_4("training.train_qformer", stage1_args(shapes_data, resumed, **common), resumed,
                                  root / "killed.log")
    expected_start = max(complete_checkpoints(resumed))
    planted = plant_incomplete_checkpoints(resumed)
    output = run("training.train_qformer",
                 stage1_args(shapes_data, resumed, resume_from_checkpoint=True, **common), root / "resumed.log")
    return {"reference": reference, "resumed": resumed, "output": output, "start": expected_start,
            "planted": planted, "args": stage1_args(shapes_data, resumed, **common)}


def test_stage1_resume_true_skips_incomplete_checkpoints(stage1_resume):
    output = stage1_resume["output"]
    for folder in stage1_resume["planted"]:
        assert f"ignoring {folder}: it was not written completely" in output
    assert f"loading weights from {stage1_resume['resumed']}/checkpoint-{stage1_resume['start']} " in output


def test_stage1_resumed_run_matches_the_uninterrupted_run(stage1_resume):
    reference, resumed = stage1_resume["reference"], stage1_resume["resumed"]
    assert trainer_state(resumed)["global_step"] == STEPS
    difference = max_weight_difference(reference / "model.safetensors", resumed / "model.safetensors")
    losses, expected = logged_losses(resumed), logged_losses(reference)
    print(f"\nstage 1 resumed from checkpoint-{stage1_resume['start']}: max |weight diff| = {difference:.2e}, "
          f"{len(losses)} logged losses, equal: {losses == expected}")
    assert difference <= WEIGHT_TOLERANCE
    assert [step for step, _ in expected] == list(range(1, STEPS + 1))
    assert losses == expected
    # Every checkpoint is a model folder with its card, written when it was saved.
    assert "| steps | 4 |" in (reference / "checkpoint-4" / "README.md").read_text()


@pytest.mark.parametrize("which", [0, 1], ids=["no-trainer-state", "truncated-trainer-state"])
def test_an_explicit_incomplete_checkpoint_is_refused_with_a_clear_error(stage1_resume, which):
    incomplete = stage1_resume["planted"][which]
    with pytest.raises(ValueError, match=r"is not a complete checkpoint .*resume from an earlier checkpoint-N"):
        train_qformer.main([*stage1_resume["args"], "--resume_from_checkpoint", str(incomplete)])


def test_resume_true_without_any_checkpoint_says_where_it_looked(shapes_data, tmp_path):
    empty = tmp_path / "never_trained"
    with pytest.raises(UserError, match=f"no complete checkpoint in {empty}"):
        train_qformer.main([*stage1_args(shapes_data, empty), "--resume_from_checkpoint", "true"])


@pytest.fixture(scope="module", params=["full", "lora"])
def stage2_resume(request, shapes_data, trained_stage1, tmp_path_factory):
    root = tmp_path_factory.mktemp(f"resume_stage2_{request.param}")
    common = {"max_steps": STEPS, "save_strategy": "steps", "save_steps": SAVE_EVERY}
    if request.param == "lora":
        common.update(use_lora=True, lora_r=4, lora_alpha=8, lora_dropout=0.1)
    qformer = trained_stage1[0]
    reference, resumed = root / "uninterrupted", root / "resumed"
    run("training.train_vlm", stage2_args(shapes_data, qformer, reference, **common), root / "uninterrupted.log")
    run_killed_after_checkpoint_4("training.train_vlm", stage2_args(shapes_data, qformer, resumed, **common),
                                  resumed, root / "killed.log")
    run("training.train_vlm",
        stage2_args(shapes_data, qformer, resumed, resume_from_checkpoint=resumed / "checkpoint-4", **common),
        root / "resumed.log")
    return request.param, reference, resumed


def test_stage2_resumed_run_matches_the_uninterrupted_run(stage2_resume):
    kind, reference, resumed = stage2_resume
    files = ["model.safetensors"] + (["adapter/adapter_model.safetensors"] if kind == "lora" else [])
    differences = {f: max_weight_difference(reference / f, resumed / f) for f in files}
    losses, expected = logged_losses(resumed), logged_losses(reference)
    print(f"\nstage 2 ({kind}) resumed from checkpoint-4: max |weight diff| {differences}, "
          f"{len(losses)} logged losses, equal: {losses == expected}")
    assert all(difference <= WEIGHT_TOLERANCE for difference in differences.values())
    assert [step for step, _ in expected] == list(range(1, STEPS + 1))
    assert losses == expected



def test_best_model_loading_restores_every_weight_of_the_chosen_checkpoint(stage1_resume, shapes_data, tmp_path):
    """`load_best_model_at_end` reads a checkpoint into the live model the way resuming does. Which checkpoint a
    metric picks depends on the run, so the test names one and calls the Trainer's loading step itself."""
    arguments = parse_args((QFormerModelArguments, DataArguments, TrainingArguments),
                           stage1_args(shapes_data, tmp_path / "fresh"))
    trainer, _ = train_qformer.build_trainer(*arguments)
    chosen = stage1_resume["resumed"] / "checkpoint-2"
    trainer.state.best_model_checkpoint = str(chosen)
    trainer._load_best_model()
    live = trainer.model.state_dict()
    # The file keeps the original names (a ViT's attention.attention.query): from_pretrained maps them for comparison.
    reference = AutoModel.from_pretrained(chosen).state_dict()
    assert live.keys() == reference.keys()
    assert any(name.startswith("vision_model.layers.") for name in live)  # the renamed weights are compared too
    mismatched = [name for name in live if not torch.equal(live[name], reference[name])]
    assert not mismatched, f"not loaded from {chosen.name}: {mismatched[:5]}"
