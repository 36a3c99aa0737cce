"""Sharded training on two CPU processes. configs/accelerate/fsdp.yaml (FSDP2): both training scripts under
`accelerate launch` train as they do under DDP, checkpoint, resume, and leave output folders that load with the Auto
classes. configs/accelerate/deepspeed_zero2.yaml: stage 1 trains as under DDP (where deepspeed is installed).

The shipped configs are copied with only what a CPU run changes: 2 processes, no bf16, CPU, a free port. accelerate
does not turn FSDP on for CPU processes by itself, so FSDP runs start through `fsdp_on_cpu.py`, which does only
that; DeepSpeed runs on its CPU accelerator (DS_ACCELERATOR=cpu). The reference is the same script and seed under
torchrun (DDP, gloo).
"""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file

from tests.helpers import run_isolated
from tests.training import fsdp_on_cpu
from tests.training.launch import (
    LEARNABLE_QFORMER,
    REPO,
    SMALL_QFORMER,
    finish,
    logged_losses,
    max_weight_difference,
    run_differences,
    run_torchrun,
    script_env,
    stage1_args,
    stage2_args,
)

ACCELERATE_CONFIGS = REPO / "configs/accelerate"
# FSDP and ZeRO-2 reduce-scatter the gradients where DDP all-reduces them: the same sums in another order, so float32
# rounding differs (~1e-7 per step) and AdamW carries it on. Measured here: losses within 5e-7, weights within 1e-7.
LOSS_TOLERANCE = WEIGHT_TOLERANCE = 1e-5
STEPS, SAVE_EVERY, STAGE2_STEPS = 4, 2, 3
# Files only a run under FSDP writes into a checkpoint (under DDP: optimizer.pt, no gathered copy of the model).
FSDP_CHECKPOINT_FILES = {"pytorch_model_fsdp.bin", "optimizer.bin"}
TIED_LM_HEAD = "lm_head.weight"
# Every stage-1 run here: 2 x 16, dropout off, a checkpoint every 2 steps. ITM on: FSDP resumes only an optimizer
# holding a state for every trainable parameter, and with ITM off the ITM head never gets a gradient (torch:
# "Missing optimizer state for parameter 'itm_head.bias'").
STAGE1 = {"qformer_config": {**SMALL_QFORMER, **LEARNABLE_QFORMER}, "itm_weight": 0.5, "max_steps": STEPS,
          "use_cpu": True, "per_device_train_batch_size": 16, "per_device_eval_batch_size": 16,
          "save_strategy": "steps", "save_steps": SAVE_EVERY}


# Slow tier (`make test`, not `make test-fast`): trains with torchrun on two processes.
pytestmark = pytest.mark.slow


def cpu_config(name: str, folder: Path) -> Path:
    """configs/accelerate/<name>.yaml with what a 2-process CPU run changes, written into `folder`."""
    config = yaml.safe_load((ACCELERATE_CONFIGS / f"{name}.yaml").read_text())
    # main_process_port 0: accelerate picks a free port, so two suites running at once never meet on one.
    config.update(num_processes=2, mixed_precision="no", use_cpu=True, main_process_port=0)
    path = folder / f"{name}_cpu.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def accelerate_launch(config: Path, target: list[str], log: Path, **env: str) -> str:
    """`accelerate launch --config_file config <target>`; returns the output of all processes."""
    command = [sys.executable, "-m", "accelerate.commands.accelerate_cli", "launch", "--config_file", str(config),
               *target]
    with open(log, "w") as out:
        process = subprocess.Popen(command, cwd=REPO, env={**script_env(), **env}, stdout=out,
                                   stderr=subprocess.STDOUT, start_new_session=True)
    return finish(process, log)


def run_fsdp(config: Path, module: str, args: list[str], log: Path) -> str:
    """The module under FSDP on CPU processes (see fsdp_on_cpu.py)."""
    return accelerate_launch(config, [fsdp_on_cpu.__file__, module, *args], log)


def loaded_versus_trained(folder: Path, checkpoint: Path, auto_class: str, tmp_path: Path) -> dict:
    """Loads `folder` with `auto_class` in a process that cannot import this repository and compares its weights
    with the full state dict FSDP gathered into `checkpoint` (the weights as trained, under the module names)."""
    code = f"""
    import json
    import torch
    from transformers import {auto_class}

    model = {auto_class}.from_pretrained({str(folder)!r}, trust_remote_code=True)
    loaded = model.state_dict()
    trained = torch.load({str(checkpoint / "pytorch_model_fsdp.bin")!r}, weights_only=True)
    shared = loaded.keys() & trained.keys()
    print(json.dumps({{"class": type(model).__name__, "only_trained": sorted(trained.keys() - loaded.keys()),
                      "only_loaded": sorted(loaded.keys() - trained.keys()), "compared": len(shared),
                      "max_difference": max((loaded[k] - trained[k]).abs().max().item() for k in shared)}}))
    """
    return json.loads(run_isolated(code, tmp_path).strip().splitlines()[-1])


@pytest.fixture(scope="module")
def fsdp_config(tmp_path_factory) -> Path:
    return cpu_config("fsdp", tmp_path_factory.mktemp("fsdp_config"))


@pytest.fixture(scope="module")
def stage1(shapes_data, fsdp_config, tmp_path_factory):
    """train_qformer under FSDP and under DDP, then the FSDP run resumed from its checkpoint-2: the (fsdp, ddp,
    resumed) output folders and the resumed run's output."""
    root = tmp_path_factory.mktemp("fsdp_stage1")
    fsdp, ddp, resumed = root / "fsdp", root / "ddp", root / "resumed"
    run_fsdp(fsdp_config, "training.train_qformer", stage1_args(shapes_data, fsdp, **STAGE1), root / "fsdp.log")
    run_torchrun(["-m", "training.train_qformer", *stage1_args(shapes_data, ddp, **STAGE1)], root / "ddp.log")
    shutil.copytree(fsdp / f"checkpoint-{SAVE_EVERY}", resumed / f"checkpoint-{SAVE_EVERY}")
    resumed_output = run_fsdp(fsdp_config, "training.train_qformer",
                              stage1_args(shapes_data, resumed, resume_from_checkpoint=True, **STAGE1),
                              root / "resumed.log")
    return fsdp, ddp, resumed, resumed_output


def test_fsdp_trains_stage1_like_ddp(stage1):
    fsdp, ddp, _, _ = stage1
    for step in (SAVE_EVERY, STEPS):
        files = {path.name for path in (fsdp / f"checkpoint-{step}").iterdir()}
        assert FSDP_CHECKPOINT_FILES <= files, f"checkpoint-{step} was not saved by FSDP: {sorted(files)}"
    assert not FSDP_CHECKPOINT_FILES & {path.name for path in (ddp / f"checkpoint-{STEPS}").iterdir()}
    loss_difference, weight_difference = run_differences(fsdp, ddp, STEPS, "train_qformer FSDP vs DDP, 2 x 16")
    assert loss_difference < LOSS_TOLERANCE
    assert weight_difference < WEIGHT_TOLERANCE
    # The evaluation after training, over the split both processes share.
    eval_fsdp, eval_ddp = (json.loads((folder / "eval_results.json").read_text()) for folder in (fsdp, ddp))
    assert eval_fsdp["eval_loss"] == pytest.approx(eval_ddp["eval_loss"], abs=LOSS_TOLERANCE)


def test_fsdp_resumes_stage1_from_its_checkpoint(stage1):
    fsdp, _, resumed, output = stage1
    # Only the steps after the checkpoint ran (the Trainer prints a dict per logging step); the log history holds
    # all of them, the first ones read back from the checkpoint.
    assert output.count("{'loss': ") == STEPS - SAVE_EVERY, output[-3000:]
    losses, expected = logged_losses(resumed), logged_losses(fsdp)
    assert [step for step, _ in losses] == list(range(1, STEPS + 1))
    loss_difference = max(abs(a - b) for (_, a), (_, b) in zip(losses, expected, strict=True))
    weight_difference = max_weight_difference(resumed / "model.safetensors", fsdp / "model.safetensors")
    print(f"\ntrain_qformer FSDP resumed at step {SAVE_EVERY} vs uninterrupted: max |loss diff| = "
          f"{loss_difference:.2e}, max |weight diff| = {weight_difference:.2e}")
    assert loss_difference < LOSS_TOLERANCE, f"losses {losses} vs {expected}"
    assert weight_difference < WEIGHT_TOLERANCE


def test_fsdp_stage1_folder_loads_with_the_trained_weights(stage1, tmp_path):
    fsdp = stage1[0]
    names = {path.name for path in fsdp.iterdir()}
    # The gathered model and its own code; no FSDP shards or torch files taken for the model.
    assert {"model.safetensors", "modeling_qformer.py", "qformer_losses.py"} <= names
    assert not [name for name in names if "fsdp" in name], sorted(names)
    assert json.loads((fsdp / "config.json").read_text())["auto_map"]["AutoModel"] == "modeling_qformer.QFormerModel"
    report = loaded_versus_trained(fsdp, fsdp / f"checkpoint-{STEPS}", "AutoModel", tmp_path)
    assert report["class"] == "QFormerModel"
    assert report["only_trained"] == report["only_loaded"] == [] and report["compared"] > 50
    assert report["max_difference"] == 0.0


@pytest.fixture(scope="module")
def stage2(shapes_data, fsdp_config, stage1, tmp_path_factory):
    """train_vlm (LoRA off) on the FSDP stage-1 output, under FSDP and under DDP: (fsdp, ddp) output folders."""
    root = tmp_path_factory.mktemp("fsdp_stage2")
    qformer = stage1[0]
    common = {"max_steps": STAGE2_STEPS, "use_cpu": True, "save_strategy": "steps", "save_steps": STAGE2_STEPS}
    fsdp, ddp = root / "fsdp", root / "ddp"
    run_fsdp(fsdp_config, "training.train_vlm", stage2_args(shapes_data, qformer, fsdp, **common), root / "fsdp.log")
    run_torchrun(["-m", "training.train_vlm", *stage2_args(shapes_data, qformer, ddp, **common)], root / "ddp.log")
    return fsdp, ddp


def test_fsdp_trains_stage2_like_ddp_and_saves_a_loadable_vlm(stage2, tmp_path):
    fsdp, ddp = stage2
    assert FSDP_CHECKPOINT_FILES <= {path.name for path in (fsdp / f"checkpoint-{STAGE2_STEPS}").iterdir()}
    losses_fsdp, losses_ddp = logged_losses(fsdp), logged_losses(ddp)
    assert [step for step, _ in losses_fsdp] == list(range(1, STAGE2_STEPS + 1))
    loss_difference = max(abs(a - b) for (_, a), (_, b) in zip(losses_fsdp, losses_ddp, strict=True))
    weights_fsdp, weights_ddp = (load_file(str(folder / "model.safetensors")) for folder in (fsdp, ddp))
    # save_pretrained drops a tied weight only when it shares storage with its source, and the state dict FSDP
    # gathers holds copies: the LM head tied to the embeddings is written too (equal, and tied again on loading).
    assert weights_fsdp.keys() - weights_ddp.keys() == {TIED_LM_HEAD}
    assert weights_fsdp[TIED_LM_HEAD].equal(weights_fsdp["model.language_model.embed_tokens.weight"])
    weight_difference = max((weights_fsdp[name] - tensor).abs().max().item() for name, tensor in weights_ddp.items())
    print(f"\ntrain_vlm FSDP vs DDP: max |loss diff| = {loss_difference:.2e}, max |weight diff| after "
          f"{STAGE2_STEPS} steps = {weight_difference:.2e}")
    assert loss_difference < LOSS_TOLERANCE, f"losses {losses_fsdp} vs {losses_ddp}"
    assert weight_difference < WEIGHT_TOLERANCE
    assert not [path.name for path in fsdp.iterdir() if "fsdp" in path.name]
    report = loaded_versus_trained(fsdp, fsdp / f"checkpoint-{STAGE2_STEPS}", "AutoModelForImageTextToText", tmp_path)
    assert report["class"] == "VLMForConditionalGeneration"
    assert report["only_trained"] == report["only_loaded"] == [] and report["compared"] > 50, report
    assert report["max_difference"] == 0.0


def test_deepspeed_zero2_trains_stage1_like_ddp(shapes_data, stage1, tmp_path):
    pytest.importorskip("deepspeed", reason="DeepSpeed is optional (pip install deepspeed)")
    ddp, out = stage1[1], tmp_path / "deepspeed"
    # The first run on a machine compiles DeepSpeed's shared-memory communication op (minutes on 2 cores); later
    # runs load it from torch's extension cache.
    accelerate_launch(cpu_config("deepspeed_zero2", tmp_path),
                      ["-m", "training.train_qformer", *stage1_args(shapes_data, out, **STAGE1)],
                      tmp_path / "deepspeed.log", DS_ACCELERATOR="cpu")
    # DeepSpeed's own checkpoint (engine and ZeRO optimizer partitions) beside the Trainer's.
    assert (out / f"checkpoint-{STEPS}" / f"global_step{STEPS}").is_dir()
    loss_difference, weight_difference = run_differences(out, ddp, STEPS,
                                                         "train_qformer DeepSpeed ZeRO-2 vs DDP, 2 x 16")
    assert loss_difference < LOSS_TOLERANCE
    assert weight_difference < WEIGHT_TOLERANCE
